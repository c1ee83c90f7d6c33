/* What a malicious image must not be able to do: map metadata, other data or
 * bytes outside its files into the guest. Checked on every walked layer. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "qcow2.h"
#include "util.h"

const char *meta_kind_name(enum meta_kind kind)
{
	static const char *const names[META_KIND_COUNT] = {
		[META_HEADER] = "header",
		[META_L1] = "L1 table",
		[META_L2] = "L2 table",
		[META_REFCOUNT_TABLE] = "refcount table",
		[META_REFCOUNT_BLOCK] = "refcount block",
		[META_SNAPSHOT_TABLE] = "snapshot table",
		[META_SNAPSHOT_L1] = "snapshot L1 table",
		[META_SNAPSHOT_L2] = "snapshot L2 table",
		[META_CRYPT_HEADER] = "LUKS header",
		[META_BITMAP_DIRECTORY] = "bitmap directory",
		[META_BITMAP_TABLE] = "bitmap table",
		[META_BITMAP_DATA] = "bitmap data cluster",
	};

	return kind < META_KIND_COUNT ? names[kind] : "metadata";
}

struct meta_list {
	struct meta_range *v;
	size_t n, alloc;
};

static int meta_add_guest(struct meta_list *m, uint64_t off, uint64_t len, enum meta_kind kind, uint64_t guest)
{
	if (!len)
		return 0;
	if (m->n == m->alloc) {
		size_t na = m->alloc ? m->alloc * 2 : 64;
		struct meta_range *p = realloc(m->v, na * sizeof(*p));

		if (!p)
			return -ENOMEM;
		m->v = p;
		m->alloc = na;
	}
	m->v[m->n++] = (struct meta_range){ .offset = off, .length = len, .guest = guest, .kind = (uint8_t)kind };
	return 0;
}

static int meta_add(struct meta_list *m, uint64_t off, uint64_t len, enum meta_kind kind)
{
	return meta_add_guest(m, off, len, kind, 0);
}

static int add_l2_tables(const struct image *img, struct meta_list *m, const uint64_t *l1, uint64_t n,
			 enum meta_kind kind)
{
	uint64_t l2_bytes = img->format == IMG_FMT_QCOW ? (8ULL << img->l2_bits) : img->cluster_size;
	uint64_t mask = img->format == IMG_FMT_QCOW ? ~0ULL : QCOW2_L1E_OFFSET_MASK;
	uint64_t per_l1 = (l2_bytes / (img->extended_l2 ? 16 : 8)) << img->cluster_bits;
	int r;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t off = l1[i] & mask;

		if (off && (r = meta_add_guest(m, off, l2_bytes, kind, i * per_l1)) < 0)
			return r;
	}
	return 0;
}

static int cmp_meta(const void *a, const void *b)
{
	const struct meta_range *x = a, *y = b;

	if (x->offset != y->offset)
		return x->offset < y->offset ? -1 : 1;
	if (x->length != y->length)
		return x->length < y->length ? -1 : 1;
	return (int)x->kind - (int)y->kind;
}

static int check_metadata(const struct image *img, const struct meta_range *m, size_t n);

/* Snapshots share L2 tables with the active L1 and with each other; the
 * active L1 itself must not name one L2 table twice. */
static bool shared_l2(const struct meta_range *a, const struct meta_range *b)
{
	bool al2 = a->kind == META_L2 || a->kind == META_SNAPSHOT_L2;
	bool bl2 = b->kind == META_L2 || b->kind == META_SNAPSHOT_L2;

	return al2 && bl2 && !(a->kind == META_L2 && b->kind == META_L2) && a->offset == b->offset &&
	       a->length == b->length;
}

/* qcow v1: the header, the L1 table and (mapping the active layer) the L2
 * tables. */
static int qcow1_metadata(const struct image *img, struct meta_list *m)
{
	int r;

	r = meta_add(m, 0, 48, META_HEADER);
	if (!r)
		r = meta_add(m, img->l1_table_offset, (uint64_t)img->l1_size * 8, META_L1);
	if (!r && img->snapshot_index < 0)
		r = add_l2_tables(img, m, img->l1, img->l1_size, META_L2);
	return r;
}

/* What the header names: header cluster, L1 and refcount tables, snapshot
 * table and the snapshots' L1 tables, LUKS header, bitmap directory and
 * bitmap tables. */
