/* The qcow2 metadata writer (qcow2_rw.c) on images built in memory.
 *
 * Every scenario applies seeded random guest writes (a few bytes to several
 * clusters, aligned and not) to the image and to a raw reference, and checks:
 *   - reads through the writer equal the reference, at any time;
 *   - after a flush, the image bytes parse again, the engine's own check
 *     (check.c, qemu-img check's rules) finds no corruption and no leak, and
 *     a fresh reader sees the reference;
 *   - crashes: the files are modelled as a durable image plus the writes
 *     since the last flush; a crash keeps any subset of those (sector by
 *     sector). The crashed image must show no corruption (leaks allowed)
 *     and every sector not written since the last completed flush must
 *     read back as it was then. Crashes are taken between operations and,
 *     by fault injection, in the middle of one (every write or flush of the
 *     files can be the last).
 * Images: 512 B, 64 KiB and 2 MiB clusters, refcount widths 1..64 bits,
 * extended L2 entries, v2, external data files, a backing file, snapshots
 * (clusters and L2 tables shared), compressed clusters (zlib and zstd),
 * zero clusters and subclusters, lazy refcounts; the refcount table grows,
 * refcount blocks are created, L2 tables allocated and copied. */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "compress.h"
#include "image.h"
#include "log.h"
#include "qcow2.h"
#include "qcow2_rw.h"
#include "tap.h"
#include "util.h"

#define SECTOR 512
#define OFLAG_COPIED (1ULL << 63)
#define OFLAG_COMPRESSED (1ULL << 62)
#define OFLAG_ZERO 1ULL

/* ---- deterministic random numbers ---- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
	/* splitmix64 */
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t rnd_below(uint64_t n)
{
	return n ? rnd() % n : 0;
}

static void fill_pattern(uint8_t *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i++) {
		if (i % 8 == 0)
			seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
		p[i] = (uint8_t)(seed >> (8 * (i % 8)));
	}
}

/* ---- files in memory, with what a crash keeps ---- */

struct wlog {
	uint64_t off;
	size_t len;
	uint8_t *data;
};

struct memfile {
	uint8_t *cur;		/* what reads see */
	size_t size, alloc;
	uint8_t *dur;		/* what survives a crash for sure */
	size_t dsize;
	struct wlog *log;	/* writes since the last flush */
	size_t nlog, alog;
	uint64_t written;	/* end of what was ever written: holes past it */
};

struct env;

static void mf_reserve(uint8_t **p, size_t *alloc, size_t need)
{
	if (need <= *alloc)
		return;
	size_t na = MAX(need, *alloc * 2);
	*p = realloc(*p, na);
	memset(*p + *alloc, 0, na - *alloc);
	*alloc = na;
}

static void mf_init(struct memfile *f, const uint8_t *data, size_t size)
{
	memset(f, 0, sizeof(*f));
	mf_reserve(&f->cur, &f->alloc, size);
	memcpy(f->cur, data, size);
	f->size = size;
	f->dur = malloc(size ? size : 1);
	memcpy(f->dur, data, size);
	f->dsize = size;
	f->written = size;
}

/* The file extended to size (durable): holes, as a truncate makes. */
static void mf_extend(struct memfile *f, size_t size)
{
	mf_reserve(&f->cur, &f->alloc, size);
	f->size = size;
	f->dur = realloc(f->dur, size);
	memset(f->dur + f->dsize, 0, size - f->dsize);
	f->dsize = size;
}

static void mf_clear_log(struct memfile *f)
{
	for (size_t i = 0; i < f->nlog; i++)
		free(f->log[i].data);
	f->nlog = 0;
}

static void mf_free(struct memfile *f)
{
	mf_clear_log(f);
	free(f->log);
	free(f->cur);
	free(f->dur);
	memset(f, 0, sizeof(*f));
}

static void mf_write(struct memfile *f, const void *buf, size_t len, uint64_t off)
{
	mf_reserve(&f->cur, &f->alloc, off + len);
	memcpy(f->cur + off, buf, len);
	if (off + len > f->size)
		f->size = off + len;
	f->written = MAX(f->written, off + len);
	if (f->nlog == f->alog) {
		f->alog = f->alog ? f->alog * 2 : 64;
		f->log = realloc(f->log, f->alog * sizeof(*f->log));
	}
	f->log[f->nlog].off = off;
	f->log[f->nlog].len = len;
	f->log[f->nlog].data = malloc(len ? len : 1);
	memcpy(f->log[f->nlog].data, buf, len);
	f->nlog++;
}

static void mf_flush(struct memfile *f)
{
	free(f->dur);
	f->dur = malloc(f->size ? f->size : 1);
	memcpy(f->dur, f->cur, f->size);
	f->dsize = f->size;
	mf_clear_log(f);
}

/* The durable content plus a random subset of the later writes, sector by
 * sector (the disk may keep any of them, in any combination). */
static uint8_t *mf_crash(const struct memfile *f, size_t *size)
{
	size_t alloc = f->dsize, sz = f->dsize;
	uint8_t *p = malloc(alloc ? alloc : 1);
	unsigned int keep = (unsigned int)rnd_below(4);	/* 0: none, 3: all, else random */

	memcpy(p, f->dur, f->dsize);
	for (size_t i = 0; i < f->nlog; i++) {
		const struct wlog *w = &f->log[i];

		for (uint64_t o = w->off; o < w->off + w->len;) {
			uint64_t end = MIN(w->off + w->len, (o / SECTOR + 1) * SECTOR);

			if (keep == 3 || (keep && rnd_below(2))) {
				mf_reserve(&p, &alloc, end);
				memcpy(p + o, w->data + (o - w->off), end - o);
				sz = MAX(sz, (size_t)end);
			}
			o = end;
		}
	}
	*size = sz;
	return p;
}

/* ---- the environment of one scenario ---- */

struct env {
	struct memfile meta, data;
	bool separate_data;		/* external data file */
	bool punch;			/* data_zero (holes), else zeros are written */
	int zero_error;			/* what data_zero returns (a full file system) */
	bool extents;			/* data_extent (holes past the file's end) and backing_zero */
	uint8_t *backing;
	uint64_t backing_size;
	long ops, crash_at;		/* fault injection: the crash_at-th write/flush fails and all after */
	bool crashed;
	/* mappings announced */
	uint64_t mapped_bytes;
	bool mapped_bad;
	struct { uint64_t guest, len, host; } *maps;
	size_t nmaps, amaps;
	struct image *img;
};

static int count_op(struct env *e)
{
	if (e->crashed)
		return -EIO;
	if (++e->ops >= e->crash_at && e->crash_at) {
		e->crashed = true;
		return -EIO;
	}
	return 0;
}

static int meta_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct memfile *f = opaque;

	if (off > f->size || len > f->size - off)
		return -EIO;
	memcpy(buf, f->cur + off, len);
	return 0;
}

static int op_meta_pwrite(void *opaque, const void *buf, size_t len, uint64_t off)
{
	struct env *e = opaque;
	int r = count_op(e);

	if (r)
		return r;
	mf_write(&e->meta, buf, len, off);
	return 0;
}

static int op_meta_flush(void *opaque)
{
	struct env *e = opaque;
	int r = count_op(e);

	if (r)
		return r;
	mf_flush(&e->meta);
	return 0;
}

static struct memfile *data_file(struct env *e)
{
	return e->separate_data ? &e->data : &e->meta;
}

