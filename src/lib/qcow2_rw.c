/* Guest reads and writes of a read-write mapping's top layer: the qcow2
 * metadata writer (see qcow2_rw.h for the rules it follows).
 *
 * A guest write is handled in chunks of at most PLAN_MAX clusters, each in
 * four steps, so that a failure before the last one leaves nothing but
 * leaks:
 *   1. plan: the L2 entry of every cluster (allocating or copying the L2
 *      tables on the way: an empty or copied table is harmless);
 *   2. allocate the clusters that need one (refcount increments, cached);
 *   3. write the data, with the copy-on-write parts read from the current
 *      content first;
 *   4. update the L2 entries (cached), queue the decrements of the clusters
 *      no longer referenced and the mappings to announce.
 * writeback() then writes the caches in the safe order. A write of a few
 * clusters may run its step 3 outside the caller's lock (an op, see
 * qcow2_rw_write_begin): its clusters are held meanwhile, so that no other
 * write, nor allocation ahead, plans them. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "compress.h"
#include "log.h"
#include "qcow2.h"
#include "qcow2_rw.h"
#include "util.h"

#define L2_BITMAP_ALL_ALLOC	0xffffffffULL
#define PLAN_MAX		512	/* clusters per chunk */
#define DEFERRED_MAX		1024	/* queued decrements before a writeback */
#define MAPS_MAX		4096	/* queued mappings before a writeback */
#define DIRTY_L1_MAX		256
#define BUF_ALIGN		4096
#define AHEAD_FIRST		(1ULL << 20)	/* first window of allocation ahead */
#define AHEAD_FRESH_FIRST	(64ULL << 20)	/* the same from holes (no zeroing) */
#define AHEAD_TRACK		16		/* windows remembered for release_ahead */
#define AHEAD_SPARSE		(2ULL << 20)	/* window around a random write (ahead_sparse) */
#define AHEAD_SPARSE_MAX	4096		/* such windows remembered; then no more */
#define ZERO_BUF_MAX		(256U << 10)
#define OP_PLAN_MAX		32	/* clusters of a write that runs as an op */
#define OP_CLUSTER_MAX		(256U << 10)	/* no ops past this cluster size (its buffer) */


struct slot {
	uint64_t off;		/* host offset of the table or block; 0: empty */
	uint8_t *buf;
	uint64_t used;		/* LRU clock */
	uint32_t dlo, dhi;	/* dirty byte range; dlo == dhi: clean */
};

struct cache {
	struct slot *s;
	unsigned int n;
	uint64_t tick;
	uint8_t *mem;
};

struct extent {
	uint64_t off, len;
};

struct map_extent {
	uint64_t guest, len, host;
};

/* One cluster of a chunk. */
struct plan {
	uint64_t guest;		/* start of the guest cluster */
	uint64_t old_entry, old_bitmap;
	uint64_t host;		/* where the data goes (cluster start) */
	uint64_t new_entry, new_bitmap;
	uint32_t touched;	/* subclusters the write overlaps */
	uint32_t to_write;	/* subclusters written to host */
	uint32_t announce;	/* subclusters newly mapped writable */
	uint32_t ws, we;	/* written bytes inside the cluster */
	uint32_t wlo, whi;	/* range mode: bytes written (512-aligned) */
	bool range;		/* write [wlo, whi) instead of to_write subclusters */
	bool zero_first;	/* a new cluster made to read zeros (data_zero), then range */
	bool alloc;		/* host is a new cluster (refcounted) */
	bool fresh;		/* that cluster was never written: a hole, reads zeros */
	bool update;		/* the L2 entry changes */
	const uint8_t *src;	/* cluster-relative content (the written parts valid) */
};

/* A write whose data moves outside the caller's lock (qcow2_rw.h). */
struct qcow2_rw_op {
	struct qcow2_rw *w;
	struct qcow2_rw_op *next;	/* in w->active */
	const uint8_t *data;
	uint64_t guest, len;
	uint64_t c0, c1;	/* guest clusters held: [c0, c1) */
	size_t n;
	uint8_t *scratch;	/* one cluster: the one part not covered */
	struct plan plan[OP_PLAN_MAX];
};

struct qcow2_rw {
	struct image *img;
	struct qcow2_rw_ops ops;
	struct qcow2_rw_opts opts;
	uint64_t cs;
	unsigned int cb;
	unsigned int l2_bits;
	uint64_t l2_entries;
	unsigned int l2_esz;
	bool extended;
	bool data_file;
	unsigned int nsc;	/* subclusters per cluster (32 or 1) */
	uint64_t scs;		/* subcluster size */
	unsigned int rb_bits;	/* log2 of refcounts per block */
	unsigned int order;	/* refcount_order */
	uint64_t rc_max;
	uint64_t *reftable;	/* host order */
	uint64_t reftable_entries;
	uint64_t meta_size;	/* size of the image file as written */
	uint64_t free_hint;	/* cluster index: nothing below is free */
	uint64_t fresh_from;	/* host offset: nothing at or past it was ever
				 * written nor handed out (holes); UINT64_MAX: unknown */
	struct cache l2c, rbc;
	uint32_t dirty_l1[DIRTY_L1_MAX];
	size_t n_dirty_l1;
	struct extent deferred[DEFERRED_MAX];
	size_t n_deferred;
	struct map_extent maps[MAPS_MAX];
	size_t n_maps;
	bool data_unflushed, meta_unflushed;
	bool dirty_bit_set;	/* we set the dirty bit (lazy refcounts) */
	bool broken;		/* a metadata write failed: no more writes */
	struct plan plan[PLAN_MAX];
	uint8_t *head_buf, *tail_buf;	/* cluster-sized copy-on-write buffers */
	uint8_t *cbuf;		/* decompressed cluster */
	uint64_t cbuf_entry;	/* L2 entry it was decompressed from; 0: none */
	uint8_t *zbuf;		/* compressed bytes */
	/* allocation ahead of a sequential writer */
	uint64_t seq_next;	/* guest end of the last write */
	uint64_t ahead_start, ahead_end;	/* the current window (guest) */
	uint64_t ahead_window;	/* bytes of the next window */
	uint64_t ahead_probe;	/* guest offset of the first cluster of the last
				 * window, when it came from holes: data there
				 * (qcow2_rw_ahead_poll) is the writer; 0: none */
	struct extent ahead[AHEAD_TRACK];	/* guest ranges mapped ahead (ring) */
	size_t n_ahead, ahead_pos;
	struct extent *sparse;	/* windows mapped around random writes (ahead_sparse) */
	size_t n_sparse, sparse_cap;
	uint8_t *zero_buf;	/* zeros to write (no data_zero) */
	size_t zero_len;
	struct qcow2_rw_op *active;	/* ops between begin and end */
	unsigned int n_active;
	struct qcow2_rw_stats st;
};

/* ---- small helpers ---- */

static void *alloc_aligned(size_t size)
{
	void *p = NULL;

	if (posix_memalign(&p, BUF_ALIGN, size ? size : 1))
		return NULL;
	memset(p, 0, size);
	return p;
}

