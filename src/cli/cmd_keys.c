/* Key slots of the LUKS header embedded in a qcow2 image, as cryptsetup's
 * luksAddKey, luksRemoveKey (luksKillSlot with --key-slot), luksChangeKey
 * and luksDump:
 *   qcowsetup add-key IMAGE [NEW_KEY_FILE]
 *   qcowsetup remove-key IMAGE [KEY_FILE]
 *   qcowsetup change-key IMAGE [NEW_KEY_FILE]
 *   qcowsetup dump-keys IMAGE
 * The header region is edited in memory by libcryptsetup (crypto_luks.c)
 * and written back in place in a crash-safe order (qcow2_create.c): new key
 * material first, then the header sector, then the wiping of removed
 * slots, with an fsync after each. The volume key never changes, so these
 * work on images that are mapped; they refuse while QEMU has the image
 * open. The last key slot is only removed with --force.
 *
 * Also the options and helpers that format and convert share (cmd_keys.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#include "cmd_keys.h"
#include "json.h"
#include "lock.h"
#include "log.h"
#include "loop.h"
#include "passphrase.h"
#include "qcow2_create.h"
#include "fileio.h"
#include "qcowsetup.h"
#include "util.h"

struct keys_opts kopt = {
	.key_slot = -1,
};

/* ---- options ---- */

static int parse_u32(const char *s, const char *what, uint32_t min, uint32_t max, uint32_t *v)
{
	unsigned long long n;
	char *end;

	errno = 0;
	n = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-' || n < min || n > max) {
		log_err("%s takes a number from %u to %u.", what, min, max);
		return -EINVAL;
	}
	*v = (uint32_t)n;
	return 0;
}

int keys_parse_size(const char *s, const char *what, uint64_t *v)
{
	unsigned long long n;
	unsigned int shift = 0;
	char *end;

	errno = 0;
	n = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-')
		goto bad;
	switch (*end) {
	case '\0':
		break;
	case 'k': case 'K':
		shift = 10;
		break;
	case 'm': case 'M':
		shift = 20;
		break;
	case 'g': case 'G':
		shift = 30;
		break;
	case 't': case 'T':
		shift = 40;
		break;
	default:
		goto bad;
	}
	if (*end && end[1] && strcmp(end + 1, "iB") && strcmp(end + 1, "B"))
		goto bad;
	if (shift && n > (UINT64_MAX >> shift))
		goto bad;
	*v = (uint64_t)n << shift;
	return 0;
bad:
	log_err("Invalid size for %s: %s (a number of bytes, or with K, M, G, T).", what, s);
	return -EINVAL;
}

int keys_parse_option(int c, const char *arg)
{
	uint32_t v;
	uint64_t s;

	switch (c) {
	case KEYS_OPT_CIPHER:
		kopt.cipher = arg;
		return 1;
	case KEYS_OPT_KEY_SIZE:
		if (parse_u32(arg, "--key-size", 8, 2048, &kopt.key_size) < 0 || kopt.key_size % 8) {
			log_err("--key-size takes a number of bits, a multiple of 8.");
			return -EINVAL;
		}
		return 1;
	case KEYS_OPT_HASH:
		kopt.hash = arg;
		return 1;
	case KEYS_OPT_ITER_TIME:
		return parse_u32(arg, "--iter-time", 1, 3600000, &kopt.iter_time) < 0 ? -EINVAL : 1;
	case KEYS_OPT_PBKDF_ITERATIONS:
		return parse_u32(arg, "--pbkdf-force-iterations", 1000, UINT32_MAX,
				 &kopt.pbkdf_iterations) < 0 ? -EINVAL : 1;
	case KEYS_OPT_CLUSTER_SIZE:
		if (keys_parse_size(arg, "--cluster-size", &s) < 0)
			return -EINVAL;
		if (s < 512 || s > (2U << 20) || (s & (s - 1))) {
			log_err("--cluster-size takes a power of two from 512 to 2M.");
			return -EINVAL;
		}
		kopt.cluster_size = s;
		return 1;
	case KEYS_OPT_BACKING_FILE:
		kopt.backing_file = arg;
		return 1;
	case KEYS_OPT_BACKING_FORMAT:
		kopt.backing_format = arg;
		return 1;
	case KEYS_OPT_NEW_KEY_FILE:
		kopt.new_key_file = arg;
		return 1;
	case KEYS_OPT_NEW_KEYFILE_OFFSET:
		return keys_parse_size(arg, "--new-keyfile-offset", &kopt.new_keyfile_offset) < 0 ? -EINVAL : 1;
	case KEYS_OPT_NEW_KEYFILE_SIZE:
		return keys_parse_size(arg, "--new-keyfile-size", &kopt.new_keyfile_size) < 0 ? -EINVAL : 1;
	case KEYS_OPT_KEY_SLOT:
		if (parse_u32(arg, "--key-slot", 0, LUKS_NUM_SLOTS - 1, &v) < 0)
			return -EINVAL;
		kopt.key_slot = (int)v;
		return 1;
	case KEYS_OPT_PROGRESS:
		kopt.progress = true;
		return 1;
	case KEYS_OPT_QUIET:
		kopt.quiet = true;
		return 1;
	case KEYS_OPT_IN_PLACE:
		kopt.in_place = true;
		return 1;
	case KEYS_OPT_FLATTEN:
		kopt.flatten = true;
		return 1;
	case KEYS_OPT_FORCE:
		kopt.force = true;
		return 1;
	}
	return 0;
}

