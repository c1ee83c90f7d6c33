/* The LUKS1 header embedded in a qcow2 image (crypt_method 2, header
 * extension 0x0537be77). The only file of the engine that includes
 * libcryptsetup.h.
 *
 * The header is parsed here (it is small and fixed: LUKS1 on-disk format
 * 1.2.1, which QEMU's crypto/block-luks.c writes) for `info`, and handed to
 * libcryptsetup for unlocking: the region is copied into an anonymous memfd
 * opened as "/proc/self/fd/N", so it never touches a filesystem, and the
 * memfd is wiped and closed afterwards. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libcryptsetup.h>

#include "keys.h"
#include "log.h"
#include "util.h"

#ifndef AF_ALG
#define AF_ALG 38
#endif

#define LUKS_MAGIC "LUKS\xba\xbe"
#define LUKS_MAGIC_LEN 6
#define LUKS_KEY_ENABLED 0x00AC71F3U
#define LUKS_KEY_DISABLED 0x0000DEADU
#define LUKS_SECTOR 512U

/* LUKS1 phdr field offsets */
#define PH_VERSION	6
#define PH_CIPHER_NAME	8
#define PH_CIPHER_MODE	40
#define PH_HASH		72
#define PH_PAYLOAD	104
#define PH_KEY_BYTES	108
#define PH_MK_ITERS	164
#define PH_UUID		168
#define PH_SLOTS	208
#define PH_SLOT_SIZE	48
/* within a slot */
#define KS_ACTIVE	0
#define KS_ITERS	4
#define KS_OFFSET	40
#define KS_STRIPES	44

#define LUKS_MAX_KEY_BYTES 256U
#define LUKS_MAX_STRIPES 65536U	/* QEMU and cryptsetup write 4000 */

/* Copy a fixed-size header string, requiring a terminator and printable ASCII. */
static int copy_header_string(char *dst, size_t dstlen, const uint8_t *src, size_t srclen,
			      const char *what)
{
	size_t i, n = strnlen((const char *)src, srclen);

	if (n == srclen || n >= dstlen) {
		log_err("LUKS header: %s is not terminated.", what);
		return -EUCLEAN;
	}
	for (i = 0; i < n; i++) {
		if (src[i] < 0x20 || src[i] > 0x7e) {
			log_err("LUKS header: %s contains non-printable characters.", what);
			return -EUCLEAN;
		}
	}
	memcpy(dst, src, n);
	dst[n] = '\0';
	return 0;
}

