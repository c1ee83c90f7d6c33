/* Creating qcow2 images and in-place LUKS header updates. See
 * qcow2_create.h for the layout and the write order. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keys.h"
#include "log.h"
#include "qcow2.h"
#include "qcow2_create.h"
#include "sysutil.h"
#include "util.h"

#define NEW_HEADER_LENGTH	112	/* v3 header with compression_type, as QEMU 5.1+ */
#define NEW_REFCOUNT_ORDER	4	/* 16-bit refcounts, QEMU's default */
#define WRITE_BUFFER		(8U << 20)
#define SECTOR		512U

struct extent {
	uint64_t count;
	uint8_t state;
};

struct qcow2_create {
	int fd;
	uint64_t size;
	uint32_t cluster_bits;
	uint64_t cs;
	uint64_t guest_clusters;
	char *backing_file;
	char *backing_format;
	bool encrypted;
	uint64_t crypt_offset;
	uint64_t crypt_len;

	uint64_t pos;		/* guest clusters declared */
	uint64_t data_offset;	/* first data cluster */
	uint64_t ndata;		/* data clusters written */
	struct extent *ext;
	size_t next, ext_alloc;

	uint8_t *wbuf;		/* pending sequential data */
	size_t wlen;
	uint64_t woff;		/* host offset of wbuf[0] */
};

static int sync_fd(int fd, bool data_only)
{
	int r = data_only ? fdatasync(fd) : fsync(fd);

	return r < 0 ? -errno : 0;
}

uint64_t qcow2_create_next_data_offset(const struct qcow2_create *w)
{
	return w->data_offset + w->ndata * w->cs;
}

void qcow2_create_free(struct qcow2_create *w)
{
	if (!w)
		return;
	free(w->backing_file);
	free(w->backing_format);
	free(w->ext);
	free(w->wbuf);
	free(w);
}

/* Bytes the header cluster needs: header, extensions, backing name. */
static uint64_t header_bytes(const struct qcow2_create *w)
{
	uint64_t n = NEW_HEADER_LENGTH;

	if (w->backing_format)
		n += 8 + round_up_pow2(strlen(w->backing_format), 8);
	if (w->encrypted)
		n += 8 + 16;
	n += 8;		/* end of extensions */
	if (w->backing_file)
		n += strlen(w->backing_file);
	return n;
}

