/* The device-mapper stack of an image, as tables in memory (see dmtable.h).
 * Pure: no libdevmapper and no descriptors; the open path loads what this
 * builds, the `table` command prints it. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dmtable.h"
#include "keys.h"
#include "luks_uuid.h"
#include "log.h"
#include "util.h"

#define SECTOR_SIZE (1ULL << DM_SECTOR_SHIFT)

struct dm_stack_layer {
	const struct image *img;
	char *host_ref;		/* NULL when not given */
	char *cipher;
	char *key_desc;
	unsigned int key_size;
	uint32_t crypt_method;
	uint32_t crypt_dev;	/* index of its crypt device, or DM_DEV_NONE */
	uint64_t file_size;	/* bytes of its data file or device */
};

/* A table being built; targets merge as they are appended. */
struct table {
	struct dm_target *t;
	size_t count;
	size_t alloc;
	uint64_t sectors;
};

struct build {
	const struct dm_stack_params *p;
	struct dm_stack *s;
	const struct run_list *runs;
	size_t max_targets;
};

static char *str_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *str_printf(const char *fmt, ...)
{
	va_list ap;
	char *buf;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return NULL;
	buf = malloc((size_t)n + 1);
	if (!buf)
		return NULL;
	va_start(ap, fmt);
	vsnprintf(buf, (size_t)n + 1, fmt, ap);
	va_end(ap);
	return buf;
}

static void table_free(struct table *tb)
{
	free(tb->t);
	memset(tb, 0, sizeof(*tb));
}

static int table_reserve(struct table *tb, size_t n)
{
	struct dm_target *t;

	if (n <= tb->alloc)
		return 0;
	if (n > SIZE_MAX / sizeof(*t))
		return -ENOMEM;
	t = realloc(tb->t, n * sizeof(*t));
	if (!t)
		return -ENOMEM;
	tb->t = t;
	tb->alloc = n;
	return 0;
}

/* Whether a target may merge into last: both zero, or both map
 * contiguously onto the same device. */
static bool joins(const struct dm_target *last, enum dm_target_type type, uint32_t dev, uint64_t offset)
{
	return last->type == type && type != DM_TARGET_CRYPT && last->dev == dev &&
	       (type == DM_TARGET_ZERO || last->offset + last->len == offset);
}

/* Append a target, merging it into the last one when they join. */
static int table_add(struct table *tb, enum dm_target_type type, uint32_t dev,
		     uint64_t offset, uint64_t len)
{
	struct dm_target *last;
	int r;

	if (!len)
		return 0;
	if (tb->count) {
		last = &tb->t[tb->count - 1];
		if (joins(last, type, dev, offset)) {
			last->len += len;
			tb->sectors += len;
			return 0;
		}
	}
	if (tb->count == tb->alloc) {
		r = table_reserve(tb, tb->alloc ? tb->alloc * 2 : 64);
		if (r)
			return r;
	}
	tb->t[tb->count++] = (struct dm_target){
		.start = tb->sectors,
		.len = len,
		.offset = type == DM_TARGET_ZERO ? 0 : offset,
		.dev = type == DM_TARGET_ZERO ? DM_DEV_NONE : dev,
		.type = (uint8_t)type,
	};
	tb->sectors += len;
	return 0;
}

/* A word of a table: not empty, no whitespace or control characters. */
static bool is_table_word(const char *s)
{
	if (!s || !*s)
		return false;
	for (; *s; s++)
		if ((unsigned char)*s <= ' ' || *s == 0x7f)
			return false;
	return true;
}

static uint64_t layer_guest_size(const struct image *img)
{
	return img->map_size ? img->map_size : img->size;
}

/* Suffix of layer d's devices: "" for the image itself, "L<d>_" for backing layers. */
static void layer_prefix(unsigned int d, char *buf, size_t size)
{
	if (d)
		snprintf(buf, size, "L%u_", d);
	else
		buf[0] = '\0';
}

/* Add a device with table *tb (taken over, also on failure). suffix NULL:
 * the top device. */
static int add_device(struct build *b, const char *suffix, enum dm_device_role role,
		      int layer, unsigned int level, struct table *tb, uint32_t *index)
{
	const struct dm_stack_params *p = b->p;
	struct dm_stack *s = b->s;
	struct dm_device *d;
	size_t len;
	int r = -ENOMEM;

	if (s->count == s->alloc) {
		size_t n = s->alloc ? s->alloc * 2 : 8;

		d = realloc(s->devices, n * sizeof(*d));
		if (!d)
			goto out;
		s->devices = d;
		s->alloc = n;
	}
	if (s->count >= DM_DEV_HOST)
		goto out;
	d = &s->devices[s->count];
	memset(d, 0, sizeof(*d));

	len = strlen(p->name) + (suffix ? strlen(suffix) + 1 : 0);
	if (len > DM_NAME_MAX) {
		log_err("Device name %s%s%s is too long for device-mapper (%zu characters, at most %d); choose a shorter name.",
			p->name, suffix ? "_" : "", suffix ? suffix : "", len, DM_NAME_MAX);
		r = -ENAMETOOLONG;
		goto out;
	}
	if (suffix)
		len = strlen(DM_UUID_PREFIX_INTERNAL) + strlen(p->id) + 1 + strlen(p->name) + 1 + strlen(suffix);
	else
		len = strlen(DM_UUID_PREFIX) + strlen(p->id) + 1 + strlen(p->name);
	if (len > DM_UUID_MAX) {
		log_err("Device UUID for %s%s%s is too long for device-mapper (%zu characters, at most %d); choose a shorter name.",
			p->name, suffix ? "_" : "", suffix ? suffix : "", len, DM_UUID_MAX);
		r = -ENAMETOOLONG;
		goto out;
	}

	if (suffix) {
		d->name = str_printf("%s_%s", p->name, suffix);
		/* NAME is part of it: one image may be mapped read-only twice */
		d->uuid = str_printf("%s%s-%s_%s", DM_UUID_PREFIX_INTERNAL, p->id, p->name, suffix);
	} else {
		d->name = strdup(p->name);
		d->uuid = str_printf("%s%s-%s", DM_UUID_PREFIX, p->id, p->name);
	}
	d->ref = d->name ? str_printf("/dev/mapper/%s", d->name) : NULL;
	if (!d->name || !d->uuid || !d->ref) {
		free(d->name);
		free(d->uuid);
		free(d->ref);
		goto out;
	}
	d->role = role;
	d->layer = layer;
	d->level = level;
	d->read_only = p->read_only;
	d->hidden = suffix != NULL;
	d->sectors = tb->sectors;
	d->targets = tb->t;
	d->count = tb->count;
	memset(tb, 0, sizeof(*tb));
	*index = (uint32_t)s->count++;
	log_dbg("dm: %s: %zu targets, %" PRIu64 " sectors", d->name, d->count, d->sectors);
	return 0;
out:
	table_free(tb);
	return r;
}

