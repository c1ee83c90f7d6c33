/* Secrets in memory (secure.c): passphrases, key file contents and volume
 * keys, in locked memory wiped on free. keys.h includes this header. */
#ifndef QS_SECURE_H
#define QS_SECURE_H

#include <stddef.h>
#include <stdint.h>

/* Zeroed memory for a secret; NULL on out of memory. */
void *secure_alloc(size_t size);
void secure_free(void *p);	/* wipes the whole allocation */

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
