/* img_io over files: the only place the engine's reads meet descriptors. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>

#include "log.h"
#include "qcowsetup.h"
#include "sysutil.h"

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

int tools_fd_io(int fd, const char *path, struct img_io *io)
{
	struct file_ctx *f;
	struct stat st;
	uint64_t sz;

	memset(io, 0, sizeof(*io));
	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &sz) < 0)
			return -errno;
		io->size = sz;
	} else if (S_ISREG(st.st_mode)) {
		io->size = (uint64_t)st.st_size;
		io->allocated = (uint64_t)st.st_blocks * 512;
		io->extent = file_extent;
	} else {
		return -ENODEV;
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

void tools_fd_io_free(struct img_io *io)
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

static int file_open(void *opaque, const char *path, struct img_io *io)
{
	int fd, r;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	r = tools_fd_io(fd, path, io);
	if (r < 0) {
		close(fd);
		return r;
	}
	((struct file_ctx *)io->opaque)->owns_fd = true;
	return 0;
}

static void file_close(void *opaque, struct img_io *io)
{
	tools_fd_io_free(io);
}

const struct img_opener file_opener = {
	.open = file_open,
	.close = file_close,
};

int tools_open_image(const char *path, bool no_backing, struct image **img)
{
	struct image_open_opts o = {
		.format = opt.format,
		.no_backing = no_backing,
		.snapshot = opt.snapshot,
	};

	return image_open(&file_opener, path, &o, img);
}

void tools_close_image(struct image *img)
{
	image_free(img, &file_opener);
}
