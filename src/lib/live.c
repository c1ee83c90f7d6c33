/* Live verbs on a mapping (mapping.h): suspend, resume and refresh, as
 * cryptsetup's luksSuspend, luksResume and refresh.
 *
 * The devices of a mapping NAME, found by their UUIDs (dmtable.h): the top
 * device, its segments (with them NAME_fast, under a read-write top's
 * switch), and one crypt device per encrypted layer, whose table names
 * its key as a keyring reference ":LEN:logon:qcowsetup:NAME:Ld".
 * A mapping with a slow path has a daemon; its control socket (control.h)
 * tells it what happens, so that it makes no table swap meanwhile.
 *
 * Suspend: the daemon stops its table swaps and writes its metadata back;
 * QS_RUN_DIR/NAME.suspended marks the mapping (the daemon's guardian leaves
 * a marked mapping suspended); the top device is suspended with a flush
 * and a filesystem freeze (the guest's I/O is held, not failed), then its
 * segments; the daemon flushes again, what it wrote meanwhile (its data
 * goes through the crypt devices, still active: a flush to a suspended one
 * would wait for the resume); then the crypt devices; last, every crypt
 * device wipes its key ("key wipe"). Until that last step a failure
 * undoes everything; a key wiped cannot come back without a passphrase, so
 * a failure among the wipes wipes the rest and leaves the mapping suspended
 * (resume brings it back).
 *
 * Resume: the passphrase is checked against each encrypted layer's header,
 * read through the loop device the mapping holds (LUKS: a key slot opens;
 * legacy AES has no key check in its format: the plausibility check of
 * `open`, unless skip_key_check); nothing changes on a wrong one. Then the
 * keys go back through the keyring ("key set :LEN:logon:DESC"), the crypt
 * devices resume, then the segments and the top; the daemon is told. When
 * the daemon died while the mapping was suspended, a new one is started
 * (reattach), which resumes the top itself. A failure at any step suspends
 * again what was resumed and wipes the keys that were set.
 *
 * Refresh: each crypt table is loaded again with "allow_discards" switched
 * (its key through the keyring, so it needs the passphrase as resume does),
 * and swapped in; then the top and its segments are reloaded as they are
 * (by the daemon, when there is one), so that they take the new limits.
 * What decides are the devices of the fast path: a read-write mapping's
 * loop devices pass discards or not, and dm-crypt's allow_discards (the
 * slow path takes discards always and does nothing with them).
 *
 * Resize (the daemon resizes, mapping.c asks it): a LUKS image grown past
 * the room its crypt device covers needs that device larger, its key
 * through the keyring as refresh loads it; the passphrase is checked
 * against the header first, as resume does. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "control.h"
#include "daemon_state.h"
#include "dm.h"
#include "dmtable.h"
#include "fileio.h"
#include "keyring.h"
#include "keys.h"
#include "log.h"
#include "loop.h"
#include "mapping.h"
#include "mapping_swap.h"
#include "nbd.h"
#include "sysutil.h"
#include "util.h"

#define LIVE_MAX_SEGMENTS	64

struct live_crypt {
	char name[128];
	unsigned int depth;		/* the layer: 0 the top image */
	char key_ref[DM_KEY_DESC_MAX + 32];	/* ":LEN:logon:DESC" */
	char key_desc[DM_KEY_DESC_MAX + 1];
	unsigned int key_size;
	char params[DM_TABLE_PARAMS_SIZE];	/* the live table's one target */
	uint64_t sectors;
	uint32_t under_major, under_minor;	/* the device it decrypts */
	struct volume_key *vk;
	bool suspended, has_key, read_only;
};

struct live_ctx {
	const char *name;
	const char *verb;
	int fail_step, step;
	int lock;
	bool lock_held;		/* by the caller (resize): not ours to take */
	struct dm_dev_info top;
	bool top_suspended;
	char segs[LIVE_MAX_SEGMENTS][128];
	bool seg_suspended[LIVE_MAX_SEGMENTS], seg_read_only[LIVE_MAX_SEGMENTS];
	unsigned int nsegs;
	struct live_crypt crypt[IMG_MAX_CHAIN_DEPTH];
	unsigned int ncrypt;
	bool has_daemon;	/* the mapping has a slow path (NAME.daemon) */
	bool daemon_running;	/* and its daemon answers */
	bool daemon_held;	/* we told it "suspend" */
	bool marked;		/* we wrote NAME.suspended */
};

/* Fault injection for the atomicity tests (--debug-fail-step K), as open. */
static int live_step(struct live_ctx *c, const char *what, const char *dev)
{
	c->step++;
	log_dbg("%s step %d: %s %s", c->verb, c->step, what, dev ? dev : "");
	if (c->fail_step && c->step == c->fail_step) {
		log_err("Injected failure at step %d (%s %s).", c->step, what, dev ? dev : "");
		return -EIO;
	}
	return 0;
}

static void marker_path(const struct live_ctx *c, char *buf, size_t size)
{
	qs_state_path(buf, size, c->name, QS_STATE_SUSPENDED);
}

