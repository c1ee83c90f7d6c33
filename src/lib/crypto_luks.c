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
#include "sysutil.h"
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

/* Whether the kernel crypto API socket family exists on this host. */
static bool have_af_alg(void)
{
	int fd = socket(AF_ALG, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return false;
	close(fd);
	return true;
}

/* ---- The region in a memfd ----
 * libcryptsetup sees the region as "/proc/self/fd/N" of an anonymous memfd,
 * never as a file of a filesystem: luks_unlock reads the volume key there;
 * the writers below let libcryptsetup edit it and copy the result back into
 * the caller's buffer, never to the image from here. */

static void setup_log(struct crypt_device *cd)
{
	crypt_set_log_callback(cd, cryptsetup_log, NULL);
	crypt_set_debug_level(qs_log_get_level() >= QS_LOG_DEBUG ? CRYPT_DEBUG_ALL : CRYPT_DEBUG_NONE);
}

/* A memfd of size bytes holding region (len bytes, may be less than size)
 * and a crypt_device on it; load: crypt_load it as LUKS1. */
static int region_open(const uint8_t *region, uint64_t len, uint64_t size, bool load,
		       int *fdp, struct crypt_device **cdp)
{
	struct crypt_device *cd = NULL;
	char path[64];
	int fd, r;

	*fdp = -1;
	*cdp = NULL;
	fd = memfd_create("qcowsetup-luks", MFD_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		log_err("Cannot create a memory file for the LUKS header: %s", strerror(-r));
		return r;
	}
	if (ftruncate(fd, (off_t)size) < 0) {
		r = -errno;
		log_err("Cannot size the LUKS header memory file: %s", strerror(-r));
		goto fail;
	}
	if (region && len) {
		r = fd_write_all(fd, region, (size_t)len);
		if (r < 0) {
			log_err("Cannot copy the LUKS header to memory: %s", strerror(-r));
			goto fail;
		}
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	crypt_set_log_callback(NULL, cryptsetup_log, NULL);
	r = crypt_init(&cd, path);
	if (r < 0) {
		log_err("Cannot access the LUKS header through %s: %s", path, strerror(-r));
		goto fail;
	}
	setup_log(cd);
	if (load) {
		r = crypt_load(cd, CRYPT_LUKS1, NULL);
		if (r < 0) {
			log_err("libcryptsetup rejects the embedded LUKS header: %s", strerror(-r));
			if (r != -ENOMEM)
				r = -EUCLEAN;
			goto fail;
		}
	}
	*fdp = fd;
	*cdp = cd;
	return 0;
fail:
	if (cd)
		crypt_free(cd);
	close(fd);
	return r;
}

static void region_close(int fd, struct crypt_device *cd)
{
	if (cd)
		crypt_free(cd);
	if (fd >= 0) {
		if (ftruncate(fd, 0) < 0)
			log_dbg("Cannot truncate the LUKS header memory file.");
		close(fd);
	}
}

/* The LUKS region [off, off+len) of io (free with explicit_bzero and
 * free), once its header says a key slot is active. */
static int read_region(const struct img_io *io, uint64_t off, uint64_t len, struct luks_info *info,
		       uint8_t **out)
{
	uint8_t *region;
	int r;

	r = luks_read_info(io, off, len, info);
	if (r < 0)
		return r;
	if (!info->active_slots) {
		log_err("%s: the LUKS header has no active key slot.", io->name ? io->name : "image");
		return -ENOENT;
	}
	region = malloc(len);
	if (!region)
		return -ENOMEM;
	r = img_pread(io, region, len, off);
	if (r < 0) {
		log_err("%s: cannot read the LUKS header: %s", io->name ? io->name : "image", strerror(-r));
		free(region);
		return r;
	}
	*out = region;
	return 0;
}

/* The volume key of the header loaded in cd, from the first key slot that
 * pp opens. */
static int get_volume_key(struct crypt_device *cd, const struct luks_info *info, const char *name,
			  const struct passphrase *pp, struct volume_key **vk, int *slot)
{
	struct volume_key *k;
	size_t key_size;
	int r;

	r = crypt_get_volume_key_size(cd);
	if (r <= 0 || (uint32_t)r != info->key_bytes) {
		log_err("%s: LUKS volume key size mismatch.", name);
		return -EUCLEAN;
	}
	key_size = (size_t)r;
	k = volume_key_alloc(key_size);
	if (!k)
		return -ENOMEM;
	r = crypt_volume_key_get(cd, CRYPT_ANY_SLOT, (char *)k->key, &key_size, pp->data, pp->len);
	if (r >= 0) {
		if (key_size != k->size) {
			volume_key_free(k);
			return -EUCLEAN;
		}
		log_dbg("LUKS key slot %d unlocked.", r);
		if (slot)
			*slot = r;
		*vk = k;
		return 0;
	}
	volume_key_free(k);

	/* -EPERM: a slot was decrypted but no digest matched. Anything else
	 * on a host without AF_ALG is, in practice, a key slot cipher that
	 * libcryptsetup's userspace backend lacks (serpent, twofish, cast5 with
	 * OpenSSL): it then falls back to a temporary dm-crypt device, which
	 * fails without device-mapper. Say what really happened. */
	log_dbg("crypt_volume_key_get: %d", r);
	if (r == -EPERM) {
		log_dbg("No LUKS key slot accepts this passphrase.");
	} else if (r != -ENOMEM && !have_af_alg()) {
		log_err("%s: cannot decrypt the %s key slot without kernel crypto API (AF_ALG).", name,
			info->cipher_name);
		r = -ENOTSUP;
	} else {
		log_err("%s: cannot unlock the LUKS header: %s", name, strerror(-r));
	}
	return r;
}

int luks_unlock(const struct img_io *io, uint64_t off, uint64_t len,
		const struct passphrase *pp, struct volume_key **vk, int *slot)
{
	const char *name = io->name ? io->name : "image";
	struct crypt_device *cd = NULL;
	struct luks_info info;
	uint8_t *region = NULL;
	int fd = -1, r;

	*vk = NULL;
	if (slot)
		*slot = -1;
	if (!pp || !pp->data)
		return -EINVAL;
	r = read_region(io, off, len, &info, &region);
	if (r < 0)
		return r;
	r = region_open(region, len, len, false, &fd, &cd);
	if (r < 0)
		goto out;
	r = crypt_load(cd, CRYPT_LUKS1, NULL);
	if (r < 0) {
		log_err("%s: libcryptsetup rejects the embedded LUKS header: %s", name, strerror(-r));
		if (r != -ENOMEM)
			r = -EUCLEAN;
		goto out;
	}
	r = get_volume_key(cd, &info, name, pp, vk, slot);
out:
	/* the header is not secret, but leave nothing behind */
	region_close(fd, cd);
	explicit_bzero(region, len);
	free(region);
	return r;
}

/* ---- Writing headers and key slots ---- */

#define LUKS_STRIPES 4000U		/* what QEMU requires of every key slot */
#define LUKS_ALIGN_KEYSLOTS 4096U

/* Copy len bytes of the memfd back into region. The header must not have
 * grown: the image has exactly len bytes for it. */
static int region_read_back(int fd, uint8_t *region, uint64_t len)
{
	off_t size = lseek(fd, 0, SEEK_END);
	uint64_t done = 0;
	ssize_t n;

	if (size < 0)
		return -errno;
	if ((uint64_t)size > len) {
		log_err("libcryptsetup grew the LUKS header beyond its region (%llu > %llu bytes).",
			(unsigned long long)size, (unsigned long long)len);
		return -ENOSPC;
	}
	while (done < len) {
		n = pread(fd, region + done, (size_t)(len - done), (off_t)done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {	/* the rest of a shorter file reads as zeros */
			memset(region + done, 0, (size_t)(len - done));
			break;
		}
		done += (uint64_t)n;
	}
	return 0;
}

static int set_pbkdf(struct crypt_device *cd, const char *hash, const struct luks_pbkdf *p)
{
	struct crypt_pbkdf_type pbkdf = {
		.type = CRYPT_KDF_PBKDF2,
		.hash = hash,
	};
	int r;

	if (!p || (!p->iterations && !p->iter_time_ms))
		pbkdf.time_ms = 2000;	/* cryptsetup's LUKS1 default */
	else if (p->iterations) {
		pbkdf.iterations = p->iterations;
		pbkdf.flags = CRYPT_PBKDF_NO_BENCHMARK;
	} else {
		pbkdf.time_ms = p->iter_time_ms;
	}
	r = crypt_set_pbkdf_type(cd, &pbkdf);
	if (r < 0)
		log_err("libcryptsetup rejects the PBKDF2 parameters (hash %s, %u iterations, %u ms): %s",
			hash, pbkdf.iterations, pbkdf.time_ms, strerror(-r));
	return r;
}

/* What a failed key slot decryption means (as in luks_unlock). */
static int keyslot_error(int r, const char *cipher_name, const char *what)
{
	if (r == -EPERM) {
		log_dbg("No LUKS key slot accepts this passphrase.");
		return r;
	}
	if (r != -ENOMEM && r != -EINVAL && !have_af_alg()) {
		log_err("Cannot %s: the %s key slot cipher needs the kernel crypto API (AF_ALG).",
			what, cipher_name);
		return -ENOTSUP;
	}
	log_err("Cannot %s: %s", what, strerror(-r));
	return r;
}

int luks_format_region(const struct luks_format_params *p, const struct volume_key *vk,
		       const struct passphrase *pp, uint8_t **region, uint64_t *len)
{
	struct crypt_params_luks1 params = { .hash = p->hash, .data_alignment = LUKS_ALIGN_KEYSLOTS / LUKS_SECTOR };
	struct crypt_device *cd = NULL;
	struct luks_info info;
	uint64_t size, area, payload;
	uint8_t *buf = NULL;
	int fd = -1, r;

	*region = NULL;
	*len = 0;
	if (!p->cipher || !p->cipher_mode || !p->hash || !vk || !vk->size ||
	    vk->size > LUKS_MAX_KEY_BYTES || !pp || !pp->data)
		return -EINVAL;

	/* binary header in the first 4 KiB, then 8 slots of 4000 stripes */
	area = round_up_pow2((uint64_t)vk->size * LUKS_STRIPES, LUKS_ALIGN_KEYSLOTS);
	size = LUKS_ALIGN_KEYSLOTS + LUKS_NUM_SLOTS * area;

	r = region_open(NULL, 0, size, false, &fd, &cd);
	if (r < 0)
		return r;
	r = set_pbkdf(cd, p->hash, &p->pbkdf);
	if (r < 0)
		goto out;
	r = crypt_format(cd, CRYPT_LUKS1, p->cipher, p->cipher_mode, NULL,
			 (const char *)vk->key, vk->size, &params);
	if (r < 0) {
		if (r != -ENOMEM && r != -EINVAL && !have_af_alg()) {
			/* libcryptsetup tests the cipher on a key slot sized buffer:
			 * without AF_ALG only what its userspace backend has works */
			log_err("Cannot create a LUKS1 header for %s-%s: its key slots need the kernel crypto "
				"API (AF_ALG), which this host does not offer.", p->cipher, p->cipher_mode);
			r = -ENOTSUP;
			goto out;
		}
		log_err("libcryptsetup cannot create a LUKS1 header for %s-%s, %zu-bit key, hash %s: %s",
			p->cipher, p->cipher_mode, vk->size * 8, p->hash, strerror(-r));
		if (r != -ENOMEM)
			r = -EINVAL;
		goto out;
	}
	r = crypt_keyslot_add_by_volume_key(cd, 0, (const char *)vk->key, vk->size, pp->data, pp->len);
	if (r < 0) {
		r = keyslot_error(r, p->cipher, "create the first key slot");
		goto out;
	}

	payload = crypt_get_data_offset(cd) * LUKS_SECTOR;
	if (payload != size) {
		/* QEMU's layout: the payload starts where the slots end */
		log_err("Unexpected LUKS payload offset %llu (expected %llu).",
			(unsigned long long)payload, (unsigned long long)size);
		r = -EIO;
		goto out;
	}
	buf = malloc(size);
	if (!buf) {
		r = -ENOMEM;
		goto out;
	}
	r = region_read_back(fd, buf, size);
	if (r < 0)
		goto out;
	/* what QEMU will check: stripes, slot areas inside the payload offset */
	r = luks_parse_header(buf, size, &info);
	if (r < 0)
		goto out;
	if (info.payload_offset != size || info.slots[0].stripes != LUKS_STRIPES || !info.slots[0].active) {
		log_err("libcryptsetup wrote a LUKS header QEMU would not accept.");
		r = -EIO;
		goto out;
	}
	*region = buf;
	*len = size;
	buf = NULL;
	r = 0;
out:
	region_close(fd, cd);
	free(buf);
	return r;
}

static int first_free_slot(const struct luks_info *info)
{
	for (int i = 0; i < LUKS_NUM_SLOTS; i++)
		if (!info->slots[i].active)
			return i;
	return -1;
}

/* Add vk under newpp in slot of the header loaded in cd. */
static int add_by_volume_key(struct crypt_device *cd, const struct luks_info *info, int slot,
			     const struct volume_key *vk, const struct passphrase *newpp,
			     const struct luks_pbkdf *pbkdf)
{
	int r;

	if (vk->size != info->key_bytes) {
		log_err("LUKS volume key size mismatch.");
		return -EINVAL;
	}
	r = set_pbkdf(cd, info->hash, pbkdf);
	if (r < 0)
		return r;
	r = crypt_keyslot_add_by_volume_key(cd, slot, (const char *)vk->key, vk->size,
					    newpp->data, newpp->len);
	if (r < 0)
		return keyslot_error(r, info->cipher_name, "add the key slot");
	return 0;
}

int luks_keyslot_add(uint8_t *region, uint64_t len, const struct volume_key *vk,
		     const struct passphrase *newpp, int slot, const struct luks_pbkdf *pbkdf,
		     int *new_slot)
{
	struct crypt_device *cd = NULL;
	struct luks_info info;
	int fd = -1, r;

	*new_slot = -1;
	if (!vk || !newpp || !newpp->data || slot >= LUKS_NUM_SLOTS || slot < -1)
		return -EINVAL;
	r = luks_parse_header(region, len, &info);
	if (r < 0)
		return r;
	if (slot < 0)
		slot = first_free_slot(&info);
	if (slot < 0) {
		log_err("All %d LUKS key slots are in use.", LUKS_NUM_SLOTS);
		return -ENOSPC;
	}
	if (info.slots[slot].active) {
		log_err("LUKS key slot %d is in use.", slot);
		return -EEXIST;
	}
	r = region_open(region, len, len, true, &fd, &cd);
	if (r < 0)
		return r;
	r = add_by_volume_key(cd, &info, slot, vk, newpp, pbkdf);
	if (r == 0)
		r = region_read_back(fd, region, len);
	if (r == 0)
		*new_slot = slot;
	region_close(fd, cd);
	return r;
}

/* The header in region with an active key slot slot, loaded by
 * libcryptsetup from a memfd (region_close). */
static int region_open_active_slot(uint8_t *region, uint64_t len, int slot, struct luks_info *info,
				   int *fd, struct crypt_device **cd)
{
	int r;

	r = luks_parse_header(region, len, info);
	if (r < 0)
		return r;
	if (!info->slots[slot].active) {
		log_err("LUKS key slot %d is not active.", slot);
		return -EINVAL;
	}
	return region_open(region, len, len, true, fd, cd);
}

static int destroy_slot(struct crypt_device *cd, int slot)
{
	int r = crypt_keyslot_destroy(cd, slot);

	if (r < 0)
		log_err("Cannot remove LUKS key slot %d: %s", slot, strerror(-r));
	return r;
}

int luks_keyslot_remove(uint8_t *region, uint64_t len, int slot)
{
	struct crypt_device *cd = NULL;
	struct luks_info info;
	int fd = -1, r;

	if (slot < 0 || slot >= LUKS_NUM_SLOTS)
		return -EINVAL;
	r = region_open_active_slot(region, len, slot, &info, &fd, &cd);
	if (r < 0)
		return r;
	r = destroy_slot(cd, slot);
	if (r == 0)
		r = region_read_back(fd, region, len);
	region_close(fd, cd);
	return r;
}

int luks_keyslot_change(uint8_t *region, uint64_t len, const struct volume_key *vk, int old_slot,
			const struct passphrase *newpp, const struct luks_pbkdf *pbkdf,
			int *new_slot, bool *in_place)
{
	struct crypt_device *cd = NULL;
	struct luks_info info;
	int fd = -1, slot, r;

	*new_slot = -1;
	*in_place = false;
	if (!vk || !newpp || !newpp->data || old_slot < 0 || old_slot >= LUKS_NUM_SLOTS)
		return -EINVAL;
	r = region_open_active_slot(region, len, old_slot, &info, &fd, &cd);
	if (r < 0)
		return r;
	slot = first_free_slot(&info);
	if (slot < 0) {
		/* as libcryptsetup: no free slot, overwrite the old one */
		slot = old_slot;
		*in_place = true;
		r = destroy_slot(cd, old_slot);
		if (r < 0)
			goto out;
	}
	/* the key material of the new slot is written before the old slot goes
	 * (the caller writes the result in that order too) */
	r = add_by_volume_key(cd, &info, slot, vk, newpp, pbkdf);
	if (r < 0)
		goto out;
	if (!*in_place) {
		r = destroy_slot(cd, old_slot);
		if (r < 0)
			goto out;
	}
	r = region_read_back(fd, region, len);
	if (r == 0)
		*new_slot = slot;
out:
	region_close(fd, cd);
	return r;
}