static int op_data_pread(void *opaque, void *buf, size_t len, uint64_t host)
{
	struct env *e = opaque;
	struct memfile *f = data_file(e);
	size_t n = host < f->size ? MIN(len, f->size - host) : 0;

	if ((host | len) % SECTOR) {
		fprintf(stderr, "unaligned data read %zu at %" PRIu64 "\n", len, host);
		return -EINVAL;
	}
	memcpy(buf, f->cur + host, n);
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

static int op_data_pwrite(void *opaque, const void *buf, size_t len, uint64_t host)
{
	struct env *e = opaque;
	int r = count_op(e);

	if (r)
		return r;
	if ((host | len) % SECTOR) {
		fprintf(stderr, "unaligned data write %zu at %" PRIu64 "\n", len, host);
		return -EINVAL;
	}
	mf_write(data_file(e), buf, len, host);
	return 0;
}

static int op_data_zero(void *opaque, uint64_t len, uint64_t host)
{
	struct env *e = opaque;
	uint8_t *z;
	int r = count_op(e);

	if (r)
		return r;
	if ((host | len) % SECTOR)
		return -EINVAL;
	if (e->zero_error)
		return e->zero_error;
	z = calloc(1, len);
	mf_write(data_file(e), z, len, host);
	free(z);
	return 0;
}

static int op_data_flush(void *opaque)
{
	struct env *e = opaque;
	int r = count_op(e);

	if (r)
		return r;
	mf_flush(&e->data);
	return 0;
}

static int op_backing_pread(void *opaque, void *buf, size_t len, uint64_t guest)
{
	struct env *e = opaque;
	size_t n = guest < e->backing_size ? MIN(len, e->backing_size - guest) : 0;

	if (n)
		memcpy(buf, e->backing + guest, n);
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

static bool buf_zero(const uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return false;
	return true;
}

/* The data file holds data up to where it was ever written, holes past it. */
static int op_data_extent(void *opaque, uint64_t host, uint64_t *len, bool *is_data)
{
	struct memfile *f = data_file(opaque);

	if (host >= f->written)
		return -ENXIO;
	*is_data = true;
	*len = f->written - host;
	return 0;
}

static bool op_backing_zero(void *opaque, uint64_t guest, uint64_t len)
{
	struct env *e = opaque;

	return guest >= e->backing_size || buf_zero(e->backing + guest, MIN(len, e->backing_size - guest));
}

static void op_mapped(void *opaque, uint64_t guest, uint64_t len, uint64_t host)
{
	struct env *e = opaque;

	e->mapped_bytes += len;
	if (!len || guest % SECTOR || host % SECTOR)
		e->mapped_bad = true;
	if (e->nmaps == e->amaps) {
		e->amaps = e->amaps ? 2 * e->amaps : 64;
		e->maps = realloc(e->maps, e->amaps * sizeof(*e->maps));
	}
	e->maps[e->nmaps].guest = guest;
	e->maps[e->nmaps].len = len;
	e->maps[e->nmaps].host = host;
	e->nmaps++;
}

/* ---- building images (contiguous allocation: the refcount blocks for the
 * first max_file bytes are made up front) ---- */

struct tb {
	uint8_t *buf;
	size_t size, alloc;
	unsigned int cb, order, rb_bits;
	uint64_t cs;
	bool ext, data_file;
	int compression;
	uint64_t vsize, max_file;
	uint32_t l1_size;
	uint64_t l1_off, rt_off, rt_entries;
	uint64_t comp_pos;	/* where the next compressed cluster goes; 0: a new cluster */
	uint8_t *data;		/* external data file */
	uint8_t *ref;		/* guest content */
	uint8_t *backing;
	uint64_t backing_size;
};

static uint64_t tb_rc_get(struct tb *b, uint64_t ci)
{
	uint64_t ti = ci >> b->rb_bits, boff = get_be64(b->buf + b->rt_off + ti * 8);
	uint64_t i = ci & ((1ULL << b->rb_bits) - 1);
	const uint8_t *blk = b->buf + boff;

	switch (b->order) {
	case 0: case 1: case 2:
		return (blk[(i << b->order) / 8] >> ((i << b->order) % 8)) & ((1U << (1U << b->order)) - 1);
	case 3: return blk[i];
	case 4: return get_be16(blk + i * 2);
	case 5: return get_be32(blk + i * 4);
	default: return get_be64(blk + i * 8);
	}
}

static void tb_rc_set(struct tb *b, uint64_t ci, uint64_t v)
{
	uint64_t ti = ci >> b->rb_bits, boff = get_be64(b->buf + b->rt_off + ti * 8);
	uint64_t i = ci & ((1ULL << b->rb_bits) - 1);
	uint8_t *blk = b->buf + boff;

	if (ti >= b->rt_entries || !boff) {
		fprintf(stderr, "builder: cluster %" PRIu64 " beyond the prepared refcount blocks\n", ci);
		exit(99);
	}
	switch (b->order) {
	case 0: case 1: case 2: {
		uint64_t bit = i << b->order;
		uint8_t mask = (uint8_t)(((1U << (1U << b->order)) - 1) << (bit % 8));

		blk[bit / 8] = (uint8_t)((blk[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
		break;
	}
	case 3: blk[i] = (uint8_t)v; break;
	case 4: put_be16(blk + i * 2, (uint16_t)v); break;
	case 5: put_be32(blk + i * 4, (uint32_t)v); break;
	default: put_be64(blk + i * 8, v); break;
	}
}

static uint64_t tb_raw_alloc(struct tb *b)
{
	uint64_t off = round_up_pow2(b->size, b->cs);

	mf_reserve(&b->buf, &b->alloc, off + b->cs);
	b->size = off + b->cs;
	return off;
}

static uint64_t tb_alloc(struct tb *b)
{
	uint64_t off = tb_raw_alloc(b);

	if (off + b->cs > b->max_file) {
		fprintf(stderr, "builder: image larger than %" PRIu64 " bytes\n", b->max_file);
		exit(99);
	}
	tb_rc_set(b, off >> b->cb, 1);
	return off;
}

static void tb_header_u64(struct tb *b, uint64_t off, uint64_t v)
{
	put_be64(b->buf + off, v);
}

static void tb_init(struct tb *b, unsigned int cb, unsigned int order, bool ext, uint64_t vsize, int version,
		    bool data_file, int compression, uint64_t backing_size)
{
	uint64_t per_l1, l1_bytes, blocks, rt_clusters, hdr_len = 112, p;
	uint8_t *h;

	memset(b, 0, sizeof(*b));
	b->cb = cb;
	b->cs = 1ULL << cb;
	b->order = version == 2 ? 4 : order;
	b->ext = ext;
	b->vsize = vsize;
	b->data_file = data_file;
	b->compression = compression;
	b->rb_bits = cb + 3 - b->order;
	b->max_file = b->cs * 256;
	per_l1 = (b->cs / (ext ? 16 : 8)) << cb;
	b->l1_size = (uint32_t)((vsize + per_l1 - 1) / per_l1);
	l1_bytes = round_up_pow2((uint64_t)b->l1_size * 8, b->cs);
	blocks = (b->max_file / b->cs + (1ULL << b->rb_bits) - 1) >> b->rb_bits;
	rt_clusters = (blocks * 8 + b->cs - 1) / b->cs;
	b->rt_off = b->cs;
	b->rt_entries = rt_clusters * b->cs / 8;
	tb_raw_alloc(b);			/* header */
	for (uint64_t i = 0; i < rt_clusters; i++)
		tb_raw_alloc(b);
	for (uint64_t i = 0; i < blocks; i++)
		put_be64(b->buf + b->rt_off + i * 8, tb_raw_alloc(b));
	for (uint64_t c = 0; c < b->size >> cb; c++)
		tb_rc_set(b, c, 1);
	b->l1_off = tb_alloc(b);
	for (uint64_t i = b->cs; i < l1_bytes; i += b->cs)
		tb_alloc(b);
	h = b->buf;
	put_be32(h, 0x514649fb);
	put_be32(h + 4, (uint32_t)version);
	put_be32(h + 20, cb);
	put_be64(h + 24, vsize);
	put_be32(h + 36, b->l1_size);
	put_be64(h + 40, b->l1_off);
	put_be64(h + 48, b->rt_off);
	put_be32(h + 56, (uint32_t)rt_clusters);
	if (version == 3) {
		put_be64(h + 72, (ext ? QCOW2_INCOMPAT_EXTL2 : 0) | (data_file ? QCOW2_INCOMPAT_DATA_FILE : 0) |
				 (compression ? QCOW2_INCOMPAT_COMPRESSION : 0));
		put_be32(h + 96, b->order);
		put_be32(h + 100, (uint32_t)hdr_len);
		h[104] = (uint8_t)compression;
		p = hdr_len;
		if (data_file) {
			put_be32(h + p, QCOW2_EXT_DATA_FILE);
			put_be32(h + p + 4, 8);
			memcpy(h + p + 8, "data.raw", 8);
			p += 16;
		}
		put_be32(h + p, 0);
		put_be32(h + p + 4, 0);
	}
	if (data_file)
		b->data = calloc(1, vsize);
	b->ref = calloc(1, vsize);
	if (backing_size) {
		b->backing_size = backing_size;
		b->backing = malloc(backing_size);
		fill_pattern(b->backing, backing_size, 0xbacc);
		memcpy(b->ref, b->backing, MIN(backing_size, vsize));
	}
}

static void tb_free(struct tb *b)
{
	free(b->buf);
	free(b->data);
	free(b->ref);
	free(b->backing);
	memset(b, 0, sizeof(*b));
}

static uint64_t tb_l2(struct tb *b, uint64_t g)
{
	uint64_t per_l1 = (b->cs / (b->ext ? 16 : 8)) << b->cb, i = g / per_l1;
	uint64_t e = get_be64(b->buf + b->l1_off + i * 8);

	if (!(e & QCOW2_L1E_OFFSET_MASK)) {
		uint64_t l2 = tb_alloc(b);

		put_be64(b->buf + b->l1_off + i * 8, l2 | OFLAG_COPIED);
		return l2;
	}
	return e & QCOW2_L1E_OFFSET_MASK;
}

static void tb_set_l2(struct tb *b, uint64_t g, uint64_t entry, uint64_t bitmap)
{
	uint64_t esz = b->ext ? 16 : 8, l2 = tb_l2(b, g), j = (g >> b->cb) % (b->cs / esz);

	put_be64(b->buf + l2 + j * esz, entry);
	if (b->ext)
		put_be64(b->buf + l2 + j * esz + 8, bitmap);
}

/* A data cluster at guest cluster g with random content. */
static void tb_data(struct tb *b, uint64_t g, uint64_t seed)
{
	uint64_t host;
	uint8_t *dst;

	g &= ~(b->cs - 1);
	if (b->data_file) {
		host = g;
		dst = b->data + g;
	} else {
		host = tb_alloc(b);
		dst = b->buf + host;
	}
	fill_pattern(dst, b->cs, seed);
	memcpy(b->ref + g, dst, MIN(b->cs, b->vsize - g));
	tb_set_l2(b, g, host | OFLAG_COPIED, b->ext ? 0xffffffffULL : 0);
}

/* A zero cluster, preallocated or not. */
static void tb_zero(struct tb *b, uint64_t g, bool prealloc)
{
	uint64_t host = 0;

	g &= ~(b->cs - 1);
	if (prealloc) {
		host = b->data_file ? g : tb_alloc(b);
		if (!b->data_file)
			fill_pattern(b->buf + host, b->cs, 0xdead);	/* stale content */
	}
	memset(b->ref + g, 0, MIN(b->cs, b->vsize - g));
	if (b->ext)
		tb_set_l2(b, g, host ? host | OFLAG_COPIED : 0, 0xffffffffULL << 32);
	else
		tb_set_l2(b, g, (host ? host | OFLAG_COPIED : 0) | OFLAG_ZERO, 0);
}

/* Extended L2: a cluster with random allocated / zero / unallocated subclusters. */
static void tb_subclusters(struct tb *b, uint64_t g, uint64_t seed)
{
	uint64_t sc = b->cs / 32, host;
	uint32_t alloc = 0, zero = 0;
	uint8_t *dst;

	g &= ~(b->cs - 1);
	host = b->data_file ? g : tb_alloc(b);
	dst = b->data_file ? b->data + g : b->buf + host;
	for (unsigned int i = 0; i < 32; i++) {
		unsigned int k = (unsigned int)rnd_below(3);
		uint64_t o = g + i * sc;

		if (o >= b->vsize)
			break;
		if (k == 0) {
			alloc |= 1U << i;
			fill_pattern(dst + i * sc, sc, seed + i);
			memcpy(b->ref + o, dst + i * sc, sc);
		} else if (k == 1) {
			zero |= 1U << i;
			fill_pattern(dst + i * sc, sc, 0xdead);
			memset(b->ref + o, 0, sc);
		} else {
			fill_pattern(dst + i * sc, sc, 0xbeef);	/* not what the guest sees */
		}
	}
	tb_set_l2(b, g, host | OFLAG_COPIED, (uint64_t)zero << 32 | alloc);
}

/* A compressed cluster (compressible content), packed after the previous
 * one when it fits (sharing its host cluster, or crossing into the next). */
static void tb_compressed(struct tb *b, uint64_t g, uint64_t seed)
{
	uint8_t *src = malloc(b->cs), *dst = malloc(b->cs);
	unsigned int x = 62 - (b->cb - 8);
	uint64_t pos = b->comp_pos, off, end, nb;
	bool fresh = !pos || !(pos & (b->cs - 1));
	ssize_t n;

	g &= ~(b->cs - 1);
	for (uint64_t i = 0; i < b->cs; i++)
		src[i] = (uint8_t)((i / 64) * 7 + seed + rnd_below(2) * (i % 3 == 0));
	n = qcow_compress(b->compression, dst, b->cs - 1, src, b->cs);
	if (n <= 0) {
		fprintf(stderr, "builder: compression failed (%zd)\n", n);
		exit(99);
	}
	if (!fresh) {
		uint64_t first = pos >> b->cb, last = (pos + (uint64_t)n - 1) >> b->cb;

		if (last != first && (last != first + 1 || round_up_pow2(b->size, b->cs) >> b->cb != last))
			fresh = true;
	}
	if (fresh)
		pos = tb_alloc(b) + (b->cs > 1024 ? 512 * rnd_below(2) : 0);
	off = pos;
	end = off + (uint64_t)n;
	for (uint64_t c = off >> b->cb; c <= (end - 1) >> b->cb; c++) {
		if (c == off >> b->cb) {
			if (!fresh)
				tb_rc_set(b, c, tb_rc_get(b, c) + 1);
		} else if (tb_alloc(b) != c << b->cb) {
			fprintf(stderr, "builder: compressed data not contiguous\n");
			exit(99);
		}
	}
	memcpy(b->buf + off, dst, (size_t)n);
	nb = (end - 1) / 512 - off / 512;
	memcpy(b->ref + g, src, MIN(b->cs, b->vsize - g));
	tb_set_l2(b, g, OFLAG_COMPRESSED | (nb << x) | off, 0);
	b->comp_pos = round_up_pow2(end, 512);
	free(src);
	free(dst);
}

/* An internal snapshot of the current state: every L2 table and cluster
 * gains a reference, OFLAG_COPIED goes away from the active tables. */
static void tb_snapshot(struct tb *b, const char *id)
{
	uint64_t l1_bytes = (uint64_t)b->l1_size * 8, copy = 0, esz = b->ext ? 16 : 8, st;
	uint32_t n = get_be32(b->buf + 60);
	uint64_t old_st = get_be64(b->buf + 64);
	unsigned int x = 62 - (b->cb - 8);
	uint8_t entry[64];
	size_t elen;

	for (uint64_t i = 0; i < l1_bytes; i += b->cs) {
		uint64_t o = tb_alloc(b);

		if (!i)
			copy = o;
	}
	for (uint32_t i = 0; i < b->l1_size; i++) {
		uint64_t e = get_be64(b->buf + b->l1_off + i * 8), l2 = e & QCOW2_L1E_OFFSET_MASK;

		put_be64(b->buf + copy + i * 8, e & ~OFLAG_COPIED);
		if (!l2)
			continue;
		put_be64(b->buf + b->l1_off + i * 8, e & ~OFLAG_COPIED);
		tb_rc_set(b, l2 >> b->cb, tb_rc_get(b, l2 >> b->cb) + 1);
		/* a table shared already had its clusters counted per reference */
		for (uint64_t j = 0; j < b->cs / esz; j++) {
			uint64_t le = get_be64(b->buf + l2 + j * esz);

			if (le & OFLAG_COMPRESSED) {
				uint64_t off = le & ((1ULL << x) - 1), nb = ((le >> x) & ((1ULL << (b->cb - 8)) - 1)) + 1;
				uint64_t len = nb * 512 - (off & 511);

				for (uint64_t c = off >> b->cb; c <= (off + len - 1) >> b->cb; c++)
					tb_rc_set(b, c, tb_rc_get(b, c) + 1);
			} else if (le & QCOW2_L2E_OFFSET_MASK) {
				uint64_t c = (le & QCOW2_L2E_OFFSET_MASK) >> b->cb;

				tb_rc_set(b, c, tb_rc_get(b, c) + 1);
				put_be64(b->buf + l2 + j * esz, le & ~OFLAG_COPIED);
			}
		}
	}
	/* the snapshot table: the old entries, then this one */
	memset(entry, 0, sizeof(entry));
	put_be64(entry, copy);
	put_be32(entry + 8, b->l1_size);
	put_be16(entry + 12, (uint16_t)strlen(id));
	put_be16(entry + 14, (uint16_t)strlen(id));
	put_be32(entry + 36, 16);
	put_be64(entry + 48, b->vsize);
	memcpy(entry + 56, id, strlen(id));
	memcpy(entry + 56 + strlen(id), id, strlen(id));
	elen = round_up_pow2(56 + 2 * strlen(id), 8);
	st = tb_alloc(b);
	if (n) {
		/* every earlier entry has the same size (one-character ids) */
		memcpy(b->buf + st, b->buf + old_st, n * elen);
		tb_rc_set(b, old_st >> b->cb, tb_rc_get(b, old_st >> b->cb) - 1);
	}
	memcpy(b->buf + st + n * elen, entry, elen);
	put_be32(b->buf + 60, n + 1);
	put_be64(b->buf + 64, st);
}

static void tb_set_features(struct tb *b, uint64_t incompat, uint64_t compat, uint64_t autoclear)
{
	tb_header_u64(b, 72, get_be64(b->buf + 72) | incompat);
	tb_header_u64(b, 80, get_be64(b->buf + 80) | compat);
	tb_header_u64(b, 88, get_be64(b->buf + 88) | autoclear);
}

/* ---- the environment: files, image, writer ---- */

static bool verbose;
static char last_msg[1024];

static void log_capture(enum qs_log_level level, const char *msg, void *ud)
{
	(void)ud;
	if (level <= QS_LOG_NORMAL)
		snprintf(last_msg, sizeof(last_msg), "%s", msg);
	if (verbose)
		fprintf(stderr, "  log: %s\n", msg);
}

static int env_io_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	return meta_pread(opaque, buf, len, off);
}

struct data_opener {
	struct memfile *f;
};

static int env_data_open(void *opaque, const struct img_open_req *req, struct img_io *io)
{
	struct data_opener *d = opaque;

	(void)req;
	memset(io, 0, sizeof(*io));
	io->pread = env_io_pread;
	io->opaque = d->f;
	io->size = d->f->size;
	io->name = "data.raw";
	return 0;
}

static void env_data_close(void *opaque, struct img_io *io)
{
	(void)opaque;
	(void)io;
}

static struct data_opener the_data_opener;
static const struct img_opener env_opener = { .open = env_data_open, .close = env_data_close,
					       .opaque = &the_data_opener };

static void env_init(struct env *e, const struct tb *b)
{
	memset(e, 0, sizeof(*e));
	mf_init(&e->meta, b->buf, b->size);
	if (b->data_file) {
		mf_init(&e->data, b->data, b->vsize);
		e->separate_data = true;
	}
	if (b->backing_size) {
		e->backing = b->backing;
		e->backing_size = b->backing_size;
	}
}

static void env_free(struct env *e)
{
	if (e->img)
		image_free(e->img, &env_opener);
	mf_free(&e->meta);
	mf_free(&e->data);
	free(e->maps);
	e->maps = NULL;
}

static int env_open_image(struct env *e)
{
	struct img_io io = { .pread = env_io_pread, .opaque = &e->meta, .size = e->meta.size, .name = "test.qcow2" };
	struct image_open_opts o = { .no_backing = true };

	the_data_opener.f = &e->data;
	return image_open_io(&env_opener, &io, &o, &e->img);
}

static int env_writer(struct env *e, const struct qcow2_rw_opts *opts, struct qcow2_rw **w)
{
	struct qcow2_rw_ops ops = {
		.meta_pwrite = op_meta_pwrite,
		.meta_flush = op_meta_flush,
		.data_pread = op_data_pread,
		.data_pwrite = op_data_pwrite,
		.data_flush = e->separate_data ? op_data_flush : NULL,
		.backing_pread = e->backing ? op_backing_pread : NULL,
		.mapped = op_mapped,
		.data_zero = e->punch ? op_data_zero : NULL,
		.data_extent = e->extents ? op_data_extent : NULL,
		.backing_zero = e->extents && e->backing ? op_backing_zero : NULL,
		.opaque = e,
	};
	int r;

	if (!e->img) {
		r = env_open_image(e);
		if (r)
			return r;
	}
	return qcow2_rw_open(e->img, &ops, opts, w);
}

/* ---- checking an image given as bytes ---- */

struct bytes_env {
	struct env e;
};

/* Open bytes (and data file bytes) read-only with the same backing and read
 * the whole guest content into out. Also runs the refcount check. */
static int inspect(const uint8_t *meta, size_t msize, const uint8_t *data, size_t dsize, const struct env *like,
		   uint64_t vsize, uint8_t *out, struct qcow2_check_result *res)
{
	struct env e;
	struct qcow2_rw *w = NULL;
	struct qcow2_rw_opts o = { .read_only = true };
	int r;

	memset(&e, 0, sizeof(e));
	mf_init(&e.meta, meta, msize);
	if (like->separate_data) {
		mf_init(&e.data, data, dsize);
		e.separate_data = true;
	}
	e.backing = like->backing;
	e.backing_size = like->backing_size;
	r = env_open_image(&e);
	if (r == 0)
		r = qcow2_check(e.img, res);
	if (r == 0 && out)
		r = env_writer(&e, &o, &w);
	if (r == 0 && out)
		r = qcow2_rw_read(w, out, vsize, 0);
	qcow2_rw_free(w);
	env_free(&e);
	return r;
}

/* ---- scenarios ---- */

struct scenario {
	const char *name;
	unsigned int cb, order;
	bool ext;
	int version;
	bool data_file;
	int compression;
	uint64_t vsize, backing_size;
	int n_data, n_zero, n_zero_alloc, n_sub, n_comp;
	int snapshots;
	bool lazy;
	int ops;
	uint64_t max_write;
	uint64_t limit_extra;	/* file limit: the initial size plus this (ENOSPC) */
	int crash_runs;
	size_t cache_bytes;
	uint64_t ahead;		/* allocation ahead (ahead_max); sequential writes and
				 * writes through the announced mappings (the fast path) */
};

struct state {
	const struct scenario *sc;
	struct tb b;
	struct env e;
	struct qcow2_rw *w;
	uint8_t *ref, *flushed, *snap_ref;
	uint8_t *dirty, *poison;	/* per sector */
	uint64_t nsect;
	uint8_t *buf, *rbuf;
	int failures;			/* checks failed in this run */
	char why[512];
	int enospc;
	uint64_t crash_checks;
	uint64_t seq_end;	/* where the sequential writer goes on */
	/* a write in flight as the daemon's second thread has it: planned
	 * (qcow2_rw_write_begin), its data moved (op_io) and its end after
	 * other operations */
	struct qcow2_rw_op *op;
	bool pending, pending_io;
	int pending_r;
	uint64_t p_off, p_len;
	uint8_t *pbuf;
	uint64_t ops_overlapped;	/* operations run while one was in flight */
};

static void fail(struct state *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct state *s, const char *fmt, ...)
{
	va_list ap;

	if (s->failures++)
		return;
	va_start(ap, fmt);
	vsnprintf(s->why, sizeof(s->why), fmt, ap);
	va_end(ap);
}

static void build(struct state *s, uint64_t seed)
{
	const struct scenario *sc = s->sc;
	struct tb *b = &s->b;
	uint64_t nclusters;
	uint8_t *used;

	rng_state = seed;
	tb_init(b, sc->cb, sc->order, sc->ext, sc->vsize, sc->version, sc->data_file, sc->compression,
		sc->backing_size);
	nclusters = (sc->vsize + b->cs - 1) >> b->cb;
	used = calloc(1, nclusters);
#define PICK() ({ uint64_t _c; do _c = rnd_below(nclusters); while (used[_c]); used[_c] = 1; _c << b->cb; })
	for (int i = 0; i < sc->n_data; i++)
		tb_data(b, PICK(), rnd());
	for (int i = 0; i < sc->n_zero; i++)
		tb_zero(b, PICK(), false);
	for (int i = 0; i < sc->n_zero_alloc; i++)
		tb_zero(b, PICK(), true);
	for (int i = 0; i < sc->n_sub; i++)
		tb_subclusters(b, PICK(), rnd());
	for (int i = 0; i < sc->n_comp; i++)
		tb_compressed(b, PICK(), rnd());
#undef PICK
	free(used);
	for (int i = 0; i < sc->snapshots; i++) {
		char id[2] = { (char)('1' + i), 0 };

		tb_snapshot(b, id);
	}
	if (sc->lazy)
		tb_set_features(b, 0, QCOW2_COMPAT_LAZY_REFCOUNTS, 0);
}

static void state_init(struct state *s, const struct scenario *sc, uint64_t seed)
{
	memset(s, 0, sizeof(*s));
	s->sc = sc;
	build(s, seed);
	s->nsect = (sc->vsize + SECTOR - 1) / SECTOR;
	s->ref = malloc(sc->vsize);
	s->flushed = malloc(sc->vsize);
	s->snap_ref = malloc(sc->vsize);
	memcpy(s->ref, s->b.ref, sc->vsize);
	memcpy(s->flushed, s->b.ref, sc->vsize);
	memcpy(s->snap_ref, s->b.ref, sc->vsize);
	s->dirty = calloc(1, s->nsect);
	s->poison = calloc(1, s->nsect);
	s->buf = malloc(sc->max_write + 4096);
	s->pbuf = malloc(sc->max_write + 4096);
	s->rbuf = malloc(sc->vsize + 4096);
	env_init(&s->e, &s->b);
}

static void state_free(struct state *s)
{
	qcow2_rw_op_free(s->op);
	qcow2_rw_free(s->w);
	env_free(&s->e);
	tb_free(&s->b);
	free(s->ref);
	free(s->flushed);
	free(s->snap_ref);
	free(s->dirty);
	free(s->poison);
	free(s->buf);
	free(s->pbuf);
	free(s->rbuf);
}

/* First differing byte of [off, off + len) outside poisoned sectors (and
 * outside dirty ones when skip_dirty), or -1. */
static int64_t compare(const struct state *s, const uint8_t *got, const uint8_t *want, uint64_t off, uint64_t len,
		       bool skip_dirty)
{
	for (uint64_t i = 0; i < len; i++) {
		uint64_t sec = (off + i) / SECTOR;

		if (s->poison[sec] || (skip_dirty && s->dirty[sec]))
			continue;
		if (got[i] != want[off + i])
			return (int64_t)(off + i);
	}
	return -1;
}

static void crash_check(struct state *s, const char *when)
{
	size_t msize, dsize = 0;
	uint8_t *meta = mf_crash(&s->e.meta, &msize), *data = NULL;
	struct qcow2_check_result res;
	int64_t bad;
	int r;

	if (s->e.separate_data)
		data = mf_crash(&s->e.data, &dsize);
	r = inspect(meta, msize, data, dsize, &s->e, s->sc->vsize, s->rbuf, &res);
	s->crash_checks++;
	if (r)
		fail(s, "%s: crashed image does not open or read: %s (%s)", when, strerror(-r), last_msg);
	else if (res.corruptions || res.check_errors)
		fail(s, "%s: crashed image: %" PRIu64 " corruptions, %" PRIu64 " check errors (%s)", when,
		     res.corruptions, res.check_errors, last_msg);
	else if ((bad = compare(s, s->rbuf, s->flushed, 0, s->sc->vsize, true)) >= 0)
		fail(s, "%s: crashed image lost flushed data at guest offset %" PRId64, when, bad);
	free(meta);
	free(data);
}

/* Every announced mapping is a writable data run of the final image. */
static void check_mappings(struct state *s)
{
	struct qcow2_rw *w = NULL;
	struct qcow2_rw_opts o = { .read_only = true };
	struct run_list runs, marked;
	int r;

	struct env e;

	memset(&e, 0, sizeof(e));
	mf_init(&e.meta, s->e.meta.cur, s->e.meta.size);
	if (s->e.separate_data) {
		mf_init(&e.data, s->e.data.cur, s->e.data.size);
		e.separate_data = true;
	}
	run_list_init(&runs);
	run_list_init(&marked);
	r = env_open_image(&e);
	if (!r)
		r = image_walk_layer(e.img, &runs);
	if (!r)
		r = env_writer(&e, &o, &w);
	if (!r)
		r = qcow2_rw_mark_writable(w, &runs, &marked);
	if (r) {
		fail(s, "final image does not walk: %s (%s)", strerror(-r), last_msg);
		goto out;
	}
	for (size_t i = 0; i < s->e.nmaps; i++) {
		uint64_t g = s->e.maps[i].guest, len = s->e.maps[i].len, h = s->e.maps[i].host;
		bool ok = false;

		for (size_t k = 0; k < marked.count; k++) {
			const struct run *ru = &marked.runs[k];

			if (ru->guest <= g && g + len <= ru->guest + ru->len) {
				ok = ru->kind == RUN_DATA && (ru->flags & RUN_F_WRITABLE) &&
				     ru->host + (g - ru->guest) == h;
				break;
			}
		}
		if (!ok) {
			fail(s, "announced mapping %" PRIu64 "+%" PRIu64 " -> %" PRIu64 " is not a writable cluster", g, len, h);
			break;
		}
	}
out:
	qcow2_rw_free(w);
	run_list_free(&runs);
	run_list_free(&marked);
	env_free(&e);
}

/* The snapshot's content, read through its runs. */
static void check_snapshot(struct state *s, const char *id)
{
	struct env e;
	struct run_list runs;
	uint8_t *out = s->rbuf;
	int64_t bad;
	int r;

	memset(&e, 0, sizeof(e));
	mf_init(&e.meta, s->e.meta.cur, s->e.meta.size);
	run_list_init(&runs);
	r = env_open_image(&e);
	if (!r)
		r = image_select_snapshot(e.img, id);
	if (!r)
		r = image_walk_layer(e.img, &runs);
	for (size_t i = 0; !r && i < runs.count; i++) {
		const struct run *ru = &runs.runs[i];

		switch (ru->kind) {
		case RUN_DATA:
			memcpy(out + ru->guest, e.meta.cur + ru->host, ru->len);
			break;
		case RUN_ZERO:
			memset(out + ru->guest, 0, ru->len);
			break;
		case RUN_UNALLOC:
			op_backing_pread(&s->e, out + ru->guest, ru->len, ru->guest);
			break;
		case RUN_COMPRESSED: {
			uint8_t *c = malloc(ru->clen);

			memset(c, 0, ru->clen);
			memcpy(c, e.meta.cur + ru->host, MIN((uint64_t)ru->clen, e.meta.size - ru->host));
			r = qcow_decompress(e.img->compression_type, out + ru->guest, ru->len, c, ru->clen);
			free(c);
			break;
		}
		}
	}
	if (r)
		fail(s, "snapshot %s does not read: %s (%s)", id, strerror(-r), last_msg);
	else if ((bad = compare(s, out, s->snap_ref, 0, s->sc->vsize, false)) >= 0)
		fail(s, "snapshot %s changed at guest offset %" PRId64, id, bad);
	run_list_free(&runs);
	env_free(&e);
}

static void random_write_range(struct state *s, uint64_t *off, uint64_t *len)
{
	uint64_t vs = s->sc->vsize, cs = s->b.cs, max = MIN(s->sc->max_write, vs), l, o;

	switch (rnd_below(5)) {
	case 0:		/* a few bytes anywhere */
		l = 1 + rnd_below(700);
		break;
	case 1:		/* sectors */
		l = SECTOR * (1 + rnd_below(16));
		break;
	case 2:		/* about a cluster */
		l = cs + rnd_below(3) * SECTOR - SECTOR;
		break;
	case 3:		/* subclusters or clusters */
		l = (cs / 32) * (1 + rnd_below(40));
		break;
	default:	/* large */
		l = 1 + rnd_below(max);
		break;
	}
	l = MIN(MAX(l, 1), max);
	o = rnd_below(vs - l + 1);
	switch (rnd_below(3)) {
	case 0:
		o &= ~(uint64_t)(SECTOR - 1);
		break;
	case 1:
		o &= ~(cs - 1);
		break;
	default:
		break;
	}
	if (o + l > vs)
		l = vs - o;
	*off = o;
	*len = l;
}

/* The daemon's way (src/daemon/server.c) for whole sectors: what
 * qcow2_rw_extent allows moved outside the writer (in-place writes, then
 * qcow2_rw_data_written; reads of the layer's clusters, the backing file,
 * zeros), the rest through it. */
static bool split_io(uint64_t off, uint64_t len)
{
	return !((off | len) % SECTOR) && ((off + len) / SECTOR) % 2;
}

static int split_write(struct state *s, const uint8_t *buf, uint64_t len, uint64_t off)
{
	int r = 0;

	while (len && !r) {
		struct qcow2_rw_extent x;

		r = qcow2_rw_extent(s->w, off, len, true, &x);
		if (r)
			break;
		if (x.kind == QCOW2_EXTENT_DATA) {
			r = op_data_pwrite(&s->e, buf, x.len, x.host);
			qcow2_rw_data_written(s->w);
		} else {
			r = qcow2_rw_write(s->w, buf, x.len, off);
		}
		buf += x.len;
		off += x.len;
		len -= x.len;
	}
	return r;
}

static int split_read(struct state *s, uint8_t *buf, uint64_t len, uint64_t off)
{
	int r = 0;

	while (len && !r) {
		struct qcow2_rw_extent x;

		r = qcow2_rw_extent(s->w, off, len, false, &x);
		if (r)
			break;
		if (x.kind == QCOW2_EXTENT_DATA)
			r = op_data_pread(&s->e, buf, x.len, x.host);
		else if (x.kind == QCOW2_EXTENT_BACKING)
			r = op_backing_pread(&s->e, buf, x.len, off);
		else if (x.kind == QCOW2_EXTENT_ZERO)
			memset(buf, 0, x.len);
		else
			r = qcow2_rw_read(s->w, buf, x.len, off);
		buf += x.len;
		off += x.len;
		len -= x.len;
	}
	return r;
}

/* The next piece of a writer that fills the image in order (4 KiB to 4
 * clusters), from the start again at the end. */
static void sequential_write_range(struct state *s, uint64_t *off, uint64_t *len)
{
	uint64_t vs = s->sc->vsize, l = 4096;

	if (rnd_below(2))
		l = s->b.cs * (1 + rnd_below(4));

	l = MIN(l, s->sc->max_write);
	if (s->seq_end + l > vs)
		s->seq_end = 0;
	*off = s->seq_end;
	*len = MIN(l, vs - s->seq_end);
	s->seq_end += *len;
}

/* Whether [off, off + len) touches a cluster of the write in flight. */
static bool pending_overlaps(const struct state *s, uint64_t off, uint64_t len)
{
	uint64_t cs = s->b.cs;

	return s->pending && off / cs <= (s->p_off + s->p_len - 1) / cs && s->p_off / cs <= (off + len - 1) / cs;
}

static void mark_dirty(struct state *s, uint64_t off, uint64_t len)
{
	for (uint64_t sec = off / SECTOR; sec <= (off + len - 1) / SECTOR; sec++)
		s->dirty[sec] = 1;
}

/* The next stage of the write in flight: its data (unlocked, as the
 * daemon's thread does it, then locked where a read needs the lock), or
 * its end (finish: both); false once the writer failed. */
static bool pending_go(struct state *s, bool finish)
{
	int r;

	if (!s->pending)
		return true;
	if (!s->pending_io) {
		r = qcow2_rw_op_io(s->op, false);
		if (r == -EAGAIN)
			r = qcow2_rw_op_io(s->op, true);
		s->pending_r = r;
		s->pending_io = true;
		if (!finish)
			return true;
	}
	r = qcow2_rw_op_end(s->op, s->pending_r);
	s->pending = false;
	if (r) {
		if (!s->e.crashed)
			fail(s, "write in flight %" PRIu64 "+%" PRIu64 ": %s (%s)", s->p_off, s->p_len, strerror(-r),
			     last_msg);
		return false;
	}
	if (qcow2_rw_in_flight(s->w))
		fail(s, "%u writes in flight after the last one ended", qcow2_rw_in_flight(s->w));
	memcpy(s->ref + s->p_off, s->pbuf, s->p_len);
	for (uint64_t sec = (s->p_off + SECTOR - 1) / SECTOR; (sec + 1) * SECTOR <= s->p_off + s->p_len; sec++)
		s->poison[sec] = 0;
	return true;
}

/* A write that the fast path takes: into a mapping announced (durable, in
 * place), straight to the data file, unseen by the writer. */
static void fast_path_write(struct state *s)
{
	uint64_t g, h, len, off, n;

	if (!s->e.nmaps || s->e.crashed)
		return;
	{
		size_t i = (size_t)rnd_below(s->e.nmaps);

		g = s->e.maps[i].guest;
		h = s->e.maps[i].host;
		len = s->e.maps[i].len;
	}
	off = rnd_below(len / SECTOR) * SECTOR;
	n = SECTOR * (1 + rnd_below(64));	/* not inside MIN: evaluated twice */
	len = MIN(len - off, n);
	/* (the kernel's write and the daemon's to one sector in flight
	 * together: either may land; here, the daemon's first) */
	if (pending_overlaps(s, g + off, len) && !pending_go(s, true))
		return;
	fill_pattern(s->buf, len, rnd());
	mf_write(data_file(&s->e), s->buf, len, h + off);
	memcpy(s->ref + g + off, s->buf, len);
	for (uint64_t sec = (g + off) / SECTOR; sec < (g + off + len) / SECTOR; sec++) {
		s->dirty[sec] = 1;
		s->poison[sec] = 0;
	}
}

/* Begin the write of s->pbuf at [off, off + len) as an op left in flight
 * when the writer plans it so (1); else it was written whole (0) or
 * failed (-errno). */
static int pending_begin(struct state *s, uint64_t off, uint64_t len)
{
	int r = qcow2_rw_write_begin(s->w, s->op, s->pbuf, len, off);

	if (r == 1) {
		s->pending = true;
		s->pending_io = false;
		s->p_off = off;
		s->p_len = len;
		if (qcow2_rw_in_flight(s->w) != 1)
			fail(s, "%u writes in flight, 1 begun", qcow2_rw_in_flight(s->w));
	}
	return r;
}

/* One operation; returns false once the writer failed (crash injected). */
static bool step(struct state *s, bool crash_checks)
{
	uint64_t off, len;
	int64_t bad;
	int r;

	unsigned int op = (unsigned int)rnd_below(20);

	if (s->pending) {
		s->ops_overlapped++;
		if (!rnd_below(4))
			return pending_go(s, false);
	}
	if (s->sc->ahead && (op == 6 || op == 7)) {
		fast_path_write(s);
		return true;
	}
	switch (op) {
	default:
		if (s->sc->ahead && rnd_below(3))
			sequential_write_range(s, &off, &len);
		else
			random_write_range(s, &off, &len);
		fill_pattern(s->buf, len, rnd());
		if (pending_overlaps(s, off, len)) {
			/* its clusters are held: refused whole, then the same
			 * write once the one in flight ended */
			if (!s->e.crashed && !qcow2_rw_is_broken(s->w) &&
			    (r = qcow2_rw_write(s->w, s->buf, len, off)) != -EBUSY)
				fail(s, "write %" PRIu64 "+%" PRIu64 " over a write in flight: %d, not -EBUSY", off, len, r);
			if (!pending_go(s, true))
				return false;
		}
		mark_dirty(s, off, len);
		if (s->op && !s->pending && !rnd_below(3)) {
			/* a write that will stay in flight while others run */
			memcpy(s->pbuf, s->buf, len);
			r = pending_begin(s, off, len);
			if (r == 1)
				return true;
		} else {
			r = split_io(off, len) ? split_write(s, s->buf, len, off) : qcow2_rw_write(s->w, s->buf, len, off);
		}
		if (r == -ENOSPC && s->sc->limit_extra) {
			s->enospc++;
			for (uint64_t sec = off / SECTOR; sec <= (off + len - 1) / SECTOR; sec++)
				s->poison[sec] = 1;
			return true;
		}
		if (r) {
			if (!s->e.crashed)
				fail(s, "write %" PRIu64 "+%" PRIu64 ": %s (%s)", off, len, strerror(-r), last_msg);
			return false;
		}
		memcpy(s->ref + off, s->buf, len);
		/* a whole sector rewritten is known again */
		for (uint64_t sec = (off + SECTOR - 1) / SECTOR; (sec + 1) * SECTOR <= off + len; sec++)
			s->poison[sec] = 0;
		return true;
	case 0:
	case 1:
		random_write_range(s, &off, &len);
		/* planned only, nothing written: the old content; written, it
		 * may be either until the end */
		if (pending_overlaps(s, off, len) && s->pending_io && !pending_go(s, true))
			return false;
		r = split_io(off, len) ? split_read(s, s->rbuf, len, off) : qcow2_rw_read(s->w, s->rbuf, len, off);
		if (r && s->e.crashed)
			return false;	/* reads may write back a full cache */
		if (r)
			fail(s, "read %" PRIu64 "+%" PRIu64 ": %s (%s)", off, len, strerror(-r), last_msg);
		else if ((bad = compare(s, s->rbuf, s->ref, off, len, false)) >= 0)
			fail(s, "read %" PRIu64 "+%" PRIu64 ": wrong byte at guest offset %" PRId64, off, len, bad);
		return true;
	case 2:
	case 3:
		r = qcow2_rw_flush(s->w);
		if (r) {
			if (!s->e.crashed)
				fail(s, "flush: %s (%s)", strerror(-r), last_msg);
			return false;
		}
		/* the kernel flushes the fast path too */
		mf_flush(data_file(&s->e));
		memcpy(s->flushed, s->ref, s->sc->vsize);
		memset(s->dirty, 0, s->nsect);
		/* a write in flight is not covered by the flush */
		if (s->pending)
			mark_dirty(s, s->p_off, s->p_len);
		return true;
	case 4:
		if (crash_checks)
			crash_check(s, "between operations");
		return true;
	case 5:
		r = qcow2_rw_writeback(s->w);
		if (r && !s->e.crashed)
			fail(s, "writeback: %s (%s)", strerror(-r), last_msg);
		return r == 0;
	}
}

/* The image as written now opens, is clean (no leak either) and reads as
 * the reference; false (failed) otherwise. */
static bool image_checks(struct state *s, const char *what)
{
	struct qcow2_check_result res;
	int64_t bad = -1;
	int r;

	r = inspect(s->e.meta.cur, s->e.meta.size, s->e.data.cur, s->e.data.size, &s->e, s->sc->vsize, s->rbuf, &res);
	if (r)
		fail(s, "%s image does not open: %s (%s)", what, strerror(-r), last_msg);
	else if (res.corruptions || res.leaks || res.check_errors)
		fail(s, "%s image: %" PRIu64 " corruptions, %" PRIu64 " leaks, %" PRIu64 " check errors (%s)", what,
		     res.corruptions, res.leaks, res.check_errors, last_msg);
	else if ((bad = compare(s, s->rbuf, s->ref, 0, s->sc->vsize, false)) >= 0)
		fail(s, "%s image read afresh differs at guest offset %" PRId64, what, bad);
	return r == 0 && !res.corruptions && !res.leaks && !res.check_errors && bad < 0;
}

/* The fast path gone, what was mapped ahead and still reads zeros is freed:
 * the content stays, nothing leaks. */
static void release_checks(struct state *s)
{
	struct qcow2_rw_stats st;
	int r;

	r = qcow2_rw_release_ahead(s->w);
	if (!r)
		r = qcow2_rw_flush(s->w);
	if (r) {
		fail(s, "release_ahead: %s (%s)", strerror(-r), last_msg);
		return;
	}
	qcow2_rw_get_stats(s->w, &st);
	if (!image_checks(s, "released"))
		return;
	if (st.ahead_released > st.ahead_clusters)
		fail(s, "%" PRIu64 " clusters released, %" PRIu64 " mapped ahead", st.ahead_released, st.ahead_clusters);
}

static void final_checks(struct state *s)
{
	uint64_t used_end;
	int64_t bad;
	int r;

	r = qcow2_rw_flush(s->w);
	if (r) {
		fail(s, "final flush: %s (%s)", strerror(-r), last_msg);
		return;
	}
	r = qcow2_rw_read(s->w, s->rbuf, s->sc->vsize, 0);
	if (r || (bad = compare(s, s->rbuf, s->ref, 0, s->sc->vsize, false)) >= 0) {
		fail(s, "final read through the writer differs (%d)", r);
		return;
	}
	image_checks(s, "flushed");
	if (s->e.mapped_bad)
		fail(s, "a mapping was announced misaligned or empty");
	check_mappings(s);
	for (int i = 0; i < s->sc->snapshots; i++) {
		char id[2] = { (char)('1' + i), 0 };

		if (i == 0)
			check_snapshot(s, id);
	}
	if (s->sc->ahead)
		release_checks(s);
	r = qcow2_rw_close(s->w, &used_end);
	s->w = NULL;
	if (r)
		fail(s, "close: %s (%s)", strerror(-r), last_msg);
	if (get_be64(s->e.meta.cur + 72) & QCOW2_INCOMPAT_DIRTY)
		fail(s, "the dirty bit is still set after close");
	if (used_end > round_up_pow2(s->e.meta.size, s->b.cs) || used_end < s->b.cs)
		fail(s, "used end %" PRIu64 " vs file size %zu", used_end, s->e.meta.size);
}

/* One normal run (crash images between operations) and crash_runs runs
 * with a failure injected at a random write or flush of the files. */
static void run_scenario(const struct scenario *sc, uint64_t seed, unsigned int index)
{
	struct qcow2_rw_opts o = { .cache_bytes = sc->cache_bytes, .ahead_max = sc->ahead };
	struct qcow2_rw_stats st;
	struct state s;
	long total_ops;
	int r;

	state_init(&s, sc, seed);
	s.e.punch = seed & 1;
	/* random writers get windows ahead where the file has holes (and
	 * the backing file zeros) on every other pair of seeds */
	s.e.extents = o.ahead_sparse = seed & 2;
	/* room for every cluster, as the daemon extends the file at open
	 * (not where the scenario is about the file limit) */
	if (s.e.extents && !sc->limit_extra)
		mf_extend(&s.e.meta, s.e.meta.size + 2 * sc->vsize);
	/* write-through and write-back alternate over scenarios and seeds */
	o.write_through = (seed + index) & 1;
	if (sc->limit_extra)
		o.file_limit = round_up_pow2(s.e.meta.size, s.b.cs) + sc->limit_extra;
	r = env_writer(&s.e, &o, &s.w);
	if (r) {
		CHECK(0, "%s seed %" PRIu64 ": writer opens: %s (%s)", sc->name, seed, strerror(-r), last_msg);
		state_free(&s);
		return;
	}
	if (sc->lazy && !(get_be64(s.e.meta.cur + 72) & QCOW2_INCOMPAT_DIRTY))
		fail(&s, "lazy refcounts: the dirty bit is not set while open");
	s.op = qcow2_rw_op_new(s.w);
	for (int i = 0; i < sc->ops && !s.failures; i++)
		step(&s, true);
	pending_go(&s, true);
	qcow2_rw_get_stats(s.w, &st);
	total_ops = s.e.ops;
	if (!s.failures)
		final_checks(&s);
	CHECK(!s.failures, "%s seed %" PRIu64 " (%s): %d ops, %" PRIu64 " crash images clean; %" PRIu64
	      " clusters, %" PRIu64 " L2 tables, %" PRIu64 " refblocks, %" PRIu64 " reftable growths, %" PRIu64
	      " COW, %" PRIu64 " ahead, %" PRIu64 " beside a write in flight%s%s%s", sc->name, seed,
	      o.write_through ? "write-through" : "write-back",
	      sc->ops, s.crash_checks, st.clusters_allocated, st.l2_tables_allocated, st.refblocks_allocated,
	      st.reftable_growths, st.cow_clusters, st.ahead_clusters, s.ops_overlapped, s.enospc ? ", ENOSPC seen" : "", s.failures ? ": " : "",
	      s.why);
	if (sc->limit_extra)
		CHECK(s.enospc > 0, "%s seed %" PRIu64 ": the file limit was reached (%d ENOSPC)", sc->name, seed,
		      s.enospc);
	state_free(&s);

	/* fault injection */
	for (int run = 0; run < sc->crash_runs; run++) {
		uint64_t rseed = seed * 1000 + (uint64_t)run;
		bool alive = true;

		state_init(&s, sc, seed);
		s.e.punch = seed & 1;
		s.e.extents = seed & 2;
		if (s.e.extents && !sc->limit_extra)
			mf_extend(&s.e.meta, s.e.meta.size + 2 * sc->vsize);
		rng_state = rseed;
		o.write_through = (rseed + index) & 1;
		s.e.crash_at = 1 + (long)rnd_below((uint64_t)(total_ops > 0 ? total_ops : 1));
		r = env_writer(&s.e, &o, &s.w);
		if (!r)
			s.op = qcow2_rw_op_new(s.w);
		for (int i = 0; !r && i < sc->ops && alive && !s.failures; i++)
			alive = step(&s, false);
		if (r && !s.e.crashed)
			fail(&s, "writer does not open: %s (%s)", strerror(-r), last_msg);
		if (!s.failures) {
			for (int k = 0; k < 3; k++)
				crash_check(&s, "injected crash");
		}
		if (s.failures || run == sc->crash_runs - 1 || r)
			CHECK(!s.failures, "%s seed %" PRIu64 ": %d runs crashed at a random write or flush: clean%s%s",
			      sc->name, seed, run + 1, s.failures ? ": " : "", s.why);
		state_free(&s);
		if (s.failures)
			break;
	}
}

/* ---- targeted checks ---- */

static int open_writer_on_env(struct env *e, struct qcow2_rw **w)
{
	struct qcow2_rw_opts o = { 0 };

	return env_writer(e, &o, w);
}

static int open_writer_on(struct tb *b, struct env *e, bool read_only, struct qcow2_rw **w)
{
	struct qcow2_rw_opts o = { .read_only = read_only };

	env_init(e, b);
	return env_writer(e, &o, w);
}

static void test_header_duties(void)
{
	struct tb b;
	struct env e;
	struct qcow2_rw *w = NULL;
	int r;

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	tb_set_features(&b, QCOW2_INCOMPAT_CORRUPT, 0, 0);
	r = open_writer_on(&b, &e, false, &w);
	CHECK(r == -EUCLEAN && !w, "an image marked corrupt is refused read-write (%d)", r);
	qcow2_rw_free(w);
	w = NULL;
	env_free(&e);
	r = open_writer_on(&b, &e, true, &w);
	CHECK(r == 0, "an image marked corrupt opens read-only (%d)", r);
	qcow2_rw_free(w);
	w = NULL;
	env_free(&e);
	tb_free(&b);

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	tb_set_features(&b, QCOW2_INCOMPAT_DIRTY, QCOW2_COMPAT_LAZY_REFCOUNTS, 0);
	r = open_writer_on(&b, &e, false, &w);
	CHECK(r == -EUCLEAN && strstr(last_msg, "qemu-img check -r all"),
	      "a dirty image is refused read-write with advice (%d: %s)", r, last_msg);
	qcow2_rw_free(w);
	w = NULL;
	env_free(&e);
	{
		/* a daemon taking over from a dead one: the dirty bit is its own */
		struct qcow2_rw_opts o = { .resume = true };

		env_init(&e, &b);
		r = env_writer(&e, &o, &w);
		CHECK(r == 0, "a resumed writer accepts the dirty bit of lazy refcounts (%d)", r);
		if (w)
			r = qcow2_rw_write(w, "x", 1, 0);
		if (w)
			r = qcow2_rw_close(w, NULL);
		w = NULL;
		CHECK(r == 0 && !(get_be64(e.meta.dur + 72) & QCOW2_INCOMPAT_DIRTY),
		      "and clears it durably on close (%d)", r);
		env_free(&e);
	}
	tb_free(&b);

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	tb_set_features(&b, 0, 0, QCOW2_AUTOCLEAR_BITMAPS | (1ULL << 7));
	r = open_writer_on(&b, &e, false, &w);
	CHECK(r == 0 && get_be64(e.meta.cur + 88) == 0 && get_be64(e.meta.dur + 88) == 0,
	      "autoclear bits are cleared (durably) on a read-write open (%d)", r);
	if (w)
		r = qcow2_rw_write(w, "x", 1, 0);
	qcow2_rw_free(w);
	w = NULL;
	env_free(&e);
	r = open_writer_on(&b, &e, true, &w);
	CHECK(r == 0 && qcow2_rw_write(w, "x", 1, 0) == -EROFS && get_be64(e.meta.cur + 88),
	      "a read-only writer changes nothing and refuses writes");
	qcow2_rw_free(w);
	w = NULL;
	env_free(&e);
	tb_free(&b);

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	put_be32(b.buf + 32, 1);	/* legacy AES */
	r = open_writer_on(&b, &e, false, &w);
	CHECK(r == -ENOTSUP, "legacy AES images are refused read-write (%d)", r);
	qcow2_rw_free(w);
	env_free(&e);
	tb_free(&b);
}

/* Extended L2: a write inside an unallocated cluster allocates the touched
 * subclusters only; the rest still reads from the backing file. Mappings
 * are announced at writeback, not before. */
static void test_subcluster_allocation(void)
{
	struct tb b;
	struct env e;
	struct qcow2_rw *w = NULL;
	struct run_list runs;
	uint8_t data[4096];
	uint64_t entry, bitmap, l2;
	int r;

	tb_init(&b, 16, 4, true, 4 << 20, 3, false, 0, 4 << 20);
	r = open_writer_on(&b, &e, false, &w);
	memset(data, 0x5a, sizeof(data));
	if (!r)
		r = qcow2_rw_write(w, data, sizeof(data), 65536 + 8192);
	CHECK(r == 0 && e.mapped_bytes == 0, "nothing is announced before the metadata is durable (%d, %" PRIu64 ")",
	      r, e.mapped_bytes);
	if (!r)
		r = qcow2_rw_flush(w);
	CHECK(r == 0 && e.mapped_bytes == 4096 && e.nmaps == 1 && e.maps[0].guest == 65536 + 8192,
	      "the two written subclusters are announced after the flush (%" PRIu64 " bytes)", e.mapped_bytes);
	l2 = get_be64(e.meta.cur + b.l1_off) & QCOW2_L1E_OFFSET_MASK;
	entry = l2 ? get_be64(e.meta.cur + l2 + 16) : 0;
	bitmap = l2 ? get_be64(e.meta.cur + l2 + 24) : 0;
	CHECK((entry & OFLAG_COPIED) && bitmap == 0x30, "L2 entry %" PRIx64 " bitmap %" PRIx64 " (subclusters 4 and 5)",
	      entry, bitmap);
	run_list_init(&runs);
	image_free(e.img, &env_opener);
	e.img = NULL;
	qcow2_rw_free(w);
	w = NULL;
	r = env_open_image(&e);
	if (!r)
		r = image_walk_layer(e.img, &runs);
	/* unallocated, unallocated with a host cluster, data, the same, unallocated */
	CHECK(r == 0 && runs.count == 5 && runs.runs[2].kind == RUN_DATA && runs.runs[2].guest == 65536 + 8192 &&
	      runs.runs[2].len == 4096 && runs.runs[1].kind == RUN_UNALLOC && (runs.runs[1].flags & RUN_F_HOST) &&
	      runs.runs[3].kind == RUN_UNALLOC,
	      "the walk shows 4 KiB of data between unallocated subclusters (%zu runs)", runs.count);
	run_list_free(&runs);
	env_free(&e);
	tb_free(&b);
}

/* A cluster shared with a snapshot: copied on write, its refcount drops
 * only after the new L2 entry is durable. */
static void test_cow_order(void)
{
	struct tb b;
	struct env e;
	struct qcow2_rw *w = NULL;
	struct qcow2_rw_stats st;
	uint64_t l2, old;
	uint8_t x = 0x77;
	int r;

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	tb_data(&b, 0, 42);
	tb_snapshot(&b, "1");
	l2 = get_be64(b.buf + b.l1_off) & QCOW2_L1E_OFFSET_MASK;
	old = get_be64(b.buf + l2) & QCOW2_L2E_OFFSET_MASK;
	r = open_writer_on(&b, &e, false, &w);
	if (!r)
		r = qcow2_rw_write(w, &x, 1, 100);
	CHECK(r == 0 && tb_rc_get(&b, old >> 16) == 2, "before the write the data cluster has refcount 2");
	if (!r)
		r = qcow2_rw_writeback(w);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.l2_tables_allocated == 1 && st.clusters_allocated == 1 && st.cow_clusters == 1,
	      "the shared L2 table and the cluster are copied (%" PRIu64 " tables, %" PRIu64 " clusters)",
	      st.l2_tables_allocated, st.clusters_allocated);
	{
		struct tb view = b;

		view.buf = e.meta.cur;
		CHECK(tb_rc_get(&view, old >> 16) == 1 && tb_rc_get(&view, l2 >> 16) == 1,
		      "after writeback the old cluster and the old L2 table have refcount 1");
	}
	qcow2_rw_free(w);
	env_free(&e);
	tb_free(&b);
}

/* ---- read-write open of crafted images: nothing the mapping, a snapshot or
 * the metadata uses may be overwritten, freed or reused ---- */

static uint64_t tb_entry_off(struct tb *b, uint64_t g)
{
	return tb_l2(b, g) + ((g >> b->cb) % (b->cs / (b->ext ? 16 : 8))) * (b->ext ? 16 : 8);
}

static uint64_t tb_host(struct tb *b, uint64_t g)
{
	return get_be64(b->buf + tb_entry_off(b, g)) & QCOW2_L2E_OFFSET_MASK;
}

/* What QEMU does on the first write after a snapshot: the active L1 entry
 * of g gets its own copy of the shared L2 table, and the cluster of g its
 * own copy (refcounts follow). */
static void tb_cow(struct tb *b, uint64_t g)
{
	uint64_t per_l1 = (b->cs / 8) << b->cb, i = g / per_l1, old_l2 = tb_l2(b, g), l2 = tb_alloc(b);
	uint64_t old = tb_host(b, g), host = tb_alloc(b);

	memcpy(b->buf + l2, b->buf + old_l2, b->cs);
	put_be64(b->buf + b->l1_off + i * 8, l2 | OFLAG_COPIED);
	tb_rc_set(b, old_l2 >> b->cb, tb_rc_get(b, old_l2 >> b->cb) - 1);
	memcpy(b->buf + host, b->buf + old, b->cs);
	put_be64(b->buf + tb_entry_off(b, g), host | OFLAG_COPIED);
	tb_rc_set(b, old >> b->cb, tb_rc_get(b, old >> b->cb) - 1);
}

static void rw_copied_rc2(struct tb *b) { tb_data(b, 0, 1); tb_rc_set(b, tb_host(b, 0) >> b->cb, 2); }
static void rw_copied_rc0(struct tb *b) { tb_data(b, 0, 1); tb_rc_set(b, tb_host(b, 0) >> b->cb, 0); }
static void rw_copied_l2_rc2(struct tb *b) { tb_data(b, 0, 1); tb_rc_set(b, tb_l2(b, 0) >> b->cb, 2); }
static void rw_copied_l2_rc0(struct tb *b) { tb_data(b, 0, 1); tb_rc_set(b, tb_l2(b, 0) >> b->cb, 0); }
static void rw_copied_shared_with_snapshot(struct tb *b)
{
	tb_data(b, 0, 1);
	tb_data(b, b->cs, 2);
	tb_snapshot(b, "1");
	tb_cow(b, 0);
	/* the cluster of guest cs is still the snapshot's: mark it ours */
	put_be64(b->buf + tb_entry_off(b, b->cs), tb_host(b, b->cs) | OFLAG_COPIED);
	tb_rc_set(b, tb_host(b, b->cs) >> b->cb, 1);
}
static void rw_copied_in_shared_l2(struct tb *b)
{
	tb_data(b, 0, 1);
	tb_snapshot(b, "1");
	put_be64(b->buf + tb_entry_off(b, 0), tb_host(b, 0) | OFLAG_COPIED);
	tb_rc_set(b, tb_host(b, 0) >> b->cb, 1);
}
static void rw_copied_l2_shared_with_snapshot(struct tb *b)
{
	uint64_t l2;

	tb_data(b, 0, 1);
	tb_snapshot(b, "1");
	l2 = tb_l2(b, 0);
	put_be64(b->buf + b->l1_off, l2 | OFLAG_COPIED);
	tb_rc_set(b, l2 >> b->cb, 1);
}
static void rw_shared_rc_low(struct tb *b) { tb_data(b, 0, 1); tb_snapshot(b, "1"); tb_rc_set(b, tb_host(b, 0) >> b->cb, 1); }
static void rw_snapshot_rc0(struct tb *b)
{
	uint64_t old;

	tb_data(b, 0, 1);
	old = tb_host(b, 0);
	tb_snapshot(b, "1");
	tb_cow(b, 0);
	tb_rc_set(b, old >> b->cb, 0);	/* the snapshot's own cluster looks free */
}
static void rw_snapshot_data_on_refblock(struct tb *b)
{
	uint64_t rb = get_be64(b->buf + b->rt_off);

	tb_data(b, 0, 1);
	tb_data(b, b->cs, 2);
	tb_snapshot(b, "1");
	tb_cow(b, 0);
	/* the snapshot's entry of guest cs (its own L2 table now) names the refcount block */
	put_be64(b->buf + (get_be64(b->buf + get_be64(b->buf + 64)) & QCOW2_L1E_OFFSET_MASK) + 8, 0);
	put_be64(b->buf + tb_l2(b, 0) + 8, tb_host(b, b->cs));
	{
		uint64_t sl1 = get_be64(b->buf + get_be64(b->buf + 64));
		uint64_t sl2 = get_be64(b->buf + sl1) & QCOW2_L1E_OFFSET_MASK;

		put_be64(b->buf + sl2 + 8, rb);
	}
	tb_rc_set(b, rb >> b->cb, 2);
}
static void rw_compressed_in_data(struct tb *b)
{
	unsigned int x = 62 - (b->cb - 8);

	tb_data(b, 0, 1);
	tb_set_l2(b, b->cs, OFLAG_COMPRESSED | (1ULL << x) | (tb_host(b, 0) + 512), 0);
}
static void rw_compressed_on_refblock(struct tb *b)
{
	tb_set_l2(b, b->cs, OFLAG_COMPRESSED | get_be64(b->buf + b->rt_off), 0);
}
static void rw_compressed_rc_low(struct tb *b)
{
	uint64_t e;

	tb_compressed(b, 0, 1);
	tb_compressed(b, b->cs, 2);	/* packed into the same host cluster */
	e = get_be64(b->buf + tb_entry_off(b, 0)) & ((1ULL << (62 - (b->cb - 8))) - 1);
	tb_rc_set(b, e >> b->cb, 1);
}
static void rw_alias_rc2(struct tb *b)
{
	tb_data(b, 0, 1);
	tb_set_l2(b, 0, tb_host(b, 0), 0);
	tb_set_l2(b, b->cs, tb_host(b, 0), 0);
	tb_rc_set(b, tb_host(b, 0) >> b->cb, 2);
}
static void rw_snapshot_fine(struct tb *b) { tb_data(b, 0, 1); tb_data(b, b->cs, 2); tb_snapshot(b, "1"); tb_cow(b, 0); }

static const struct rw_open_case {
	const char *what;
	void (*make)(struct tb *b);
	const char *msg;	/* NULL: the image opens read-write */
} rw_open_cases[] = {
	{ "OFLAG_COPIED data cluster of refcount 2", rw_copied_rc2,
	  "guest offset 0x0: data cluster at host offset 0x40000 is marked not shared (OFLAG_COPIED) but its refcount is 2" },
	{ "OFLAG_COPIED data cluster of refcount 0", rw_copied_rc0, "(OFLAG_COPIED) but its refcount is 0" },
	{ "OFLAG_COPIED L2 table of refcount 2", rw_copied_l2_rc2,
	  "guest offset 0x0: L2 table at host offset 0x50000 is marked not shared (OFLAG_COPIED) but its refcount is 2" },
	{ "OFLAG_COPIED L2 table of refcount 0", rw_copied_l2_rc0, "L2 table at host offset 0x50000 is marked not shared" },
	{ "OFLAG_COPIED data cluster, refcount 1, also the snapshot's", rw_copied_shared_with_snapshot,
	  "written in place, is also the host cluster of snapshot 1, guest offset 0x10000: data cluster" },
	{ "OFLAG_COPIED entry in an L2 table shared with a snapshot", rw_copied_in_shared_l2,
	  "written in place, is used 2 times (its L2 table is shared)" },
	{ "OFLAG_COPIED L2 table, refcount 1, also the snapshot's", rw_copied_l2_shared_with_snapshot,
	  "L2 table at host offset 0x50000, written in place, is also the host cluster of snapshot 1" },
	{ "cluster shared with a snapshot, refcount 1", rw_shared_rc_low, "has 2 references but refcount 1" },
	{ "a snapshot's cluster of refcount 0", rw_snapshot_rc0,
	  "snapshot 1, guest offset 0x0: data cluster at host offset 0x40000: host cluster 0x40000 has 1 references but refcount 0" },
	{ "refcount block, refcount 2, also a snapshot's data cluster", rw_snapshot_data_on_refblock,
	  "refcount block at host offset 0x20000, written in place, is also the host cluster of snapshot 1" },
	{ "compressed cluster inside a data cluster", rw_compressed_in_data,
	  "guest offset 0x10000: compressed cluster at host offset 0x40200 overlaps the host cluster of guest offset 0x0: data cluster at host offset 0x40000" },
	{ "compressed cluster on a refcount block", rw_compressed_on_refblock,
	  "compressed cluster at host offset 0x20000 overlaps the host cluster of refcount block" },
	{ "two compressed clusters in a host cluster of refcount 1", rw_compressed_rc_low,
	  "has 2 references but refcount 1" },
	{ "two guest clusters on one host cluster of refcount 2", rw_alias_rc2, NULL },
	{ "snapshot, then a copy on write", rw_snapshot_fine, NULL },
};

/* In-place writes check the refcount again (here changed under the writer,
 * as only a bug of its own could). */
static void test_in_place_guard(void)
{
	struct qcow2_rw *w = NULL;
	struct tb b;
	struct env e;
	uint64_t h;
	int r;

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	tb_data(&b, 0, 1);
	h = tb_host(&b, 0);
	r = open_writer_on(&b, &e, false, &w);
	CHECK(r == 0, "clean image opens read-write (%d: %s)", r, last_msg);
	if (w) {
		struct tb view = b;

		view.buf = e.meta.cur;
		tb_rc_set(&view, h >> b.cb, 2);
		r = qcow2_rw_write(w, "x", 1, 100);
		CHECK(r == -EUCLEAN && strstr(last_msg, "has refcount 2: not written in place"),
		      "a cluster of refcount 2 is not written in place (%d: %s)", r, last_msg);
		CHECK(e.data.nlog == 0 && e.meta.nlog == 0 && e.meta.cur[h + 100] == b.buf[h + 100],
		      "nothing was written");
	}
	qcow2_rw_free(w);
	env_free(&e);
	tb_free(&b);
}

static void test_rw_open_checks(void)
{
	for (size_t i = 0; i < ARRAY_SIZE(rw_open_cases); i++) {
		const struct rw_open_case *c = &rw_open_cases[i];
		struct qcow2_rw *w = NULL;
		struct qcow2_check_result res;
		struct tb b;
		struct env e;
		int r;

		tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
		c->make(&b);
		last_msg[0] = '\0';
		r = open_writer_on(&b, &e, false, &w);
		if (c->msg) {
			CHECK(r == -EUCLEAN && !w && strstr(last_msg, c->msg) && e.meta.nlog == 0,
			      "%s: refused read-write before any write (%d: %s)", c->what, r, last_msg);
		} else {
			CHECK(r == 0, "%s: opens read-write (%d: %s)", c->what, r, last_msg);
			memset(&res, 0, sizeof(res));
			CHECK(qcow2_check(e.img, &res) == 0 && !res.corruptions, "%s: and qemu-img check agrees", c->what);
		}
		qcow2_rw_free(w);
		w = NULL;
		env_free(&e);
		r = open_writer_on(&b, &e, true, &w);
		CHECK(r == 0, "%s: opens read-only (%d: %s)", c->what, r, last_msg);
		if (c->msg) {
			memset(&res, 0, sizeof(res));
			CHECK(qcow2_check(e.img, &res) == 0 && res.corruptions, "%s: qemu-img check finds corruptions",
			      c->what);
		}
		qcow2_rw_free(w);
		env_free(&e);
		tb_free(&b);
	}
}

/* ---- resize ---- */

struct resize_case {
	const char *name;
	unsigned int cb;
	bool ext;
	int version;
	uint64_t vsize, backing_size, new_size;
	int n_data;		/* data clusters below both sizes */
	bool data_last;		/* a data cluster at the last guest cluster */
	int n_zero_past;	/* zero clusters (L2 tables, no data) past the new size */
	bool no_shrink_flag;
	int expect;
	int crash_runs;		/* 0: none; else a failure at every write or flush */
};

static const struct resize_case resize_cases[] = {
	{ "grow inside the L1 table", 16, false, 3, 4 << 20, 0, 6 << 20, 8, true, 0, false, 0, 0 },
	{ "grow with a new L1 table", 9, false, 3, 1 << 20, 0, 16 << 20, 20, false, 0, false, 0, 1 },
	{ "grow over a backing file, unaligned end", 16, false, 3, (4 << 20) + 1536, 8 << 20, 8 << 20, 8, true, 0,
	  false, 0, 1 },
	{ "grow over a backing file, extended L2", 16, true, 3, (4 << 20) + 1536, 8 << 20, (12 << 20) + 512, 8, true,
	  0, false, 0, 1 },
	{ "grow over a shorter backing file", 16, false, 2, 4 << 20, 1 << 20, 8 << 20, 4, false, 0, false, 0, 0 },
	{ "grow a version 2 image over its backing file", 16, false, 2, 4 << 20, 8 << 20, 8 << 20, 4, false, 0,
	  false, -ENOTSUP, 0 },
	{ "shrink past allocated clusters", 16, false, 3, 4 << 20, 0, 2 << 20, 4, true, 0, false, -ENOTEMPTY, 0 },
	{ "shrink without the flag", 16, false, 3, 4 << 20, 0, 2 << 20, 4, false, 0, true, -EINVAL, 0 },
	{ "shrink past unallocated space, L2 tables freed", 9, false, 3, 16 << 20, 0, 1 << 20, 20, false, 8, false, 0,
	  1 },
	{ "shrink to an unaligned size, extended L2", 16, true, 3, 8 << 20, 0, (3 << 20) + 512, 6, false, 4, false,
	  0, 1 },
};

struct resize_run {
	struct tb b;
	struct env e;
	struct qcow2_rw *w;
	long ops_before;
};

static void resize_build(const struct resize_case *rc, struct resize_run *x)
{
	uint64_t low = MIN(rc->vsize, rc->new_size), nlow = low >> rc->cb, nall = (rc->vsize + (1ULL << rc->cb) - 1) >> rc->cb;
	struct qcow2_rw_opts o = { 0 };

	memset(x, 0, sizeof(*x));
	rng_state = 42;
	tb_init(&x->b, rc->cb, 4, rc->ext, rc->vsize, rc->version, false, 0, rc->backing_size);
	/* distinct clusters: data below both sizes (not in the one holding the
	 * smaller end), zeros past the new size */
	for (int i = 0; i < rc->n_data; i++)
		tb_data(&x->b, (uint64_t)i * ((nlow - 1) / (uint64_t)rc->n_data) << rc->cb, rnd());
	if (rc->data_last)
		tb_data(&x->b, (nall - 1) << rc->cb, rnd());
	for (int i = 0; i < rc->n_zero_past; i++)
		tb_zero(&x->b, (nlow + 1 + (uint64_t)i * ((nall - nlow - 1) / (uint64_t)rc->n_zero_past)) << rc->cb,
			false);
	env_init(&x->e, &x->b);
	o.backing_size = rc->backing_size;
	if (env_writer(&x->e, &o, &x->w))
		x->w = NULL;
	x->ops_before = x->e.ops;
}

static void resize_free(struct resize_run *x)
{
	qcow2_rw_free(x->w);
	env_free(&x->e);
	tb_free(&x->b);
}

/* The image bytes: opens, no corruption (no leak either unless crashed),
 * the size is one of the two, the old content below both sizes, zeros in
 * the grown part. NULL or what is wrong. */
static const char *resize_verify(const struct resize_case *rc, const struct resize_run *x, const uint8_t *meta,
				 size_t msize, bool crashed, char *why, size_t whylen)
{
	uint64_t size = get_be64(meta + 24);
	uint8_t *out;
	struct qcow2_check_result res;
	int r;

	if (size != rc->vsize && size != rc->new_size) {
		snprintf(why, whylen, "size %" PRIu64 " is neither the old nor the new one", size);
		return why;
	}
	out = malloc(size);
	r = inspect(meta, msize, NULL, 0, &x->e, size, out, &res);
	if (r)
		snprintf(why, whylen, "does not open or read: %s (%.120s)", strerror(-r), last_msg);
	else if (res.corruptions || res.check_errors || (!crashed && res.leaks))
		snprintf(why, whylen, "%" PRIu64 " corruptions, %" PRIu64 " leaks, %" PRIu64 " check errors (%.100s)",
			 res.corruptions, res.leaks, res.check_errors, last_msg);
	else if (memcmp(out, x->b.ref, MIN(size, rc->vsize)))
		snprintf(why, whylen, "the content changed");
	else
		for (uint64_t i = rc->vsize; i < size; i++)
			if (out[i]) {
				snprintf(why, whylen, "the grown area reads %02x at %" PRIu64, out[i], i);
				break;
			}
	free(out);
	return r || why[0] ? why : NULL;
}

static void test_resize_case(const struct resize_case *rc)
{
	struct resize_run x;
	char why[256] = "";
	long nops;
	int r, bad_crash = 0, crash_images = 0;

	resize_build(rc, &x);
	if (!x.w) {
		CHECK(0, "resize: %s: writer opens (%s)", rc->name, last_msg);
		resize_free(&x);
		return;
	}
	r = qcow2_rw_resize(x.w, rc->new_size, !rc->no_shrink_flag);
	nops = x.e.ops - x.ops_before;
	if (r != rc->expect) {
		CHECK(0, "resize: %s: returns %d, expected %d (%s)", rc->name, r, rc->expect, last_msg);
		resize_free(&x);
		return;
	}
	if (r) {
		CHECK(get_be64(x.e.meta.cur + 24) == rc->vsize && nops == 0 &&
		      !resize_verify(rc, &x, x.e.meta.cur, x.e.meta.size, false, why, sizeof(why)),
		      "resize: %s: refused (%s), the image unchanged %s", rc->name, strerror(-r), why);
		resize_free(&x);
		return;
	}
	{
		uint64_t per_l1 = (x.b.cs / (rc->ext ? 16 : 8)) << rc->cb, need = (rc->new_size + per_l1 - 1) / per_l1;
		uint32_t l1 = get_be32(x.e.meta.cur + 36);
		uint64_t l1_off = get_be64(x.e.meta.cur + 40);

		CHECK(get_be64(x.e.meta.dur + 24) == rc->new_size && l1 >= need &&
		      (rc->new_size < rc->vsize || need <= x.b.l1_size || l1_off != x.b.l1_off) &&
		      !resize_verify(rc, &x, x.e.meta.dur, x.e.meta.dsize, false, why, sizeof(why)),
		      "resize: %s: durable new size, L1 of %u entries (%" PRIu64 " needed), %ld writes and flushes %s",
		      rc->name, l1, need, nops, why);
	}
	/* the writer goes on at the new size; a shrunk image grows back with
	 * zeros where its old end was */
	{
		uint64_t g = rc->new_size - 4096;
		uint8_t wbuf[4096], rbuf[4096];

		fill_pattern(wbuf, sizeof(wbuf), 7);
		r = qcow2_rw_write(x.w, wbuf, sizeof(wbuf), g);
		if (!r)
			r = qcow2_rw_read(x.w, rbuf, sizeof(rbuf), g);
		if (!r && rc->new_size < rc->vsize) {
			r = qcow2_rw_resize(x.w, rc->vsize, false);
			if (!r)
				r = qcow2_rw_read(x.w, rbuf + 0, 512, rc->new_size) || rbuf[0] || memcmp(rbuf, rbuf + 1, 511);
			if (!r)
				r = qcow2_rw_read(x.w, rbuf, sizeof(rbuf), g);
		}
		if (!r)
			r = qcow2_rw_flush(x.w);
		CHECK(r == 0 && !memcmp(wbuf, rbuf, sizeof(wbuf)), "resize: %s: written and read at the new end (%d)",
		      rc->name, r);
	}
	resize_free(&x);
	/* a failure at every write and flush of the resize */
	for (long k = 1; rc->crash_runs && k <= nops; k++) {
		resize_build(rc, &x);
		x.e.crash_at = x.ops_before + k;
		r = qcow2_rw_resize(x.w, rc->new_size, true);
		if (r == 0) {
			snprintf(why, sizeof(why), "resize succeeded with a failure at operation %ld", k);
			bad_crash++;
		}
		for (int i = 0; i < 3 && !bad_crash; i++) {
			size_t msize;
			uint8_t *meta = mf_crash(&x.e.meta, &msize);

			crash_images++;
			why[0] = '\0';
			if (resize_verify(rc, &x, meta, msize, true, why, sizeof(why)))
				bad_crash++;
			free(meta);
		}
		resize_free(&x);
		if (bad_crash)
			break;
	}
	if (rc->crash_runs)
		CHECK(!bad_crash, "resize: %s: a failure at each of its %ld writes and flushes: %d crash images clean %s",
		      rc->name, nops, crash_images, bad_crash ? why : "");
}

static void test_resize(void)
{
	for (size_t i = 0; i < ARRAY_SIZE(resize_cases); i++)
		test_resize_case(&resize_cases[i]);
}

/* A partial write into a new cluster over zeros (no backing file) with
 * data_zero: a hole, then the written sectors only, no cluster of zeros
 * copied; the rest reads zeros. */
static void test_zero_first(void)
{
	struct qcow2_rw *w = NULL;
	struct tb b;
	struct env e;
	uint8_t data[4096], rd[65536], want[65536];
	size_t biggest = 0;
	int r;

	tb_init(&b, 16, 4, false, 4 << 20, 3, false, 0, 0);
	env_init(&e, &b);
	e.punch = true;
	r = open_writer_on_env(&e, &w);
	memset(data, 0x5a, sizeof(data));
	if (!r)
		r = qcow2_rw_write(w, data, 1000, 65536 + 8192 + 100);
	for (size_t i = 0; i < e.meta.nlog; i++)
		if (!buf_zero(e.meta.log[i].data, e.meta.log[i].len))
			biggest = MAX(biggest, e.meta.log[i].len);
	if (!r)
		r = qcow2_rw_flush(w);
	if (!r)
		r = qcow2_rw_read(w, rd, sizeof(rd), 65536);
	memset(want, 0, sizeof(want));
	memcpy(want + 8192 + 100, data, 1000);
	CHECK(r == 0 && biggest == 3 * 512 && !memcmp(rd, want, sizeof(want)),
	      "a partial write over zeros writes its sectors only (%zu bytes) and reads back (%d)", biggest, r);
	qcow2_rw_free(w);
	env_free(&e);
	tb_free(&b);
}

/* Where guest cluster g is mapped (announced), or 0. */
static uint64_t announced_host(const struct env *e, uint64_t g)
{
	for (size_t i = 0; i < e->nmaps; i++)
		if (e->maps[i].guest <= g && g < e->maps[i].guest + e->maps[i].len)
			return e->maps[i].host + (g - e->maps[i].guest);
	return 0;
}

/* The end of an allocation ahead test: close (after r == 0), the image
 * checked and read afresh, everything freed. */
static void ahead_test_end(struct qcow2_rw *w, int r, struct env *e, struct tb *b, uint64_t vsize, uint8_t *buf,
			   uint8_t *rd, uint8_t *want, const char *how)
{
	struct qcow2_check_result res;

	if (!r)
		r = qcow2_rw_close(w, NULL);
	else
		qcow2_rw_free(w);
	r = r ? r : inspect(e->meta.cur, e->meta.size, NULL, 0, e, vsize, rd, &res);
	CHECK(r == 0 && !res.corruptions && !res.leaks && !res.check_errors && !memcmp(rd, want, vsize),
	      "%s: released, closed: no leak, the same content (%d)", how, r);
	env_free(e);
	tb_free(b);
	free(buf);
	free(rd);
	free(want);
}

/* The start of a sequential allocation ahead test on a fresh image of
 * 64 KiB clusters: holes punched (data_zero) or, on extended L2, zeros
 * written; extents: the file's holes known too (data_extent), with room for
 * every cluster (as the daemon extends the file at open); then the
 * writer's first write, a cluster of 0x11 at 0, flushed. */
static int ahead_test_start(struct env *e, struct tb *b, const struct qcow2_rw_opts *o, uint64_t vsize, bool ext,
			    bool extents, struct qcow2_rw **w, uint8_t *buf, uint8_t *want)
{
	const uint64_t cs = 65536;
	int r;

	tb_init(b, 16, 4, ext, vsize, 3, false, 0, 0);
	env_init(e, b);
	e->punch = !ext;
	if (extents) {
		e->extents = true;
		mf_extend(&e->meta, e->meta.size + 2 * vsize);
	}
	r = env_writer(e, o, w);
	memset(buf, 0x11, cs);
	if (!r)
		r = qcow2_rw_write(*w, buf, cs, 0);
	memcpy(want, buf, cs);
	return r ? r : qcow2_rw_flush(*w);
}

/* The windows read zeros and the writes their data; then release_ahead
 * (the fast path gone). */
static int ahead_read_release(struct qcow2_rw *w, uint8_t *rd, const uint8_t *want, uint64_t vsize, const char *how,
			      struct qcow2_rw_stats *st)
{
	int r = qcow2_rw_read(w, rd, vsize, 0);

	CHECK(r == 0 && !memcmp(rd, want, vsize), "%s: the windows read zeros, the writes their data", how);
	if (!r)
		r = qcow2_rw_release_ahead(w);
	qcow2_rw_get_stats(w, st);
	return r;
}

/* Allocation ahead of random writers where new clusters are holes
 * (ahead_sparse): a write into unallocated clusters gets the aligned 2 MiB
 * around it mapped in one host run, without zeroing anything; not where the
 * backing file has data (copy-on-write as before), but where it reads
 * zeros; release_ahead frees what nobody wrote. */
static void test_alloc_sparse(bool backing)
{
	const uint64_t cs = 65536, vsize = 16 << 20, win = 32;
	struct qcow2_rw_opts o = { .ahead_max = 4 << 20, .ahead_sparse = true };
	struct qcow2_rw *w = NULL;
	struct qcow2_rw_stats st;
	struct tb b;
	struct env e;
	uint8_t *buf = malloc(cs), *rd = malloc(vsize), *want = calloc(1, vsize);
	const uint64_t at[] = { 5, 100, 200, 101, 40 };
	const char *how = backing ? "over a backing file of 4 MiB" : "no backing file";
	uint64_t h, cow = backing ? 1 : 0, windows = backing ? 2 : 3;
	int r = 0;

	tb_init(&b, 16, 4, false, vsize, 3, false, 0, backing ? 4 << 20 : 0);
	env_init(&e, &b);
	e.punch = e.extents = true;
	/* room for every cluster, as the daemon extends the file at open */
	mf_extend(&e.meta, e.meta.size + 2 * vsize);
	if (backing) {
		/* one cluster of zeros in the backing file: no copy there */
		memset(b.backing + 40 * cs, 0, cs);
		memcpy(want, b.backing, 4 << 20);
	}
	r = env_writer(&e, &o, &w);
	memset(buf, 0x11, cs);
	/* the first write makes the L2 table (nothing ahead); then two
	 * windows, a write inside the first one, and one beside the backing
	 * file's data (a window without it) */
	for (size_t i = 0; i < sizeof(at) / sizeof(at[0]) && !r; i++) {
		r = qcow2_rw_write(w, buf, 4096, at[i] * cs + 512);
		memcpy(want + at[i] * cs + 512, buf, 4096);
	}
	if (!r)
		r = qcow2_rw_flush(w);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.ahead_sparse_windows == windows && st.ahead_clusters == windows * win &&
	      st.cow_clusters == cow && st.zero_skipped == st.ahead_clusters + 1,
	      "%s: random writes map their windows, nothing zeroed (%" PRIu64 " windows, %" PRIu64
	      " clusters, %" PRIu64 " copied, %" PRIu64 " not zeroed)", how, st.ahead_sparse_windows,
	      st.ahead_clusters, st.cow_clusters, st.zero_skipped);
	h = announced_host(&e, 96 * cs);
	CHECK(h && announced_host(&e, 127 * cs) == h + 31 * cs && !announced_host(&e, 128 * cs),
	      "%s: a window is one host run", how);
	/* the fast path writes a cluster of the window */
	memset(buf, 0x22, cs);
	if ((h = announced_host(&e, 97 * cs)))
		mf_write(&e.meta, buf, cs, h);
	memcpy(want + 97 * cs, buf, cs);
	r = r ? r : ahead_read_release(w, rd, want, vsize, how, &st);
	CHECK(r == 0 && st.ahead_released == st.ahead_clusters - (backing ? 4 : 5),
	      "%s: what nobody wrote is freed (%" PRIu64 " of %" PRIu64 ")", how, st.ahead_released,
	      st.ahead_clusters);
	ahead_test_end(w, r, &e, &b, vsize, buf, rd, want, how);
}

/* Allocation ahead: a sequential writer gets the clusters after it mapped
 * (reading zeros) in a window that doubles each time it reaches the end;
 * a random writer gets nothing more; release_ahead frees what still reads
 * zeros and keeps what the fast path wrote. Both ways of zeroing: holes
 * (data_zero) and zeros written (LUKS), the second on extended L2. */
static void test_alloc_ahead(bool ext)
{
	const uint64_t cs = 65536, vsize = 16 << 20;
	struct qcow2_rw_opts o = { .ahead_max = 4 << 20 };
	struct qcow2_rw *w = NULL;
	struct qcow2_rw_stats st;
	struct tb b;
	struct env e;
	uint8_t *buf = malloc(cs), *rd = malloc(vsize), *want = calloc(1, vsize);
	uint64_t h;
	const char *how = ext ? "zeros written, extended L2" : "holes";
	int r;

	r = ahead_test_start(&e, &b, &o, vsize, ext, false, &w, buf, want);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.ahead_clusters == 16 && announced_host(&e, 16 * cs) && !announced_host(&e, 17 * cs),
	      "%s: the first write in order maps 1 MiB ahead (%" PRIu64 " clusters)", how, st.ahead_clusters);
	if (!r)
		r = qcow2_rw_read(w, rd, vsize, 0);
	CHECK(r == 0 && !memcmp(rd, want, vsize) && !qcow2_rw_ahead_probe(w),
	      "%s: what is mapped ahead reads zeros (zeroed: no probe)", how);
	/* the fast path fills the window, unseen; the writer sees the write
	 * after it: the window doubles */
	memset(buf, 0x22, cs);
	for (uint64_t g = cs; g <= 16 * cs; g += cs) {
		h = announced_host(&e, g);
		if (h)
			mf_write(&e.meta, buf, cs, h);
		memcpy(want + g, buf, cs);
	}
	if (!r)
		r = qcow2_rw_write(w, buf, 4096, 17 * cs);
	memcpy(want + 17 * cs, buf, 4096);
	if (!r)
		r = qcow2_rw_flush(w);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.ahead_clusters == 16 + 32 && announced_host(&e, 49 * cs) && !announced_host(&e, 50 * cs),
	      "%s: at the end of the window, the next one is twice as large (%" PRIu64 " clusters)", how,
	      st.ahead_clusters);
	/* one cluster of the new window written by the fast path, in part */
	h = announced_host(&e, 30 * cs);
	if (h)
		mf_write(&e.meta, buf, 4096, h + 8192);
	memcpy(want + 30 * cs + 8192, buf, 4096);
	/* a writer jumping around gets nothing ahead */
	memset(buf, 0x33, cs);
	for (uint64_t g = 200; !r && g < 240; g += 7) {
		r = qcow2_rw_write(w, buf, 4096, g * cs);
		memcpy(want + g * cs, buf, 4096);
	}
	if (!r)
		r = qcow2_rw_flush(w);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.ahead_clusters == 48, "%s: random writes map nothing ahead (%" PRIu64 ")", how,
	      st.ahead_clusters);
	if (ext && (h = announced_host(&e, 40 * cs))) {
		uint64_t l2 = get_be64(e.meta.cur + b.l1_off) & QCOW2_L1E_OFFSET_MASK;

		CHECK(get_be64(e.meta.cur + l2 + 40 * 16 + 8) == 0xffffffffULL && buf_zero(e.meta.cur + h, cs),
		      "%s: a cluster mapped ahead has every subcluster allocated, and zeros", how);
	}
	/* the fast path is gone */
	if (!r)
		r = qcow2_rw_release_ahead(w);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.ahead_released == 31, "%s: the 31 clusters mapped ahead that nobody wrote are freed (%" PRIu64
	      ")", how, st.ahead_released);
	ahead_test_end(w, r, &e, &b, vsize, buf, rd, want, how);
}

