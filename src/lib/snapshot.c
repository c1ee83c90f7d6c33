/* A live external snapshot (mapping.h, mapping_snapshot): the mapping NAME
 * moves onto a new overlay whose backing file is the image it had open,
 * while /dev/mapper/NAME stays open and its I/O is held, not failed.
 *
 * The steps, each undone by its opposite on a failure:
 *   1. NAME locked; the old daemon's arguments from its state file; the
 *      chain parsed read-only and its volume keys unlocked (passphrases
 *      asked as open asks them, before anything is held);
 *   2. the overlay written (qcow2, the old image as its backing file (its
 *      file name when both are in one folder, as the trust rules want),
 *      LUKS with the old image's cipher and the same or a new passphrase
 *      when the old image is LUKS-encrypted);
 *   3. the mapping's devices under the top (not its segments) renamed
 *      aside, "NAME_crypt" to "NAME_crypt.old": the new stack takes their
 *      names (the overlay's crypt device is NAME_crypt, the old image's
 *      NAME_L1_crypt, as `open OVERLAY NAME` names them);
 *   4. the old daemon told "suspend" (its metadata written back, no table
 *      swaps), the top device suspended with a flush (the I/O is held);
 *   5. the old daemon told "detach": it closes the image as at a close
 *      (flushed, dirty bit cleared, the file given back its size) and
 *      exits, leaving the top device and its NBD device (the loop devices
 *      it held are held here until the end);
 *   6. the overlay's stack built as open builds it (mapping_swap.h): its
 *      loop devices, the old image read-only with QEMU's read-only locks,
 *      the crypt devices, and a new daemon, which loads the top's new table
 *      and resumes it: the switch. After it, nothing fails: the old
 *      devices are removed (the old read-write loop device with them, and
 *      so the old image's write locks), the old NBD device disconnected,
 *      and the new devices get their UUIDs.
 * A failure before the switch undoes the steps: the devices renamed back,
 * the old image's size restored, the old daemon restarted (a reattach to
 * its NBD device, which reloads and resumes the top), the overlay removed.
 * Fault injection (--debug-fail-step K) counts these steps and open's in
 * one sequence. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "control.h"
#include "daemon_state.h"
#include "dm.h"
#include "dmtable.h"
#include "log.h"
#include "loop.h"
#include "mapping.h"
#include "mapping_swap.h"
#include "nbd.h"
#include "qcow2_create.h"
#include "util.h"

#define SNAP_MAX_RENAMED	64

struct snap_ctx {
	const struct mapping_snapshot_params *p;
	const char *name;
	int lock;
	int step;
	struct dm_dev_info top;
	struct daemon_args *args;	/* the old daemon's, from its state file */
	pid_t old_pid;
	int old_nbd;
	struct mapping_chain_keys keys;
	struct volume_key *new_vk;	/* the overlay's, when encrypted */
	bool created;			/* the overlay file */
	char renamed[SNAP_MAX_RENAMED][128];	/* old devices renamed aside (their old names) */
	bool renamed_hidden[SNAP_MAX_RENAMED];
	unsigned int nrenamed;
	bool daemon_held, top_suspended, detached;
	uint64_t old_size;		/* of the old image's file, before the detach */
	struct timespec held_at;	/* when the top was suspended */
	int hold_fd[DAEMON_MAX_HOLDS];	/* the old daemon's loop devices, kept */
};

/* The loop devices the old daemon holds, held here too until the end: a
 * backing layer whose data goes through the slow path only is held by
 * nothing else, and would go with the old daemon (autoclear) before a
 * restarted one finds it again. */