/* Cut the targets of *tb at the sectors of h that fall inside one. */
static int cut_at(struct table *tb, const struct dm_split_level *h)
{
	struct table out = { 0 };
	size_t k = 0;
	int r;

	r = table_reserve(&out, tb->count + h->n);
	if (r)
		return r;
	for (size_t i = 0; i < tb->count; i++) {
		struct dm_target t = tb->t[i];

		while (k < h->n && h->start[k] <= t.start)
			k++;
		for (; k < h->n && h->start[k] < t.start + t.len; k++) {
			uint64_t head = h->start[k] - t.start;

			out.t[out.count] = t;
			out.t[out.count++].len = head;
			t.start += head;
			t.len -= head;
			if (t.type != DM_TARGET_ZERO)
				t.offset += head;
		}
		out.t[out.count++] = t;
	}
	out.sectors = tb->sectors;
	table_free(tb);
	*tb = out;
	return 0;
}

/* Where the pieces of tb begin: cut[0..*np) (target indices; cut[*np] is
 * tb->count). Balanced sizes; or with h (the split of a table before),
 * a piece begins where one of h began, a group larger than max is split
 * in balanced sizes, and a group is joined to the piece before when both
 * hold max/2 targets at most (so that pieces do not dwindle): the pieces
 * that keep their targets keep their tables. */
static int plan_pieces(const struct table *tb, size_t max, const struct dm_split_level *h, size_t **cut_out,
		       size_t *np_out)
{
	size_t n = tb->count, np = 0, *cut = malloc((n + 1) * sizeof(*cut));

	if (!cut)
		return -ENOMEM;
	for (size_t i = 1, k = 0, g0 = 0; h && max >= 4 && i <= n; i++) {
		size_t cnt, m;

		if (i < n) {
			while (k < h->n && h->start[k] < tb->t[i].start)
				k++;
			if (k == h->n || h->start[k] != tb->t[i].start)
				continue;
		}
		cnt = i - g0;
		m = (cnt + max - 1) / max;
		for (size_t j = 0; j < m; j++)
			if (j || m > 1 || !np || g0 - cut[np - 1] + cnt > max / 2)
				cut[np++] = g0 + j * cnt / m;
		g0 = i;
	}
	if (!np || np >= n) {
		/* (no split before, or one that would not make the table smaller) */
		np = (n + max - 1) / max;
		for (size_t k = 0; k < np; k++)
			cut[k] = k * n / np;
	}
	cut[np] = n;
	*cut_out = cut;
	*np_out = np;
	return 0;
}

/* Record where the pieces of the top table's split at level begin. */
static int record_split(struct dm_stack *s, unsigned int level, const struct table *tb, const size_t *cut,
			size_t np)
{
	struct dm_split_level *l;

	if (level > s->nsplit) {
		l = realloc(s->split, level * sizeof(*l));
		if (!l)
			return -ENOMEM;
		memset(&l[s->nsplit], 0, (level - s->nsplit) * sizeof(*l));
		s->split = l;
		s->nsplit = level;
	}
	l = &s->split[level - 1];
	free(l->start);
	l->start = malloc((np ? np : 1) * sizeof(*l->start));
	if (!l->start)
		return -ENOMEM;
	for (size_t k = 0; k < np; k++)
		l->start[k] = tb->t[cut[k]].start;
	l->n = np;
	return 0;
}

/* While *tb has more targets than a table may hold, move them into segment
 * devices (plan_pieces: where a split before had them, else of balanced
 * sizes) and make *tb a linear table over those (a segment of a single
 * target stays in *tb as it is). base: the suffix of the device *tb is
 * for ("" for the top device, whose split is kept in the stack). */
static int split_table(struct build *b, const char *base, enum dm_device_role role,
		       int layer, struct table *tb)
{
	const struct dm_stack *prev = *base ? NULL : b->p->prev;
	char suffix[DM_NAME_MAX + 64], sss[64];
	unsigned int level = 0;
	int r = 0;

	while (tb->count > b->max_targets) {
		const struct dm_split_level *h = prev && level < prev->nsplit ? &prev->split[level] : NULL;
		struct table parent = { 0 };
		size_t *cut = NULL, nseg = 0;

		level++;
		if (level >= sizeof(sss)) {
			r = -EINVAL;
			break;
		}
		memset(sss, 's', level);
		sss[level] = '\0';
		/* (the first level: the targets cut where pieces began) */
		if (h && level == 1 && b->max_targets >= 4)
			r = cut_at(tb, h);
		if (!r)
			r = plan_pieces(tb, b->max_targets, h, &cut, &nseg);
		if (!r && !*base)
			r = record_split(b->s, level, tb, cut, nseg);
		if (!r)
			r = table_reserve(&parent, nseg);
		for (size_t k = 0; !r && k < nseg; k++) {
			size_t first = cut[k], end = cut[k + 1];
			struct table seg = { 0 };
			uint64_t base_sector = tb->t[first].start;
			uint32_t index;

			if (end - first == 1) {
				/* a one-target table is that target: no device */
				const struct dm_target *t = &tb->t[first];

				r = table_add(&parent, (enum dm_target_type)t->type, t->dev, t->offset, t->len);
				continue;
			}
			r = table_reserve(&seg, end - first);
			if (r)
				break;
			for (size_t i = first; i < end; i++) {
				const struct dm_target *t = &tb->t[i];

				/* (targets cut where a piece began, now in one piece) */
				if (seg.count && joins(&seg.t[seg.count - 1], (enum dm_target_type)t->type, t->dev, t->offset)) {
					seg.t[seg.count - 1].len += t->len;
				} else {
					seg.t[seg.count] = *t;
					seg.t[seg.count++].start -= base_sector;
				}
				seg.sectors += t->len;
			}
			snprintf(suffix, sizeof(suffix), "%s%s%s%zu", base, *base ? "_" : "", sss, k);
			r = add_device(b, suffix, role, layer, level, &seg, &index);
			if (!r)
				r = table_add(&parent, DM_TARGET_LINEAR, index, 0, b->s->devices[index].sectors);
		}
		free(cut);
		table_free(tb);
		*tb = parent;
		if (r)
			break;
		log_verbose("dm: table of %s%s%s split into %zu segments (level %u)",
			    b->p->name, *base ? "_" : "", base, nseg, level);
	}
	return r;
}

