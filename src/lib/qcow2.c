/* qcow2 v2/v3: header, extensions, snapshots, bitmaps, L1/L2 walk, refcounts.
 * Every field read from the image is checked before use. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "log.h"
#include "qcow2.h"
#include "util.h"


bool image_range_in_file(const struct img_io *io, uint64_t off, uint64_t len)
{
	uint64_t end;

	return !uadd64_overflow(off, len, &end) && end <= io->size;
}

int qcow2_read_table(const struct image *img, uint64_t off, uint64_t n, uint64_t max_bytes,
		     const char *what, uint64_t **table)
{
	uint64_t bytes;
	uint64_t *t;
	int r;

	*table = NULL;
	if (umul64_overflow(n, 8, &bytes) || bytes > max_bytes) {
		log_err("%s: %s of %" PRIu64 " entries is too large (max %" PRIu64 " bytes).",
			img->path, what, n, max_bytes);
		return -EUCLEAN;
	}
	if (!n)
		return 0;
	if (!image_range_in_file(&img->io, off, bytes)) {
		log_err("%s: %s at offset 0x%" PRIx64 " (%" PRIu64 " bytes) lies beyond the end of the file (size %" PRIu64 ").",
			img->path, what, off, bytes, img->io.size);
		return -EUCLEAN;
	}
	t = malloc(bytes);
	if (!t)
		return -ENOMEM;
	r = img_pread(&img->io, t, bytes, off);
	if (r < 0) {
		log_err("%s: cannot read %s at offset 0x%" PRIx64 ": %s.", img->path, what, off, strerror(-r));
		free(t);
		return r;
	}
	for (uint64_t i = 0; i < n; i++)
		t[i] = get_be64(&t[i]);
	*table = t;
	return 0;
}

static int check_table_offset(const struct image *img, uint64_t off, uint64_t entries,
			      uint64_t entry_size, const char *what)
{
	uint64_t bytes, end;

	if (!is_aligned(off, img->cluster_size)) {
		log_err("%s: %s offset 0x%" PRIx64 " is not aligned to the cluster size (%" PRIu64 ").",
			img->path, what, off, img->cluster_size);
		return -EUCLEAN;
	}
	if (umul64_overflow(entries, entry_size, &bytes) || uadd64_overflow(off, bytes, &end) ||
	    end > INT64_MAX) {
		log_err("%s: %s at 0x%" PRIx64 " with %" PRIu64 " entries overflows.", img->path, what, off, entries);
		return -EUCLEAN;
	}
	if (entries && (off == 0 || end > img->io.size)) {
		log_err("%s: %s at offset 0x%" PRIx64 " (%" PRIu64 " bytes) lies %s (file size %" PRIu64 ").",
			img->path, what, off, bytes, off == 0 ? "over the header" : "beyond the end of the file",
			img->io.size);
		return -EUCLEAN;
	}
	return 0;
}

static char *dup_field(const uint8_t *p, size_t len)
{
	char *s = malloc(len + 1);

	if (s) {
		memcpy(s, p, len);
		s[len] = '\0';
	}
	return s;
}

/* Room for n entries in an array grown by doubling: the extension area can
 * hold ~37,000 feature name tables of one entry each, ~262,000 extensions. */
static size_t grown_capacity(size_t n)
{
	size_t c = 8;

	while (c < n)
		c *= 2;
	return c;
}

static int add_feature_names(struct image *img, const uint8_t *p, uint32_t len)
{
	unsigned int n = len / 48, have = img->nb_feature_names;
	struct qcow2_feature_name *f;

	if (len % 48) {
		log_err("%s: feature name table extension length %u is not a multiple of 48.", img->path, len);
		return -EUCLEAN;
	}
	if (!n)
		return 0;
	/* at most cluster size / 48 entries in all: no overflow */
	if (!img->feature_names || grown_capacity(have + n) != grown_capacity(have)) {
		f = realloc(img->feature_names, grown_capacity(have + n) * sizeof(*f));
		if (!f)
			return -ENOMEM;
		img->feature_names = f;
	}
	f = img->feature_names;
	for (unsigned int i = 0; i < n; i++) {
		struct qcow2_feature_name *e = &f[have + i];

		e->type = p[i * 48];
		e->bit = p[i * 48 + 1];
		memcpy(e->name, p + i * 48 + 2, 46);
		e->name[46] = '\0';
	}
	img->nb_feature_names += n;
	return 0;
}

/* Unknown extensions are counted; the first QCOW2_MAX_UNKNOWN_EXTENSIONS
 * types are kept for `info` (a header cluster of 2 MiB holds 262,000 empty
 * extensions). */
