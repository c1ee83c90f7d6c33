/* Files for the engine (see fileio.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "sysutil.h"
#include "trust.h"
#include "util.h"

struct file_ctx {
	int fd;
	bool owns_fd;
	char *path;
};

static int file_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	return fd_pread_all(((struct file_ctx *)opaque)->fd, buf, len, off);
}

static int file_extent(void *opaque, uint64_t off, uint64_t *len, bool *is_data)
{
	return fd_extent(((struct file_ctx *)opaque)->fd, off, len, is_data);
}

int file_io_from_fd(int fd, const char *path, struct img_io *io)
{
	struct file_ctx *f;
	struct stat st;
	int r;

	memset(io, 0, sizeof(*io));
	if (fstat(fd, &st) < 0)
		return -errno;
	r = fd_size(fd, &io->size);
	if (r)
		return r;
	if (S_ISREG(st.st_mode)) {
		io->allocated = (uint64_t)st.st_blocks * 512;
		io->extent = file_extent;
	}
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->fd = fd;
	f->path = strdup(path);
	if (!f->path) {
		free(f);
		return -ENOMEM;
	}
	io->pread = file_pread;
	io->opaque = f;
	io->name = f->path;
	return 0;
}

int file_io_open(const char *path, int flags, struct img_io *io)
{
	int fd, r;

	fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	r = file_io_from_fd(fd, path, io);
	if (r < 0) {
		close(fd);
		return r;
	}
	((struct file_ctx *)io->opaque)->owns_fd = true;
	return 0;
}

int file_io_fd(const struct img_io *io)
{
	return io->opaque && io->pread == file_pread ? ((const struct file_ctx *)io->opaque)->fd : -1;
}

int file_io_real_path(const struct img_io *io, char *buf, size_t size)
{
	int fd = file_io_fd(io);

	return fd < 0 ? -EBADF : fd_real_path(fd, buf, size);
}

void file_io_free(struct img_io *io)
{
	struct file_ctx *f = io->opaque;

	if (!f)
		return;
	if (f->owns_fd)
		close(f->fd);
	free(f->path);
	free(f);
	io->opaque = NULL;
}

static int opener_open(void *opaque, const struct img_open_req *req, struct img_io *io)
{
	static const struct file_opener defaults;
	const struct file_opener *fo = opaque ? opaque : &defaults;
	bool write = fo->write && (req->role == IMG_FILE_TOP ||
				   (req->role == IMG_FILE_DATA && req->by && req->by->depth == 0));
	unsigned int depth = !req->by ? 0 : req->by->depth + (req->role == IMG_FILE_BACKING);
	int fd = -1, r;

	for (unsigned int i = 0; i < fo->ngiven && fd < 0; i++)
		if (fo->given[i].fd >= 0 && fo->given[i].depth == depth &&
		    fo->given[i].data == (req->role == IMG_FILE_DATA)) {
			fd = fo->given[i].fd;
			fo->given[i].fd = -1;
		}
	if (fd < 0)
		fd = trust_open(&fo->rules, req, write ? O_RDWR : O_RDONLY);
	if (fd < 0)
		return fd;
	r = file_io_from_fd(fd, req->path, io);
	if (r < 0) {
		close(fd);
		return r;
	}
	((struct file_ctx *)io->opaque)->owns_fd = true;
	return 0;
}

static void opener_close(void *opaque, struct img_io *io)
{
	(void)opaque;
	file_io_free(io);
}

const struct img_opener file_io_opener = {
	.open = opener_open,
	.close = opener_close,
};

void file_opener_init(struct file_opener *fo, bool write, const struct trust_rules *rules)
{
	memset(fo, 0, sizeof(*fo));
	fo->write = write;
	if (rules)
		fo->rules = *rules;
	fo->ops = file_io_opener;
	fo->ops.opaque = fo;
}

/* ---- the writer's callbacks ---- */

static int rw_meta_pwrite(void *opaque, const void *buf, size_t len, uint64_t off)
{
	return fd_pwrite_all(((struct file_rw *)opaque)->meta_fd, buf, len, off);
}