int qcow2_create_begin(int fd, const struct qcow2_create_params *p, struct qcow2_create **out)
{
	struct qcow2_create *w;
	uint64_t clusters, bytes;
	uint8_t *pad = NULL;
	int r;

	*out = NULL;
	if (p->cluster_bits < QCOW2_MIN_CLUSTER_BITS || p->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		log_err("Cluster size must be a power of two from %u to %u bytes.",
			1U << QCOW2_MIN_CLUSTER_BITS, 1U << QCOW2_MAX_CLUSTER_BITS);
		return -EINVAL;
	}
	if (p->size > (1ULL << 56)) {	/* QEMU's QCOW_MAX_... L2 entry reach */
		log_err("Virtual size %" PRIu64 " is too large for qcow2.", p->size);
		return -EFBIG;
	}
	if (p->crypt_header && (!p->crypt_header_len || p->crypt_header_len > LUKS_MAX_HEADER_LENGTH))
		return -EINVAL;
	if (p->backing_file && (!p->backing_file[0] || strlen(p->backing_file) > QCOW2_MAX_BACKING_NAME)) {
		log_err("Backing file name is empty or longer than %d bytes.", QCOW2_MAX_BACKING_NAME);
		return -EINVAL;
	}
	if (p->backing_format && (!p->backing_format[0] || strlen(p->backing_format) > 64))
		return -EINVAL;

	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->fd = fd;
	w->size = p->size;
	w->cluster_bits = p->cluster_bits;
	w->cs = 1ULL << p->cluster_bits;
	w->guest_clusters = (p->size + w->cs - 1) >> p->cluster_bits;
	w->encrypted = p->crypt_header != NULL;
	if (p->backing_file && !(w->backing_file = strdup(p->backing_file)))
		goto nomem;
	if (p->backing_format && !(w->backing_format = strdup(p->backing_format)))
		goto nomem;
	/* L1 entries: at most QEMU's 32 MiB L1 table */
	if (((w->guest_clusters + (w->cs / 8) - 1) / (w->cs / 8)) * 8 > QCOW2_MAX_L1_BYTES) {
		log_err("Virtual size %" PRIu64 " needs an L1 table over %u MiB: use a larger cluster size.",
			p->size, QCOW2_MAX_L1_BYTES >> 20);
		r = -EFBIG;
		goto fail;
	}
	if (header_bytes(w) > w->cs) {
		log_err("The header, extensions and backing file name (%" PRIu64 " bytes) do not fit in a %" PRIu64
			"-byte cluster.", header_bytes(w), w->cs);
		r = -EINVAL;
		goto fail;
	}
	w->wbuf = malloc(WRITE_BUFFER);
	if (!w->wbuf)
		goto nomem;

	clusters = 1;
	if (w->encrypted) {
		w->crypt_offset = w->cs;
		w->crypt_len = p->crypt_header_len;
		bytes = round_up_pow2(p->crypt_header_len, w->cs);
		r = fd_pwrite_all(fd, p->crypt_header, (size_t)p->crypt_header_len, w->crypt_offset);
		if (r == 0 && bytes > p->crypt_header_len) {
			pad = calloc(1, (size_t)(bytes - p->crypt_header_len));
			if (!pad)
				goto nomem;
			r = fd_pwrite_all(fd, pad, (size_t)(bytes - p->crypt_header_len),
				       w->crypt_offset + p->crypt_header_len);
		}
		if (r < 0)
			goto fail;
		clusters += bytes / w->cs;
	}
	w->data_offset = clusters * w->cs;
	w->woff = w->data_offset;
	free(pad);
	*out = w;
	return 0;
nomem:
	r = -ENOMEM;
fail:
	free(pad);
	qcow2_create_free(w);
	return r;
}

static int flush_data(struct qcow2_create *w)
{
	int r;

	if (!w->wlen)
		return 0;
	r = fd_pwrite_all(w->fd, w->wbuf, w->wlen, w->woff);
	if (r < 0)
		return r;
	w->woff += w->wlen;
	w->wlen = 0;
	return 0;
}

static int add_extent(struct qcow2_create *w, uint64_t count, enum qcow2_create_state state)
{
	struct extent *n;

	if (w->next && w->ext[w->next - 1].state == state) {
		w->ext[w->next - 1].count += count;
		return 0;
	}
	if (w->next == w->ext_alloc) {
		size_t alloc = w->ext_alloc ? w->ext_alloc * 2 : 64;

		n = realloc(w->ext, alloc * sizeof(*n));
		if (!n)
			return -ENOMEM;
		w->ext = n;
		w->ext_alloc = alloc;
	}
	w->ext[w->next++] = (struct extent){ .count = count, .state = (uint8_t)state };
	return 0;
}

int qcow2_create_add(struct qcow2_create *w, uint64_t count, enum qcow2_create_state state, const void *data)
{
	uint64_t bytes;
	int r;

	if (!count)
		return 0;
	if (count > w->guest_clusters - w->pos || state > QCOW2_CREATE_DATA || (state == QCOW2_CREATE_DATA && !data))
		return -EINVAL;
	if (state == QCOW2_CREATE_DATA) {
		bytes = count << w->cluster_bits;
		if (w->wlen + bytes > WRITE_BUFFER) {
			r = flush_data(w);
			if (r < 0)
				return r;
		}
		if (bytes > WRITE_BUFFER) {
			r = fd_pwrite_all(w->fd, data, (size_t)bytes, w->woff);
			if (r < 0)
				return r;
			w->woff += bytes;
		} else {
			memcpy(w->wbuf + w->wlen, data, (size_t)bytes);
			w->wlen += (size_t)bytes;
		}
		w->ndata += count;
	}
	r = add_extent(w, count, state);
	if (r < 0)
		return r;
	w->pos += count;
	return 0;
}

