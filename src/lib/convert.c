/* Conversion of any image the engine reads into a LUKS qcow2 image. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "compress.h"
#include "convert.h"
#include "fileio.h"
#include "lock.h"
#include "log.h"
#include "qcow2_create.h"
#include "util.h"

#define BATCH_BYTES (4U << 20)	/* guest bytes read at once */

/* ---- reading a chain's plaintext ---- */

struct layer_key {
	bool ready;
	struct volume_key *aes;			/* legacy AES */
	struct luks_data_cipher *luks;		/* LUKS */
};

struct reader {
	struct image *top;
	struct image *layer[IMG_MAX_CHAIN_DEPTH];
	int nlayers;
	struct run_list runs;		/* image_map_chain: what each guest byte reads */
	struct layer_key key[IMG_MAX_CHAIN_DEPTH];
	const struct passphrase *top_pp;	/* for layer 0 */
	const struct passphrase *backing_pp;	/* for the others */
	const struct volume_key *top_vk;	/* layer 0 is LUKS with this key (verification) */
	bool skip_key_check;		/* legacy AES keys are not checked */
	/* one decompressed cluster */
	uint8_t *cbuf, *craw;
	size_t cbuf_size;
	int cdepth;
	uint64_t chost;
	bool cvalid;
};

static void reader_free(struct reader *rd)
{
	for (int i = 0; i < IMG_MAX_CHAIN_DEPTH; i++) {
		volume_key_free(rd->key[i].aes);
		luks_data_cipher_free(rd->key[i].luks);
	}
	run_list_free(&rd->runs);
	free(rd->cbuf);
	free(rd->craw);
	memset(rd, 0, sizeof(*rd));
}

static int reader_init(struct reader *rd, struct image *top, const struct passphrase *top_pp,
		       const struct passphrase *backing_pp, bool skip_key_check)
{
	size_t maxcs = 0;
	int r;

	memset(rd, 0, sizeof(*rd));
	run_list_init(&rd->runs);
	rd->top = top;
	rd->top_pp = top_pp;
	rd->backing_pp = backing_pp;
	rd->skip_key_check = skip_key_check;
	for (struct image *l = top; l; l = l->backing) {
		if (l->depth < 0 || l->depth >= IMG_MAX_CHAIN_DEPTH)
			return -EUCLEAN;
		rd->layer[l->depth] = l;
		rd->nlayers = MAX(rd->nlayers, l->depth + 1);
		maxcs = MAX(maxcs, (size_t)l->cluster_size);
	}
	r = image_map_chain(top, &rd->runs);
	if (r < 0)
		return r;
	rd->cbuf_size = maxcs;
	rd->cbuf = malloc(maxcs);
	rd->craw = malloc(maxcs);
	if (!rd->cbuf || !rd->craw)
		return -ENOMEM;
	return 0;
}

static bool layer_encrypted(const struct image *l)
{
	return l->crypt_method != IMG_CRYPT_NONE;
}

/* The key of layer depth, from its passphrase. -EPERM: wrong passphrase. */
static int reader_layer_key(struct reader *rd, int depth)
{
	struct image *l = rd->layer[depth];
	struct layer_key *k = &rd->key[depth];
	const struct passphrase *pp = depth ? rd->backing_pp : rd->top_pp;
	struct volume_key *vk = NULL;
	struct luks_info info;
	int r;

	if (k->ready)
		return 0;
	if (!layer_encrypted(l)) {
		k->ready = true;
		return 0;
	}
	if (!pp && !(depth == 0 && rd->top_vk)) {
		log_err("%s is encrypted: its passphrase is needed (--key-file).", l->path);
		return -EPERM;
	}
	if (l->crypt_method == IMG_CRYPT_AES) {
		r = legacy_aes_key(pp, &vk);
		if (r < 0)
			return r;
		if (!rd->skip_key_check) {
			r = legacy_key_check(l, vk);
			if (r < 0) {
				volume_key_free(vk);
				return r;
			}
		}
		k->aes = vk;
	} else {
		if (depth == 0 && rd->top_vk) {
			vk = volume_key_alloc(rd->top_vk->size);
			if (!vk)
				return -ENOMEM;
			memcpy(vk->key, rd->top_vk->key, vk->size);
		} else {
			r = luks_unlock(&l->io, l->crypt_header_offset, l->crypt_header_length, pp, &vk, NULL);
			if (r < 0)
				return r;
		}
		r = luks_read_info(&l->io, l->crypt_header_offset, l->crypt_header_length, &info);
		if (r == 0)
			r = luks_data_cipher_new(info.cipher_name, info.cipher_mode, vk, &k->luks);
		volume_key_free(vk);
		if (r < 0) {
			log_err("%s: cannot decrypt its %s-%s data in userspace.", l->path, info.cipher_name,
				info.cipher_mode);
			return r;
		}
	}
	k->ready = true;
	return 0;
}