bool mapping_is_marked_suspended(const char *name)
{
	char path[PATH_MAX];

	qs_state_path(path, sizeof(path), name, QS_STATE_SUSPENDED);
	return access(path, F_OK) == 0;
}

static int mark(struct live_ctx *c)
{
	char path[PATH_MAX];
	int fd;

	marker_path(c, path, sizeof(path));
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		int r = -errno;

		log_err("Cannot create %s: %s.", path, strerror(-r));
		return r;
	}
	close(fd);
	c->marked = true;
	return 0;
}

void mapping_unmark_suspended(const char *name)
{
	char path[PATH_MAX];

	qs_state_path(path, sizeof(path), name, QS_STATE_SUSPENDED);
	if (unlink(path) == 0)
		log_dbg("removed %s", path);
}

static void unmark(struct live_ctx *c)
{
	mapping_unmark_suspended(c->name);
	c->marked = false;
}

/* ---- finding the devices ---- */

struct crypt_scan {
	struct live_crypt *lc;
	bool found;
};

/* crypt params: cipher key iv_offset device offset [#opt opt...]; the key
 * is a keyring reference ":LEN:logon:DESC", or zeros once wiped (dm-crypt
 * then forgets the reference: the description is the one `open` gives the
 * layer, dm_key_description). */
static int scan_crypt_target(void *opaque, uint64_t start, uint64_t length, const char *type, const char *params)
{
	struct crypt_scan *s = opaque;
	struct live_crypt *lc = s->lc;
	char key[sizeof(lc->key_ref)], dev[32];
	unsigned int len, maj, min;

	if (strcmp(type, "crypt") || start != 0 || s->found)
		return 0;
	_Static_assert(sizeof(key) == 288, "the width below");
	if (sscanf(params, "%*s %287s %*s %31s", key, dev) != 2 || sscanf(dev, "%u:%u", &maj, &min) != 2)
		return 0;
	if (sscanf(key, ":%u:logon:", &len) != 1) {
		if (strspn(key, "0") != strlen(key) || strlen(key) % 2)
			return 0;	/* (a hex key: not a mapping of ours) */
		len = (unsigned int)strlen(key) / 2;
	}
	snprintf(lc->params, sizeof(lc->params), "%s", params);
	lc->key_size = len;
	lc->sectors = length;
	lc->under_major = maj;
	lc->under_minor = min;
	s->found = true;
	return 0;
}

/* The layer of crypt device dev of mapping name: NAME_crypt is the top's,
 * NAME_L<d>_crypt layer d's (dmtable.c's names); -1 for other devices. */
static int crypt_depth(const char *dev, const char *name)
{
	size_t n = strlen(name);
	unsigned int d;
	int used = 0;

	if (strncmp(dev, name, n))
		return -1;
	if (!strcmp(dev + n, "_crypt"))
		return 0;
	if (sscanf(dev + n, "_L%u_crypt%n", &d, &used) == 1 && dev[n + (size_t)used] == '\0' &&
	    d < IMG_MAX_CHAIN_DEPTH)
		return (int)d;
	return -1;
}

static int collect(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct live_ctx *c = opaque;
	struct crypt_scan s;
	int depth;

	(void)major;
	(void)minor;
	if (!uuid || !dm_uuid_is_internal_of(uuid, c->top.uuid))
		return 0;
	/* (the fast device with the segments: between them and the top) */
	if (dm_is_daemon_device_name(name, c->name)) {
		if (c->nsegs == LIVE_MAX_SEGMENTS)
			return -E2BIG;
		snprintf(c->segs[c->nsegs++], sizeof(c->segs[0]), "%s", name);
		return 0;
	}
	depth = crypt_depth(name, c->name);
	if (depth < 0 || c->ncrypt == IMG_MAX_CHAIN_DEPTH)
		return 0;
	s.lc = &c->crypt[c->ncrypt];
	s.found = false;
	memset(s.lc, 0, sizeof(*s.lc));
	if (dm_get_table(name, scan_crypt_target, &s) == 0 && s.found) {
		struct live_crypt *lc = s.lc;

		snprintf(lc->name, sizeof(lc->name), "%s", name);
		lc->depth = (unsigned int)depth;
		if (dm_key_description(c->name, lc->depth, lc->key_desc, sizeof(lc->key_desc)))
			return -ENAMETOOLONG;
		snprintf(lc->key_ref, sizeof(lc->key_ref), ":%u:logon:%s", lc->key_size, lc->key_desc);
		c->ncrypt++;
	}
	return 0;
}

static int by_depth(const void *a, const void *b)
{
	const struct live_crypt *x = a, *y = b;

	return (x->depth > y->depth) - (x->depth < y->depth);
}

/* Whether a device whose name starts with prefix is under block (sysfs
 * slaves: the top, its segments). */
