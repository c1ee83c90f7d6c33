/* qcow2 refcount check: what qemu-img check counts, computed from read
 * callbacks. The steps and their order follow QEMU's qcow2_check_refcounts()
 * because the counts depend on it (a refcount block is checked against the
 * references counted before it; saturated counts report overflows):
 *
 *   1. count references: header cluster, active L1 table and its L2 tables
 *      and clusters (with the allocation statistics), snapshot L1 tables and
 *      theirs, snapshot table, refcount table, LUKS header, bitmap directory,
 *      bitmap tables and bitmap data, refcount blocks;
 *   2. compare with the refcounts on disk: more = leak, fewer = corruption;
 *   3. OFLAG_COPIED of the active L1 and L2 entries against the on-disk
 *      refcount (set exactly when the refcount is 1).
 *
 * Reads past the end of the file return zeros, as QEMU's block layer does. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "log.h"
#include "qcow2.h"
#include "util.h"

#define REFT_RESERVED_MASK	0x1ffULL
#define L2E_STD_RESERVED_MASK	0x3f000000000001feULL
#define BME_RESERVED_MASK	0xff000000000001feULL
#define BME_OFFSET_MASK		0x00fffffffffffe00ULL
#define BME_FLAG_ALL_ONES	1ULL
#define L2_BITMAP_ALL_ALLOC	0xffffffffULL

enum cluster_type {
	CL_UNALLOCATED,
	CL_ZERO_PLAIN,
	CL_ZERO_ALLOC,
	CL_NORMAL,
	CL_COMPRESSED,
};

struct checker {
	const struct image *img;
	struct qcow2_check_result *res;
	uint64_t cs;			/* cluster size */
	unsigned int cb;		/* cluster bits */
	uint64_t file_len;
	bool data_file;			/* data clusters live in an external file */

	/* in-memory refcount table (the references counted) */
	void *imrt;
	bool imrt_wide;			/* uint32_t entries, else uint16_t */
	uint64_t imrt_size;		/* clusters covered (grows past EOF) */
	uint64_t imrt_alloc;
	uint64_t refcount_max;

	/* L2 tables */
	uint64_t l2_entries;
	unsigned int l2_esz;		/* 8, or 16 with extended L2 entries */
	uint8_t *l2;

	/* on-disk refcounts */
	uint64_t *reftable;
	uint64_t reftable_entries;
	unsigned int rb_bits;		/* log2 of refcounts per block */
	uint8_t *refblock;
	uint64_t refblock_offset;	/* of the cached block, 0 = none */
};

