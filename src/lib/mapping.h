/* The mapping lifecycle: open, close, status, list and reattach of a
 * mapping /dev/mapper/NAME (DESIGN.md's device stack), as cryptsetup's
 * lib/setup.c owns activation. Every front end (the qcowsetup command,
 * `open --tab`, the dracut hooks through them) calls these; none touches
 * device-mapper, loop, NBD or the daemon itself.
 *
 * Open is a transaction: either the whole stack exists and the top device
 * appears, or everything made so far is removed (dm devices, keyring keys,
 * loop devices and with them the image locks, the daemon, the file's extra
 * size) before it returns. One open, close or reattach of a NAME runs at a
 * time (qs_name_lock). */
#ifndef QS_MAPPING_H
#define QS_MAPPING_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "keys.h"

/* Asked for a passphrase for image (a layer of the chain) when one is
 * needed: attempt counts the questions for this layer from 1. Returns 0
 * with *pp (the library frees it), or -errno to stop asking: the open then
 * fails with -EPERM when a passphrase was wrong, else with that error. */
typedef int (*mapping_ask_fn)(void *opaque, const char *image, unsigned int attempt, struct passphrase **pp);

struct mapping_params {
	const char *image;		/* path of the top image */
	const char *name;		/* NAME */
	bool read_only;
	const char *snapshot;		/* an internal snapshot (read-only), or NULL */
	const char *format;		/* the top's format, or NULL: probe */
	const char *backing_file;	/* overrides of the top's names (trusted) */
	const char *data_file;
	bool trust_names;		/* trust.h */
	bool allow_discards;
	bool require_encryption;	/* refuse an unencrypted top (qcowtab) */
	bool skip_key_check;		/* legacy AES: accept an implausible key */
	uint64_t max_targets;		/* 0: 65536 */
	bool use_bindings;		/* LUKS layers: their clevis bindings before ask() */
	unsigned int binding_timeout;	/* seconds per clevis decrypt, 0: its default */
	mapping_ask_fn ask;		/* NULL: encrypted images fail with -EPERM */
	void *ask_opaque;
	bool debug;			/* the daemon logs debug messages */
	unsigned int nbd_timeout;	/* seconds, 0: the daemon's default */
	unsigned int nbd_connections;	/* of the slow path, 0: one */
	int fail_step;			/* tests: fail step K as if the kernel refused it */
};

/* Map p->image as /dev/mapper/p->name. 0, or -errno with one line logged:
 *   -EINVAL  bad name or parameters,       -EEXIST  NAME exists,
 *   -EPERM   wrong passphrase,             -EACCES  refused by the trust rules,
 *            no permission to write the image,
 *   -EBUSY   the image is in use (QEMU),   -ENOMEM,
 *   -EUCLEAN/-ENOTSUP/-ENODEV/...  the image or a kernel feature. */
int mapping_open(const struct mapping_params *p);

/* Remove NAME and everything under it (deferred: on its last close).
 * 0, -ENODEV (no such qcowsetup mapping), -EBUSY (in use), -ETIMEDOUT
 * (the daemon did not finish), -errno. */
int mapping_close(const char *name, bool deferred);

/* A new daemon for NAME after its daemon died. 0, -ENODEV, -EBUSY (a daemon
 * runs), -EINVAL (no slow path, or no state), -errno. */
int mapping_reattach(const char *name, bool debug);

/* ---- live verbs (live.c): cryptsetup's luksSuspend, luksResume and
 * refresh on a mapping. Each is all or nothing: a failure at any step
 * undoes what was done (the mapping keeps working as before) — except that
 * a key wiped by suspend cannot come back without the passphrase: a
 * failure among the key wipes leaves the mapping suspended. ---- */

struct mapping_live_params {
	mapping_ask_fn ask;		/* resume, refresh of encrypted mappings */
	void *ask_opaque;
	bool skip_key_check;		/* legacy AES: accept an implausible key */
	bool debug;			/* a daemon started by resume logs debug */
	int fail_step;			/* tests: fail step K as if the kernel refused it */
};

/* Flush, hold the I/O of NAME (not failed) and wipe the volume keys of
 * every crypt layer. 0, -ENODEV, -EBUSY (already suspended), -ENOTCONN
 * (its daemon is not running: reattach first), -errno. */
int mapping_suspend(const char *name, int fail_step);

