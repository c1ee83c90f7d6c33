#include <stdlib.h>
#include <string.h>

#include "qcow2-builder.h"
#include "util.h"

#define RT 1
#define RB 2
#define L1 3

static void grow(struct qb *b, size_t need)
{
	if (need <= b->alloc)
		return;
	b->buf = realloc(b->buf, need);
	memset(b->buf + b->alloc, 0, need - b->alloc);
	b->alloc = need;
}

void qb_put64(struct qb *b, uint64_t off, uint64_t v)
{
	put_be64(b->buf + off, v);
}

void qb_put32(struct qb *b, uint64_t off, uint32_t v)
{
	put_be32(b->buf + off, v);
}

void qb_set_refcount(struct qb *b, uint64_t offset, uint16_t rc)
{
	put_be16(b->buf + RB * b->cs + (offset >> b->cluster_bits) * 2, rc);
}

uint64_t qb_alloc_cluster(struct qb *b)
{
	uint64_t off = b->size;

	grow(b, b->size + b->cs);
	b->size += b->cs;
	qb_set_refcount(b, off, 1);
	return off;
}

void qb_init(struct qb *b, unsigned int cluster_bits, uint64_t guest_size, int extended_l2)
{
	memset(b, 0, sizeof(*b));
	b->cluster_bits = cluster_bits;
	b->cs = 1ULL << cluster_bits;
	b->guest_size = guest_size;
	b->extended_l2 = extended_l2;
	grow(b, 4 * b->cs);
	for (int i = 0; i < 4; i++)
		qb_alloc_cluster(b);
	{
		uint64_t per_l1 = (b->cs / (extended_l2 ? 16 : 8)) * b->cs;
		uint32_t l1_size = (uint32_t)((guest_size + per_l1 - 1) / per_l1);
		uint8_t *h = b->buf;

		put_be32(h, 0x514649fb);
		put_be32(h + 4, 3);
		put_be32(h + 20, cluster_bits);
		put_be64(h + 24, guest_size);
		put_be32(h + 36, l1_size);
		put_be64(h + 40, L1 * b->cs);
		put_be64(h + 48, RT * b->cs);
		put_be32(h + 56, 1);
		put_be64(h + 72, extended_l2 ? 1ULL << 4 : 0);
		put_be32(h + 96, 4);
		put_be32(h + 100, 104);
		put_be64(b->buf + RT * b->cs, RB * b->cs);
	}
}

void qb_free(struct qb *b)
{
	free(b->buf);
	memset(b, 0, sizeof(*b));
}

uint64_t qb_get_l2_table(struct qb *b, uint64_t g)
{
	uint64_t per_l1 = (b->cs / (b->extended_l2 ? 16 : 8)) * b->cs;
	uint64_t idx = g / per_l1, l1e = get_be64(b->buf + L1 * b->cs + idx * 8);

	if (!(l1e & 0x00fffffffffffe00ULL)) {
		uint64_t l2 = qb_alloc_cluster(b);

		put_be64(b->buf + L1 * b->cs + idx * 8, l2 | (1ULL << 63));
		return l2;
	}
	return l1e & 0x00fffffffffffe00ULL;
}

void qb_set_l2(struct qb *b, uint64_t g, uint64_t entry, uint64_t bitmap)
{
	uint64_t esz = b->extended_l2 ? 16 : 8, per_l2 = b->cs / esz;
	uint64_t l2 = qb_get_l2_table(b, g), j = (g >> b->cluster_bits) % per_l2;

	put_be64(b->buf + l2 + j * esz, entry);
	if (b->extended_l2)
		put_be64(b->buf + l2 + j * esz + 8, bitmap);
}