static bool has_slave(const char *block, const char *prefix, int depth)
{
	char path[PATH_MAX];
	struct dirent *e;
	bool found = false;
	DIR *dir;

	snprintf(path, sizeof(path), "/sys/class/block/%s/slaves", block);
	dir = depth < 16 ? opendir(path) : NULL;
	if (!dir)
		return false;
	while (!found && (e = readdir(dir)))
		if (e->d_name[0] != '.')
			found = !strncmp(e->d_name, prefix, strlen(prefix)) || has_slave(e->d_name, prefix, depth + 1);
	closedir(dir);
	return found;
}

int mapping_lock_existing(const char *name, int *lock, struct dm_dev_info *top)
{
	int r;

	if (lock)
		*lock = -1;
	if (!dm_mapping_name_valid(name)) {
		log_err("Device %s is not a qcowsetup mapping.", name);
		return -ENODEV;
	}
	r = dm_check_control();
	if (r)
		return r;
	if (lock && (*lock = qs_name_lock(name)) < 0) {
		r = *lock;
		log_err("Cannot lock the name %s: %s.", name, strerror(-r));
		return r;
	}
	r = dm_device_info(name, top);
	if (r)
		return r;
	if (!top->exists || !dm_uuid_is_top(top->uuid)) {
		log_err(top->exists ? "Device %s is not a qcowsetup mapping." : "Device %s does not exist.", name);
		return -ENODEV;
	}
	return 0;
}

/* NAME locked, its devices found, the daemon asked whether it runs. */
static int live_prepare(struct live_ctx *c)
{
	char text[CONTROL_LINE_MAX], block[32];
	int r;

	c->lock = -1;
	r = mapping_lock_existing(c->name, c->lock_held ? NULL : &c->lock, &c->top);
	if (r)
		return r;
	c->top_suspended = c->top.suspended;
	r = dm_list_devices(collect, c);
	if (r)
		return r;
	qsort(c->crypt, c->ncrypt, sizeof(c->crypt[0]), by_depth);
	for (unsigned int i = 0; i < c->ncrypt; i++) {
		struct dm_dev_info info;

		r = dm_device_info(c->crypt[i].name, &info);
		if (r)
			return r;
		c->crypt[i].suspended = info.suspended;
		c->crypt[i].read_only = info.read_only;
		c->crypt[i].has_key = !info.suspended;	/* (suspended: as suspend left it) */
	}
	for (unsigned int i = 0; i < c->nsegs; i++) {
		struct dm_dev_info info;

		r = dm_device_info(c->segs[i], &info);
		if (r)
			return r;
		c->seg_suspended[i] = info.suspended;
		c->seg_read_only[i] = info.read_only;
	}
	snprintf(block, sizeof(block), "dm-%u", c->top.minor);
	c->has_daemon = has_slave(block, "nbd", 0);
	if (c->has_daemon)
		c->daemon_running = control_call(c->name, "ping", text, sizeof(text)) == 0;
	log_dbg("%s: %u crypt devices, %u segments, %s", c->name, c->ncrypt, c->nsegs,
		!c->has_daemon ? "no daemon" : c->daemon_running ? "daemon running" : "daemon not running");
	return 0;
}

/* The context of verb on NAME, prepared (*r 0), or NULL (*r -ENOMEM).
 * lock_held: the caller holds NAME's lock. */
static struct live_ctx *live_begin_as(const char *name, const char *verb, int fail_step, bool lock_held, int *r)
{
	struct live_ctx *c = calloc(1, sizeof(*c));

	*r = -ENOMEM;
	if (!c)
		return NULL;
	c->name = name;
	c->verb = verb;
	c->fail_step = fail_step;
	c->lock_held = lock_held;
	*r = live_prepare(c);
	return c;
}

static struct live_ctx *live_begin(const char *name, const char *verb, int fail_step, int *r)
{
	return live_begin_as(name, verb, fail_step, false, r);
}

static int live_end(struct live_ctx *c, int r)
{
	if (!c)
		return r;
	for (unsigned int i = 0; i < c->ncrypt; i++)
		volume_key_free(c->crypt[i].vk);
	if (!c->lock_held)
		qs_name_unlock(c->name, c->lock);
	dm_release();
	free(c);
	return r;
}

/* Whether `qcowsetup suspend` holds NAME: its mark, or a suspended top
 * that no daemon swaps (a running daemon's table swap suspends the top for
 * a moment, which is no suspend). */
static bool held_by_suspend(const struct live_ctx *c)
{
	return mapping_is_marked_suspended(c->name) || (c->top_suspended && !c->daemon_running);
}

/* The state of the top and its segments again, once the daemon makes no
 * more table swaps (one may have been under way when they were read). */
static int reread_top(struct live_ctx *c)
{
	struct dm_dev_info info;
	int r;

	r = dm_device_info(c->name, &info);
	if (!r)
		c->top_suspended = info.suspended;
	for (unsigned int i = 0; !r && i < c->nsegs; i++) {
		r = dm_device_info(c->segs[i], &info);
		if (!r)
			c->seg_suspended[i] = info.suspended;
	}
	return r;
}

/* suspend and refresh talk to a running daemon */
static int need_daemon(const struct live_ctx *c)
{
	if (!c->has_daemon || c->daemon_running)
		return 0;
	log_err("The slow-path daemon of %s is not running: `qcowsetup reattach %s` first.", c->name, c->name);
	return -ENOTCONN;
}