/* Read len bytes at off; the part past the end of the file reads as zeros. */
static int read_padded(const struct img_io *io, void *buf, size_t len, uint64_t off)
{
	size_t n = 0;
	int r;

	if (off < io->size)
		n = (size_t)MIN((uint64_t)len, io->size - off);
	if (n) {
		r = img_pread(io, buf, n, off);
		if (r < 0)
			return r;
	}
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

static uint64_t imrt_get(const struct checker *c, uint64_t k)
{
	return c->imrt_wide ? ((uint32_t *)c->imrt)[k] : ((uint16_t *)c->imrt)[k];
}

static void imrt_set(struct checker *c, uint64_t k, uint64_t v)
{
	if (c->imrt_wide)
		((uint32_t *)c->imrt)[k] = (uint32_t)v;
	else
		((uint16_t *)c->imrt)[k] = (uint16_t)v;
}

static int imrt_grow(struct checker *c, uint64_t new_size)
{
	size_t esz = c->imrt_wide ? 4 : 2;

	if (new_size > c->imrt_alloc) {
		uint64_t na = new_size + 16;
		uint8_t *p;

		if (na > QCOW2_CHECK_MAX_CLUSTERS + 16)
			return -EFBIG;
		/* calloc: untouched pages of a large table cost no memory */
		p = c->imrt ? realloc(c->imrt, na * esz) : calloc(na, esz);
		if (!p)
			return -ENOMEM;
		if (c->imrt)
			memset(p + c->imrt_alloc * esz, 0, (na - c->imrt_alloc) * esz);
		c->imrt = p;
		c->imrt_alloc = na;
	}
	if (new_size > c->imrt_size)
		c->imrt_size = new_size;
	return 0;
}

/* One more reference to every cluster touched by [offset, offset + size). */
static int inc_refcounts(struct checker *c, uint64_t offset, uint64_t size)
{
	uint64_t end, limit;
	int r;

	if (!size)
		return 0;
	/* The last cluster may be partly past the end of the file, not more. */
	if (uadd64_overflow(offset, size, &end) || uadd64_overflow(c->file_len, c->cs, &limit) || end >= limit) {
		log_std("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64,
			offset, size);
		c->res->corruptions++;
		return 0;
	}
	for (uint64_t k = offset >> c->cb; k <= (end - 1) >> c->cb; k++) {
		uint64_t v;

		if (k >= c->imrt_size) {
			r = imrt_grow(c, k + 1);
			if (r < 0) {
				c->res->check_errors++;
				return r;
			}
		}
		v = imrt_get(c, k);
		if (v == c->refcount_max) {
			log_std("ERROR: overflow cluster offset=0x%" PRIx64, k << c->cb);
			c->res->corruptions++;
			continue;
		}
		imrt_set(c, k, v + 1);
	}
	return 0;
}

/* Refcount of cluster ci on disk. -EIO for a misaligned refcount block. */
static int disk_refcount(struct checker *c, uint64_t ci, uint64_t *rc)
{
	unsigned int order = c->img->refcount_order;
	uint64_t ti = ci >> c->rb_bits, bi = ci & ((1ULL << c->rb_bits) - 1), boff;
	int r;

	*rc = 0;
	if (ti >= c->reftable_entries)
		return 0;
	boff = c->reftable[ti] & QCOW2_REFT_OFFSET_MASK;
	if (!boff)
		return 0;
	if (!is_aligned(boff, c->cs))
		return -EIO;
	if (c->refblock_offset != boff) {
		c->refblock_offset = 0;
		r = read_padded(&c->img->io, c->refblock, c->cs, boff);
		if (r < 0)
			return r;
		c->refblock_offset = boff;
	}
	switch (order) {
	case 0:
	case 1:
	case 2: {
		unsigned int bits = 1U << order;
		uint64_t bit = bi << order;

		*rc = (c->refblock[bit / 8] >> (bit % 8)) & ((1U << bits) - 1);
		break;
	}
	case 3:
		*rc = c->refblock[bi];
		break;
	case 4:
		*rc = get_be16(c->refblock + bi * 2);
		break;
	case 5:
		*rc = get_be32(c->refblock + bi * 4);
		break;
	default:
		*rc = get_be64(c->refblock + bi * 8);
		break;
	}
	return 0;
}

static enum cluster_type cluster_type(const struct checker *c, uint64_t entry)
{
	if (entry & QCOW2_OFLAG_COMPRESSED)
		return CL_COMPRESSED;
	if ((entry & QCOW2_OFLAG_ZERO) && !c->img->extended_l2)
		return (entry & QCOW2_L2E_OFFSET_MASK) ? CL_ZERO_ALLOC : CL_ZERO_PLAIN;
	if (!(entry & QCOW2_L2E_OFFSET_MASK))
		/* offset 0 is valid in an external data file, where every
		 * cluster has refcount 1 and so OFLAG_COPIED */
		return c->data_file && (entry & QCOW2_OFLAG_COPIED) ? CL_NORMAL : CL_UNALLOCATED;
	return CL_NORMAL;
}

static uint64_t l2_entry_at(const struct checker *c, uint64_t i)
{
	return get_be64(c->l2 + i * c->l2_esz);
}

static uint64_t l2_bitmap_at(const struct checker *c, uint64_t i)
{
	return c->l2_esz == 16 ? get_be64(c->l2 + i * 16 + 8) : 0;
}

/* References of one L2 table's entries; the statistics for the active one. */
static int check_l2(struct checker *c, uint64_t l2_offset, bool active)
{
	struct qcow2_check_result *res = c->res;
	uint64_t next_contiguous = 0;
	int r;

	r = read_padded(&c->img->io, c->l2, c->cs, l2_offset);
	if (r < 0) {
		log_err("ERROR: I/O error reading the L2 table at 0x%" PRIx64 ": %s", l2_offset, strerror(-r));
		res->check_errors++;
		return r;
	}
	for (uint64_t i = 0; i < c->l2_entries; i++) {
		uint64_t entry = l2_entry_at(c, i), bitmap = l2_bitmap_at(c, i);
		enum cluster_type type = cluster_type(c, entry);

		if (type != CL_COMPRESSED && (entry & L2E_STD_RESERVED_MASK)) {
			log_std("ERROR found l2 entry with reserved bits set: %" PRIx64, entry);
			res->corruptions++;
		}
		switch (type) {
		case CL_COMPRESSED: {
			unsigned int shift = 62 - (c->cb - 8);
			uint64_t coffset = entry & ((1ULL << shift) - 1);
			uint64_t nb_sectors = ((entry >> shift) & ((1ULL << (c->cb - 8)) - 1)) + 1;

			if (entry & QCOW2_OFLAG_COPIED) {
				log_std("ERROR: coffset=0x%" PRIx64 ": copied flag must never be set for compressed clusters",
					coffset);
				res->corruptions++;
			}
			if (c->data_file) {
				log_std("ERROR compressed cluster %" PRIu64 " with data file, entry=0x%" PRIx64, i, entry);
				res->corruptions++;
				break;
			}
			if (bitmap) {
				log_std("ERROR compressed cluster %" PRIu64 " with non-zero subcluster allocation bitmap, entry=0x%" PRIx64,
					i, entry);
				res->corruptions++;
				break;
			}
			r = inc_refcounts(c, coffset, nb_sectors * 512 - (coffset & 511));
			if (r < 0)
				return r;
			if (active) {
				res->allocated_clusters++;
				res->compressed_clusters++;
				/* compressed clusters are fragmented by nature */
				res->fragmented_clusters++;
			}
			break;
		}
		case CL_ZERO_ALLOC:
		case CL_NORMAL: {
			uint64_t offset = entry & QCOW2_L2E_OFFSET_MASK;

			if ((bitmap >> 32) & bitmap) {
				log_std("ERROR offset=%" PRIx64 ": Allocated cluster has corrupted subcluster allocation bitmap",
					offset);
				res->corruptions++;
			}
			if (!is_aligned(offset, c->cs)) {
				bool has_data = c->img->extended_l2 ? (bitmap & L2_BITMAP_ALL_ALLOC) != 0
								    : !(entry & QCOW2_OFLAG_ZERO);

				log_std("ERROR offset=%" PRIx64 ": %s is not properly aligned; L2 entry corrupted.", offset,
					has_data ? "Data cluster" : "Preallocated cluster");
				res->corruptions++;
			}
			if (active) {
				res->allocated_clusters++;
				if (next_contiguous && offset != next_contiguous)
					res->fragmented_clusters++;
				next_contiguous = offset + c->cs;
			}
			if (!c->data_file) {
				r = inc_refcounts(c, offset, c->cs);
				if (r < 0)
					return r;
			}
			break;
		}
		case CL_ZERO_PLAIN:
			break;
		case CL_UNALLOCATED:
			if (bitmap & L2_BITMAP_ALL_ALLOC) {
				log_std("ERROR: Unallocated cluster has non-zero subcluster allocation map");
				res->corruptions++;
			}
			break;
		}
	}
	return 0;
}

/* References of an L1 table, its L2 tables and their clusters. */
static int check_l1(struct checker *c, uint64_t l1_offset, uint32_t l1_size, bool active)
{
	uint64_t *l1 = NULL;
	int r;

	if (!l1_size)
		return 0;
	r = inc_refcounts(c, l1_offset, (uint64_t)l1_size * 8);
	if (r < 0)
		return r;
	r = qcow2_read_table(c->img, l1_offset, l1_size, QCOW2_MAX_L1_BYTES, active ? "L1 table" : "snapshot L1 table",
			     &l1);
	if (r < 0) {
		c->res->check_errors++;
		return r;
	}
	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t l2_offset;

		if (!l1[i])
			continue;
		if (l1[i] & QCOW2_L1E_RESERVED) {
			log_std("ERROR found L1 entry with reserved bits set: %" PRIx64, l1[i]);
			c->res->corruptions++;
		}
		l2_offset = l1[i] & QCOW2_L1E_OFFSET_MASK;
		r = inc_refcounts(c, l2_offset, c->cs);
		if (r < 0)
			goto out;
		if (!is_aligned(l2_offset, c->cs)) {
			log_std("ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted", l2_offset);
			c->res->corruptions++;
		}
		r = check_l2(c, l2_offset, active);
		if (r < 0)
			goto out;
	}
out:
	free(l1);
	return r;
}