void keys_usage(FILE *f)
{
	fprintf(f, "\nformat, key slots and convert:\n"
		"      --cipher SPEC         cipher of a new LUKS header (default aes-xts-plain64)\n"
		"      --key-size BITS       volume key size (default 512 for xts, 256 otherwise)\n"
		"      --hash HASH           PBKDF2 hash of a new header (default sha256)\n"
		"      --iter-time MS        PBKDF2 time of new key slots (default 2000)\n"
		"      --pbkdf-force-iterations N   PBKDF2 iterations of new key slots, no benchmark\n"
		"      --cluster-size SIZE   cluster size of a new image (default 64K)\n"
		"      --backing-file FILE   format: the new image's backing file\n"
		"      --backing-format FMT  its format (default: probed)\n"
		"      --new-key-file FILE   the new passphrase (- = stdin)\n"
		"      --new-keyfile-offset N, --new-keyfile-size N   as --keyfile-offset/-size\n"
		"      --key-slot N          key slot to add, or to remove (as luksKillSlot)\n"
		"      --progress            progress lines even when stderr is not a terminal\n"
		"      --quiet               no progress bar\n"
		"      --in-place            convert: replace SRC, after verifying the new image\n"
		"      --flatten             convert: copy the backing chain's data, no backing file\n"
		"      --force               overwrite an existing destination; remove the last key slot\n");
}

/* ---- passphrases ---- */

int keys_read_passphrase(const char *image, struct passphrase **pp)
{
	struct passphrase_opts po = {
		.key_file = opt.key_file,
		.keyfile_offset = opt.keyfile_offset,
		.keyfile_size = opt.keyfile_size,
		.image_name = image,
	};

	return tools_read_passphrase(&po, pp);
}

int keys_read_new_passphrase(const char *file, const char *image, struct passphrase **pp)
{
	struct passphrase *again = NULL;
	char name[512];
	struct passphrase_opts po = {
		.key_file = file,
		.keyfile_offset = kopt.new_keyfile_offset,
		.keyfile_size = kopt.new_keyfile_size,
		.image_name = name,
	};
	int r;

	*pp = NULL;
	snprintf(name, sizeof(name), "the new key of %s", image);
	r = tools_read_passphrase(&po, pp);
	if (r < 0 || !tools_passphrase_interactive(&po))
		return r;
	snprintf(name, sizeof(name), "the new key of %s (again)", image);
	r = tools_read_passphrase(&po, &again);
	if (r < 0)
		goto fail;
	if (again->len != (*pp)->len || memcmp(again->data, (*pp)->data, again->len)) {
		log_err("Passphrases do not match.");
		r = -EPERM;
		goto fail;
	}
	passphrase_free(again);
	return 0;
fail:
	passphrase_free(again);
	passphrase_free(*pp);
	*pp = NULL;
	return r;
}

static bool passphrase_interactive(void)
{
	struct passphrase_opts po = { .key_file = opt.key_file };

	return tools_passphrase_interactive(&po);
}

/* ---- LUKS parameters ---- */

void keys_pbkdf(struct luks_pbkdf *p)
{
	p->iterations = kopt.pbkdf_iterations;
	p->iter_time_ms = kopt.iter_time;
}