/* ---- the steps, each undone by its opposite ---- */

static int daemon_say(struct live_ctx *c, const char *request)
{
	int r = live_step(c, "tell the daemon", request);

	return r ? r : control_call(c->name, request, NULL, 0);
}

static int suspend_dev(struct live_ctx *c, const char *name, unsigned int flags, bool *suspended)
{
	int r;

	if (*suspended)
		return 0;
	r = live_step(c, "suspend", name);
	if (!r)
		r = dm_suspend(name, flags);
	if (!r)
		*suspended = true;
	return r;
}

static int resume_dev(struct live_ctx *c, const char *name, bool hidden, bool *suspended)
{
	int r;

	if (!*suspended)
		return 0;
	r = live_step(c, "resume", name);
	if (!r)
		r = dm_resume(name, hidden);
	if (!r)
		*suspended = false;
	return r;
}

static int wipe_key(struct live_ctx *c, struct live_crypt *lc)
{
	int r;

	if (!lc->has_key)
		return 0;
	r = live_step(c, "wipe the key of", lc->name);
	if (!r)
		r = dm_target_message(lc->name, "key wipe");
	if (!r)
		lc->has_key = false;
	return r;
}

/* The key of lc back into its (suspended) crypt device, through the
 * thread keyring: added, named in the message, removed. */
static int set_key(struct live_ctx *c, struct live_crypt *lc)
{
	char msg[sizeof(lc->key_ref) + 16];
	int32_t serial = 0;
	int r;

	if (lc->has_key)
		return 0;
	r = live_step(c, "set the key of", lc->name);
	if (!r)
		r = keyring_add_logon(lc->key_desc, lc->vk->key, lc->vk->size, &serial);
	if (!r) {
		snprintf(msg, sizeof(msg), "key set %s", lc->key_ref);
		r = dm_target_message(lc->name, msg);
		keyring_remove(serial);
	}
	if (!r)
		lc->has_key = true;
	return r;
}

/* Suspend the top and its segments (the top with a flush and a filesystem
 * freeze: what the guest wrote gets down). */
static int hold_top(struct live_ctx *c)
{
	int r;

	r = suspend_dev(c, c->name, 0, &c->top_suspended);
	for (unsigned int i = 0; !r && i < c->nsegs; i++)
		r = suspend_dev(c, c->segs[i], DM_SUSPEND_NOFLUSH | DM_SUSPEND_SKIP_LOCKFS, &c->seg_suspended[i]);
	return r;
}

static int hold_crypt(struct live_ctx *c)
{
	int r = 0;

	for (unsigned int i = 0; !r && i < c->ncrypt; i++)
		r = suspend_dev(c, c->crypt[i].name, DM_SUSPEND_SKIP_LOCKFS, &c->crypt[i].suspended);
	return r;
}

static int hold_devices(struct live_ctx *c)
{
	int r = hold_top(c);

	return r ? r : hold_crypt(c);
}

/* The other way: crypt devices (the deepest first), segments, top. */
static int release_devices(struct live_ctx *c, bool with_top)
{
	int r = 0;

	for (unsigned int i = c->ncrypt; !r && i-- > 0;)
		r = resume_dev(c, c->crypt[i].name, true, &c->crypt[i].suspended);
	for (unsigned int i = 0; !r && i < c->nsegs; i++)
		r = resume_dev(c, c->segs[i], true, &c->seg_suspended[i]);
	if (!r && with_top)
		r = resume_dev(c, c->name, false, &c->top_suspended);
	return r;
}

/* Undo without fault injection: whatever fails here is logged. */
static void undo_release(struct live_ctx *c)
{
	c->fail_step = 0;
	release_devices(c, true);
	if (c->daemon_held && control_call(c->name, "resume", NULL, 0) == 0)
		c->daemon_held = false;
	if (c->marked)
		unmark(c);
}

static void undo_hold(struct live_ctx *c)
{
	c->fail_step = 0;
	if (c->has_daemon && c->daemon_running && !c->daemon_held && control_call(c->name, "suspend", NULL, 0) == 0)
		c->daemon_held = true;
	if (!c->marked)
		mark(c);
	hold_devices(c);
	for (unsigned int i = 0; i < c->ncrypt; i++)
		if (c->crypt[i].suspended)
			wipe_key(c, &c->crypt[i]);
}

/* ---- suspend ---- */