static int run_holding(const void *key, const void *elem)
{
	uint64_t g = *(const uint64_t *)key;
	const struct run *rn = elem;

	if (g < rn->guest)
		return -1;
	return g - rn->guest >= rn->len ? 1 : 0;
}

/* The run holding guest offset g, or NULL beyond the end. */
static const struct run *find_run(const struct run_list *l, uint64_t g)
{
	if (!l->count)
		return NULL;
	return bsearch(&g, l->runs, l->count, sizeof(l->runs[0]), run_holding);
}

static const struct img_io *layer_data_io(const struct image *l)
{
	return l->has_data_file ? &l->data_io : &l->io;
}

/* Bytes [off, off+n) of io, zeros past its end (raw files, as QEMU rounds
 * their size up to whole sectors). */
static int read_clipped(const struct img_io *io, uint64_t off, uint8_t *p, uint64_t n)
{
	uint64_t have = off < io->size ? MIN(n, io->size - off) : 0;
	int r = 0;

	if (have)
		r = img_pread(io, p, (size_t)have, off);
	if (have < n)
		memset(p + have, 0, (size_t)(n - have));
	return r;
}

static int read_data(struct reader *rd, const struct run *rn, uint64_t g, uint8_t *p, uint64_t n)
{
	struct image *l = rd->layer[rn->depth];
	struct layer_key *k = &rd->key[rn->depth];
	uint64_t host;
	int r;

	if (l->format == IMG_FMT_RAW)
		return read_clipped(&l->io, g, p, n);
	if (uadd64_overflow(rn->host, g - rn->guest, &host))
		return -EUCLEAN;
	r = img_pread(layer_data_io(l), p, (size_t)n, host);
	if (r < 0) {
		log_err("%s: cannot read data at offset %" PRIu64 ": %s", l->path, host, strerror(-r));
		return r;
	}
	if (!layer_encrypted(l))
		return 0;
	if (!is_aligned(g, KEY_SECTOR_SIZE) || !is_aligned(n, KEY_SECTOR_SIZE) ||
	    !is_aligned(host, KEY_SECTOR_SIZE)) {
		log_err("%s: encrypted data at guest offset %" PRIu64 " is not sector aligned.", l->path, g);
		return -EUCLEAN;
	}
	r = reader_layer_key(rd, rn->depth);
	if (r < 0)
		return r;
	if (k->aes)
		r = legacy_aes_decrypt(k->aes, g / KEY_SECTOR_SIZE, p, (size_t)n);
	else
		r = luks_data_decrypt(k->luks, host / KEY_SECTOR_SIZE, p, (size_t)n);
	if (r < 0)
		log_err("%s: decryption failed at guest offset %" PRIu64 ".", l->path, g);
	return r;
}

/* Compressed clusters are stored in plaintext, encrypted images or not
 * (QEMU never encrypts them). */
