/* Reads of a backing chain's guest content from its merged runs. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "compress.h"
#include "log.h"
#include "util.h"

struct chain_reader {
	struct image *img;
	struct run_list runs;
	struct chain_layer_io io[IMG_MAX_CHAIN_DEPTH];
	const struct image *layers[IMG_MAX_CHAIN_DEPTH];
	uint64_t max_cluster;
	uint8_t *cbuf;		/* decompressed cluster */
	uint8_t *zbuf;		/* compressed bytes */
	const struct run *cached;	/* run decompressed in cbuf */
};

int chain_reader_open(struct image *img, const struct chain_layer_io *io, unsigned int nio,
		      struct chain_reader **out)
{
	struct chain_reader *cr;
	int r;

	*out = NULL;
	cr = calloc(1, sizeof(*cr));
	if (!cr)
		return -ENOMEM;
	cr->img = img;
	run_list_init(&cr->runs);
	for (unsigned int d = 0; d < nio && d < IMG_MAX_CHAIN_DEPTH; d++)
		cr->io[d] = io[d];
	cr->max_cluster = 512;
	for (struct image *l = img; l; l = l->backing) {
		if (l->depth < 0 || l->depth >= IMG_MAX_CHAIN_DEPTH) {
			r = -ELOOP;
			goto fail;
		}
		cr->layers[l->depth] = l;
		if (l->format != IMG_FMT_RAW)
			cr->max_cluster = MAX(cr->max_cluster, l->cluster_size);
	}
	r = image_map_chain(img, &cr->runs);
	if (r)
		goto fail;
	for (size_t i = 0; i < cr->runs.count; i++)
		if (cr->runs.runs[i].kind == RUN_COMPRESSED) {
			if (posix_memalign((void **)&cr->cbuf, 4096, cr->max_cluster) ||
			    posix_memalign((void **)&cr->zbuf, 4096, 2 * cr->max_cluster + 1024)) {
				r = -ENOMEM;
				goto fail;
			}
			break;
		}
	*out = cr;
	return 0;
fail:
	chain_reader_free(cr);
	return r;
}

void chain_reader_free(struct chain_reader *cr)
{
	if (!cr)
		return;
	run_list_free(&cr->runs);
	free(cr->cbuf);
	free(cr->zbuf);
	free(cr);
}

uint64_t chain_reader_size(const struct chain_reader *cr)
{
	return cr->img->map_size ? cr->img->map_size : cr->img->size;
}