/* Where data run r of layer l lies on the layer's device, in sectors:
 * [*host, *host + *mapped) is inside the device, the rest of the run lies
 * beyond the end of the file and reads as zeros (as QEMU pads short reads).
 * LUKS data beyond the crypt device cannot be mapped; neither can data in
 * the partial last sector of a file whose size is not a multiple of 512. */
static int data_run_in_file(const struct dm_stack_layer *l, unsigned int depth,
			    const struct run *r, bool note, uint64_t *host, uint64_t *mapped)
{
	uint64_t eof_floor = l->file_size & ~(SECTOR_SIZE - 1);
	uint64_t end;

	if (uadd64_overflow(r->host, r->len, &end)) {
		log_err("Layer %u (%s): data run at host offset %" PRIu64 " overflows.",
			depth, l->img->path ? l->img->path : "?", r->host);
		return -EUCLEAN;
	}
	*host = r->host >> DM_SECTOR_SHIFT;
	if (end <= eof_floor) {
		*mapped = r->len >> DM_SECTOR_SHIFT;
		return 0;
	}
	if (eof_floor != l->file_size && r->host < l->file_size) {
		log_err("Layer %u (%s): data at host offset %" PRIu64 " (+%" PRIu64 " bytes) reaches into the last, partial sector of its file (%" PRIu64 " bytes, not a multiple of 512), which a block device cannot show.",
			depth, l->img->path ? l->img->path : "?", r->host, r->len, l->file_size);
		return -EUCLEAN;
	}
	if (l->crypt_method == IMG_CRYPT_LUKS) {
		log_err("Layer %u (%s): data at host offset %" PRIu64 " (+%" PRIu64 " bytes) lies beyond the end of its file (%" PRIu64 " bytes); the image is truncated.",
			depth, l->img->path ? l->img->path : "?", r->host, r->len, l->file_size);
		return -EUCLEAN;
	}
	*mapped = r->host < eof_floor ? (eof_floor - r->host) >> DM_SECTOR_SHIFT : 0;
	if (note)
		log_verbose("Layer %u: data at host offset %" PRIu64 " extends beyond the end of its file; the rest reads as zeros.",
			    depth, r->host);
	return 0;
}

/* Check the runs once: they cover [0, size of top) in order, are aligned,
 * come from layers of the chain, and fit in their files and layers. */
static int check_runs(struct build *b, const struct image *top)
{
	const struct run_list *runs = b->runs;
	uint64_t pos = 0, compressed = 0, top_size = layer_guest_size(top);
	unsigned int nlayers = b->s->nlayers;

	for (size_t i = 0; i < runs->count; i++) {
		const struct run *r = &runs->runs[i];
		const struct dm_stack_layer *l;
		uint64_t end, host, mapped;
		int ret;

		if (r->guest != pos || !r->len || uadd64_overflow(r->guest, r->len, &end)) {
			log_err("Internal error: mapping runs are not contiguous at guest offset %" PRIu64 ".", pos);
			return -EINVAL;
		}
		pos = end;
		if (r->depth >= nlayers) {
			log_err("Internal error: run at guest offset %" PRIu64 " names layer %u of a chain of %u.",
				r->guest, r->depth, nlayers);
			return -EINVAL;
		}
		l = &b->s->layers[r->depth];
		if (r->kind == RUN_COMPRESSED) {
			compressed++;
			continue;
		}
		if (!is_aligned(r->guest, SECTOR_SIZE) || !is_aligned(r->len, SECTOR_SIZE) ||
		    (r->kind == RUN_DATA && !is_aligned(r->host, SECTOR_SIZE))) {
			log_err("Layer %u (%s): %s run at guest offset %" PRIu64 " (%" PRIu64 " bytes%s%" PRIu64 ") is not aligned to %llu bytes; device-mapper cannot map it.",
				r->depth, l->img->path ? l->img->path : "?", run_kind_name(r->kind),
				r->guest, r->len, r->kind == RUN_DATA ? ", host offset " : "",
				r->kind == RUN_DATA ? r->host : 0, SECTOR_SIZE);
			return -EUCLEAN;
		}
		if (r->kind != RUN_DATA)
			continue;
		if (r->depth && end > layer_guest_size(l->img)) {
			log_err("Layer %u (%s): data run at guest offset %" PRIu64 " ends beyond the layer's size (%" PRIu64 " bytes).",
				r->depth, l->img->path ? l->img->path : "?", r->guest, layer_guest_size(l->img));
			return -EUCLEAN;
		}
		if (!l->host_ref) {
			log_err("No host device given for layer %u, which provides data.", r->depth);
			return -EINVAL;
		}
		ret = data_run_in_file(l, r->depth, r, true, &host, &mapped);
		if (ret)
			return ret;
	}
	if (pos != top_size) {
		log_err("Internal error: mapping runs cover %" PRIu64 " bytes of an image of %" PRIu64 ".",
			pos, top_size);
		return -EINVAL;
	}
	if (compressed && !b->p->slow_dev) {
		log_err("The image has %" PRIu64 " compressed cluster%s; mapping them needs the slow-path daemon (or decompress with `qemu-img convert -O qcow2`).",
			compressed, compressed == 1 ? "" : "s");
		return -ENOTSUP;
	}
	return 0;
}