static int read_compressed(struct reader *rd, const struct run *rn, uint64_t g, uint8_t *p, uint64_t n)
{
	struct image *l = rd->layer[rn->depth];
	uint64_t cs = l->cluster_size, clen = rn->clen;
	int r;

	if (clen > cs || cs > rd->cbuf_size) {
		log_err("%s: compressed cluster at %" PRIu64 " is larger than a cluster.", l->path, rn->host);
		return -EUCLEAN;
	}
	if (!rd->cvalid || rd->cdepth != rn->depth || rd->chost != rn->host) {
		rd->cvalid = false;
		r = read_clipped(&l->io, rn->host, rd->craw, clen);
		if (r < 0)
			return r;
		r = qcow_decompress(l->compression_type, rd->cbuf, (size_t)cs, rd->craw, (size_t)clen);
		if (r < 0) {
			log_err("%s: cannot decompress the cluster at offset %" PRIu64 ": %s", l->path,
				rn->host, strerror(-r));
			return r;
		}
		rd->cvalid = true;
		rd->cdepth = rn->depth;
		rd->chost = rn->host;
	}
	memcpy(p, rd->cbuf + (g - rn->guest), (size_t)n);
	return 0;
}

/* The plaintext of guest bytes [guest, guest+len); zeros past the end. */
static int reader_read(struct reader *rd, uint64_t guest, void *buf, uint64_t len)
{
	uint8_t *p = buf;
	uint64_t g = guest, end = guest + len, n;
	int r;

	while (g < end) {
		const struct run *rn = find_run(&rd->runs, g);

		if (!rn) {
			memset(p, 0, (size_t)(end - g));
			break;
		}
		n = MIN(end, rn->guest + rn->len) - g;
		switch (rn->kind) {
		case RUN_DATA:
			r = read_data(rd, rn, g, p, n);
			break;
		case RUN_COMPRESSED:
			r = read_compressed(rd, rn, g, p, n);
			break;
		case RUN_ZERO:
			/* a raw layer's last partial sector is mapped as zeros */
			if (rd->layer[rn->depth]->format == IMG_FMT_RAW) {
				r = read_clipped(&rd->layer[rn->depth]->io, g, p, n);
				break;
			}
			/* fall through */
		default:
			memset(p, 0, (size_t)n);
			r = 0;
			break;
		}
		if (r < 0)
			return r;
		p += n;
		g += n;
	}
	return 0;
}

/* ---- what each cluster of the result is ---- */

struct cluster_kinds {
	bool unalloc, zero, data;
};

/* Kinds present in [start, end) of the allocation runs. */
static void kinds_in(const struct run_list *alloc, uint64_t start, uint64_t end, struct cluster_kinds *k)
{
	uint64_t g = start;

	memset(k, 0, sizeof(*k));
	while (g < end) {
		const struct run *rn = find_run(alloc, g);

		if (!rn) {
			k->unalloc = true;
			break;
		}
		if (rn->kind == RUN_UNALLOC)
			k->unalloc = true;
		else if (rn->kind == RUN_ZERO)
			k->zero = true;
		else
			k->data = true;
		g = rn->guest + rn->len;
	}
}

static bool all_zero(const uint8_t *p, size_t n)
{
	return !n || (!p[0] && !memcmp(p, p + 1, n - 1));
}

struct convert {
	const struct convert_params *p;
	struct file_opener opener;	/* of the source chain */
	struct image *src;		/* top of the source chain */
	struct reader rd;
	struct run_list alloc;		/* what the source's top layer (or chain) allocates */
	bool keep_backing;		/* the result has the source's backing file */
	uint64_t size;			/* guest bytes */
	uint64_t cs;
	uint64_t nclusters;
	struct qcow2_create *w;
	struct luks_data_cipher *cipher;
	const char *out_name;		/* for messages: the target's temporary name */
	bool target_created;
	char *backing_name;		/* of the result, NULL: none */
	const char *backing_format;
	struct volume_key *vk;		/* the new volume key */
	struct passphrase *src_pp, *new_pp;	/* new_pp may be src_pp */
	uint8_t *region;		/* the new LUKS header */
	uint64_t region_len;
};

static void progress_start(struct convert *c, const char *label)
{
	if (c->p->progress_start)
		c->p->progress_start(c->p->opaque, label, c->size);
}

