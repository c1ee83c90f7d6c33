/* Keys: the LUKS header embedded in qcow2 images (crypt_method 2,
 * libcryptsetup), QEMU's legacy AES (crypt_method 1, OpenSSL) and the
 * plausibility check that stands in for the key check the legacy format
 * lacks (libblkid plus an entropy test).
 *
 * Each outside library is included by one file only:
 *   crypto_luks.c      libcryptsetup   luks_*
 *   crypto_openssl.c   OpenSSL         legacy_aes_*
 *   probe_blkid.c      libblkid        probe_signature
 *   legacy_key_check.c none            key_*, legacy_key_check
 * Passphrases and volume keys in memory: secure.h (secure.c).
 * Nothing here ever logs key or passphrase bytes. */
#ifndef QS_KEYS_H
#define QS_KEYS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "io.h"
#include "secure.h"

#define KEY_SECTOR_SIZE 512

/* ---- LUKS1 header embedded in a qcow2 image (crypto_luks.c) ---- */

#define LUKS_NUM_SLOTS 8
#define LUKS_PHDR_SIZE 592		/* bytes of the LUKS1 binary header */
#define LUKS_MAX_HEADER_LENGTH (64ULL << 20)	/* sanity bound on the region */

struct luks_slot {
	bool active;
	uint32_t iterations;	/* PBKDF2 iterations of the slot */
	uint64_t key_offset;	/* bytes from the start of the LUKS header */
	uint32_t stripes;	/* anti-forensic stripes */
};

/* What the header says, without any passphrase. Strings are NUL-terminated
 * and contain printable ASCII only (validated). */
struct luks_info {
	char cipher_name[33];	/* "aes", "serpent", "twofish", "cast5", ... */
	char cipher_mode[33];	/* "xts-plain64", "cbc-essiv:sha256", "cbc-plain", ... */
	char hash[33];		/* PBKDF2 hash, e.g. "sha256" */
	char uuid[41];
	uint32_t key_bytes;	/* volume key size in bytes (64 for aes-256-xts) */
	uint64_t payload_offset;	/* bytes (unused by qcow2: data is in clusters) */
	uint32_t mk_iterations;	/* master key digest iterations */
	struct luks_slot slots[LUKS_NUM_SLOTS];
	unsigned int active_slots;
};

/* Parse the LUKS1 header at [off, off+len) of io (the image's
 * crypt_header_offset/crypt_header_length). Returns 0, -EUCLEAN (not a
 * valid LUKS1 header, or key material outside the region), -ENOTSUP (not
 * LUKS version 1) or the read error. */
int luks_read_info(const struct img_io *io, uint64_t off, uint64_t len, struct luks_info *info);

/* Parse a LUKS1 header already in memory (the first LUKS_PHDR_SIZE bytes
 * of a region of region_len bytes). Pure; used by luks_read_info. */
int luks_parse_header(const void *phdr, uint64_t region_len, struct luks_info *info);

/* Unlock the header at [off, off+len) of io with pp and return the volume
 * key (*vk, free with volume_key_free) and the slot that opened it (*slot,
 * may be NULL). The header is handed to libcryptsetup through a memfd,
 * never written to disk. Returns 0, -EPERM (no key slot accepts the
 * passphrase), -ENOENT (no active key slot), -ENOTSUP (the host cannot run
 * the slot's cipher: no userspace implementation and no AF_ALG), -EUCLEAN
 * or another -errno. */
int luks_unlock(const struct img_io *io, uint64_t off, uint64_t len,
		const struct passphrase *pp, struct volume_key **vk, int *slot);

/* The dm-crypt cipher specification for the header ("aes-xts-plain64",
 * "aes-cbc-essiv:sha256", "serpent-xts-plain64", "twofish-cbc-plain", ...):
 * QEMU stores the dm-crypt/kernel names, so it is cipher_name "-"
 * cipher_mode. Returns 0, -EUCLEAN (a character dm-crypt would not take)
 * or -ENOSPC (buf too small). */
int luks_dm_cipher_spec(const struct luks_info *info, char *buf, size_t buflen);

/* ---- Legacy AES (crypt_method 1; crypto_openssl.c) ----
 * As QEMU's crypto/block-qcow.c: the key is the passphrase bytes up to the
 * first NUL, at most 16, zero padded; AES-128-CBC per 512-byte sector with
 * IV = plain64 of the GUEST sector number. dm-crypt: "aes-cbc-plain64". */

#define LEGACY_AES_KEY_SIZE 16
#define LEGACY_AES_DM_CIPHER "aes-cbc-plain64"

/* Returns 0 or -ENOMEM. An empty passphrase gives the all-zero key (as
 * QEMU does). */
int legacy_aes_key(const struct passphrase *pp, struct volume_key **vk);

/* In place; len must be a multiple of 512, buf holds guest sectors
 * first_guest_sector, first_guest_sector + 1, ... Returns 0, -EINVAL or
 * -EIO (OpenSSL failure). */
int legacy_aes_decrypt(const struct volume_key *vk, uint64_t first_guest_sector,
		       void *buf, size_t len);
int legacy_aes_encrypt(const struct volume_key *vk, uint64_t first_guest_sector,
		       void *buf, size_t len);

/* ---- Signature probing (probe_blkid.c) ----
 * Probe len bytes of plaintext for a filesystem, partition table, LVM2 PV,
 * swap or LUKS signature. On a find, type gets the blkid TYPE or PTTYPE
 * (or "ambivalent" when several signatures match). Returns 1 found,
 * 0 none, -errno. */
int probe_signature(const void *buf, size_t len, char *type, size_t typelen);

/* ---- Plausibility of decrypted data (legacy_key_check.c) ---- */