/* The run holding guest (runs cover [0, size) in order). */
static size_t find_run(const struct chain_reader *cr, uint64_t guest)
{
	size_t lo = 0, hi = cr->runs.count;

	while (hi - lo > 1) {
		size_t mid = lo + (hi - lo) / 2;

		if (cr->runs.runs[mid].guest <= guest)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* Raw bytes of a layer's image file, zeros past its end. */
static int read_raw(const struct image *l, uint8_t *buf, size_t len, uint64_t off)
{
	size_t n = off < l->io.size ? (size_t)MIN((uint64_t)len, l->io.size - off) : 0;
	int r = 0;

	if (n)
		r = img_pread(&l->io, buf, n, off);
	memset(buf + n, 0, len - n);
	return r;
}

static int read_compressed(struct chain_reader *cr, const struct run *ru)
{
	const struct image *l = cr->layers[ru->depth];
	int type, r;

	if (cr->cached == ru)
		return 0;
	cr->cached = NULL;
	/* the run may be cut at the end of the image, the cluster is whole */
	if (!l || !cr->cbuf || l->cluster_size > cr->max_cluster || ru->clen > 2 * cr->max_cluster + 1024)
		return -EIO;
	r = read_raw(l, cr->zbuf, ru->clen, ru->host);
	if (r < 0)
		return r;
	type = l->format == IMG_FMT_QCOW ? QCOW2_COMPRESSION_ZLIB : l->compression_type;
	r = qcow_decompress(type, cr->cbuf, l->cluster_size, cr->zbuf, ru->clen);
	if (r < 0) {
		log_err("%s: cannot decompress the cluster at 0x%" PRIx64 ": %s.", l->path, ru->host, strerror(-r));
		return -EIO;
	}
	cr->cached = ru;
	return 0;
}

/* shared: compressed clusters allowed (cbuf, zbuf and cached change);
 * else -EAGAIN on the first one, before anything is read */
static int read_runs(struct chain_reader *cr, void *buf, size_t len, uint64_t guest, bool shared)
{
	uint64_t size = chain_reader_size(cr);
	uint8_t *p = buf;
	int r;

	while (len) {
		const struct run *ru;
		uint64_t n, in;

		if (guest >= size || !cr->runs.count) {
			memset(p, 0, len);
			return 0;
		}
		ru = &cr->runs.runs[find_run(cr, guest)];
		in = guest - ru->guest;
		n = MIN((uint64_t)len, ru->len - in);
		switch (ru->kind) {
		case RUN_DATA: {
			const struct chain_layer_io *io = &cr->io[ru->depth];

			if (!io->data_pread) {
				log_err("Internal error: no reader for layer %u.", ru->depth);
				return -EINVAL;
			}
			r = io->data_pread(io->opaque, p, n, io->by_guest ? guest : ru->host + in);
			if (r < 0) {
				log_err("Cannot read layer %u at guest offset 0x%" PRIx64 ": %s.", ru->depth, guest,
					strerror(-r));
				return r;
			}
			break;
		}
		case RUN_COMPRESSED:
			if (!shared)
				return -EAGAIN;
			r = read_compressed(cr, ru);
			if (r < 0)
				return r;
			memcpy(p, cr->cbuf + in, n);
			break;
		default:	/* zero, unallocated everywhere, past a backing file */
			memset(p, 0, n);
			break;
		}
		p += n;
		guest += n;
		len -= n;
	}
	return 0;
}

/* Whether the layer's file has a hole at [off, off + len) (a data run). */
static bool layer_hole(const struct image *l, uint64_t off, uint64_t len)
{
	uint64_t n;
	bool is_data;
	int r;

	if (!l || l->crypt_method != IMG_CRYPT_NONE || l->has_data_file || !l->io.extent)
		return false;
	if (off >= l->io.size)
		return true;	/* zeros past its end */
	r = l->io.extent(l->io.opaque, off, &n, &is_data);
	return r == -ENXIO || (r == 0 && !is_data && n >= len);
}

bool chain_is_zero(const struct chain_reader *cr, uint64_t guest, uint64_t len)
{
	uint64_t end = MIN(guest + len, chain_reader_size(cr));

	while (guest < end && cr->runs.count) {
		const struct run *ru = &cr->runs.runs[find_run(cr, guest)];
		uint64_t in = guest - ru->guest, n = MIN(end - guest, ru->len - in);

		if (ru->kind == RUN_COMPRESSED || (ru->kind == RUN_DATA &&
						   (cr->io[ru->depth].by_guest || !layer_hole(cr->layers[ru->depth], ru->host + in, n))))
			return false;
		guest += n;
	}
	return true;
}

int chain_read(struct chain_reader *cr, void *buf, size_t len, uint64_t guest)
{
	return read_runs(cr, buf, len, guest, true);
}

int chain_read_direct(struct chain_reader *cr, void *buf, size_t len, uint64_t guest)
{
	for (uint64_t at = guest; cr->runs.count && at < guest + len && at < chain_reader_size(cr);) {
		const struct run *ru = &cr->runs.runs[find_run(cr, at)];

		if (ru->kind == RUN_COMPRESSED)
			return -EAGAIN;
		at = ru->guest + ru->len;
	}
	return read_runs(cr, buf, len, guest, false);
}

const struct run_list *chain_reader_runs(const struct chain_reader *cr)
{
	return &cr->runs;
}