static int header_metadata(const struct image *img, struct meta_list *m)
{
	int r;

	r = meta_add(m, 0, img->cluster_size, META_HEADER);
	if (!r)
		r = meta_add(m, img->l1_table_offset, (uint64_t)img->l1_size * 8, META_L1);
	if (!r)
		r = meta_add(m, img->refcount_table_offset, (uint64_t)img->refcount_table_clusters << img->cluster_bits,
			     META_REFCOUNT_TABLE);
	if (!r && img->nb_snapshots)
		r = meta_add(m, img->snapshots_offset, img->snapshots_size, META_SNAPSHOT_TABLE);
	if (!r && img->crypt_method == IMG_CRYPT_LUKS)
		r = meta_add(m, img->crypt_header_offset, img->crypt_header_length, META_CRYPT_HEADER);
	if (!r && img->nb_bitmaps)
		r = meta_add(m, img->bitmap_directory_offset, img->bitmap_directory_size, META_BITMAP_DIRECTORY);
	for (uint32_t i = 0; !r && i < img->nb_snapshots; i++)
		r = meta_add(m, img->snapshots[i].l1_table_offset, (uint64_t)img->snapshots[i].l1_size * 8,
			     META_SNAPSHOT_L1);
	for (uint32_t i = 0; !r && i < img->nb_bitmaps; i++)
		r = meta_add(m, img->bitmaps[i].table_offset, (uint64_t)img->bitmaps[i].table_size * 8,
			     META_BITMAP_TABLE);
	return r;
}

/* What the tables name: the L2 tables of every L1 (those of the mapped L1,
 * active or snapshot, are META_L2: one of them named twice is refused; the
 * other L1s may share theirs), the refcount blocks, the bitmap data. */
static int table_metadata(const struct image *img, struct meta_list *m)
{
	uint64_t *t = NULL, reftable_entries;
	int r;

	/* active L2 tables (from the header's L1, whatever is mapped) */
	r = qcow2_read_table(img, img->l1_table_offset, img->l1_size, QCOW2_MAX_L1_BYTES, "L1 table", &t);
	if (!r)
		r = add_l2_tables(img, m, t, img->l1_size, img->snapshot_index < 0 ? META_L2 : META_SNAPSHOT_L2);
	free(t);
	t = NULL;
	if (r)
		return r;
	/* refcount blocks */
	reftable_entries = ((uint64_t)img->refcount_table_clusters << img->cluster_bits) / 8;
	r = qcow2_read_table(img, img->refcount_table_offset, reftable_entries, QCOW2_MAX_REFTABLE_BYTES,
			     "refcount table", &t);
	for (uint64_t i = 0; !r && i < reftable_entries; i++) {
		uint64_t off = t[i] & QCOW2_REFT_OFFSET_MASK;

		if (off)
			r = meta_add(m, off, img->cluster_size, META_REFCOUNT_BLOCK);
	}
	free(t);
	t = NULL;
	if (r)
		return r;
	for (uint32_t i = 0; i < img->nb_snapshots; i++) {
		const struct qcow2_snapshot *sn = &img->snapshots[i];

		r = qcow2_read_table(img, sn->l1_table_offset, sn->l1_size, QCOW2_MAX_L1_BYTES, "snapshot L1 table", &t);
		if (!r)
			r = add_l2_tables(img, m, t, sn->l1_size,
					  (int)i == img->snapshot_index ? META_L2 : META_SNAPSHOT_L2);
		free(t);
		t = NULL;
		if (r)
			return r;
	}
	for (uint32_t i = 0; i < img->nb_bitmaps; i++) {
		const struct qcow2_bitmap *bm = &img->bitmaps[i];

		r = qcow2_read_table(img, bm->table_offset, bm->table_size, QCOW2_MAX_L1_BYTES, "bitmap table", &t);
		for (uint32_t k = 0; !r && k < bm->table_size; k++) {
			uint64_t off = t[k] & QCOW2_L1E_OFFSET_MASK;

			if (off)
				r = meta_add(m, off, img->cluster_size, META_BITMAP_DATA);
		}
		free(t);
		t = NULL;
		if (r)
			return r;
	}
	return 0;
}

/* Sort by offset and drop exact duplicates of shared L2 tables (snapshots
 * share them). */
static void sort_metadata(struct meta_list *m)
{
	size_t w = 0;

	qsort(m->v, m->n, sizeof(*m->v), cmp_meta);
	for (size_t i = 0; i < m->n; i++) {
		if (w && shared_l2(&m->v[w - 1], &m->v[i]))
			continue;
		m->v[w++] = m->v[i];
	}
	m->n = w;
}

