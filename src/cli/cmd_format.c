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

/* Refuse to replace an image QEMU (or a mapping) has open. */
static int check_replaceable(const char *path)
{
	int fd, r;

	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	r = keys_lock_for_write(fd, path, false);
	close(fd);
	return r;
}

int cmd_format(int argc, char **argv)
{
	const char *path = argv[0];
	struct qcow2_create_params wp = { 0 };
	struct luks_format_params fp;
	struct passphrase *pp = NULL;
	struct volume_key *vk = NULL;
	struct qcow2_create *w = NULL;
	struct image *backing = NULL;
	struct out_file o = { .fd = -1 };
	char name[33], mode[33], *backing_path = NULL;
	uint8_t *region = NULL;
	uint64_t size = 0, region_len, cs;
	size_t key_bytes;
	int r;

	signal(SIGXFSZ, SIG_IGN);	/* a file size limit gives EFBIG, not death */
	if (argc > 1) {
		r = keys_parse_size(argv[1], "SIZE", &size);
		if (r < 0)
			return r;
	}
	r = keys_format_params(&fp, name, mode, &key_bytes);
	if (r < 0)
		return r;
	r = check_qemu_cipher(name, mode);
	if (r < 0)
		return r;
	cs = kopt.cluster_size ? kopt.cluster_size : 65536;

	if (kopt.backing_format && !kopt.backing_file) {
		log_err("--backing-format needs --backing-file.");
		return -EINVAL;
	}
	if (kopt.backing_file) {
		/* as QEMU: the name is stored as given, relative to IMAGE's folder */
		backing_path = image_resolve_path(path, kopt.backing_file);
		if (!backing_path)
			return -ENOMEM;
		r = tools_open_image(backing_path, TOOLS_OPEN_NO_BACKING, &backing);
		if (r < 0) {
			log_err("Cannot open backing file %s.", backing_path);
			goto out;
		}
		if (!kopt.backing_format)
			kopt.backing_format = image_format_name(backing->format);
		if (argc < 2)
			size = backing->size;
	} else if (argc < 2) {
		log_err("Usage: qcowsetup format IMAGE SIZE (SIZE may be left out with --backing-file).");
		return -EINVAL;
	}
	if (size % 512) {
		log_err("The image size must be a multiple of 512 bytes (%" PRIu64 ").", size);
		r = -EINVAL;
		goto out;
	}
	if (kopt.force) {
		r = check_replaceable(path);
		if (r < 0)
			goto out;
	} else if (access(path, F_OK) == 0) {
		log_err("%s exists (--force overwrites it).", path);
		r = -EEXIST;
		goto out;
	}

	if (opt.key_file)
		r = keys_read_passphrase(path, &pp);
	else
		r = keys_read_new_passphrase(NULL, path, &pp);
	if (r < 0)
		goto out;
	r = volume_key_generate(key_bytes, &vk);
	if (r < 0)
		goto out;
	r = luks_format_region(&fp, vk, pp, &region, &region_len);
	if (r < 0)
		goto out;

	r = out_file_create(path, kopt.force, &o);
	if (r < 0)
		goto out;
	wp.size = size;
	wp.cluster_bits = (uint32_t)__builtin_ctzll(cs);
	wp.backing_file = kopt.backing_file;
	wp.backing_format = kopt.backing_format;
	wp.crypt_header = region;
	wp.crypt_header_len = region_len;
	r = qcow2_create_begin(o.fd, &wp, &w);
	if (r == 0)
		r = qcow2_create_add(w, (size + cs - 1) / cs, QCOW2_CREATE_UNALLOC, NULL);
	if (r == 0)
		r = qcow2_create_finish(w);
	if (r < 0) {
		if (r != -EINVAL && r != -EFBIG)
			log_err("Cannot write %s: %s", o.tmp, strerror(-r));
		goto out;
	}
	r = out_file_commit(&o, kopt.force);
	if (r == 0)
		log_verbose("%s: LUKS qcow2 image of %" PRIu64 " bytes, %s-%s, %zu-bit key, key slot 0.",
			    path, size, name, mode, key_bytes * 8);
out:
	if (r < 0 && o.fd >= 0)
		out_file_abort(&o);
	qcow2_create_free(w);
	free(region);
	volume_key_free(vk);
	passphrase_free(pp);
	if (backing)
		tools_close_image(backing);
	free(backing_path);
	return r;
}