static void keep_loops(struct snap_ctx *c)
{
	for (unsigned int i = 0; i < c->args->nholds && i < DAEMON_MAX_HOLDS; i++) {
		unsigned int maj, min;
		char path[32];

		if (sscanf(c->args->holds[i], "%u:%u", &maj, &min) != 2 || maj != LOOP_DEV_MAJOR)
			continue;
		snprintf(path, sizeof(path), "/dev/loop%u", min);
		c->hold_fd[i] = open(path, O_RDONLY | O_CLOEXEC);
		if (c->hold_fd[i] < 0)
			log_dbg("cannot hold %s open: %s", path, strerror(errno));
	}
}

static void release_loops(struct snap_ctx *c)
{
	for (unsigned int i = 0; i < DAEMON_MAX_HOLDS; i++)
		if (c->hold_fd[i] >= 0) {
			close(c->hold_fd[i]);
			c->hold_fd[i] = -1;
		}
}

static double ms_since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) * 1e3 + (double)(t.tv_nsec - t0->tv_nsec) / 1e6;
}

static int snap_step(struct snap_ctx *c, const char *what, const char *arg)
{
	c->step++;
	log_dbg("snapshot step %d: %s %s", c->step, what, arg ? arg : "");
	if (c->p->fail_step && c->step == c->p->fail_step) {
		log_err("Injected failure at step %d (%s %s).", c->step, what, arg ? arg : "");
		return -EIO;
	}
	return 0;
}

/* Step 1: NAME locked, read-write with a running daemon; its keys. */
static int snap_prepare(struct snap_ctx *c)
{
	struct mapping_params kp = { 0 };
	char text[CONTROL_LINE_MAX];
	int r;

	r = mapping_lock_existing(c->name, &c->lock, &c->top);
	if (r)
		return r;
	/* (not c->top.suspended: the daemon's table swaps suspend it briefly) */
	if (mapping_is_marked_suspended(c->name)) {
		log_err("%s is suspended: `qcowsetup resume %s` first.", c->name, c->name);
		return -EBUSY;
	}
	c->args = malloc(sizeof(*c->args));
	if (!c->args)
		return -ENOMEM;
	r = c->top.read_only ? -ENOENT : qs_state_read(c->name, &c->old_pid, &c->old_nbd, c->args);
	if (r) {
		log_err("%s has no slow-path daemon (a read-only mapping?): only a read-write mapping has a snapshot.",
			c->name);
		return -EINVAL;
	}
	if (control_call(c->name, "ping", text, sizeof(text))) {
		log_err("The slow-path daemon of %s is not running: `qcowsetup reattach %s` first.", c->name, c->name);
		return -ENOTCONN;
	}
	if (c->args->backing_file[0] || c->args->data_file[0]) {
		log_err("%s was opened with --backing-file or --data-file: a snapshot of it is not supported.", c->name);
		return -ENOTSUP;
	}
	kp.image = c->args->image;
	kp.name = c->name;
	kp.read_only = true;
	kp.trust_names = c->args->trust_names;
	kp.ask = c->p->ask;
	kp.ask_opaque = c->p->ask_opaque;
	r = mapping_read_chain_keys(&kp, &c->keys);
	if (!r && c->keys.legacy_aes) {
		log_err("%s has a legacy AES layer: a snapshot of it is not supported (`qcowsetup convert` it to LUKS).",
			c->name);
		r = -ENOTSUP;
	}
	return r;
}

/* The overlay names the old image as QEMU would follow it: by its file
 * name when both are in the same folder (as named, or as they really are:
 * the trust rules' "folder of the top image"), else (--trust-names only)
 * by its absolute name. */