/* Write the L2 tables from host offset *next (advanced), fill l1. */
static int write_l2_tables(struct qcow2_create *w, uint64_t *l1, uint64_t *next)
{
	uint64_t n = w->cs / 8, g = 0, host_data = w->data_offset, cur = UINT64_MAX;
	bool used = false;
	uint8_t *l2;
	int r = 0;

	l2 = calloc(1, w->cs);
	if (!l2)
		return -ENOMEM;
	for (size_t i = 0; i < w->next; i++) {
		const struct extent *e = &w->ext[i];

		for (uint64_t k = 0; k < e->count;) {
			uint64_t idx = g / n, first = g % n, in_table = MIN(e->count - k, n - first);

			if (idx != cur) {
				if (used) {
					r = fd_pwrite_all(w->fd, l2, w->cs, *next);
					if (r < 0)
						goto out;
					l1[cur] = *next | QCOW2_OFLAG_COPIED;
					*next += w->cs;
				}
				memset(l2, 0, w->cs);
				cur = idx;
				used = false;
			}
			if (e->state != QCOW2_CREATE_UNALLOC) {
				used = true;
				for (uint64_t j = 0; j < in_table; j++) {
					uint64_t entry;

					if (e->state == QCOW2_CREATE_ZERO) {
						entry = QCOW2_OFLAG_ZERO;
					} else {
						entry = host_data | QCOW2_OFLAG_COPIED;
						host_data += w->cs;
					}
					put_be64(l2 + (first + j) * 8, entry);
				}
			}
			g += in_table;
			k += in_table;
		}
	}
	if (used) {
		r = fd_pwrite_all(w->fd, l2, w->cs, *next);
		if (r < 0)
			goto out;
		l1[cur] = *next | QCOW2_OFLAG_COPIED;
		*next += w->cs;
	}
out:
	free(l2);
	return r;
}

static int write_header(struct qcow2_create *w, uint32_t l1_size, uint64_t l1_offset,
			uint64_t reftable_offset, uint64_t reftable_clusters)
{
	uint8_t *h;
	uint64_t p = NEW_HEADER_LENGTH;
	size_t n;
	int r;

	h = calloc(1, w->cs);
	if (!h)
		return -ENOMEM;
	put_be32(h + QCOW2_HDR_MAGIC, QCOW_MAGIC);
	put_be32(h + QCOW2_HDR_VERSION, 3);
	put_be32(h + QCOW2_HDR_CLUSTER_BITS, w->cluster_bits);
	put_be64(h + QCOW2_HDR_SIZE, w->size);
	put_be32(h + QCOW2_HDR_CRYPT_METHOD, w->encrypted ? IMG_CRYPT_LUKS : IMG_CRYPT_NONE);
	put_be32(h + QCOW2_HDR_L1_SIZE, l1_size);
	put_be64(h + QCOW2_HDR_L1_OFFSET, l1_offset);
	put_be64(h + QCOW2_HDR_REFTABLE_OFFSET, reftable_offset);
	put_be32(h + QCOW2_HDR_REFTABLE_CLUSTERS, (uint32_t)reftable_clusters);
	/* 60 nb_snapshots, 64 snapshots_offset, 72..95 feature bits: 0 */
	put_be32(h + QCOW2_HDR_REFCOUNT_ORDER, NEW_REFCOUNT_ORDER);
	put_be32(h + QCOW2_HDR_HEADER_LENGTH, NEW_HEADER_LENGTH);
	h[104] = QCOW2_COMPRESSION_ZLIB;

	/* extensions in QEMU's order */
	if (w->backing_format) {
		n = strlen(w->backing_format);
		put_be32(h + p, QCOW2_EXT_BACKING_FORMAT);
		put_be32(h + p + 4, (uint32_t)n);
		memcpy(h + p + 8, w->backing_format, n);
		p += 8 + round_up_pow2(n, 8);
	}
	if (w->encrypted) {
		put_be32(h + p, QCOW2_EXT_CRYPT_HEADER);
		put_be32(h + p + 4, 16);
		put_be64(h + p + 8, w->crypt_offset);
		put_be64(h + p + 16, w->crypt_len);
		p += 24;
	}
	p += 8;		/* QCOW2_EXT_END */
	if (w->backing_file) {
		n = strlen(w->backing_file);
		put_be64(h + QCOW2_HDR_BACKING_OFFSET, p);
		put_be32(h + QCOW2_HDR_BACKING_SIZE, (uint32_t)n);
		memcpy(h + p, w->backing_file, n);
	}
	r = fd_pwrite_all(w->fd, h, w->cs, 0);
	free(h);
	return r;
}