/* Check the passphrase against each encrypted layer's header, give the keys
 * back to dm-crypt through the keyring and let the I/O go on; when the
 * daemon died meanwhile, start a new one. 0, -EPERM (wrong passphrase:
 * still suspended), -EINVAL (not suspended), -ENODEV, -errno. */
int mapping_resume(const char *name, const struct mapping_live_params *p);

/* Switch discards: the crypt layers' allow_discards (their tables loaded
 * again: encrypted mappings need the passphrase), the slow path's, and the
 * top reloaded. 0, -EPERM, -EBUSY (suspended), -ENOTCONN, -ENODEV, -errno. */
int mapping_refresh(const char *name, bool allow_discards, const struct mapping_live_params *p);

/* Whether `qcowsetup suspend` holds NAME (QS_RUN_DIR/NAME.suspended);
 * forget it (open: the mark of a mapping of that name removed by hand). */
bool mapping_is_marked_suspended(const char *name);
void mapping_unmark_suspended(const char *name);

/* mapping_reattach, the caller holding NAME's lock (resume). */
int mapping_reattach_locked(const char *name, bool debug);

/* resize's (live.c), the caller holding NAME's lock: the crypt device of
 * NAME's top layer made to cover bytes, its key from p->ask (checked
 * against the header) through the keyring; steps_done: the fail steps
 * counted before. 0 (also when it covers them already), -EPERM (wrong
 * passphrase), -EBUSY (suspended), -ENODEV, -errno. */
int mapping_grow_crypt_locked(const char *name, uint64_t bytes, const struct mapping_live_params *p,
			      int steps_done);

/* ---- snapshot (snapshot.c): a live external snapshot ---- */

struct mapping_snapshot_params {
	const char *name;		/* the read-write mapping NAME */
	const char *image;		/* the new overlay (must not exist) */
	mapping_ask_fn ask;		/* passphrases of the mapping's encrypted layers */
	void *ask_opaque;
	/* the overlay's passphrase when the mapping is LUKS-encrypted: NULL
	 * for the one that opened the image (taken: the library frees it) */
	struct passphrase *new_passphrase;
	struct luks_pbkdf pbkdf;	/* of the overlay's key slot */
	bool debug;			/* the new daemon logs debug */
	int fail_step;			/* tests: fail step K as if the kernel refused it */
};

/* Create p->image, a qcow2 overlay whose backing file is the image that
 * NAME has open (LUKS-encrypted like it, same cipher, when it is), and
 * move NAME onto it without closing /dev/mapper/NAME: its I/O is held
 * (not failed) while the old daemon writes the image back and exits, the
 * overlay's stack is built under the top device (as `open IMAGE NAME`
 * builds it, the old image a read-only backing layer with QEMU's
 * read-only locks), and a new daemon takes the top over. All or nothing:
 * on a failure the mapping goes on, on the old image, and nothing is
 * left. 0, or -errno with one line logged:
 *   -ENODEV  no such mapping,     -EBUSY  suspended, or another command on it,
 *   -EINVAL  read-only mapping (no daemon), -EEXIST the overlay exists,
 *   -ENOTCONN its daemon is not running,   -EPERM  wrong passphrase,
 *   -ENOTSUP legacy AES layers, a mapping opened with --backing-file or
 *            --data-file, -errno. */
int mapping_snapshot(const struct mapping_snapshot_params *p);

#define MAPPING_MAX_FILES	(2 * 16)
#define MAPPING_MAX_SLOW	8

/* What status shows of one mapping. */
struct mapping_status {
	char name[128];
	char uuid[129];
	bool read_only;
	bool suspended;			/* by `qcowsetup suspend` (or a table swap now) */
	int open_count;
	unsigned int targets;		/* of the top table */
	unsigned int internal;		/* internal devices */
	char cipher[129];		/* "" when none */
	char files[MAPPING_MAX_FILES][4096];	/* image files, from the loop devices */
	unsigned int nfiles;
	struct {
		int nbd;		/* /dev/nbdN */
		pid_t pid;		/* its daemon, 0 when unknown */
		bool running;
	} slow[MAPPING_MAX_SLOW];
	unsigned int nslow;
	bool have_stats;		/* the daemon's table-swap statistics */
	unsigned long long reloads, remapped_bytes;
	double held_ms_p99, held_ms_max, round_ms_p99;
	bool broken;			/* the daemon's metadata writer failed */
};