int keys_format_params(struct luks_format_params *p, char *name, char *mode, size_t *key_bytes)
{
	const char *spec = kopt.cipher ? kopt.cipher : "aes-xts-plain64";
	const char *dash = strchr(spec, '-');
	size_t n;

	memset(p, 0, sizeof(*p));
	/* cryptsetup's "cipher-mode" split: the mode keeps its own dashes */
	if (!dash || dash == spec || !dash[1] || (size_t)(dash - spec) > 32 || strlen(dash + 1) > 32) {
		log_err("Invalid --cipher %s (expected CIPHER-MODE-IV, e.g. aes-xts-plain64).", spec);
		return -EINVAL;
	}
	n = (size_t)(dash - spec);
	memcpy(name, spec, n);
	name[n] = '\0';
	strcpy(mode, dash + 1);
	if (kopt.key_size)
		*key_bytes = kopt.key_size / 8;
	else
		*key_bytes = !strncmp(mode, "xts", 3) ? 64 : 32;
	p->cipher = name;
	p->cipher_mode = mode;
	p->hash = kopt.hash ? kopt.hash : "sha256";
	keys_pbkdf(&p->pbkdf);
	return 0;
}

/* ---- QEMU's locks (lock.c) ---- */

/* Whether another open file description holds lock bytes that conflict with
 * a user of used that shares shared (lock_image's test, without a message). */
static int lock_conflicts(int fd, unsigned int used, unsigned int shared, bool *conflict)
{
	unsigned int others_use, others_unshare;
	int r;

	r = lock_image_query(fd, &others_use, &others_unshare);
	if (r < 0)
		return r;
	*conflict = (others_unshare & used) || (others_use & ~shared);
	return 0;
}

/* Whether a loop device is bound to the file of fd (qcowsetup mapped it). */
static bool fd_is_looped(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 && loop_find_by_file(st.st_dev, st.st_ino, NULL) > 0;
}

int keys_lock_for_write(int fd, const char *path, bool allow_mapped)
{
	bool conflict = false;
	int r;

	if (allow_mapped) {
		r = lock_conflicts(fd, LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE | LOCK_PERM_RESIZE,
				   LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE_UNCHANGED, &conflict);
		if (r == 0 && conflict && fd_is_looped(fd)) {
			/* the header is metadata: no mapping reads or writes it */
			log_verbose("%s is mapped (a loop device backs it): its lock bytes are the mapping's; "
				    "the volume key does not change.", path);
			return 0;
		}
	}
	/* as a read-write QEMU: refuses an image QEMU has open at all */
	return lock_image(fd, true, path);
}

int keys_lock_for_read(int fd, const char *path, bool exclusive)
{
	bool conflict = false;
	int r;

	if (exclusive) {
		r = lock_conflicts(fd, LOCK_PERM_ALL, 0, &conflict);
		if (r < 0) {
			log_err("Cannot test the locks of %s: %s", path, strerror(-r));
			return r;
		}
		if (conflict) {
			log_err("%s is in use by another process (QEMU?) or mapped: close it before "
				"replacing it.", path);
			return -EBUSY;
		}
	}
	/* as a read-only QEMU: refuses writers and resizers meanwhile */
	return lock_image(fd, false, path);
}

/* ---- output files ---- */

#define TMP_SUFFIX ".qcowsetup-tmp"

static const int cleanup_signals[] = { SIGINT, SIGTERM, SIGHUP };
static char *volatile cleanup_path;
static struct sigaction cleanup_old[ARRAY_SIZE(cleanup_signals)];

static void cleanup_handler(int sig)
{
	char *p = cleanup_path;

	if (p)
		unlink(p);
	signal(sig, SIG_DFL);
	raise(sig);
}

static void cleanup_arm(char *path)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = cleanup_handler;
	sigemptyset(&sa.sa_mask);
	cleanup_path = path;
	for (size_t i = 0; i < ARRAY_SIZE(cleanup_signals); i++)
		sigaction(cleanup_signals[i], &sa, &cleanup_old[i]);
}

static void cleanup_disarm(void)
{
	if (!cleanup_path)
		return;
	for (size_t i = 0; i < ARRAY_SIZE(cleanup_signals); i++)
		sigaction(cleanup_signals[i], &cleanup_old[i], NULL);
	cleanup_path = NULL;
}

