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

struct file_ctx {
	int fd;
	char *path;
};

static int file_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct file_ctx *f = opaque;
	uint8_t *p = buf;

	while (len) {
		ssize_t n = pread(f->fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int file_extent(void *opaque, uint64_t off, uint64_t *len, bool *is_data)
{
	struct file_ctx *f = opaque;
	off_t data, hole;

	data = lseek(f->fd, (off_t)off, SEEK_DATA);
	if (data < 0)
		return errno == ENXIO ? -ENXIO : -errno;
	if ((uint64_t)data > off) {
		*is_data = false;
		*len = (uint64_t)data - off;
		return 0;
	}
	hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
	if (hole < 0)
		return -errno;
	*is_data = true;
	*len = (uint64_t)hole - off;
	return *len ? 0 : -ENXIO;
}

static int file_open(void *opaque, const char *path, struct img_io *io)
{
	struct file_ctx *f;
	struct stat st;
	int r;

	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (f->fd < 0) {
		r = -errno;
		free(f);
		return r;
	}
	if (fstat(f->fd, &st) < 0) {
		r = -errno;
		goto fail;
	}
	memset(io, 0, sizeof(*io));
	if (S_ISBLK(st.st_mode)) {
		uint64_t sz;

		if (ioctl(f->fd, BLKGETSIZE64, &sz) < 0) {
			r = -errno;
			goto fail;
		}
		io->size = sz;
	} else if (S_ISREG(st.st_mode)) {
		io->size = (uint64_t)st.st_size;
		io->allocated = (uint64_t)st.st_blocks * 512;
		io->extent = file_extent;
	} else {
		r = -ENODEV;
		goto fail;
	}
	f->path = strdup(path);
	if (!f->path) {
		r = -ENOMEM;
		goto fail;
	}
	io->pread = file_pread;
	io->opaque = f;
	io->name = f->path;
	return 0;
fail:
	close(f->fd);
	free(f);
	return r;
}

static void file_close(void *opaque, struct img_io *io)
{
	struct file_ctx *f = io->opaque;

	if (!f)
		return;
	close(f->fd);
	free(f->path);
	free(f);
	io->opaque = NULL;
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