static bool buf_is_zero(const uint8_t *p, size_t len)
{
	return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

/* The image file was written, or handed out to be written, up to end. */
static void touch_file(struct qcow2_rw *w, uint64_t end)
{
	if (w->fresh_from != UINT64_MAX && end > w->fresh_from)
		w->fresh_from = end;
}

static int meta_write(struct qcow2_rw *w, const void *buf, size_t len, uint64_t off)
{
	int r = w->ops.meta_pwrite(w->ops.opaque, buf, len, off);

	if (r < 0) {
		log_err("%s: cannot write metadata at offset 0x%" PRIx64 ": %s.", w->img->path, off, strerror(-r));
		w->broken = true;
		return r;
	}
	w->meta_unflushed = true;
	touch_file(w, off + len);
	if (off + len > w->meta_size) {
		w->meta_size = off + len;
		w->img->io.size = w->meta_size;
		if (!w->img->has_data_file)
			w->img->data_io.size = w->meta_size;
	}
	return 0;
}

static int meta_flush(struct qcow2_rw *w)
{
	int r = w->ops.meta_flush(w->ops.opaque);

	w->st.flushes++;
	if (r < 0) {
		log_err("%s: cannot flush the image: %s.", w->img->path, strerror(-r));
		w->broken = true;
		return r;
	}
	w->meta_unflushed = false;
	if (!w->ops.data_flush)
		w->data_unflushed = false;
	return 0;
}

static int data_flush(struct qcow2_rw *w)
{
	int r;

	if (!w->ops.data_flush)
		return meta_flush(w);
	r = w->ops.data_flush(w->ops.opaque);
	w->st.flushes++;
	if (r < 0) {
		log_err("%s: cannot flush the data file: %s.", w->img->path, strerror(-r));
		w->broken = true;
		return r;
	}
	w->data_unflushed = false;
	return 0;
}

/* Read metadata; bytes past the end of the file read as zeros. */
static int meta_read(struct qcow2_rw *w, void *buf, size_t len, uint64_t off)
{
	size_t n = 0;
	int r;

	if (off < w->meta_size)
		n = (size_t)MIN((uint64_t)len, w->meta_size - off);
	if (n) {
		r = img_pread(&w->img->io, buf, n, off);
		if (r < 0) {
			log_err("%s: cannot read metadata at offset 0x%" PRIx64 ": %s.", w->img->path, off, strerror(-r));
			return r;
		}
	}
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

static int write_header_u64(struct qcow2_rw *w, uint64_t off, uint64_t v)
{
	uint8_t b[8];

	put_be64(b, v);
	return meta_write(w, b, sizeof(b), off);
}

/* ---- caches of L2 tables and refcount blocks ---- */

static int cache_init(struct cache *c, unsigned int n, uint64_t cs)
{
	c->s = calloc(n, sizeof(*c->s));
	c->mem = alloc_aligned((size_t)(n * cs));
	if (!c->s || !c->mem)
		return -ENOMEM;
	c->n = n;
	for (unsigned int i = 0; i < n; i++)
		c->s[i].buf = c->mem + i * cs;
	return 0;
}

static void cache_free(struct cache *c)
{
	free(c->s);
	free(c->mem);
	memset(c, 0, sizeof(*c));
}

static bool slot_dirty(const struct slot *s)
{
	return s->dlo != s->dhi;
}

static void slot_mark(struct slot *s, uint32_t lo, uint32_t hi)
{
	if (!slot_dirty(s)) {
		s->dlo = lo;
		s->dhi = hi;
	} else {
		s->dlo = MIN(s->dlo, lo);
		s->dhi = MAX(s->dhi, hi);
	}
}

static int slot_write(struct qcow2_rw *w, struct slot *s)
{
	int r;

	if (!slot_dirty(s))
		return 0;
	r = meta_write(w, s->buf + s->dlo, s->dhi - s->dlo, s->off + s->dlo);
	if (r == 0)
		s->dlo = s->dhi = 0;
	return r;
}

static int cache_find(struct cache *c, uint64_t off)
{
	for (unsigned int i = 0; i < c->n; i++)
		if (c->s[i].off == off)
			return (int)i;
	return -1;
}

static int writeback(struct qcow2_rw *w);
static int zero_data(struct qcow2_rw *w, uint64_t host, uint64_t len, bool cheap_only);

/* The slot of the table or block at off, loaded (fill) or zeroed. L2
 * tables: evicting a dirty one takes a writeback; refcount blocks are
 * always safe to write (increments before their users, decrements only
 * after theirs are durable). Slot indexes stay valid until the next call. */
static int cache_get(struct qcow2_rw *w, struct cache *c, uint64_t off, bool fill, struct slot **out)
{
	int i = cache_find(c, off), victim = -1;
	struct slot *s;
	int r;

	if (i >= 0) {
		s = &c->s[i];
		s->used = ++c->tick;
		if (!fill)
			memset(s->buf, 0, w->cs);
		*out = s;
		return 0;
	}
	for (unsigned int k = 0; k < c->n; k++) {
		s = &c->s[k];
		if (!s->off) {
			victim = (int)k;
			break;
		}
		if (slot_dirty(s) && c == &w->l2c)
			continue;
		if (victim < 0 || s->used < c->s[victim].used)
			victim = (int)k;
	}
	if (victim < 0) {
		/* every L2 table is dirty */
		r = writeback(w);
		if (r < 0)
			return r;
		return cache_get(w, c, off, fill, out);
	}
	s = &c->s[victim];
	r = slot_write(w, s);
	if (r < 0)
		return r;
	s->off = 0;
	if (fill) {
		r = meta_read(w, s->buf, w->cs, off);
		if (r < 0)
			return r;
	} else {
		memset(s->buf, 0, w->cs);
	}
	s->off = off;
	s->used = ++c->tick;
	s->dlo = s->dhi = 0;
	*out = s;
	return 0;
}

static int cache_write_all(struct qcow2_rw *w, struct cache *c)
{
	int r;

	for (unsigned int i = 0; i < c->n; i++) {
		r = slot_write(w, &c->s[i]);
		if (r < 0)
			return r;
	}
	return 0;
}

static bool cache_has_dirty(const struct cache *c)
{
	for (unsigned int i = 0; i < c->n; i++)
		if (slot_dirty(&c->s[i]))
			return true;
	return false;
}

/* Drop a slot (its cluster was freed or moved). */
static void cache_forget(struct cache *c, uint64_t off)
{
	int i = cache_find(c, off);

	if (i >= 0) {
		c->s[i].off = 0;
		c->s[i].dlo = c->s[i].dhi = 0;
	}
}

/* ---- refcounts ---- */

static uint64_t rb_get(const uint8_t *b, unsigned int order, uint64_t i)
{
	switch (order) {
	case 0:
	case 1:
	case 2: {
		uint64_t bit = i << order;

		return (b[bit / 8] >> (bit % 8)) & ((1U << (1U << order)) - 1);
	}
	case 3:
		return b[i];
	case 4:
		return get_be16(b + i * 2);
	case 5:
		return get_be32(b + i * 4);
	default:
		return get_be64(b + i * 8);
	}
}

static void rb_set(uint8_t *b, unsigned int order, uint64_t i, uint64_t v)
{
	switch (order) {
	case 0:
	case 1:
	case 2: {
		uint64_t bit = i << order;
		uint8_t mask = (uint8_t)(((1U << (1U << order)) - 1) << (bit % 8));

		b[bit / 8] = (uint8_t)((b[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
		break;
	}
	case 3:
		b[i] = (uint8_t)v;
		break;
	case 4:
		put_be16(b + i * 2, (uint16_t)v);
		break;
	case 5:
		put_be32(b + i * 4, (uint32_t)v);
		break;
	default:
		put_be64(b + i * 8, v);
		break;
	}
}

/* Byte range of refcount entry i in its block. */
static void rb_range(unsigned int order, uint64_t i, uint32_t *lo, uint32_t *hi)
{
	uint64_t bit = i << order, bits = 1ULL << order;

	*lo = (uint32_t)(bit / 8);
	*hi = (uint32_t)((bit + bits + 7) / 8);
}

static int refblock_offset(struct qcow2_rw *w, uint64_t ti, uint64_t *off)
{
	*off = 0;
	if (ti >= w->reftable_entries)
		return 0;
	*off = w->reftable[ti] & QCOW2_REFT_OFFSET_MASK;
	if (*off && !is_aligned(*off, w->cs)) {
		log_err("%s: refcount block %" PRIu64 " at 0x%" PRIx64 " is not cluster aligned.", w->img->path, ti, *off);
		return -EUCLEAN;
	}
	return 0;
}

/* Change the refcount of cluster ci, whose block exists. */
static int refcount_change(struct qcow2_rw *w, uint64_t ci, int delta)
{
	uint64_t boff, i = ci & ((1ULL << w->rb_bits) - 1), v;
	uint32_t lo, hi;
	struct slot *s;
	int r;

	r = refblock_offset(w, ci >> w->rb_bits, &boff);
	if (r < 0)
		return r;
	if (!boff) {
		log_err("%s: cluster %" PRIu64 " has no refcount block.", w->img->path, ci);
		return -EUCLEAN;
	}
	r = cache_get(w, &w->rbc, boff, true, &s);
	if (r < 0)
		return r;
	v = rb_get(s->buf, w->order, i);
	if ((delta < 0 && v == 0) || (delta > 0 && v == w->rc_max)) {
		log_err("%s: refcount of cluster %" PRIu64 " would %s.", w->img->path, ci,
			delta < 0 ? "drop below 0" : "overflow");
		return -EUCLEAN;
	}
	v = delta < 0 ? v - 1 : v + 1;
	rb_set(s->buf, w->order, i, v);
	rb_range(w->order, i, &lo, &hi);
	slot_mark(s, lo, hi);
	if (v == 0 && ci < w->free_hint)
		w->free_hint = ci;
	return 0;
}

/* Refcount of cluster ci (0 without a refcount block). */
static int refcount_read(struct qcow2_rw *w, uint64_t ci, uint64_t *v)
{
	uint64_t boff;
	struct slot *s;
	int r;

	*v = 0;
	r = refblock_offset(w, ci >> w->rb_bits, &boff);
	if (r < 0 || !boff)
		return r;
	r = cache_get(w, &w->rbc, boff, true, &s);
	if (r < 0)
		return r;
	*v = rb_get(s->buf, w->order, ci & ((1ULL << w->rb_bits) - 1));
	return 0;
}

/* First cluster at or after start with refcount 0 (clusters of ranges
 * without a refcount block are free). quiet: no message at the limit. */
static int find_free(struct qcow2_rw *w, uint64_t start, bool quiet, uint64_t *out)
{
	uint64_t ci = start, per = 1ULL << w->rb_bits, limit = w->opts.file_limit;
	int r;

	for (;;) {
		uint64_t ti = ci >> w->rb_bits, boff;
		struct slot *s;

		if (limit && (ci + 1) << w->cb > limit) {
			if (!quiet)
				log_err("%s: no room for a new cluster below %" PRIu64 " bytes.", w->img->path, limit);
			return -ENOSPC;
		}
		if ((ci << w->cb) >> w->cb != ci || ci << w->cb > (1ULL << 56)) {
			log_err("%s: the image file would exceed the qcow2 limits.", w->img->path);
			return -ENOSPC;
		}
		r = refblock_offset(w, ti, &boff);
		if (r < 0)
			return r;
		if (!boff) {
			*out = ci;
			return 0;
		}
		r = cache_get(w, &w->rbc, boff, true, &s);
		if (r < 0)
			return r;
		for (uint64_t i = ci & (per - 1); i < per; i++, ci++)
			if (!rb_get(s->buf, w->order, i)) {
				if (limit && (ci + 1) << w->cb > limit)
					break;
				*out = ci;
				return 0;
			}
		ci = (ti + 1) << w->rb_bits;
	}
}

/* A refcount block for range ti, placed at the first cluster of its own
 * range (free: the range has no block) and describing itself. Written and
 * flushed before the refcount table entry names it. */
static int create_refblock(struct qcow2_rw *w, uint64_t ti)
{
	uint64_t x = ti << w->rb_bits, off = x << w->cb;
	uint8_t entry[8];
	struct slot *s;
	int r;

	if (ti == 0) {
		log_err("%s: the header cluster has no refcount block.", w->img->path);
		return -EUCLEAN;
	}
	if (w->opts.file_limit && off + w->cs > w->opts.file_limit) {
		log_err("%s: no room for a refcount block below %" PRIu64 " bytes.", w->img->path, w->opts.file_limit);
		return -ENOSPC;
	}
	r = cache_get(w, &w->rbc, off, false, &s);
	if (r < 0)
		return r;
	rb_set(s->buf, w->order, 0, 1);
	s->dlo = 0;
	s->dhi = (uint32_t)w->cs;
	r = slot_write(w, s);
	if (r == 0)
		r = meta_flush(w);
	if (r < 0) {
		cache_forget(&w->rbc, off);
		return r;
	}
	put_be64(entry, off);
	r = meta_write(w, entry, 8, w->img->refcount_table_offset + ti * 8);
	if (r < 0)
		return r;
	w->reftable[ti] = off;
	w->st.refblocks_allocated++;
	log_dbg("%s: refcount block %" PRIu64 " at 0x%" PRIx64, w->img->path, ti, off);
	return 0;
}

/* A larger refcount table at the first cluster its current one cannot
 * describe (everything from there on is free), followed by the refcount
 * blocks for the area it occupies. Blocks and table are written and
 * flushed, then the header switches to them (12 bytes in one sector),
 * flushed, and only then the old table is freed. */
static int grow_reftable(struct qcow2_rw *w, uint64_t need_entries)
{
	uint64_t per = 1ULL << w->rb_bits, old_entries = w->reftable_entries;
	uint64_t a = old_entries << w->rb_bits, t, b = 1, new_entries, first_range, last;
	uint64_t old_off = w->img->refcount_table_offset, old_clusters = w->img->refcount_table_clusters;
	uint8_t *tbl = NULL, *blocks = NULL, hdr[12];
	uint64_t *newt = NULL;
	int r;

	if ((a >> w->rb_bits) != old_entries || a > (1ULL << (56 - w->cb))) {
		log_err("%s: the refcount table cannot grow any further.", w->img->path);
		return -EFBIG;
	}
	new_entries = MAX(need_entries, old_entries + old_entries / 2);
	first_range = a >> w->rb_bits;
	for (int iter = 0;; iter++) {
		uint64_t nb;

		new_entries = round_up_pow2(new_entries, w->cs / 8);
		t = new_entries * 8 / w->cs;
		nb = ((a + t + b - 1) >> w->rb_bits) - first_range + 1;
		last = a + t + nb - 1;
		if (nb == b && (last >> w->rb_bits) < new_entries)
			break;
		b = nb;
		if ((last >> w->rb_bits) >= new_entries)
			new_entries = (last >> w->rb_bits) + 1;
		if (iter > 64)
			return -EFBIG;
	}
	if (t > QCOW2_MAX_REFTABLE_BYTES / w->cs) {
		log_err("%s: the refcount table would exceed %u bytes.", w->img->path, QCOW2_MAX_REFTABLE_BYTES);
		return -EFBIG;
	}
	if (w->opts.file_limit && (a + t + b) << w->cb > w->opts.file_limit) {
		log_err("%s: no room for a larger refcount table below %" PRIu64 " bytes.", w->img->path,
			w->opts.file_limit);
		return -ENOSPC;
	}
	tbl = alloc_aligned((size_t)(t * w->cs));
	blocks = alloc_aligned((size_t)(b * w->cs));
	newt = calloc(new_entries, sizeof(*newt));
	if (!tbl || !blocks || !newt) {
		r = -ENOMEM;
		goto out;
	}
	for (uint64_t i = 0; i < old_entries; i++)
		newt[i] = w->reftable[i];
	for (uint64_t k = 0; k < b; k++)
		newt[first_range + k] = (a + t + k) << w->cb;
	for (uint64_t c = a; c < a + t + b; c++)
		rb_set(blocks + ((c >> w->rb_bits) - first_range) * w->cs, w->order, c & (per - 1), 1);
	for (uint64_t i = 0; i < new_entries; i++)
		put_be64(tbl + i * 8, newt[i]);
	r = meta_write(w, blocks, (size_t)(b * w->cs), (a + t) << w->cb);
	if (!r)
		r = meta_write(w, tbl, (size_t)(t * w->cs), a << w->cb);
	if (!r)
		r = meta_flush(w);
	if (r)
		goto out;
	/* the reftable's offset and clusters, adjacent in the header */
	put_be64(hdr, a << w->cb);
	put_be32(hdr + (QCOW2_HDR_REFTABLE_CLUSTERS - QCOW2_HDR_REFTABLE_OFFSET), (uint32_t)t);
	r = meta_write(w, hdr, sizeof(hdr), QCOW2_HDR_REFTABLE_OFFSET);
	if (!r)
		r = meta_flush(w);
	if (r)
		goto out;
	free(w->reftable);
	w->reftable = newt;
	newt = NULL;
	w->reftable_entries = new_entries;
	w->img->refcount_table_offset = a << w->cb;
	w->img->refcount_table_clusters = (uint32_t)t;
	w->st.reftable_growths++;
	w->st.refblocks_allocated += b;
	log_dbg("%s: refcount table grown to %" PRIu64 " entries at 0x%" PRIx64, w->img->path, new_entries, a << w->cb);
	/* the old table is referenced by nothing durable any more */
	for (uint64_t c = 0; c < old_clusters; c++) {
		r = refcount_change(w, (old_off >> w->cb) + c, -1);
		if (r)
			goto out;
	}
out:
	free(tbl);
	free(blocks);
	free(newt);
	return r;
}

/* n contiguous new clusters, refcount 1 each (cached): the first run of
 * free clusters at or after the hint whose refcount blocks exist (made on
 * the way, which may take clusters of a candidate run: the search starts
 * over). grow false: nothing but the cached refcounts changes, no message:
 * a run that would need a refcount block, a larger refcount table or room
 * past the file limit is -ENOSPC (allocation ahead). */
static int alloc_clusters(struct qcow2_rw *w, uint64_t n, bool grow, uint64_t *off, bool *fresh)
{
	uint64_t start = w->free_hint, ci, v;
	bool dense = true;	/* nothing free between the hint and ci */
	int r;

	for (;;) {
		uint64_t k, c = 0;
		bool again = false;

		r = find_free(w, start, !grow, &ci);
		if (r < 0)
			return r;
		if (w->opts.file_limit && (ci + n) << w->cb > w->opts.file_limit) {
			if (grow)
				log_err("%s: no room for %" PRIu64 " new clusters below %" PRIu64 " bytes.", w->img->path,
					n, w->opts.file_limit);
			return -ENOSPC;
		}
		for (k = 0; k < n && !again; k++) {
			uint64_t ti;

			c = ci + k;
			ti = c >> w->rb_bits;
			if (!grow && (ti >= w->reftable_entries || !(w->reftable[ti] & QCOW2_REFT_OFFSET_MASK)))
				return -ENOSPC;
			if (ti >= w->reftable_entries)
				r = grow_reftable(w, ti + 1), again = true;
			else if (!(w->reftable[ti] & QCOW2_REFT_OFFSET_MASK))
				r = create_refblock(w, ti), again = true;
			else if ((r = refcount_read(w, c, &v)) == 0 && v)
				again = true, start = c + 1, dense = false;
			if (r < 0)
				return r;
		}
		if (!again)
			break;
	}
	for (uint64_t k = 0; k < n; k++) {
		r = refcount_change(w, ci + k, +1);
		if (r < 0) {
			while (k-- > 0)
				if (refcount_change(w, ci + k, -1) < 0)
					w->broken = true;
			return r;
		}
	}
	if (dense)
		w->free_hint = ci + n;
	*off = ci << w->cb;
	if (fresh)
		*fresh = w->fresh_from != UINT64_MAX && *off >= w->fresh_from && (ci + n) << w->cb <= w->meta_size;
	touch_file(w, (ci + n) << w->cb);
	return 0;
}

/* One new cluster, refcount 1 (cached); *fresh (may be NULL): whether it
 * was never written, a hole inside the image file (past its end, a
 * reference is an error to qemu-img check: zeroing extends the file). */
static int alloc_cluster(struct qcow2_rw *w, uint64_t *off, bool *fresh)
{
	return alloc_clusters(w, 1, true, off, fresh);
}

static int apply_deferred(struct qcow2_rw *w)
{
	int r;

	while (w->n_deferred) {
		struct extent e = w->deferred[--w->n_deferred];

		for (uint64_t c = e.off >> w->cb; c <= (e.off + e.len - 1) >> w->cb; c++) {
			r = refcount_change(w, c, -1);
			if (r < 0)
				return r;
		}
		cache_forget(&w->l2c, e.off);
	}
	return 0;
}

/* ---- L2 entries ---- */

static bool entry_compressed(uint64_t e)
{
	return e & QCOW2_OFLAG_COMPRESSED;
}

static void compressed_range(const struct qcow2_rw *w, uint64_t e, uint64_t *off, uint64_t *len)
{
	unsigned int x = 62 - (w->cb - 8);
	uint64_t nb = ((e >> x) & ((1ULL << (w->cb - 8)) - 1)) + 1;

	*off = e & ((1ULL << x) - 1);
	*len = nb * 512 - (*off & 511);
}

/* Host cluster of a standard entry, and whether it is allocated. */
static bool entry_host(const struct qcow2_rw *w, uint64_t e, uint64_t *host)
{
	*host = e & QCOW2_L2E_OFFSET_MASK;
	if (entry_compressed(e))
		return false;
	return *host || (w->data_file && (e & QCOW2_OFLAG_COPIED));
}

/* Subcluster bitmaps of an entry: allocated and zero (one subcluster per
 * cluster without extended L2). */
static void entry_bits(const struct qcow2_rw *w, uint64_t e, uint64_t bm, uint32_t *alloc, uint32_t *zero)
{
	uint64_t host;
	bool has = entry_host(w, e, &host);

	if (w->extended) {
		*alloc = has ? (uint32_t)bm : 0;
		*zero = (uint32_t)(bm >> 32);
		return;
	}
	*zero = (e & QCOW2_OFLAG_ZERO) && !entry_compressed(e) ? 1 : 0;
	*alloc = has && !*zero ? 1 : 0;
}

static uint32_t all_subclusters(const struct qcow2_rw *w)
{
	return w->nsc == 32 ? 0xffffffffU : 1U;
}

static int l2_slot_read(struct qcow2_rw *w, uint64_t l1i, struct slot **s)
{
	uint64_t off;

	*s = NULL;
	if (l1i >= w->img->l1_size)
		return 0;
	off = w->img->l1[l1i] & QCOW2_L1E_OFFSET_MASK;
	if (!off)
		return 0;
	if (!is_aligned(off, w->cs)) {
		log_err("%s: L2 table at 0x%" PRIx64 " is not cluster aligned.", w->img->path, off);
		return -EUCLEAN;
	}
	return cache_get(w, &w->l2c, off, true, s);
}

static int get_entry(struct qcow2_rw *w, uint64_t gci, uint64_t *e, uint64_t *bm)
{
	struct slot *s;
	uint64_t j = gci & (w->l2_entries - 1);
	int r;

	*e = *bm = 0;
	r = l2_slot_read(w, gci >> w->l2_bits, &s);
	if (r < 0 || !s)
		return r;
	*e = get_be64(s->buf + j * w->l2_esz);
	if (w->extended)
		*bm = get_be64(s->buf + j * w->l2_esz + 8);
	return 0;
}

/* The L2 table of l1i, writable in place: allocated (empty) or copied from
 * a table shared with a snapshot when needed. Nothing in between may write
 * back: the new table is dirty before anything can evict it, and the
 * queues have room. */
static int l2_slot_write(struct qcow2_rw *w, uint64_t l1i, struct slot **out)
{
	uint64_t e = w->img->l1[l1i], old = e & QCOW2_L1E_OFFSET_MASK, off;
	struct slot *s;
	int r;

	if (old && (e & QCOW2_OFLAG_COPIED))
		return l2_slot_read(w, l1i, out);
	if (old && !is_aligned(old, w->cs)) {
		log_err("%s: L2 table at 0x%" PRIx64 " is not cluster aligned.", w->img->path, old);
		return -EUCLEAN;
	}
	if (w->n_deferred == DEFERRED_MAX || w->n_dirty_l1 == DIRTY_L1_MAX) {
		r = writeback(w);
		if (r < 0)
			return r;
	}
	r = alloc_cluster(w, &off, NULL);
	if (r < 0)
		return r;
	r = cache_get(w, &w->l2c, off, false, &s);
	if (r == 0 && old)
		r = meta_read(w, s->buf, w->cs, old);
	if (r < 0) {
		cache_forget(&w->l2c, off);
		if (refcount_change(w, off >> w->cb, -1) < 0)
			w->broken = true;
		return r;
	}
	s->dlo = 0;
	s->dhi = (uint32_t)w->cs;
	if (old)
		w->deferred[w->n_deferred++] = (struct extent){ .off = old, .len = w->cs };
	w->img->l1[l1i] = off | QCOW2_OFLAG_COPIED;
	for (size_t i = 0; i < w->n_dirty_l1; i++)
		if (w->dirty_l1[i] == l1i)
			goto listed;
	w->dirty_l1[w->n_dirty_l1++] = (uint32_t)l1i;
listed:
	w->st.l2_tables_allocated++;
	log_dbg("%s: L2 table %" PRIu64 " at 0x%" PRIx64 "%s", w->img->path, l1i, off, old ? " (copy)" : "");
	*out = s;
	return 0;
}

/* ---- reads ---- */

static int zero_fill_past_size(struct qcow2_rw *w, uint8_t *buf, uint64_t guest, uint64_t len)
{
	if (guest + len > w->img->size) {
		uint64_t keep = guest < w->img->size ? w->img->size - guest : 0;

		memset(buf + keep, 0, len - keep);
	}
	return 0;
}

/* unlocked: outside the caller's lock (an op's step 3): -EAGAIN where the
 * chain needs it. */
static int read_backing(struct qcow2_rw *w, uint8_t *buf, uint64_t guest, uint64_t len, bool unlocked)
{
	uint64_t n = guest < w->img->size ? MIN(len, w->img->size - guest) : 0;
	int r = 0;

	if (n && unlocked && w->ops.backing_pread)
		r = w->ops.backing_pread_direct ? w->ops.backing_pread_direct(w->ops.opaque, buf, n, guest) : -EAGAIN;
	else if (n && w->ops.backing_pread)
		r = w->ops.backing_pread(w->ops.opaque, buf, n, guest);
	else
		n = 0;
	memset(buf + n, 0, len - n);
	return r;
}

static int decompress_entry(struct qcow2_rw *w, uint64_t e)
{
	uint64_t off, len;
	int r;

	if (w->cbuf_entry == e)
		return 0;
	w->cbuf_entry = 0;
	compressed_range(w, e, &off, &len);
	if (len > 2 * w->cs) {
		log_err("%s: compressed cluster of %" PRIu64 " bytes is too large.", w->img->path, len);
		return -EUCLEAN;
	}
	r = meta_read(w, w->zbuf, len, off);
	if (r < 0)
		return r;
	r = qcow_decompress(w->img->compression_type, w->cbuf, w->cs, w->zbuf, len);
	if (r < 0) {
		log_err("%s: cannot decompress the cluster at 0x%" PRIx64 ": %s.", w->img->path, off, strerror(-r));
		return r == -EBADMSG ? -EIO : r;
	}
	w->cbuf_entry = e;
	return 0;
}

/* Bytes [from, to) of guest cluster gci (entry e, bm) into buf (cluster
 * relative), as the guest reads them now; unlocked as read_backing (a
 * compressed cluster needs the lock: -EAGAIN). */
static int read_cluster_part(struct qcow2_rw *w, uint64_t gci, uint64_t e, uint64_t bm,
			     uint8_t *buf, uint64_t from, uint64_t to, bool unlocked)
{
	uint64_t guest = gci << w->cb, host;
	uint32_t alloc, zero;
	int r;

	if (from >= to)
		return 0;
	/* whole sectors (O_DIRECT underneath); buf is a cluster buffer */
	from &= ~511ULL;
	to = MIN(round_up_pow2(to, 512), w->cs);
	if (entry_compressed(e) && unlocked)
		return -EAGAIN;
	if (entry_compressed(e)) {
		r = decompress_entry(w, e);
		if (r == 0)
			memcpy(buf + from, w->cbuf + from, to - from);
		return r;
	}
	entry_host(w, e, &host);
	entry_bits(w, e, bm, &alloc, &zero);
	while (from < to) {
		unsigned int sc = (unsigned int)(from / w->scs);
		uint64_t end = from, kind;

		kind = alloc & (1U << sc) ? 1 : zero & (1U << sc) ? 2 : 0;
		/* extend over the subclusters of the same kind */
		while (end < to) {
			unsigned int k = (unsigned int)(end / w->scs);
			uint64_t kk = alloc & (1U << k) ? 1 : zero & (1U << k) ? 2 : 0;

			if (kk != kind)
				break;
			end = MIN(to, (uint64_t)(k + 1) * w->scs);
		}
		if (kind == 1)
			r = w->ops.data_pread(w->ops.opaque, buf + from, end - from, host + from);
		else if (kind == 2)
			memset(buf + from, 0, end - from), r = 0;
		else
			r = read_backing(w, buf + from, guest + from, end - from, unlocked);
		if (r == -EAGAIN)
			return r;
		if (r < 0) {
			log_err("%s: cannot read guest offset 0x%" PRIx64 ": %s.", w->img->path, guest + from, strerror(-r));
			return r;
		}
		from = end;
	}
	return zero_fill_past_size(w, buf, guest, w->cs);
}

int qcow2_rw_read(struct qcow2_rw *w, void *buf, size_t len, uint64_t guest)
{
	uint8_t *p = buf;
	int r;

	if (guest > w->img->size || len > w->img->size - guest)
		return -EINVAL;
	while (len) {
		uint64_t gci = guest >> w->cb, off = guest & (w->cs - 1), n = MIN((uint64_t)len, w->cs - off);
		uint64_t e, bm, host;
		uint32_t alloc, zero;

		r = get_entry(w, gci, &e, &bm);
		if (r < 0)
			return r;
		entry_bits(w, e, bm, &alloc, &zero);
		if (!entry_compressed(e) && entry_host(w, e, &host) && !zero &&
		    alloc == all_subclusters(w) && is_aligned(off, 512) && is_aligned(n, 512) &&
		    is_aligned((uintptr_t)p, 512)) {
			/* straight from the data cluster; merge contiguous clusters */
			uint64_t total = n, next_host = host + off + n, next = gci + 1;

			while (total < len) {
				uint64_t e2, bm2, h2, n2 = MIN((uint64_t)len - total, w->cs);
				uint32_t a2, z2;

				r = get_entry(w, next, &e2, &bm2);
				if (r < 0)
					return r;
				entry_bits(w, e2, bm2, &a2, &z2);
				if (entry_compressed(e2) || !entry_host(w, e2, &h2) || z2 || a2 != all_subclusters(w) ||
				    h2 != next_host || !is_aligned(n2, 512))
					break;
				total += n2;
				next_host += n2;
				next++;
			}
			r = w->ops.data_pread(w->ops.opaque, p, total, host + off);
			if (r < 0) {
				log_err("%s: cannot read guest offset 0x%" PRIx64 ": %s.", w->img->path, guest,
					strerror(-r));
				return r;
			}
			n = total;
		} else if (off == 0 && n == w->cs && is_aligned((uintptr_t)p, BUF_ALIGN)) {
			r = read_cluster_part(w, gci, e, bm, p, 0, w->cs, false);
		} else {
			r = read_cluster_part(w, gci, e, bm, w->head_buf, off, off + n, false);
			if (r == 0)
				memcpy(p, w->head_buf + off, n);
		}
		if (r < 0)
			return r;
		p += n;
		guest += n;
		len -= n;
	}
	return 0;
}

/* The kind of guest cluster gci for qcow2_rw_extent, and its host cluster. */
static int cluster_kind(struct qcow2_rw *w, uint64_t gci, bool write, enum qcow2_rw_extent_kind *kind, uint64_t *host)
{
	uint64_t e, bm, rc = 1;
	uint32_t alloc, zero;
	int r;

	*kind = QCOW2_EXTENT_ENGINE;
	r = get_entry(w, gci, &e, &bm);
	if (r < 0)
		return r;
	entry_bits(w, e, bm, &alloc, &zero);
	if (entry_compressed(e))
		return 0;
	if (entry_host(w, e, host)) {
		if (alloc != all_subclusters(w) || zero || !(e & QCOW2_OFLAG_COPIED) || !is_aligned(*host, w->cs))
			return 0;
		/* ours alone (as plan_cluster checks it): never freed while open */
		if (!w->data_file && ((r = refcount_read(w, *host >> w->cb, &rc)) < 0 || rc != 1))
			return r < 0 ? r : 0;
		*kind = QCOW2_EXTENT_DATA;
		return 0;
	}
	if (write)
		return 0;
	if (zero == all_subclusters(w) || (!zero && !w->ops.backing_pread))
		*kind = QCOW2_EXTENT_ZERO;
	else if (!zero)
		*kind = QCOW2_EXTENT_BACKING;
	return 0;
}

int qcow2_rw_extent(struct qcow2_rw *w, uint64_t guest, uint64_t len, bool write, struct qcow2_rw_extent *x)
{
	uint64_t gci = guest >> w->cb, off = guest & (w->cs - 1), host = 0, next_host;
	int r;

	x->kind = QCOW2_EXTENT_ENGINE;
	x->len = len;
	x->host = 0;
	if (guest > w->img->size || len > w->img->size - guest)
		return -EINVAL;
	if (!len || (write && (w->opts.read_only || w->broken)))
		return 0;
	r = cluster_kind(w, gci, write, &x->kind, &host);
	if (r < 0)
		return r;
	x->host = host + off;
	x->len = MIN(len, w->cs - off);
	next_host = host + w->cs;
	while (x->len < len) {
		enum qcow2_rw_extent_kind k;

		r = cluster_kind(w, ++gci, write, &k, &host);
		if (r < 0)
			return r;
		if (k != x->kind || (k == QCOW2_EXTENT_DATA && host != next_host))
			break;
		x->len += MIN(len - x->len, w->cs);
		next_host = host + w->cs;
	}
	return 0;
}

void qcow2_rw_data_written(struct qcow2_rw *w)
{
	w->data_unflushed = true;
}

/* ---- writes ---- */

static uint32_t sc_mask(const struct qcow2_rw *w, uint64_t from, uint64_t to)
{
	unsigned int a = (unsigned int)(from / w->scs), b = (unsigned int)((to - 1) / w->scs);
	uint64_t m = ((2ULL << b) - 1) & ~((1ULL << a) - 1);

	return (uint32_t)m;
}

/* Queue the announcement of a new writable mapping; a full queue is
 * written back first (safe: every cached L2 entry maps written data). */
static int add_map(struct qcow2_rw *w, uint64_t guest, uint64_t len, uint64_t host)
{
	struct map_extent *m = w->n_maps ? &w->maps[w->n_maps - 1] : NULL;
	int r;

	if (m && m->guest + m->len == guest && m->host + m->len == host) {
		m->len += len;
		return 0;
	}
	if (w->n_maps == MAPS_MAX) {
		r = writeback(w);
		if (r < 0)
			return r;
	}
	w->maps[w->n_maps++] = (struct map_extent){ .guest = guest, .len = len, .host = host };
	return 0;
}

/* Whether the backing chain reads zeros at [guest, guest + len) (none: zeros),
 * as far as it can tell without reading. */
static bool backing_is_zero(struct qcow2_rw *w, uint64_t guest, uint64_t len)
{
	return !w->ops.backing_pread || (w->ops.backing_zero && w->ops.backing_zero(w->ops.opaque, guest, len));
}

/* Plan cluster p of a write of [ws, we) inside it: in place, or a new
 * cluster (allocated here). */
static int plan_cluster(struct qcow2_rw *w, struct plan *p)
{
	uint64_t host;
	uint32_t alloc, zero, all = all_subclusters(w);
	bool has = entry_host(w, p->old_entry, &host), in_place;
	int r;

	entry_bits(w, p->old_entry, p->old_bitmap, &alloc, &zero);
	p->touched = sc_mask(w, p->ws, p->we);
	in_place = has && (p->old_entry & QCOW2_OFLAG_COPIED);
	p->alloc = false;
	if (in_place) {
		uint64_t rc = 1;

		if (!is_aligned(host, w->cs)) {
			log_err("%s: data cluster at 0x%" PRIx64 " is not cluster aligned.", w->img->path, host);
			return -EUCLEAN;
		}
		/* checked at open (validate_writable); what is written in place
		 * is ours alone, whatever happened since */
		if (!w->data_file && ((r = refcount_read(w, host >> w->cb, &rc)) < 0 || rc != 1)) {
			if (r == 0)
				log_err("%s: guest offset 0x%" PRIx64 ": data cluster at host offset 0x%" PRIx64 " has refcount %" PRIu64 ": not written in place.",
					w->img->path, p->guest, host, rc);
			return r < 0 ? r : -EUCLEAN;
		}
		p->host = host;
		if ((alloc & p->touched) == p->touched) {
			/* plain overwrite: the written sectors only */
			p->range = true;
			p->wlo = p->ws & ~511U;
			p->whi = (uint32_t)MIN(round_up_pow2(p->we, 512), w->cs);
			p->update = false;
			return 0;
		}
		p->to_write = p->touched;
		p->new_bitmap = w->extended ? ((uint64_t)(zero & ~p->touched) << 32) | (alloc | p->touched) : 0;
		p->new_entry = w->extended ? p->old_entry : (p->old_entry & ~QCOW2_OFLAG_ZERO);
		p->announce = p->touched & ~alloc;
		p->update = true;
		return 0;
	}
	if (w->data_file) {
		p->host = p->guest;
		if (w->opts.data_file_limit && p->host + w->cs > w->opts.data_file_limit) {
			log_err("%s: guest offset 0x%" PRIx64 " lies beyond the data file limit.", w->img->path, p->guest);
			return -ENOSPC;
		}
	} else {
		r = alloc_cluster(w, &p->host, &p->fresh);
		if (r < 0)
			return r;
		p->alloc = true;
	}
	if (!w->extended || entry_compressed(p->old_entry)) {
		p->to_write = all;
		p->new_bitmap = w->extended ? L2_BITMAP_ALL_ALLOC : 0;
		/* nothing to copy around a partial write over zeros: a hole
		 * (cheap), then the written sectors only */
		if (!w->extended && p->alloc && w->ops.data_zero && (p->ws || p->we < w->cs) &&
		    (p->old_entry == QCOW2_OFLAG_ZERO || (!p->old_entry && backing_is_zero(w, p->guest, w->cs)))) {
			p->zero_first = p->range = true;
			p->wlo = p->ws & ~511U;
			p->whi = (uint32_t)MIN(round_up_pow2(p->we, 512), w->cs);
		}
	} else {
		p->to_write = (has ? alloc : 0) | p->touched;
		p->new_bitmap = ((uint64_t)(zero & ~p->touched) << 32) | p->to_write;
	}
	p->announce = p->to_write;
	p->new_entry = p->host | QCOW2_OFLAG_COPIED;
	p->update = true;
	return 0;
}

/* Whether the write [ws, we) covers every byte p writes. */
static bool covered(const struct qcow2_rw *w, const struct plan *p)
{
	if (p->range)
		return p->wlo == p->ws && p->whi == p->we;
	for (unsigned int i = 0; i < w->nsc; i++)
		if ((p->to_write & (1U << i)) && (i * w->scs < p->ws || (i + 1) * w->scs > p->we))
			return false;
	return true;
}

/* The content p writes: the user data where the write covers it, else the
 * cluster's current content around it (copy-on-write, or the partial
 * sectors of an overwrite). Changes nothing but p (unlocked: an op). */
static int prepare_source(struct qcow2_rw *w, struct plan *p, const uint8_t *data, uint8_t *scratch, bool unlocked)
{
	uint64_t gci = p->guest >> w->cb;
	int r;

	if (covered(w, p)) {
		p->src = data - p->ws;
		return 0;
	}
	if (p->range) {
		if (p->wlo < p->ws) {
			r = w->ops.data_pread(w->ops.opaque, scratch + p->wlo, 512, p->host + p->wlo);
			if (r < 0)
				return r;
		}
		/* the last sector, unless it is the first one, already read */
		if (p->whi > p->we && !(p->wlo < p->ws && p->whi - 512 == p->wlo)) {
			r = w->ops.data_pread(w->ops.opaque, scratch + p->whi - 512, 512, p->host + p->whi - 512);
			if (r < 0)
				return r;
		}
	} else {
		for (unsigned int i = 0; i < w->nsc; i++) {
			uint64_t a = i * w->scs, b = a + w->scs;

			if (!(p->to_write & (1U << i)))
				continue;
			if (a < p->ws && b > p->we) {
				/* both sides: one read of all of it, as QEMU
				 * does (one request, not two), the write copied
				 * over its middle below */
				r = read_cluster_part(w, gci, p->old_entry, p->old_bitmap, scratch, a, b, unlocked);
				if (r < 0)
					return r;
				continue;
			}
			if (a < p->ws) {
				r = read_cluster_part(w, gci, p->old_entry, p->old_bitmap, scratch, a, MIN(b, p->ws), unlocked);
				if (r < 0)
					return r;
			}
			if (b > p->we) {
				r = read_cluster_part(w, gci, p->old_entry, p->old_bitmap, scratch, MAX(a, p->we), b, unlocked);
				if (r < 0)
					return r;
			}
		}
	}
	memcpy(scratch + p->ws, data, p->we - p->ws);
	p->src = scratch;
	return 0;
}

/* Write what the chunk's plans write, merging host- and source-contiguous
 * pieces into one call. Changes nothing of the writer's (an op's step 3
 * runs it unlocked): the caller marks the data unflushed. */
static int write_chunk_data(struct qcow2_rw *w, struct plan *plan, size_t n)
{
	const uint8_t *src = NULL;
	uint64_t host = 0, len = 0;
	int r;

	for (size_t k = 0; k < n; k++) {
		struct plan *p = &plan[k];

		for (unsigned int i = 0; i < (p->range ? 1 : w->nsc); i++) {
			uint64_t a = p->range ? p->wlo : i * w->scs, b = p->range ? p->whi : a + w->scs;
			const uint8_t *s = p->src + a;
			uint64_t h = p->host + a;

			if (!p->range && !(p->to_write & (1U << i)))
				continue;
			if (len && host + len == h && src + len == s) {
				len += b - a;
				continue;
			}
			if (len) {
				r = w->ops.data_pwrite(w->ops.opaque, src, len, host);
				if (r < 0)
					goto fail;
			}
			src = s;
			host = h;
			len = b - a;
		}
	}
	if (len) {
		r = w->ops.data_pwrite(w->ops.opaque, src, len, host);
		if (r < 0)
			goto fail;
	}
	return 0;
fail:
	log_err("%s: cannot write data at host offset 0x%" PRIx64 ": %s.", w->img->path, host, strerror(-r));
	return r;
}

/* Undo the allocations of a chunk that failed before its L2 update. */
static void undo_chunk(struct qcow2_rw *w, struct plan *plan, size_t n)
{
	for (size_t k = 0; k < n; k++)
		if (plan[k].alloc && refcount_change(w, plan[k].host >> w->cb, -1) < 0)
			w->broken = true;
}

/* l2_slot_write with room for `room` queued decrements first: nothing may
 * write back between an entry update and the decrement it queues. */
static int l2_slot_for_update(struct qcow2_rw *w, uint64_t l1i, size_t room, struct slot **s)
{
	int r;

	if (w->n_deferred + room > DEFERRED_MAX) {
		r = writeback(w);
		if (r < 0)
			return r;
	}
	return l2_slot_write(w, l1i, s);
}

static int link_chunk(struct qcow2_rw *w, struct plan *plan, size_t n)
{
	int r;

	for (size_t k = 0; k < n; k++) {
		struct plan *p = &plan[k];
		uint64_t gci = p->guest >> w->cb, j = gci & (w->l2_entries - 1), old_host;
		struct slot *s;

		if (!p->update)
			continue;
		r = l2_slot_for_update(w, gci >> w->l2_bits, 1, &s);
		if (r < 0)
			return r;
		put_be64(s->buf + j * w->l2_esz, p->new_entry);
		if (w->extended)
			put_be64(s->buf + j * w->l2_esz + 8, p->new_bitmap);
		slot_mark(s, (uint32_t)(j * w->l2_esz), (uint32_t)((j + 1) * w->l2_esz));
		if (p->old_entry == w->cbuf_entry)
			w->cbuf_entry = 0;
		if (p->alloc || (w->data_file && !(p->old_entry & QCOW2_OFLAG_COPIED)))
			w->st.clusters_allocated++;
		/* what the old entry referred to is no longer ours */
		if (p->alloc) {
			if (entry_compressed(p->old_entry)) {
				uint64_t coff, clen;

				compressed_range(w, p->old_entry, &coff, &clen);
				w->deferred[w->n_deferred++] = (struct extent){ .off = coff, .len = clen };
			} else if (entry_host(w, p->old_entry, &old_host) && old_host) {
				w->deferred[w->n_deferred++] = (struct extent){ .off = old_host, .len = w->cs };
			}
		}
		for (unsigned int i = 0; i < w->nsc; i++)
			if (p->announce & (1U << i)) {
				r = add_map(w, p->guest + i * w->scs, w->scs, p->host + i * w->scs);
				if (r < 0)
					return r;
			}
	}
	return 0;
}

/* Whether a write in flight (an op) holds one of guest clusters [c0, c1). */
static bool held(const struct qcow2_rw *w, uint64_t c0, uint64_t c1)
{
	for (const struct qcow2_rw_op *op = w->active; op; op = op->next)
		if (c0 < op->c1 && op->c0 < c1)
			return true;
	return false;
}

/* Steps 1 and 2 of the chunk [guest, guest + len) (one cluster at least,
 * at most PLAN_MAX) into plan; *n: its clusters. Nothing to undo on a
 * failure. */
static int chunk_plan(struct qcow2_rw *w, struct plan *plan, uint64_t guest, uint64_t len, size_t *n)
{
	uint64_t g = guest, end = guest + len;
	size_t k = 0;
	int r;

	/* 1. the entries (and writable L2 tables) */
	for (; g < end; k++) {
		struct plan *p = &plan[k];
		uint64_t gci = g >> w->cb, off = g & (w->cs - 1), cn = MIN(end - g, w->cs - off);
		struct slot *s;

		memset(p, 0, sizeof(*p));
		p->guest = gci << w->cb;
		p->ws = (uint32_t)off;
		p->we = (uint32_t)(off + cn);
		r = l2_slot_write(w, gci >> w->l2_bits, &s);
		if (r < 0)
			return r;
		p->old_entry = get_be64(s->buf + (gci & (w->l2_entries - 1)) * w->l2_esz);
		if (w->extended)
			p->old_bitmap = get_be64(s->buf + (gci & (w->l2_entries - 1)) * w->l2_esz + 8);
		g += cn;
	}
	*n = k;
	/* 2. allocations */
	for (k = 0; k < *n; k++) {
		r = plan_cluster(w, &plan[k]);
		if (r < 0) {
			undo_chunk(w, plan, k);
			return r;
		}
	}
	return 0;
}

/* Step 3: the data of the chunk planned for the write of data at guest.
 * Only the first and the last cluster of a request can be partly written:
 * the first has ws > 0 (its copy in head), the last ws == 0 (tail).
 * Changes nothing but the plans: an op runs it unlocked (-EAGAIN: a read
 * needs the lock). */
static int chunk_io(struct qcow2_rw *w, struct plan *plan, size_t n, const uint8_t *data, uint64_t guest,
		    uint8_t *head, uint8_t *tail, bool unlocked)
{
	int r;

	for (size_t k = 0; k < n; k++) {
		struct plan *p = &plan[k];

		/* no cheap zeros there: the whole cluster written, as without;
		 * a hole never written reads zeros already */
		if (p->zero_first && !p->fresh &&
		    (!w->ops.data_zero || w->ops.data_zero(w->ops.opaque, w->cs, p->host) < 0))
			p->zero_first = p->range = false;
		r = prepare_source(w, p, data + (p->guest + p->ws - guest), p->ws ? head : tail, unlocked);
		if (r < 0)
			return r;
	}
	return write_chunk_data(w, plan, n);
}

/* Step 4 after chunk_io returned r (the data possibly written either way),
 * or the allocations undone. */
static int chunk_end(struct qcow2_rw *w, struct plan *plan, size_t n, int r)
{
	w->data_unflushed = true;
	if (r < 0) {
		undo_chunk(w, plan, n);
		return r;
	}
	for (size_t k = 0; k < n; k++) {
		if (plan[k].zero_first && plan[k].fresh)
			w->st.zero_skipped++;
		if (!plan[k].range && !covered(w, &plan[k]))
			w->st.cow_clusters++;
	}
	r = link_chunk(w, plan, n);
	if (r < 0)
		w->broken = true;
	return r;
}

static int write_chunk(struct qcow2_rw *w, const uint8_t *data, uint64_t guest, uint64_t len)
{
	size_t n;
	int r;

	r = chunk_plan(w, w->plan, guest, len, &n);
	if (r < 0)
		return r;
	r = chunk_io(w, w->plan, n, data, guest, w->head_buf, w->tail_buf, false);
	return chunk_end(w, w->plan, n, r);
}

/* ---- allocation ahead ---- */

/* Make [host, host + len) of the data read zeros: data_zero, or (unless
 * cheap_only) zeros written. No message: the callers fall back (a failed
 * zeroing only costs the optimisation that needed it). */
static int zero_data(struct qcow2_rw *w, uint64_t host, uint64_t len, bool cheap_only)
{
	int r = -EOPNOTSUPP;

	if (w->ops.data_zero)
		r = w->ops.data_zero(w->ops.opaque, len, host);
	while (r == -EOPNOTSUPP && len && !cheap_only) {
		size_t n = (size_t)MIN(len, (uint64_t)w->zero_len);
		int q = w->ops.data_pwrite(w->ops.opaque, w->zero_buf, n, host);

		if (q < 0)
			r = q;
		host += n;
		len -= n;
	}
	if (r == -EOPNOTSUPP && !cheap_only)
		r = 0;
	if (r == 0)
		w->data_unflushed = true;
	return r;
}

static void track_ahead(struct qcow2_rw *w, uint64_t guest, uint64_t len)
{
	struct extent *last = w->n_ahead ? &w->ahead[(w->ahead_pos + AHEAD_TRACK - 1) % AHEAD_TRACK] : NULL;

	if (last && last->off + last->len == guest) {
		last->len += len;
		return;
	}
	/* a full ring forgets the oldest window: it stays mapped (zeros) */
	w->ahead[w->ahead_pos] = (struct extent){ .off = guest, .len = len };
	w->ahead_pos = (w->ahead_pos + 1) % AHEAD_TRACK;
	if (w->n_ahead < AHEAD_TRACK)
		w->n_ahead++;
}

/* Remember a window mapped around a random write; with no room (memory,
 * AHEAD_SPARSE_MAX) it is forgotten, as a full ring forgets: it stays
 * mapped (zeros). */
static void track_sparse(struct qcow2_rw *w, uint64_t guest, uint64_t len)
{
	struct extent *last = w->n_sparse ? &w->sparse[w->n_sparse - 1] : NULL;

	if (last && last->off + last->len == guest) {
		last->len += len;
		return;
	}
	if (w->n_sparse == w->sparse_cap) {
		size_t cap = MIN(MAX(2 * w->sparse_cap, (size_t)64), (size_t)AHEAD_SPARSE_MAX);
		struct extent *x = cap > w->sparse_cap ? realloc(w->sparse, cap * sizeof(*x)) : NULL;

		if (!x)
			return;
		w->sparse = x;
		w->sparse_cap = cap;
	}
	w->sparse[w->n_sparse++] = (struct extent){ .off = guest, .len = len };
}

/* Map up to n unallocated clusters from guest cluster gci on (inside one L2
 * table) to new zeroed clusters, as a write of zeros would (allocation,
 * zeros, then the entries): stops at the first cluster that is not
 * unallocated. Only what needs no new metadata cluster: an L2 table of
 * its own already there, refcount blocks already there (the writer's own
 * writes make those, and only they may fail for them); a failed zeroing
 * gives the clusters back before anything refers to them. *done: clusters
 * mapped. */
static int map_ahead_run(struct qcow2_rw *w, uint64_t gci, uint64_t n, bool sparse, uint64_t *done, bool *holes)
{
	uint64_t l1i = gci >> w->l2_bits, j0 = gci & (w->l2_entries - 1), host, k;
	struct slot *s;
	bool fresh = false;
	int r;

	*done = 0;
	*holes = false;
	n = MIN(n, w->l2_entries - j0);
	if (l1i >= w->img->l1_size || !(w->img->l1[l1i] & QCOW2_OFLAG_COPIED))
		return 0;
	r = l2_slot_read(w, l1i, &s);
	if (r < 0 || !s)
		return r;
	for (k = 0; k < n; k++) {
		const uint8_t *e = s->buf + (j0 + k) * w->l2_esz;

		if (get_be64(e) || (w->extended && get_be64(e + 8)) || held(w, gci + k, gci + k + 1))
			break;
	}
	n = k;
	if (!n)
		return 0;
	/* as many as fit before a refcount block to make or the file limit */
	do
		r = alloc_clusters(w, n, false, &host, &fresh);
	while (r == -ENOSPC && (n /= 2));
	if (r < 0)
		return r;
	if (fresh)
		w->st.zero_skipped += n;
	else
		r = zero_data(w, host, n << w->cb, false);
	if (r == 0)
		r = l2_slot_for_update(w, l1i, 0, &s);
	if (r < 0) {
		for (k = 0; k < n; k++)
			if (refcount_change(w, (host >> w->cb) + k, -1) < 0)
				w->broken = true;
		return r;
	}
	for (k = 0; k < n; k++) {
		uint64_t j = j0 + k;

		put_be64(s->buf + j * w->l2_esz, (host + (k << w->cb)) | QCOW2_OFLAG_COPIED);
		if (w->extended)
			put_be64(s->buf + j * w->l2_esz + 8, L2_BITMAP_ALL_ALLOC);
	}
	slot_mark(s, (uint32_t)(j0 * w->l2_esz), (uint32_t)((j0 + n) * w->l2_esz));
	r = add_map(w, gci << w->cb, n << w->cb, host);
	if (r < 0) {
		w->broken = true;
		return r;
	}
	w->st.ahead_clusters += n;
	if (sparse)
		track_sparse(w, gci << w->cb, n << w->cb);
	else
		track_ahead(w, gci << w->cb, n << w->cb);
	*done = n;
	*holes = fresh;
	return 0;
}

/* Whether the next new clusters come from where the file was never
 * written (holes: no zeroing), len bytes of them at least. */
static bool alloc_is_fresh(const struct qcow2_rw *w, uint64_t len)
{
	uint64_t next = w->free_hint << w->cb;

	return w->fresh_from != UINT64_MAX && next >= w->fresh_from && next + len <= w->meta_size;
}

/* The largest window ahead of a sequential writer: larger where its
 * clusters cost no zeroing (and no room in the file until written). */
static uint64_t ahead_cap(const struct qcow2_rw *w)
{
	uint64_t cap = alloc_is_fresh(w, w->opts.ahead_fresh_max) ? MAX(w->opts.ahead_fresh_max, w->opts.ahead_max)
								   : w->opts.ahead_max;

	return MAX(cap, w->cs);
}

/* Map the clusters of guest [from, to) ahead of the writer, up to the
 * first one that is allocated; the window ends there. When they all came
 * from holes, the first of them is the probe: the writer's first write
 * there makes it data, which qcow2_rw_ahead_poll sees while the writer
 * is still on the fast path. */
static void map_ahead(struct qcow2_rw *w, uint64_t from, uint64_t to)
{
	uint64_t gci = from >> w->cb, end = round_up_pow2(MIN(to, w->img->size), w->cs) >> w->cb, done = 0;
	bool holes = true, h;
	int r = 0;

	while (gci < end) {
		r = map_ahead_run(w, gci, end - gci, false, &done, &h);
		if (r < 0 || !done)
			break;
		holes &= h;
		gci += done;
	}
	if (r < 0)
		log_dbg("%s: no allocation ahead at guest offset 0x%" PRIx64 ": %s", w->img->path, gci << w->cb,
			strerror(-r));
	w->ahead_probe = 0;
	if ((gci << w->cb) > from) {
		if (holes && w->ops.data_extent)
			w->ahead_probe = round_up_pow2(from, w->cs);
		if (w->ops.kick)
			w->ops.kick(w->ops.opaque);
	}
	w->ahead_end = gci << w->cb;
}

/* After a write of guest [guest, end) (allocated: it took new clusters):
 * keep a window of mapped clusters ahead of a sequential writer. The
 * writer is sequential when it goes on where its last write ended, or at
 * the end of the window (its writes inside went to the fast path, unseen
 * here): then the window doubles. */
static void ahead_after_write(struct qcow2_rw *w, uint64_t guest, uint64_t end, bool allocated)
{
	bool frontier = w->ahead_end && guest == w->ahead_end;
	bool seq = guest == w->seq_next || frontier;
	bool inside = guest >= w->ahead_start && guest < w->ahead_end;
	uint64_t next = round_up_pow2(end, w->cs), cap = ahead_cap(w);
	uint64_t first = MAX(alloc_is_fresh(w, AHEAD_FRESH_FIRST) ? AHEAD_FRESH_FIRST : AHEAD_FIRST, w->cs);

	w->seq_next = end;
	if (!w->opts.ahead_max || w->data_file || w->ops.backing_pread || w->broken || !seq)
		return;
	if (frontier && allocated) {
		w->ahead_window = MIN(w->ahead_window * 2, MAX(cap, first));
		w->ahead_start = guest;
		w->ahead_end = next;
	} else if (allocated && !inside) {
		/* a new sequential writer */
		w->ahead_window = MIN(first, cap);
		w->ahead_start = w->ahead_end = next;
	} else if (!inside) {
		return;
	}
	/* enough left ahead of it */
	if (w->ahead_end > next && w->ahead_end - next >= w->ahead_window / 2)
		return;
	map_ahead(w, MAX(w->ahead_end, next), next + w->ahead_window);
}

/* Where guest cluster gci is while its entry is still as allocation ahead
 * made it, whatever was written in it (a standard cluster this image owns
 * alone): *host, or 0 when not; *bm its subcluster bitmap. */
static int ahead_entry_host(struct qcow2_rw *w, uint64_t gci, uint64_t *host, uint64_t *bm)
{
	uint64_t e;
	int r = get_entry(w, gci, &e, bm);

	if (r < 0 || !(e & QCOW2_OFLAG_COPIED) || entry_compressed(e) || !entry_host(w, e, host))
		*host = 0;
	return r;
}

uint64_t qcow2_rw_ahead_probe(const struct qcow2_rw *w)
{
	return w->ahead_probe;
}

int qcow2_rw_ahead_poll(struct qcow2_rw *w)
{
	uint64_t bm, host, len, end = w->ahead_end;
	bool is_data;

	if (!w->ahead_probe || w->broken)
		return 0;
	/* still as mapped ahead (a release or a discard ends the probe) */
	if (ahead_entry_host(w, w->ahead_probe >> w->cb, &host, &bm) < 0 || !host) {
		w->ahead_probe = 0;
		return 0;
	}
	if (w->ops.data_extent(w->ops.opaque, host, &len, &is_data) < 0 || !is_data)
		return 0;
	/* the writer is in the last window: the next one, twice as large */
	w->st.ahead_polled++;
	w->ahead_window = MIN(w->ahead_window * 2, ahead_cap(w));
	map_ahead(w, end, end + w->ahead_window);
	return w->ahead_end > end;
}

/* Before a write of guest [guest, end) that does not go on where the last
 * one ended (ahead_sparse): when its first cluster is unallocated and new
 * clusters cost no zeroing (the free space starts where the file was never
 * written), map the unallocated clusters of the aligned window around it,
 * the write's own included, in one host run where they are contiguous.
 * The window counts as the current one: a writer that reaches its end
 * goes on as a sequential one. */
static void ahead_sparse(struct qcow2_rw *w, uint64_t guest)
{
	uint64_t win = MAX(MIN(AHEAD_SPARSE, w->opts.ahead_max), w->cs), from = guest / win * win;
	uint64_t end = round_up_pow2(MIN(from + win, w->img->size), w->cs) >> w->cb, gci, e, bm, done;
	bool mapped = false, holes;
	int r = 0;

	if (!w->opts.ahead_sparse || !w->opts.ahead_max || w->data_file || w->broken || !alloc_is_fresh(w, win) ||
	    guest == w->seq_next || (w->ahead_end && guest == w->ahead_end))
		return;
	/* enough remembered: no more */
	if (w->n_sparse == AHEAD_SPARSE_MAX || get_entry(w, guest >> w->cb, &e, &bm) < 0 || e || bm ||
	    !backing_is_zero(w, from, win))
		return;
	for (gci = from >> w->cb; gci < end && r == 0; gci += done ? done : 1) {
		r = map_ahead_run(w, gci, end - gci, true, &done, &holes);
		mapped |= done > 0;
	}
	if (r < 0)
		log_dbg("%s: no allocation ahead at guest offset 0x%" PRIx64 ": %s", w->img->path, gci << w->cb,
			strerror(-r));
	if (!mapped)
		return;
	w->st.ahead_sparse_windows++;
	w->ahead_start = from;
	w->ahead_end = end << w->cb;
	w->ahead_window = win;
	w->ahead_probe = 0;
	if (w->ops.kick)
		w->ops.kick(w->ops.opaque);
}

/* Whether the cluster at host reads zeros: a hole, or zeros read. */
static bool cluster_is_zero(struct qcow2_rw *w, uint64_t host)
{
	uint64_t len;
	bool is_data;
	int r = w->ops.data_extent ? w->ops.data_extent(w->ops.opaque, host, &len, &is_data) : -EOPNOTSUPP;

	if (r == -ENXIO || (r == 0 && !is_data && len >= w->cs))
		return true;
	/* unreadable: left mapped, as it is */
	return w->ops.data_pread(w->ops.opaque, w->head_buf, w->cs, host) == 0 && buf_is_zero(w->head_buf, w->cs);
}

/* release_ahead for the guest range x. */
static int release_range(struct qcow2_rw *w, const struct extent *x)
{
	int r = 0;

	for (uint64_t g = x->off; g < x->off + x->len && r == 0; g += w->cs) {
		uint64_t gci = g >> w->cb, bm, host, j = gci & (w->l2_entries - 1);
		struct slot *s;

		r = ahead_entry_host(w, gci, &host, &bm);
		if (r < 0 || !host || (w->extended && bm != L2_BITMAP_ALL_ALLOC) || !cluster_is_zero(w, host))
			continue;
		r = l2_slot_for_update(w, gci >> w->l2_bits, 1, &s);
		if (r < 0)
			break;
		put_be64(s->buf + j * w->l2_esz, 0);
		if (w->extended)
			put_be64(s->buf + j * w->l2_esz + 8, 0);
		slot_mark(s, (uint32_t)(j * w->l2_esz), (uint32_t)((j + 1) * w->l2_esz));
		w->deferred[w->n_deferred++] = (struct extent){ .off = host, .len = w->cs };
		w->st.ahead_released++;
	}
	return r;
}

int qcow2_rw_release_ahead(struct qcow2_rw *w)
{
	int r = 0;

	if (w->opts.read_only)
		return 0;
	if (w->broken)
		return -EIO;
	if (w->n_active)
		return -EBUSY;
	for (size_t i = 0; i < w->n_ahead && r == 0; i++)
		r = release_range(w, &w->ahead[i]);
	for (size_t i = 0; i < w->n_sparse && r == 0; i++)
		r = release_range(w, &w->sparse[i]);
	w->n_ahead = w->ahead_pos = w->n_sparse = 0;
	w->ahead_start = w->ahead_end = w->ahead_probe = 0;
	if (r < 0)
		log_err("%s: cannot release the clusters mapped ahead: %s.", w->img->path, strerror(-r));
	return r;
}

static int write_check(struct qcow2_rw *w, size_t len, uint64_t guest)
{
	if (w->opts.read_only)
		return -EROFS;
	if (w->broken)
		return -EIO;
	if (guest > w->img->size || len > w->img->size - guest)
		return -EINVAL;
	if (len && held(w, guest >> w->cb, ((guest + len - 1) >> w->cb) + 1))
		return -EBUSY;
	return 0;
}

/* After a write of guest [start, end), allocating or not. */
static int after_write(struct qcow2_rw *w, uint64_t start, uint64_t end, bool allocated)
{
	ahead_after_write(w, start, end, allocated);
	return w->opts.write_through ? writeback(w) : 0;
}

int qcow2_rw_write(struct qcow2_rw *w, const void *buf, size_t len, uint64_t guest)
{
	const uint8_t *p = buf;
	uint64_t end, start = guest, allocated = w->st.clusters_allocated;
	int r;

	r = write_check(w, len, guest);
	if (r < 0)
		return r;
	end = guest + len;
	ahead_sparse(w, guest);
	while (guest < end) {
		/* chunks end on cluster boundaries */
		uint64_t chunk_end = MIN(end, ((guest >> w->cb) + PLAN_MAX) << w->cb);

		r = write_chunk(w, p, guest, chunk_end - guest);
		if (r < 0)
			return r;
		p += chunk_end - guest;
		guest = chunk_end;
	}
	return after_write(w, start, end, w->st.clusters_allocated != allocated);
}

struct qcow2_rw_op *qcow2_rw_op_new(struct qcow2_rw *w)
{
	struct qcow2_rw_op *op;

	if (w->opts.read_only || w->cs > OP_CLUSTER_MAX)
		return NULL;
	op = calloc(1, sizeof(*op));
	if (op)
		op->scratch = alloc_aligned(w->cs);
	if (!op || !op->scratch) {
		free(op);
		return NULL;
	}
	/* written now: present (the daemon locks what is present) */
	memset(op->scratch, 0, w->cs);
	op->w = w;
	return op;
}

void qcow2_rw_op_free(struct qcow2_rw_op *op)
{
	if (!op)
		return;
	free(op->scratch);
	free(op);
}

/* Whether the planned op must do its step 3 under the lock: a compressed
 * cluster to read (the writer's buffers), or more than one part to copy
 * (one scratch buffer). */
static bool op_needs_lock(struct qcow2_rw *w, const struct qcow2_rw_op *op)
{
	unsigned int copies = 0;

	for (size_t k = 0; k < op->n; k++) {
		if (entry_compressed(op->plan[k].old_entry))
			return true;
		copies += !covered(w, &op->plan[k]);
	}
	return copies > 1;
}

int qcow2_rw_write_begin(struct qcow2_rw *w, struct qcow2_rw_op *op, const void *buf, size_t len, uint64_t guest)
{
	uint64_t allocated = w->st.clusters_allocated;
	int r;

	r = write_check(w, len, guest);
	if (r < 0 || !len)
		return r;
	if (!op || ((guest + len - 1) >> w->cb) - (guest >> w->cb) >= OP_PLAN_MAX)
		return qcow2_rw_write(w, buf, len, guest);
	ahead_sparse(w, guest);
	op->data = buf;
	op->guest = guest;
	op->len = len;
	r = chunk_plan(w, op->plan, guest, len, &op->n);
	if (r < 0)
		return r;
	if (op_needs_lock(w, op)) {
		r = chunk_io(w, op->plan, op->n, buf, guest, w->head_buf, w->tail_buf, false);
		r = chunk_end(w, op->plan, op->n, r);
		return r < 0 ? r : after_write(w, guest, guest + len, w->st.clusters_allocated != allocated);
	}
	op->c0 = guest >> w->cb;
	op->c1 = op->c0 + op->n;
	op->next = w->active;
	w->active = op;
	w->n_active++;
	return 1;
}

int qcow2_rw_op_io(struct qcow2_rw_op *op, bool locked)
{
	return chunk_io(op->w, op->plan, op->n, op->data, op->guest, op->scratch, op->scratch, !locked);
}

int qcow2_rw_op_end(struct qcow2_rw_op *op, int r)
{
	struct qcow2_rw *w = op->w;
	uint64_t allocated = w->st.clusters_allocated;

	for (struct qcow2_rw_op **pp = &w->active; *pp; pp = &(*pp)->next)
		if (*pp == op) {
			*pp = op->next;
			w->n_active--;
			break;
		}
	op->next = NULL;
	r = chunk_end(w, op->plan, op->n, r);
	return r < 0 ? r : after_write(w, op->guest, op->guest + op->len, w->st.clusters_allocated != allocated);
}

unsigned int qcow2_rw_in_flight(const struct qcow2_rw *w)
{
	return w->n_active;
}

/* ---- writeback ---- */

static int write_dirty_l1(struct qcow2_rw *w)
{
	uint8_t e[8];
	int r;

	for (size_t i = 0; i < w->n_dirty_l1; i++) {
		uint32_t k = w->dirty_l1[i];

		put_be64(e, w->img->l1[k]);
		r = meta_write(w, e, 8, w->img->l1_table_offset + (uint64_t)k * 8);
		if (r < 0)
			return r;
	}
	w->n_dirty_l1 = 0;
	return 0;
}

static int writeback(struct qcow2_rw *w)
{
	bool l2_dirty = cache_has_dirty(&w->l2c) || w->n_dirty_l1;
	int r;

	if (w->broken)
		return -EIO;
	if (!l2_dirty && !w->n_maps && !w->n_deferred && !cache_has_dirty(&w->rbc))
		return 0;
	w->st.writebacks++;
	/* 1. refcounts (increments) */
	r = cache_write_all(w, &w->rbc);
	if (r < 0)
		return r;
	/* 2. data and refcounts durable before the entries that use them */
	if (l2_dirty && w->data_unflushed)
		r = data_flush(w);
	if (!r && l2_dirty && w->meta_unflushed)
		r = meta_flush(w);
	/* 3. L2 tables; 4. L1 entries once new tables are durable */
	if (!r)
		r = cache_write_all(w, &w->l2c);
	if (!r && w->n_dirty_l1) {
		r = meta_flush(w);
		if (!r)
			r = write_dirty_l1(w);
	}
	/* 5. durable: the mappings may be announced, the decrements written */
	if (!r && w->meta_unflushed)
		r = meta_flush(w);
	if (r < 0)
		return r;
	for (size_t i = 0; i < w->n_maps; i++)
		if (w->ops.mapped)
			w->ops.mapped(w->ops.opaque, w->maps[i].guest, w->maps[i].len, w->maps[i].host);
	w->n_maps = 0;
	r = apply_deferred(w);
	if (r == 0)
		r = cache_write_all(w, &w->rbc);
	if (r < 0)
		w->broken = true;
	return r;
}

int qcow2_rw_writeback(struct qcow2_rw *w)
{
	if (w->opts.read_only)
		return 0;
	return writeback(w);
}

bool qcow2_rw_has_pending(const struct qcow2_rw *w)
{
	return !w->opts.read_only && (w->n_maps || w->n_deferred || w->n_dirty_l1 || cache_has_dirty(&w->l2c) ||
				      cache_has_dirty(&w->rbc));
}

bool qcow2_rw_is_broken(const struct qcow2_rw *w)
{
	return w->broken;
}

int qcow2_rw_flush(struct qcow2_rw *w)
{
	int r;

	if (w->opts.read_only)
		return 0;
	r = writeback(w);
	if (r == 0 && w->data_unflushed)
		r = data_flush(w);
	if (r == 0 && w->meta_unflushed)
		r = meta_flush(w);
	return r;
}

/* ---- resize ---- */

/* A larger active L1 table of new_l1 entries, in QEMU's order: new
 * clusters allocated and their refcounts made durable, the table written
 * and flushed, the header switched to it (l1_size and l1_table_offset,
 * adjacent: 12 bytes in one sector) and flushed, and only then the old
 * table freed. Called with nothing pending (written back). */
static int grow_l1(struct qcow2_rw *w, uint64_t new_l1)
{
	struct image *img = w->img;
	uint64_t old_off = img->l1_table_offset, old_n = img->l1_size, nc, off;
	uint8_t *buf = NULL, hdr[12];
	uint64_t *l1 = NULL;
	int r;

	if (new_l1 > QCOW2_MAX_L1_BYTES / 8) {
		log_err("%s: the L1 table would exceed %u bytes (use a larger cluster size).", img->path,
			QCOW2_MAX_L1_BYTES);
		return -EFBIG;
	}
	nc = (new_l1 * 8 + w->cs - 1) >> w->cb;
	buf = alloc_aligned((size_t)(nc * w->cs));
	l1 = calloc(new_l1, sizeof(*l1));
	if (!buf || !l1) {
		r = -ENOMEM;
		goto out;
	}
	r = alloc_clusters(w, nc, true, &off, NULL);
	if (r < 0)
		goto out;
	r = cache_write_all(w, &w->rbc);
	if (!r)
		r = meta_flush(w);
	for (uint64_t i = 0; i < old_n; i++) {
		l1[i] = img->l1[i];
		put_be64(buf + i * 8, l1[i]);
	}
	if (!r)
		r = meta_write(w, buf, (size_t)(nc * w->cs), off);
	if (!r)
		r = meta_flush(w);
	put_be32(hdr, (uint32_t)new_l1);
	put_be64(hdr + 4, off);
	if (!r)
		r = meta_write(w, hdr, sizeof(hdr), QCOW2_HDR_L1_SIZE);
	if (!r)
		r = meta_flush(w);
	if (r) {
		/* the header may name either table: keep both referenced */
		goto out;
	}
	free(img->l1);
	img->l1 = l1;
	l1 = NULL;
	img->l1_size = (uint32_t)new_l1;
	img->map_l1_size = (uint32_t)new_l1;
	img->l1_table_offset = off;
	log_dbg("%s: L1 table grown to %" PRIu64 " entries at 0x%" PRIx64, img->path, new_l1, off);
	/* referenced by nothing durable any more */
	for (uint64_t c = 0; old_n && c < (old_n * 8 + w->cs - 1) >> w->cb; c++) {
		r = refcount_change(w, (old_off >> w->cb) + c, -1);
		if (r < 0)
			break;
	}
out:
	free(buf);
	free(l1);
	return r;
}

/* [from, to) of the guest (from a subcluster boundary, to the new size)
 * reads as zeros: zero flags in the L2 entries (QEMU's zeroize of a grown
 * area over a backing file). A cluster partly before from keeps its other
 * subclusters; a compressed one there is left alone (its bytes past the old
 * size are zeros). */
static int zero_area(struct qcow2_rw *w, uint64_t from, uint64_t to)
{
	for (uint64_t g = from; g < to;) {
		uint64_t gci = g >> w->cb, j = gci & (w->l2_entries - 1), cend = (gci + 1) << w->cb, e, bm, ne, nbm;
		uint64_t coff, clen;
		uint32_t mask = sc_mask(w, g - (gci << w->cb), MIN(to, cend) - (gci << w->cb));
		struct slot *s;
		int r;

		/* room for a copied table's decrement and the entry's */
		r = l2_slot_for_update(w, gci >> w->l2_bits, 2, &s);
		if (r < 0)
			return r;
		e = get_be64(s->buf + j * w->l2_esz);
		bm = w->extended ? get_be64(s->buf + j * w->l2_esz + 8) : 0;
		ne = e;
		if (entry_compressed(e) && (g & (w->cs - 1))) {
			g = cend;
			continue;
		}
		if (entry_compressed(e)) {
			compressed_range(w, e, &coff, &clen);
			w->deferred[w->n_deferred++] = (struct extent){ .off = coff, .len = clen };
			ne = w->extended ? 0 : QCOW2_OFLAG_ZERO;
			bm = 0;
		} else if (!w->extended) {
			ne = e | QCOW2_OFLAG_ZERO;
		}
		/* extended: the entry keeps its cluster, the subclusters turn zero */
		nbm = w->extended ? (bm & ~(uint64_t)mask) | ((uint64_t)mask << 32) : 0;
		put_be64(s->buf + j * w->l2_esz, ne);
		if (w->extended)
			put_be64(s->buf + j * w->l2_esz + 8, nbm);
		slot_mark(s, (uint32_t)(j * w->l2_esz), (uint32_t)((j + 1) * w->l2_esz));
		if (e == w->cbuf_entry)
			w->cbuf_entry = 0;
		g = cend;
	}
	return 0;
}

/* Whether a guest cluster at or past new_size (or, extended L2, a
 * subcluster) holds data: what a shrink would discard. */
static int allocated_past(struct qcow2_rw *w, uint64_t new_size, uint64_t *where)
{
	for (uint64_t gci = new_size >> w->cb; gci << w->cb < w->img->size; gci++) {
		uint64_t g = gci << w->cb, e, bm, host;
		uint32_t alloc, zero;
		int r;

		if (!(gci & (w->l2_entries - 1)) && (gci >> w->l2_bits) < w->img->l1_size &&
		    !(w->img->l1[gci >> w->l2_bits] & QCOW2_L1E_OFFSET_MASK)) {
			gci += w->l2_entries - 1;	/* no L2 table */
			continue;
		}
		r = get_entry(w, gci, &e, &bm);
		if (r < 0)
			return r;
		entry_bits(w, e, bm, &alloc, &zero);
		if (g >= new_size ? entry_compressed(e) || entry_host(w, e, &host)
				  : w->extended && (alloc & ~sc_mask(w, 0, new_size - g))) {
			*where = g;
			return 1;
		}
	}
	return 0;
}

/* Free the L2 tables of the active L1 from entry new_l1 on (QEMU's L1
 * shrink: the entries zeroed on disk and flushed, then the tables freed;
 * the header keeps its l1_size). Nothing they map is allocated. */
static int shrink_l1(struct qcow2_rw *w, uint64_t new_l1)
{
	struct image *img = w->img;
	uint64_t n = img->l1_size - new_l1;
	uint8_t *zeros;
	int r;

	zeros = calloc(n, 8);
	if (!zeros)
		return -ENOMEM;
	r = meta_write(w, zeros, (size_t)(n * 8), img->l1_table_offset + new_l1 * 8);
	free(zeros);
	if (!r)
		r = meta_flush(w);
	if (r)
		return r;
	for (uint64_t i = new_l1; i < img->l1_size; i++) {
		uint64_t off = img->l1[i] & QCOW2_L1E_OFFSET_MASK;

		img->l1[i] = 0;
		if (!off)
			continue;
		cache_forget(&w->l2c, off);
		r = refcount_change(w, off >> w->cb, -1);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Zeros over the part of the subcluster holding the old end that lies past
 * it, when that part would read otherwise: allocated (bytes left by an
 * earlier shrink) or from a backing file that reaches there. */
static int zero_head(struct qcow2_rw *w, uint64_t old, uint64_t new_size, uint64_t backing_size)
{
	uint64_t end = MIN(round_up_pow2(old, w->scs), new_size), e, bm;
	uint32_t alloc, zero, sc;
	uint8_t *z;
	int r;

	if (end <= old)
		return 0;
	r = get_entry(w, old >> w->cb, &e, &bm);
	if (r < 0)
		return r;
	entry_bits(w, e, bm, &alloc, &zero);
	sc = 1U << ((old & (w->cs - 1)) / w->scs);
	if (!entry_compressed(e) && !(alloc & sc) && ((zero & sc) || backing_size <= old || !w->ops.backing_pread))
		return 0;
	z = calloc(1, (size_t)(end - old));
	if (!z)
		return -ENOMEM;
	r = qcow2_rw_write(w, z, (size_t)(end - old), old);
	free(z);
	return r;
}

static int write_size(struct qcow2_rw *w, uint64_t size)
{
	int r = write_header_u64(w, QCOW2_HDR_SIZE, size);

	if (!r)
		r = meta_flush(w);
	return r;
}

/* The guest size, which the daemon's request readers load without the
 * writer's lock (atomically: a resize may run meanwhile). */
static void set_size(struct image *img, uint64_t size)
{
	__atomic_store_n(&img->size, size, __ATOMIC_RELAXED);
}

int qcow2_rw_resize(struct qcow2_rw *w, uint64_t new_size, bool allow_shrink)
{
	struct image *img = w->img;
	uint64_t old = img->size, per_l1 = w->l2_entries << w->cb, new_l1, where = 0;
	uint64_t backing_size = img->backing ? img->backing->map_size : 0;
	int r;

	if (w->opts.read_only)
		return -EROFS;
	if (w->broken)
		return -EIO;
	if (w->n_active)
		return -EBUSY;
	if (!img->backing && w->ops.backing_pread)
		backing_size = w->opts.backing_size ? w->opts.backing_size : UINT64_MAX;
	if (new_size % 512 || !new_size) {
		log_err("%s: the new size must be a positive multiple of 512 bytes.", img->path);
		return -EINVAL;
	}
	if (new_size == old)
		return 0;
	if (new_size < old && !allow_shrink) {
		log_err("%s: shrinking the image may lose data: it takes the shrink option.", img->path);
		return -EINVAL;
	}
	if (w->data_file) {
		log_err("%s: images with an external data file cannot be resized here.", img->path);
		return -ENOTSUP;
	}
	if (img->nb_snapshots && img->version < 3) {
		log_err("%s: a version 2 image with snapshots cannot be resized.", img->path);
		return -ENOTSUP;
	}
	if (new_size > INT64_MAX - per_l1) {
		log_err("%s: %" PRIu64 " bytes is too large.", img->path, new_size);
		return -EFBIG;
	}
	new_l1 = (new_size + per_l1 - 1) / per_l1;
	r = writeback(w);
	if (r < 0)
		return r;
	if (new_size < old) {
		r = allocated_past(w, new_size, &where);
		if (r > 0) {
			log_err("%s: guest offset %" PRIu64 " past the new size is allocated: not shrunk.", img->path,
				where);
			return -ENOTEMPTY;
		}
		if (r == 0)
			r = write_size(w, new_size);
		if (r < 0)
			return r;
		set_size(img, new_size);
		img->map_size = new_size;
		if (new_l1 < img->l1_size)
			r = shrink_l1(w, new_l1);
		if (!r)
			r = writeback(w);
		return r;
	}
	/* grow: the area the backing file would show through reads zeros */
	if (backing_size > old && img->version < 3) {
		log_err("%s: growing a version 2 image over its backing file needs zero clusters (version 3).",
			img->path);
		return -ENOTSUP;
	}
	if (new_l1 > img->l1_size) {
		r = grow_l1(w, new_l1);
		if (r < 0)
			return r;
	}
	set_size(img, new_size);
	r = zero_head(w, old, new_size, backing_size);
	if (!r && backing_size > old && round_up_pow2(old, w->scs) < new_size)
		r = zero_area(w, round_up_pow2(old, w->scs), new_size);
	if (!r)
		r = qcow2_rw_flush(w);
	if (!r)
		r = write_size(w, new_size);
	if (r < 0) {
		set_size(img, old);
		return r;
	}
	img->map_size = new_size;
	log_dbg("%s: resized from %" PRIu64 " to %" PRIu64 " bytes", img->path, old, new_size);
	return 0;
}

/* ---- open, close ---- */

static int header_duties(struct qcow2_rw *w)
{
	struct image *img = w->img;
	uint64_t keep = img->data_file ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0, autoclear;
	int r;

	if (img->version < 3)
		return validate_writable(img);
	if (img->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
		log_err("%s: the image is marked corrupt; it can only be mapped read-only (repair it with `qemu-img check -r all`).",
			img->path);
		return -EUCLEAN;
	}
	if ((img->incompatible_features & QCOW2_INCOMPAT_DIRTY) && !w->opts.resume) {
		log_err("%s: the image was not closed cleanly (dirty bit, lazy refcounts); repair its refcounts with `qemu-img check -r all` before mapping it read-write.",
			img->path);
		return -EUCLEAN;
	}
	/* before anything is written */
	r = validate_writable(img);
	if (r < 0)
		return r;
	autoclear = img->autoclear_features & keep;
	if (autoclear != img->autoclear_features) {
		if (img->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)
			log_std("%s: persistent dirty bitmaps are not updated by qcowsetup: they are marked stale.",
				img->path);
		r = write_header_u64(w, QCOW2_HDR_AUTOCLEAR, autoclear);
		if (!r)
			r = meta_flush(w);
		if (r < 0)
			return r;
		img->autoclear_features = autoclear;
	}
	if (img->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) {
		if (img->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
			/* resumed: the bit is ours (refcounts are always kept
			 * up to date here), cleared on close */
			w->dirty_bit_set = true;
			return 0;
		}
		r = write_header_u64(w, QCOW2_HDR_INCOMPAT, img->incompatible_features | QCOW2_INCOMPAT_DIRTY);
		if (!r)
			r = meta_flush(w);
		if (r < 0)
			return r;
		img->incompatible_features |= QCOW2_INCOMPAT_DIRTY;
		w->dirty_bit_set = true;
	}
	return 0;
}

void qcow2_rw_free(struct qcow2_rw *w)
{
	if (!w)
		return;
	cache_free(&w->l2c);
	cache_free(&w->rbc);
	free(w->reftable);
	free(w->head_buf);
	free(w->tail_buf);
	free(w->cbuf);
	free(w->zbuf);
	free(w->zero_buf);
	free(w->sparse);
	free(w);
}

/* Whether clusters mapped ahead can never take the room of a later write:
 * below the file limit there is room for every guest cluster once besides
 * what is in use (qcow2_file_reserve, as the file is extended at open). A
 * smaller limit (an image on a small block device) would run out sooner
 * with clusters nobody may ever write. */
static bool ahead_has_room(struct qcow2_rw *w)
{
	uint64_t used, need;

	if (!w->opts.ahead_max || !w->opts.file_limit)
		return true;
	used = w->opts.used_end;
	if ((used || qcow2_used_end(w->img, &used) == 0) && qcow2_file_reserve(w->img, used, &need) == 0 &&
	    w->opts.file_limit >= need)
		return true;
	log_dbg("%s: no allocation ahead: the file limit (%" PRIu64 " bytes) does not cover every cluster",
		w->img->path, w->opts.file_limit);
	return false;
}

/* Where the image file was never written (fresh_from): from the end of
 * the clusters in use (opts.used_end when the caller has it), when the
 * file holds no data past it (a writer that died may have left some, and
 * whatever header_duties wrote past it is data too). Unknown without
 * data_extent. */
static void find_fresh(struct qcow2_rw *w)
{
	uint64_t used = w->opts.used_end, len;
	bool is_data;

	if (!w->ops.data_extent || w->data_file || (!used && qcow2_used_end(w->img, &used) < 0))
		return;
	if (w->ops.data_extent(w->ops.opaque, used, &len, &is_data) == -ENXIO)
		w->fresh_from = used;
	else
		log_dbg("%s: data past the clusters in use: every new cluster is zeroed", w->img->path);
}

int qcow2_rw_open(struct image *img, const struct qcow2_rw_ops *ops,
		      const struct qcow2_rw_opts *opts, struct qcow2_rw **out)
{
	struct qcow2_rw *w;
	size_t cache_bytes;
	unsigned int nslots;
	int r;

	*out = NULL;
	if (img->format != IMG_FMT_QCOW2 || img->snapshot_index >= 0) {
		log_err("%s: only the active layer of a qcow2 image can be written.", img->path);
		return -ENOTSUP;
	}
	if (!opts->read_only && img->crypt_method == IMG_CRYPT_AES) {
		log_err("%s: legacy AES encryption is read-only (convert the image to LUKS encryption).", img->path);
		return -ENOTSUP;
	}
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->img = img;
	w->ops = *ops;
	w->opts = *opts;
	w->cs = img->cluster_size;
	w->cb = img->cluster_bits;
	w->extended = img->extended_l2;
	w->data_file = img->incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
	w->l2_esz = w->extended ? 16 : 8;
	w->l2_bits = img->l2_bits;
	w->l2_entries = 1ULL << w->l2_bits;
	w->nsc = w->extended ? 32 : 1;
	w->scs = w->cs / w->nsc;
	w->order = img->refcount_order;
	w->rb_bits = w->cb + 3 - w->order;
	w->rc_max = w->order == 6 ? UINT64_MAX : (1ULL << (1U << w->order)) - 1;
	w->meta_size = img->io.size;
	w->free_hint = 1;
	w->fresh_from = UINT64_MAX;
	cache_bytes = opts->cache_bytes ? opts->cache_bytes : 8U << 20;
	nslots = (unsigned int)MAX((uint64_t)4, cache_bytes / 2 / w->cs);
	r = cache_init(&w->l2c, nslots, w->cs);
	if (!r)
		r = cache_init(&w->rbc, nslots, w->cs);
	if (r)
		goto fail;
	w->head_buf = alloc_aligned(w->cs);
	w->tail_buf = alloc_aligned(w->cs);
	w->cbuf = alloc_aligned(w->cs);
	w->zbuf = alloc_aligned(2 * w->cs);
	if (!w->head_buf || !w->tail_buf || !w->cbuf || !w->zbuf) {
		r = -ENOMEM;
		goto fail;
	}
	/* (before its buffer: a daemon locks what the writer holds) */
	if (opts->read_only || !ahead_has_room(w))
		w->opts.ahead_max = 0;
	if (w->opts.ahead_max) {
		w->zero_len = ZERO_BUF_MAX;
		w->zero_buf = alloc_aligned(w->zero_len);
		if (!w->zero_buf) {
			r = -ENOMEM;
			goto fail;
		}
	}
	w->reftable_entries = ((uint64_t)img->refcount_table_clusters << w->cb) / 8;
	r = qcow2_read_table(img, img->refcount_table_offset, w->reftable_entries, QCOW2_MAX_REFTABLE_BYTES,
			     "refcount table", &w->reftable);
	if (r)
		goto fail;
	if (!opts->read_only) {
		r = header_duties(w);
		if (r)
			goto fail;
		find_fresh(w);
	}
	*out = w;
	return 0;
fail:
	qcow2_rw_free(w);
	return r;
}

int qcow2_rw_close(struct qcow2_rw *w, uint64_t *used_end)
{
	int r = 0;

	if (used_end)
		*used_end = 0;
	if (!w->opts.read_only) {
		r = qcow2_rw_flush(w);
		if (r == 0 && w->dirty_bit_set) {
			uint64_t f = w->img->incompatible_features & ~QCOW2_INCOMPAT_DIRTY;

			r = write_header_u64(w, QCOW2_HDR_INCOMPAT, f);
			if (r == 0)
				r = meta_flush(w);
			if (r == 0) {
				w->img->incompatible_features = f;
				w->dirty_bit_set = false;
			}
		}
		if (r == 0 && used_end)
			r = qcow2_used_end(w->img, used_end);
	}
	qcow2_rw_free(w);
	return r;
}

void qcow2_rw_file_grown(struct qcow2_rw *w, uint64_t size)
{
	w->opts.file_limit = size;
	if (size <= w->meta_size)
		return;
	w->meta_size = size;
	w->img->io.size = size;
	if (!w->img->has_data_file)
		w->img->data_io.size = size;
}

void qcow2_rw_get_stats(const struct qcow2_rw *w, struct qcow2_rw_stats *st)
{
	*st = w->st;
}

int qcow2_rw_mark_writable(struct qcow2_rw *w, const struct run_list *in, struct run_list *out)
{
	int r;

	for (size_t i = 0; i < in->count; i++) {
		struct run ru = in->runs[i];
		uint64_t end = ru.guest + ru.len;

		if (ru.depth != 0 || ru.kind != RUN_DATA) {
			r = run_list_add(out, &ru);
			if (r < 0)
				return r;
			continue;
		}
		for (uint64_t g = ru.guest; g < end;) {
			uint64_t gci = g >> w->cb, n = MIN(end - g, ((gci + 1) << w->cb) - g), e, bm;
			struct run piece = ru;

			r = get_entry(w, gci, &e, &bm);
			if (r < 0)
				return r;
			piece.guest = g;
			piece.len = n;
			piece.host = ru.host + (g - ru.guest);
			if ((e & QCOW2_OFLAG_COPIED) && !entry_compressed(e))
				piece.flags |= RUN_F_WRITABLE;
			r = run_list_add(out, &piece);
			if (r < 0)
				return r;
			g += n;
		}
	}
	return 0;
}

int qcow2_used_end(const struct image *img, uint64_t *end)
{
	uint64_t entries = ((uint64_t)img->refcount_table_clusters << img->cluster_bits) / 8;
	uint64_t per = (img->cluster_size * 8) >> img->refcount_order, *t = NULL;
	uint8_t *blk = NULL;
	int r;

	*end = img->cluster_size;
	r = qcow2_read_table(img, img->refcount_table_offset, entries, QCOW2_MAX_REFTABLE_BYTES, "refcount table", &t);
	if (r < 0)
		return r;
	blk = malloc(img->cluster_size);
	if (!blk) {
		r = -ENOMEM;
		goto out;
	}
	for (uint64_t ti = entries; ti-- > 0;) {
		uint64_t off = t[ti] & QCOW2_REFT_OFFSET_MASK;

		if (!off)
			continue;
		if (!is_aligned(off, img->cluster_size) || !image_range_in_file(&img->io, off, img->cluster_size)) {
			r = -EUCLEAN;
			goto out;
		}
		r = img_pread(&img->io, blk, img->cluster_size, off);
		if (r < 0)
			goto out;
		for (uint64_t i = per; i-- > 0;)
			if (rb_get(blk, img->refcount_order, i)) {
				*end = (ti * per + i + 1) << img->cluster_bits;
				goto out;
			}
	}
out:
	free(blk);
	free(t);
	return r;
}

int qcow2_file_reserve(const struct image *img, uint64_t used_end, uint64_t *size)
{
	uint64_t cs = img->cluster_size, vsize = round_up_pow2(img->size, cs), l2_per_table;
	uint64_t clusters, per_block, blocks, table, total;

	if (img->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		*size = vsize;
		return 0;
	}
	l2_per_table = (cs / (img->extended_l2 ? 16 : 8)) * cs;
	/* data, L2 tables (each allocated or copied once), what is there */
	clusters = vsize / cs + (vsize + l2_per_table - 1) / l2_per_table + used_end / cs + 16;
	per_block = (cs * 8) >> img->refcount_order;
	blocks = clusters / per_block + 2;
	table = (blocks * 8 + cs - 1) / cs + 1;
	/* refcount blocks, and tables grown by half each time (3x the last) */
	total = clusters + blocks * 2 + table * 4;
	if (umul64_overflow(total, cs, size) || *size > (1ULL << 56))
		return -EFBIG;
	return 0;
}