int image_metadata(struct image *img, struct meta_range **out, size_t *count)
{
	struct meta_list m = { 0 };
	int r;

	*out = NULL;
	*count = 0;
	if (img->format == IMG_FMT_RAW)
		return 0;
	if (img->format == IMG_FMT_QCOW) {
		r = qcow1_metadata(img, &m);
		if (r)
			goto fail;
		goto out;
	}
	r = header_metadata(img, &m);
	if (r)
		goto fail;
	/* The tables read below must lie apart in the file first: 65536
	 * snapshots naming one L1 table of 4096 entries are a 3 MiB file, and
	 * 2^28 L2 ranges (8 GiB) collected before the overlap check. */
	qsort(m.v, m.n, sizeof(*m.v), cmp_meta);
	r = check_metadata(img, m.v, m.n);
	if (r)
		goto fail;
	r = table_metadata(img, &m);
	if (r)
		goto fail;
out:
	sort_metadata(&m);
	*out = m.v;
	*count = m.n;
	return 0;
fail:
	free(m.v);
	return r;
}

static bool meta_must_be_aligned(enum meta_kind kind)
{
	switch (kind) {
	case META_L1:
	case META_L2:
	case META_REFCOUNT_TABLE:
	case META_REFCOUNT_BLOCK:
	case META_SNAPSHOT_TABLE:
	case META_SNAPSHOT_L1:
	case META_SNAPSHOT_L2:
	case META_CRYPT_HEADER:
	case META_BITMAP_DIRECTORY:
	case META_BITMAP_TABLE:
	case META_BITMAP_DATA:
		return true;
	default:
		return false;
	}
}

/* Metadata must be aligned, lie inside the file and not overlap other
 * metadata. */
static int check_metadata(const struct image *img, const struct meta_range *m, size_t n)
{
	uint64_t align = img->format == IMG_FMT_QCOW ? 512 : img->cluster_size;
	size_t last = 0;

	for (size_t i = 0; i < n; i++) {
		char where[48] = "";

		if (m[i].kind == META_L2 || m[i].kind == META_SNAPSHOT_L2)
			snprintf(where, sizeof(where), "guest offset 0x%" PRIx64 ": ", m[i].guest);
		/* qcow v1 places its L1 table right after the header */
		if (meta_must_be_aligned(m[i].kind) && !(img->format == IMG_FMT_QCOW && m[i].kind == META_L1) &&
		    !is_aligned(m[i].offset, align)) {
			log_err("%s: %s%s at host offset 0x%" PRIx64 " is not %s aligned.", img->path, where,
				meta_kind_name(m[i].kind), m[i].offset, align == 512 ? "sector" : "cluster");
			return -EUCLEAN;
		}
		if (!image_range_in_file(&img->io, m[i].offset, m[i].length)) {
			log_err("%s: %s%s at host offset 0x%" PRIx64 " (%" PRIu64 " bytes) lies beyond the end of the file (size %" PRIu64 ").",
				img->path, where, meta_kind_name(m[i].kind), m[i].offset, m[i].length, img->io.size);
			return -EUCLEAN;
		}
	}
	for (size_t i = 1; i < n; i++) {
		if (m[i].offset < m[last].offset + m[last].length) {
			if (m[i].kind == META_L2 && m[last].kind == META_L2 && m[i].offset == m[last].offset)
				log_err("%s: L2 table at host offset 0x%" PRIx64 " is named twice by the L1 table.", img->path,
					m[i].offset);
			else
				log_err("%s: %s at host offset 0x%" PRIx64 " overlaps the %s at 0x%" PRIx64 ".", img->path,
					meta_kind_name(m[i].kind), m[i].offset, meta_kind_name(m[last].kind), m[last].offset);
			return -EUCLEAN;
		}
		if (m[i].offset + m[i].length > m[last].offset + m[last].length)
			last = i;
	}
	return 0;
}

/* first metadata range overlapping [off, off+len), or NULL */
static const struct meta_range *find_overlap(const struct meta_range *m, size_t n, uint64_t off, uint64_t len)
{
	size_t lo = 0, hi = n;

	/* m is sorted by offset and non-overlapping: find the last range starting before off+len */
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (m[mid].offset < off + len)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo && ranges_overlap(m[lo - 1].offset, m[lo - 1].length, off, len))
		return &m[lo - 1];
	return NULL;
}

struct host_ref {
	uint64_t host, len, guest;
};