/* Allocation ahead from holes (ahead_fresh_max): the window starts larger,
 * its first cluster is the probe, and once the fast path wrote there
 * qcow2_rw_ahead_poll maps the next window, before the writer reaches the
 * end of this one; nothing before that, nothing again for the same window. */
static void test_alloc_ahead_poll(void)
{
	const uint64_t cs = 65536, vsize = 64 << 20, win = 128;	/* 8 MiB windows */
	struct qcow2_rw_opts o = { .ahead_max = 4 << 20, .ahead_fresh_max = 8 << 20 };
	struct qcow2_rw *w = NULL;
	struct qcow2_rw_stats st;
	struct tb b;
	struct env e;
	uint8_t *buf = malloc(cs), *rd = malloc(vsize), *want = calloc(1, vsize);
	const char *how = "holes, polled";
	uint64_t h;
	int r, p0 = -1, p1 = -1, p2 = -1;

	r = ahead_test_start(&e, &b, &o, vsize, false, true, &w, buf, want);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && st.ahead_clusters == win && st.zero_skipped == win && qcow2_rw_ahead_probe(w) == cs &&
	      announced_host(&e, win * cs) && !announced_host(&e, (win + 1) * cs),
	      "%s: the first write in order maps 8 MiB of holes ahead, its first cluster the probe (%" PRIu64
	      " clusters)", how, st.ahead_clusters);
	if (!r)
		p0 = qcow2_rw_ahead_poll(w);
	/* the fast path writes the probe (and the next cluster) */
	memset(buf, 0x22, cs);
	for (uint64_t g = 1; g <= 2; g++) {
		if ((h = announced_host(&e, g * cs)))
			mf_write(&e.meta, buf, cs, h);
		memcpy(want + g * cs, buf, cs);
	}
	if (!r)
		p1 = qcow2_rw_ahead_poll(w);
	if (!r)
		p2 = qcow2_rw_ahead_poll(w);
	if (!r)
		r = qcow2_rw_flush(w);
	qcow2_rw_get_stats(w, &st);
	CHECK(r == 0 && p0 == 0 && p1 == 1 && p2 == 0 && st.ahead_polled == 1 && st.ahead_clusters == 2 * win &&
	      qcow2_rw_ahead_probe(w) == (win + 1) * cs && announced_host(&e, 2 * win * cs) &&
	      !announced_host(&e, (2 * win + 1) * cs),
	      "%s: nothing before the writer gets to the probe, then the next window, once (polls %d %d %d, %" PRIu64
	      " clusters)", how, p0, p1, p2, st.ahead_clusters);
	r = r ? r : ahead_read_release(w, rd, want, vsize, how, &st);
	CHECK(r == 0 && st.ahead_released == 2 * win - 2 && !qcow2_rw_ahead_probe(w),
	      "%s: released what nobody wrote (%" PRIu64 "), no probe left", how, st.ahead_released);
	ahead_test_end(w, r, &e, &b, vsize, buf, rd, want, how);
}

