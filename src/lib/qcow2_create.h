/* Creating qcow2 images (format, convert: qcow2_create_*) and updating
 * the LUKS header region of an image in place (key slots:
 * qcow2_update_crypt_header), written to a descriptor in an order that
 * leaves a usable image at every step. Not the writer of read-write
 * mappings: that is qcow2_rw.h.
 *
 * New images are qcow2 v3 (compat 1.1), refcount_order 4, no lazy
 * refcounts, laid out as:
 *   cluster 0               header, extensions (LUKS header, backing
 *                           format), backing file name
 *   clusters 1..            the LUKS header region (encrypted images)
 *   data                    data clusters, in guest order, contiguous
 *   L2 tables, L1 table, refcount table, refcount blocks
 * Every cluster of the file has refcount 1; QEMU appends after it. The
 * header is written last, after an fsync of everything else, and fsynced:
 * a file with a valid header is complete. The caller writes new images
 * beside their final name and renames them into place. */
#ifndef QS_QCOW2_CREATE_H
#define QS_QCOW2_CREATE_H

#include <stdbool.h>
#include <stdint.h>

/* What a guest cluster of the new image is. */
enum qcow2_create_state {
	QCOW2_CREATE_UNALLOC = 0,	/* not allocated: the backing file, or zeros */
	QCOW2_CREATE_ZERO,	/* zero cluster (v3 zero flag, no host cluster) */
	QCOW2_CREATE_DATA,	/* data cluster, written by the caller's data */
};

struct qcow2_create_params {
	uint64_t size;			/* guest bytes */
	uint32_t cluster_bits;		/* 9..21 */
	const char *backing_file;	/* NULL: none */
	const char *backing_format;	/* NULL: not recorded */
	const uint8_t *crypt_header;	/* LUKS region (crypt_method 2); NULL: unencrypted */
	uint64_t crypt_header_len;
};

struct qcow2_create;

/* Start a new image on fd (an empty file opened for writing). Writes the
 * LUKS header region at once. Returns 0, -EINVAL (parameters: size,
 * cluster size, a backing name that does not fit in the header cluster),
 * -EFBIG (an image too large for the format), -ENOMEM or the write error. */
int qcow2_create_begin(int fd, const struct qcow2_create_params *p, struct qcow2_create **out);
void qcow2_create_free(struct qcow2_create *w);

/* Host offset the next data cluster will get: what its IV derives from. */
uint64_t qcow2_create_next_data_offset(const struct qcow2_create *w);

/* Declare the next count guest clusters (from cluster 0, in order) as
 * state. For QCOW2_CREATE_DATA, data holds count clusters, already encrypted for the
 * host offsets qcow2_create_next_data_offset() gave, and is written (the
 * writer buffers sequential writes). Returns 0, -EINVAL (past the end of
 * the image), -ENOMEM or the write error (-ENOSPC, -EFBIG, -EIO). */
int qcow2_create_add(struct qcow2_create *w, uint64_t count, enum qcow2_create_state state, const void *data);

/* Every guest cluster declared: write the L2 tables, the L1 table and the
 * refcounts, fsync, write the header, fsync. Returns 0 or -errno. */
int qcow2_create_finish(struct qcow2_create *w);

/* Update the LUKS header region [off, off+len) of the image on fd from
 * old (what is on disk) to new, so that a crash at any point leaves a
 * header that opens with every passphrase that works in both: first the
 * key material of the slots active in new, fsync; then the binary header,
 * fsync; then the rest (wiped material of disabled slots), fsync. Only
 * changed sectors are written. Returns 0, -EUCLEAN (not LUKS1 headers) or
 * the write error. */
int qcow2_update_crypt_header(int fd, uint64_t off, const uint8_t *old, const uint8_t *new,
				     uint64_t len);

/* Replace the header extension type (data NULL: remove it) in hdr, the
 * first size bytes of the image (its header cluster, or less): the
 * extensions after the header are rewritten in their order, the new one
 * last, then the end marker and the backing file name (backing_file_offset
 * updated). *used gets the bytes to write back, [0, *used): what the old
 * layout used beyond the new one reads as zeros. Pure. Returns 0, -EUCLEAN
 * (extensions or backing name out of bounds) or -ENOSPC (the result does
 * not fit in size bytes). */
int qcow2_header_set_extension(uint8_t *hdr, size_t size, uint32_t type, const void *data, uint32_t len,
			       size_t *used);

/* The same on the image on fd, in one write from offset 0 and an fsync,
 * the header area ending before limit (the LUKS region's offset) and the
 * header cluster. The header fields themselves are written back as read. */
int qcow2_update_header_extension(int fd, uint64_t limit, uint32_t type, const void *data, uint32_t len);

#endif