/* Clusters [0, cl) are done. */
static void progress_update(struct convert *c, uint64_t cl)
{
	if (c->p->progress_update)
		c->p->progress_update(c->p->opaque, MIN(cl * c->cs, c->size));
}

static void progress_end(struct convert *c, bool ok)
{
	if (c->p->progress_end)
		c->p->progress_end(c->p->opaque, ok);
}

/* qcow2_create_add, with the message a failed write deserves */
static int writer_add(struct convert *c, uint64_t count, enum qcow2_create_state state, const void *data)
{
	int r = qcow2_create_add(c->w, count, state, data);

	if (r < 0 && r != -ENOMEM)
		log_err("Cannot write %s: %s.", c->out_name, strerror(-r));
	return r;
}

/* Write data clusters [buf, buf + count clusters), encrypted for the host
 * offsets they get. */
static int write_group(struct convert *c, uint8_t *buf, uint64_t count)
{
	uint64_t host = qcow2_create_next_data_offset(c->w);
	int r;

	if (!count)
		return 0;
	r = luks_data_encrypt(c->cipher, host / KEY_SECTOR_SIZE, buf, (size_t)(count * c->cs));
	if (r < 0) {
		log_err("Encryption failed.");
		return r;
	}
	return writer_add(c, count, QCOW2_CREATE_DATA, buf);
}

/* Clusters [first, first+count), whose content must be read: data, or a
 * zero cluster (with a backing file: zero flag; without: unallocated, or a
 * zero flag where the source had one). */
static int convert_batch(struct convert *c, uint8_t *buf, uint64_t first, uint64_t count,
			 const bool *had_zero)
{
	uint64_t gstart = 0;
	int r;

	r = reader_read(&c->rd, first * c->cs, buf, count * c->cs);
	if (r < 0)
		return r;
	for (uint64_t i = 0; i < count; i++) {
		if (!all_zero(buf + i * c->cs, (size_t)c->cs))
			continue;
		r = write_group(c, buf + gstart * c->cs, i - gstart);
		if (r < 0)
			return r;
		r = writer_add(c, 1, c->keep_backing || had_zero[i] ? QCOW2_CREATE_ZERO : QCOW2_CREATE_UNALLOC, NULL);
		if (r < 0)
			return r;
		gstart = i + 1;
	}
	return write_group(c, buf + gstart * c->cs, count - gstart);
}

/* Clusters from guest offset start on that lie in a hole of a raw source
 * (SEEK_HOLE through the io's extent callback), or past its end. */
static uint64_t raw_hole_clusters(struct convert *c, uint64_t start)
{
	const struct img_io *io = &c->src->io;
	uint64_t len = 0, end;
	bool is_data = true;
	int r;

	if (!io->extent)
		return 0;
	r = io->extent(io->opaque, start, &len, &is_data);
	if (r == -ENXIO)
		end = c->size;		/* past the end of the file */
	else if (r < 0 || is_data)
		return 0;
	else if (uadd64_overflow(start, len, &end))
		return 0;
	if (end >= c->size)
		return c->nclusters - start / c->cs;
	return (end - start) / c->cs;
}

