/* qcowsetup format IMAGE [SIZE]: a new LUKS-encrypted qcow2 image, as
 * `qemu-img create -f qcow2 -o encrypt.format=luks` makes it: a LUKS1
 * header (libcryptsetup, QEMU's layout: payload offset at the end of the
 * key slot area) in clusters after the qcow2 header, registered in header
 * extension 0x0537be77, no data clusters. QEMU opens it with the same
 * passphrase. Options: --cipher, --key-size, --hash, --iter-time or
 * --pbkdf-force-iterations, --cluster-size, --backing-file (SIZE defaults
 * to its size), --backing-format, --key-file (else the prompt, twice).
 * The image is written beside IMAGE and renamed into place; an existing
 * IMAGE is only replaced with --force, and never while QEMU has it open. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmd_keys.h"
#include "keys.h"
#include "lock.h"
#include "log.h"
#include "qcow2_create.h"
#include "qcowsetup.h"
#include "util.h"

/* What QEMU's crypto/block-luks.c can open: cipher aes, serpent, twofish or
 * cast5; mode ecb, cbc, xts or ctr; IV generator plain, plain64 or essiv. */
static int check_qemu_cipher(const char *name, const char *mode)
{
	static const char *const names[] = { "aes", "serpent", "twofish", "cast5" };
	static const char *const modes[] = { "ecb-", "cbc-", "xts-", "ctr-" };
	const char *iv = NULL;
	bool ok = false;

	for (size_t i = 0; i < ARRAY_SIZE(names); i++)
		ok |= !strcmp(name, names[i]);
	for (size_t i = 0; ok && i < ARRAY_SIZE(modes); i++)
		if (!strncmp(mode, modes[i], strlen(modes[i])))
			iv = mode + strlen(modes[i]);
	if (ok && iv && (!strcmp(iv, "plain") || !strcmp(iv, "plain64") || !strncmp(iv, "essiv:", 6)))
		return 0;
	log_err("QEMU cannot open a LUKS header with cipher %s-%s (cipher aes, serpent, twofish, cast5; "
		"mode ecb, cbc, xts, ctr; IV plain, plain64, essiv:HASH).", name, mode);
	return -EINVAL;
}

/* The new image's size (SIZE, or the backing file's) and its backing
 * file's format (--backing-format, or probed). */
static int new_image_size(const char *path, int argc, char **argv, uint64_t *size, const char **backing_format)
{
	struct image *backing = NULL;
	char *backing_path;
	int r;

	*backing_format = opt.backing_format;
	if (argc > 1 && parse_u64(argv[1], PARSE_SIZE, size) < 0) {
		log_err("Invalid size for SIZE: %s (a number of bytes, or with K, M, G, T).", argv[1]);
		return -EINVAL;
	}
	if (opt.backing_format && !opt.backing_file) {
		log_err("--backing-format needs --backing-file.");
		return -EINVAL;
	}
	if (!opt.backing_file && argc < 2) {
		log_err("Usage: qcowsetup format IMAGE SIZE (SIZE may be left out with --backing-file).");
		return -EINVAL;
	}
	if (opt.backing_file) {
		/* as QEMU: the name is stored as given, relative to IMAGE's folder */
		backing_path = image_resolve_path(path, opt.backing_file);
		if (!backing_path)
			return -ENOMEM;
		r = tools_open_image(backing_path, TOOLS_OPEN_NO_BACKING, &backing);
		if (r < 0)
			log_err("Cannot open backing file %s.", backing_path);
		free(backing_path);
		if (r < 0)
			return r;
		if (!*backing_format)
			*backing_format = image_format_name(backing->format);
		if (argc < 2)
			*size = backing->size;
		tools_close_image(backing);
	}
	if (*size % 512) {
		log_err("The image size must be a multiple of 512 bytes (%" PRIu64 ").", *size);
		return -EINVAL;
	}
	return 0;
}

/* Write the image beside path and rename it into place. */
static int write_image(const char *path, const struct qcow2_create_params *wp)
{
	struct out_file o = { .fd = -1 };
	struct qcow2_create *w = NULL;
	uint64_t cs = 1ULL << wp->cluster_bits;
	int r;

	r = out_file_create(path, opt.force, &o);
	if (r < 0)
		return r;
	r = qcow2_create_begin(o.fd, wp, &w);
	if (r == 0)
		r = qcow2_create_add(w, (wp->size + cs - 1) / cs, QCOW2_CREATE_UNALLOC, NULL);
	if (r == 0)
		r = qcow2_create_finish(w);
	if (r < 0 && r != -EINVAL && r != -EFBIG)
		log_err("Cannot write %s: %s", o.tmp, strerror(-r));
	if (r == 0)
		r = out_file_commit(&o, opt.force);
	if (r < 0 && o.fd >= 0)
		out_file_abort(&o);
	qcow2_create_free(w);
	return r;
}

int cmd_format(int argc, char **argv)
{
	const char *path = argv[0];
	struct qcow2_create_params wp = { 0 };
	struct luks_format_params fp;
	struct passphrase *pp = NULL;
	struct volume_key *vk = NULL;
	char name[33], mode[33];
	uint8_t *region = NULL;
	uint64_t region_len = 0;
	size_t key_bytes;
	int r;

	signal(SIGXFSZ, SIG_IGN);	/* a file size limit gives EFBIG, not death */
	r = keys_format_params(&fp, name, mode, &key_bytes);
	if (r == 0)
		r = check_qemu_cipher(name, mode);
	if (r == 0)
		r = new_image_size(path, argc, argv, &wp.size, &wp.backing_format);
	if (r == 0 && opt.force) {
		r = lock_image_replaceable(path);
	} else if (r == 0 && access(path, F_OK) == 0) {
		log_err("%s exists (--force overwrites it).", path);
		r = -EEXIST;
	}
	if (r < 0)
		return r;

	if (opt.key_file)
		r = keys_read_passphrase(path, &pp);
	else
		r = keys_read_new_passphrase(NULL, path, &pp);
	if (r == 0)
		r = volume_key_generate(key_bytes, &vk);
	if (r == 0)
		r = luks_format_region(&fp, vk, pp, &region, &region_len);
	wp.cluster_bits = (uint32_t)__builtin_ctzll(opt.cluster_size ? opt.cluster_size : 65536);
	wp.backing_file = opt.backing_file;
	wp.crypt_header = region;
	wp.crypt_header_len = region_len;
	if (r == 0)
		r = write_image(path, &wp);
	if (r == 0)
		log_verbose("%s: LUKS qcow2 image of %" PRIu64 " bytes, %s-%s, %zu-bit key, key slot 0.",
			    path, wp.size, name, mode, key_bytes * 8);
	free(region);
	volume_key_free(vk);
	passphrase_free(pp);
	return r;
}
