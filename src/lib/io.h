/* How the engine reads files without touching a descriptor: the caller hands
 * it read callbacks (the command wraps pread(2); tests and the fuzzer wrap
 * memory buffers). */
#ifndef QS_IO_H
#define QS_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct img_io {
	/* Read exactly len bytes at off. Returns 0, -EIO on a short read
	 * (past the end of the file), or another -errno. */
	int (*pread)(void *opaque, void *buf, size_t len, uint64_t off);
	/* Optional: what SEEK_DATA/SEEK_HOLE tell of the file at off.
	 * Sets *is_data and *len (> 0, bytes from off with that status).
	 * Returns 0, -ENXIO at or beyond the end of the file, or -errno;
	 * NULL means "everything is data". */
	int (*extent)(void *opaque, uint64_t off, uint64_t *len, bool *is_data);
	void *opaque;
	uint64_t size;		/* file size in bytes */
	uint64_t allocated;	/* bytes allocated on disk (st_blocks), 0 = unknown */
	const char *name;	/* path, for messages */
};

/* What a file is to the chain being opened. */
enum img_file_role {
	IMG_FILE_TOP = 0,	/* the image the caller named */
	IMG_FILE_BACKING,	/* a backing file */
	IMG_FILE_DATA,		/* an external data file */
};

struct image;

/* One file the engine wants opened. */
struct img_open_req {
	const char *path;		/* open this (resolved against the naming image's folder) */
	const char *name;		/* as the naming image stores it; NULL: given by the caller
					 * (the top image, or an override of a name) */
	enum img_file_role role;
	const struct image *by;		/* the image that names it (NULL for the top) */
	const struct image *top;	/* the top of the chain (NULL while opening it) */
};

/* Opening the image and the files it names. The opener decides what a name
 * inside an image may lead to (lib/fileio.c: the trust rules of
 * qcowsetup(8) SECURITY) and logs one line naming the file and the reason
 * when it refuses or fails; the engine adds nothing to it. */
struct img_opener {
	/* Open req->path and fill *io. Returns 0 or -errno (-EACCES: refused
	 * by the trust rules). */
	int (*open)(void *opaque, const struct img_open_req *req, struct img_io *io);
	void (*close)(void *opaque, struct img_io *io);
	void *opaque;
};

static inline int img_pread(const struct img_io *io, void *buf, size_t len, uint64_t off)
{
	return io->pread(io->opaque, buf, len, off);
}

/* img_io over a memory buffer (tests, fuzzer, embedded headers) */
struct mem_io {
	const uint8_t *data;
	size_t size;
};
void mem_io_init(struct img_io *io, struct mem_io *mem, const void *data, size_t size, const char *name);

#endif