int luks_parse_header(const void *phdr, uint64_t region_len, struct luks_info *info)
{
	const uint8_t *h = phdr;
	uint64_t end, area;
	unsigned int i;
	int r;

	memset(info, 0, sizeof(*info));
	if (region_len < LUKS_PHDR_SIZE) {
		log_err("LUKS header: region of %llu bytes is too small.",
			(unsigned long long)region_len);
		return -EUCLEAN;
	}
	if (memcmp(h, LUKS_MAGIC, LUKS_MAGIC_LEN)) {
		log_err("LUKS header: bad magic.");
		return -EUCLEAN;
	}
	if (get_be16(h + PH_VERSION) != 1) {
		log_err("LUKS header: version %u is not supported (only LUKS1 is embedded in qcow2).",
			get_be16(h + PH_VERSION));
		return -ENOTSUP;
	}
	r = copy_header_string(info->cipher_name, sizeof(info->cipher_name), h + PH_CIPHER_NAME, 32, "cipher name");
	if (!r)
		r = copy_header_string(info->cipher_mode, sizeof(info->cipher_mode), h + PH_CIPHER_MODE, 32, "cipher mode");
	if (!r)
		r = copy_header_string(info->hash, sizeof(info->hash), h + PH_HASH, 32, "hash spec");
	if (!r)
		r = copy_header_string(info->uuid, sizeof(info->uuid), h + PH_UUID, 40, "UUID");
	if (r < 0)
		return r;
	if (!info->cipher_name[0] || !info->cipher_mode[0] || !info->hash[0]) {
		log_err("LUKS header: empty cipher or hash specification.");
		return -EUCLEAN;
	}

	info->key_bytes = get_be32(h + PH_KEY_BYTES);
	if (info->key_bytes == 0 || info->key_bytes > LUKS_MAX_KEY_BYTES) {
		log_err("LUKS header: invalid key size %u.", info->key_bytes);
		return -EUCLEAN;
	}
	info->payload_offset = (uint64_t)get_be32(h + PH_PAYLOAD) * LUKS_SECTOR;
	info->mk_iterations = get_be32(h + PH_MK_ITERS);
	if (info->mk_iterations == 0) {
		log_err("LUKS header: zero master key digest iterations.");
		return -EUCLEAN;
	}

	for (i = 0; i < LUKS_NUM_SLOTS; i++) {
		const uint8_t *ks = h + PH_SLOTS + i * PH_SLOT_SIZE;
		struct luks_slot *s = &info->slots[i];
		uint32_t state = get_be32(ks + KS_ACTIVE);

		if (state != LUKS_KEY_ENABLED && state != LUKS_KEY_DISABLED) {
			log_err("LUKS header: key slot %u has an invalid state 0x%08x.", i, state);
			return -EUCLEAN;
		}
		s->active = state == LUKS_KEY_ENABLED;
		s->iterations = get_be32(ks + KS_ITERS);
		s->key_offset = (uint64_t)get_be32(ks + KS_OFFSET) * LUKS_SECTOR;
		s->stripes = get_be32(ks + KS_STRIPES);
		if (!s->active)
			continue;
		info->active_slots++;
		if (!s->iterations || !s->stripes || s->stripes > LUKS_MAX_STRIPES) {
			log_err("LUKS header: key slot %u has invalid iterations or stripes.", i);
			return -EUCLEAN;
		}
		/* key material: key_bytes * stripes, in whole sectors, inside the
		 * region and after the binary header */
		area = round_up_pow2((uint64_t)info->key_bytes * s->stripes, LUKS_SECTOR);
		if (s->key_offset < LUKS_PHDR_SIZE || uadd64_overflow(s->key_offset, area, &end) ||
		    end > region_len) {
			log_err("LUKS header: key slot %u material lies outside the header region.", i);
			return -EUCLEAN;
		}
	}
	return 0;
}

int luks_read_info(const struct img_io *io, uint64_t off, uint64_t len, struct luks_info *info)
{
	uint8_t phdr[LUKS_PHDR_SIZE];
	uint64_t end;
	int r;

	memset(info, 0, sizeof(*info));
	if (len < LUKS_PHDR_SIZE || len > LUKS_MAX_HEADER_LENGTH ||
	    uadd64_overflow(off, len, &end) || end > io->size) {
		log_err("%s: LUKS header region [%llu, +%llu) is invalid.", io->name ? io->name : "image",
			(unsigned long long)off, (unsigned long long)len);
		return -EUCLEAN;
	}
	r = img_pread(io, phdr, sizeof(phdr), off);
	if (r < 0) {
		log_err("%s: cannot read the LUKS header: %s", io->name ? io->name : "image", strerror(-r));
		return r;
	}
	return luks_parse_header(phdr, len, info);
}

static bool safe_dm_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '-' || c == '_' || c == ':' || c == '.' || c == '(' || c == ')';
}

int luks_dm_cipher_spec(const struct luks_info *info, char *buf, size_t buflen)
{
	const char *p;
	int n;

	for (p = info->cipher_name; *p; p++)
		if (!safe_dm_char(*p) || *p == '-')
			return -EUCLEAN;
	for (p = info->cipher_mode; *p; p++)
		if (!safe_dm_char(*p))
			return -EUCLEAN;
	if (!info->cipher_name[0] || !info->cipher_mode[0])
		return -EUCLEAN;
	n = snprintf(buf, buflen, "%s-%s", info->cipher_name, info->cipher_mode);
	if (n < 0 || (size_t)n >= buflen)
		return -ENOSPC;
	return 0;
}

/* libcryptsetup's messages go to our log at debug level: the command reports
 * the outcome itself. Messages never carry key material. */
static void cryptsetup_log(int level, const char *msg, void *usrptr)
{
	size_t n = strlen(msg);

	(void)usrptr;
	while (n && msg[n - 1] == '\n')
		n--;
	log_dbg("libcryptsetup%s: %.*s", level == CRYPT_LOG_ERROR ? " error" : "", (int)n, msg);
}

