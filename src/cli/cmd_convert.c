/* qcowsetup convert [--key-file SRC_KEY] [--new-key-file DST_KEY] SRC DST
 * qcowsetup convert --in-place SRC
 *
 * Any image the engine reads becomes a LUKS qcow2 image that QEMU opens
 * with the new passphrase: convert_image() (lib/convert.h) does the work;
 * here are the options, the passphrases, the files and the progress.
 *
 * --in-place writes SRC.qcowsetup-tmp, reads it back and compares every
 * cluster's plaintext with the source, checks its refcounts and that the
 * new passphrase opens it with the same volume key, fsyncs it and renames
 * it over SRC. An interruption at any point leaves SRC as it was, or the
 * finished new image; a leftover temporary file is removed by the next run.
 * The source is never written; it is locked as QEMU locks a read-only
 * image, so QEMU cannot open it for writing meanwhile, and a source that
 * QEMU holds for writing is refused (with --in-place: a source anybody has
 * open, and nobody can open it until it is replaced). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cmd_keys.h"
#include "convert.h"
#include "fileio.h"
#include "log.h"
#include "passphrase.h"
#include "qcowsetup.h"

/* What the callbacks of convert_image() work on. */
struct convert_cli {
	struct out_file o;
	const struct stat *src_st;	/* the source, whose permissions --in-place keeps */
	const char *src_path;
	struct progress prog;
};

static int read_passphrase(void *opaque, const char *image, struct passphrase **pp)
{
	(void)opaque;
	return keys_read_passphrase(image, pp);
}

static int read_new_passphrase(void *opaque, const char *dst, struct passphrase *src_pp,
			       struct passphrase **pp)
{
	struct passphrase_opts po = { 0 };

	(void)opaque;
	if (opt.new_key_file)
		return keys_read_new_passphrase(opt.new_key_file, dst, pp);
	if (tools_passphrase_interactive(&po))
		return keys_read_new_passphrase(NULL, dst, pp);
	if (src_pp) {
		log_verbose("The new image gets the source's passphrase (--new-key-file gives another).");
		*pp = src_pp;
		return 0;
	}
	if (opt.key_file)	/* nothing to decrypt: --key-file is the new key */
		return keys_read_passphrase(dst, pp);
	return keys_read_new_passphrase(NULL, dst, pp);
}

static int create_target(void *opaque, const char *dst, int *fd, const char **tmp)
{
	struct convert_cli *cli = opaque;
	const struct stat *st = cli->src_st;
	int r;

	r = out_file_create(dst, opt.in_place || opt.force, &cli->o);
	if (r < 0)
		return r;
	if (opt.in_place) {
		/* the file that replaces SRC keeps its permissions and owner */
		if (fchmod(cli->o.fd, st->st_mode & 07777) < 0 ||
		    (fchown(cli->o.fd, st->st_uid, st->st_gid) < 0 && errno != EPERM))
			log_dbg("Cannot copy the permissions of %s: %s", cli->src_path, strerror(errno));
	}
	*fd = cli->o.fd;
	*tmp = cli->o.tmp;
	return 0;
}

static int commit_target(void *opaque)
{
	struct convert_cli *cli = opaque;

	return out_file_commit(&cli->o, opt.in_place || opt.force);
}

static void abort_target(void *opaque)
{
	struct convert_cli *cli = opaque;

	if (cli->o.fd >= 0 && cli->o.tmp)
		out_file_abort(&cli->o);
}

static void on_progress_start(void *opaque, const char *label, uint64_t total)
{
	progress_start(&((struct convert_cli *)opaque)->prog, label, total);
}

static void on_progress_update(void *opaque, uint64_t done)
{
	progress_update(&((struct convert_cli *)opaque)->prog, done);
}

static void on_progress_end(void *opaque, bool ok)
{
	progress_end(&((struct convert_cli *)opaque)->prog, ok);
}

/* The source, locked as a read-only QEMU would lock it (--in-place: by
 * nobody else at all). *fd stays open as long as the locks are needed. */
static int open_source(const char *src_path, int *fd, struct stat *st, struct img_io *io)
{
	int r;

	*fd = open(src_path, O_RDONLY | O_CLOEXEC);
	if (*fd < 0) {
		r = -errno;
		log_err("Cannot open %s: %s", src_path, strerror(-r));
		return r;
	}
	if (fstat(*fd, st) < 0)
		return -errno;
	if (opt.in_place && !S_ISREG(st->st_mode)) {
		log_err("--in-place needs a regular file: %s is not one.", src_path);
		return -EINVAL;
	}
	r = keys_lock_for_read(*fd, src_path, opt.in_place);
	if (r < 0)
		return r;
	return file_io_from_fd(*fd, src_path, io);
}

int cmd_convert(int argc, char **argv)
{
	const char *src_path = argv[0], *dst_path = argc > 1 ? argv[1] : NULL;
	char *real_src = NULL;
	struct luks_format_params fp;
	struct passphrase_opts po = { .key_file = opt.key_file };
	struct convert_cli cli = { .o = { .fd = -1 }, .src_path = src_path };
	struct convert_params cp;
	struct img_io io = { 0 };
	struct stat st;
	char name[33], mode[33];
	size_t key_bytes;
	int fd = -1, r;

	/* a file size limit gives EFBIG, reported, rather than death */
	signal(SIGXFSZ, SIG_IGN);
	if (opt.in_place && argc > 1) {
		log_err("convert --in-place takes the source only.");
		return -EINVAL;
	}
	if (opt.in_place) {
		/* replace the image, not a symbolic link to it */
		real_src = realpath(src_path, NULL);
		if (!real_src) {
			r = -errno;
			log_err("Cannot open %s: %s", src_path, strerror(-r));
			return r;
		}
		dst_path = real_src;
	}
	if (!dst_path) {
		log_err("Usage: qcowsetup convert SRC DST, or qcowsetup convert --in-place SRC.");
		return -EINVAL;
	}
	if (opt.in_place && opt.snapshot) {
		log_err("--in-place converts the active layer; --snapshot needs a destination.");
		return -EINVAL;
	}
	r = keys_format_params(&fp, name, mode, &key_bytes);
	if (r < 0)
		return r;

	r = open_source(src_path, &fd, &st, &io);
	if (r < 0)
		goto out;
	cli.src_st = &st;
	cp = (struct convert_params){
		.src_path = src_path,
		.src_io = &io,
		.format = opt.format,
		.snapshot = opt.snapshot,
		.trust_names = opt.trust_names,
		.skip_key_check = opt.skip_key_check,
		.tries = tools_passphrase_interactive(&po) ? (unsigned int)opt.tries : 1,
		.dst_path = dst_path,
		.in_place = opt.in_place,
		.force = opt.force,
		.flatten = opt.flatten,
		.verify_clusters = opt.in_place,
		.cluster_size = opt.cluster_size,
		.luks = &fp,
		.key_bytes = key_bytes,
		.read_passphrase = read_passphrase,
		.read_new_passphrase = read_new_passphrase,
		.create_target = create_target,
		.commit_target = commit_target,
		.abort_target = abort_target,
		.progress_start = on_progress_start,
		.progress_update = on_progress_update,
		.progress_end = on_progress_end,
		.opaque = &cli,
	};
	r = convert_image(&cp);
out:
	file_io_free(&io);
	if (fd >= 0)
		close(fd);
	free(real_src);
	return r;
}