static int cmp_ref(const void *a, const void *b)
{
	const struct host_ref *x = a, *y = b;

	return x->host < y->host ? -1 : x->host > y->host;
}

struct ref_edge {
	uint64_t at;
	int delta;
};

static int cmp_edge(const void *a, const void *b)
{
	const struct ref_edge *x = a, *y = b;

	if (x->at != y->at)
		return x->at < y->at ? -1 : 1;
	return x->delta - y->delta;	/* ends before starts at one offset */
}

/* Where host ranges overlap, every cluster must have a refcount of at least
 * the number of references the mapped layer makes to it. */
static int check_ref_counts(struct image *img, const struct host_ref *refs, size_t n, struct refcount_reader *rr)
{
	struct ref_edge *edges = malloc(2 * n * sizeof(*edges));
	uint64_t pos = 0, count = 0, rc;
	int r = 0;

	if (!edges)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		edges[2 * i] = (struct ref_edge){ .at = refs[i].host, .delta = 1 };
		edges[2 * i + 1] = (struct ref_edge){ .at = refs[i].host + refs[i].len, .delta = -1 };
	}
	qsort(edges, 2 * n, sizeof(*edges), cmp_edge);
	for (size_t k = 0; k < 2 * n; k++) {
		if (count >= 2 && edges[k].at > pos) {
			for (uint64_t c = pos >> img->cluster_bits; c <= (edges[k].at - 1) >> img->cluster_bits; c++) {
				r = refcount_get(rr, c, &rc);
				if (r < 0)
					goto out;
				if (rc < count) {
					log_err("%s: host cluster at 0x%" PRIx64 " is mapped %" PRIu64 " times but its refcount is %" PRIu64 ".",
						img->path, c << img->cluster_bits, count, rc);
					r = -EUCLEAN;
					goto out;
				}
			}
		}
		pos = edges[k].at;
		count += (uint64_t)(int64_t)edges[k].delta;
	}
out:
	free(edges);
	return r;
}

static int check_aliasing(struct image *img, struct host_ref *refs, size_t n)
{
	struct refcount_reader rr = { 0 };
	bool have_rr = false;
	size_t prev = 0;
	int r = 0;

	qsort(refs, n, sizeof(*refs), cmp_ref);
	for (size_t i = 1; i < n; i++) {
		uint64_t s, e, rc;

		if (refs[i].host >= refs[prev].host + refs[prev].len) {
			prev = i;
			continue;
		}
		s = refs[i].host;
		e = MIN(refs[i].host + refs[i].len, refs[prev].host + refs[prev].len);
		if (img->format == IMG_FMT_QCOW2) {
			if (!have_rr) {
				r = refcount_reader_init(&rr, img);
				if (r < 0)
					goto out;
				have_rr = true;
			}
			for (uint64_t c = s >> img->cluster_bits; c <= (e - 1) >> img->cluster_bits; c++) {
				r = refcount_get(&rr, c, &rc);
				if (r < 0)
					goto out;
				if (rc < 2)
					goto alias;
			}
		} else {
			goto alias;
		}
		if (refs[i].host + refs[i].len > refs[prev].host + refs[prev].len)
			prev = i;
		continue;
alias:
		log_err("%s: guest offsets 0x%" PRIx64 " and 0x%" PRIx64 " both map host offset 0x%" PRIx64 ", which is not shared (refcount).",
			img->path, refs[prev].guest + (s - refs[prev].host), refs[i].guest, s);
		r = -EUCLEAN;
		goto out;
	}
	/* overlaps the refcounts allowed pairwise: now count them */
	if (have_rr)
		r = check_ref_counts(img, refs, n, &rr);
out:
	if (have_rr)
		refcount_reader_free(&rr);
	return r;
}

int validate_metadata(struct image *img, struct meta_range **meta, size_t *nmeta)
{
	int r = image_metadata(img, meta, nmeta);

	if (r < 0)
		return r;
	r = check_metadata(img, *meta, *nmeta);
	if (r < 0) {
		free(*meta);
		*meta = NULL;
		*nmeta = 0;
	}
	return r;
}

