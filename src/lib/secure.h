/* Secrets in memory (secure.c): passphrases, key file contents and volume
 * keys, each on pages of its own that are locked in RAM, left out of core
 * dumps, zeroed in a forked child and wiped on free; the process is not
 * dumpable while any of them lives. keys.h includes this header. */
#ifndef QS_SECURE_H
#define QS_SECURE_H

#include <stddef.h>
#include <stdint.h>

/* Zeroed memory for a secret, size 0 included. Returns NULL (errno
 * ENOMEM) when the address space is exhausted; failing to lock the pages
 * (RLIMIT_MEMLOCK of an unprivileged user) is not an error. */
void *secure_alloc(size_t size);
/* Wipes the whole allocation and returns its pages; NULL is a no-op. */
void secure_free(void *p);

/* Tests only: when set, secure_free calls it with the caller's bytes once
 * they are wiped, just before the pages are unmapped. */
extern void (*secure_free_hook)(const void *p, size_t size);

#define PASSPHRASE_MAX_SIZE (8U << 20)	/* as cryptsetup's key file limit */

/* A volume key: one secure_alloc block, wiped by volume_key_free(). */
struct volume_key {
	size_t size;		/* bytes of key */
	uint8_t key[];
};

/* Returns NULL on out of memory; key bytes are zeroed. */
struct volume_key *volume_key_alloc(size_t size);
void volume_key_free(struct volume_key *vk);

/* A passphrase or key file content: both the struct and data live in
 * secure memory. data is NUL-terminated for convenience but may contain
 * NUL bytes (binary key files): len is authoritative. */
struct passphrase {
	char *data;
	size_t len;
};

/* Zeroed passphrase of len bytes (len <= PASSPHRASE_MAX_SIZE).
 * Returns 0, -EINVAL (too long) or -ENOMEM. */
int passphrase_alloc(size_t len, struct passphrase **out);
int passphrase_from_buffer(const void *data, size_t len, struct passphrase **out);
void passphrase_free(struct passphrase *pp);

#endif
