/* The device-mapper stack for one image, built in memory (pure: no
 * libdevmapper, no descriptors). The caller creates the devices in order,
 * loads each table (dm_target_params() renders one target) and, once a
 * device exists, tells the stack how later tables refer to it
 * (dm_stack_set_ref(), e.g. "253:4").
 *
 * Devices of an image NAME, bottom-up (creation order):
 *
 *   NAME<L>_cipher_s<k>   legacy AES only, when NAME<L>_cipher would exceed
 *                         max_targets: segments of it (hidden)
 *   NAME<L>_cipher        legacy AES (crypt_method 1): guest space of the layer
 *                         mapped linearly onto its host ciphertext, zero
 *                         elsewhere (hidden)
 *   NAME<L>_crypt         LUKS (crypt_method 2): one crypt target over the whole
 *                         host device (IV = host sector); legacy AES: one crypt
 *                         target over NAME<L>_cipher (IV = guest sector) (hidden)
 *   NAME<L>_hold          read-write mappings with a slow path, unencrypted
 *                         layers: the first sector of the host device
 *                         (read-only, hidden), so that a table holds the
 *                         layer's loop device however little the top maps
 *   NAME_s<k>             segments of the top table when it would exceed
 *                         max_targets (hidden), k = position in the split table
 *                         (balanced sizes; a one-target segment is not made a
 *                         device, its target stays in the table above);
 *                         NAME_ss<k> segments of segments (NAME_sss<k>, ...
 *                         further up) only when there are more than
 *                         max_targets segments; a segment made while the
 *                         mapping is live has its generation after it,
 *                         NAME_s<k>_g<n> (dm_stack_name_segments)
 *   NAME_fast             read-write mappings with a slow path: the table the
 *                         top has otherwise (below), the fast path of each
 *                         cluster that has one, the slow path for the rest
 *                         (hidden); its segments are NAME_s<k> as the top's
 *   NAME                  the top device: guest space, linear onto the crypt
 *                         devices or host devices of every layer (the backing
 *                         chain is flattened into this one table), zero for
 *                         zero and unallocated clusters. Read-write with a
 *                         slow path: a switch target of two paths, 0 =
 *                         NAME_fast, 1 = the slow-path device, both correct
 *                         for every region, and the last region linear onto
 *                         NAME_fast (dm-switch takes no flush: that target
 *                         takes them, to every device under NAME_fast;
 *                         add_switch_top); the daemon routes the regions
 *                         with any of the fast path to path 0 by message
 *                         (dm_switch_message), the others (all slow) to
 *                         path 1, so that a remap round reloads NAME_fast
 *                         alone and its suspend never waits for the slow
 *                         requests of regions all slow
 *
 * where <L> is empty for the image itself (layer 0) and "_L<d>" for backing
 * layer d: vm_crypt, vm_L1_crypt, vm_L2_cipher, vm_s0, vm_L1_cipher_s3.
 * Unencrypted layers have no device of their own but the hold device.
 *
 * DM UUIDs: "QCOW2-<id>-NAME" for the top device, "QCOW2-INT-<id>-<device name>"
 * for internal ones (QCOW2-INT-<id>-NAME_crypt, ..._L1_cipher, ..._s3), so
 * that one image can be mapped twice (read-only) under two names. Every internal device is hidden: the caller sets the udev
 * DISABLE flags on it. Keys are referenced as ":<size>:logon:<description>",
 * never in hex; dm_key_description() gives the default description. */
#ifndef QS_DMTABLE_H
#define QS_DMTABLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dm.h"
#include "image.h"
#include "runs.h"

#define DM_SECTOR_SHIFT		9
#define DM_NAME_MAX		127	/* DM_NAME_LEN 128 with the NUL */
#define DM_UUID_MAX		128	/* DM_UUID_LEN 129 with the NUL */
#define DM_MAX_TARGETS_DEFAULT	65536
#define DM_MAX_TARGETS_KERNEL	1048576	/* the kernel's cap per table */
#define DM_UUID_PREFIX		"QCOW2-"
#define DM_UUID_PREFIX_INTERNAL	"QCOW2-INT-"
#define DM_REF_MAX		4200	/* a device reference, with a path in it */
#define DM_CIPHER_MAX		128
#define DM_KEY_DESC_MAX		256
#define DM_IMAGE_ID_MAX		40	/* dm_image_id: a LUKS UUID (36) or 16 hex digits, and NUL */
/* The switch's regions: the cluster size, at least this, and larger when
 * there would be more than DM_SWITCH_REGIONS_MAX (the kernel's region
 * table has a bit per region with two paths, so has the stack's).
 * dm-switch splits every bio at region boundaries: with 64 KiB regions
 * 1 MiB writes to allocated LUKS clusters ran at 0.68-0.82x of the same
 * stack without the switch (TCG), with 1 MiB regions at 0.9-1.27x (noise) */