int validate_runs(struct image *img, const struct run_list *runs, const struct meta_range *meta, size_t nmeta)
{
	struct host_ref *refs = NULL;
	const struct img_io *dio = &img->data_io;
	bool same_file = !img->has_data_file;
	size_t nrefs = 0;
	int r = 0;

	refs = malloc((runs->count ? runs->count : 1) * sizeof(*refs));
	if (!refs)
		return -ENOMEM;
	for (size_t i = 0; i < runs->count; i++) {
		const struct run *ru = &runs->runs[i];
		uint64_t len = ru->kind == RUN_COMPRESSED ? ru->clen : ru->len;
		const struct meta_range *hit;
		const char *what = ru->kind == RUN_COMPRESSED ? "compressed cluster" :
				   ru->kind == RUN_ZERO ? "preallocated zero cluster" : "data cluster";
		uint64_t end;

		if (!(ru->kind == RUN_DATA || ru->kind == RUN_COMPRESSED || (ru->flags & RUN_F_HOST)))
			continue;
		if (ru->kind == RUN_DATA && img->format == IMG_FMT_RAW)
			continue;
		if (ru->host == 0 && same_file) {
			log_err("%s: guest offset 0x%" PRIx64 ": %s at host offset 0 overlaps the header.", img->path,
				ru->guest, what);
			r = -EUCLEAN;
			goto out;
		}
		/* QEMU reads past the end of a file as zeros, and leaves the last
		 * cluster of a file short when its tail was never written (subclusters,
		 * the last sector of compressed data). A cluster must start inside the
		 * file; its tail may not. */
		if (uadd64_overflow(ru->host, len, &end) ||
		    (ru->kind == RUN_COMPRESSED ? ru->host : ru->host & ~(img->cluster_size - 1)) >= dio->size) {
			log_err("%s: guest offset 0x%" PRIx64 ": %s at host offset 0x%" PRIx64 " (%" PRIu64 " bytes) lies beyond the end of %s (size %" PRIu64 ").",
				img->path, ru->guest, what, ru->host, len, dio->name ? dio->name : "the file", dio->size);
			r = -EUCLEAN;
			goto out;
		}
		if (same_file && (hit = find_overlap(meta, nmeta, ru->host, len))) {
			log_err("%s: guest offset 0x%" PRIx64 ": %s at host offset 0x%" PRIx64 " overlaps the %s at 0x%" PRIx64 ".",
				img->path, ru->guest, what, ru->host, meta_kind_name(hit->kind), hit->offset);
			r = -EUCLEAN;
			goto out;
		}
		if (ru->kind != RUN_COMPRESSED)
			refs[nrefs++] = (struct host_ref){ .host = ru->host, .len = ru->len, .guest = ru->guest };
	}
	r = check_aliasing(img, refs, nrefs);
out:
	free(refs);
	return r;
}

/* ---- before a read-write open ----
 *
 * The writer trusts OFLAG_COPIED (it writes such clusters in place), takes
 * clusters of refcount 0 for new ones and drops the refcount of what an
 * entry stopped referring to. On a crafted image any of these can overwrite
 * or free what the mapping, a snapshot or the metadata still shows. So every
 * reference of the image (metadata, the L2 tables of the active L1 and of
 * every snapshot, their data and compressed clusters) is swept in host order,
 * cluster by cluster, against the refcounts:
 *   - an entry with OFLAG_COPIED names a cluster of refcount exactly 1 (QEMU
 *     check: "OFLAG_COPIED data cluster: l2_entry=... refcount=...");
 *   - what the writer writes in place (OFLAG_COPIED clusters and L2 tables,
 *     header, L1 table, refcount table and blocks) is referenced once;
 *   - compressed clusters share host clusters with nothing but compressed
 *     clusters;
 *   - every cluster has a refcount of at least its references: no decrement
 *     frees a cluster still in use, no allocation reuses one.
 * Memory: one record per run of host-contiguous entries of each distinct
 * L2 table, bounded by the file size. */

enum wref_kind {
	WREF_META = 0,
	WREF_L2,
	WREF_DATA,
	WREF_COMPRESSED,
};

struct wref {
	uint64_t host, len;	/* bytes; data runs are whole clusters */
	uint64_t guest;		/* first guest offset (L2 tables: the first they map) */
	uint64_t weight;	/* references it stands for (L1 entries naming its table) */
	int32_t snapshot;	/* -1: the active L1 table */
	uint8_t kind;		/* enum wref_kind */
	uint8_t meta_kind;	/* enum meta_kind, for WREF_META */
	bool copied;		/* OFLAG_COPIED in the active layer: refcount exactly 1 */
	bool in_place;		/* written in place by the writer: referenced once */
};

struct wref_list {
	struct wref *v;
	size_t n, alloc;
};