int qcow2_create_finish(struct qcow2_create *w)
{
	uint64_t n = w->cs / 8, rpb = w->cs * 8 / (1U << NEW_REFCOUNT_ORDER);
	uint64_t l1_size, l1_clusters, next, l1_offset, base, rt = 1, rb = 1, total, reft_offset, rb_offset;
	uint64_t *l1 = NULL;
	uint8_t *buf = NULL;
	int r;

	if (w->pos != w->guest_clusters) {
		log_err("Internal error: %" PRIu64 " of %" PRIu64 " guest clusters declared.", w->pos,
			w->guest_clusters);
		return -EINVAL;
	}
	r = flush_data(w);
	if (r < 0)
		return r;

	l1_size = (w->guest_clusters + n - 1) / n;
	l1_clusters = MAX(1, (l1_size * 8 + w->cs - 1) / w->cs);
	l1 = calloc(l1_clusters, w->cs / 8 * sizeof(*l1));
	buf = calloc(1, w->cs);
	if (!l1 || !buf) {
		r = -ENOMEM;
		goto out;
	}

	next = w->data_offset + w->ndata * w->cs;
	r = write_l2_tables(w, l1, &next);
	if (r < 0)
		goto out;

	l1_offset = next;
	next += l1_clusters * w->cs;
	/* refcount table and blocks cover every cluster including themselves */
	base = next / w->cs;
	for (;;) {
		uint64_t nrb, nrt;

		total = base + rt + rb;
		nrb = (total + rpb - 1) / rpb;
		nrt = (nrb * 8 + w->cs - 1) / w->cs;
		if (nrb == rb && nrt == rt)
			break;
		rb = nrb;
		rt = nrt;
	}
	if (rt * w->cs > QCOW2_MAX_REFTABLE_BYTES) {
		r = -EFBIG;
		goto out;
	}
	reft_offset = next;
	rb_offset = reft_offset + rt * w->cs;

	/* L1, big-endian in place */
	for (uint64_t i = 0; i < l1_clusters * (w->cs / 8); i++)
		put_be64(&l1[i], l1[i]);
	r = fd_pwrite_all(w->fd, l1, l1_clusters * w->cs, l1_offset);
	if (r < 0)
		goto out;

	/* refcount blocks: every cluster of [0, total) has refcount 1 */
	for (uint64_t b = 0; b < rb; b++) {
		memset(buf, 0, w->cs);
		for (uint64_t i = 0; i < rpb && b * rpb + i < total; i++)
			put_be16(buf + i * 2, 1);
		r = fd_pwrite_all(w->fd, buf, w->cs, rb_offset + b * w->cs);
		if (r < 0)
			goto out;
	}
	/* refcount table */
	for (uint64_t c = 0; c < rt; c++) {
		memset(buf, 0, w->cs);
		for (uint64_t i = 0; i < n && c * n + i < rb; i++)
			put_be64(buf + i * 8, rb_offset + (c * n + i) * w->cs);
		r = fd_pwrite_all(w->fd, buf, w->cs, reft_offset + c * w->cs);
		if (r < 0)
			goto out;
	}
	if (ftruncate(w->fd, (off_t)(total * w->cs)) < 0) {
		r = -errno;
		goto out;
	}
	r = sync_fd(w->fd, true);
	if (r < 0)
		goto out;
	r = write_header(w, (uint32_t)l1_size, l1_offset, reft_offset, rt);
	if (r < 0)
		goto out;
	r = sync_fd(w->fd, false);
	log_dbg("qcow2 written: %" PRIu64 " clusters, %" PRIu64 " data, L1 at 0x%" PRIx64
		", refcount table at 0x%" PRIx64 " (%" PRIu64 " blocks).",
		total, w->ndata, l1_offset, reft_offset, rb);
out:
	free(l1);
	free(buf);
	return r;
}