#define DM_SWITCH_REGION_MIN	(1024 * 1024)
#define DM_SWITCH_REGIONS_MAX	(1ULL << 24)
/* Enough for the params of any target of a stack */
#define DM_PARAMS_MAX		(DM_CIPHER_MAX + DM_KEY_DESC_MAX + DM_REF_MAX + 128)

struct dm_stack;

/* Per layer of the chain, indexed by depth (0 = the image itself). */
struct dm_layer_params {
	/* How tables refer to the device holding the layer's data (its data
	 * file when external): "7:3" at open time, a placeholder such as
	 * "{loop:/abs/path/image.qcow2}" for a dry run. No whitespace. Needed
	 * for encrypted layers and layers that provide data. */
	const char *host_dev;
	/* Encrypted layers: the dm-crypt cipher spec ("aes-xts-plain64") and
	 * key size in bytes. NULL / 0 for a legacy AES layer means
	 * LEGACY_AES_DM_CIPHER / LEGACY_AES_KEY_SIZE; a LUKS layer needs both. */
	const char *cipher;
	unsigned int key_size;
	/* Keyring (logon) key description; NULL: dm_key_description(). */
	const char *key_desc;
};

struct dm_stack_params {
	const char *name;	/* NAME of the top device */
	const char *id;		/* stable identifier of the image for UUIDs */
	const struct dm_layer_params *layers;
	unsigned int nlayers;	/* entries of layers: at least the chain length */
	bool read_only;
	bool allow_discards;	/* crypt targets get "1 allow_discards" */
	size_t max_targets;	/* per table, 2..DM_MAX_TARGETS_KERNEL; 0 = default */
	/* The slow-path device served by the daemon (its NBD device, "43:0",
	 * guest offsets 1:1), or NULL. Without it compressed clusters are
	 * refused and zero or unallocated ranges map to zero targets. With it,
	 * compressed runs map to it; and read-write (!read_only), so does
	 * every run except the data of layer 0 flagged RUN_F_WRITABLE
	 * (clusters with refcount 1, see qcow2_rw.h): writes to those go
	 * straight to the file, everything else to the daemon. */
	const char *slow_dev;
	/* A stack built before for the same mapping (the live one), or NULL:
	 * the top table is split into segments where prev's was, so that a
	 * change of a few targets changes a few segments (balanced sizes
	 * where prev had no split; see dm_stack_name_segments). */
	const struct dm_stack *prev;
};

enum dm_target_type {
	DM_TARGET_ZERO = 0,
	DM_TARGET_LINEAR,
	DM_TARGET_CRYPT,
	DM_TARGET_SWITCH,	/* dev: path 0 (the fast device), path 1 the slow-path
				 * device; offset: the region size in sectors */
};

/* Target device references: a device of the stack (its index, always lower
 * than the index of the device whose table refers to it), a layer's host
 * device, or none (zero targets). */
#define DM_DEV_HOST		0x80000000u
#define DM_DEV_NONE		0xffffffffu
#define DM_DEV_SLOW		0x7fffffffu	/* the slow-path device (slow_dev) */
#define DM_DEV_IS_HOST(dev)	((dev) != DM_DEV_NONE && ((dev) & DM_DEV_HOST))
#define DM_DEV_HOST_LAYER(dev)	((dev) & ~DM_DEV_HOST)

/* One target, stored compactly; sectors of 512 bytes. */
struct dm_target {
	uint64_t start;		/* in the device */
	uint64_t len;
	uint64_t offset;	/* linear / crypt: sector on dev */
	uint32_t dev;		/* see DM_DEV_* */
	uint8_t type;		/* enum dm_target_type */
};

enum dm_device_role {
	DM_ROLE_TOP = 0,
	DM_ROLE_SEGMENT,	/* part of the top table */
	DM_ROLE_CIPHER,		/* legacy AES: guest space onto host ciphertext */
	DM_ROLE_CIPHER_SEGMENT,	/* part of a cipher table */
	DM_ROLE_CRYPT,
	DM_ROLE_HOLD,		/* read-write: one sector of an unencrypted layer's host device */
	DM_ROLE_FAST,		/* read-write with a slow path: path 0 of the top's switch */
};

