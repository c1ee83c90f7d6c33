/* Small system helpers the wrappers share: whole reads and writes that
 * retry on EINTR and short counts, SEEK_DATA/SEEK_HOLE, modprobe. */
#ifndef QS_SYSUTIL_H
#define QS_SYSUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* 0, -EIO on end of file, or -errno */
int fd_pread_all(int fd, void *buf, size_t len, uint64_t off);
int fd_write_all(int fd, const void *buf, size_t len);
/* Reads that may meet the end of a file or device: zeros past it. 0 or -errno */
int fd_pread_padded(int fd, void *buf, size_t len, uint64_t off);
/* 0, -ENOSPC when nothing more can be written, -EFBIG, or -errno */
int fd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
/* A file open twice: buffered (fd) and with O_DIRECT (dfd; -1: none).
 * Large aligned requests (offset, length and buffer multiples of
 * DIO_ALIGN, DIO_MIN bytes at least: a cluster to copy) go to dfd, past the
 * page cache (no page to allocate, zero and copy); the rest, and what dfd
 * refuses (EINVAL) or leaves short (the end of a file), to fd: a small
 * request costs less as a copy into the page cache than as a device round
 * trip, and the kernel's writeback batches them. The kernel keeps the two
 * coherent for requests that do not overlap in time. */
#define DIO_ALIGN	4096U
#define DIO_MIN		(64U << 10)
struct dio_file {
	int fd, dfd;
};
/* dfd for fd: the same file opened again with O_DIRECT (through
 * /proc/self/fd, so the same inode whatever its name now), or -errno. */
int dio_reopen(int fd);
int dio_pread_padded(const struct dio_file *f, void *buf, size_t len, uint64_t off);
int dio_pwrite_all(const struct dio_file *f, const void *buf, size_t len, uint64_t off);
/* img_io's extent(): what SEEK_DATA/SEEK_HOLE say at off */
int fd_extent(int fd, uint64_t off, uint64_t *len, bool *is_data);
/* The size of the regular file or block device open on fd: 0 or -errno
 * (-ENODEV: neither). */
int fd_size(int fd, uint64_t *size);
/* /sbin/modprobe -q MODULE without a shell (posix_spawn: no copy of a big or
 * memory-locked address space). 0 when it succeeded, -ENOENT when not. */
int sys_modprobe(const char *module);

/* The path of the file open on fd, as /proc/self/fd tells (what was
 * opened, whatever its name is now). 0 or -errno. */
int fd_real_path(int fd, char *buf, size_t size);

/* Raise the calling thread's priority (its nice value, this thread only)
 * for a section that holds other processes' I/O, as lvm2 does while its
 * devices are suspended: on one busy CPU the ioctls that end the hold would
 * otherwise wait their turn behind the very work being held. Returns what
 * to give back to sys_thread_nice_restore (INT_MIN: left as it was, e.g.
 * without CAP_SYS_NICE). */
int sys_thread_nice(int nice);
void sys_thread_nice_restore(int old);

/* The start of a small file (sysfs) into buf, NUL-terminated: its length,
 * or -errno (-EIO: empty). */
int sys_read_small(const char *path, char *buf, size_t size);

/* Whether a Unix socket bound at path listens: 1 or 0, from the kernel's
 * socket diagnostics (a netlink dump of the listening Unix sockets with
 * their names), else from /proc/net/unix (a text line per socket of the
 * host); -errno when neither can be read. Nothing connects to it. */
int sys_unix_listening(const char *path);

/* Discards through block device MAJ:MIN on (its queue's discard_max_bytes
 * back to discard_max_hw_bytes) or off (0); device-mapper tables loaded
 * over it afterwards take that. 0, -EOPNOTSUPP (turning on a device without
 * discards), or -errno. */
int sys_block_discard(unsigned int major, unsigned int minor, bool on);

#endif