static int wref_add(struct wref_list *l, const struct wref *r)
{
	if (!r->len)
		return 0;
	if (l->n == l->alloc) {
		size_t na = l->alloc ? l->alloc * 2 : 256;
		struct wref *p = realloc(l->v, na * sizeof(*p));

		if (!p)
			return -ENOMEM;
		l->v = p;
		l->alloc = na;
	}
	l->v[l->n++] = *r;
	return 0;
}

/* An L2 table named by an L1 entry (active or snapshot). */
struct l2_use {
	uint64_t off;
	uint64_t guest;
	int32_t snapshot;
	bool copied;
};

static int cmp_l2_use(const void *a, const void *b)
{
	const struct l2_use *x = a, *y = b;

	if (x->off != y->off)
		return x->off < y->off ? -1 : 1;
	/* the active layer's use first: it names the table in messages */
	return x->snapshot - y->snapshot;
}

static int add_l1_uses(const struct image *img, const uint64_t *l1, uint64_t n, int32_t snapshot,
		       struct wref_list *refs, struct l2_use **uses, size_t *nuses, size_t *auses)
{
	uint64_t per_l1 = (img->cluster_size / (img->extended_l2 ? 16 : 8)) << img->cluster_bits;
	int r;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK;
		bool copied = snapshot < 0 && (l1[i] & QCOW2_OFLAG_COPIED);
		struct wref w = { .host = off, .len = img->cluster_size, .guest = i * per_l1, .weight = 1,
				  .snapshot = snapshot, .kind = WREF_L2, .copied = copied, .in_place = copied };

		if (!off)
			continue;
		r = wref_add(refs, &w);
		if (r < 0)
			return r;
		if (*nuses == *auses) {
			size_t na = *auses ? *auses * 2 : 256;
			struct l2_use *p = realloc(*uses, na * sizeof(*p));

			if (!p)
				return -ENOMEM;
			*uses = p;
			*auses = na;
		}
		(*uses)[(*nuses)++] = (struct l2_use){ .off = off, .guest = i * per_l1, .snapshot = snapshot,
						       .copied = copied };
	}
	return 0;
}

/* The data and compressed clusters of one L2 table, as many times as L1
 * entries name it (weight); active: named by the active L1 table. */
static int add_l2_entries(const struct image *img, const uint8_t *l2, const struct l2_use *use, uint64_t weight,
			  bool active, struct wref_list *refs)
{
	uint64_t cs = img->cluster_size, entries = 1ULL << img->l2_bits;
	unsigned int esz = img->extended_l2 ? 16 : 8;
	struct wref run = { 0 };
	int r;

	for (uint64_t j = 0; j < entries; j++) {
		uint64_t e = get_be64(l2 + j * esz), guest = use->guest + j * cs;
		struct wref w = { .guest = guest, .weight = weight, .snapshot = use->snapshot };

		if (e & QCOW2_OFLAG_COMPRESSED) {
			unsigned int x = 62 - (img->cluster_bits - 8);
			uint64_t nb = ((e >> x) & ((1ULL << (img->cluster_bits - 8)) - 1)) + 1;

			w.kind = WREF_COMPRESSED;
			w.host = e & ((1ULL << x) - 1);
			w.len = nb * 512 - (w.host & 511);
		} else {
			/* external data file: data clusters have no refcounts */
			if (img->has_data_file || !(e & QCOW2_L2E_OFFSET_MASK))
				continue;
			w.kind = WREF_DATA;
			w.host = e & QCOW2_L2E_OFFSET_MASK & ~(cs - 1);
			w.len = cs;
			w.copied = active && (e & QCOW2_OFLAG_COPIED);
			w.in_place = w.copied;
		}
		/* host- and guest-contiguous data runs of one kind are one record */
		if (w.kind == WREF_DATA && run.len && run.kind == WREF_DATA && run.copied == w.copied &&
		    run.host + run.len == w.host && run.guest + run.len == w.guest) {
			run.len += cs;
			continue;
		}
		r = wref_add(refs, &run);
		if (r < 0)
			return r;
		run = w;
	}
	return wref_add(refs, &run);
}

struct wedge {
	uint64_t at;		/* cluster index */
	size_t ref;
	bool end;
};

static int cmp_wedge(const void *a, const void *b)
{
	const struct wedge *x = a, *y = b;

	return x->at < y->at ? -1 : x->at > y->at;
}

static uint64_t wref_first(const struct image *img, const struct wref *w)
{
	return w->host >> img->cluster_bits;
}

static uint64_t wref_end(const struct image *img, const struct wref *w)
{
	return ((w->host + w->len - 1) >> img->cluster_bits) + 1;
}

