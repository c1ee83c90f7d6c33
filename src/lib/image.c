/* Opening images and backing chains; the chain walk. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "log.h"
#include "qcow2.h"
#include "util.h"

const char *image_format_name(enum img_format fmt)
{
	switch (fmt) {
	case IMG_FMT_QCOW2:
		return "qcow2";
	case IMG_FMT_QCOW:
		return "qcow";
	case IMG_FMT_RAW:
		return "raw";
	}
	return "?";
}

static int format_from_name(const char *name, enum img_format *fmt)
{
	if (!strcmp(name, "qcow2"))
		*fmt = IMG_FMT_QCOW2;
	else if (!strcmp(name, "qcow"))
		*fmt = IMG_FMT_QCOW;
	else if (!strcmp(name, "raw"))
		*fmt = IMG_FMT_RAW;
	else
		return -ENOTSUP;
	return 0;
}

enum img_format image_probe_format(const struct img_io *io)
{
	uint8_t h[8];

	if (io->size < 8 || img_pread(io, h, sizeof(h), 0) < 0 || get_be32(h) != QCOW_MAGIC)
		return IMG_FMT_RAW;
	return get_be32(h + 4) == 1 ? IMG_FMT_QCOW : IMG_FMT_QCOW2;
}

char *image_resolve_path(const char *image_path, const char *name)
{
	const char *slash;
	size_t dirlen;
	char *p;

	if (name[0] == '/' || !(slash = strrchr(image_path, '/')))
		return strdup(name);
	dirlen = (size_t)(slash - image_path) + 1;
	p = malloc(dirlen + strlen(name) + 1);
	if (p) {
		memcpy(p, image_path, dirlen);
		strcpy(p + dirlen, name);
	}
	return p;
}

static void free_layer(struct image *img, const struct img_opener *opener)
{
	if (img->owns_io && opener && opener->close)
		opener->close(opener->opaque, &img->io);
	if (img->has_data_file && opener && opener->close)
		opener->close(opener->opaque, &img->data_io);
	for (uint32_t i = 0; img->snapshots && i < img->nb_snapshots; i++) {
		free(img->snapshots[i].id);
		free(img->snapshots[i].name);
	}
	for (uint32_t i = 0; img->bitmaps && i < img->nb_bitmaps; i++)
		free(img->bitmaps[i].name);
	for (size_t i = 0; img->unknown_extensions && img->unknown_extensions[i]; i++)
		free(img->unknown_extensions[i]);
	free(img->unknown_extensions);
	if (img->bindings)
		binding_set_free(img->bindings);
	free(img->bindings);
	free(img->snapshots);
	free(img->bitmaps);
	free(img->feature_names);
	free(img->data_file);
	free(img->backing_file);
	free(img->backing_format);
	free(img->backing_path);
	free(img->l1);
	free(img->path);
	free(img);
}

void image_free(struct image *img, const struct img_opener *opener)
{
	while (img) {
		struct image *next = img->backing;

		free_layer(img, opener);
		img = next;
	}
}

/* Backing names QEMU accepts that name protocols rather than files. */
static bool is_protocol_name(const char *name)
{
	const char *colon = strchr(name, ':'), *slash = strchr(name, '/');

	if (!strncmp(name, "json:", 5))
		return true;
	if (!colon || (slash && slash < colon))
		return false;
	for (const char *p = name; p < colon; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '+' || *p == '-'))
			return false;
	return colon > name;
}

static int open_layer(const struct img_opener *opener, const struct img_open_req *req, const struct img_io *given,
		      const char *format, int depth, struct image **out);

/* The file a name of img leads to: the caller's override of the top's
 * name (trusted, as given), else the name resolved against img's folder. */
static int name_request(struct image *top, struct image *img, const char *name, const char *override,
			enum img_file_role role, char **path, struct img_open_req *req)
{
	const char *what = role == IMG_FILE_BACKING ? "backing file" : "data file";

	if (override && img->depth == 0) {
		*path = strdup(override);
		name = NULL;
	} else {
		if (is_protocol_name(name)) {
			log_err("%s: %s \"%s\" names a protocol, not a file; qcowsetup maps files only.", img->path,
				what, name);
			return -ENOTSUP;
		}
		*path = image_resolve_path(img->path, name);
	}
	if (!*path)
		return -ENOMEM;
	*req = (struct img_open_req){ .path = *path, .name = name, .role = role, .by = img, .top = top };
	return 0;
}

static int open_backing(const struct img_opener *opener, const struct image_open_opts *opts, struct image *top,
			struct image *img)
{
	struct img_open_req req;
	enum img_format fmt;
	int r;