static int check_bitmaps(struct checker *c)
{
	const struct image *img = c->img;
	uint64_t *table = NULL;
	int r;

	if (!img->nb_bitmaps)
		return 0;
	r = inc_refcounts(c, img->bitmap_directory_offset, img->bitmap_directory_size);
	for (uint32_t b = 0; !r && b < img->nb_bitmaps; b++) {
		const struct qcow2_bitmap *bm = &img->bitmaps[b];

		r = inc_refcounts(c, bm->table_offset, (uint64_t)bm->table_size * 8);
		if (r < 0)
			break;
		r = qcow2_read_table(img, bm->table_offset, bm->table_size, QCOW2_MAX_L1_BYTES, "bitmap table", &table);
		if (r < 0) {
			c->res->corruptions++;
			break;
		}
		for (uint32_t i = 0; i < bm->table_size; i++) {
			uint64_t e = table[i], off = e & BME_OFFSET_MASK;

			if ((e & BME_RESERVED_MASK) || (off && ((e & BME_FLAG_ALL_ONES) || !is_aligned(off, c->cs)))) {
				log_std("ERROR bitmap %s: invalid bitmap table entry 0x%" PRIx64, bm->name, e);
				c->res->corruptions++;
				continue;
			}
			if (off && (r = inc_refcounts(c, off, c->cs)) < 0)
				break;
		}
		free(table);
		table = NULL;
	}
	return r;
}