static int setup_layers(struct build *b, const struct image *top)
{
	const struct dm_stack_params *p = b->p;
	struct dm_stack *s = b->s;
	const struct image *img;
	unsigned int n = 0;
	char desc[DM_KEY_DESC_MAX + 1];
	int r;

	for (img = top; img; img = img->backing)
		if (++n > IMG_MAX_CHAIN_DEPTH + 1) {
			log_err("Backing chain too deep.");
			return -ELOOP;
		}
	if (n > p->nlayers || !p->layers) {
		log_err("Internal error: device parameters for %u layers, the chain has %u.", p->nlayers, n);
		return -EINVAL;
	}
	s->layers = calloc(n, sizeof(*s->layers));
	if (!s->layers)
		return -ENOMEM;
	s->nlayers = n;

	img = top;
	for (unsigned int d = 0; d < n; d++, img = img->backing) {
		const struct dm_layer_params *lp = &p->layers[d];
		struct dm_stack_layer *l = &s->layers[d];
		const char *cipher = lp->cipher, *key_desc = lp->key_desc;

		l->img = img;
		l->crypt_dev = DM_DEV_NONE;
		l->crypt_method = img->crypt_method;
		l->file_size = img->data_io.size;
		if (lp->host_dev) {
			if (!is_table_word(lp->host_dev) || strlen(lp->host_dev) > DM_REF_MAX) {
				log_err("Invalid host device reference for layer %u: %s", d, lp->host_dev);
				return -EINVAL;
			}
			l->host_ref = strdup(lp->host_dev);
			if (!l->host_ref)
				return -ENOMEM;
		}
		switch (img->crypt_method) {
		case IMG_CRYPT_NONE:
			continue;
		case IMG_CRYPT_AES:
			if (!cipher)
				cipher = LEGACY_AES_DM_CIPHER;
			l->key_size = lp->key_size ? lp->key_size : LEGACY_AES_KEY_SIZE;
			break;
		case IMG_CRYPT_LUKS:
			if (!cipher || !lp->key_size) {
				log_err("Layer %u (%s) is LUKS-encrypted but no cipher or key size was given.",
					d, img->path ? img->path : "?");
				return -EINVAL;
			}
			l->key_size = lp->key_size;
			break;
		default:
			log_err("Layer %u (%s): unknown encryption method %u.",
				d, img->path ? img->path : "?", img->crypt_method);
			return -ENOTSUP;
		}
		if (!is_table_word(cipher) || strlen(cipher) > DM_CIPHER_MAX || lp->key_size > 1024) {
			log_err("Invalid cipher specification for layer %u: %s (%u-byte key)", d, cipher, lp->key_size);
			return -EINVAL;
		}
		if (!key_desc) {
			r = dm_key_description(p->name, d, desc, sizeof(desc));
			if (r)
				return r;
			key_desc = desc;
		}
		if (!is_table_word(key_desc) || strlen(key_desc) > DM_KEY_DESC_MAX || !strchr(key_desc, ':')) {
			log_err("Invalid key description for layer %u: %s (logon keys need \"prefix:\")", d, key_desc);
			return -EINVAL;
		}
		if (!l->host_ref) {
			log_err("No host device given for encrypted layer %u.", d);
			return -EINVAL;
		}
		l->cipher = strdup(cipher);
		l->key_desc = strdup(key_desc);
		if (!l->cipher || !l->key_desc)
			return -ENOMEM;
	}
	return 0;
}

/* LUKS: one crypt target over the whole host device, IV = host sector. */
static int build_luks_layer(struct build *b, unsigned int d)
{
	struct dm_stack_layer *l = &b->s->layers[d];
	struct table tb = { 0 };
	char prefix[16], suffix[32];
	int r;

	if (!(l->file_size >> DM_SECTOR_SHIFT))
		return 0;	/* nothing in it; no run can refer to it */
	layer_prefix(d, prefix, sizeof(prefix));
	snprintf(suffix, sizeof(suffix), "%scrypt", prefix);
	r = table_add(&tb, DM_TARGET_CRYPT, DM_DEV_HOST | d, 0, l->file_size >> DM_SECTOR_SHIFT);
	if (r) {
		table_free(&tb);
		return r;
	}
	return add_device(b, suffix, DM_ROLE_CRYPT, (int)d, 0, &tb, &l->crypt_dev);
}

/* Legacy AES: guest space of the layer onto its ciphertext, then one crypt
 * target over that, IV = guest sector. Only the data of this layer that the
 * image shows needs mapping; the rest of the cipher device reads as zeros. */
static int build_legacy_layer(struct build *b, unsigned int d)
{
	struct dm_stack_layer *l = &b->s->layers[d];
	const struct run_list *runs = b->runs;
	uint64_t sectors = layer_guest_size(l->img) >> DM_SECTOR_SHIFT, pos = 0;
	struct table tb = { 0 };
	char prefix[16], base[32], suffix[32];
	uint32_t cipher_dev;
	int r = 0;

	if (!sectors)
		return 0;
	layer_prefix(d, prefix, sizeof(prefix));
	snprintf(base, sizeof(base), "%scipher", prefix);
	for (size_t i = 0; !r && i < runs->count; i++) {
		const struct run *run = &runs->runs[i];
		uint64_t guest = run->guest >> DM_SECTOR_SHIFT, len = run->len >> DM_SECTOR_SHIFT;
		uint64_t host, mapped;

		if (run->depth != d || run->kind != RUN_DATA)
			continue;
		r = data_run_in_file(l, d, run, false, &host, &mapped);
		if (!r)
			r = table_add(&tb, DM_TARGET_ZERO, DM_DEV_NONE, 0, guest - pos);
		if (!r)
			r = table_add(&tb, DM_TARGET_LINEAR, DM_DEV_HOST | d, host, mapped);
		if (!r)
			r = table_add(&tb, DM_TARGET_ZERO, DM_DEV_NONE, 0, len - mapped);
		pos = guest + len;
	}
	if (!r)
		r = table_add(&tb, DM_TARGET_ZERO, DM_DEV_NONE, 0, sectors - pos);
	if (!r)
		r = split_table(b, base, DM_ROLE_CIPHER_SEGMENT, (int)d, &tb);
	if (r) {
		table_free(&tb);
		return r;
	}
	r = add_device(b, base, DM_ROLE_CIPHER, (int)d, 0, &tb, &cipher_dev);
	if (r)
		return r;

	snprintf(suffix, sizeof(suffix), "%scrypt", prefix);
	r = table_add(&tb, DM_TARGET_CRYPT, cipher_dev, 0, sectors);
	if (r) {
		table_free(&tb);
		return r;
	}
	return add_device(b, suffix, DM_ROLE_CRYPT, (int)d, 0, &tb, &l->crypt_dev);
}

