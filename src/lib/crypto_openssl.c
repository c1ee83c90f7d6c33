/* QEMU's legacy qcow/qcow2 AES encryption (crypt_method 1) with OpenSSL.
 * The only file of the engine that includes OpenSSL headers.
 *
 * As QEMU's crypto/block-qcow.c: key = passphrase bytes up to the first NUL
 * (QEMU takes strlen of the secret), at most 16, zero padded; AES-128-CBC
 * on each 512-byte sector with IV = little-endian 64-bit guest sector number,
 * zero padded to 16 bytes (plain64). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

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

/* ---- LUKS data clusters: IV = host sector ----
 * As dm-crypt's "aes-<mode>-<ivgen>" and QEMU's crypto/block-luks.c for
 * qcow2: every 512-byte sector on its own, IV from the host sector number:
 *   plain    32-bit little-endian sector number, zero padded
 *   plain64  64-bit little-endian sector number, zero padded
 *   essiv:H  plain64 encrypted (AES-ECB) with the key H(volume key); QEMU
 *            and the kernel take the AES size from H's digest length. */

enum luks_ivgen {
	IVGEN_PLAIN,
	IVGEN_PLAIN64,
	IVGEN_ESSIV,
};

struct luks_data_cipher {
	EVP_CIPHER_CTX *enc;
	EVP_CIPHER_CTX *dec;
	EVP_CIPHER_CTX *essiv;	/* IVGEN_ESSIV: AES-ECB keyed with H(key) */
	enum luks_ivgen ivgen;
};

static const EVP_CIPHER *aes_by_key_size(const char *mode, size_t key_bytes)
{
	if (!strcmp(mode, "xts")) {
		if (key_bytes == 32)
			return EVP_aes_128_xts();
		if (key_bytes == 64)
			return EVP_aes_256_xts();
	} else if (!strcmp(mode, "cbc")) {
		if (key_bytes == 16)
			return EVP_aes_128_cbc();
		if (key_bytes == 24)
			return EVP_aes_192_cbc();
		if (key_bytes == 32)
			return EVP_aes_256_cbc();
	} else if (!strcmp(mode, "ecb-essiv")) {
		if (key_bytes == 16)
			return EVP_aes_128_ecb();
		if (key_bytes == 24)
			return EVP_aes_192_ecb();
		if (key_bytes == 32)
			return EVP_aes_256_ecb();
	}
	return NULL;
}