struct dm_device {
	char *name;
	char *uuid;
	char *ref;		/* how other tables refer to it; "/dev/mapper/<name>" until set */
	enum dm_device_role role;
	int layer;		/* cipher/crypt: the chain depth it serves; -1 otherwise */
	unsigned int level;	/* segments: 1 = holds targets of the table it splits, 2 = segments of those, ... */
	bool read_only;
	bool hidden;		/* internal: the caller sets the udev DISABLE flags */
	uint64_t sectors;	/* device size */
	struct dm_target *targets;
	size_t count;
};

struct dm_stack_layer;

/* Where the pieces of the top table's split at one level begin (segments
 * or targets left inline), in sectors of the top device, ascending. */
struct dm_split_level {
	uint64_t *start;
	size_t n;
};

/* Read-only for callers except through dm_stack_set_ref(). */
struct dm_stack {
	struct dm_device *devices;	/* creation order; the top device is last */
	size_t count;
	size_t alloc;
	struct dm_stack_layer *layers;	/* private */
	unsigned int nlayers;
	bool allow_discards;
	char *slow_ref;			/* DM_DEV_SLOW targets refer to it; NULL: none */
	struct dm_split_level *split;	/* private: the top table's split, level 1 first */
	unsigned int nsplit;
	/* a top switch (read-write with a slow path): its region size in
	 * sectors (0: no switch), the regions, and a bit per region set when
	 * any of it is on the fast path (dm_stack_region_fast), another when
	 * any of it is on the slow path (dm_stack_region_part: both) */
	uint64_t region_sectors, nregions;
	uint8_t *fast, *slow;
};

/* Build the stack for the chain top and its merged runs (image_map_chain()).
 * Returns 0, or with a message logged:
 *   -ENOTSUP      compressed clusters without a slow-path device (their
 *                 number is in the message), or an unknown encryption method,
 *   -EUCLEAN      a run or offset not aligned to 512 bytes, data beyond the end
 *                 of its file or its layer,
 *   -ENAMETOOLONG a device name or UUID over the device-mapper limits,
 *   -EINVAL       wrong parameters (missing host device or cipher, bad name),
 *                 runs that do not cover the image,
 *   -ENOMEM. */
int dm_stack_build(const struct dm_stack_params *p, const struct image *top,
		   const struct run_list *runs, struct dm_stack **out);
void dm_stack_free(struct dm_stack *s);

/* The top device (the last one). */
const struct dm_device *dm_stack_top(const struct dm_stack *s);
/* Set how later tables refer to device index i ("253:4"). 0, -EINVAL or -ENOMEM. */
int dm_stack_set_ref(struct dm_stack *s, size_t i, const char *ref);

const char *dm_target_type_name(enum dm_target_type type);
/* The params of one target of dev, as `dmsetup table` prints them and
 * dm_task_add_target() takes them. Returns the length, or -ENOSPC when
 * size is too small (DM_PARAMS_MAX always suffices). */
int dm_target_params(const struct dm_stack *s, const struct dm_device *dev,
		     const struct dm_target *t, char *buf, size_t size);

/* Every device as a block: "# NAME uuid=UUID[ hidden][ ro]", then one line
 * per target "start length type params" exactly as `dmsetup table` prints
 * them. 0 or -EIO. */
int dm_stack_format(const struct dm_stack *s, FILE *f);

/* A stable identifier of an image for its DM UUIDs: the LUKS UUID of the
 * top layer when it is a UUID (luks_uuid_valid), else 16 hex digits of a 64-bit FNV-1a hash of
 * the image's canonical path (stable while the image stays where it is).
 * Returns 0, -EINVAL or -ENOSPC. */
int dm_image_id(const char *luks_uuid, const char *canonical_path, char *buf, size_t size);

/* The default keyring description of layer depth's key:
 * "qcowsetup:NAME:L<depth>". Returns 0 or -ENAMETOOLONG. */
int dm_key_description(const char *name, unsigned int depth, char *buf, size_t size);

/* Device dev of stack s as a table for dm.c (dm_create_device,
 * dm_load_table): its targets are made one at a time as the table is
 * loaded, never all as strings in memory. it must outlive t. */
struct dm_stack_table_iter {
	const struct dm_stack *s;
	const struct dm_device *dev;
};
void dm_stack_table(const struct dm_stack *s, const struct dm_device *dev, struct dm_stack_table_iter *it,
		    struct dm_table *t);

/* The top device, the fast device or a segment: the devices that name
 * the slow path, which the daemon creates and reloads. */
static inline bool dm_is_top_device(const struct dm_device *dev)
{
	return dev->role == DM_ROLE_TOP || dev->role == DM_ROLE_SEGMENT || dev->role == DM_ROLE_FAST;
}