static int convert_clusters(struct convert *c)
{
	uint64_t bc = MAX(1, BATCH_BYTES / c->cs), pending = 0, first = 0, cl = 0;
	uint8_t *buf = malloc((size_t)(bc * c->cs));
	bool *had_zero = calloc((size_t)bc, sizeof(bool));
	struct cluster_kinds k;
	int r = 0;

	if (!buf || !had_zero) {
		r = -ENOMEM;
		goto out;
	}
	while (cl < c->nclusters) {
		uint64_t start = cl * c->cs, end = MIN(start + c->cs, c->size), n = 0;
		const struct run *rn = find_run(&c->alloc, start);
		enum qcow2_create_state state = QCOW2_CREATE_UNALLOC;

		/* whole clusters inside one unallocated or zero run: at once */
		if (rn && (rn->kind == RUN_UNALLOC || rn->kind == RUN_ZERO)) {
			uint64_t rend = rn->guest + rn->len;

			n = rend >= c->size ? c->nclusters - cl : (rend - start) / c->cs;
			state = rn->kind == RUN_ZERO ? QCOW2_CREATE_ZERO : QCOW2_CREATE_UNALLOC;
		}
		/* a raw source: whole clusters in a hole of the file, unread */
		if (!n && c->src->format == IMG_FMT_RAW && !c->src->backing)
			n = raw_hole_clusters(c, start);
		if (!n) {
			kinds_in(&c->alloc, start, end, &k);
			if (k.data || (k.zero && k.unalloc && c->keep_backing)) {
				/* to be read */
				if (!pending)
					first = cl;
				had_zero[pending++] = k.zero;
				cl++;
				if (pending == bc) {
					r = convert_batch(c, buf, first, pending, had_zero);
					if (r < 0)
						goto out;
					pending = 0;
					progress_update(c, cl);
				}
				continue;
			}
			n = 1;
			state = k.zero ? QCOW2_CREATE_ZERO : QCOW2_CREATE_UNALLOC;
		}
		if (pending) {
			r = convert_batch(c, buf, first, pending, had_zero);
			if (r < 0)
				goto out;
			pending = 0;
		}
		r = writer_add(c, n, state, NULL);
		if (r < 0)
			goto out;
		cl += n;
		progress_update(c, cl);
	}
	if (pending)
		r = convert_batch(c, buf, first, pending, had_zero);
out:
	free(buf);
	free(had_zero);
	return r;
}

/* ---- verification of the result ---- */

/* Clusters from cl on that both top layers leave to the (same) backing
 * file: nothing to compare there. */
static uint64_t both_unallocated(const struct run_list *a, const struct run_list *b, uint64_t cl,
				 uint64_t cs, uint64_t size, uint64_t nclusters)
{
	const struct run *ra = find_run(a, cl * cs), *rb = find_run(b, cl * cs);
	uint64_t end;

	if (!ra || !rb || ra->kind != RUN_UNALLOC || rb->kind != RUN_UNALLOC)
		return 0;
	end = MIN(ra->guest + ra->len, rb->guest + rb->len);
	if (end >= size)
		return nclusters - cl;
	return (end - cl * cs) / cs;
}

/* The new image at the target's name: what was written, opened by the new
 * passphrase with the new volume key, refcounts clean. *dst gets it. */
static int verify_header(struct convert *c, struct image **dst)
{
	struct image_open_opts oo = { .format = "qcow2" };
	const char *tmp = c->out_name;
	struct file_opener trusted;
	struct volume_key *vk2 = NULL;
	struct qcow2_check_result res;
	int r;

	/* the new image's backing name is ours, made from the source chain
	 * (which passed the trust rules): followed as written */
	file_opener_init(&trusted, false, &(struct trust_rules){ .trust_names = true });
	r = image_open(&trusted.ops, tmp, &oo, dst);
	if (r < 0)
		return r;
	if ((*dst)->crypt_method != IMG_CRYPT_LUKS || (*dst)->size != c->size ||
	    ((*dst)->backing != NULL) != c->keep_backing) {
		log_err("%s: the new image is not what was written.", tmp);
		return -EIO;
	}
	r = luks_unlock(&(*dst)->io, (*dst)->crypt_header_offset, (*dst)->crypt_header_length, c->new_pp,
			&vk2, NULL);
	if (r < 0 || vk2->size != c->vk->size || memcmp(vk2->key, c->vk->key, c->vk->size)) {
		log_err("%s: the new passphrase does not open the new image with its volume key.", tmp);
		r = r < 0 ? r : -EIO;
		goto out;
	}
	r = qcow2_check(*dst, &res);
	if (r == 0 && (res.corruptions || res.leaks || res.check_errors)) {
		log_err("%s: the new image fails the refcount check (%" PRIu64 " corruptions, %" PRIu64
			" leaks).", tmp, res.corruptions, res.leaks);
		r = -EIO;
	}
out:
	volume_key_free(vk2);
	return r;
}