int out_file_create(const char *path, bool replace, struct out_file *o)
{
	struct stat st;
	int fd = -1, r, attempt;

	memset(o, 0, sizeof(*o));
	o->fd = -1;
	if (!replace && lstat(path, &st) == 0) {
		log_err("%s exists (--force overwrites it).", path);
		return -EEXIST;
	}
	o->path = strdup(path);
	if (!o->path || asprintf(&o->tmp, "%s%s", path, TMP_SUFFIX) < 0) {
		o->tmp = NULL;
		r = -ENOMEM;
		goto fail;
	}
	for (attempt = 0; attempt < 2; attempt++) {
		fd = open(o->tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd >= 0 || errno != EEXIST)
			break;
		/* left by a run that was killed, or in use by a live one */
		fd = open(o->tmp, O_RDWR | O_CLOEXEC);
		if (fd >= 0) {
			bool busy = false;

			r = lock_conflicts(fd, LOCK_PERM_ALL, 0, &busy);
			close(fd);
			fd = -1;
			if (r == 0 && busy) {
				log_err("%s is being written by another process.", o->tmp);
				r = -EBUSY;
				goto fail;
			}
		}
		log_verbose("Removing %s, left by an interrupted run.", o->tmp);
		if (unlink(o->tmp) < 0 && errno != ENOENT) {
			r = -errno;
			log_err("Cannot remove %s: %s", o->tmp, strerror(-r));
			goto fail;
		}
	}
	if (fd < 0) {
		r = -errno;
		log_err("Cannot create %s: %s", o->tmp, strerror(-r));
		goto fail;
	}
	o->fd = fd;
	cleanup_arm(o->tmp);
	/* neither QEMU nor another qcowsetup opens the file half-written */
	r = lock_image(fd, true, o->tmp);
	if (r < 0)
		goto fail;
	return 0;
fail:
	out_file_abort(o);
	return r;
}

static int sync_folder(const char *path)
{
	char *copy = strdup(path);
	int fd, r = 0;

	if (!copy)
		return -ENOMEM;
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0)
		r = -errno;
	if (fd >= 0)
		close(fd);
	free(copy);
	return r;
}

int out_file_commit(struct out_file *o, bool replace)
{
	int r;

	if (fsync(o->fd) < 0) {
		r = -errno;
		log_err("Cannot write %s: %s", o->tmp, strerror(-r));
		return r;
	}
	if (replace) {
		r = rename(o->tmp, o->path) < 0 ? -errno : 0;
	} else {
		r = renameat2(AT_FDCWD, o->tmp, AT_FDCWD, o->path, RENAME_NOREPLACE) < 0 ? -errno : 0;
		if (r == -EINVAL || r == -ENOSYS) {
			/* no RENAME_NOREPLACE here: link(2) does not replace either */
			r = link(o->tmp, o->path) < 0 ? -errno : 0;
			if (r == 0)
				unlink(o->tmp);
		}
	}
	if (r < 0) {
		log_err("Cannot rename %s to %s: %s", o->tmp, o->path, strerror(-r));
		return r;
	}
	cleanup_disarm();
	free(o->tmp);
	o->tmp = NULL;
	r = sync_folder(o->path);
	if (r < 0)
		log_err("Cannot sync the folder of %s: %s", o->path, strerror(-r));
	close(o->fd);
	o->fd = -1;
	free(o->path);
	o->path = NULL;
	return r;
}

void out_file_abort(struct out_file *o)
{
	if (o->tmp && o->fd >= 0)
		unlink(o->tmp);
	cleanup_disarm();
	if (o->fd >= 0)
		close(o->fd);
	o->fd = -1;
	free(o->tmp);
	free(o->path);
	o->tmp = o->path = NULL;
}

/* ---- progress ---- */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void progress_print(struct progress *p, bool final)
{
	double mib = 1024.0 * 1024.0, pct = p->total ? 100.0 * (double)p->done / (double)p->total : 100.0;
	double secs = (double)(now_ms() - p->start_ms) / 1000.0;
	int width = 30, fill = (int)(pct * width / 100.0);
	char bar[64];

	if (p->tty) {
		for (int i = 0; i < width; i++)
			bar[i] = i < fill ? '#' : '.';
		bar[width] = '\0';
		fprintf(stderr, "\r%s [%s] %5.1f%% %.1f/%.1f MiB%s", p->label, bar, pct,
			(double)p->done / mib, (double)p->total / mib, final ? "\n" : "");
	} else {
		fprintf(stderr, "%s: %.1f%% %.1f/%.1f MiB, %.1f s\n", p->label, pct,
			(double)p->done / mib, (double)p->total / mib, secs);
	}
	fflush(stderr);
}