int mapping_suspend(const char *name, int fail_step)
{
	bool wiped = false;
	int r;
	struct live_ctx *c = live_begin(name, "suspend", fail_step, &r);

	if (r)
		return live_end(c, r);
	if (held_by_suspend(c)) {
		log_err("Device %s is already suspended.", name);
		return live_end(c, -EBUSY);
	}
	r = need_daemon(c);
	if (!r && c->has_daemon) {
		r = daemon_say(c, "suspend");
		c->daemon_held = r == 0;
		if (!r)
			r = reread_top(c);
		if (!r && c->top_suspended) {
			log_err("Device %s is suspended (not by qcowsetup suspend).", name);
			control_call(name, "resume", NULL, 0);
			return live_end(c, -EBUSY);
		}
	}
	if (!r)
		r = live_step(c, "mark", name);
	if (!r)
		r = mark(c);
	if (!r)
		r = hold_top(c);
	if (!r && c->has_daemon)
		r = daemon_say(c, "suspend");	/* what was written meanwhile */
	if (!r)
		r = hold_crypt(c);
	for (unsigned int i = 0; !r && i < c->ncrypt; i++) {
		r = wipe_key(c, &c->crypt[i]);
		wiped = wiped || !c->crypt[i].has_key;
	}
	if (r && wiped) {
		/* a wiped key cannot come back here: all the way down */
		c->fail_step = 0;
		for (unsigned int i = 0; i < c->ncrypt; i++)
			wipe_key(c, &c->crypt[i]);
		log_err("%s stays suspended (some of its keys are wiped): `qcowsetup resume %s` brings it back.", name,
			name);
	} else if (r) {
		undo_release(c);
	}
	if (!r)
		log_verbose("%s is suspended: I/O is held, the volume keys are wiped.", name);
	return live_end(c, r);
}

/* ---- the keys, checked against the headers ---- */

/* The device a crypt device decrypts, down to its loop device (legacy AES:
 * through the linear map of guest space). */
struct under_scan {
	uint32_t major, minor;
	bool found;
};

static int scan_linear(void *opaque, uint64_t start, uint64_t length, const char *type, const char *params)
{
	struct under_scan *u = opaque;
	unsigned int maj, min;

	(void)start;
	(void)length;
	if (!u->found && !strcmp(type, "linear") && sscanf(params, "%u:%u", &maj, &min) == 2 &&
	    maj == LOOP_DEV_MAJOR) {
		u->major = maj;
		u->minor = min;
		u->found = true;
	}
	return 0;
}

static int dm_name_of(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct under_scan *u = opaque;

	(void)uuid;
	if (major == u->major && minor == u->minor) {
		u->found = dm_get_table(name, scan_linear, u) == 0 && u->found;
		return 1;
	}
	return 0;
}

static int layer_loop(const struct live_crypt *lc, char *path, size_t size)
{
	struct under_scan u = { .major = lc->under_major, .minor = lc->under_minor };

	if (u.major != LOOP_DEV_MAJOR) {
		dm_list_devices(dm_name_of, &u);
		if (!u.found) {
			log_err("%s: cannot find the image file under it.", lc->name);
			return -ENODEV;
		}
	}
	snprintf(path, size, "/dev/loop%u", u.minor);
	return 0;
}

/* Try pp on layer lc: 0 with lc->vk, -EPERM (wrong), or -errno. */
static int try_passphrase(struct live_crypt *lc, struct image *img, const struct passphrase *pp, bool skip_check)
{
	int slot = -1, r;

	if (img->crypt_method == IMG_CRYPT_LUKS) {
		r = luks_unlock(&img->io, img->crypt_header_offset, img->crypt_header_length, pp, &lc->vk, &slot);
		if (r == 0)
			log_verbose("%s: key slot %d unlocked.", img->path, slot);
	} else if (img->crypt_method == IMG_CRYPT_AES) {
		r = legacy_aes_key(pp, &lc->vk);
		if (r == 0 && !skip_check)
			r = legacy_key_check(img, lc->vk);
	} else {
		log_err("%s: the image under %s is not encrypted.", img->path, lc->name);
		return -EUCLEAN;
	}
	if (r == 0 && lc->vk->size != lc->key_size) {
		log_err("%s: the key is %zu bytes, the table of %s wants %u.", img->path, lc->vk->size, lc->name,
			lc->key_size);
		r = -EUCLEAN;
	}
	if (r) {
		volume_key_free(lc->vk);
		lc->vk = NULL;
	}
	return r;
}

/* The volume key of the first n encrypted layers (from the top): the
 * passphrase that opened the layer above first, then what ask() gives (as
 * open). */
