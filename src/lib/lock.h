/* QEMU-compatible image locks.
 *
 * QEMU (block/file-posix.c, raw_apply_lock_bytes/raw_check_lock_bytes) holds a
 * one-byte open file description (OFD) read lock at offset 100+bit for every
 * permission it uses and at 200+bit for every permission it does not share
 * with others. Bits (QEMU >= 6.2, BLK_PERM_ALL = 0x0f): 0 consistent read,
 * 1 write, 2 write unchanged, 3 resize (QEMU <= 6.1 also had 4, graph-mod,
 * which nobody tests for). Before that it tests, with F_OFD_GETLK of a write
 * lock, byte 200+bit for every permission it uses and 100+bit for every
 * permission it does not share.
 *
 * Measured with QEMU 7.2 on a qcow2 image (/proc/locks):
 *   read-only (qemu-io -r, qemu-nbd -r):  100, 201, 203
 *   read-write (qemu-io, qemu-nbd):       100, 101, 103, 201, 203
 * (a raw image opened by QEMU shares everything: 100 / 100, 101). qcowsetup
 * takes the same bytes as QEMU for the same mode, so QEMU refuses to write an
 * image that is mapped, and qcowsetup refuses an image QEMU has open for
 * writing (read-write mapping: also one QEMU has open at all).
 *
 * OFD locks belong to the open file description: take them on the descriptor
 * handed to the loop device and they live exactly as long as the loop device
 * holds the file, whatever happens to the process. Closing the last
 * descriptor of the description (or the loop device releasing it) drops them.
 */
#ifndef QS_LOCK_H
#define QS_LOCK_H

#include <stdbool.h>

#define LOCK_PERM_BASE		100	/* + bit: a permission in use */
#define LOCK_SHARED_BASE	200	/* + bit: a permission not shared */

enum lock_perm {
	LOCK_PERM_CONSISTENT_READ	= 1 << 0,
	LOCK_PERM_WRITE			= 1 << 1,
	LOCK_PERM_WRITE_UNCHANGED	= 1 << 2,
	LOCK_PERM_RESIZE		= 1 << 3,
};
#define LOCK_PERM_ALL		0x0f
#define LOCK_PERM_BITS		4

/* Lock the image open on fd as QEMU would for the same mode: read-only
 * uses consistent read and shares consistent read and write unchanged
 * (100, 201, 203); write also uses write and resize (100, 101, 103, 201,
 * 203). The locks are applied, then conflicts are tested (QEMU's order, so
 * two racing openers cannot both win). path is only for messages.
 * Meant for a freshly opened descriptor: on failure every lock byte of its
 * description is released. Returns 0, or with a message logged (naming the
 * processes holding the conflicting byte, found in /proc/PID/fdinfo):
 *   -EBUSY   another open file description (QEMU, qemu-nbd, another
 *            mapping) holds a conflicting lock; nothing is left locked,
 *   -ENOLCK / -EINVAL / -EOPNOTSUPP  the filesystem or kernel has no OFD
 *            locks (QEMU falls back to POSIX locks there; not done here),
 *   -EBADF. */
int lock_image(int fd, bool write, const char *path);

/* Lock fd, a new descriptor of an image that one mapping of ours holds
 * read-only (its loop device's description: 100, 201, 203), for writing
 * (100, 101, 103, 201, 203), as QEMU upgrades a backing file it commits
 * into: applied, then tested; the bytes that mapping does not share (201,
 * 203) count as a conflict only when a third description holds them too
 * (/proc/locks). The mapping's own description then goes with its loop
 * device. 0, or as lock_image (-EBUSY with the holders named). */
int lock_image_upgrade(int fd, const char *path);

/* lock_image without the test for conflicts: for a file the caller holds
 * itself in another mode through another description that is about to go
 * (snapshot: the image a mapping wrote becomes its read-only backing while
 * the old read-write loop device still holds it). 0 or -errno. */
int lock_image_unchecked(int fd, bool write, const char *path);

/* Drop every lock byte (100..103, 200..203) of the description of fd.
 * 0 or -errno. */
int lock_image_release(int fd);

/* What other open file descriptions hold on the file of fd (never those of
 * fd itself): *used gets the LOCK_PERM_* bits someone uses (bytes 100+bit),
 * *unshared the bits someone does not share (200+bit). Either may be NULL.
 * 0 or -errno. */
int lock_image_query(int fd, unsigned int *used, unsigned int *unshared);

/* Whether the image at path may be replaced: nobody (QEMU, a mapping) has
 * it open in a way a read-write QEMU would conflict with (lock_image's
 * test for a writer, on a descriptor of its own, closed again). 0 also when
 * path does not exist; -EBUSY with a message, or -errno. */
int lock_image_replaceable(const char *path);

#endif
