/* Test driver: seeded random guest writes through the metadata writer
 * (qcow2_rw.c) to a real qcow2 file made by qemu-img, and the same
 * writes to a raw reference, for `qemu-img check` and `qemu-img compare`
 * to judge (tests/images/test-write.sh).
 *
 *   qcow2-write [--seed N] [--ops N] [--max-write BYTES] [--write-through]
 *               [--cache BYTES] [--crash-after N] [--resize BYTES [--shrink]]
 *               IMAGE REFERENCE.raw
 *
 * Writes are 1 byte to --max-write (default 4 MiB) bytes, at aligned and
 * unaligned offsets, with a flush now and then; the image is closed cleanly
 * at the end (dirty bit cleared). --crash-after N stops dead (no flush, no
 * close) after N writes and prints the sectors written since the last
 * flush, one "OFFSET LENGTH" line each, on stdout. --resize BYTES
 * (--shrink to allow a smaller size) resizes the image first
 * (qcow2_rw_resize) and truncates the reference to match; a refused resize
 * exits 3. Backing files and
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
#include "fileio.h"
#include "image.h"
#include "log.h"
#include "qcow2_rw.h"
#include "sysutil.h"
#include "util.h"

static int layer_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	const struct image *l = opaque;

	return fd_pread_padded(file_io_fd(&l->data_io), buf, len, off);
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
	fprintf(stderr, "usage: qcow2-write [--seed N] [--ops N] [--max-write BYTES] [--write-through] [--cache BYTES] [--crash-after N] [--resize BYTES [--shrink]] IMAGE REFERENCE.raw\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct qcow2_rw_opts wo = { 0 };
	struct qcow2_rw_ops ops;
	struct chain_layer_io lio[IMG_MAX_CHAIN_DEPTH] = { 0 };
	struct qcow2_rw *w = NULL;
	struct image *img = NULL;
	struct img_io io;
	struct file_rw c = { .meta_fd = -1, .data_fd = -1 };
	uint64_t ops_n = 200, max_write = 4 << 20, crash_after = 0, vsize, used_end, resize = 0;
	bool shrink = false;
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
		else if (!strcmp(argv[i], "--resize") && i + 1 < argc)
			resize = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--shrink"))
			shrink = true;
		else if (!strcmp(argv[i], "--write-through"))
			wo.write_through = true;
		else
			usage();
	}
	if (argc - i != 2)
		usage();
	if (getenv("QS_DEBUG"))
		qs_log_set_level(QS_LOG_DEBUG);
	r = file_io_open(argv[i], O_RDWR, &io);
	if (r) {
		fprintf(stderr, "%s: %s\n", argv[i], strerror(-r));
		return 1;
	}
	c.meta_fd = file_io_fd(&io);
	r = image_open_io(&file_io_opener, &io, NULL, &img);
	if (r) {
		fprintf(stderr, "%s: cannot open: %s\n", argv[i], strerror(-r));
		return 1;
	}
	c.data_fd = c.meta_fd;
	if (img->has_data_file) {
		c.data_fd = open(img->data_io.name, O_RDWR | O_CLOEXEC);
		c.data_separate = true;
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
	file_rw_ops(&c, &ops);
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
	if (resize) {
		r = qcow2_rw_resize(w, resize, shrink);
		if (r) {
			fprintf(stderr, "resize to %" PRIu64 ": %s\n", resize, strerror(-r));
			qcow2_rw_close(w, NULL);
			return r == -ENOTEMPTY || r == -EINVAL || r == -ENOTSUP ? 3 : 1;
		}
		if (ftruncate(ref_fd, (off_t)resize) < 0) {
			fprintf(stderr, "%s: %s\n", argv[i + 1], strerror(errno));
			return 1;
		}
	}
	vsize = img->size;
	max_write = MIN(max_write, vsize);
	buf = malloc(max_write ? max_write : 1);
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
		r = fd_pwrite_all(ref_fd, buf, len, off);
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
	image_free(img, &file_io_opener);
	file_io_free(&io);
	free(buf);
	free(unflushed);
	return 0;
}
