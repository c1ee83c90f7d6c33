/* Builds small qcow2 v3 images in memory for unit tests: header in cluster 0,
 * refcount table in 1, refcount block in 2, L1 in 3, then L2 tables and data
 * clusters as the test allocates them. Refcounts are kept consistent. */
#ifndef QS_QCOW2_BUILDER_H
#define QS_QCOW2_BUILDER_H

#include <stddef.h>
#include <stdint.h>

struct qb {
	uint8_t *buf;
	size_t size;		/* bytes used (file size) */
	size_t alloc;
	unsigned int cluster_bits;
	uint64_t cs;
	uint64_t guest_size;
	int extended_l2;
};

void qb_init(struct qb *b, unsigned int cluster_bits, uint64_t guest_size, int extended_l2);
void qb_free(struct qb *b);
uint64_t qb_alloc_cluster(struct qb *b);	/* zeroed, refcount 1; returns offset */
void qb_set_refcount(struct qb *b, uint64_t offset, uint16_t rc);
/* Set the L2 entry (and bitmap for extended L2) of guest offset g, allocating the L2 table. */
void qb_set_l2(struct qb *b, uint64_t g, uint64_t entry, uint64_t bitmap);
uint64_t qb_get_l2_table(struct qb *b, uint64_t g);	/* offset of the L2 table covering g */
void qb_put64(struct qb *b, uint64_t off, uint64_t v);
void qb_put32(struct qb *b, uint64_t off, uint32_t v);

#endif