void progress_start(struct progress *p, const char *label, uint64_t total)
{
	memset(p, 0, sizeof(*p));
	p->tty = isatty(STDERR_FILENO);
	p->on = !kopt.quiet && (kopt.progress || p->tty);
	p->label = label;
	p->total = total;
	p->start_ms = p->last_ms = now_ms();
	if (p->on && p->tty)
		progress_print(p, false);
}

void progress_update(struct progress *p, uint64_t done)
{
	int64_t t;

	p->done = done;
	if (!p->on)
		return;
	t = now_ms();
	if (t - p->last_ms < (p->tty ? 200 : 1000))
		return;
	p->last_ms = t;
	progress_print(p, false);
}

void progress_end(struct progress *p, bool ok)
{
	if (!p->on)
		return;
	if (ok) {
		p->done = p->total;
		progress_print(p, true);
	} else if (p->tty) {
		fputc('\n', stderr);
	}
}

/* ---- the key slot commands ---- */

struct keyimg {
	const char *path;
	int fd;
	struct img_io io;
	struct image *img;
	uint8_t *region;	/* what is on disk */
	uint64_t off, len;
	struct luks_info info;
};

static void keyimg_close(struct keyimg *k)
{
	if (k->img)
		image_free(k->img, &file_io_opener);
	file_io_free(&k->io);
	if (k->fd >= 0)
		close(k->fd);
	free(k->region);
	memset(k, 0, sizeof(*k));
	k->fd = -1;
}

