/* Format internals shared by the engine's files (not a public API). */
#ifndef QS_QCOW2_H
#define QS_QCOW2_H

#include "image.h"

#define QCOW_MAGIC 0x514649fbU		/* "QFI\xfb": qcow v1 and qcow2 */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES (32U << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8U << 20)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_TABLE_BYTES (64U << 20)
#define QCOW2_MAX_BITMAPS 65535
#define QCOW2_MAX_BITMAP_DIRECTORY_BYTES (64U << 20)
#define QCOW2_MAX_UNKNOWN_EXTENSIONS 64	/* kept by name; all are counted */

/* The qcow2 header (docs/interop/qcow2.rst): big-endian fields at these
 * offsets. Version 2 ends at QCOW2_HDR_V2_SIZE, version 3 adds the feature
 * words up to QCOW2_HDR_V3_SIZE, and header_length may cover more (the
 * compression type byte, then padding to a multiple of 8). */
#define QCOW2_HDR_MAGIC			0	/* u32 */
#define QCOW2_HDR_VERSION		4	/* u32 */
#define QCOW2_HDR_BACKING_OFFSET	8	/* u64 */
#define QCOW2_HDR_BACKING_SIZE		16	/* u32 */
#define QCOW2_HDR_CLUSTER_BITS		20	/* u32 */
#define QCOW2_HDR_SIZE			24	/* u64: virtual size */
#define QCOW2_HDR_CRYPT_METHOD		32	/* u32 */
#define QCOW2_HDR_L1_SIZE		36	/* u32 */
#define QCOW2_HDR_L1_OFFSET		40	/* u64 */
#define QCOW2_HDR_REFTABLE_OFFSET	48	/* u64 */
#define QCOW2_HDR_REFTABLE_CLUSTERS	56	/* u32 */
#define QCOW2_HDR_NB_SNAPSHOTS		60	/* u32 */
#define QCOW2_HDR_SNAPSHOTS_OFFSET	64	/* u64 */
#define QCOW2_HDR_V2_SIZE		72
#define QCOW2_HDR_INCOMPAT		72	/* u64 */
#define QCOW2_HDR_COMPAT		80	/* u64 */
#define QCOW2_HDR_AUTOCLEAR		88	/* u64 */
#define QCOW2_HDR_REFCOUNT_ORDER	96	/* u32 */
#define QCOW2_HDR_HEADER_LENGTH		100	/* u32 */
#define QCOW2_HDR_V3_SIZE		104
#define QCOW2_HDR_COMPRESSION_TYPE	104	/* u8, when header_length > 104 */
/* A header extension: type (u32), length (u32), data padded to 8. */
#define QCOW2_EXT_HDR_SIZE		8

#define QCOW2_OFLAG_COPIED	(1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED	(1ULL << 62)
#define QCOW2_OFLAG_ZERO	(1ULL << 0)
#define QCOW2_L1E_OFFSET_MASK	0x00fffffffffffe00ULL
#define QCOW2_L2E_OFFSET_MASK	0x00fffffffffffe00ULL
#define QCOW2_REFT_OFFSET_MASK	0xfffffffffffffe00ULL
#define QCOW2_L1E_RESERVED	0x7f000000000001ffULL
#define QCOW2_L2E_RESERVED	0x3f000000000001feULL

#define QCOW2_EXT_END			0x00000000U
#define QCOW2_EXT_BACKING_FORMAT	0xe2792acaU
#define QCOW2_EXT_FEATURE_TABLE		0x6803f857U
#define QCOW2_EXT_BITMAPS		0x23852875U
#define QCOW2_EXT_CRYPT_HEADER		0x0537be77U
#define QCOW2_EXT_DATA_FILE		0x44415441U

int qcow2_open(struct image *img);
int qcow2_walk(struct image *img, struct run_list *out);
int qcow1_open(struct image *img);
int qcow1_walk(struct image *img, struct run_list *out);

/* Read a table of n big-endian 64-bit entries at off (bounds-checked against
 * the file and max_bytes); *table is malloc'ed, host byte order. */
int qcow2_read_table(const struct image *img, uint64_t off, uint64_t n, uint64_t max_bytes,
		     const char *what, uint64_t **table);

/* Refcounts (qcow2 only). A loaded refcount table caches one block. */
struct refcount_reader {
	const struct image *img;
	uint64_t *table;	/* refcount table, host order */
	uint64_t table_entries;
	uint8_t *block;		/* cached refcount block */
	uint64_t block_offset;	/* of the cached block, 0 = none */
	uint64_t entries_per_block;
};
int refcount_reader_init(struct refcount_reader *rr, const struct image *img);
void refcount_reader_free(struct refcount_reader *rr);
/* Refcount of host cluster index ci; 0 for clusters beyond the table. */
int refcount_get(struct refcount_reader *rr, uint64_t ci, uint64_t *rc);

/* Validation (validate.c): the metadata of a layer before its walk (in the
 * file, no overlaps; *meta sorted, free()d by the caller), then the walked
 * runs against it (data inside its file, not on metadata, no aliasing the
 * refcounts do not allow). */
int validate_metadata(struct image *img, struct meta_range **meta, size_t *nmeta);
int validate_runs(struct image *img, const struct run_list *runs, const struct meta_range *meta, size_t nmeta);

/* Before a read-write open of the active layer: every reference of the
 * image (metadata, active and snapshot L2 tables and clusters) against the
 * refcounts, so that the writer never overwrites, frees or reuses what the
 * mapping, a snapshot or the metadata uses: OFLAG_COPIED entries name
 * clusters of refcount 1 used once, what is written in place is used once,
 * compressed clusters share host clusters with compressed clusters only,
 * no cluster has fewer refcounts than references. 0, or -EUCLEAN with one
 * message naming the guest and host offsets and the collision, -ENOMEM,
 * -EIO. */
int validate_writable(struct image *img);

/* Bounds check on the image file: [off, off+len) inside it. */
bool image_range_in_file(const struct img_io *io, uint64_t off, uint64_t len);

#endif
