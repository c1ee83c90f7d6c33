/* Test driver: seeded random guest writes through the metadata writer
 * (qcow2_alloc.c) to a real qcow2 file made by qemu-img, and the same
 * writes to a raw reference, for `qemu-img check` and `qemu-img compare`
 * to judge (tests/images/test-write.sh).
 *
 *   qcow2-write [--seed N] [--ops N] [--max-write BYTES] [--write-through]
 *               [--cache BYTES] [--crash-after N] IMAGE REFERENCE.raw
 *
 * Writes are 1 byte to --max-write (default 4 MiB) bytes, at aligned and
 * unaligned offsets, with a flush now and then; the image is closed cleanly
 * at the end (dirty bit cleared). --crash-after N stops dead (no flush, no
 * close) after N writes and prints the sectors written since the last
 * flush, one "OFFSET LENGTH" line each, on stdout. Backing files and
 * external data files are opened as QEMU names them. Exit 0, 1 on a
 * failure, 2 on bad usage. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain.h"
#include "image.h"
#include "log.h"
#include "qcow2_alloc.h"
#include "util.h"

struct file {
	int fd;
	char *path;
};

static int fd_pread(int fd, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) {
			memset(p, 0, len);	/* past the end: zeros */
			return 0;
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int fd_pwrite(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* img_io: exact reads (short reads are errors for the parser) */
static int io_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct file *f = opaque;
	uint8_t *p = buf;

	while (len) {
		ssize_t n = pread(f->fd, p, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int open_file(const char *path, int flags, struct img_io *io)
{
	struct file *f = calloc(1, sizeof(*f));
	struct stat st;

	if (!f)
		return -ENOMEM;
	f->fd = open(path, flags | O_CLOEXEC);
	if (f->fd < 0 || fstat(f->fd, &st) < 0) {
		int r = -errno;

		if (f->fd >= 0)
			close(f->fd);
		free(f);
		return r;
	}
	f->path = strdup(path);
	memset(io, 0, sizeof(*io));
	io->pread = io_pread;
	io->opaque = f;
	io->size = (uint64_t)st.st_size;
	io->name = f->path;
	return 0;
}

static int ro_open(void *opaque, const char *path, struct img_io *io)
{
	(void)opaque;
	return open_file(path, O_RDONLY, io);
}

static void ro_close(void *opaque, struct img_io *io)
{
	struct file *f = io->opaque;

	(void)opaque;
	if (f) {
		close(f->fd);
		free(f->path);
		free(f);
	}
}

static const struct img_opener opener = { .open = ro_open, .close = ro_close };

struct ctx {
	int meta_fd, data_fd;
	struct chain_reader *chain;
};

static int c_meta_pwrite(void *opaque, const void *buf, size_t len, uint64_t off)
{
	return fd_pwrite(((struct ctx *)opaque)->meta_fd, buf, len, off);
}

static int c_meta_flush(void *opaque)
{
	return fdatasync(((struct ctx *)opaque)->meta_fd) ? -errno : 0;
}

static int c_data_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	return fd_pread(((struct ctx *)opaque)->data_fd, buf, len, off);
}

static int c_data_pwrite(void *opaque, const void *buf, size_t len, uint64_t off)
{
	return fd_pwrite(((struct ctx *)opaque)->data_fd, buf, len, off);
}

static int c_data_flush(void *opaque)
{
	return fdatasync(((struct ctx *)opaque)->data_fd) ? -errno : 0;
}

static int c_backing_pread(void *opaque, void *buf, size_t len, uint64_t guest)
{
	return chain_read(((struct ctx *)opaque)->chain, buf, len, guest);
}

static int layer_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	const struct image *l = opaque;
	struct file *f = l->data_io.opaque;

	return fd_pread(f->fd, buf, len, off);
}

static uint64_t rng = 1;

static uint64_t rnd(void)
{
	uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void usage(void)
{
	fprintf(stderr, "usage: qcow2-write [--seed N] [--ops N] [--max-write BYTES] [--write-through] [--cache BYTES] [--crash-after N] IMAGE REFERENCE.raw\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct qcow2_rw_opts wo = { 0 };
	struct qcow2_rw_ops ops = { 0 };
	struct chain_layer_io lio[IMG_MAX_CHAIN_DEPTH] = { 0 };
	struct qcow2_rw *w = NULL;
	struct image *img = NULL;
	struct img_io io;
	struct ctx c = { .meta_fd = -1, .data_fd = -1 };
	uint64_t ops_n = 200, max_write = 4 << 20, crash_after = 0, vsize, used_end;
	uint8_t *buf = NULL;
	int ref_fd, r, i;
	struct { uint64_t off, len; } *unflushed = NULL;
	size_t nunflushed = 0;

	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--seed") && i + 1 < argc)
			rng = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--ops") && i + 1 < argc)
			ops_n = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--max-write") && i + 1 < argc)
			max_write = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--cache") && i + 1 < argc)
			wo.cache_bytes = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--crash-after") && i + 1 < argc)
			crash_after = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--write-through"))
			wo.write_through = true;
		else
			usage();
	}
	if (argc - i != 2)
		usage();
	if (getenv("QS_DEBUG"))
		qs_log_set_level(QS_LOG_DEBUG);
	r = open_file(argv[i], O_RDWR, &io);
	if (r) {
		fprintf(stderr, "%s: %s\n", argv[i], strerror(-r));
		return 1;
	}
	c.meta_fd = ((struct file *)io.opaque)->fd;
	r = image_open_io(&opener, &io, NULL, &img);
	if (r) {
		fprintf(stderr, "%s: cannot open: %s\n", argv[i], strerror(-r));
		return 1;
	}
	c.data_fd = c.meta_fd;
	if (img->has_data_file) {
		c.data_fd = open(img->data_io.name, O_RDWR | O_CLOEXEC);
		if (c.data_fd < 0) {
			fprintf(stderr, "%s: %s\n", img->data_io.name, strerror(errno));
			return 1;
		}
	}
	if (img->backing) {
		for (struct image *l = img->backing; l; l = l->backing) {
			lio[l->depth].data_pread = layer_pread;
			lio[l->depth].opaque = l;
		}
		r = chain_reader_open(img->backing, lio, IMG_MAX_CHAIN_DEPTH, &c.chain);
		if (r) {
			fprintf(stderr, "backing chain: %s\n", strerror(-r));
			return 1;
		}
	}
	ops.meta_pwrite = c_meta_pwrite;
	ops.meta_flush = c_meta_flush;
	ops.data_pread = c_data_pread;
	ops.data_pwrite = c_data_pwrite;
	ops.data_flush = img->has_data_file ? c_data_flush : NULL;
	ops.backing_pread = c.chain ? c_backing_pread : NULL;
	ops.opaque = &c;
	r = qcow2_rw_open(img, &ops, &wo, &w);
	if (r) {
		fprintf(stderr, "%s: writer: %s\n", argv[i], strerror(-r));
		return 1;
	}
	ref_fd = open(argv[i + 1], O_RDWR | O_CLOEXEC);
	if (ref_fd < 0) {
		fprintf(stderr, "%s: %s\n", argv[i + 1], strerror(errno));
		return 1;
	}
	vsize = img->size;
	max_write = MIN(max_write, vsize);
	buf = malloc(max_write);
	unflushed = calloc(ops_n + 1, sizeof(*unflushed));
	if (!buf || !unflushed)
		return 1;
	for (uint64_t n = 0; n < ops_n; n++) {
		uint64_t len, off;

		switch (rnd() % 4) {
		case 0:
			len = 512 * (1 + rnd() % 8);
			break;
		case 1:
			len = 1 + rnd() % 5000;
			break;
		case 2:
			len = 65536 * (1 + rnd() % 4);
			break;
		default:
			len = 1 + rnd() % max_write;
			break;
		}
		len = MIN(len, max_write);
		off = rnd() % (vsize - len + 1);
		if (rnd() % 2)
			off &= ~511ULL;
		if (rnd() % 4 == 0)
			off &= ~65535ULL;
		for (uint64_t k = 0; k < len; k++)
			buf[k] = (uint8_t)(rnd() >> 13);
		r = qcow2_rw_write(w, buf, len, off);
		if (r) {
			fprintf(stderr, "write %" PRIu64 "+%" PRIu64 ": %s\n", off, len, strerror(-r));
			return 1;
		}
		r = fd_pwrite(ref_fd, buf, len, off);
		if (r) {
			fprintf(stderr, "reference: %s\n", strerror(-r));
			return 1;
		}
		unflushed[nunflushed].off = off;
		unflushed[nunflushed++].len = len;
		if (crash_after && n + 1 == crash_after) {
			for (size_t k = 0; k < nunflushed; k++)
				printf("%" PRIu64 " %" PRIu64 "\n", unflushed[k].off, unflushed[k].len);
			fflush(stdout);
			_exit(0);	/* no flush, no close: what a crash leaves */
		}
		if (rnd() % 16 == 0) {
			r = qcow2_rw_flush(w);
			if (r) {
				fprintf(stderr, "flush: %s\n", strerror(-r));
				return 1;
			}
			nunflushed = 0;
		}
	}
	r = qcow2_rw_close(w, &used_end);
	if (r) {
		fprintf(stderr, "close: %s\n", strerror(-r));
		return 1;
	}
	fsync(ref_fd);
	close(ref_fd);
	chain_reader_free(c.chain);
	if (c.data_fd != c.meta_fd)
		close(c.data_fd);
	image_free(img, &opener);
	ro_close(NULL, &io);
	free(buf);
	free(unflushed);
	return 0;
}
