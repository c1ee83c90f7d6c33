/* Loop devices over image files.
 *
 * loop_attach() binds a free loop device to an open file descriptor (the one
 * carrying the image's QEMU locks: the loop device keeps that very open file
 * description, so the locks live as long as the binding) with LOOP_CONFIGURE
 * (Linux >= 5.8) in one step, else LOOP_SET_FD + LOOP_SET_STATUS64 +
 * LOOP_SET_DIRECT_IO. Block size 512. The /dev/loopN node is created with
 * mknod when missing (no devtmpfs, no udev).
 *
 * Direct I/O: asked for, the kernel uses it when the filesystem of the file
 * supports O_DIRECT at 512-byte granularity; otherwise the device silently
 * works buffered. loop_dev.direct_io reports what the kernel actually uses.
 * Seen in the test VM (Linux 6.1): ext4 and 9p (cache=none) direct, tmpfs
 * buffered. The kernel issues direct I/O per request: the O_DIRECT flag of
 * the caller's (shared) file description is left alone.
 */
#ifndef QS_LOOP_H
#define QS_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define LOOP_PATH_MAX	32	/* "/dev/loop1048575" */
#define LOOP_DEV_MAJOR	7	/* <linux/major.h> LOOP_MAJOR */

struct loop_dev {
	char path[LOOP_PATH_MAX];	/* "/dev/loop3" */
	uint32_t major, minor;
	/* Open on the loop device (read-only when the binding is); the
	 * caller closes it. With autoclear the binding goes away on the last
	 * close: keep it open until a device-mapper table holds the loop
	 * device, then close it; the loop is then detached (and the image's
	 * locks dropped) when the dm device is removed. */
	int fd;
	bool read_only;		/* as the kernel set it */
	bool direct_io;		/* what the kernel uses (see above) */
	bool autoclear;
};

struct loop_dev_info {
	char path[LOOP_PATH_MAX];
	uint32_t major, minor;
	uint64_t backing_dev;		/* dev_t of the backing file (makedev) */
	uint64_t backing_ino;
	uint64_t offset;
	uint64_t sizelimit;
	bool read_only, autoclear, direct_io, partscan;
	char backing_file[4096];	/* from sysfs; may be stale after a rename */
};

/* Bind a free loop device to fd (its own open file description, not a
 * reopened one). The kernel also makes the device read-only when fd is not
 * open for writing. On success dev->fd is open: close it when done (see
 * struct loop_dev). Returns 0, or with a message logged:
 *   -ENODEV  no loop support (no /dev/loop-control, module loop missing),
 *   -EACCES / -EPERM  not root,
 *   -EBUSY   no free device after several tries (racing attachers),
 *   -EBADF   fd is not open,
 *   -errno   anything else from the kernel. */
int loop_attach(int fd, bool read_only, bool direct_io, bool autoclear, struct loop_dev *dev);

/* Stop the device from passing discards to the file (which would punch
 * holes): device-mapper then offers no discard on tables over it. Read-write
 * mappings without --allow-discards. 0 or -errno. */
int loop_disable_discard(const struct loop_dev *dev);

/* The loop device open on fd takes the size its file has now (it grew).
 * 0 or -errno. */
int loop_set_capacity(int fd);

/* Unbind the loop device (path "/dev/loopN"). While something (a dm table)
 * still has it open, the kernel only turns autoclear on and the binding goes
 * with the last close. 0, -ENXIO (not bound) or -errno. */
int loop_detach(const char *path);

/* The state of one loop device. 0, -ENXIO (not bound) or -errno. */
int loop_get_info(const char *path, struct loop_dev_info *info);

/* The file the loop device open on fd is bound to (device and inode, as
 * fstat gives them). 0, -ENXIO (not bound) or -errno. */
int loop_backing_file(int fd, dev_t *dev, ino_t *ino);

/* The loop devices bound to the file st_dev/st_ino (from fstat): returns how
 * many there are (0: none), the first (lowest number) in *first when not
 * NULL; or -errno. */
int loop_find_by_file(dev_t st_dev, ino_t st_ino, struct loop_dev_info *first);

/* Tests only: never use LOOP_CONFIGURE (exercise the old-kernel path). */
void loop_test_legacy_ioctls(bool legacy);

#endif