/* Read-write (with a slow path, which serves what the top table does not
 * map: backing runs, unallocated space): a read-only one-sector device
 * over each unencrypted layer's host device, so that a table holds its
 * loop device (and with it the file's locks) whatever the top maps, also
 * while no daemon runs (one died: a new one finds the files held).
 * Encrypted layers are held by their crypt devices. */
static int build_hold(struct build *b, unsigned int d)
{
	const struct dm_stack_layer *l = &b->s->layers[d];
	struct table tb = { 0 };
	char prefix[16], suffix[32];
	uint32_t index;
	int r;

	if (!b->p->slow_dev || b->p->read_only || l->crypt_method != IMG_CRYPT_NONE || !l->host_ref ||
	    !(l->file_size >> DM_SECTOR_SHIFT))
		return 0;
	layer_prefix(d, prefix, sizeof(prefix));
	snprintf(suffix, sizeof(suffix), "%shold", prefix);
	r = table_add(&tb, DM_TARGET_LINEAR, DM_DEV_HOST | d, 0, 1);
	if (r) {
		table_free(&tb);
		return r;
	}
	r = add_device(b, suffix, DM_ROLE_HOLD, (int)d, 0, &tb, &index);
	if (!r)
		b->s->devices[index].read_only = true;
	return r;
}

/* Read-write with a slow path: the switch's regions, none fast until a
 * run of the fast path sets theirs (mark_regions). */
static int regions_init(struct build *b, const struct image *top)
{
	struct dm_stack *s = b->s;
	uint64_t region = MAX(top->cluster_size, (uint64_t)DM_SWITCH_REGION_MIN) >> DM_SECTOR_SHIFT;
	uint64_t sectors = layer_guest_size(top) >> DM_SECTOR_SHIFT;

	/* (a huge image: larger regions, the tables stay at 2 MiB) */
	while (sectors / region > DM_SWITCH_REGIONS_MAX)
		region *= 2;

	s->region_sectors = region;
	s->nregions = (sectors + region - 1) / region;
	s->fast = calloc((size_t)((s->nregions + 7) / 8), 1);
	s->slow = calloc((size_t)((s->nregions + 7) / 8), 1);
	return s->fast && s->slow ? 0 : -ENOMEM;
}

/* Sectors [guest, guest + len) on the fast path: their regions go to the
 * fast device. A region part fast, part slow goes there too: its fast
 * clusters stay on the fast path for as long as the mapping lives (a
 * region all fast may never come: a copy-on-write or a LUKS allocation
 * makes one cluster at a time), and its slow requests pass the fast
 * device, whose swaps then wait for a quiet slow path. */
static void mark_regions(const struct dm_stack *s, uint8_t *bits, uint64_t guest, uint64_t len)
{
	if (!bits || !len)
		return;
	for (uint64_t i = guest / s->region_sectors; i <= (guest + len - 1) / s->region_sectors && i < s->nregions; i++)
		bits[i / 8] |= (uint8_t)(1u << (i % 8));
}

/* The top device over the fast device (index fast): a switch target over
 * every region but the last, which maps linearly onto the fast device.
 * dm-switch takes no flush (it asks for no flush bios: its device is write
 * through, so a flush or FUA sent to it would be dropped); the linear
 * target makes the top's table take flushes, and device-mapper sends each
 * flush to every target that takes it: through the fast device, whose
 * table names the crypt or loop devices and the slow path, to all of
 * them. (An image of one region: that linear target alone.) */
static int add_switch_top(struct build *b, uint32_t fast)
{
	struct table tb = { 0 };
	uint64_t sectors = b->s->devices[fast].sectors, tail = (b->s->nregions - 1) * b->s->region_sectors;
	uint32_t index;
	int r;

	r = table_reserve(&tb, 2);
	if (r)
		return r;
	if (tail)
		tb.t[tb.count++] = (struct dm_target){ .start = 0, .len = tail, .offset = b->s->region_sectors,
						       .dev = fast, .type = DM_TARGET_SWITCH };
	tb.t[tb.count++] = (struct dm_target){ .start = tail, .len = sectors - tail, .offset = tail, .dev = fast,
					       .type = DM_TARGET_LINEAR };
	tb.sectors = sectors;
	return add_device(b, NULL, DM_ROLE_TOP, -1, 0, &tb, &index);
}

/* The top table: guest space, every layer flattened into it (read-write
 * with a slow path: the fast device's, the top a switch over it). */
static int build_top(struct build *b, const struct image *top)
{
	const struct run_list *runs = b->runs;
	struct table tb = { 0 };
	uint32_t index;
	int r = 0;

	/* read-write: only the writable data of layer 0 bypasses the daemon */
	bool slow_rest = b->p->slow_dev && !b->p->read_only;

	if (slow_rest)
		r = regions_init(b, top);
	for (size_t i = 0; !r && i < runs->count; i++) {
		const struct run *run = &runs->runs[i];
		const struct dm_stack_layer *l = &b->s->layers[run->depth];
		uint64_t guest = run->guest >> DM_SECTOR_SHIFT, len = run->len >> DM_SECTOR_SHIFT;
		uint64_t host, mapped;

		if ((slow_rest && !(run->kind == RUN_DATA && run->depth == 0 && (run->flags & RUN_F_WRITABLE))) ||
		    (run->kind == RUN_COMPRESSED && b->p->slow_dev)) {
			r = table_add(&tb, DM_TARGET_LINEAR, DM_DEV_SLOW, guest, len);
			if (slow_rest)
				mark_regions(b->s, b->s->slow, guest, len);
			continue;
		}
		if (slow_rest)
			mark_regions(b->s, b->s->fast, guest, len);
		switch (run->kind) {
		case RUN_DATA:
			/* Read-write will send writes to clusters it cannot
			 * write in place (shared, backing) to the slow path. */
			if (l->crypt_method == IMG_CRYPT_AES) {
				r = table_add(&tb, DM_TARGET_LINEAR, l->crypt_dev, guest, len);
				break;
			}
			r = data_run_in_file(l, run->depth, run, false, &host, &mapped);
			if (r)
				break;
			if (l->crypt_method == IMG_CRYPT_LUKS)
				r = table_add(&tb, DM_TARGET_LINEAR, l->crypt_dev, host, mapped);
			else
				r = table_add(&tb, DM_TARGET_LINEAR, DM_DEV_HOST | run->depth, host, mapped);
			if (!r)
				r = table_add(&tb, DM_TARGET_ZERO, DM_DEV_NONE, 0, len - mapped);
			break;
		case RUN_ZERO:
		case RUN_UNALLOC:
			/* zero clusters, unallocated everywhere, or beyond the
			 * end of a backing image: zeros (the slow path when
			 * read-write) */
			r = table_add(&tb, DM_TARGET_ZERO, DM_DEV_NONE, 0, len);
			break;
		default:
			r = -ENOTSUP;	/* compressed: refused by check_runs() */
			break;
		}
	}
	if (!r)
		r = split_table(b, "", DM_ROLE_SEGMENT, -1, &tb);
	if (r) {
		table_free(&tb);
		return r;
	}
	if (!slow_rest)
		return add_device(b, NULL, DM_ROLE_TOP, -1, 0, &tb, &index);
	r = add_device(b, "fast", DM_ROLE_FAST, -1, 0, &tb, &index);
	return r ? r : add_switch_top(b, index);
}