/* "guest offset 0x..: data cluster at host offset 0x.." for host cluster ci */
static void describe(const struct image *img, const struct wref *w, uint64_t ci, char *buf, size_t size)
{
	uint64_t at = ci << img->cluster_bits, delta = at > w->host ? at - w->host : 0;
	char snap[96] = "";

	if (w->snapshot >= 0 && (uint32_t)w->snapshot < img->nb_snapshots)
		snprintf(snap, sizeof(snap), "snapshot %.64s, ", img->snapshots[w->snapshot].id);
	switch (w->kind) {
	case WREF_DATA:
		snprintf(buf, size, "%sguest offset 0x%" PRIx64 ": data cluster at host offset 0x%" PRIx64, snap,
			 w->guest + delta, w->host + delta);
		break;
	case WREF_COMPRESSED:
		snprintf(buf, size, "%sguest offset 0x%" PRIx64 ": compressed cluster at host offset 0x%" PRIx64, snap,
			 w->guest, w->host);
		break;
	case WREF_L2:
		snprintf(buf, size, "%sguest offset 0x%" PRIx64 ": L2 table at host offset 0x%" PRIx64, snap, w->guest,
			 w->host);
		break;
	default:
		snprintf(buf, size, "%s at host offset 0x%" PRIx64, meta_kind_name(w->meta_kind), w->host);
		break;
	}
}

/* The first reference to cluster ci that pick() accepts, other than not. */
static const struct wref *find_ref(const struct image *img, const struct wref_list *refs, uint64_t ci,
				   const struct wref *not, bool (*pick)(const struct wref *))
{
	for (size_t i = 0; i < refs->n; i++) {
		const struct wref *w = &refs->v[i];

		if (w != not && wref_first(img, w) <= ci && ci < wref_end(img, w) && (!pick || pick(w)))
			return w;
	}
	return not && not->weight > 1 && (!pick || pick(not)) ? not : NULL;
}

static bool is_copied(const struct wref *w) { return w->copied; }
static bool is_in_place(const struct wref *w) { return w->in_place; }
static bool is_compressed(const struct wref *w) { return w->kind == WREF_COMPRESSED; }
static bool is_not_compressed(const struct wref *w) { return w->kind != WREF_COMPRESSED; }

struct wcount {
	uint64_t total, compressed, in_place, copied;
};

static int sweep_cluster_range(struct image *img, const struct wref_list *refs, const struct wcount *c,
			       uint64_t from, uint64_t to, struct refcount_reader *rr)
{
	const struct wref *a, *b;
	char da[192], db[192];
	uint64_t rc;
	int r;

	if (c->compressed && c->compressed != c->total) {
		a = find_ref(img, refs, from, NULL, is_compressed);
		b = find_ref(img, refs, from, NULL, is_not_compressed);
		if (a && b) {
			describe(img, a, from, da, sizeof(da));
			describe(img, b, from, db, sizeof(db));
			log_err("%s: %s overlaps the host cluster of %s.", img->path, da, db);
			return -EUCLEAN;
		}
	}
	for (uint64_t ci = from; ci < to; ci++) {
		r = refcount_get(rr, ci, &rc);
		if (r < 0)
			return r;
		if (c->copied && rc != 1) {
			a = find_ref(img, refs, ci, NULL, is_copied);
			if (a) {
				describe(img, a, ci, da, sizeof(da));
				log_err("%s: %s is marked not shared (OFLAG_COPIED) but its refcount is %" PRIu64 ".",
					img->path, da, rc);
				return -EUCLEAN;
			}
		}
		if (c->in_place && c->total > 1) {
			a = find_ref(img, refs, ci, NULL, is_in_place);
			b = a ? find_ref(img, refs, ci, a, NULL) : NULL;
			if (a && b == a) {
				describe(img, a, ci, da, sizeof(da));
				log_err("%s: %s, written in place, is used %" PRIu64 " times (its L2 table is shared).",
					img->path, da, a->weight);
				return -EUCLEAN;
			}
			if (a && b) {
				describe(img, a, ci, da, sizeof(da));
				describe(img, b, ci, db, sizeof(db));
				log_err("%s: %s, written in place, is also the host cluster of %s.", img->path, da,
					db);
				return -EUCLEAN;
			}
		}
		if (rc < c->total) {
			a = find_ref(img, refs, ci, NULL, NULL);
			if (a) {
				describe(img, a, ci, da, sizeof(da));
				log_err("%s: %s: host cluster 0x%" PRIx64 " has %" PRIu64 " references but refcount %" PRIu64 ".",
					img->path, da, ci << img->cluster_bits, c->total, rc);
				return -EUCLEAN;
			}
		}
	}
	return 0;
}

