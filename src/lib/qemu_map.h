/* `qemu-img map` semantics on top of the chain walk: the same records, merged
 * the same way, so `qcowsetup map` can be compared with QEMU's record for
 * record. */
#ifndef QS_QEMU_MAP_H
#define QS_QEMU_MAP_H

#include <stdbool.h>
#include <stdint.h>

#include "image.h"

struct qmap_entry {
	uint64_t start;
	uint64_t length;
	unsigned int depth;
	bool present;
	bool zero;
	bool data;
	bool has_offset;	/* QEMU prints "offset" */
	uint64_t offset;
	const char *filename;	/* file holding the data when has_offset */
	/* additions of ours (QEMU 7.2 omits them) */
	bool compressed;
	bool has_host;		/* host offset known and contiguous for the whole record */
	uint64_t host;
};

typedef int (*qmap_emit_fn)(const struct qmap_entry *e, void *opaque);

/* Calls fn for every merged record, in guest order. */
int qemu_map(struct image *top, qmap_emit_fn fn, void *opaque);

#endif