/* Every cluster of dst reads as the source's. */
static int verify_clusters(struct convert *c, struct image *dst)
{
	struct run_list dalloc;
	struct reader drd;
	uint8_t *a = NULL, *b = NULL;
	uint64_t bc = MAX(1, BATCH_BYTES / c->cs), cl = 0;
	int r;

	run_list_init(&dalloc);
	r = reader_init(&drd, dst, c->new_pp, c->src_pp, c->p->skip_key_check);
	if (r < 0)
		goto out;
	drd.top_vk = c->vk;
	r = image_walk_layer(dst, &dalloc);
	if (r < 0)
		goto out;
	a = malloc((size_t)(bc * c->cs));
	b = malloc((size_t)(bc * c->cs));
	if (!a || !b) {
		r = -ENOMEM;
		goto out;
	}
	progress_start(c, "Verifying ");
	while (cl < c->nclusters) {
		uint64_t n = c->keep_backing ? both_unallocated(&c->alloc, &dalloc, cl, c->cs, c->size,
								c->nclusters) : 0;

		if (!n) {
			n = MIN(bc, c->nclusters - cl);
			r = reader_read(&c->rd, cl * c->cs, a, n * c->cs);
			if (r == 0)
				r = reader_read(&drd, cl * c->cs, b, n * c->cs);
			if (r < 0)
				goto out;
			if (memcmp(a, b, (size_t)(n * c->cs))) {
				for (uint64_t i = 0; i < n; i++)
					if (memcmp(a + i * c->cs, b + i * c->cs, (size_t)c->cs)) {
						log_err("%s: guest offset %" PRIu64 " reads differently from %s.",
							c->out_name, (cl + i) * c->cs, c->p->src_path);
						break;
					}
				r = -EIO;
				goto out;
			}
		}
		cl += n;
		progress_update(c, cl);
	}
	progress_end(c, true);
	log_verbose("%s: every cluster reads back as the source.", c->out_name);
out:
	if (a)
		explicit_bzero(a, (size_t)(bc * c->cs));
	if (b)
		explicit_bzero(b, (size_t)(bc * c->cs));
	free(a);
	free(b);
	run_list_free(&dalloc);
	reader_free(&drd);
	return r;
}

static int verify(struct convert *c)
{
	struct image *dst = NULL;
	bool full = c->p->verify_clusters;
	int r;

	r = verify_header(c, &dst);
	if (r == 0 && full)
		r = verify_clusters(c, dst);
	if (r < 0 && full)
		progress_end(c, false);
	if (dst)
		image_free(dst, &file_io_opener);
	return r;
}

/* ---- the phases ---- */

static bool same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int open_source(struct convert *c)
{
	struct image_open_opts oo = { .format = c->p->format, .snapshot = c->p->snapshot };

	file_opener_init(&c->opener, false, &(struct trust_rules){ .trust_names = c->p->trust_names });
	return image_open_io(&c->opener.ops, c->p->src_io, &oo, &c->src);
}

/* A destination that is not the source chain, new or replaceable; what the
 * result will not keep. */
static int check_target(struct convert *c)
{
	const struct convert_params *p = c->p;
	int r;

	if (!p->in_place) {
		for (struct image *l = c->src; l; l = l->backing)
			if (same_file(p->dst_path, l->path)) {
				log_err("%s is the source or in its backing chain (--in-place replaces the source).",
					p->dst_path);
				return -EINVAL;
			}
		if (access(p->dst_path, F_OK) == 0) {
			if (!p->force) {
				log_err("%s exists (--force overwrites it).", p->dst_path);
				return -EEXIST;
			}
			r = lock_image_replaceable(p->dst_path);
			if (r < 0)
				return r;
		}
	}
	if (c->src->nb_snapshots && !p->snapshot) {
		if (p->in_place && !p->force) {
			log_err("%s has %u internal snapshots, which the converted image would not keep "
				"(--force drops them; or convert to a new file).", p->src_path, c->src->nb_snapshots);
			return -EINVAL;
		}
		log_std("%s: its %u internal snapshots are not converted.", p->src_path, c->src->nb_snapshots);
	}
	if (c->src->nb_bitmaps)
		log_std("%s: its %u persistent dirty bitmaps are not converted.", p->src_path, c->src->nb_bitmaps);
	return 0;
}

