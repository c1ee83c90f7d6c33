/* The image model: one struct image per layer of a backing chain (qcow2,
 * qcow v1 or raw), parsed from read callbacks only. */
#ifndef QS_IMAGE_H
#define QS_IMAGE_H

#include <stdbool.h>
#include <stdint.h>

#include "io.h"
#include "runs.h"

struct binding_set;

#define IMG_MAX_CHAIN_DEPTH 16
#define QCOW2_MAX_BACKING_NAME 1023

enum img_format {
	IMG_FMT_RAW = 0,
	IMG_FMT_QCOW2,
	IMG_FMT_QCOW,		/* legacy qcow v1 */
};

enum img_crypt {
	IMG_CRYPT_NONE = 0,
	IMG_CRYPT_AES = 1,	/* legacy AES-128-CBC, IV = guest sector */
	IMG_CRYPT_LUKS = 2,	/* LUKS1 header embedded in the image, IV = host sector */
};

/* qcow2 header feature bits */
#define QCOW2_INCOMPAT_DIRTY		(1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT		(1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE	(1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION	(1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2		(1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN		0x1fULL
#define QCOW2_COMPAT_LAZY_REFCOUNTS	(1ULL << 0)
#define QCOW2_AUTOCLEAR_BITMAPS		(1ULL << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW	(1ULL << 1)

#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

struct qcow2_feature_name {
	uint8_t type;		/* 0 incompatible, 1 compatible, 2 autoclear */
	uint8_t bit;
	char name[47];
};

struct qcow2_snapshot {
	char *id;
	char *name;
	uint64_t l1_table_offset;
	uint32_t l1_size;
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t vm_state_size;
	uint64_t disk_size;	/* guest size at snapshot time */
	uint64_t icount;	/* UINT64_MAX when absent */
	bool has_icount;
};

struct qcow2_bitmap {
	char *name;
	uint64_t table_offset;
	uint32_t table_size;	/* entries */
	uint32_t flags;
	uint8_t granularity_bits;
};

/* A metadata range of the image file, for overlap checks and `check`. */
enum meta_kind {
	META_HEADER = 0,
	META_L1,
	META_L2,
	META_REFCOUNT_TABLE,
	META_REFCOUNT_BLOCK,
	META_SNAPSHOT_TABLE,
	META_SNAPSHOT_L1,
	META_SNAPSHOT_L2,
	META_CRYPT_HEADER,
	META_BITMAP_DIRECTORY,
	META_BITMAP_TABLE,
	META_BITMAP_DATA,
	META_KIND_COUNT,
};

const char *meta_kind_name(enum meta_kind kind);

struct meta_range {
	uint64_t offset;
	uint64_t length;
	uint64_t guest;		/* L2 tables: first guest offset they map */
	uint8_t kind;		/* enum meta_kind */
};

struct image {
	enum img_format format;
	char *path;		/* as given or resolved */
	struct img_io io;	/* the image file */
	struct img_io data_io;	/* where data clusters live (== io unless external) */
	bool has_data_file;
	bool owns_io;		/* io was opened through the opener */

	uint64_t size;		/* guest size in bytes */
	uint32_t version;	/* qcow2: 2 or 3; qcow: 1 */
	uint32_t cluster_bits;
	uint64_t cluster_size;
	uint32_t l2_bits;	/* log2(entries per L2 table) */
	uint32_t crypt_method;	/* enum img_crypt */

	/* qcow2 */
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
	bool extended_l2;
	uint64_t l1_table_offset;
	uint32_t l1_size;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t snapshots_size;	/* bytes of the snapshot table */
	struct qcow2_snapshot *snapshots;
	uint64_t crypt_header_offset;
	uint64_t crypt_header_length;
	uint32_t nb_bitmaps;
	uint64_t bitmap_directory_offset;
	uint64_t bitmap_directory_size;
	struct qcow2_bitmap *bitmaps;
	struct qcow2_feature_name *feature_names;
	unsigned int nb_feature_names;
	char *data_file;	/* external data file name from the extension */
	char **unknown_extensions;	/* "0x%08x" strings, NULL-terminated: the
					 * first QCOW2_MAX_UNKNOWN_EXTENSIONS (64) */
	uint32_t nb_unknown_extensions;	/* all of them */
	struct binding_set *bindings;	/* clevis bindings (binding.h), or NULL */
	bool bindings_invalid;		/* a bindings extension that did not parse */