static int unlock_layers(struct live_ctx *c, const struct mapping_live_params *p, unsigned int n)
{
	struct passphrase *shared = NULL;
	int r = 0;

	for (unsigned int i = 0; !r && i < n && i < c->ncrypt; i++) {
		struct live_crypt *lc = &c->crypt[i];
		struct image_open_opts o = { .no_backing = true, .no_data_file = true };
		struct image *img = NULL;
		struct img_io io;
		char path[64];
		bool wrong = false;
		int fd;

		r = layer_loop(lc, path, sizeof(path));
		if (r)
			break;
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			r = -errno;
			log_err("Cannot open %s: %s.", path, strerror(-r));
			break;
		}
		r = file_io_from_fd(fd, path, &io);
		if (!r) {
			r = image_open_io(&file_io_opener, &io, &o, &img);
			if (r)
				log_err("%s (under %s): cannot read the image's header: %s.", path, lc->name, strerror(-r));
		}
		if (!r && img->crypt_method == IMG_CRYPT_AES && i == 0)
			log_verbose("%s: legacy AES has no key check; the key is checked for plausibility as open does%s.",
				    c->name, p->skip_key_check ? " (skipped: --skip-key-check)" : "");
		for (unsigned int attempt = 0; !r; attempt++) {
			struct passphrase *pp = NULL;

			if (attempt == 0 && !shared)
				continue;
			if (attempt == 0) {
				pp = shared;
			} else {
				r = p->ask ? p->ask(p->ask_opaque, path, attempt, &pp) : -ENOKEY;
				if (r < 0) {
					r = wrong || r == -ENOKEY ? -EPERM : r;
					break;
				}
			}
			r = try_passphrase(lc, img, pp, p->skip_key_check);
			if (r == 0 && pp != shared) {
				passphrase_free(shared);
				shared = pp;
			} else if (pp != shared) {
				passphrase_free(pp);
			}
			if (r == -EPERM && attempt > 0) {
				wrong = true;
				log_err("No key available with this passphrase for %s.", c->name);
			}
			if (r == -EPERM)
				r = 0;	/* ask again */
			else
				break;
		}
		image_free(img, &file_io_opener);
		file_io_free(&io);
		close(fd);
	}
	passphrase_free(shared);
	return r;
}

/* ---- resume ---- */

int mapping_resume(const char *name, const struct mapping_live_params *p)
{
	bool marked;
	int r;
	struct live_ctx *c = live_begin(name, "resume", p->fail_step, &r);

	if (r)
		return live_end(c, r);
	marked = mapping_is_marked_suspended(name);
	c->marked = marked;
	c->daemon_held = c->has_daemon && c->daemon_running;
	if (!held_by_suspend(c)) {
		log_err("Device %s is not suspended.", name);
		return live_end(c, -EINVAL);
	}
	r = unlock_layers(c, p, c->ncrypt);
	if (r)
		return live_end(c, r);
	for (unsigned int i = 0; !r && i < c->ncrypt; i++)
		r = set_key(c, &c->crypt[i]);
	for (unsigned int i = 0; i < c->ncrypt; i++) {
		volume_key_free(c->crypt[i].vk);
		c->crypt[i].vk = NULL;
	}
	if (!r && c->has_daemon && !c->daemon_running) {
		/* the daemon died meanwhile: a new one, which resumes the top */
		r = release_devices(c, false);
		if (!r)
			r = live_step(c, "start a new daemon for", name);
		if (!r)
			r = mapping_reattach_locked(name, p->debug);
		if (!r) {
			c->daemon_running = true;
			c->daemon_held = false;
			c->top_suspended = false;
			for (unsigned int i = 0; i < c->nsegs; i++)
				c->seg_suspended[i] = false;
		}
	} else if (!r) {
		r = release_devices(c, true);
	}
	if (!r && c->daemon_held) {
		r = daemon_say(c, "resume");
		c->daemon_held = r != 0;
	}
	if (!r && marked) {
		r = live_step(c, "unmark", name);
		if (!r)
			unmark(c);
	}
	if (r && r != -EPERM) {
		undo_hold(c);
		log_err("%s stays suspended.", name);
	}
	if (!r)
		log_verbose("%s is resumed.", name);
	return live_end(c, r);
}

/* ---- refresh ---- */

/* params with its optional "allow_discards" switched: the options after
 * "cipher key iv_offset device offset" are "[N opt...]". */
static int switch_discards(const char *params, bool on, char *out, size_t size)
{
	char opts[16][64];
	unsigned int nopt = 0, n = 0, count;
	const char *p = params;
	int pos, k;

	for (int word = 0; word < 4; word++) {
		p = strchr(p, ' ');
		if (!p)
			return -EINVAL;
		p++;
	}
	/* p: "offset[ N opt...]" */
	p = strchr(p, ' ');
	if (p && sscanf(p, " %u%n", &count, &pos) == 1) {
		const char *q = p + pos;

		for (unsigned int i = 0; i < count && nopt < 16; i++) {
			char w[64];
			int used;

			if (sscanf(q, " %63s%n", w, &used) != 1)
				return -EINVAL;
			q += used;
			if (strcmp(w, "allow_discards"))
				snprintf(opts[nopt++], sizeof(opts[0]), "%s", w);
		}
	}
	if (on && nopt < 16)
		snprintf(opts[nopt++], sizeof(opts[0]), "allow_discards");
	k = snprintf(out, size, "%.*s", p ? (int)(p - params) : (int)strlen(params), params);
	if (k < 0 || (size_t)k >= size)
		return -ENOSPC;
	n = (unsigned int)k;
	if (nopt) {
		k = snprintf(out + n, size - n, " %u", nopt);
		n += (unsigned int)MAX(k, 0);
		for (unsigned int i = 0; i < nopt && n < size; i++) {
			k = snprintf(out + n, size - n, " %s", opts[i]);
			n += (unsigned int)MAX(k, 0);
		}
	}
	return n < size ? 0 : -ENOSPC;
}

