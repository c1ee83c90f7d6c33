/* QEMU's legacy qcow/qcow2 AES encryption (crypt_method 1) with OpenSSL.
 * The only file of the engine that includes OpenSSL headers.
 *
 * As QEMU's crypto/block-qcow.c: key = passphrase bytes up to the first NUL
 * (QEMU takes strlen of the secret), at most 16, zero padded; AES-128-CBC
 * on each 512-byte sector with IV = little-endian 64-bit guest sector number,
 * zero padded to 16 bytes (plain64). */
#include <errno.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>

#include "keys.h"
#include "log.h"
#include "util.h"

int legacy_aes_key(const struct passphrase *pp, struct volume_key **vk)
{
	struct volume_key *k;
	size_t n = 0;

	*vk = NULL;
	k = volume_key_alloc(LEGACY_AES_KEY_SIZE);
	if (!k)
		return -ENOMEM;
	if (pp && pp->data) {
		n = strnlen(pp->data, pp->len);
		if (n < pp->len)
			log_dbg("Legacy AES key: passphrase truncated at its first NUL byte, as QEMU does.");
		if (n > LEGACY_AES_KEY_SIZE) {
			log_dbg("Legacy AES key: only the first %d bytes of the passphrase are used.",
				LEGACY_AES_KEY_SIZE);
			n = LEGACY_AES_KEY_SIZE;
		}
		memcpy(k->key, pp->data, n);
	}
	*vk = k;
	return 0;
}

static void plain64_iv(uint8_t iv[16], uint64_t sector)
{
	int i;

	memset(iv, 0, 16);
	for (i = 0; i < 8; i++)
		iv[i] = (uint8_t)(sector >> (8 * i));
}

static int aes_cbc_sectors(const struct volume_key *vk, uint64_t first_sector,
			   void *buf, size_t len, int enc)
{
	EVP_CIPHER_CTX *ctx = NULL;
	uint8_t *p = buf;
	uint8_t iv[16];
	size_t i;
	int outl, r = 0;

	if (!vk || vk->size != LEGACY_AES_KEY_SIZE || (len % KEY_SECTOR_SIZE) || (len && !buf))
		return -EINVAL;
	if (!len)
		return 0;

	ctx = EVP_CIPHER_CTX_new();
	if (!ctx)
		return -ENOMEM;
	if (EVP_CipherInit_ex(ctx, EVP_aes_128_cbc(), NULL, vk->key, NULL, enc) != 1 ||
	    EVP_CIPHER_CTX_set_padding(ctx, 0) != 1) {
		r = -EIO;
		goto out;
	}
	for (i = 0; i < len / KEY_SECTOR_SIZE; i++) {
		/* plain64 wraps modulo 2^64 like the kernel's */
		plain64_iv(iv, first_sector + i);
		if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc) != 1 ||
		    EVP_CipherUpdate(ctx, p, &outl, p, KEY_SECTOR_SIZE) != 1 ||
		    outl != KEY_SECTOR_SIZE) {
			r = -EIO;
			goto out;
		}
		p += KEY_SECTOR_SIZE;
	}
out:
	if (r < 0) {
		const char *why = ERR_reason_error_string(ERR_peek_last_error());

		log_dbg("OpenSSL AES-128-CBC failed: %s", why ? why : "unknown error");
		ERR_clear_error();
	}
	explicit_bzero(iv, sizeof(iv));
	EVP_CIPHER_CTX_free(ctx);	/* cleans the key schedule */
	return r;
}

int legacy_aes_decrypt(const struct volume_key *vk, uint64_t first_guest_sector,
		       void *buf, size_t len)
{
	return aes_cbc_sectors(vk, first_guest_sector, buf, len, 0);
}

int legacy_aes_encrypt(const struct volume_key *vk, uint64_t first_guest_sector,
		       void *buf, size_t len)
{
	return aes_cbc_sectors(vk, first_guest_sector, buf, len, 1);
}