/* A sequential fill of the image in writes of wlen, each flushed (and one
 * partial write into a new cluster at the end), with allocation ahead and
 * data_zero, or (baseline) with neither; the file limit is the initial size
 * plus limit_extra (0: none); data_zero fails with zero_error (0: works). */
struct fill {
	unsigned int cb, order;
	uint64_t vsize, wlen, limit_extra;
	int zero_error;
	bool baseline;
	/* results */
	uint64_t written;		/* bytes of the writes that succeeded, in order */
	int first_error;
	struct qcow2_rw_stats st;
	bool clean;			/* closed; no corruption, no leak, the content written */
};

static void sequential_fill(struct fill *f)
{
	struct qcow2_rw_opts o = { .ahead_max = f->baseline ? 0 : 4 << 20 };
	struct qcow2_check_result res;
	struct qcow2_rw *w = NULL;
	struct tb b;
	struct env e;
	uint8_t *buf = malloc(f->wlen), *rd = malloc(f->vsize), *want = calloc(1, f->vsize);
	uint64_t g = 0;
	int r;

	tb_init(&b, f->cb, f->order, false, f->vsize, 3, false, 0, 0);
	env_init(&e, &b);
	e.punch = !f->baseline;
	e.zero_error = f->zero_error;
	if (f->limit_extra)
		o.file_limit = round_up_pow2(e.meta.size, b.cs) + f->limit_extra;
	f->first_error = 0;
	r = env_writer(&e, &o, &w);
	/* two clusters left for the partial write */
	for (; !r && g + f->wlen + 2 * b.cs <= f->vsize; g += f->wlen) {
		fill_pattern(buf, f->wlen, g);
		r = qcow2_rw_write(w, buf, f->wlen, g);
		if (!r)
			r = qcow2_rw_flush(w);
		if (!r)
			memcpy(want + g, buf, f->wlen);
	}
	f->written = g;
	/* a partial write into a new cluster past the fill */
	if (!r) {
		fill_pattern(buf, 1000, 7);
		r = qcow2_rw_write(w, buf, 1000, g + b.cs + 100);
		if (!r)
			memcpy(want + g + b.cs + 100, buf, 1000);
	}
	f->first_error = r;
	if (w) {
		qcow2_rw_get_stats(w, &f->st);
		r = qcow2_rw_release_ahead(w);
		if (!r)
			r = qcow2_rw_close(w, NULL);
		else
			qcow2_rw_free(w);
	}
	if (!r)
		r = inspect(e.meta.cur, e.meta.size, NULL, 0, &e, f->vsize, rd, &res);
	f->clean = r == 0 && !res.corruptions && !res.leaks && !res.check_errors && !memcmp(rd, want, f->vsize);
	env_free(&e);
	tb_free(&b);
	free(buf);
	free(rd);
	free(want);
}