/* A live table loaded again into the inactive slot, as it is. */
struct table_copy {
	struct dm_table_target *t;
	char **params;
	size_t n, alloc;
};

static int copy_target(void *opaque, uint64_t start, uint64_t length, const char *type, const char *params)
{
	struct table_copy *tc = opaque;

	if (tc->n == tc->alloc) {
		size_t na = tc->alloc ? 2 * tc->alloc : 64;
		struct dm_table_target *t = realloc(tc->t, na * sizeof(*t));
		char **pp;

		if (!t)
			return -ENOMEM;
		tc->t = t;
		pp = realloc(tc->params, na * sizeof(*pp));
		if (!pp)
			return -ENOMEM;
		tc->params = pp;
		tc->alloc = na;
	}
	tc->params[tc->n] = malloc(strlen(type) + strlen(params) + 2);
	if (!tc->params[tc->n])
		return -ENOMEM;
	strcpy(tc->params[tc->n], type);
	strcpy(tc->params[tc->n] + strlen(type) + 1, params);
	tc->t[tc->n] = (struct dm_table_target){ .start = start, .length = length, .type = tc->params[tc->n],
						 .params = tc->params[tc->n] + strlen(type) + 1 };
	tc->n++;
	return 0;
}

/* Reload device name with its own live table, and swap it in. */
static int reload_as_is(struct live_ctx *c, const char *name, bool hidden, bool read_only)
{
	struct table_copy tc = { 0 };
	struct dm_table t;
	int r;

	r = live_step(c, "reload", name);
	if (!r)
		r = dm_get_table(name, copy_target, &tc);
	if (!r) {
		t = (struct dm_table){ .count = tc.n, .targets = tc.t };
		r = dm_load_table(name, read_only, &t);
	}
	if (!r) {
		r = dm_suspend(name, DM_SUSPEND_NOFLUSH | DM_SUSPEND_SKIP_LOCKFS);
		if (dm_resume(name, hidden) && !r)
			r = -EIO;
	}
	for (size_t i = 0; i < tc.n; i++)
		free(tc.params[i]);
	free(tc.params);
	free(tc.t);
	return r;
}

/* The crypt device lc with a new table of one crypt target (params, its
 * key named by reference: the key goes through the keyring), swapped in. */
static int reload_crypt_table(struct live_ctx *c, struct live_crypt *lc, const char *params, uint64_t sectors)
{
	struct dm_table_target tt = { .start = 0, .length = sectors, .type = "crypt", .params = params };
	struct dm_table t = { .count = 1, .targets = &tt };
	int32_t serial = 0;
	int r;

	r = live_step(c, "reload", lc->name);
	if (!r)
		r = keyring_add_logon(lc->key_desc, lc->vk->key, lc->vk->size, &serial);
	if (!r) {
		r = dm_load_table(lc->name, lc->read_only, &t);
		keyring_remove(serial);
	}
	if (!r) {
		r = dm_suspend(lc->name, DM_SUSPEND_NOFLUSH | DM_SUSPEND_SKIP_LOCKFS);
		if (dm_resume(lc->name, true) && !r)
			r = -EIO;
		if (r)
			log_err("%s: the new table could not be swapped in.", lc->name);
	} else {
		dm_clear_table(lc->name);
	}
	return r;
}

/* The crypt device lc with allow_discards on or off. */
static int reload_crypt(struct live_ctx *c, struct live_crypt *lc, bool on)
{
	char params[DM_TABLE_PARAMS_SIZE];
	int r;

	r = switch_discards(lc->params, on, params, sizeof(params));
	if (r) {
		log_err("%s: cannot read its table.", lc->name);
		return r;
	}
	return reload_crypt_table(c, lc, params, lc->sectors);
}

/* Loop device /dev/loopname, when writable, passes discards or not. */
static int one_loop_discards(const char *loopname, bool on)
{
	char path[PATH_MAX], buf[32];
	unsigned int maj, min;
	int r = 0;

	snprintf(path, sizeof(path), "/sys/class/block/%s/ro", loopname);
	if (sys_read_small(path, buf, sizeof(buf)) <= 0 || buf[0] != '0')
		return 0;	/* (read-only: no discard reaches it) */
	snprintf(path, sizeof(path), "/sys/class/block/%s/dev", loopname);
	if (sys_read_small(path, buf, sizeof(buf)) > 0 && sscanf(buf, "%u:%u", &maj, &min) == 2) {
		r = sys_block_discard(maj, min, on);
		if (r == -EOPNOTSUPP && on)
			r = 0;	/* (a file system without holes: nothing to pass) */
		if (r)
			log_err("/dev/%s: cannot turn discards %s: %s.", loopname, on ? "on" : "off", strerror(-r));
	}
	return r;
}

/* The writable loop devices under the mapping (sysfs slaves, from the top
 * down) pass discards or not: read-write mappings without discards have
 * them off (open), else the file's holes would be punched. */