static int keyimg_open(const char *path, bool write, struct keyimg *k)
{
	struct image_open_opts oo = { .format = opt.format, .no_backing = true };
	int r;

	memset(k, 0, sizeof(*k));
	k->path = path;
	signal(SIGXFSZ, SIG_IGN);	/* a file size limit gives EFBIG, not death */
	k->fd = open(path, (write ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (k->fd < 0) {
		r = -errno;
		log_err("Cannot open %s: %s", path, strerror(-r));
		return r;
	}
	if (write) {
		r = keys_lock_for_write(k->fd, path, true);
		if (r < 0)
			goto fail;
	}
	r = file_io_from_fd(k->fd, path, &k->io);
	if (r < 0)
		goto fail;
	r = image_open_io(&file_io_opener, &k->io, &oo, &k->img);
	if (r < 0)
		goto fail;
	if (k->img->format != IMG_FMT_QCOW2 || k->img->crypt_method != IMG_CRYPT_LUKS) {
		log_err("%s is not a LUKS-encrypted qcow2 image%s.", path,
			k->img->crypt_method == IMG_CRYPT_AES ? " (legacy AES: see qcowsetup convert)" : "");
		r = -ENOTSUP;
		goto fail;
	}
	k->off = k->img->crypt_header_offset;
	k->len = k->img->crypt_header_length;
	r = luks_read_info(&k->io, k->off, k->len, &k->info);
	if (r < 0)
		goto fail;
	k->region = malloc(k->len);
	if (!k->region) {
		r = -ENOMEM;
		goto fail;
	}
	r = img_pread(&k->io, k->region, k->len, k->off);
	if (r < 0) {
		log_err("%s: cannot read the LUKS header: %s", path, strerror(-r));
		goto fail;
	}
	return 0;
fail:
	keyimg_close(k);
	return r;
}

/* Write the edited region back and check what is on disk. */
static int keyimg_store(struct keyimg *k, const uint8_t *new)
{
	uint8_t *back;
	int r;

	r = qcow2_update_crypt_header(k->fd, k->off, k->region, new, k->len);
	if (r < 0) {
		log_err("%s: cannot write the LUKS header: %s", k->path, strerror(-r));
		return r;
	}
	back = malloc(k->len);
	if (!back)
		return -ENOMEM;
	r = img_pread(&k->io, back, k->len, k->off);
	if (r == 0 && memcmp(back, new, k->len)) {
		log_err("%s: the LUKS header reads back different from what was written.", k->path);
		r = -EIO;
	}
	free(back);
	return r;
}

/* The volume key and the slot that the existing passphrase opens; asks
 * again on a terminal (--tries). keyfile_arg overrides --key-file. */
static int unlock_existing(struct keyimg *k, const char *keyfile_arg, struct volume_key **vk, int *slot)
{
	const char *saved = opt.key_file;
	struct passphrase *pp = NULL;
	int tries, r = -EPERM;

	if (keyfile_arg)
		opt.key_file = keyfile_arg;
	tries = passphrase_interactive() ? opt.tries : 1;
	for (int i = 0; i < tries; i++) {
		r = keys_read_passphrase(k->path, &pp);
		if (r < 0)
			break;
		r = luks_unlock(&k->io, k->off, k->len, pp, vk, slot);
		passphrase_free(pp);
		pp = NULL;
		if (r != -EPERM)
			break;
		log_err("No key available with this passphrase.");
	}
	opt.key_file = saved;
	return r;
}

static uint8_t *region_copy(const struct keyimg *k)
{
	uint8_t *p = malloc(k->len);

	if (p)
		memcpy(p, k->region, k->len);
	return p;
}

int cmd_add_key(int argc, char **argv)
{
	const char *new_file = argc > 1 ? argv[1] : kopt.new_key_file;
	struct passphrase *newpp = NULL;
	struct volume_key *vk = NULL;
	struct luks_pbkdf pbkdf;
	uint8_t *new = NULL;
	struct keyimg k;
	int slot, r;

	r = keyimg_open(argv[0], true, &k);
	if (r < 0)
		return r;
	if (k.info.active_slots >= LUKS_NUM_SLOTS) {
		log_err("%s: all %d key slots are in use.", k.path, LUKS_NUM_SLOTS);
		r = -ENOSPC;
		goto out;
	}
	if (kopt.key_slot >= 0 && k.info.slots[kopt.key_slot].active) {
		log_err("%s: key slot %d is in use.", k.path, kopt.key_slot);
		r = -EEXIST;
		goto out;
	}
	r = unlock_existing(&k, NULL, &vk, &slot);
	if (r < 0)
		goto out;
	r = keys_read_new_passphrase(new_file, k.path, &newpp);
	if (r < 0)
		goto out;
	new = region_copy(&k);
	if (!new) {
		r = -ENOMEM;
		goto out;
	}
	keys_pbkdf(&pbkdf);
	r = luks_keyslot_add(new, k.len, vk, newpp, kopt.key_slot, &pbkdf, &slot);
	if (r == 0)
		r = keyimg_store(&k, new);
	if (r == 0)
		log_verbose("Key slot %d created.", slot);
out:
	free(new);
	passphrase_free(newpp);
	volume_key_free(vk);
	keyimg_close(&k);
	return r;
}

int cmd_remove_key(int argc, char **argv)
{
	struct volume_key *vk = NULL;
	uint8_t *new = NULL;
	struct keyimg k;
	int slot, kill, r;

	r = keyimg_open(argv[0], true, &k);
	if (r < 0)
		return r;
	if (kopt.key_slot >= 0 && !k.info.slots[kopt.key_slot].active) {
		log_err("%s: key slot %d is not in use.", k.path, kopt.key_slot);
		r = -EINVAL;
		goto out;
	}
	r = unlock_existing(&k, argc > 1 ? argv[1] : NULL, &vk, &slot);
	if (r < 0)
		goto out;
	/* --key-slot N: remove N (luksKillSlot), the passphrase proves access */
	kill = kopt.key_slot >= 0 ? kopt.key_slot : slot;
	if (k.info.active_slots <= 1 && !kopt.force) {
		log_err("%s: key slot %d holds the last key; without it the image can never be opened "
			"again (--force removes it anyway).", k.path, kill);
		r = -EPERM;
		goto out;
	}
	new = region_copy(&k);
	if (!new) {
		r = -ENOMEM;
		goto out;
	}
	r = luks_keyslot_remove(new, k.len, kill);
	if (r == 0)
		r = keyimg_store(&k, new);
	if (r == 0)
		log_verbose("Key slot %d removed.", kill);
out:
	free(new);
	volume_key_free(vk);
	keyimg_close(&k);
	return r;
}

int cmd_change_key(int argc, char **argv)
{
	const char *new_file = argc > 1 ? argv[1] : kopt.new_key_file;
	struct passphrase *newpp = NULL;
	struct volume_key *vk = NULL;
	struct luks_pbkdf pbkdf;
	uint8_t *new = NULL;
	struct keyimg k;
	int old_slot, new_slot, r;
	bool in_place;

	r = keyimg_open(argv[0], true, &k);
	if (r < 0)
		return r;
	r = unlock_existing(&k, NULL, &vk, &old_slot);
	if (r < 0)
		goto out;
	r = keys_read_new_passphrase(new_file, k.path, &newpp);
	if (r < 0)
		goto out;
	new = region_copy(&k);
	if (!new) {
		r = -ENOMEM;
		goto out;
	}
	keys_pbkdf(&pbkdf);
	r = luks_keyslot_change(new, k.len, vk, old_slot, newpp, &pbkdf, &new_slot, &in_place);
	if (r == 0 && in_place)
		log_std("%s: no free key slot: key slot %d is overwritten in place (an interruption "
			"while writing it loses that key).", k.path, new_slot);
	if (r == 0)
		r = keyimg_store(&k, new);
	if (r == 0)
		log_verbose("Key slot %d changed (now key slot %d).", old_slot, new_slot);
out:
	free(new);
	passphrase_free(newpp);
	volume_key_free(vk);
	keyimg_close(&k);
	return r;
}

int cmd_dump_keys(int argc, char **argv)
{
	const struct luks_info *in;
	struct keyimg k;
	struct json j;
	int r;

	(void)argc;
	r = keyimg_open(argv[0], false, &k);
	if (r < 0)
		return r;
	in = &k.info;
	if (opt.json) {
		json_init(&j, stdout, true);
		json_begin_object(&j, NULL);
		json_string(&j, "filename", k.path);
		json_u64(&j, "version", 1);
		json_string(&j, "cipher-name", in->cipher_name);
		json_string(&j, "cipher-mode", in->cipher_mode);
		json_string(&j, "hash", in->hash);
		json_u64(&j, "key-bits", (uint64_t)in->key_bytes * 8);
		json_u64(&j, "payload-offset", in->payload_offset);
		json_u64(&j, "mk-iterations", in->mk_iterations);
		json_string(&j, "uuid", in->uuid);
		json_u64(&j, "header-offset", k.off);
		json_u64(&j, "header-length", k.len);
		json_begin_array(&j, "slots");
		for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
			json_begin_object(&j, NULL);
			json_u64(&j, "slot", (uint64_t)i);
			json_bool(&j, "active", in->slots[i].active);
			if (in->slots[i].active)
				json_u64(&j, "iterations", in->slots[i].iterations);
			json_u64(&j, "key-offset", in->slots[i].key_offset);
			if (in->slots[i].active)
				json_u64(&j, "stripes", in->slots[i].stripes);
			json_end_object(&j);
		}
		json_end_array(&j);
		json_end_object(&j);
		json_finish(&j);
	} else {
		printf("LUKS header information for %s\n\n", k.path);
		printf("Version:        1\n");
		printf("Cipher name:    %s\n", in->cipher_name);
		printf("Cipher mode:    %s\n", in->cipher_mode);
		printf("Hash spec:      %s\n", in->hash);
		printf("Payload offset: %" PRIu64 " (not used: data lives in qcow2 clusters)\n",
		       in->payload_offset / 512);
		printf("MK bits:        %u\n", in->key_bytes * 8);
		printf("MK iterations:  %u\n", in->mk_iterations);
		printf("UUID:           %s\n", in->uuid);
		printf("Header region:  offset %" PRIu64 ", %" PRIu64 " bytes (qcow2 extension 0x0537be77)\n\n",
		       k.off, k.len);
		for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
			const struct luks_slot *s = &in->slots[i];

			printf("Key Slot %d: %s\n", i, s->active ? "ENABLED" : "DISABLED");
			if (!s->active)
				continue;
			printf("\tIterations:         \t%u\n", s->iterations);
			printf("\tKey material offset:\t%" PRIu64 "\n", s->key_offset / 512);
			printf("\tAF stripes:         \t%u\n", s->stripes);
		}
	}
	keyimg_close(&k);
	return 0;
}