/* The used end a caller supplies (the daemon: what open found) decides
 * whether allocation ahead has room, in place of a pass over the refcount
 * blocks: with the file limit at exactly what every cluster needs from the
 * true used end, ahead stays on when the used end is computed (0) or given
 * as it is, and goes off when a larger one is given (nothing recomputed). */
static void test_ahead_given_used_end(void)
{
	static const struct {
		uint64_t extra;		/* bytes given beyond the true used end; UINT64_MAX: none given */
		bool ahead;
	} cases[] = {
		{ UINT64_MAX, true },
		{ 0, true },
		{ 64 << 16, false },
	};
	const uint64_t cs = 65536, vsize = 16 << 20;

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct qcow2_rw_opts o = { .ahead_max = 4 << 20 };
		struct qcow2_rw *w = NULL;
		struct qcow2_rw_stats st = { 0 };
		struct tb b;
		struct env e;
		uint8_t *buf = calloc(1, cs);
		uint64_t used = 0, need = 0;
		int r;

		tb_init(&b, 16, 4, false, vsize, 3, false, 0, 0);
		env_init(&e, &b);
		e.punch = true;
		r = env_open_image(&e);
		if (!r)
			r = qcow2_used_end(e.img, &used);
		if (!r)
			r = qcow2_file_reserve(e.img, used, &need);
		o.file_limit = need;
		if (cases[i].extra != UINT64_MAX)
			o.used_end = used + cases[i].extra;
		if (!r)
			r = env_writer(&e, &o, &w);
		if (!r)
			r = qcow2_rw_write(w, buf, cs, 0);
		if (!r)
			r = qcow2_rw_flush(w);
		if (w)
			qcow2_rw_get_stats(w, &st);
		CHECK(r == 0 && (st.ahead_clusters > 0) == cases[i].ahead,
		      "used end %s: %s ahead (%" PRIu64 " clusters, %d)",
		      cases[i].extra == UINT64_MAX ? "computed" : cases[i].extra ? "given, larger" : "given",
		      cases[i].ahead ? "allocation" : "no allocation", st.ahead_clusters, r);
		if (w)
			qcow2_rw_free(w);
		env_free(&e);
		tb_free(&b);
		free(buf);
	}
}

