/* Refcount consistency check of a qcow2 image, as `qemu-img check` does it
 * (QEMU block/qcow2-refcount.c, qcow2_check_refcounts): the reference count
 * every host cluster should have is recomputed from all the image's metadata
 * and compared with the refcounts on disk. Reads through the image's read
 * callbacks only; writes nothing (no repair). */
#ifndef QS_CHECK_H
#define QS_CHECK_H

#include <stdint.h>

#include "image.h"

/* The check keeps one in-memory reference count per cluster of the file:
 * 2 bytes each (refcount_bits <= 16) or 4 bytes (32 and 64 bits; counts
 * saturate at 2^32-1 instead of 2^64-1). Larger files fail with -EFBIG. */
#define QCOW2_CHECK_MAX_CLUSTERS (1ULL << 28)

/* The counters of qemu-img check (BdrvCheckResult and BlockFragInfo). */
struct qcow2_check_result {
	/* clusters referenced more often than their refcount says, entries
	 * with reserved bits, misaligned tables or clusters, references past
	 * the end of the file, refcount overflows, OFLAG_COPIED errors */
	uint64_t corruptions;
	uint64_t leaks;			/* clusters with a refcount above their references */
	uint64_t check_errors;		/* refcounts that could not be read */
	uint64_t image_end_offset;	/* end of the last cluster in use or referenced */
	uint64_t total_clusters;	/* guest clusters: virtual size / cluster size */
	uint64_t allocated_clusters;	/* active L2 entries with a host cluster */
	uint64_t fragmented_clusters;	/* of them, not contiguous with their predecessor */
	uint64_t compressed_clusters;
};

/* Check one qcow2 layer; img->backing is not looked at, snapshot selection
 * (img->l1) neither: the active L1 table and every snapshot's are read from
 * the file. Each finding is logged at QS_LOG_NORMAL in qemu-img's words
 * ("Leaked cluster 5 refcount=1 reference=0", "ERROR cluster 7 refcount=1
 * reference=2", "ERROR OFLAG_COPIED data cluster: ...").
 *
 * Returns 0 when the check ran to its end (*res says what it found), or
 *   -ENOTSUP  the image is not qcow2 (qcow v1 and raw have no refcounts),
 *   -EFBIG    the file has more than QCOW2_CHECK_MAX_CLUSTERS clusters,
 *   -ENOMEM, or the error of a failed read (res->check_errors counts it). */
int qcow2_check(const struct image *img, struct qcow2_check_result *res);

#endif