/* Refcount blocks, counted last: each must be referenced exactly once. */
static int check_refblocks(struct checker *c)
{
	int r;

	for (uint64_t i = 0; i < c->reftable_entries; i++) {
		uint64_t offset = c->reftable[i] & QCOW2_REFT_OFFSET_MASK, cluster = offset >> c->cb, v;

		if (c->reftable[i] & REFT_RESERVED_MASK) {
			log_std("ERROR refcount table entry %" PRIu64 " has reserved bits set", i);
			c->res->corruptions++;
			continue;
		}
		if (!is_aligned(offset, c->cs)) {
			log_std("ERROR refcount block %" PRIu64 " is not cluster aligned; refcount table entry corrupted", i);
			c->res->corruptions++;
			continue;
		}
		if (cluster >= c->imrt_size) {
			log_std("ERROR refcount block %" PRIu64 " is outside image", i);
			c->res->corruptions++;
			continue;
		}
		if (!offset)
			continue;
		r = inc_refcounts(c, offset, c->cs);
		if (r < 0)
			return r;
		v = imrt_get(c, cluster);
		if (v != 1) {
			log_std("ERROR refcount block %" PRIu64 " refcount=%" PRIu64, i, v);
			c->res->corruptions++;
		}
	}
	return 0;
}

static int calculate_refcounts(struct checker *c)
{
	const struct image *img = c->img;
	int r;

	r = inc_refcounts(c, 0, c->cs);
	if (!r)
		r = check_l1(c, img->l1_table_offset, img->l1_size, true);
	if (r < 0)
		return r;
	if (c->data_file && img->nb_snapshots) {
		log_std("ERROR %u snapshots in image with data file", img->nb_snapshots);
		c->res->corruptions++;
	}
	for (uint32_t i = 0; i < img->nb_snapshots; i++) {
		const struct qcow2_snapshot *sn = &img->snapshots[i];

		if (!is_aligned(sn->l1_table_offset, c->cs)) {
			log_std("ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is not cluster aligned; snapshot table entry corrupted",
				sn->id, sn->name, sn->l1_table_offset);
			c->res->corruptions++;
			continue;
		}
		r = check_l1(c, sn->l1_table_offset, sn->l1_size, false);
		if (r < 0)
			return r;
	}
	r = inc_refcounts(c, img->snapshots_offset, img->nb_snapshots ? img->snapshots_size : 0);
	if (!r)
		r = inc_refcounts(c, img->refcount_table_offset, c->reftable_entries * 8);
	if (!r && img->crypt_header_length)
		r = inc_refcounts(c, img->crypt_header_offset, img->crypt_header_length);
	if (!r)
		r = check_bitmaps(c);
	if (!r)
		r = check_refblocks(c);
	return r;
}

static void compare_refcounts(struct checker *c, uint64_t *highest)
{
	*highest = 0;
	for (uint64_t i = 0; i < c->imrt_size; i++) {
		uint64_t on_disk, counted = imrt_get(c, i);
		int r = disk_refcount(c, i, &on_disk);

		if (r < 0) {
			log_std("Can't get refcount for cluster %" PRIu64 ": %s", i, strerror(-r));
			c->res->check_errors++;
			continue;
		}
		if (on_disk || counted)
			*highest = i;
		if (on_disk == counted)
			continue;
		log_std("%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
			on_disk < counted ? "ERROR" : "Leaked", i, on_disk, counted);
		if (on_disk < counted)
			c->res->corruptions++;
		else
			c->res->leaks++;
	}
}