static int rw_meta_flush(void *opaque)
{
	return fdatasync(((struct file_rw *)opaque)->meta_fd) ? -errno : 0;
}

/* The data descriptor and its direct twin (none unless data_direct) */
static struct dio_file rw_data_file(const struct file_rw *f)
{
	return (struct dio_file){ .fd = f->data_fd, .dfd = f->data_direct ? f->data_dfd : -1 };
}

static int rw_data_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct dio_file df = rw_data_file(opaque);

	return dio_pread_padded(&df, buf, len, off);
}

static int rw_data_pwrite(void *opaque, const void *buf, size_t len, uint64_t off)
{
	struct dio_file df = rw_data_file(opaque);

	return dio_pwrite_all(&df, buf, len, off);
}

static int rw_data_flush(void *opaque)
{
	return fdatasync(((struct file_rw *)opaque)->data_fd) ? -errno : 0;
}

/* Make [off, off + len) read zeros without writing them and without
 * giving up a block: what the file holds there becomes unwritten extents
 * (FALLOC_FL_ZERO_RANGE), holes stay holes (nothing reserved that a write
 * would not take anyway). Never a punched hole: a preallocated file, or one
 * on a full file system, would need its blocks back for the next write. A
 * block device (all data to lseek) zeroes the range keeping it provisioned. */
static int rw_data_zero(void *opaque, uint64_t len, uint64_t off)
{
	int fd = ((struct file_rw *)opaque)->data_fd;
	uint64_t end = off + len;

	while (off < end) {
		uint64_t n;
		bool is_data;
		int r = fd_extent(fd, off, &n, &is_data);

		if (r == -ENXIO)
			return 0;	/* holes up to the end of the file */
		if (r)
			is_data = true, n = end - off;	/* no SEEK_DATA: all of it */
		n = MIN(n, end - off);
		if (is_data && fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)n) < 0)
			return errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL ? -EOPNOTSUPP : -errno;
		off += n;
	}
	return 0;
}

static int rw_data_extent(void *opaque, uint64_t host, uint64_t *len, bool *is_data)
{
	return fd_extent(((struct file_rw *)opaque)->data_fd, host, len, is_data);
}

static void rw_kick(void *opaque)
{
	struct file_rw *f = opaque;

	f->kick(f->mapped_opaque);
}

static int rw_backing_pread(void *opaque, void *buf, size_t len, uint64_t guest)
{
	return chain_read(((struct file_rw *)opaque)->chain, buf, len, guest);
}

static int rw_backing_pread_direct(void *opaque, void *buf, size_t len, uint64_t guest)
{
	return chain_read_direct(((struct file_rw *)opaque)->chain, buf, len, guest);
}

static bool rw_backing_zero(void *opaque, uint64_t guest, uint64_t len)
{
	return chain_is_zero(((struct file_rw *)opaque)->chain, guest, len);
}

static void rw_mapped(void *opaque, uint64_t guest, uint64_t len, uint64_t host)
{
	struct file_rw *f = opaque;

	f->mapped(f->mapped_opaque, guest, len, host);
}

void file_rw_ops(struct file_rw *f, struct qcow2_rw_ops *ops)
{
	*ops = (struct qcow2_rw_ops){
		.meta_pwrite = rw_meta_pwrite,
		.meta_flush = rw_meta_flush,
		.data_pread = rw_data_pread,
		.data_pwrite = rw_data_pwrite,
		.data_flush = f->data_separate ? rw_data_flush : NULL,
		.backing_pread = f->chain ? rw_backing_pread : NULL,
		.backing_pread_direct = f->chain ? rw_backing_pread_direct : NULL,
		.backing_zero = f->chain ? rw_backing_zero : NULL,
		.mapped = f->mapped ? rw_mapped : NULL,
		/* the image itself: holes; the crypt device or a data file: zeros written */
		.data_zero = f->data_separate ? NULL : rw_data_zero,
		.data_extent = f->data_separate ? NULL : rw_data_extent,
		.kick = f->kick ? rw_kick : NULL,
		.opaque = f,
	};
}