/* ---- LUKS header region updates ---- */

/* Write the sectors of [start, end) of the region that differ, except those
 * marked in skip (one byte per sector, may be NULL); mark what is written. */
static int write_changed(int fd, uint64_t off, const uint8_t *old, const uint8_t *new,
			 uint64_t start, uint64_t end, uint8_t *skip, bool *wrote)
{
	uint64_t s = start, e;
	int r;

	while (s < end) {
		e = s;
		while (e < end && !(skip && skip[e / SECTOR]) &&
		       memcmp(old + e, new + e, (size_t)MIN((uint64_t)SECTOR, end - e)))
			e = MIN(end, e + SECTOR);
		if (e == s) {
			s = MIN(end, s + SECTOR);
			continue;
		}
		r = fd_pwrite_all(fd, new + s, (size_t)(e - s), off + s);
		if (r < 0)
			return r;
		if (skip)
			memset(skip + s / SECTOR, 1, (size_t)((e - s + SECTOR - 1) / SECTOR));
		*wrote = true;
		s = e;
	}
	return 0;
}

int qcow2_update_crypt_header(int fd, uint64_t off, const uint8_t *old, const uint8_t *new,
				     uint64_t len)
{
	struct luks_info oi, ni;
	uint64_t hdr_end = len;
	uint8_t *done;
	bool wrote = false;
	int r;

	if (luks_parse_header(old, len, &oi) < 0 || luks_parse_header(new, len, &ni) < 0)
		return -EUCLEAN;
	done = calloc(1, (size_t)((len + SECTOR - 1) / SECTOR));
	if (!done)
		return -ENOMEM;
	for (int i = 0; i < LUKS_NUM_SLOTS; i++)
		if (ni.slots[i].key_offset >= LUKS_PHDR_SIZE)
			hdr_end = MIN(hdr_end, ni.slots[i].key_offset);
	hdr_end = MIN(len, round_up_pow2(hdr_end, SECTOR));

	/* 1: key material of the slots new enables (or keeps): a crash here
	 * leaves the old header, which does not point at it */
	for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
		uint64_t s = ni.slots[i].key_offset, e;

		if (!ni.slots[i].active)
			continue;
		e = MIN(len, s + round_up_pow2((uint64_t)ni.key_bytes * ni.slots[i].stripes, SECTOR));
		r = write_changed(fd, off, old, new, s, e, done, &wrote);
		if (r < 0)
			goto out;
	}
	if (wrote) {
		r = sync_fd(fd, true);
		if (r < 0)
			goto out;
	}
	/* 2: the binary header: slots switch state here */
	wrote = false;
	r = write_changed(fd, off, old, new, 0, hdr_end, done, &wrote);
	if (r == 0 && wrote)
		r = sync_fd(fd, true);
	if (r < 0)
		goto out;
	/* 3: the rest: wiped material of the slots new disables */
	wrote = false;
	r = write_changed(fd, off, old, new, hdr_end, len, done, &wrote);
	if (r == 0 && wrote)
		r = sync_fd(fd, true);
out:
	free(done);
	return r;
}

/* ---- Header extensions ---- */