static int check_name(const char *what, const char *s, size_t max)
{
	if (!is_table_word(s) || strchr(s, '/') || !strcmp(s, ".") || !strcmp(s, "..")) {
		log_err("Invalid %s \"%s\": it must not be empty or contain '/', spaces or control characters.",
			what, s ? s : "");
		return -EINVAL;
	}
	if (strlen(s) > max) {
		log_err("The %s %s is too long (at most %zu characters).", what, s, max);
		return -ENAMETOOLONG;
	}
	return 0;
}

int dm_stack_build(const struct dm_stack_params *p, const struct image *top,
		   const struct run_list *runs, struct dm_stack **out)
{
	struct build b = { .p = p, .runs = runs };
	int r;

	*out = NULL;
	r = check_name("device name", p->name, DM_NAME_MAX);
	if (!r)
		r = check_name("image identifier", p->id, DM_UUID_MAX);
	if (r)
		return r;
	b.max_targets = p->max_targets ? p->max_targets : DM_MAX_TARGETS_DEFAULT;
	if (b.max_targets < 2 || b.max_targets > DM_MAX_TARGETS_KERNEL) {
		log_err("The maximum number of targets per table must be from 2 to %d.", DM_MAX_TARGETS_KERNEL);
		return -EINVAL;
	}
	if (!layer_guest_size(top)) {
		log_err("The image has a size of 0 bytes; there is nothing to map.");
		return -EINVAL;
	}

	b.s = calloc(1, sizeof(*b.s));
	if (!b.s)
		return -ENOMEM;
	b.s->allow_discards = p->allow_discards;
	r = 0;
	if (p->slow_dev) {
		if (!is_table_word(p->slow_dev) || strlen(p->slow_dev) > DM_REF_MAX) {
			log_err("Invalid slow-path device reference: %s", p->slow_dev);
			r = -EINVAL;
		} else if (!(b.s->slow_ref = strdup(p->slow_dev))) {
			r = -ENOMEM;
		}
	}
	if (!r)
		r = setup_layers(&b, top);
	if (!r)
		r = check_runs(&b, top);
	/* bottom-up: the deepest layer's devices first */
	for (unsigned int d = b.s->nlayers; !r && d-- > 0;) {
		if (b.s->layers[d].crypt_method == IMG_CRYPT_LUKS)
			r = build_luks_layer(&b, d);
		else if (b.s->layers[d].crypt_method == IMG_CRYPT_AES)
			r = build_legacy_layer(&b, d);
		else
			r = build_hold(&b, d);
	}
	if (!r)
		r = build_top(&b, top);
	if (r) {
		dm_stack_free(b.s);
		return r;
	}
	*out = b.s;
	return 0;
}

void dm_stack_free(struct dm_stack *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < s->count; i++) {
		free(s->devices[i].name);
		free(s->devices[i].uuid);
		free(s->devices[i].ref);
		free(s->devices[i].targets);
	}
	free(s->devices);
	for (unsigned int d = 0; s->layers && d < s->nlayers; d++) {
		free(s->layers[d].host_ref);
		free(s->layers[d].cipher);
		free(s->layers[d].key_desc);
	}
	free(s->layers);
	for (unsigned int l = 0; l < s->nsplit; l++)
		free(s->split[l].start);
	free(s->split);
	free(s->slow_ref);
	free(s->fast);
	free(s->slow);
	free(s);
}

const struct dm_device *dm_stack_top(const struct dm_stack *s)
{
	return s->count ? &s->devices[s->count - 1] : NULL;
}

int dm_stack_set_ref(struct dm_stack *s, size_t i, const char *ref)
{
	char *copy;

	if (i >= s->count || !is_table_word(ref) || strlen(ref) > DM_REF_MAX)
		return -EINVAL;
	copy = strdup(ref);
	if (!copy)
		return -ENOMEM;
	free(s->devices[i].ref);
	s->devices[i].ref = copy;
	return 0;
}

const char *dm_target_type_name(enum dm_target_type type)
{
	switch (type) {
	case DM_TARGET_ZERO:
		return "zero";
	case DM_TARGET_LINEAR:
		return "linear";
	case DM_TARGET_CRYPT:
		return "crypt";
	case DM_TARGET_SWITCH:
		return "switch";
	}
	return "?";
}

static const char *target_dev_ref(const struct dm_stack *s, uint32_t dev)
{
	if (dev == DM_DEV_NONE)
		return NULL;
	if (dev == DM_DEV_SLOW)
		return s->slow_ref;
	if (dev & DM_DEV_HOST)
		return DM_DEV_HOST_LAYER(dev) < s->nlayers ? s->layers[DM_DEV_HOST_LAYER(dev)].host_ref : NULL;
	return dev < s->count ? s->devices[dev].ref : NULL;
}

