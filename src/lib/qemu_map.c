#include <errno.h>
#include <string.h>

#include "qcow2.h"
#include "qemu_map.h"
#include "runs.h"
#include "util.h"

struct merger {
	struct qmap_entry cur;
	uint64_t next_host;	/* host offset following cur, when has_host */
	qmap_emit_fn fn;
	void *opaque;
};

/* qemu-img.c entry_mergeable(), plus our host-contiguity bookkeeping */
static bool mergeable(const struct qmap_entry *a, const struct qmap_entry *b)
{
	if (!a->length)
		return false;
	if (a->zero != b->zero || a->data != b->data || a->depth != b->depth || a->present != b->present ||
	    a->has_offset != b->has_offset || !a->filename != !b->filename)
		return false;
	if (a->filename && strcmp(a->filename, b->filename))
		return false;
	if (a->has_offset && a->offset + a->length != b->offset)
		return false;
	return true;
}

static int push(struct merger *m, const struct qmap_entry *e)
{
	int r;

	if (!e->length)
		return 0;
	if (mergeable(&m->cur, e) && m->cur.start + m->cur.length == e->start) {
		if (m->cur.has_host && (!e->has_host || m->next_host != e->host))
			m->cur.has_host = false;
		m->cur.compressed = m->cur.compressed && e->compressed;
		m->cur.length += e->length;
		m->next_host += e->length;
		return 0;
	}
	if (m->cur.length) {
		r = m->fn(&m->cur, m->opaque);
		if (r < 0)
			return r;
	}
	m->cur = *e;
	m->next_host = e->host + e->length;
	return 0;
}

static struct image *layer_at(struct image *top, unsigned int depth)
{
	while (top && depth--)
		top = top->backing;
	return top;
}

/* Data at [host, host+len) of a layer's data file: QEMU refines its status
 * with the file's own (SEEK_DATA/SEEK_HOLE): holes read as zeros. */
static int push_refined(struct merger *m, struct qmap_entry e, const struct img_io *io, bool raw)
{
	uint64_t done = 0, total = e.length;
	int r;

	if (!io->extent) {
		if (raw) {
			e.zero = false;
			e.data = true;
		}
		return push(m, &e);
	}
	while (done < total) {
		uint64_t len = 0;
		bool is_data = false;
		struct qmap_entry p = e;

		r = io->extent(io->opaque, e.offset + done, &len, &is_data);
		if (r == -ENXIO) {
			/* at or beyond EOF: reads as zeros */
			len = total - done;
			is_data = false;
		} else if (r < 0) {
			/* no information: everything is data */
			len = total - done;
			is_data = true;
		}
		len = MIN(len, total - done);
		p.start = e.start + done;
		p.length = len;
		p.offset = e.offset + done;
		p.host = e.host + done;
		if (raw) {
			p.data = is_data;
			p.zero = !is_data;
		} else {
			p.zero = !is_data;
		}
		r = push(m, &p);
		if (r < 0)
			return r;
		done += len;
	}
	return 0;
}

/* QEMU refines the status of a qcow2 data cluster with the file's own only
 * for images it takes as metadata-preallocated: more clusters in use by
 * refcount than the file has allocated on disk (plus 10%). */
static int detect_metadata_preallocation(const struct image *img, bool *prealloc)
{
	struct refcount_reader rr;
	uint64_t real_clusters, threshold, end_cluster, count = 0, rc;
	int r;

	*prealloc = false;
	if (img->format != IMG_FMT_QCOW2 || !img->io.allocated)
		return 0;
	real_clusters = img->io.allocated / img->cluster_size;
	threshold = MAX(real_clusters * 10 / 9, real_clusters + 2);
	end_cluster = (img->io.size + img->cluster_size - 1) / img->cluster_size;
	r = refcount_reader_init(&rr, img);
	if (r < 0)
		return r;
	for (uint64_t i = 0; i < end_cluster && count < threshold; i++) {
		r = refcount_get(&rr, i, &rc);
		if (r < 0)
			break;
		count += rc != 0;
	}
	refcount_reader_free(&rr);
	*prealloc = count >= threshold;
	return r;
}

int qemu_map(struct image *top, qmap_emit_fn fn, void *opaque)
{
	struct merger m = { .fn = fn, .opaque = opaque };
	struct run_list runs;
	int r;

	bool prealloc[IMG_MAX_CHAIN_DEPTH] = { false };

	run_list_init(&runs);
	for (struct image *l = top; l; l = l->backing) {
		r = detect_metadata_preallocation(l, &prealloc[l->depth]);
		if (r < 0)
			return r;
	}
	r = image_map_chain(top, &runs);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < runs.count; i++) {
		const struct run *ru = &runs.runs[i];
		struct image *l = layer_at(top, ru->depth);
		bool encrypted = l->crypt_method != IMG_CRYPT_NONE;
		struct qmap_entry e = {
			.start = ru->guest,
			.length = ru->len,
			.depth = ru->depth,
		};

		switch (ru->kind) {
		case RUN_DATA:
			e.present = e.data = true;
			e.has_host = true;
			e.host = ru->host;
			if (!encrypted) {
				e.has_offset = true;
				e.offset = ru->host;
				e.filename = l->data_io.name;
				if (l->format == IMG_FMT_RAW || prealloc[ru->depth])
					r = push_refined(&m, e, &l->data_io, l->format == IMG_FMT_RAW);
				else
					r = push(&m, &e);
			} else {
				r = push(&m, &e);
			}
			break;
		case RUN_ZERO:
			e.present = e.zero = true;
			if (l->format == IMG_FMT_RAW) {
				/* the sector-rounded tail of a raw file */
				e.has_offset = true;
				e.offset = ru->guest;
				e.filename = l->data_io.name;
			} else if ((ru->flags & RUN_F_HOST) && !encrypted) {
				e.has_offset = true;
				e.offset = ru->host;
				e.filename = l->data_io.name;
			}
			if (ru->flags & RUN_F_HOST) {
				e.has_host = true;
				e.host = ru->host;
			}
			r = push(&m, &e);
			break;
		case RUN_COMPRESSED:
			e.present = e.data = true;
			e.compressed = true;
			e.has_host = true;
			e.host = ru->host;
			r = push(&m, &e);
			/* compressed clusters are never host-contiguous in our sense */
			m.cur.has_host = m.cur.length == e.length;
			break;
		default:
			/* unallocated down to the bottom, or past a short backing file;
			 * an allocated cluster's unallocated subcluster keeps its offset */
			e.zero = true;
			if ((ru->flags & RUN_F_HOST) && !encrypted) {
				e.has_offset = true;
				e.offset = ru->host;
				e.filename = l->data_io.name;
			}
			r = push(&m, &e);
			break;
		}
		if (r < 0)
			goto out;
	}
	if (m.cur.length)
		r = fn(&m.cur, opaque);
out:
	run_list_free(&runs);
	return r;
}