int qcow2_header_set_extension(uint8_t *hdr, size_t size, uint32_t type, const void *data, uint32_t len,
			       size_t *used)
{
	uint32_t version, hlen, backing_len;
	uint64_t backing_off, end, off, old_end;
	uint8_t *out = NULL;
	size_t o;
	int r = -EUCLEAN;

	*used = 0;
	if (size < QCOW2_HDR_V2_SIZE)
		return -EUCLEAN;
	version = get_be32(hdr + QCOW2_HDR_VERSION);
	hlen = version >= 3 && size >= QCOW2_HDR_V3_SIZE ? get_be32(hdr + QCOW2_HDR_HEADER_LENGTH) : QCOW2_HDR_V2_SIZE;
	backing_off = get_be64(hdr + QCOW2_HDR_BACKING_OFFSET);
	backing_len = backing_off ? get_be32(hdr + QCOW2_HDR_BACKING_SIZE) : 0;
	if (hlen < QCOW2_HDR_V2_SIZE || hlen > size || hlen % 8 ||
	    (backing_off && (backing_off < hlen || backing_len > size || backing_off > size - backing_len)))
		return -EUCLEAN;
	end = backing_off ? backing_off : size;
	old_end = backing_off ? backing_off + backing_len : hlen;
	out = calloc(1, size);
	if (!out)
		return -ENOMEM;
	memcpy(out, hdr, hlen);
	o = hlen;
	/* the extensions kept, in their order */
	for (off = hlen; off < end;) {
		uint32_t t, l;
		uint64_t next;

		if (end - off < QCOW2_EXT_HDR_SIZE)
			goto out;
		t = get_be32(hdr + off);
		l = get_be32(hdr + off + 4);
		if (t == QCOW2_EXT_END) {
			old_end = MAX(old_end, off + QCOW2_EXT_HDR_SIZE);
			break;
		}
		next = off + QCOW2_EXT_HDR_SIZE + round_up_pow2(l, 8);
		if (l > end - off - QCOW2_EXT_HDR_SIZE || next > end)
			goto out;
		if (t != type) {
			memcpy(out + o, hdr + off, (size_t)(next - off));
			o += (size_t)(next - off);
		}
		off = next;
		old_end = MAX(old_end, off);
	}
	r = -ENOSPC;
	if (data) {
		if ((uint64_t)len + 2 * QCOW2_EXT_HDR_SIZE + 8 > size - o)
			goto out;
		put_be32(out + o, type);
		put_be32(out + o + 4, len);
		memcpy(out + o + QCOW2_EXT_HDR_SIZE, data, len);
		o += QCOW2_EXT_HDR_SIZE + (size_t)round_up_pow2(len, 8);
	}
	if (size - o < QCOW2_EXT_HDR_SIZE + (uint64_t)backing_len)
		goto out;
	o += QCOW2_EXT_HDR_SIZE;	/* the end marker: zeros */
	if (backing_off) {
		memcpy(out + o, hdr + backing_off, backing_len);
		put_be64(out + QCOW2_HDR_BACKING_OFFSET, o);
		o += backing_len;
	}
	memcpy(hdr, out, size);
	*used = (size_t)MAX((uint64_t)o, old_end);
	r = 0;
out:
	free(out);
	return r;
}

int qcow2_update_header_extension(int fd, uint64_t limit, uint32_t type, const void *data, uint32_t len)
{
	uint8_t head[QCOW2_HDR_V3_SIZE], *hdr = NULL;
	uint32_t bits;
	size_t size, used;
	ssize_t n;
	int r;

	n = pread(fd, head, sizeof(head), 0);
	if (n < (ssize_t)QCOW2_HDR_V2_SIZE)
		return n < 0 ? -errno : -EUCLEAN;
	bits = get_be32(head + QCOW2_HDR_CLUSTER_BITS);
	if (get_be32(head + QCOW2_HDR_MAGIC) != QCOW_MAGIC || get_be32(head + QCOW2_HDR_VERSION) < 2 || bits < 9 || bits > 21)
		return -EUCLEAN;
	size = (size_t)MIN((uint64_t)1 << bits, limit);
	hdr = calloc(1, size);
	if (!hdr)
		return -ENOMEM;
	n = pread(fd, hdr, size, 0);
	if (n < 0) {
		r = -errno;
		goto out;
	}
	size = (size_t)n;
	r = qcow2_header_set_extension(hdr, size, type, data, len, &used);
	if (r == 0)
		r = fd_pwrite_all(fd, hdr, used, 0);
	if (r == 0)
		r = sync_fd(fd, true);
out:
	free(hdr);
	return r;
}
