/* Files for the engine: img_io over descriptors (the only place the
 * parser's reads meet the operating system), and the metadata writer's
 * callbacks over the image file, its data and its backing chain. Used by
 * the command line, the daemon and the image tests. */
#ifndef QS_FILEIO_H
#define QS_FILEIO_H

#include <stdbool.h>
#include <stdint.h>

#include "chain.h"
#include "image.h"
#include "qcow2_rw.h"
#include "trust.h"

/* img_io over fd (a regular file, or a block device), named path for
 * messages: exact reads (a short read is -EIO), extents from
 * SEEK_DATA/SEEK_HOLE for files. fd stays the caller's. 0, -ENODEV (neither
 * a file nor a block device), -ENOMEM or -errno. */
int file_io_from_fd(int fd, const char *path, struct img_io *io);
/* The same over path opened with flags (O_CLOEXEC added); io owns the
 * descriptor. */
int file_io_open(const char *path, int flags, struct img_io *io);
/* The descriptor under io (-1: io is not over a descriptor). */
int file_io_fd(const struct img_io *io);
/* The path of the file under io as the kernel knows it (/proc/self/fd):
 * the file that was opened, whatever its name is now. 0 or -errno. */
int file_io_real_path(const struct img_io *io, char *buf, size_t size);
void file_io_free(struct img_io *io);

/* image_open's opener over files, under the trust rules (trust.h): every
 * file read-only, no name trusted beyond the rules. */
extern const struct img_opener file_io_opener;

/* A file of the chain already open: the process that checked it passed it
 * on (the daemon from `qcowsetup open`). */
struct file_given {
	unsigned int depth;	/* the layer: 0 the top */
	bool data;		/* its external data file, else the image file */
	int fd;			/* -1 once taken */
};

/* The same with settings: write opens the top image and its external data
 * file read-write (the backing chain stays read-only). A file among given
 * gets that descriptor (taken: the opener owns it) instead of being opened
 * by its name again. Pass &fo->ops. */
struct file_opener {
	struct img_opener ops;
	struct trust_rules rules;
	bool write;
	struct file_given *given;
	unsigned int ngiven;
};
void file_opener_init(struct file_opener *fo, bool write, const struct trust_rules *rules);

/* qcow2_rw_ops over descriptors: metadata to meta_fd (fdatasync), data
 * clusters to data_fd (the image itself, the external data file, or the
 * crypt device over the image; reads past its end are zeros), backing reads
 * from chain. Zeros in the image itself are unwritten extents (data_zero:
 * FALLOC_FL_ZERO_RANGE where the file has blocks, holes left as they are). */
struct file_rw {
	int meta_fd;
	int data_fd;
	int data_dfd;			/* data_fd opened with O_DIRECT (sysutil.h's
					 * dio_file), used when data_direct (a
					 * zeroed struct has none) */
	bool data_direct;
	bool data_separate;		/* data_fd needs a flush of its own */
	struct chain_reader *chain;	/* NULL: no backing file */
	void (*mapped)(void *opaque, uint64_t guest, uint64_t len, uint64_t host);
	void (*kick)(void *opaque);	/* qcow2_rw_ops.kick, with mapped_opaque; may be NULL */
	void *mapped_opaque;
};
void file_rw_ops(struct file_rw *f, struct qcow2_rw_ops *ops);

#endif