int dm_target_params(const struct dm_stack *s, const struct dm_device *dev,
		     const struct dm_target *t, char *buf, size_t size)
{
	const struct dm_stack_layer *l;
	const char *ref = target_dev_ref(s, t->dev);
	int n;

	switch (t->type) {
	case DM_TARGET_ZERO:
		n = snprintf(buf, size, "%s", "");
		break;
	case DM_TARGET_LINEAR:
		if (!ref)
			return -EINVAL;
		n = snprintf(buf, size, "%s %" PRIu64, ref, t->offset);
		break;
	case DM_TARGET_CRYPT:
		if (!ref || dev->layer < 0 || (unsigned int)dev->layer >= s->nlayers)
			return -EINVAL;
		l = &s->layers[dev->layer];
		n = snprintf(buf, size, "%s :%u:logon:%s 0 %s %" PRIu64 "%s",
			     l->cipher, l->key_size, l->key_desc, ref, t->offset,
			     s->allow_discards ? " 1 allow_discards" : "");
		break;
	case DM_TARGET_SWITCH:
		/* two paths, no optional arguments */
		if (!ref || !s->slow_ref)
			return -EINVAL;
		n = snprintf(buf, size, "2 %" PRIu64 " 0 %s 0 %s 0", t->offset, ref, s->slow_ref);
		break;
	default:
		return -EINVAL;
	}
	if (n < 0 || (size_t)n >= size)
		return -ENOSPC;
	return n;
}

/* The path region i goes to in a route (0 fast, 1 slow), -1: not routed */
static int region_route(const struct dm_stack *s, const struct dm_stack *cur, enum dm_route route, uint64_t i)
{
	bool fast = dm_stack_region_fast(s, i);

	switch (route) {
	case DM_ROUTE_ALL:
		return fast ? 0 : 1;
	case DM_ROUTE_TO_SLOW:
		return !fast && dm_stack_region_fast(cur, i) ? 1 : -1;
	case DM_ROUTE_TO_FAST:
		return fast && !dm_stack_region_fast(cur, i) ? 0 : -1;
	case DM_ROUTE_PART_TO_SLOW:
		return dm_stack_region_part(s, i) ? 1 : -1;
	case DM_ROUTE_BACK_TO_FAST:
		return fast && (!dm_stack_region_fast(cur, i) || dm_stack_region_part(cur, i)) ? 0 : -1;
	}
	return -1;
}

int dm_switch_message(const struct dm_stack *s, const struct dm_stack *cur, enum dm_route route, uint64_t *pos,
		      char *buf, size_t size)
{
	uint64_t n = s->nregions - 1, last = 0, i = *pos;	/* (the last region is not the switch's) */
	bool any = false;
	size_t len;

	if (!s->region_sectors || !s->nregions || size < 128 ||
	    (route != DM_ROUTE_ALL && route != DM_ROUTE_PART_TO_SLOW &&
	     (!cur || cur->region_sectors != s->region_sectors)))
		return -EINVAL;
	len = (size_t)snprintf(buf, size, "set_region_mappings");
	while (i < n && len + 64 < size) {
		int path = region_route(s, cur, route, i);
		uint64_t j;

		if (path < 0) {
			i++;
			continue;
		}
		for (j = i + 1; j < n && region_route(s, cur, route, j) == path; j++)
			;
		/* (":" alone: the region after the last one) */
		if (any && i == last + 1)
			len += (size_t)snprintf(buf + len, size - len, " :%d", path);
		else
			len += (size_t)snprintf(buf + len, size - len, " %" PRIx64 ":%d", i, path);
		if (j - i > 1)
			len += (size_t)snprintf(buf + len, size - len, " R1,%" PRIx64, j - i - 1);
		last = j - 1;
		any = true;
		i = j;
	}
	*pos = i;
	return any ? (int)len : 0;
}

int dm_stack_format(const struct dm_stack *s, FILE *f)
{
	char params[DM_PARAMS_MAX];
	int r;

	for (size_t i = 0; i < s->count; i++) {
		const struct dm_device *d = &s->devices[i];

		fprintf(f, "# %s uuid=%s%s%s\n", d->name, d->uuid,
			d->hidden ? " hidden" : "", d->read_only ? " ro" : "");
		for (size_t j = 0; j < d->count; j++) {
			const struct dm_target *t = &d->targets[j];

			r = dm_target_params(s, d, t, params, sizeof(params));
			if (r < 0)
				return r;
			/* dmsetup prints a space after the type even when
			 * there are no params ("0 8 zero ") */
			fprintf(f, "%" PRIu64 " %" PRIu64 " %s %s\n", t->start, t->len,
				dm_target_type_name(t->type), params);
		}
	}
	if (fflush(f) || ferror(f))
		return -EIO;
	return 0;
}

int dm_image_id(const char *luks_uuid, const char *canonical_path, char *buf, size_t size)
{
	uint64_t h = 0xcbf29ce484222325ULL;	/* FNV-1a 64 */
	int n;

	/* the LUKS UUID comes from the image: only a real UUID is used */
	if (luks_uuid_valid(luks_uuid)) {
		n = snprintf(buf, size, "%s", luks_uuid);
	} else {
		if (!canonical_path)
			return -EINVAL;
		for (const unsigned char *c = (const unsigned char *)canonical_path; *c; c++) {
			h ^= *c;
			h *= 0x100000001b3ULL;
		}
		n = snprintf(buf, size, "%016" PRIx64, h);
	}
	if (n < 0 || (size_t)n >= size)
		return -ENOSPC;
	return 0;
}

int dm_key_description(const char *name, unsigned int depth, char *buf, size_t size)
{
	int n = snprintf(buf, size, "qcowsetup:%s:L%u", name, depth);

	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	return 0;
}

static int stack_target_at(void *opaque, size_t i, struct dm_table_target *t, char *buf, size_t size)
{
	const struct dm_stack_table_iter *it = opaque;
	const struct dm_target *dt = &it->dev->targets[i];
	int n = dm_target_params(it->s, it->dev, dt, buf, size);

	if (n < 0)
		return n;
	t->start = dt->start;
	t->length = dt->len;
	t->type = dm_target_type_name(dt->type);
	t->params = buf;
	return 0;
}

void dm_stack_table(const struct dm_stack *s, const struct dm_device *dev, struct dm_stack_table_iter *it,
		    struct dm_table *t)
{
	*it = (struct dm_stack_table_iter){ .s = s, .dev = dev };
	*t = (struct dm_table){ .count = dev->count, .target_fn = stack_target_at, .opaque = it };
}

