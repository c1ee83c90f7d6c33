/* Runs: the merged result of an L1/L2 walk. Memory is O(runs). */
#ifndef QS_RUNS_H
#define QS_RUNS_H

#include <stddef.h>
#include <stdint.h>

enum run_kind {
	RUN_UNALLOC = 0,	/* not allocated in this layer (look below, or zero) */
	RUN_ZERO,		/* reads as zeros (zero flag / bitmap) */
	RUN_DATA,		/* plain cluster data at host in the layer's data file */
	RUN_COMPRESSED,		/* one compressed cluster: host = byte offset, clen = bytes */
};

#define RUN_F_HOST	0x1	/* RUN_ZERO or RUN_UNALLOC with an allocated host cluster (host valid) */
#define RUN_F_PAST_BACKING	0x2	/* beyond the end of the backing image */
#define RUN_F_WRITABLE	0x80	/* of the top layer: writes may go there in place
				 * (qcow2_rw_mark_writable; dmtable maps it to the file) */

struct run {
	uint64_t guest;		/* offset in guest space */
	uint64_t len;		/* bytes */
	uint64_t host;		/* RUN_DATA / ZERO_ALLOC / COMPRESSED: host offset */
	uint32_t clen;		/* RUN_COMPRESSED: compressed bytes (upper bound) */
	uint8_t kind;		/* enum run_kind */
	uint8_t depth;		/* layer of the chain providing it, 0 = top */
	uint8_t flags;
};

struct run_list {
	struct run *runs;
	size_t count;
	size_t alloc;
};

void run_list_init(struct run_list *l);
void run_list_free(struct run_list *l);
/* Append a run, merging it into the last one when they are contiguous in
 * guest space, of the same kind, depth and flags, and (for data) contiguous
 * on the host. Compressed runs never merge. Returns 0 or -ENOMEM. */
int run_list_add(struct run_list *l, const struct run *r);
const char *run_kind_name(enum run_kind kind);

#endif