	r = name_request(top, img, img->backing_file, opts ? opts->backing_file : NULL, IMG_FILE_BACKING,
			 &img->backing_path, &req);
	if (r)
		return r;
	if (img->backing_format && format_from_name(img->backing_format, &fmt) < 0) {
		log_err("%s: backing file format \"%s\" is not supported (qcow2, qcow, raw).", img->path,
			img->backing_format);
		return -ENOTSUP;
	}
	if (img->depth + 1 >= IMG_MAX_CHAIN_DEPTH) {
		log_err("%s: backing chain deeper than %d images (a loop?) at \"%s\".", img->path, IMG_MAX_CHAIN_DEPTH,
			img->backing_file);
		return -ELOOP;
	}
	for (struct image *p = top; p; p = p->backing) {
		/* loops through other names (links) end at the depth limit */
		if (!strcmp(p->path, img->backing_path)) {
			log_err("%s: backing file %s is already in the chain (a loop).", img->path, img->backing_path);
			return -ELOOP;
		}
	}
	return open_layer(opener, &req, NULL, img->backing_format, img->depth + 1, &img->backing);
}

static int open_data_file(const struct img_opener *opener, const struct image_open_opts *opts, struct image *top,
			  struct image *img)
{
	struct img_open_req req;
	char *path;
	int r;

	r = name_request(top, img, img->data_file, opts ? opts->data_file : NULL, IMG_FILE_DATA, &path, &req);
	if (r)
		return r;
	r = opener->open(opener->opaque, &req, &img->data_io);
	if (r == 0)
		img->has_data_file = true;
	free(path);
	return r;
}

static int open_layer(const struct img_opener *opener, const struct img_open_req *req, const struct img_io *given,
		      const char *format, int depth, struct image **out)
{
	struct image *img;
	int r = -EINVAL;

	*out = NULL;
	img = calloc(1, sizeof(*img));
	if (!img)
		return -ENOMEM;
	img->snapshot_index = -1;
	img->depth = depth;
	img->path = strdup(req ? req->path : given->name ? given->name : "(image)");
	if (!img->path) {
		free(img);
		return -ENOMEM;
	}
	if (given) {
		img->io = *given;
	} else {
		r = opener->open(opener->opaque, req, &img->io);
		if (r < 0) {
			free(img->path);
			free(img);
			return r;
		}
		img->owns_io = true;
	}
	if (format) {
		r = format_from_name(format, &img->format);
		if (r < 0) {
			log_err("%s: unknown format \"%s\".", img->path, format);
			goto fail;
		}
	} else {
		img->format = image_probe_format(&img->io);
	}
	switch (img->format) {
	case IMG_FMT_QCOW2:
		r = qcow2_open(img);
		break;
	case IMG_FMT_QCOW:
		r = qcow1_open(img);
		break;
	case IMG_FMT_RAW:
		/* QEMU rounds a raw image's length up to whole sectors */
		img->size = round_up_pow2(img->io.size, 512);
		img->map_size = img->size;
		img->cluster_size = 512;
		r = 0;
		break;
	}
	if (r < 0)
		goto fail;
	img->data_io = img->io;
	*out = img;
	return 0;
fail:
	free_layer(img, opener);
	return r;
}

static int open_chain(const struct img_opener *opener, struct image *top, const struct image_open_opts *opts)
{
	int r;

	if (opts && opts->backing_file && !top->backing_file) {
		log_err("%s: the image has no backing file for --backing-file to replace.", top->path);
		return -EINVAL;
	}
	if (opts && opts->data_file && !top->data_file) {
		log_err("%s: the image has no external data file for --data-file to replace.", top->path);
		return -EINVAL;
	}

	for (struct image *img = top; img; img = img->backing) {
		if (img->data_file && !(opts && opts->no_data_file)) {
			r = open_data_file(opener, opts, top, img);
			if (r < 0)
				return r;
		}
		if (img->backing_file && !(opts && opts->no_backing)) {
			r = open_backing(opener, opts, top, img);
			if (r < 0)
				return r;
		}
	}
	if (opts && opts->snapshot)
		return image_select_snapshot(top, opts->snapshot);
	return 0;
}

int image_open(const struct img_opener *opener, const char *path, const struct image_open_opts *opts,
	       struct image **out)
{
	struct img_open_req req = { .path = path, .role = IMG_FILE_TOP };
	int r = open_layer(opener, &req, NULL, opts ? opts->format : NULL, 0, out);

	if (r == 0) {
		r = open_chain(opener, *out, opts);
		if (r < 0) {
			image_free(*out, opener);
			*out = NULL;
		}
	}
	return r;
}

int image_open_io(const struct img_opener *opener, const struct img_io *io, const struct image_open_opts *opts,
		  struct image **out)
{
	int r = open_layer(opener, NULL, io, opts ? opts->format : NULL, 0, out);

	if (r == 0) {
		r = open_chain(opener, *out, opts);
		if (r < 0) {
			image_free(*out, opener);
			*out = NULL;
		}
	}
	return r;
}