/* The backing file name for the result at dst: the source's, unless it
 * resolves to another file from dst's folder (then its absolute path). */
static int backing_name_for(const struct image *src, const char *dst, char **name)
{
	char *resolved, real[PATH_MAX];
	bool same;

	*name = NULL;
	resolved = image_resolve_path(dst, src->backing_file);
	if (!resolved)
		return -ENOMEM;
	same = same_file(resolved, src->backing_path);
	free(resolved);
	if (same) {
		*name = strdup(src->backing_file);
	} else {
		if (!realpath(src->backing_path, real))
			return -errno;
		log_std("Backing file %s is recorded as %s (the name would not resolve from the folder of %s).",
			src->backing_file, real, dst);
		*name = strdup(real);
	}
	return *name ? 0 : -ENOMEM;
}

/* Size, cluster size and backing file of the result; its volume key. */
static int plan_result(struct convert *c)
{
	const struct convert_params *p = c->p;
	int r;

	c->keep_backing = c->src->backing && !p->flatten;
	c->size = c->src->map_size;
	/* the source's cluster size keeps its sparseness exactly */
	if (p->cluster_size)
		c->cs = p->cluster_size;
	else if (c->src->format != IMG_FMT_RAW && c->src->cluster_size >= 512 &&
		 c->src->cluster_size <= (2U << 20))
		c->cs = c->src->cluster_size;
	else
		c->cs = 65536;
	c->nclusters = (c->size + c->cs - 1) / c->cs;
	if (c->keep_backing) {
		r = backing_name_for(c->src, p->dst_path, &c->backing_name);
		if (r < 0)
			return r;
		c->backing_format = c->src->backing_format ? c->src->backing_format
							   : image_format_name(c->src->backing->format);
		for (struct image *l = c->src->backing; l; l = l->backing)
			if (l->crypt_method == IMG_CRYPT_AES)
				log_std("Backing file %s still uses legacy AES encryption, which QEMU no longer "
					"opens in system emulators: convert it too, or use --flatten.", l->path);
	}

	/* the new volume key, and whether OpenSSL can encrypt with it here */
	r = volume_key_generate(p->key_bytes, &c->vk);
	if (r < 0)
		return r;
	return luks_data_cipher_new(p->luks->cipher, p->luks->cipher_mode, c->vk, &c->cipher);
}

/* The source passphrase, checked on the first encrypted layer to be read
 * (asked again, up to tries times). */
static int read_source_passphrase(struct convert *c, int depth)
{
	const struct convert_params *p = c->p;
	unsigned int tries = p->tries ? p->tries : 1;
	int r = -EPERM;

	for (unsigned int i = 0; i < tries; i++) {
		r = p->read_passphrase(p->opaque, c->rd.layer[depth]->path, &c->src_pp);
		if (r < 0)
			return r;
		c->rd.top_pp = c->rd.backing_pp = c->src_pp;
		r = reader_layer_key(&c->rd, depth);
		if (r != -EPERM)
			break;
		if (c->rd.layer[depth]->crypt_method == IMG_CRYPT_LUKS)
			log_err("No key available with this passphrase.");
		passphrase_free(c->src_pp);
		c->src_pp = NULL;
		c->rd.top_pp = c->rd.backing_pp = NULL;
	}
	return r;
}