static int add_unknown_extension(struct image *img, uint32_t type)
{
	uint32_t n = img->nb_unknown_extensions;
	char **v = img->unknown_extensions;

	img->nb_unknown_extensions++;
	if (n >= QCOW2_MAX_UNKNOWN_EXTENSIONS) {
		if (n == QCOW2_MAX_UNKNOWN_EXTENSIONS)
			log_verbose("%s: more than %u unknown header extensions: only the first ones are listed.",
				    img->path, QCOW2_MAX_UNKNOWN_EXTENSIONS);
		return 0;
	}
	if (!v) {
		v = calloc(QCOW2_MAX_UNKNOWN_EXTENSIONS + 1, sizeof(*v));
		if (!v)
			return -ENOMEM;
		img->unknown_extensions = v;
	}
	v[n] = malloc(11);
	if (!v[n])
		return -ENOMEM;
	snprintf(v[n], 11, "0x%08x", type);
	return 0;
}

/* A bindings extension that does not parse is ignored (the image still
 * opens with a passphrase), and said so; a second one is malformed too. */
static int read_bindings(struct image *img, const uint8_t *d, uint32_t len)
{
	struct binding_set *s;
	int r;

	if (img->bindings || img->bindings_invalid) {
		log_std("%s: more than one bindings extension: bindings ignored.", img->path);
		if (img->bindings)
			binding_set_free(img->bindings);
		free(img->bindings);
		img->bindings = NULL;
		img->bindings_invalid = true;
		return 0;
	}
	s = malloc(sizeof(*s));
	if (!s)
		return -ENOMEM;
	r = binding_parse(d, len, s);
	if (r == -ENOMEM) {
		free(s);
		return r;
	}
	if (r < 0) {
		log_std("%s: the bindings extension is malformed: bindings ignored.", img->path);
		free(s);
		img->bindings_invalid = true;
		return 0;
	}
	img->bindings = s;
	return 0;
}