int image_select_snapshot(struct image *img, const char *id_or_name)
{
	struct qcow2_snapshot *sn = NULL;
	uint64_t *l1;
	int r;

	if (!id_or_name) {
		img->snapshot_index = -1;
		return 0;
	}
	if (img->format != IMG_FMT_QCOW2) {
		log_err("%s: only qcow2 images have internal snapshots.", img->path);
		return -ENOENT;
	}
	for (uint32_t i = 0; i < img->nb_snapshots && !sn; i++)
		if (!strcmp(img->snapshots[i].id, id_or_name))
			sn = &img->snapshots[i];
	for (uint32_t i = 0; i < img->nb_snapshots && !sn; i++)
		if (!strcmp(img->snapshots[i].name, id_or_name))
			sn = &img->snapshots[i];
	if (!sn) {
		log_err("%s: no snapshot with id or name \"%s\".", img->path, id_or_name);
		return -ENOENT;
	}
	{
		uint64_t per_l1 = (img->cluster_size / (img->extended_l2 ? 16 : 8)) << img->cluster_bits;

		if (sn->disk_size > (uint64_t)sn->l1_size * per_l1 || sn->disk_size % 512) {
			log_err("%s: snapshot %s has a virtual size of %" PRIu64 " bytes, which its L1 table of %u entries cannot cover or which is not a multiple of 512.",
				img->path, sn->id, sn->disk_size, sn->l1_size);
			return -EUCLEAN;
		}
	}
	r = qcow2_read_table(img, sn->l1_table_offset, sn->l1_size, QCOW2_MAX_L1_BYTES, "snapshot L1 table", &l1);
	if (r < 0)
		return r;
	free(img->l1);
	img->l1 = l1;
	img->map_l1_size = sn->l1_size;
	img->map_size = sn->disk_size;
	img->snapshot_index = (int)(sn - img->snapshots);
	return 0;
}

int image_walk_layer(struct image *img, struct run_list *out)
{
	struct run all = { .guest = 0, .len = img->map_size, .kind = RUN_DATA };
	struct meta_range *meta = NULL;
	size_t nmeta = 0;
	int r;

	if (img->format == IMG_FMT_RAW) {
		/* the sector-rounded tail past the end of the file reads as zeros */
		all.len = img->io.size & ~511ULL;
		r = run_list_add(out, &all);
		if (r == 0 && all.len < img->map_size) {
			struct run tail = { .guest = all.len, .len = img->map_size - all.len, .kind = RUN_ZERO };

			r = run_list_add(out, &tail);
		}
		return r;
	}
	/* metadata first: an L2 table lying on other metadata is refused before
	 * its contents are taken for cluster addresses */
	r = validate_metadata(img, &meta, &nmeta);
	if (r < 0)
		return r;
	r = img->format == IMG_FMT_QCOW ? qcow1_walk(img, out) : qcow2_walk(img, out);
	if (r == 0)
		r = validate_runs(img, out, meta, nmeta);
	free(meta);
	return r;
}

/* Overlay: runs of layer img (depth d) with its UNALLOC runs filled from the
 * backing chain's map. */
int image_map_chain(struct image *top, struct run_list *out)
{
	struct run_list layer, below;
	size_t bi = 0;
	int r;

	run_list_init(&layer);
	run_list_init(&below);
	if (!top->backing && out->count == 0) {
		/* nothing to resolve below: walk straight into out (half the memory) */
		r = image_walk_layer(top, out);
		for (size_t i = 0; r == 0 && i < out->count; i++)
			out->runs[i].depth = (uint8_t)top->depth;
		return r;
	}
	r = image_walk_layer(top, &layer);
	if (r < 0)
		goto out;
	for (size_t i = 0; i < layer.count; i++)
		layer.runs[i].depth = (uint8_t)top->depth;
	if (top->backing) {
		r = image_map_chain(top->backing, &below);
		if (r < 0)
			goto out;
	}
	for (size_t i = 0; i < layer.count; i++) {
		struct run cur = layer.runs[i];
		uint64_t g, end, bsize;

		if (cur.kind != RUN_UNALLOC || !top->backing) {
			r = run_list_add(out, &cur);
			if (r < 0)
				goto out;
			continue;
		}
		g = cur.guest;
		end = cur.guest + cur.len;
		bsize = top->backing->map_size;
		/* below is sorted and covers [0, bsize): advance a cursor */
		while (bi < below.count && below.runs[bi].guest + below.runs[bi].len <= g)
			bi++;
		for (size_t k = bi; k < below.count && g < end && g < bsize; k++) {
			struct run b = below.runs[k];
			uint64_t s = MAX(g, b.guest), e = MIN(end, b.guest + b.len);

			if (s >= e)
				continue;
			if (b.kind == RUN_DATA || (b.flags & RUN_F_HOST))
				b.host += s - b.guest;
			b.guest = s;
			b.len = e - s;
			r = run_list_add(out, &b);
			if (r < 0)
				goto out;
			g = e;
		}
		if (g < end) {
			struct run past = { .guest = g, .len = end - g, .kind = RUN_UNALLOC,
					    .depth = (uint8_t)top->depth, .flags = RUN_F_PAST_BACKING };

			r = run_list_add(out, &past);
			if (r < 0)
				goto out;
		}
	}
out:
	run_list_free(&layer);
	run_list_free(&below);
	return r;
}