/* The reader of the source, its passphrase, what it allocates. */
static int unlock_source(struct convert *c)
{
	bool mixed;
	int first_enc = -1, r;

	r = reader_init(&c->rd, c->src, NULL, NULL, c->p->skip_key_check);
	if (r < 0)
		return r;
	/* the layers read: the top; the chain with --flatten; backing layers
	 * when clusters of the result can mix top and backing data */
	mixed = c->keep_backing && (c->cs != c->src->cluster_size || c->src->extended_l2);
	for (int d = 0; d < c->rd.nlayers && first_enc < 0; d++)
		if ((d == 0 || !c->keep_backing || mixed) && layer_encrypted(c->rd.layer[d]))
			first_enc = d;
	if (first_enc >= 0) {
		r = read_source_passphrase(c, first_enc);
		if (r < 0)
			return r;
	}
	if (c->keep_backing || !c->src->backing)
		return image_walk_layer(c->src, &c->alloc);
	for (size_t i = 0; i < c->rd.runs.count && r == 0; i++)
		r = run_list_add(&c->alloc, &c->rd.runs.runs[i]);
	return r;
}

/* The new passphrase and LUKS header; the target file and its writer. */
static int prepare_target(struct convert *c)
{
	const struct convert_params *p = c->p;
	struct qcow2_create_params wp = { 0 };
	int fd, r;

	r = p->read_new_passphrase(p->opaque, p->dst_path, c->src_pp, &c->new_pp);
	if (r < 0)
		return r;
	r = luks_format_region(p->luks, c->vk, c->new_pp, &c->region, &c->region_len);
	if (r < 0)
		return r;
	r = p->create_target(p->opaque, p->dst_path, &fd, &c->out_name);
	if (r < 0)
		return r;
	c->target_created = true;
	wp.size = c->size;
	wp.cluster_bits = (uint32_t)__builtin_ctzll(c->cs);
	wp.backing_file = c->backing_name;
	wp.backing_format = c->backing_format;
	wp.crypt_header = c->region;
	wp.crypt_header_len = c->region_len;
	r = qcow2_create_begin(fd, &wp, &c->w);
	if (r < 0 && r != -EINVAL && r != -EFBIG && r != -ENOMEM)
		log_err("Cannot write %s: %s.", c->out_name, strerror(-r));
	return r;
}

static int copy_clusters(struct convert *c)
{
	int r;

	progress_start(c, "Converting");
	r = convert_clusters(c);
	if (r == 0) {
		r = qcow2_create_finish(c->w);
		if (r < 0 && r != -ENOMEM)
			log_err("Cannot write %s: %s.", c->out_name, strerror(-r));
	}
	progress_end(c, r == 0);
	if (r < 0)
		log_err("Conversion failed: %s is untouched.", c->p->src_path);
	return r;
}

static int verify_and_commit(struct convert *c)
{
	const struct convert_params *p = c->p;
	int r;

	r = verify(c);
	if (r < 0) {
		log_err("Verification of %s failed: %s is left as it was.", c->out_name,
			p->in_place ? p->src_path : p->dst_path);
		return r;
	}
	r = p->commit_target(p->opaque);
	if (r == 0)
		log_verbose("%s: LUKS qcow2 (%s-%s, %zu-bit key), %" PRIu64 "-byte clusters%s%s.", p->dst_path,
			    p->luks->cipher, p->luks->cipher_mode, p->key_bytes * 8, c->cs,
			    c->backing_name ? ", backing file " : "", c->backing_name ? c->backing_name : "");
	return r;
}

int convert_image(const struct convert_params *p)
{
	static int (*const phases[])(struct convert *c) = {
		open_source, check_target, plan_result, unlock_source, prepare_target, copy_clusters,
		verify_and_commit,
	};
	struct convert c;
	int r = 0;

	memset(&c, 0, sizeof(c));
	c.p = p;
	run_list_init(&c.alloc);
	for (size_t i = 0; i < ARRAY_SIZE(phases) && r == 0; i++)
		r = phases[i](&c);

	if (r < 0 && c.target_created)
		p->abort_target(p->opaque);
	qcow2_create_free(c.w);
	luks_data_cipher_free(c.cipher);
	reader_free(&c.rd);
	run_list_free(&c.alloc);
	if (c.src)
		image_free(c.src, &file_io_opener);
	free(c.region);
	free(c.backing_name);
	volume_key_free(c.vk);
	if (c.new_pp != c.src_pp)
		passphrase_free(c.new_pp);
	passphrase_free(c.src_pp);
	return r;
}