/* Allocation ahead and cheap zeros never cost a write: when zeroing fails
 * (a full file system) the writes succeed as without them (the partial
 * write too) and nothing is mapped ahead; ahead makes no L2 table,
 * refcount block or larger refcount table (only the writer's own writes
 * do, as without it); and with a file limit short of every cluster (an
 * image on a small block device) the writes that fail are the same as
 * without it. Each image closed clean, with the content written. */
static void test_ahead_costs_nothing(void)
{
	static const struct fill cases[] = {
		{ .cb = 16, .order = 4, .vsize = 8 << 20, .wlen = 65536, .zero_error = -ENOSPC },
		{ .cb = 16, .order = 4, .vsize = 8 << 20, .wlen = 65536, .zero_error = -EIO },
		/* 512-byte clusters, 64-bit refcounts: an L2 table per 32 KiB
		 * of guest, a refcount block per 32 KiB of file, the refcount
		 * table grows at 2 MiB */
		{ .cb = 9, .order = 6, .vsize = 3 << 20, .wlen = 4096 },
		{ .cb = 9, .order = 6, .vsize = 4 << 20, .wlen = 262144, .limit_extra = 2 << 20 },
		{ .cb = 16, .order = 4, .vsize = 16 << 20, .wlen = 65536, .limit_extra = 40 << 16 },
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct fill with = cases[i], without = cases[i];
		char what[96];

		without.baseline = true;
		sequential_fill(&with);
		sequential_fill(&without);
		snprintf(what, sizeof(what), "%u-byte clusters, %s%s", 1U << with.cb,
			 with.zero_error ? "zeroing fails: " : "", with.limit_extra ? "a file limit: " : "");
		CHECK(with.written == without.written && with.first_error == without.first_error && with.clean &&
		      without.clean, "%sahead, the writes as without: %" PRIu64 " bytes (%" PRIu64 "), then %s (%s), clean: %d %d",
		      what, with.written, without.written, strerror(-with.first_error), strerror(-without.first_error),
		      with.clean, without.clean);
		CHECK(with.st.l2_tables_allocated == without.st.l2_tables_allocated &&
		      with.st.refblocks_allocated == without.st.refblocks_allocated &&
		      with.st.reftable_growths == without.st.reftable_growths,
		      "%sahead makes no metadata cluster: %" PRIu64 "/%" PRIu64 " L2 tables, %" PRIu64 "/%" PRIu64
		      " refcount blocks, %" PRIu64 "/%" PRIu64 " growths", what, with.st.l2_tables_allocated,
		      without.st.l2_tables_allocated, with.st.refblocks_allocated, without.st.refblocks_allocated,
		      with.st.reftable_growths, without.st.reftable_growths);
		if (with.zero_error || with.limit_extra)
			CHECK(with.st.ahead_clusters == 0, "%snothing mapped ahead (%" PRIu64 ")", what,
			      with.st.ahead_clusters);
		else
			CHECK(with.st.ahead_clusters > 0 && with.st.reftable_growths > 0,
			      "%sclusters mapped ahead (%" PRIu64 "), the refcount table grown by the writes",
			      what, with.st.ahead_clusters);
	}
}