	/* qcow v1 */
	uint32_t mtime;

	char *backing_file;	/* as stored in the image */
	char *backing_format;	/* from the extension, or probed */
	char *backing_path;	/* resolved against the image's folder */
	struct image *backing;

	/* the L1 table being mapped: the active one or a snapshot's */
	int snapshot_index;	/* -1: active layer */
	uint64_t *l1;		/* host byte order, l1_size entries */
	uint32_t map_l1_size;
	uint64_t map_size;	/* guest size of what is mapped */

	int depth;		/* 0 = top of the chain */
};

struct image_open_opts {
	const char *format;	/* NULL: probe */
	bool no_backing;	/* do not open the backing chain */
	bool no_data_file;	/* do not open an external data file */
	const char *snapshot;	/* id or name, NULL = active layer */
	/* the caller's files instead of the names the top image stores
	 * (given to the opener as the caller's, not the image's) */
	const char *backing_file;
	const char *data_file;
};

/* Probe the format of io: qcow2, qcow or raw. */
enum img_format image_probe_format(const struct img_io *io);
const char *image_format_name(enum img_format fmt);

/* Open path through opener, parse it and (unless no_backing) its whole
 * backing chain and (unless no_data_file) its external data files. On error
 * *out is NULL, a message naming the file and the field has been logged,
 * and:
 *   -EUCLEAN  malformed or malicious image,
 *   -ENOTSUP  a feature this version does not support,
 *   -ELOOP    backing loop or chain too deep,
 *   -ENOENT/-EACCES/-ENODEV/-EIO  from the opener (-EACCES also: refused
 *            by its trust rules) or reads. */
int image_open(const struct img_opener *opener, const char *path,
	       const struct image_open_opts *opts, struct image **out);
/* Same, on an io the caller owns (not closed by image_free). */
int image_open_io(const struct img_opener *opener, const struct img_io *io,
		  const struct image_open_opts *opts, struct image **out);
void image_free(struct image *img, const struct img_opener *opener);

/* Select the L1 table to map: NULL = active layer. -ENOENT if none matches. */
int image_select_snapshot(struct image *img, const char *id_or_name);

/* Name of an incompatible/compatible/autoclear feature bit from the image's
 * feature name table, or a generic one. */
const char *image_feature_name(const struct image *img, int type, unsigned int bit,
			       char *buf, size_t buflen);

/* Walk one layer's L1/L2 tables (no backing resolution): runs of kind
 * DATA, ZERO, UNALLOC, COMPRESSED covering [0, map_size). Validates every
 * entry (alignment, bounds, no metadata overlap, no aliasing beyond
 * refcounts). */
int image_walk_layer(struct image *img, struct run_list *out);

/* Walk the whole chain: every UNALLOC run of a layer is resolved in its
 * backing image; runs carry the depth of the layer that provides them. Runs
 * beyond a backing image's size read as zeros (depth of that layer, UNALLOC
 * with backing_eof set). */
int image_map_chain(struct image *top, struct run_list *out);

/* All metadata ranges of one qcow2 layer, sorted by offset. */
int image_metadata(struct image *img, struct meta_range **out, size_t *count);

/* Resolve a backing or data file name against the folder of the image that
 * names it. Returns a malloc'ed string or NULL. */
char *image_resolve_path(const char *image_path, const char *name);

/* Decode helpers shared with check and the fuzzer */
uint64_t qcow2_l2_entry_host_offset(const struct image *img, uint64_t entry);

#endif