int dm_top_uuid(const char *id, const char *name, char *buf, size_t size)
{
	int n = snprintf(buf, size, "%s%s-%s", DM_UUID_PREFIX, id, name);

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

bool dm_uuid_is_top(const char *uuid)
{
	return uuid && !strncmp(uuid, DM_UUID_PREFIX, strlen(DM_UUID_PREFIX)) &&
	       strncmp(uuid, DM_UUID_PREFIX_INTERNAL, strlen(DM_UUID_PREFIX_INTERNAL));
}

bool dm_uuid_is_internal_of(const char *uuid, const char *top_uuid)
{
	const char *id_name;
	size_t len;

	if (!uuid || !dm_uuid_is_top(top_uuid) || strncmp(uuid, DM_UUID_PREFIX_INTERNAL, strlen(DM_UUID_PREFIX_INTERNAL)))
		return false;
	id_name = top_uuid + strlen(DM_UUID_PREFIX);
	len = strlen(id_name);
	uuid += strlen(DM_UUID_PREFIX_INTERNAL);
	return !strncmp(uuid, id_name, len) && uuid[len] == '_';
}

bool dm_mapping_name_valid(const char *name)
{
	size_t len = strlen(name);

	if (!len || len > DM_MAPPING_NAME_MAX || !strcmp(name, ".") || !strcmp(name, ".."))
		return false;
	for (const char *p = name; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
		      *p == '-' || *p == '_' || *p == '.' || *p == '+'))
			return false;
	return true;
}

bool dm_segment_generation(const char *dev, const char *name, uint32_t *gen)
{
	size_t n = strlen(name);
	uint64_t g = 0;
	const char *p;

	if (strncmp(dev, name, n) || dev[n] != '_' || dev[n + 1] != 's')
		return false;
	for (p = dev + n + 1; *p == 's'; p++)
		;
	if (*p < '0' || *p > '9')
		return false;
	while (*p >= '0' && *p <= '9')
		p++;
	if (*p) {
		if (p[0] != '_' || p[1] != 'g' || p[2] < '0' || p[2] > '9')
			return false;
		for (p += 2; *p >= '0' && *p <= '9'; p++)
			g = MIN(g * 10 + (uint64_t)(*p - '0'), (uint64_t)UINT32_MAX);
		if (*p)
			return false;
	}
	if (gen)
		*gen = (uint32_t)g;
	return true;
}

bool dm_is_segment_name(const char *dev, const char *name)
{
	return dm_segment_generation(dev, name, NULL);
}

bool dm_is_daemon_device_name(const char *dev, const char *name)
{
	size_t n = strlen(name);

	return dm_is_segment_name(dev, name) || (!strncmp(dev, name, n) && !strcmp(dev + n, "_fast"));
}

bool dm_same_table(const struct dm_stack *s, const struct dm_device *a, const struct dm_stack *cur,
		   const struct dm_device *b)
{
	char pa[DM_PARAMS_MAX], pb[DM_PARAMS_MAX];

	if (a->count != b->count || a->sectors != b->sectors)
		return false;
	for (size_t i = 0; i < a->count; i++) {
		const struct dm_target *x = &a->targets[i], *y = &b->targets[i];
		bool in_x = x->dev < DM_DEV_SLOW && x->dev < s->count, in_y = y->dev < DM_DEV_SLOW && y->dev < cur->count;

		if (x->start != y->start || x->len != y->len || x->type != y->type || x->offset != y->offset ||
		    in_x != in_y)
			return false;
		if (in_x) {
			if (strcmp(s->devices[x->dev].name, cur->devices[y->dev].name))
				return false;
			/* (a switch names the slow path too) */
			if (x->type == DM_TARGET_SWITCH &&
			    (!s->slow_ref || !cur->slow_ref || strcmp(s->slow_ref, cur->slow_ref)))
				return false;
		} else if (dm_target_params(s, a, x, pa, sizeof(pa)) < 0 ||
			   dm_target_params(cur, b, y, pb, sizeof(pb)) < 0 || strcmp(pa, pb)) {
			return false;
		}
	}
	return true;
}

static int rename_segment(const struct dm_stack_params *p, struct dm_device *d, const char *name, uint32_t gen)
{
	char *n = gen ? str_printf("%s_g%" PRIu32, name, gen) : strdup(name);
	char *uuid = n ? str_printf("%s%s-%s", DM_UUID_PREFIX_INTERNAL, p->id, n) : NULL;
	char *ref = n ? str_printf("/dev/mapper/%s", n) : NULL;
	int r = 0;

	if (!n || !uuid || !ref) {
		r = -ENOMEM;
	} else if (strlen(n) > DM_NAME_MAX || strlen(uuid) > DM_UUID_MAX) {
		log_err("Device name %s or its UUID is too long for device-mapper (at most %d and %d characters); choose a shorter name.",
			n, DM_NAME_MAX, DM_UUID_MAX);
		r = -ENAMETOOLONG;
	}
	if (r) {
		free(n);
		free(uuid);
		free(ref);
		return r;
	}
	free(d->name);
	free(d->uuid);
	free(d->ref);
	d->name = n;
	d->uuid = uuid;
	d->ref = ref;
	return 0;
}

int dm_stack_name_segments(const struct dm_stack_params *p, struct dm_stack *s, const struct dm_stack *cur,
			   uint32_t gen)
{
	bool *taken = cur ? calloc(cur->count ? cur->count : 1, sizeof(*taken)) : NULL;
	int r = cur && !taken ? -ENOMEM : 0;

	/* creation order: a segment's children have their names before it */
	for (size_t i = 0; i < s->count && !r; i++) {
		struct dm_device *d = &s->devices[i];
		size_t j = cur ? cur->count : 0;

		if (d->role != DM_ROLE_SEGMENT)
			continue;
		for (size_t k = 0; k < j; k++) {
			const struct dm_device *c = &cur->devices[k];

			if (!taken[k] && c->role == DM_ROLE_SEGMENT && c->level == d->level && dm_same_table(s, d, cur, c))
				j = k;
		}
		if (cur && j < cur->count) {
			taken[j] = true;
			r = rename_segment(p, d, cur->devices[j].name, 0);
		} else if (gen) {
			r = rename_segment(p, d, d->name, gen);
		}
	}
	free(taken);
	return r;
}