static const struct scenario scenarios[] = {
	{ .name = "64k plain", .cb = 16, .order = 4, .version = 3, .vsize = 8 << 20, .n_data = 20, .n_zero = 5,
	  .n_zero_alloc = 5, .ops = 250, .max_write = 300 << 10, .crash_runs = 12 },
	{ .name = "64k backing", .cb = 16, .order = 4, .version = 3, .vsize = 8 << 20, .backing_size = 5 << 20,
	  .n_data = 10, .n_zero = 5, .n_zero_alloc = 3, .ops = 250, .max_write = 300 << 10, .crash_runs = 12 },
	{ .name = "64k extended L2 backing", .cb = 16, .order = 4, .ext = true, .version = 3, .vsize = 8 << 20,
	  .backing_size = 6 << 20, .n_data = 8, .n_zero = 4, .n_zero_alloc = 4, .n_sub = 12, .ops = 250,
	  .max_write = 300 << 10, .crash_runs = 12 },
	{ .name = "512 B clusters", .cb = 9, .order = 4, .version = 3, .vsize = 12 << 20, .n_data = 40, .n_zero = 10,
	  .ops = 250, .max_write = 600 << 10, .crash_runs = 12, .cache_bytes = 16 << 10 },
	{ .name = "512 B 1-bit refcounts", .cb = 9, .order = 0, .version = 3, .vsize = 2 << 20, .n_data = 20,
	  .ops = 120, .max_write = 64 << 10, .crash_runs = 4, .cache_bytes = 8 << 10 },
	{ .name = "512 B 2-bit refcounts", .cb = 9, .order = 1, .version = 3, .vsize = 2 << 20, .n_data = 20,
	  .ops = 120, .max_write = 64 << 10, .crash_runs = 4 },
	{ .name = "512 B 4-bit refcounts", .cb = 9, .order = 2, .version = 3, .vsize = 2 << 20, .n_data = 20,
	  .ops = 120, .max_write = 64 << 10, .crash_runs = 4 },
	{ .name = "512 B 8-bit refcounts", .cb = 9, .order = 3, .version = 3, .vsize = 4 << 20, .n_data = 20,
	  .snapshots = 1, .ops = 120, .max_write = 64 << 10, .crash_runs = 4 },
	{ .name = "512 B 32-bit refcounts", .cb = 9, .order = 5, .version = 3, .vsize = 4 << 20, .n_data = 20,
	  .ops = 120, .max_write = 128 << 10, .crash_runs = 4 },
	{ .name = "512 B 64-bit refcounts", .cb = 9, .order = 6, .version = 3, .vsize = 8 << 20, .n_data = 20,
	  .ops = 150, .max_write = 512 << 10, .crash_runs = 6, .cache_bytes = 8 << 10 },
	{ .name = "2 MiB clusters backing", .cb = 21, .order = 4, .version = 3, .vsize = 24 << 20,
	  .backing_size = 20 << 20, .n_data = 2, .n_zero = 1, .n_zero_alloc = 1, .ops = 60, .max_write = 5 << 20,
	  .crash_runs = 4 },
	{ .name = "2 MiB clusters extended L2", .cb = 21, .order = 4, .ext = true, .version = 3, .vsize = 24 << 20,
	  .backing_size = 24 << 20, .n_sub = 2, .n_data = 1, .ops = 60, .max_write = 5 << 20, .crash_runs = 4 },
	{ .name = "snapshot shared clusters", .cb = 16, .order = 4, .version = 3, .vsize = 8 << 20, .n_data = 30,
	  .n_zero_alloc = 4, .n_comp = 6, .snapshots = 2, .ops = 250, .max_write = 300 << 10, .crash_runs = 12 },
	{ .name = "snapshot extended L2", .cb = 15, .order = 4, .ext = true, .version = 3, .vsize = 8 << 20,
	  .backing_size = 8 << 20, .n_data = 10, .n_sub = 20, .n_comp = 4, .snapshots = 1, .ops = 250,
	  .max_write = 300 << 10, .crash_runs = 12 },
	{ .name = "512 B snapshot", .cb = 9, .order = 4, .version = 3, .vsize = 2 << 20, .n_data = 60, .n_comp = 20,
	  .snapshots = 1, .ops = 200, .max_write = 64 << 10, .crash_runs = 8, .cache_bytes = 8 << 10 },
	{ .name = "compressed zlib", .cb = 16, .order = 4, .version = 3, .vsize = 8 << 20, .n_comp = 40, .ops = 200,
	  .max_write = 200 << 10, .crash_runs = 8 },
	{ .name = "compressed zstd", .cb = 16, .order = 4, .version = 3, .compression = 1, .vsize = 8 << 20,
	  .n_comp = 40, .ops = 200, .max_write = 200 << 10, .crash_runs = 8 },
	{ .name = "version 2", .cb = 16, .order = 4, .version = 2, .vsize = 8 << 20, .n_data = 20, .snapshots = 1,
	  .ops = 200, .max_write = 300 << 10, .crash_runs = 8 },
	{ .name = "external data file", .cb = 16, .order = 4, .version = 3, .data_file = true, .vsize = 8 << 20,
	  .backing_size = 4 << 20, .n_data = 10, .n_zero = 5, .n_zero_alloc = 5, .ops = 250, .max_write = 300 << 10,
	  .crash_runs = 12 },
	{ .name = "external data file extended L2", .cb = 16, .order = 4, .ext = true, .version = 3, .data_file = true,
	  .vsize = 8 << 20, .backing_size = 8 << 20, .n_data = 5, .n_sub = 10, .ops = 250, .max_write = 300 << 10,
	  .crash_runs = 8 },
	{ .name = "lazy refcounts", .cb = 16, .order = 4, .version = 3, .vsize = 8 << 20, .n_data = 10, .lazy = true,
	  .ops = 150, .max_write = 300 << 10, .crash_runs = 6 },
	{ .name = "ENOSPC", .cb = 16, .order = 4, .version = 3, .vsize = 16 << 20, .n_data = 4, .snapshots = 1,
	  .ops = 200, .max_write = 1 << 20, .limit_extra = 40 << 16, .crash_runs = 6 },
	{ .name = "ENOSPC 512 B", .cb = 9, .order = 4, .version = 3, .vsize = 16 << 20, .n_data = 4, .ops = 200,
	  .max_write = 256 << 10, .limit_extra = 2 << 20, .crash_runs = 6 },
	{ .name = "64k sequential ahead", .cb = 16, .order = 4, .version = 3, .vsize = 16 << 20, .n_data = 6,
	  .n_zero = 4, .ops = 300, .max_write = 300 << 10, .crash_runs = 12, .ahead = 2 << 20 },
	{ .name = "16k sequential ahead extended L2", .cb = 14, .order = 4, .ext = true, .version = 3,
	  .vsize = 8 << 20, .n_data = 8, .n_sub = 8, .ops = 300, .max_write = 64 << 10, .crash_runs = 8,
	  .ahead = 1 << 20, .cache_bytes = 64 << 10 },
	/* a limit short of every cluster: ahead stays off, the writes fail as
	 * without it (test_ahead_costs_nothing compares) */
	{ .name = "ENOSPC sequential ahead", .cb = 16, .order = 4, .version = 3, .vsize = 16 << 20, .n_data = 4,
	  .ops = 200, .max_write = 1 << 20, .limit_extra = 40 << 16, .crash_runs = 6, .ahead = 4 << 20 },
	{ .name = "tiny cache", .cb = 12, .order = 4, .ext = false, .version = 3, .vsize = 16 << 20,
	  .backing_size = 16 << 20, .n_data = 30, .snapshots = 1, .ops = 250, .max_write = 512 << 10,
	  .crash_runs = 8, .cache_bytes = 1 },
};