static int read_extensions(struct image *img, const uint8_t *hdr, uint64_t start, uint64_t end)
{
	uint64_t off = start;
	int r;

	while (off < end) {
		uint32_t type, len;
		uint64_t data_end;
		const uint8_t *d;

		if (end - off < 8) {
			log_err("%s: header extension at offset 0x%" PRIx64 " is truncated.", img->path, off);
			return -EUCLEAN;
		}
		type = get_be32(hdr + off);
		len = get_be32(hdr + off + 4);
		if (type == QCOW2_EXT_END)
			return 0;
		data_end = off + 8 + round_up_pow2(len, 8);
		if (len > end - off - 8 || data_end > end) {
			log_err("%s: header extension 0x%08x at offset 0x%" PRIx64 " has length %u, beyond the end of the header area (0x%" PRIx64 ").",
				img->path, type, off, len, end);
			return -EUCLEAN;
		}
		d = hdr + off + 8;
		switch (type) {
		case QCOW2_EXT_BACKING_FORMAT:
			if (len == 0 || len > 15) {
				log_err("%s: backing format extension has invalid length %u.", img->path, len);
				return -EUCLEAN;
			}
			free(img->backing_format);
			img->backing_format = dup_field(d, len);
			if (!img->backing_format)
				return -ENOMEM;
			if (strlen(img->backing_format) != len) {
				log_err("%s: backing format name contains a NUL byte.", img->path);
				return -EUCLEAN;
			}
			break;
		case QCOW2_EXT_FEATURE_TABLE:
			r = add_feature_names(img, d, len);
			if (r < 0)
				return r;
			break;
		case QCOW2_EXT_CRYPT_HEADER:
			if (len != 16) {
				log_err("%s: encryption header extension has length %u, expected 16.", img->path, len);
				return -EUCLEAN;
			}
			img->crypt_header_offset = get_be64(d);
			img->crypt_header_length = get_be64(d + 8);
			break;
		case QCOW2_EXT_BITMAPS:
			if (len != 24) {
				log_err("%s: bitmaps extension has length %u, expected 24.", img->path, len);
				return -EUCLEAN;
			}
			if (!(img->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
				log_verbose("%s: ignoring a stale bitmaps extension (autoclear bit not set).", img->path);
				break;
			}
			img->nb_bitmaps = get_be32(d);
			img->bitmap_directory_size = get_be64(d + 8);
			img->bitmap_directory_offset = get_be64(d + 16);
			break;
		case QCOW2_EXT_DATA_FILE:
			free(img->data_file);
			img->data_file = dup_field(d, len);
			if (!img->data_file)
				return -ENOMEM;
			if (strlen(img->data_file) != len || !len) {
				log_err("%s: external data file name is empty or contains a NUL byte.", img->path);
				return -EUCLEAN;
			}
			break;
		case QCOW2_EXT_BINDINGS:
			r = read_bindings(img, d, len);
			if (r < 0)
				return r;
			break;
		default:
			r = add_unknown_extension(img, type);
			if (r < 0)
				return r;
			break;
		}
		off = data_end;
	}
	return 0;
}

const char *image_feature_name(const struct image *img, int type, unsigned int bit, char *buf, size_t buflen)
{
	static const char *const known[3][8] = {
		{ "dirty bit", "corrupt bit", "external data file", "compression type", "extended L2 entries" },
		{ "lazy refcounts" },
		{ "bitmaps extension", "raw external data" },
	};

	for (unsigned int i = 0; i < img->nb_feature_names; i++)
		if (img->feature_names[i].type == type && img->feature_names[i].bit == bit &&
		    img->feature_names[i].name[0]) {
			snprintf(buf, buflen, "%s", img->feature_names[i].name);
			return buf;
		}
	if (type >= 0 && type < 3 && bit < 8 && known[type][bit])
		snprintf(buf, buflen, "%s", known[type][bit]);
	else
		snprintf(buf, buflen, "unknown %s feature bit %u",
			 type == 0 ? "incompatible" : type == 1 ? "compatible" : "autoclear", bit);
	return buf;
}

static int check_incompatible_features(struct image *img)
{
	uint64_t unknown = img->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
	char names[512] = "", buf[64];

	if (!unknown)
		return 0;
	for (unsigned int bit = 0; bit < 64; bit++) {
		if (!(unknown & (1ULL << bit)))
			continue;
		if (names[0])
			strncat(names, ", ", sizeof(names) - strlen(names) - 1);
		strncat(names, image_feature_name(img, 0, bit, buf, sizeof(buf)), sizeof(names) - strlen(names) - 1);
	}
	log_err("%s: unsupported qcow2 feature(s): %s.", img->path, names);
	return -ENOTSUP;
}

static int read_snapshots(struct image *img)
{
	uint8_t *tbl = NULL;
	uint64_t pos = 0, avail;
	int r = 0;

	if (!img->nb_snapshots)
		return 0;
	if (img->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
		log_err("%s: %u snapshots exceed the limit of %u.", img->path, img->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
		return -EUCLEAN;
	}
	r = check_table_offset(img, img->snapshots_offset, 1, 40, "snapshot table");
	if (r < 0)
		return r;
	avail = MIN(img->io.size - img->snapshots_offset, (uint64_t)QCOW2_MAX_SNAPSHOT_TABLE_BYTES);
	tbl = malloc(avail);
	img->snapshots = calloc(img->nb_snapshots, sizeof(*img->snapshots));
	if (!tbl || !img->snapshots) {
		r = -ENOMEM;
		goto out;
	}
	r = img_pread(&img->io, tbl, avail, img->snapshots_offset);
	if (r < 0)
		goto out;
	for (uint32_t i = 0; i < img->nb_snapshots; i++) {
		struct qcow2_snapshot *sn = &img->snapshots[i];
		uint32_t extra, id_len, name_len;
		const uint8_t *e;
		uint64_t need;

		pos = round_up_pow2(pos, 8);
		if (pos + 40 > avail) {
			r = -EUCLEAN;
			goto trunc;
		}
		e = tbl + pos;
		sn->l1_table_offset = get_be64(e);
		sn->l1_size = get_be32(e + 8);
		id_len = get_be16(e + 12);
		name_len = get_be16(e + 14);
		sn->date_sec = get_be32(e + 16);
		sn->date_nsec = get_be32(e + 20);
		sn->vm_clock_nsec = get_be64(e + 24);
		sn->vm_state_size = get_be32(e + 32);
		extra = get_be32(e + 36);
		need = 40 + (uint64_t)extra + id_len + name_len;
		if (extra > 1024 || pos + need > avail) {
			r = -EUCLEAN;
			goto trunc;
		}
		sn->disk_size = img->size;
		sn->icount = UINT64_MAX;
		if (extra >= 8)
			sn->vm_state_size = get_be64(e + 40);
		if (extra >= 16)
			sn->disk_size = get_be64(e + 48);
		if (extra >= 24) {
			sn->icount = get_be64(e + 56);
			sn->has_icount = sn->icount != UINT64_MAX;
		}
		sn->id = dup_field(e + 40 + extra, id_len);
		sn->name = dup_field(e + 40 + extra + id_len, name_len);
		if (!sn->id || !sn->name) {
			r = -ENOMEM;
			goto out;
		}
		if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
			log_err("%s: snapshot %s has an L1 table of %u entries (too large).", img->path, sn->id, sn->l1_size);
			r = -EUCLEAN;
			goto out;
		}
		r = check_table_offset(img, sn->l1_table_offset, sn->l1_size, 8, "snapshot L1 table");
		if (r < 0)
			goto out;
		pos += need;
	}
	/* as QEMU: no padding after the last entry (it may end the file) */
	img->snapshots_size = pos;
	r = 0;
	goto out;
trunc:
	log_err("%s: snapshot table at offset 0x%" PRIx64 " is truncated or too large (entry at byte %" PRIu64 ").",
		img->path, img->snapshots_offset, pos);
out:
	free(tbl);
	return r;
}

static int read_bitmaps(struct image *img)
{
	uint8_t *dir = NULL;
	uint64_t pos = 0;
	int r;

	if (!img->nb_bitmaps)
		return 0;
	if (img->nb_bitmaps > QCOW2_MAX_BITMAPS || img->bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_BYTES ||
	    img->bitmap_directory_size < 24) {
		log_err("%s: bitmap directory (%u bitmaps, %" PRIu64 " bytes) is invalid.", img->path,
			img->nb_bitmaps, img->bitmap_directory_size);
		return -EUCLEAN;
	}
	r = check_table_offset(img, img->bitmap_directory_offset, img->bitmap_directory_size, 1, "bitmap directory");
	if (r < 0)
		return r;
	dir = malloc(img->bitmap_directory_size);
	img->bitmaps = calloc(img->nb_bitmaps, sizeof(*img->bitmaps));
	if (!dir || !img->bitmaps) {
		r = -ENOMEM;
		goto out;
	}
	r = img_pread(&img->io, dir, img->bitmap_directory_size, img->bitmap_directory_offset);
	if (r < 0)
		goto out;
	for (uint32_t i = 0; i < img->nb_bitmaps; i++) {
		struct qcow2_bitmap *bm = &img->bitmaps[i];
		uint32_t name_len, extra;
		uint64_t need;

		if (pos + 24 > img->bitmap_directory_size)
			goto bad;
		bm->table_offset = get_be64(dir + pos);
		bm->table_size = get_be32(dir + pos + 8);
		bm->flags = get_be32(dir + pos + 12);
		bm->granularity_bits = dir[pos + 17];
		name_len = get_be16(dir + pos + 18);
		extra = get_be32(dir + pos + 20);
		need = 24 + (uint64_t)extra + name_len;
		if (pos + need > img->bitmap_directory_size || extra > 1024)
			goto bad;
		bm->name = dup_field(dir + pos + 24 + extra, name_len);
		if (!bm->name) {
			r = -ENOMEM;
			goto out;
		}
		r = check_table_offset(img, bm->table_offset, bm->table_size, 8, "bitmap table");
		if (r < 0)
			goto out;
		pos = round_up_pow2(pos + need, 8);
	}
	r = 0;
	goto out;
bad:
	log_err("%s: bitmap directory at offset 0x%" PRIx64 " is truncated at byte %" PRIu64 ".", img->path,
		img->bitmap_directory_offset, pos);
	r = -EUCLEAN;
out:
	free(dir);
	return r;
}

static int check_crypt_header(struct image *img)
{
	if (img->crypt_method > IMG_CRYPT_LUKS) {
		log_err("%s: unsupported encryption method %u.", img->path, img->crypt_method);
		return -ENOTSUP;
	}
	if (img->crypt_method != IMG_CRYPT_LUKS) {
		if (img->crypt_header_offset || img->crypt_header_length) {
			log_err("%s: encryption header extension present but the image is not LUKS-encrypted.", img->path);
			return -EUCLEAN;
		}
		return 0;
	}
	if (!img->crypt_header_length) {
		log_err("%s: LUKS-encrypted image without an encryption header extension.", img->path);
		return -EUCLEAN;
	}
	if (img->crypt_header_length < 592) {
		log_err("%s: LUKS header at offset 0x%" PRIx64 " (%" PRIu64 " bytes) is too small for a LUKS1 header.",
			img->path, img->crypt_header_offset, img->crypt_header_length);
		return -EUCLEAN;
	}
	if (!is_aligned(img->crypt_header_offset, img->cluster_size) || img->crypt_header_offset == 0) {
		log_err("%s: LUKS header at offset 0x%" PRIx64 " is not cluster aligned or lies on the header.", img->path,
			img->crypt_header_offset);
		return -EUCLEAN;
	}
	if (!image_range_in_file(&img->io, img->crypt_header_offset, img->crypt_header_length)) {
		log_err("%s: LUKS header at offset 0x%" PRIx64 " (%" PRIu64 " bytes) lies beyond the end of the file (size %" PRIu64 ").",
			img->path, img->crypt_header_offset, img->crypt_header_length, img->io.size);
		return -EUCLEAN;
	}
	return 0;
}

static int read_backing_name(struct image *img, uint64_t off, uint32_t len)
{
	if (!off)
		return 0;
	if (len == 0 || len > QCOW2_MAX_BACKING_NAME) {
		log_err("%s: backing file name length %u is invalid (1..%d).", img->path, len, QCOW2_MAX_BACKING_NAME);
		return -EUCLEAN;
	}
	if (off > img->cluster_size || len > img->cluster_size - off || !image_range_in_file(&img->io, off, len)) {
		log_err("%s: backing file name at offset 0x%" PRIx64 " (%u bytes) lies outside the header cluster.",
			img->path, off, len);
		return -EUCLEAN;
	}
	img->backing_file = malloc(len + 1);
	if (!img->backing_file)
		return -ENOMEM;
	if (img_pread(&img->io, img->backing_file, len, off) < 0)
		return -EIO;
	img->backing_file[len] = '\0';
	if (strlen(img->backing_file) != len) {
		log_err("%s: backing file name contains a NUL byte.", img->path);
		return -EUCLEAN;
	}
	return 0;
}

/* Where the header cluster ends and the backing file name lies, as the
 * fixed header says. */
struct header_cluster {
	uint64_t bytes;		/* read into the buffer: a cluster, less in a short file */
	uint64_t backing_off;
	uint32_t backing_len;
};

/* The fixed header (v2, or v3 and its header_length) into img, then the
 * header cluster into hdr (of 1 << QCOW2_MAX_CLUSTER_BITS bytes). */
static int read_header(struct image *img, uint8_t *hdr, struct header_cluster *hc)
{
	int r;

	if (img->io.size < QCOW2_HDR_V2_SIZE) {
		log_err("%s: file is too small for a qcow2 header (%" PRIu64 " bytes).", img->path, img->io.size);
		return -EUCLEAN;
	}
	r = img_pread(&img->io, hdr, QCOW2_HDR_V2_SIZE, 0);
	if (r < 0)
		return r;
	if (get_be32(hdr) != QCOW_MAGIC) {
		log_err("%s: not a qcow2 image (magic 0x%08x).", img->path, get_be32(hdr));
		return -EUCLEAN;
	}
	img->version = get_be32(hdr + QCOW2_HDR_VERSION);
	if (img->version != 2 && img->version != 3) {
		log_err("%s: unsupported qcow2 version %u.", img->path, img->version);
		return -ENOTSUP;
	}
	hc->backing_off = get_be64(hdr + QCOW2_HDR_BACKING_OFFSET);
	hc->backing_len = get_be32(hdr + QCOW2_HDR_BACKING_SIZE);
	img->cluster_bits = get_be32(hdr + QCOW2_HDR_CLUSTER_BITS);
	/* QEMU: total_sectors = size / 512; a partial last sector does not exist */
	img->size = get_be64(hdr + QCOW2_HDR_SIZE) & ~511ULL;
	img->crypt_method = get_be32(hdr + QCOW2_HDR_CRYPT_METHOD);
	img->l1_size = get_be32(hdr + QCOW2_HDR_L1_SIZE);
	img->l1_table_offset = get_be64(hdr + QCOW2_HDR_L1_OFFSET);
	img->refcount_table_offset = get_be64(hdr + QCOW2_HDR_REFTABLE_OFFSET);
	img->refcount_table_clusters = get_be32(hdr + QCOW2_HDR_REFTABLE_CLUSTERS);
	img->nb_snapshots = get_be32(hdr + QCOW2_HDR_NB_SNAPSHOTS);
	img->snapshots_offset = get_be64(hdr + QCOW2_HDR_SNAPSHOTS_OFFSET);

	if (img->cluster_bits < QCOW2_MIN_CLUSTER_BITS || img->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		log_err("%s: cluster_bits %u is out of range (%d..%d).", img->path, img->cluster_bits,
			QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
		return -EUCLEAN;
	}
	img->cluster_size = 1ULL << img->cluster_bits;

	if (img->version == 2) {
		img->refcount_order = 4;
		img->header_length = QCOW2_HDR_V2_SIZE;
	} else {
		if (img->io.size < QCOW2_HDR_V3_SIZE) {
			log_err("%s: file is too small for a qcow2 v3 header.", img->path);
			return -EUCLEAN;
		}
		r = img_pread(&img->io, hdr + QCOW2_HDR_V2_SIZE, QCOW2_HDR_V3_SIZE - QCOW2_HDR_V2_SIZE, QCOW2_HDR_V2_SIZE);
		if (r < 0)
			return r;
		img->incompatible_features = get_be64(hdr + QCOW2_HDR_INCOMPAT);
		img->compatible_features = get_be64(hdr + QCOW2_HDR_COMPAT);
		img->autoclear_features = get_be64(hdr + QCOW2_HDR_AUTOCLEAR);
		img->refcount_order = get_be32(hdr + QCOW2_HDR_REFCOUNT_ORDER);
		img->header_length = get_be32(hdr + QCOW2_HDR_HEADER_LENGTH);
		if (img->header_length < QCOW2_HDR_V3_SIZE || img->header_length > img->cluster_size ||
		    img->header_length % 8) {
			log_err("%s: header_length %u is invalid (a multiple of 8 from 104 to the cluster size).", img->path,
				img->header_length);
			return -EUCLEAN;
		}
	}
	/* The header cluster holds header, extensions and the backing name. */
	hc->bytes = MIN(img->cluster_size, img->io.size);
	r = img_pread(&img->io, hdr, hc->bytes, 0);
	if (r < 0)
		return r;
	if (img->header_length > hc->bytes) {
		log_err("%s: header (%u bytes) is truncated.", img->path, img->header_length);
		return -EUCLEAN;
	}
	if (img->header_length > QCOW2_HDR_V3_SIZE)
		img->compression_type = hdr[QCOW2_HDR_COMPRESSION_TYPE];
	return 0;
}

/* The header fields that must agree with each other. */
static int check_header_fields(struct image *img)
{
	if (img->refcount_order > 6) {
		log_err("%s: refcount_order %u is invalid (0..6).", img->path, img->refcount_order);
		return -EUCLEAN;
	}
	img->extended_l2 = img->incompatible_features & QCOW2_INCOMPAT_EXTL2;
	if (img->extended_l2 && img->cluster_bits < 14) {
		log_err("%s: extended L2 entries need clusters of at least 16 KiB (cluster_bits %u).", img->path,
			img->cluster_bits);
		return -EUCLEAN;
	}
	if (img->compression_type > QCOW2_COMPRESSION_ZSTD) {
		log_err("%s: unsupported compression type %u.", img->path, img->compression_type);
		return -ENOTSUP;
	}
	if ((img->compression_type != QCOW2_COMPRESSION_ZLIB) !=
	    !!(img->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
		log_err("%s: compression type %u does not agree with the compression type feature bit.", img->path,
			img->compression_type);
		return -EUCLEAN;
	}
	return 0;
}

/* The rest of the header cluster: extensions, then the feature bits they
 * name, the backing file name, the external data file, the LUKS header. */
static int read_header_cluster(struct image *img, const uint8_t *hdr, const struct header_cluster *hc)
{
	uint64_t ext_end;
	int r;

	if (hc->backing_off && hc->backing_off < img->header_length) {
		log_err("%s: backing file name offset 0x%" PRIx64 " lies inside the header.", img->path,
			hc->backing_off);
		return -EUCLEAN;
	}
	ext_end = hc->backing_off ? MIN(hc->backing_off, hc->bytes) : hc->bytes;
	if (img->header_length < ext_end) {
		r = read_extensions(img, hdr, img->header_length, ext_end);
		if (r < 0)
			return r;
	}
	/* after the extensions: the feature name table names unknown bits */
	r = check_incompatible_features(img);
	if (r < 0)
		return r;
	r = read_backing_name(img, hc->backing_off, hc->backing_len);
	if (r < 0)
		return r;
	if ((img->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) && !img->data_file) {
		log_err("%s: the external data file feature is set but the image names no data file.", img->path);
		return -EUCLEAN;
	}
	if (img->data_file && !(img->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)) {
		log_verbose("%s: ignoring a data file name without the external data file feature.", img->path);
		free(img->data_file);
		img->data_file = NULL;
	}
	if (img->data_file && img->backing_file && (img->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)) {
		log_err("%s: a raw external data file cannot be combined with a backing file.", img->path);
		return -EUCLEAN;
	}
	return check_crypt_header(img);
}

/* The L1 table covers the virtual size; L1 and refcount table lie in the
 * file and within the bounds. */
static int check_tables(struct image *img)
{
	uint64_t guest_per_l1, need_l1;
	int r;

	img->l2_bits = img->cluster_bits - (img->extended_l2 ? 4 : 3);
	guest_per_l1 = (1ULL << img->l2_bits) << img->cluster_bits;
	if (img->size > INT64_MAX - guest_per_l1) {
		log_err("%s: virtual size %" PRIu64 " is too large.", img->path, img->size);
		return -EUCLEAN;
	}
	need_l1 = (img->size + guest_per_l1 - 1) / guest_per_l1;
	if ((uint64_t)img->l1_size * 8 > QCOW2_MAX_L1_BYTES || need_l1 > QCOW2_MAX_L1_BYTES / 8) {
		log_err("%s: L1 table of %" PRIu64 " entries is too large (image too big).", img->path,
			MAX((uint64_t)img->l1_size, need_l1));
		return -EUCLEAN;
	}
	if (img->l1_size < need_l1) {
		log_err("%s: L1 table has %u entries, %" PRIu64 " needed for a virtual size of %" PRIu64 ".",
			img->path, img->l1_size, need_l1, img->size);
		return -EUCLEAN;
	}
	r = check_table_offset(img, img->l1_table_offset, img->l1_size, 8, "L1 table");
	if (r < 0)
		return r;
	if ((uint64_t)img->refcount_table_clusters << img->cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
		log_err("%s: refcount table of %u clusters is too large.", img->path, img->refcount_table_clusters);
		return -EUCLEAN;
	}
	r = check_table_offset(img, img->refcount_table_offset,
			       (uint64_t)img->refcount_table_clusters << img->cluster_bits, 1, "refcount table");
	if (r < 0)
		return r;
	if (!img->refcount_table_clusters) {
		log_err("%s: the image has no refcount table.", img->path);
		return -EUCLEAN;
	}
	return 0;
}

int qcow2_open(struct image *img)
{
	struct header_cluster hc;
	uint8_t *hdr;
	int r;

	hdr = calloc(1, 1U << QCOW2_MAX_CLUSTER_BITS);
	if (!hdr)
		return -ENOMEM;
	r = read_header(img, hdr, &hc);
	if (r < 0)
		goto out;
	r = check_header_fields(img);
	if (r < 0)
		goto out;
	r = read_header_cluster(img, hdr, &hc);
	if (r < 0)
		goto out;
	r = check_tables(img);
	if (r < 0)
		goto out;
	r = read_snapshots(img);
	if (r < 0)
		goto out;
	r = read_bitmaps(img);
	if (r < 0)
		goto out;
	r = qcow2_read_table(img, img->l1_table_offset, img->l1_size, QCOW2_MAX_L1_BYTES, "L1 table", &img->l1);
	if (r < 0)
		goto out;
	img->map_l1_size = img->l1_size;
	img->map_size = img->size;
out:
	free(hdr);
	return r;
}

uint64_t qcow2_l2_entry_host_offset(const struct image *img, uint64_t entry)
{
	if (entry & QCOW2_OFLAG_COMPRESSED)
		return entry & ((1ULL << (62 - (img->cluster_bits - 8))) - 1);
	return entry & QCOW2_L2E_OFFSET_MASK;
}

/* One guest cluster (or subcluster run) of the walk. */
static int emit(struct run_list *out, uint64_t guest, uint64_t len, uint64_t end, enum run_kind kind,
		uint64_t host, uint32_t clen, uint8_t flags)
{
	struct run r = { .guest = guest, .kind = kind, .host = host, .clen = clen, .flags = flags };

	if (guest >= end)
		return 0;
	r.len = MIN(len, end - guest);
	return run_list_add(out, &r);
}

static int walk_l2_entry(struct image *img, struct run_list *out, uint64_t guest, uint64_t end,
			 uint64_t entry, uint64_t bitmap)
{
	uint64_t cs = img->cluster_size, host;
	bool allocated;

	if (entry & QCOW2_OFLAG_COMPRESSED) {
		unsigned int x = 62 - (img->cluster_bits - 8);
		uint64_t nb_csectors = ((entry >> x) & ((1ULL << (img->cluster_bits - 8)) - 1)) + 1;
		uint64_t clen;

		host = entry & ((1ULL << x) - 1);
		clen = nb_csectors * 512 - (host & 511);
		if (img->extended_l2 && bitmap) {
			log_err("%s: guest offset 0x%" PRIx64 ": compressed cluster with a non-zero subcluster bitmap.",
				img->path, guest);
			return -EUCLEAN;
		}
		if (img->has_data_file) {
			log_err("%s: guest offset 0x%" PRIx64 ": compressed cluster in an image with an external data file.",
				img->path, guest);
			return -EUCLEAN;
		}
		return emit(out, guest, cs, end, RUN_COMPRESSED, host, (uint32_t)clen, 0);
	}
	host = entry & QCOW2_L2E_OFFSET_MASK;
	if (entry & (QCOW2_L2E_RESERVED | (img->extended_l2 ? QCOW2_OFLAG_ZERO : 0))) {
		log_err("%s: guest offset 0x%" PRIx64 ": L2 entry 0x%016" PRIx64 " has reserved bits set.", img->path,
			guest, entry);
		return -EUCLEAN;
	}
	/* Offset 0 is a valid offset in an external data file; there every
	 * cluster has refcount 1, so COPIED tells allocated from not (as QEMU). */
	allocated = host || (img->data_file && (entry & QCOW2_OFLAG_COPIED));
	if (host && !is_aligned(host, cs)) {
		log_err("%s: guest offset 0x%" PRIx64 ": cluster at host offset 0x%" PRIx64 " is not cluster aligned.",
			img->path, guest, host);
		return -EUCLEAN;
	}
	if (!img->extended_l2) {
		if (entry & QCOW2_OFLAG_ZERO)
			return emit(out, guest, cs, end, RUN_ZERO, host, 0, allocated ? RUN_F_HOST : 0);
		if (allocated)
			return emit(out, guest, cs, end, RUN_DATA, host, 0, 0);
		return emit(out, guest, cs, end, RUN_UNALLOC, 0, 0, 0);
	}
	{
		uint64_t sc = cs / 32;
		uint32_t alloc = (uint32_t)bitmap, zero = (uint32_t)(bitmap >> 32);
		uint8_t hflag = allocated ? RUN_F_HOST : 0;
		int r;

		if (alloc & zero) {
			log_err("%s: guest offset 0x%" PRIx64 ": subclusters marked both allocated and zero (bitmap 0x%016" PRIx64 ").",
				img->path, guest, bitmap);
			return -EUCLEAN;
		}
		if (!allocated && alloc) {
			log_err("%s: guest offset 0x%" PRIx64 ": allocated subclusters without a host cluster.", img->path,
				guest);
			return -EUCLEAN;
		}
		for (unsigned int i = 0; i < 32; i++) {
			uint64_t g = guest + i * sc, h = allocated ? host + i * sc : 0;

			if (zero & (1U << i))
				r = emit(out, g, sc, end, RUN_ZERO, h, 0, hflag);
			else if (alloc & (1U << i))
				r = emit(out, g, sc, end, RUN_DATA, h, 0, 0);
			else
				r = emit(out, g, sc, end, RUN_UNALLOC, h, 0, hflag);
			if (r < 0)
				return r;
		}
	}
	return 0;
}

int qcow2_walk(struct image *img, struct run_list *out)
{
	uint64_t cs = img->cluster_size, l2_entries = 1ULL << img->l2_bits;
	uint64_t per_l1 = l2_entries * cs, end = img->map_size;
	unsigned int esz = img->extended_l2 ? 16 : 8;
	uint8_t *l2 = NULL;
	int r = 0;

	l2 = malloc(cs);
	if (!l2)
		return -ENOMEM;
	for (uint64_t i = 0; i < img->map_l1_size && i * per_l1 < end; i++) {
		uint64_t l2_off = img->l1[i] & QCOW2_L1E_OFFSET_MASK, base = i * per_l1;

		if (img->l1[i] & QCOW2_L1E_RESERVED) {
			log_err("%s: guest offset 0x%" PRIx64 ": L1 entry %" PRIu64 " (0x%016" PRIx64 ") has reserved bits set.",
				img->path, base, i, img->l1[i]);
			r = -EUCLEAN;
			goto out;
		}
		if (!l2_off) {
			r = emit(out, base, per_l1, end, RUN_UNALLOC, 0, 0, 0);
			if (r < 0)
				goto out;
			continue;
		}
		if (!is_aligned(l2_off, cs) || !image_range_in_file(&img->io, l2_off, cs)) {
			log_err("%s: guest offset 0x%" PRIx64 ": L2 table at host offset 0x%" PRIx64 " is %s (file size %" PRIu64 ").",
				img->path, base, l2_off, is_aligned(l2_off, cs) ? "beyond the end of the file" : "not cluster aligned",
				img->io.size);
			r = -EUCLEAN;
			goto out;
		}
		r = img_pread(&img->io, l2, cs, l2_off);
		if (r < 0) {
			log_err("%s: cannot read the L2 table at 0x%" PRIx64 ": %s.", img->path, l2_off, strerror(-r));
			goto out;
		}
		for (uint64_t j = 0; j < l2_entries; j++) {
			uint64_t guest = base + j * cs;

			if (guest >= end)
				break;
			r = walk_l2_entry(img, out, guest, end, get_be64(l2 + j * esz),
					  esz == 16 ? get_be64(l2 + j * esz + 8) : 0);
			if (r < 0)
				goto out;
		}
	}
	/* L1 shorter than the mapped size (a snapshot taken before a resize) */
	if (img->map_l1_size * per_l1 < end)
		r = emit(out, img->map_l1_size * per_l1, end - img->map_l1_size * per_l1, end, RUN_UNALLOC, 0, 0, 0);
out:
	free(l2);
	return r;
}

int refcount_reader_init(struct refcount_reader *rr, const struct image *img)
{
	uint64_t n = ((uint64_t)img->refcount_table_clusters << img->cluster_bits) / 8;

	memset(rr, 0, sizeof(*rr));
	rr->img = img;
	rr->entries_per_block = (img->cluster_size * 8) >> img->refcount_order;
	rr->block = malloc(img->cluster_size);
	if (!rr->block)
		return -ENOMEM;
	rr->table_entries = n;
	return qcow2_read_table(img, img->refcount_table_offset, n, QCOW2_MAX_REFTABLE_BYTES, "refcount table",
				&rr->table);
}

void refcount_reader_free(struct refcount_reader *rr)
{
	free(rr->table);
	free(rr->block);
	memset(rr, 0, sizeof(*rr));
}

int refcount_get(struct refcount_reader *rr, uint64_t ci, uint64_t *rc)
{
	const struct image *img = rr->img;
	uint64_t ti = ci / rr->entries_per_block, bi = ci % rr->entries_per_block, boff;
	unsigned int bits = 1U << img->refcount_order;
	int r;

	*rc = 0;
	if (ti >= rr->table_entries)
		return 0;
	boff = rr->table[ti] & QCOW2_REFT_OFFSET_MASK;
	if (!boff)
		return 0;
	if (!is_aligned(boff, img->cluster_size)) {
		log_err("%s: refcount block at host offset 0x%" PRIx64 " is not cluster aligned.", img->path, boff);
		return -EUCLEAN;
	}
	if (!image_range_in_file(&img->io, boff, img->cluster_size)) {
		log_err("%s: refcount block at host offset 0x%" PRIx64 " lies beyond the end of the file (size %" PRIu64 ").",
			img->path, boff, img->io.size);
		return -EUCLEAN;
	}
	if (rr->block_offset != boff) {
		r = img_pread(&img->io, rr->block, img->cluster_size, boff);
		if (r < 0)
			return r;
		rr->block_offset = boff;
	}
	if (bits >= 8) {
		const uint8_t *p = rr->block + bi * (bits / 8);

		switch (bits) {
		case 8:
			*rc = p[0];
			break;
		case 16:
			*rc = get_be16(p);
			break;
		case 32:
			*rc = get_be32(p);
			break;
		default:
			*rc = get_be64(p);
			break;
		}
	} else {
		uint64_t bit = bi * bits;
		uint8_t byte = rr->block[bit / 8];

		/* sub-byte refcounts: entry 0 in the least significant bits */
		*rc = (byte >> (bit % 8)) & ((1U << bits) - 1);
	}
	return 0;
}