/* Status of NAME. 0, -ENODEV (no such qcowsetup mapping), -errno. */
int mapping_get_status(const char *name, struct mapping_status *st);

/* Call fn for each qcowsetup mapping (top device), in device-mapper's
 * order; stops at fn's first non-zero return, which it returns. */
int mapping_list(int (*fn)(void *opaque, const char *name), void *opaque);

struct mapping_resize_params {
	const char *name;
	uint64_t size;			/* bytes */
	int relative;			/* 0: size; +1: grow by size; -1: shrink by size */
	bool shrink;			/* a smaller size is allowed */
	mapping_ask_fn ask;		/* LUKS grown past its crypt device's room */
	void *ask_opaque;
	int fail_step;			/* tests: step K fails */
};

/* Resize the read-write mapping p->name and its image while mapped: its
 * daemon resizes the image (qcow2_rw_resize) and reloads the top device,
 * which shows the new size (src/daemon/resize.c). A LUKS image grown past
 * the room its crypt device covers: the passphrase (ask), checked against
 * the header, and the crypt table loaded larger first (live.c). 0 with the
 * size in *new_size, or -errno with one line logged:
 *   -EINVAL  read-only mapping, size not a multiple of 512, smaller without
 *            shrink, a shrink past allocated clusters (nothing changed),
 *   -EPERM   wrong passphrase (LUKS grown past its room; nothing changed
 *            but the file's size),
 *   -ENODEV  no such mapping, or no daemon answers,
 *   -EBUSY   suspended, or another transaction on NAME,
 *   -ENOTSUP/-EFBIG/-ENOSPC/-EIO  from the image or the devices. */
int mapping_resize(const struct mapping_resize_params *p, uint64_t *new_size);

/* ---- commit (commit.c): QEMU's block-commit on a mapping ---- */

struct mapping_commit_params {
	mapping_ask_fn ask;		/* an encrypted backing image's passphrase */
	void *ask_opaque;
	bool debug;			/* the new daemon logs debug messages */
	int fail_step;			/* tests: fail step K as if the kernel refused it */
	/* Optional progress of the copy, in guest bytes. */
	void (*progress_start)(void *opaque, const char *label, uint64_t total);
	void (*progress_update)(void *opaque, uint64_t done);
	void (*progress_end)(void *opaque, bool ok);
	void *progress_opaque;
};

/* Merge the active overlay of the read-write mapping NAME into its backing
 * image and move NAME onto that image, read-write (its own daemon when it is
 * qcow2), while mapped: the guest's I/O is held (not failed) while the
 * clusters of the overlay are copied and the tables switched. Each cluster
 * goes into the backing image in its own form (plaintext, or encrypted with
 * its own key). The overlay file is left as it is, and unlocked.
 * All or nothing: on a failure NAME stays on the overlay and the backing
 * image is consistent (what was copied is shadowed by the overlay).
 * 0, or -errno with one line logged:
 *   -ENODEV  no such mapping,     -EBUSY  suspended, or the backing image
 *            is in use elsewhere (QEMU, another mapping),
 *   -EINVAL  read-only mapping, no backing image,
 *   -ENOTCONN its daemon is not running,
 *   -EPERM   wrong passphrase of the backing image,
 *   -ENOTSUP a chain or format commit does not handle, -errno. */
int mapping_commit(const char *name, const struct mapping_commit_params *p);

/* The daemon started (its ready_fd set here) and waited for; stopped by
 * disconnecting its NBD device (commit.c: as open and close do). */
struct daemon_args;
struct dm_dev_info;
/* The top device NAME (dm_device_info): 0, -ENODEV (none, or not a
 * qcowsetup mapping: logged) or -errno. */
int mapping_find_top(const char *name, struct dm_dev_info *info);
/* The name lock of an existing mapping NAME (close, reattach, commit): its
 * fd, or -ENODEV (not a name of ours) or the locking error, logged. */
int mapping_lock_name(const char *name);
int mapping_start_daemon(struct daemon_args *a, pid_t *pid, int *nbd_index);
int mapping_stop_daemon(const char *name, int nbd, pid_t pid);

/* Let go of libdevmapper's state (at the end of a command). */
void mapping_release(void);

#endif