static int loop_discards(const char *block, bool on, int depth)
{
	char path[PATH_MAX];
	struct dirent *e;
	DIR *dir;
	int r = 0;

	if (depth > 16)
		return 0;
	snprintf(path, sizeof(path), "/sys/class/block/%s/slaves", block);
	dir = opendir(path);
	if (!dir)
		return 0;
	while (!r && (e = readdir(dir))) {
		if (e->d_name[0] == '.')
			continue;
		if (strncmp(e->d_name, "loop", 4))
			r = loop_discards(e->d_name, on, depth + 1);
		else
			r = one_loop_discards(e->d_name, on);
	}
	closedir(dir);
	return r;
}

/* The loop devices under the top table, and those the daemon's layers sit
 * on: a table that maps nothing to a layer yet (an empty image, all of it
 * on the slow path) does not name its loop device, which the daemon maps
 * later. */
static int top_loop_discards(struct live_ctx *c, bool on)
{
	struct daemon_args *a;
	char block[32];
	pid_t pid;
	int nbd, r = live_step(c, "switch the discards of the loop devices of", c->name);

	snprintf(block, sizeof(block), "dm-%u", c->top.minor);
	if (!r)
		r = loop_discards(block, on, 0);
	if (r || !c->has_daemon)
		return r;
	a = malloc(sizeof(*a));
	if (!a)
		return -ENOMEM;
	if (qs_state_read(c->name, &pid, &nbd, a) == 0)
		for (unsigned int i = 0; !r && i < a->nlayers; i++) {
			unsigned int maj, min;

			if (sscanf(a->layers[i].host, "%u:%u", &maj, &min) == 2 && maj == LOOP_DEV_MAJOR) {
				snprintf(block, sizeof(block), "loop%u", min);
				r = one_loop_discards(block, on);
			}
		}
	free(a);
	return r;
}

static bool crypt_has_discards(const struct live_crypt *lc)
{
	const char *p = strstr(lc->params, " allow_discards");

	return p && (p[15] == '\0' || p[15] == ' ');
}

int mapping_refresh(const char *name, bool allow_discards, const struct mapping_live_params *p)
{
	bool done[IMG_MAX_CHAIN_DEPTH] = { false };
	int r;
	struct live_ctx *c = live_begin(name, "refresh", p->fail_step, &r);

	if (r)
		return live_end(c, r);
	if (held_by_suspend(c)) {
		log_err("Device %s is suspended: `qcowsetup resume %s` first.", name, name);
		return live_end(c, -EBUSY);
	}
	r = need_daemon(c);
	if (!r && c->ncrypt)
		r = unlock_layers(c, p, c->ncrypt);
	if (!r && !c->top.read_only)
		r = top_loop_discards(c, allow_discards);
	for (unsigned int i = 0; !r && i < c->ncrypt; i++) {
		if (crypt_has_discards(&c->crypt[i]) == allow_discards)
			continue;
		r = reload_crypt(c, &c->crypt[i], allow_discards);
		done[i] = r == 0;
	}
	if (!r && c->has_daemon) {
		r = daemon_say(c, allow_discards ? "refresh on" : "refresh off");
	} else if (!r) {
		for (unsigned int i = 0; !r && i < c->nsegs; i++)
			r = reload_as_is(c, c->segs[i], true, c->seg_read_only[i]);
		if (!r)
			r = reload_as_is(c, name, false, c->top.read_only);
	}
	if (r) {
		/* the crypt tables back as they were */
		c->fail_step = 0;
		for (unsigned int i = 0; i < c->ncrypt; i++)
			if (done[i])
				reload_crypt(c, &c->crypt[i], !allow_discards);
		if (!c->top.read_only)
			top_loop_discards(c, !allow_discards);
	} else {
		log_verbose("%s: discards %s.", name, allow_discards ? "allowed" : "not allowed");
	}
	return live_end(c, r);
}

/* ---- resize: the top layer's crypt device made larger ---- */

int mapping_grow_crypt_locked(const char *name, uint64_t bytes, const struct mapping_live_params *p, int steps_done)
{
	struct live_crypt *lc;
	int r;
	struct live_ctx *c = live_begin_as(name, "resize", p->fail_step, true, &r);

	if (r)
		return live_end(c, r);
	c->step = steps_done;
	lc = c->ncrypt && c->crypt[0].depth == 0 ? &c->crypt[0] : NULL;
	if (!lc) {
		log_err("%s: the crypt device of its image is missing.", name);
		return live_end(c, -ENODEV);
	}
	if (held_by_suspend(c)) {
		log_err("Device %s is suspended: `qcowsetup resume %s` first.", name, name);
		return live_end(c, -EBUSY);
	}
	if (lc->sectors >= bytes >> 9)
		return live_end(c, 0);
	log_verbose("%s: %s covers %" PRIu64 " bytes, the new size needs %" PRIu64 ": its key is needed.", name,
		    lc->name, lc->sectors << 9, bytes);
	r = unlock_layers(c, p, 1);
	if (!r)
		r = reload_crypt_table(c, lc, lc->params, bytes >> 9);
	if (!r)
		log_verbose("%s: %s covers %" PRIu64 " bytes.", name, lc->name, bytes & ~(uint64_t)511);
	return live_end(c, r);
}