static int backing_name(struct snap_ctx *c, char *buf, size_t size)
{
	char over[PATH_MAX], old[PATH_MAX], *slash;
	const char *image = c->p->image, *base;
	size_t dirlen;

	slash = strrchr(image, '/');
	if (slash)
		snprintf(over, sizeof(over), "%.*s", (int)(slash - image), image);
	else if (!getcwd(over, sizeof(over)))
		return -errno;
	base = strrchr(c->args->image, '/') + 1;	/* (absolute) */
	dirlen = (size_t)(base - 1 - c->args->image);
	snprintf(old, sizeof(old), "%.*s", (int)dirlen, c->args->image);
	if (!over[0])
		snprintf(over, sizeof(over), "/");
	if (!old[0])
		snprintf(old, sizeof(old), "/");
	if (!strcmp(over, old)) {
		snprintf(buf, size, "%s", base);
		return 0;
	}
	{
		char *ro = realpath(over, NULL), *rd = realpath(old, NULL);
		bool same = ro && rd && !strcmp(ro, rd);

		free(ro);
		free(rd);
		if (same) {
			snprintf(buf, size, "%s", base);
			return 0;
		}
	}
	if (!c->args->trust_names) {
		log_err("%s is not in the folder of %s: the overlay's backing file would be refused (map it with --trust-names, or put the overlay beside the image).",
			image, c->args->image);
		return -EACCES;
	}
	snprintf(buf, size, "%s", c->args->image);
	return 0;
}

