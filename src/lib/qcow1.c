/* Legacy qcow (version 1): header and L1/L2 walk. No refcounts, no zero
 * clusters; optional AES encryption (crypt_method 1). */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "qcow2.h"
#include "util.h"

#define QCOW1_HEADER_SIZE 48
#define QCOW1_OFLAG_COMPRESSED (1ULL << 63)

int qcow1_open(struct image *img)
{
	uint8_t h[QCOW1_HEADER_SIZE];
	uint64_t backing_off, shift_size, l1;
	uint32_t backing_len;
	int r;

	if (img->io.size < QCOW1_HEADER_SIZE) {
		log_err("%s: file is too small for a qcow header (%" PRIu64 " bytes).", img->path, img->io.size);
		return -EUCLEAN;
	}
	r = img_pread(&img->io, h, sizeof(h), 0);
	if (r < 0)
		return r;
	if (get_be32(h) != QCOW_MAGIC) {
		log_err("%s: not a qcow image (magic 0x%08x).", img->path, get_be32(h));
		return -EUCLEAN;
	}
	img->version = get_be32(h + 4);
	backing_off = get_be64(h + 8);
	backing_len = get_be32(h + 16);
	img->mtime = get_be32(h + 20);
	img->size = get_be64(h + 24);
	img->cluster_bits = h[32];
	img->l2_bits = h[33];
	img->crypt_method = get_be32(h + 36);
	img->l1_table_offset = get_be64(h + 40);
	img->refcount_order = 0;

	if (img->version != 1) {
		log_err("%s: unsupported qcow version %u.", img->path, img->version);
		return -ENOTSUP;
	}
	if (img->cluster_bits < 9 || img->cluster_bits > 16) {
		log_err("%s: cluster_bits %u is out of range (9..16).", img->path, img->cluster_bits);
		return -EUCLEAN;
	}
	if (img->l2_bits < 6 || img->l2_bits > 13) {
		log_err("%s: l2_bits %u is out of range (6..13).", img->path, img->l2_bits);
		return -EUCLEAN;
	}
	if (img->crypt_method > IMG_CRYPT_AES) {
		log_err("%s: unsupported qcow encryption method %u.", img->path, img->crypt_method);
		return -ENOTSUP;
	}
	img->cluster_size = 1ULL << img->cluster_bits;
	shift_size = 1ULL << (img->cluster_bits + img->l2_bits);
	if (img->size < 2 || img->size > INT64_MAX - shift_size) {
		log_err("%s: virtual size %" PRIu64 " is out of range.", img->path, img->size);
		return -EUCLEAN;
	}
	l1 = (img->size + shift_size - 1) / shift_size;
	img->size &= ~511ULL;	/* QEMU: total_sectors = size / 512 */
	if (l1 > QCOW2_MAX_L1_BYTES / 8) {
		log_err("%s: L1 table of %" PRIu64 " entries is too large.", img->path, l1);
		return -EUCLEAN;
	}
	img->l1_size = (uint32_t)l1;
	if (!is_aligned(img->l1_table_offset, 8) || img->l1_table_offset < QCOW1_HEADER_SIZE) {
		log_err("%s: L1 table offset 0x%" PRIx64 " is invalid.", img->path, img->l1_table_offset);
		return -EUCLEAN;
	}
	if (backing_off) {
		if (!backing_len || backing_len > QCOW2_MAX_BACKING_NAME || backing_off < QCOW1_HEADER_SIZE ||
		    !image_range_in_file(&img->io, backing_off, backing_len)) {
			log_err("%s: backing file name at 0x%" PRIx64 " (%u bytes) is invalid.", img->path, backing_off,
				backing_len);
			return -EUCLEAN;
		}
		img->backing_file = calloc(1, backing_len + 1);
		if (!img->backing_file)
			return -ENOMEM;
		r = img_pread(&img->io, img->backing_file, backing_len, backing_off);
		if (r < 0)
			return r;
		if (strlen(img->backing_file) != backing_len) {
			log_err("%s: backing file name contains a NUL byte.", img->path);
			return -EUCLEAN;
		}
	}
	r = qcow2_read_table(img, img->l1_table_offset, img->l1_size, QCOW2_MAX_L1_BYTES, "L1 table", &img->l1);
	if (r < 0)
		return r;
	img->map_l1_size = img->l1_size;
	img->map_size = img->size;
	return 0;
}

int qcow1_walk(struct image *img, struct run_list *out)
{
	uint64_t cs = img->cluster_size, n = 1ULL << img->l2_bits, per_l1 = n * cs, end = img->map_size;
	uint64_t l2_bytes = n * 8, off_mask = (1ULL << (63 - img->cluster_bits)) - 1;
	uint8_t *l2;
	int r = 0;

	l2 = malloc(l2_bytes);
	if (!l2)
		return -ENOMEM;
	for (uint64_t i = 0; i < img->map_l1_size && i * per_l1 < end; i++) {
		uint64_t l2_off = img->l1[i], base = i * per_l1;
		struct run run = { .guest = base, .kind = RUN_UNALLOC, .len = MIN(per_l1, end - base) };

		if (!l2_off) {
			r = run_list_add(out, &run);
			if (r < 0)
				goto out;
			continue;
		}
		if (!is_aligned(l2_off, 512)) {
			log_err("%s: guest offset 0x%" PRIx64 ": L2 table at host offset 0x%" PRIx64 " is not sector aligned.",
				img->path, base, l2_off);
			r = -EUCLEAN;
			goto out;
		}
		if (!image_range_in_file(&img->io, l2_off, l2_bytes)) {
			log_err("%s: guest offset 0x%" PRIx64 ": L2 table at host offset 0x%" PRIx64 " lies beyond the end of the file (size %" PRIu64 ").",
				img->path, base, l2_off, img->io.size);
			r = -EUCLEAN;
			goto out;
		}
		r = img_pread(&img->io, l2, l2_bytes, l2_off);
		if (r < 0)
			goto out;
		for (uint64_t j = 0; j < n && base + j * cs < end; j++) {
			uint64_t e = get_be64(l2 + j * 8), guest = base + j * cs;

			run = (struct run){ .guest = guest, .len = MIN(cs, end - guest) };
			if (e & QCOW1_OFLAG_COMPRESSED) {
				run.kind = RUN_COMPRESSED;
				run.host = e & off_mask;
				run.clen = (uint32_t)((e >> (63 - img->cluster_bits)) & (cs - 1));
				if (!run.clen) {
					log_err("%s: guest offset 0x%" PRIx64 ": compressed cluster of length 0.", img->path, guest);
					r = -EUCLEAN;
					goto out;
				}
			} else if (e) {
				if (!is_aligned(e, 512)) {
					log_err("%s: guest offset 0x%" PRIx64 ": cluster at host offset 0x%" PRIx64 " is not sector aligned.",
						img->path, guest, e);
					r = -EUCLEAN;
					goto out;
				}
				run.kind = RUN_DATA;
				run.host = e;
			} else {
				run.kind = RUN_UNALLOC;
			}
			r = run_list_add(out, &run);
			if (r < 0)
				goto out;
		}
	}
out:
	free(l2);
	return r;
}