static int sweep(struct image *img, const struct wref_list *refs)
{
	struct refcount_reader rr = { 0 };
	struct wedge *e = NULL;
	struct wcount c = { 0 };
	size_t n = 0;
	int r;

	r = refcount_reader_init(&rr, img);
	if (r < 0)
		goto out;
	e = malloc((refs->n ? refs->n : 1) * 2 * sizeof(*e));
	if (!e) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < refs->n; i++) {
		e[n++] = (struct wedge){ .at = wref_first(img, &refs->v[i]), .ref = i };
		e[n++] = (struct wedge){ .at = wref_end(img, &refs->v[i]), .ref = i, .end = true };
	}
	qsort(e, n, sizeof(*e), cmp_wedge);
	for (size_t k = 0; k < n;) {
		uint64_t at = e[k].at;

		for (; k < n && e[k].at == at; k++) {
			const struct wref *w = &refs->v[e[k].ref];
			uint64_t sign = e[k].end ? (uint64_t)-1 : 1;

			c.total += sign * w->weight;
			if (w->kind == WREF_COMPRESSED)
				c.compressed += sign * w->weight;
			if (w->in_place)
				c.in_place += sign;
			if (w->copied)
				c.copied += sign;
		}
		if (k < n && c.total) {
			r = sweep_cluster_range(img, refs, &c, at, e[k].at, &rr);
			if (r < 0)
				goto out;
		}
	}
out:
	free(e);
	refcount_reader_free(&rr);
	return r;
}

int validate_writable(struct image *img)
{
	struct wref_list refs = { 0 };
	struct meta_range *meta = NULL;
	struct l2_use *uses = NULL;
	size_t nmeta = 0, nuses = 0, auses = 0;
	uint64_t *t = NULL;
	uint8_t *l2 = NULL;
	int r;

	if (img->format != IMG_FMT_QCOW2 || img->snapshot_index >= 0)
		return -ENOTSUP;
	r = validate_metadata(img, &meta, &nmeta);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < nmeta; i++) {
		enum meta_kind k = meta[i].kind;
		struct wref w = { .host = meta[i].offset, .len = meta[i].length, .weight = 1, .snapshot = -1,
				  .kind = WREF_META, .meta_kind = (uint8_t)k };

		if (k == META_L2 || k == META_SNAPSHOT_L2)
			continue;	/* counted per L1 entry below */
		w.in_place = k == META_HEADER || k == META_L1 || k == META_REFCOUNT_TABLE || k == META_REFCOUNT_BLOCK;
		r = wref_add(&refs, &w);
		if (r < 0)
			goto out;
	}
	r = add_l1_uses(img, img->l1, img->l1_size, -1, &refs, &uses, &nuses, &auses);
	for (uint32_t i = 0; r == 0 && i < img->nb_snapshots; i++) {
		const struct qcow2_snapshot *sn = &img->snapshots[i];

		r = qcow2_read_table(img, sn->l1_table_offset, sn->l1_size, QCOW2_MAX_L1_BYTES, "snapshot L1 table", &t);
		if (r == 0)
			r = add_l1_uses(img, t, sn->l1_size, (int32_t)i, &refs, &uses, &nuses, &auses);
		free(t);
		t = NULL;
	}
	if (r < 0)
		goto out;
	/* each distinct L2 table once, its entries weighted by its uses */
	if (nuses)
		qsort(uses, nuses, sizeof(*uses), cmp_l2_use);
	l2 = malloc(img->cluster_size);
	if (!l2) {
		r = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < nuses;) {
		size_t j = i;
		bool active = false;

		for (; j < nuses && uses[j].off == uses[i].off; j++)
			active |= uses[j].snapshot < 0;
		/* validate_metadata: every L2 table is aligned and in the file */
		r = img_pread(&img->io, l2, img->cluster_size, uses[i].off);
		if (r < 0) {
			log_err("%s: cannot read the L2 table at 0x%" PRIx64 ": %s.", img->path, uses[i].off, strerror(-r));
			goto out;
		}
		r = add_l2_entries(img, l2, &uses[i], j - i, active, &refs);
		if (r < 0)
			goto out;
		i = j;
	}
	r = sweep(img, &refs);
out:
	free(l2);
	free(t);
	free(uses);
	free(refs.v);
	free(meta);
	return r;
}