#define KEY_CHECK_WINDOW (1U << 20)	/* guest bytes probed with libblkid */
#define KEY_CHECK_MAX_SECTORS 256	/* allocated sectors sampled */
#define KEY_RANDOM_ENTROPY_BITS 7.0
#define KEY_RANDOM_MAX_RUN 8		/* a run this long means "not random" */

/* Shannon entropy estimate of the byte histogram of buf, in bits per byte
 * (0..8). Pure, no libm. */
double key_byte_entropy(const void *buf, size_t len);

/* A 512-byte sector is random-looking when its byte entropy is above
 * KEY_RANDOM_ENTROPY_BITS and it has no run of KEY_RANDOM_MAX_RUN equal
 * bytes: what a wrong key makes of any plaintext. */
bool key_sector_looks_random(const void *sector);

/* Legacy AES has no key check: decrypt the layer's first allocated data
 * with vk (the window [0, 1 MiB) of guest space for libblkid, holes as
 * zeros, and up to 256 allocated sectors spread over the layer) and accept
 * when a signature is found or one sampled sector is not random-looking.
 * A layer without allocated data is accepted (nothing to protect).
 * Returns 0, -EPERM ("decrypted data looks random: wrong passphrase?"),
 * or the error of the walk or the reads. The caller skips this on
 * --skip-key-check. */
int legacy_key_check(struct image *img, const struct volume_key *vk);

/* ---- Writing LUKS1 headers and key slots (crypto_luks.c) ----
 * The header region of an image (crypt_header_offset/length) is edited in
 * memory: the caller reads it, these functions hand it to libcryptsetup
 * through a memfd (as luks_unlock does) and copy the result back into the
 * same buffer; the caller then writes it to the image in a crash-safe order
 * (qcow2_update_crypt_header). The data key never changes. */

/* PBKDF2 cost of new key slots: iterations forces a count (no benchmark),
 * else iter_time_ms (0 = libcryptsetup's default, 2 s) is benchmarked. */
struct luks_pbkdf {
	uint32_t iter_time_ms;
	uint32_t iterations;
};

struct luks_format_params {
	const char *cipher;		/* "aes" */
	const char *cipher_mode;	/* "xts-plain64" */
	const char *hash;		/* PBKDF2 and digest hash, "sha256" */
	struct luks_pbkdf pbkdf;
};

/* A LUKS1 header for vk (vk->size bytes of key) with pp in key slot 0,
 * laid out as QEMU lays it out in qcow2 images: key slots from 4 KiB, each
 * 4000 stripes rounded to 4 KiB, payload offset at the end of the last key
 * slot area. *region (malloc'ed, free with free()) gets *len bytes, the
 * payload offset: what the 0x0537be77 extension records. Returns 0,
 * -EINVAL (a parameter libcryptsetup rejects, logged), -ENOTSUP (the host
 * cannot run the key slot cipher) or another -errno. */
int luks_format_region(const struct luks_format_params *p, const struct volume_key *vk,
		       const struct passphrase *pp, uint8_t **region, uint64_t *len);

/* Add newpp in key slot slot (-1: the first free one) for the volume key
 * vk (from luks_unlock; libcryptsetup checks it against the header's
 * digest). *new_slot gets the slot used. Returns 0, -EPERM (vk is not this
 * header's key), -ENOSPC (no free slot), -EEXIST (slot is in use),
 * -EINVAL, -ENOTSUP (the host cannot run the key slot cipher) or -errno.
 * region is modified only on success. */
int luks_keyslot_add(uint8_t *region, uint64_t len, const struct volume_key *vk,
		     const struct passphrase *newpp, int slot, const struct luks_pbkdf *pbkdf,
		     int *new_slot);

/* Disable key slot slot and wipe its key material. The caller checks that it
 * is not the last one. Returns 0, -EINVAL (not an active slot) or -errno. */
int luks_keyslot_remove(uint8_t *region, uint64_t len, int slot);

/* Replace key slot old_slot by one holding newpp for vk, as cryptsetup
 * luksChangeKey: the new key goes to a free slot when there is one, then
 * old_slot is removed; else it overwrites old_slot in place (*in_place).
 * *new_slot gets the slot. Returns as luks_keyslot_add. */
int luks_keyslot_change(uint8_t *region, uint64_t len, const struct volume_key *vk, int old_slot,
			const struct passphrase *newpp, const struct luks_pbkdf *pbkdf,
			int *new_slot, bool *in_place);

/* ---- LUKS data encryption in userspace (crypto_openssl.c) ----
 * What dm-crypt and QEMU do to the data clusters of a LUKS qcow2: each
 * 512-byte sector encrypted with IV = the HOST (file) sector number. aes
 * only (OpenSSL has no serpent or twofish), modes xts and cbc, IV
 * generators plain, plain64 and essiv:HASH. */

struct luks_data_cipher;

/* Returns 0, -ENOTSUP (a cipher, mode, IV generator or key size OpenSSL
 * cannot run here; logged with the name), -EINVAL or -ENOMEM. */
int luks_data_cipher_new(const char *cipher_name, const char *cipher_mode,
			 const struct volume_key *vk, struct luks_data_cipher **out);
void luks_data_cipher_free(struct luks_data_cipher *c);
/* In place; len a multiple of 512; buf holds host sectors first_host_sector,
 * first_host_sector + 1, ... Returns 0, -EINVAL or -EIO. */
int luks_data_encrypt(struct luks_data_cipher *c, uint64_t first_host_sector, void *buf, size_t len);
int luks_data_decrypt(struct luks_data_cipher *c, uint64_t first_host_sector, void *buf, size_t len);

/* A new random volume key of size bytes (OpenSSL's private DRBG). Returns
 * 0, -ENOMEM or -EIO. */
int volume_key_generate(size_t size, struct volume_key **vk);

#endif