static int write_all(int fd, const uint8_t *p, size_t len)
{
	ssize_t n;

	while (len) {
		n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Whether the kernel crypto API socket family exists on this host. */
static bool have_af_alg(void)
{
	int fd = socket(AF_ALG, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return false;
	close(fd);
	return true;
}

int luks_unlock(const struct img_io *io, uint64_t off, uint64_t len,
		const struct passphrase *pp, struct volume_key **vk, int *slot)
{
	struct crypt_device *cd = NULL;
	struct volume_key *k = NULL;
	struct luks_info info;
	uint8_t *region = NULL;
	char path[64];
	size_t key_size;
	int fd = -1, r;

	*vk = NULL;
	if (slot)
		*slot = -1;
	if (!pp || !pp->data)
		return -EINVAL;

	r = luks_read_info(io, off, len, &info);
	if (r < 0)
		return r;
	if (!info.active_slots) {
		log_err("%s: the LUKS header has no active key slot.", io->name ? io->name : "image");
		return -ENOENT;
	}

	region = malloc(len);
	if (!region) {
		r = -ENOMEM;
		goto out;
	}
	r = img_pread(io, region, len, off);
	if (r < 0) {
		log_err("%s: cannot read the LUKS header: %s", io->name ? io->name : "image", strerror(-r));
		goto out;
	}

	fd = memfd_create("qcowsetup-luks", MFD_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		log_err("Cannot create a memory file for the LUKS header: %s", strerror(-r));
		goto out;
	}
	r = write_all(fd, region, len);
	if (r < 0) {
		log_err("Cannot copy the LUKS header to memory: %s", strerror(-r));
		goto out;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);

	crypt_set_log_callback(NULL, cryptsetup_log, NULL);
	crypt_set_debug_level(qs_log_get_level() >= QS_LOG_DEBUG ? CRYPT_DEBUG_ALL : CRYPT_DEBUG_NONE);
	r = crypt_init(&cd, path);
	if (r < 0) {
		log_err("Cannot access the LUKS header through %s: %s", path, strerror(-r));
		goto out;
	}
	crypt_set_log_callback(cd, cryptsetup_log, NULL);
	r = crypt_load(cd, CRYPT_LUKS1, NULL);
	if (r < 0) {
		log_err("%s: libcryptsetup rejects the embedded LUKS header: %s",
			io->name ? io->name : "image", strerror(-r));
		if (r != -ENOMEM)
			r = -EUCLEAN;
		goto out;
	}

	r = crypt_get_volume_key_size(cd);
	if (r <= 0 || (uint32_t)r != info.key_bytes) {
		log_err("%s: LUKS volume key size mismatch.", io->name ? io->name : "image");
		r = -EUCLEAN;
		goto out;
	}
	key_size = (size_t)r;
	k = volume_key_alloc(key_size);
	if (!k) {
		r = -ENOMEM;
		goto out;
	}

	r = crypt_volume_key_get(cd, CRYPT_ANY_SLOT, (char *)k->key, &key_size, pp->data, pp->len);
	if (r >= 0) {
		if (key_size != k->size) {
			r = -EUCLEAN;
			goto out;
		}
		log_dbg("LUKS key slot %d unlocked.", r);
		if (slot)
			*slot = r;
		*vk = k;
		k = NULL;
		r = 0;
		goto out;
	}

	/* -EPERM: a slot was decrypted but no digest matched. Anything else
	 * on a host without AF_ALG is, in practice, a key slot cipher that
	 * libcryptsetup's userspace backend lacks (serpent, twofish, cast5 with
	 * OpenSSL): it then falls back to a temporary dm-crypt device, which
	 * fails without device-mapper. Say what really happened. */
	log_dbg("crypt_volume_key_get: %d", r);
	if (r == -EPERM) {
		log_dbg("No LUKS key slot accepts this passphrase.");
	} else if (r != -ENOMEM && !have_af_alg()) {
		log_err("%s: cannot decrypt the %s key slot without kernel crypto API (AF_ALG).",
			io->name ? io->name : "image", info.cipher_name);
		r = -ENOTSUP;
	} else {
		log_err("%s: cannot unlock the LUKS header: %s", io->name ? io->name : "image", strerror(-r));
	}
out:
	if (cd)
		crypt_free(cd);
	if (fd >= 0) {
		/* the header is not secret, but leave nothing behind */
		if (ftruncate(fd, 0) < 0)
			log_dbg("Cannot truncate the LUKS header memory file.");
		close(fd);
	}
	if (region) {
		explicit_bzero(region, len);
		free(region);
	}
	volume_key_free(k);
	return r;
}