/* Step 2: the overlay, LUKS like the old image. */
static int create_overlay(struct snap_ctx *c)
{
	const struct mapping_snapshot_params *p = c->p;
	char name[PATH_MAX];
	struct qcow2_create_params wp = {
		.size = c->keys.size,
		.cluster_bits = c->keys.cluster_bits,
		.backing_file = name,
		.backing_format = "qcow2",
	};
	struct qcow2_create *w = NULL;
	uint8_t *region = NULL;
	uint64_t region_len = 0, cs = 1ULL << wp.cluster_bits;
	int fd = -1, r;

	r = backing_name(c, name, sizeof(name));
	if (!r)
		r = snap_step(c, "create the overlay", p->image);
	if (r)
		return r;
	if (c->keys.luks) {
		const struct passphrase *pp = p->new_passphrase ? p->new_passphrase : c->keys.pp;
		const struct luks_info *li = &c->keys.luks0;
		struct luks_format_params fp = { .cipher = li->cipher_name, .cipher_mode = li->cipher_mode,
						 .hash = li->hash, .pbkdf = p->pbkdf };

		if (!pp) {
			log_err("%s was unlocked by a binding: give the overlay's passphrase (--new-key-file).", c->name);
			return -EINVAL;
		}
		r = volume_key_generate(li->key_bytes, &c->new_vk);
		if (!r)
			r = luks_format_region(&fp, c->new_vk, pp, &region, &region_len);
		if (r)
			return r;
		wp.crypt_header = region;
		wp.crypt_header_len = region_len;
	}
	fd = open(p->image, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
	if (fd < 0) {
		r = -errno;
		log_err("Cannot create %s: %s.", p->image, strerror(-r));
		goto out;
	}
	c->created = true;
	r = qcow2_create_begin(fd, &wp, &w);
	if (!r)
		r = qcow2_create_add(w, (wp.size + cs - 1) / cs, QCOW2_CREATE_UNALLOC, NULL);
	if (!r)
		r = qcow2_create_finish(w);
	if (r)
		log_err("Cannot write %s: %s.", p->image, strerror(-r));
out:
	qcow2_create_free(w);
	if (fd >= 0)
		close(fd);
	free(region);
	return r;
}

/* Step 3: the devices under the top, but its segments and fast device (the
 * daemon's, taken over by the new one), renamed aside. */
struct collect_ctx {
	struct snap_ctx *c;
	char names[SNAP_MAX_RENAMED][128];
	unsigned int n;
};

static int collect_internal(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct collect_ctx *k = opaque;

	(void)major;
	(void)minor;
	if (!uuid || !dm_uuid_is_internal_of(uuid, k->c->top.uuid) || dm_is_daemon_device_name(name, k->c->name))
		return 0;
	if (k->n == SNAP_MAX_RENAMED || strlen(name) + strlen(MAPPING_OLD_SUFFIX) > DM_NAME_MAX)
		return -E2BIG;
	snprintf(k->names[k->n++], sizeof(k->names[0]), "%s", name);
	return 0;
}

static void old_name(const char *name, char *buf, size_t size)
{
	snprintf(buf, size, "%s%s", name, MAPPING_OLD_SUFFIX);
}

static int rename_aside(struct snap_ctx *c)
{
	struct collect_ctx *k = calloc(1, sizeof(*k));
	char to[160];
	int r;

	if (!k)
		return -ENOMEM;
	k->c = c;
	r = dm_list_devices(collect_internal, k);
	for (unsigned int i = 0; !r && i < k->n; i++) {
		old_name(k->names[i], to, sizeof(to));
		r = snap_step(c, "rename aside", k->names[i]);
		if (!r)
			r = dm_rename_device(k->names[i], to, true);
		if (!r)
			snprintf(c->renamed[c->nrenamed++], sizeof(c->renamed[0]), "%s", k->names[i]);
	}
	free(k);
	return r;
}

static void rename_back(struct snap_ctx *c)
{
	char from[160];

	while (c->nrenamed) {
		const char *name = c->renamed[--c->nrenamed];

		old_name(name, from, sizeof(from));
		if (dm_rename_device(from, name, true))
			log_err("Cannot rename %s back to %s: the old daemon will not find it.", from, name);
	}
}

/* Steps 4 and 5: the I/O held, the old daemon gone. */
static int hold_and_detach(struct snap_ctx *c)
{
	struct stat st;
	int r;

	r = snap_step(c, "tell the daemon", "suspend");
	if (!r)
		r = control_call(c->name, "suspend", NULL, 0);
	c->daemon_held = r == 0;
	if (!r)
		r = snap_step(c, "suspend", c->name);
	if (!r)
		r = dm_suspend(c->name, 0);	/* a flush and a filesystem freeze */
	if (!r) {
		c->top_suspended = true;
		clock_gettime(CLOCK_MONOTONIC, &c->held_at);
	}
	if (!r)
		r = snap_step(c, "tell the daemon", "detach");
	if (!r && stat(c->args->image, &st) < 0) {
		r = -errno;
		log_err("Cannot stat %s: %s.", c->args->image, strerror(-r));
	}
	if (r)
		return r;
	c->old_size = (uint64_t)st.st_size;
	keep_loops(c);
	r = control_call(c->name, "detach", NULL, 0);
	if (r)
		return r;
	c->detached = true;
	c->daemon_held = false;
	r = mapping_wait_daemon_exit(c->old_pid);
	if (r)
		log_err("The old daemon of %s (pid %d) did not finish.", c->name, (int)c->old_pid);
	return r;
}

/* After the switch: the renamed devices (nothing holds them now; in
 * order, each once what held it is gone), the old NBD device. */
static void remove_old(void *opaque)
{
	struct snap_ctx *c = opaque;
	char from[160];
	bool progress = true;

	while (progress) {
		progress = false;
		for (unsigned int i = 0; i < c->nrenamed; i++) {
			struct dm_dev_info info;

			if (!c->renamed[i][0])
				continue;
			old_name(c->renamed[i], from, sizeof(from));
			if (dm_device_info(from, &info) || !info.exists) {
				c->renamed[i][0] = '\0';
				continue;
			}
			if (info.open_count > 0)
				continue;
			if (dm_remove_device(from, false, true) == 0) {
				c->renamed[i][0] = '\0';
				progress = true;
			}
		}
	}
	for (unsigned int i = 0; i < c->nrenamed; i++)
		if (c->renamed[i][0])
			log_err("The old device %s%s of %s is still in use: remove it by hand.", c->renamed[i],
				MAPPING_OLD_SUFFIX, c->name);
	c->nrenamed = 0;
	if (nbd_disconnect(c->old_nbd))
		log_verbose("nbd%d (the old slow path) did not disconnect.", c->old_nbd);
}

/* Step 6. */
static int switch_stack(struct snap_ctx *c)
{
	struct mapping_params np = {
		.image = c->p->image,
		.name = c->name,
		.trust_names = c->args->trust_names,
		.allow_discards = c->args->allow_discards,
		.max_targets = c->args->max_targets,
		.nbd_timeout = c->args->nbd_timeout,
		.nbd_connections = c->args->nbd_connections,
		.debug = c->p->debug,
		.fail_step = c->p->fail_step,
	};
	struct mapping_swap s = { .id = c->args->id, .step = c->step, .switched = remove_old, .opaque = c };
	int r;

	s.vk[0] = c->new_vk;
	c->new_vk = NULL;
	for (unsigned int d = 0; d + 1 < IMG_MAX_CHAIN_DEPTH; d++) {
		s.vk[d + 1] = c->keys.vk[d];
		c->keys.vk[d] = NULL;
	}
	r = mapping_open_swap(&np, &s);
	c->step = s.step;
	for (unsigned int d = 0; d < IMG_MAX_CHAIN_DEPTH; d++)
		volume_key_free(s.vk[d]);
	return r;
}

/* Undo without fault injection: whatever fails here is logged. */
static void snap_undo(struct snap_ctx *c)
{
	rename_back(c);
	if (c->detached) {
		struct stat st;
		int fd = open(c->args->image, O_WRONLY | O_CLOEXEC);

		/* the old daemon gave the file back its size: the new one
		 * writes new clusters up to the size it finds */
		if (fd < 0 || fstat(fd, &st) < 0 ||
		    ((uint64_t)st.st_size < c->old_size && ftruncate(fd, (off_t)c->old_size) < 0))
			log_err("%s: cannot extend the file again (%s): writes may stop short.", c->args->image,
				strerror(errno));
		if (fd >= 0)
			close(fd);
		if (mapping_restart_daemon(c->args, c->old_nbd)) {
			log_err("%s: the old daemon could not be restarted: `qcowsetup reattach %s`.", c->name, c->name);
			dm_resume(c->name, false);	/* not held forever */
		}
		c->top_suspended = false;
	}
	if (c->top_suspended && dm_resume(c->name, false) == 0)
		c->top_suspended = false;
	if (c->daemon_held && control_call(c->name, "resume", NULL, 0) == 0)
		c->daemon_held = false;
	if (c->created && unlink(c->p->image) < 0)
		log_err("Cannot remove %s: %s.", c->p->image, strerror(errno));
}

int mapping_snapshot(const struct mapping_snapshot_params *p)
{
	struct snap_ctx *c = calloc(1, sizeof(*c));
	int r;

	if (!c) {
		passphrase_free(p->new_passphrase);
		return -ENOMEM;
	}
	c->p = p;
	c->name = p->name;
	for (unsigned int i = 0; i < DAEMON_MAX_HOLDS; i++)
		c->hold_fd[i] = -1;
	r = snap_prepare(c);
	if (!r && access(p->image, F_OK) == 0) {
		log_err("%s exists.", p->image);
		r = -EEXIST;
	}
	if (!r)
		r = create_overlay(c);
	if (!r)
		r = rename_aside(c);
	if (!r)
		r = hold_and_detach(c);
	if (!r)
		r = switch_stack(c);
	if (r && c->lock >= 0)
		snap_undo(c);
	if (!r)
		log_verbose("%s runs on %s now (I/O held %.0f ms); %s is its read-only backing file.", c->name,
			    p->image, ms_since(&c->held_at), c->args->image);
	release_loops(c);	/* (after the switch: the old loop devices go) */
	mapping_chain_keys_free(&c->keys);
	volume_key_free(c->new_vk);
	passphrase_free(p->new_passphrase);
	if (c->lock >= 0)
		qs_name_unlock(c->name, c->lock);
	free(c->args);
	free(c);
	mapping_release();
	return r;
}