int main(int argc, char **argv)
{
	unsigned int seeds = 1;
	const char *only = NULL, *env;

	verbose = getenv("QS_VERBOSE") != NULL;
	if ((env = getenv("QS_ALLOC_SEEDS")))
		seeds = (unsigned int)strtoul(env, NULL, 0);
	if (argc > 1)
		only = argv[1];
	qs_log_set_callback(log_capture, NULL);
	qs_log_set_level(verbose ? QS_LOG_DEBUG : QS_LOG_NORMAL);
	/* argv[1]: only the scenarios whose name contains it ("targeted": no
	 * scenario, the targeted checks only) */
	if (!only || !strcmp(only, "targeted")) {
		test_header_duties();
		test_subcluster_allocation();
		test_cow_order();
		test_rw_open_checks();
		test_in_place_guard();
		test_zero_first();
		test_alloc_ahead(false);
		test_alloc_ahead(true);
		test_alloc_sparse(false);
		test_alloc_sparse(true);
		test_alloc_ahead_poll();
		test_ahead_costs_nothing();
		test_ahead_given_used_end();
	}
	if (!only || !strcmp(only, "targeted") || !strcmp(only, "resize"))
		test_resize();
	for (size_t i = 0; i < ARRAY_SIZE(scenarios); i++) {
		if (only && !strstr(scenarios[i].name, only))
			continue;
		for (unsigned int s = 1; s <= seeds; s++)
			run_scenario(&scenarios[i], s, (unsigned int)i);
	}
	return tap_done();
}