static EVP_CIPHER_CTX *cipher_ctx(const EVP_CIPHER *cipher, const uint8_t *key, int enc)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();

	if (!ctx)
		return NULL;
	if (EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, enc) != 1 ||
	    EVP_CIPHER_CTX_set_padding(ctx, 0) != 1) {
		EVP_CIPHER_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

void luks_data_cipher_free(struct luks_data_cipher *c)
{
	if (!c)
		return;
	/* EVP_CIPHER_CTX_free cleans the key schedules */
	EVP_CIPHER_CTX_free(c->enc);
	EVP_CIPHER_CTX_free(c->dec);
	EVP_CIPHER_CTX_free(c->essiv);
	secure_free(c);
}

int luks_data_cipher_new(const char *cipher_name, const char *cipher_mode,
			 const struct volume_key *vk, struct luks_data_cipher **out)
{
	struct luks_data_cipher *c = NULL;
	const EVP_CIPHER *cipher, *essiv_cipher;
	const EVP_MD *md;
	char mode[33];
	const char *dash, *iv;
	uint8_t salt[EVP_MAX_MD_SIZE];
	unsigned int salt_len = 0;
	size_t n;
	int r;

	*out = NULL;
	if (!cipher_name || !cipher_mode || !vk || !vk->size)
		return -EINVAL;
	if (strcmp(cipher_name, "aes")) {
		log_err("Cannot encrypt or decrypt %s data in userspace: OpenSSL offers aes only "
			"(for new images: --cipher aes-xts-plain64).", cipher_name);
		return -ENOTSUP;
	}
	dash = strchr(cipher_mode, '-');
	n = dash ? (size_t)(dash - cipher_mode) : strlen(cipher_mode);
	if (!dash || n >= sizeof(mode)) {
		log_err("Cipher mode %s has no IV generator: not supported.", cipher_mode);
		return -ENOTSUP;
	}
	memcpy(mode, cipher_mode, n);
	mode[n] = '\0';
	iv = dash + 1;

	/* the contexts hold key schedules in OpenSSL's ordinary heap: their
	 * holder is a secret, so the process stays non-dumpable while they
	 * live (secure.c) */
	c = secure_alloc(sizeof(*c));
	if (!c)
		return -ENOMEM;
	if (!strcmp(iv, "plain")) {
		c->ivgen = IVGEN_PLAIN;
	} else if (!strcmp(iv, "plain64")) {
		c->ivgen = IVGEN_PLAIN64;
	} else if (!strncmp(iv, "essiv:", 6)) {
		c->ivgen = IVGEN_ESSIV;
		md = EVP_get_digestbyname(iv + 6);
		if (!md) {
			log_err("ESSIV hash %s is not available in OpenSSL.", iv + 6);
			r = -ENOTSUP;
			goto fail;
		}
		if (EVP_Digest(vk->key, vk->size, salt, &salt_len, md, NULL) != 1) {
			r = -EIO;
			goto fail;
		}
		essiv_cipher = aes_by_key_size("ecb-essiv", salt_len);
		if (!essiv_cipher) {
			log_err("ESSIV hash %s gives %u bytes: no AES key of that size.", iv + 6, salt_len);
			r = -ENOTSUP;
			goto fail;
		}
		c->essiv = cipher_ctx(essiv_cipher, salt, 1);
		explicit_bzero(salt, sizeof(salt));
		if (!c->essiv) {
			r = -EIO;
			goto fail;
		}
	} else {
		log_err("IV generator %s is not supported (plain, plain64, essiv:HASH).", iv);
		r = -ENOTSUP;
		goto fail;
	}
	cipher = aes_by_key_size(mode, vk->size);
	if (!cipher) {
		log_err("aes-%s with a %zu-bit key is not supported in userspace (xts: 256 or 512 bits, cbc: 128, 192 or 256).",
			mode, vk->size * 8);
		r = -ENOTSUP;
		goto fail;
	}
	c->enc = cipher_ctx(cipher, vk->key, 1);
	c->dec = cipher_ctx(cipher, vk->key, 0);
	if (!c->enc || !c->dec) {
		const char *why = ERR_reason_error_string(ERR_peek_last_error());

		log_err("OpenSSL cannot set up aes-%s: %s", mode, why ? why : "unknown error");
		ERR_clear_error();
		r = -ENOTSUP;
		goto fail;
	}
	*out = c;
	return 0;
fail:
	explicit_bzero(salt, sizeof(salt));
	luks_data_cipher_free(c);
	return r;
}

static int luks_sector_iv(struct luks_data_cipher *c, uint64_t sector, uint8_t iv[16])
{
	int outl;

	plain64_iv(iv, c->ivgen == IVGEN_PLAIN ? (sector & 0xffffffffULL) : sector);
	if (c->ivgen != IVGEN_ESSIV)
		return 0;
	if (EVP_EncryptUpdate(c->essiv, iv, &outl, iv, 16) != 1 || outl != 16)
		return -EIO;
	return 0;
}

static int luks_data_crypt(struct luks_data_cipher *c, uint64_t first_sector, void *buf, size_t len,
			   int enc)
{
	EVP_CIPHER_CTX *ctx = enc ? c->enc : c->dec;
	uint8_t *p = buf, iv[16];
	size_t i;
	int outl, r = 0;

	if (!c || (len % KEY_SECTOR_SIZE) || (len && !buf))
		return -EINVAL;
	for (i = 0; i < len / KEY_SECTOR_SIZE; i++) {
		r = luks_sector_iv(c, first_sector + i, iv);
		if (r < 0)
			break;
		if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc) != 1 ||
		    EVP_CipherUpdate(ctx, p, &outl, p, KEY_SECTOR_SIZE) != 1 ||
		    outl != KEY_SECTOR_SIZE) {
			r = -EIO;
			break;
		}
		p += KEY_SECTOR_SIZE;
	}
	if (r < 0) {
		const char *why = ERR_reason_error_string(ERR_peek_last_error());

		log_dbg("OpenSSL LUKS data cipher failed: %s", why ? why : "unknown error");
		ERR_clear_error();
	}
	explicit_bzero(iv, sizeof(iv));
	return r;
}

int luks_data_encrypt(struct luks_data_cipher *c, uint64_t first_host_sector, void *buf, size_t len)
{
	return luks_data_crypt(c, first_host_sector, buf, len, 1);
}

int luks_data_decrypt(struct luks_data_cipher *c, uint64_t first_host_sector, void *buf, size_t len)
{
	return luks_data_crypt(c, first_host_sector, buf, len, 0);
}

int volume_key_generate(size_t size, struct volume_key **vk)
{
	struct volume_key *k;

	*vk = NULL;
	if (!size || size > INT32_MAX)
		return -EINVAL;
	k = volume_key_alloc(size);
	if (!k)
		return -ENOMEM;
	if (RAND_priv_bytes(k->key, (int)size) != 1) {
		log_err("OpenSSL cannot generate a random volume key.");
		ERR_clear_error();
		volume_key_free(k);
		return -EIO;
	}
	*vk = k;
	return 0;
}