/* Whether region i of the top switch has any of the fast path (routed to
 * the fast device). */
static inline bool dm_stack_region_fast(const struct dm_stack *s, uint64_t i)
{
	return s->fast && i < s->nregions && (s->fast[i / 8] >> (i % 8) & 1);
}

/* Whether region i is part fast, part slow: routed to the fast device,
 * whose suspend then waits for its slow requests too. */
static inline bool dm_stack_region_part(const struct dm_stack *s, uint64_t i)
{
	return dm_stack_region_fast(s, i) && s->slow && (s->slow[i / 8] >> (i % 8) & 1);
}

/* The switch's routing: every region (fast ones to path 0, the others to
 * path 1: after the top's table was loaded, which routes region i to path
 * i % 2), the regions fast in cur but not in s to path 1 (before s's fast
 * device is swapped in), or those fast in s but not in cur to path 0
 * (after). Around a swap of the fast device, the regions of s part fast
 * to path 1 (DM_ROUTE_PART_TO_SLOW, s the live stack, cur unused: their
 * slow requests then drain past the fast device before its suspend), and
 * after it those fast in s that were not fast or were part fast in cur
 * to path 0 (DM_ROUTE_BACK_TO_FAST). */
enum dm_route {
	DM_ROUTE_ALL = 0,
	DM_ROUTE_TO_SLOW,
	DM_ROUTE_TO_FAST,
	DM_ROUTE_PART_TO_SLOW,
	DM_ROUTE_BACK_TO_FAST,
};

/* The next "set_region_mappings" message of a route into buf (size at
 * least 128), from region *pos on (the switch's: all but the last);
 * advances *pos. Returns its length, 0
 * when no region is left to route, -EINVAL without a switch in s (or in
 * cur, for the partial routes). A message stays under size bytes:
 * "set_region_mappings 1a:0 R1,f :1", hex indexes, repeats as R<n>,<m>. */
int dm_switch_message(const struct dm_stack *s, const struct dm_stack *cur, enum dm_route route, uint64_t *pos,
		      char *buf, size_t size);

/* DM UUIDs (see the head of this file): the top device's of mapping NAME
 * with image identifier id ("QCOW2-<id>-NAME"; 0 or -ENAMETOOLONG);
 * whether uuid is a qcowsetup top device's; whether it is an internal
 * device of the mapping whose top device has top_uuid
 * ("QCOW2-INT-<id>-NAME_..."). NULL is neither. */
int dm_top_uuid(const char *id, const char *name, char *buf, size_t size);
bool dm_uuid_is_top(const char *uuid);
bool dm_uuid_is_internal_of(const char *uuid, const char *top_uuid);

/* Whether name may name a mapping: letters, digits and - _ . +, at most
 * DM_MAPPING_NAME_MAX characters, not "." or ".." (it also names files
 * under /run/qcowsetup). */
#define DM_MAPPING_NAME_MAX 100
bool dm_mapping_name_valid(const char *name);

/* Whether dev is the name of a segment device of mapping name (NAME_sK,
 * NAME_ssK, ...: dmtable's naming, with "_g<gen>" after it from
 * dm_stack_name_segments), and its generation (0 without a suffix). */
bool dm_is_segment_name(const char *dev, const char *name);
/* Whether dev is a segment of mapping name or its fast device (NAME_fast):
 * the devices a daemon makes and takes over from the one before. */
bool dm_is_daemon_device_name(const char *dev, const char *name);
bool dm_segment_generation(const char *dev, const char *name, uint32_t *gen);

/* Whether device a of stack s and device b of stack cur have the same
 * table: the devices of their stacks they name compared by name, other
 * references (host and slow-path devices) as the params render them. */
bool dm_same_table(const struct dm_stack *s, const struct dm_device *a, const struct dm_stack *cur,
		   const struct dm_device *b);

/* Segments across reloads. A live segment is never given another table:
 * a segment of s (as dm_stack_build made it, "NAME_s<k>") takes the name
 * (and UUID) of a segment of cur (the live stack, NULL: none) of its
 * level with the same table (each at most once), and otherwise its own
 * name with "_g<gen>" (gen 0: as it is). A segment that
 * names a renamed one differs from its live namesake, so the changes go
 * up to the top, whose name never changes. Call it before setting the
 * references; gen must be newer than every live segment's. 0,
 * -ENAMETOOLONG (logged) or -ENOMEM. */
int dm_stack_name_segments(const struct dm_stack_params *p, struct dm_stack *s, const struct dm_stack *cur,
			   uint32_t gen);

#endif