/* OFLAG_COPIED must be set exactly on the active entries with refcount 1. */
static int check_oflag_copied(struct checker *c, const uint64_t *l1, uint32_t l1_size)
{
	uint64_t rc;
	int r;

	for (uint32_t i = 0; i < l1_size; i++) {
		uint64_t l2_offset = l1[i] & QCOW2_L1E_OFFSET_MASK;

		if (!l2_offset)
			continue;
		/* unreadable refcounts were reported by the comparison */
		if (disk_refcount(c, l2_offset >> c->cb, &rc) < 0)
			continue;
		if ((rc == 1) != !!(l1[i] & QCOW2_OFLAG_COPIED)) {
			log_std("ERROR OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64, i, l1[i],
				rc);
			c->res->corruptions++;
		}
		r = read_padded(&c->img->io, c->l2, c->cs, l2_offset);
		if (r < 0) {
			log_err("ERROR: Could not read L2 table: %s", strerror(-r));
			c->res->check_errors++;
			return r;
		}
		for (uint64_t j = 0; j < c->l2_entries; j++) {
			uint64_t entry = l2_entry_at(c, j);
			enum cluster_type type = cluster_type(c, entry);

			if (type != CL_NORMAL && type != CL_ZERO_ALLOC)
				continue;
			if (c->data_file)
				rc = 1;
			else if (disk_refcount(c, (entry & QCOW2_L2E_OFFSET_MASK) >> c->cb, &rc) < 0)
				continue;
			if ((rc == 1) != !!(entry & QCOW2_OFLAG_COPIED)) {
				log_std("ERROR OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64, entry, rc);
				c->res->corruptions++;
			}
		}
	}
	return 0;
}

int qcow2_check(const struct image *img, struct qcow2_check_result *res)
{
	struct checker c = { .img = img, .res = res };
	uint64_t *l1 = NULL, nb_clusters, vsize, highest;
	int r;

	memset(res, 0, sizeof(*res));
	if (img->format != IMG_FMT_QCOW2)
		return -ENOTSUP;
	c.cs = img->cluster_size;
	c.cb = img->cluster_bits;
	c.file_len = img->io.size;
	c.data_file = img->incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
	c.l2_esz = img->extended_l2 ? 16 : 8;
	c.l2_entries = c.cs / c.l2_esz;
	c.rb_bits = c.cb + 3 - img->refcount_order;
	c.imrt_wide = img->refcount_order > 4;
	c.refcount_max = img->refcount_order >= 5 ? UINT32_MAX : (1ULL << (1U << img->refcount_order)) - 1;
	c.reftable_entries = ((uint64_t)img->refcount_table_clusters << c.cb) / 8;

	nb_clusters = (c.file_len + c.cs - 1) >> c.cb;
	if (nb_clusters > QCOW2_CHECK_MAX_CLUSTERS) {
		log_err("%s: the file has %" PRIu64 " clusters, more than the %llu this check handles.", img->path,
			nb_clusters, QCOW2_CHECK_MAX_CLUSTERS);
		res->check_errors++;
		return -EFBIG;
	}
	vsize = round_up_pow2(img->size, 512);
	res->total_clusters = (vsize + c.cs - 1) >> c.cb;

	c.l2 = malloc(c.cs);
	c.refblock = malloc(c.cs);
	if (!c.l2 || !c.refblock) {
		r = -ENOMEM;
		goto fail;
	}
	r = imrt_grow(&c, nb_clusters);
	if (r < 0)
		goto fail;
	r = qcow2_read_table(img, img->refcount_table_offset, c.reftable_entries, QCOW2_MAX_REFTABLE_BYTES,
			     "refcount table", &c.reftable);
	if (r < 0)
		goto fail;
	r = qcow2_read_table(img, img->l1_table_offset, img->l1_size, QCOW2_MAX_L1_BYTES, "L1 table", &l1);
	if (r < 0)
		goto fail;

	r = calculate_refcounts(&c);
	if (r < 0)
		goto out;
	compare_refcounts(&c, &highest);
	r = check_oflag_copied(&c, l1, img->l1_size);
	if (r < 0)
		goto out;
	res->image_end_offset = (highest + 1) << c.cb;
	goto out;
fail:
	res->check_errors++;
out:
	free(l1);
	free(c.reftable);
	free(c.imrt);
	free(c.l2);
	free(c.refblock);
	return r;
}
