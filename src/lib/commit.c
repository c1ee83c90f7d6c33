/* Commit (mapping.h): QEMU's block-commit of the active overlay of a
 * read-write mapping NAME into its backing image, and NAME moved onto that
 * image, while mapped.
 *
 * The mapping as `open OVERLAY NAME` made it: the overlay read-write with
 * its daemon, the backing image read-only below it (its loop device and
 * QEMU's read-only locks, its crypt device NAME_L1_crypt when LUKS). The
 * steps, each with a fault-injection point:
 *   1. the backing image opened read-write (a new descriptor of the very
 *      file the mapping holds) and its locks upgraded to QEMU's read-write
 *      set (lock_image_upgrade: refused when someone else has it open);
 *      qcow2: the file extended for new clusters (as open does); a new
 *      read-write loop device over it; LUKS: its key asked for and a
 *      read-write crypt device NAME_crypt over that loop device;
 *   2. the daemon told to write its metadata back and stop its table swaps,
 *      NAME marked suspended (QS_RUN_DIR/NAME.suspended: `qcowsetup resume`
 *      recovers a commit that died here), the top device suspended with a
 *      flush (the guest's I/O is held, not failed), the daemon told again
 *      (what was written meanwhile);
 *   3. every cluster the overlay has (data, zero, compressed) read as the
 *      guest sees it (through NAME_crypt of a LUKS overlay, or the file)
 *      and written into the backing image: a raw file at the guest offset,
 *      a qcow2 image through the metadata writer (qcow2_rw.c) whose data
 *      goes through the new crypt device (encrypted with the backing
 *      image's key) or into the file;
 *   4. the switch: a qcow2 backing image gets its own daemon, which takes
 *      the existing top device over (--take-over: its table loaded and
 *      resumed, the segments with it); a raw one gets its table loaded and
 *      resumed here. From here on nothing is undone;
 *   5. the overlay's daemon stopped (it closes the overlay cleanly and
 *      gives the file back its size), the devices of the old stack removed
 *      (their loop devices and with them the overlay's locks go), the mark
 *      removed.
 * Until the switch a failure undoes everything: the top resumed on the
 * overlay, the new devices removed, the file's size given back (not below
 * the clusters the writer allocated) and the new descriptor closed (its
 * locks go). A copy cut halfway leaves the backing image consistent (the
 * writer's safe order, then its close): the overlay still shadows every
 * cluster that was copied.
 *
 * Both images LUKS (a snapshot of a LUKS mapping, committed back): the two
 * crypt devices would both be NAME_crypt. The overlay's is renamed aside
 * (NAME_crypt.old; the copy reads through it, the tables refer to it by
 * number) before the backing image's is created without a UUID; that one
 * gets the UUID once the old stack is gone, and a failure renames it back.
 *
 * Not handled (-ENOTSUP): a backing image with a backing file of its own,
 * external data files, legacy AES, an overlay of another size. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "chain.h"
#include "control.h"
#include "daemon_state.h"
#include "dm.h"
#include "dmtable.h"
#include "fileio.h"
#include "keyring.h"
#include "lock.h"
#include "log.h"
#include "loop.h"
#include "mapping.h"
#include "mapping_swap.h"
#include "qcow2_rw.h"
#include "stack.h"
#include "sysutil.h"
#include "util.h"

#define COPY_CHUNK	(1U << 20)	/* guest bytes read and written at once */

struct commit_ctx {
	const char *name;
	const struct mapping_commit_params *p;
	int step;
	int lock;			/* qs_name_lock */
	struct dm_dev_info top;
	struct daemon_args *a;		/* the overlay daemon's (its state file) */
	pid_t old_pid;
	int old_nbd;
	struct image *img;		/* the chain, parsed by name, checked against the held files */
	struct image *base;		/* img->backing */
	struct dev_ino {
		dev_t dev;
		ino_t ino;
	} over_id;
	bool over_luks, base_luks, base_qcow2;

	/* the backing image read-write */
	int base_fd;
	char base_path[PATH_MAX];
	struct img_io bio;
	struct image *bimg;		/* parsed again from base_fd, alone */
	struct stack_layer tl[IMG_MAX_CHAIN_DEPTH];
	unsigned int ntl;
	struct volume_key *vk;
	int32_t key_serial;
	uint64_t old_size, reserve, used_end;
	bool extended;
	struct loop_dev loop;
	bool attached;
	struct dm_stack *stack;		/* the backing image's stack */
	bool crypt_created;
	bool crypt_renamed;		/* the overlay's NAME_crypt is NAME_crypt.old */

	/* the guest's I/O held */
	bool daemon_held, marked, top_suspended;
	bool switched;
};

static int commit_step(struct commit_ctx *c, const char *what)
{
	return fault_step(&c->step, c->p->fail_step, "commit", what);
}

/* ---- what the mapping is ---- */

/* The files the mapping's loop devices hold (the daemon's --hold list)
 * include the overlay and its backing image. */
static int check_held(struct commit_ctx *c)
{
	const struct image *want[2] = { c->img, c->base };

	for (int k = 0; k < 2; k++) {
		struct stat st;
		bool found = false;

		if (fstat(file_io_fd(&want[k]->io), &st) < 0)
			return -errno;
		if (k == 0)
			c->over_id = (struct dev_ino){ st.st_dev, st.st_ino };
		for (unsigned int i = 0; !found && i < c->a->nholds; i++) {
			unsigned int maj, min;
			char path[32];
			dev_t dev;
			ino_t ino;
			int fd;

			if (sscanf(c->a->holds[i], "%u:%u", &maj, &min) != 2 || maj != LOOP_DEV_MAJOR)
				continue;
			snprintf(path, sizeof(path), "/dev/loop%u", min);
			fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			found = loop_backing_file(fd, &dev, &ino) == 0 && dev == st.st_dev && ino == st.st_ino;
			close(fd);
		}
		if (!found) {
			log_err("%s is not the file the mapping %s holds (replaced since it was opened?): refused.",
				want[k]->path, c->name);
			return -ESTALE;
		}
	}
	return 0;
}

/* What commit handles; messages say why not. */
static int check_chain(struct commit_ctx *c)
{
	const struct image *o = c->img, *b = c->base;

	if (!b) {
		log_err("%s: %s has no backing image to commit into.", c->name, o->path);
		return -EINVAL;
	}
	if (b->backing || o->has_data_file || b->has_data_file) {
		log_err("%s: commit handles an overlay over one backing image without a backing file of its own, and no external data files.",
			c->name);
		return -ENOTSUP;
	}
	if (b->format == IMG_FMT_QCOW || b->crypt_method == IMG_CRYPT_AES) {
		log_err("%s: %s cannot be written (qcow version 1 or legacy AES): `qcowsetup convert` it first.", c->name,
			b->path);
		return -ENOTSUP;
	}
	if (b->format == IMG_FMT_QCOW2 && (b->incompatible_features & (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY))) {
		log_err("%s: %s is marked corrupt or dirty: `qemu-img check -r all` it first.", c->name, b->path);
		return -EUCLEAN;
	}
	if (o->size != b->size) {
		log_err("%s: the overlay is %" PRIu64 " bytes, %s %" PRIu64 ": resize the backing image first.", c->name,
			o->size, b->path, b->size);
		return -ENOTSUP;
	}
	c->over_luks = o->crypt_method == IMG_CRYPT_LUKS;
	c->base_luks = b->crypt_method == IMG_CRYPT_LUKS;
	c->base_qcow2 = b->format == IMG_FMT_QCOW2;
	return 0;
}

/* NAME locked and found, its daemon's state read, the chain parsed. */
static int prepare(struct commit_ctx *c)
{
	struct trust_rules rules;
	struct image_open_opts o = { 0 };
	struct file_opener fo;
	char text[CONTROL_LINE_MAX];
	int r;

	r = dm_check_control();
	if (r)
		return r;
	c->lock = mapping_lock_name(c->name);
	if (c->lock < 0)
		return c->lock;
	r = mapping_find_top(c->name, &c->top);
	if (r)
		return r;
	/* (the top device itself is suspended for a moment in each of the
	 * daemon's table swaps: only `qcowsetup suspend` counts) */
	if (mapping_is_marked_suspended(c->name)) {
		log_err("Device %s is suspended: `qcowsetup resume %s` first.", c->name, c->name);
		return -EBUSY;
	}
	if (c->top.read_only) {
		log_err("%s is mapped read-only: only a read-write mapping is committed.", c->name);
		return -EINVAL;
	}
	c->a = malloc(sizeof(*c->a));
	if (!c->a)
		return -ENOMEM;
	r = qs_state_read(c->name, &c->old_pid, &c->old_nbd, c->a);
	if (r || c->a->read_only) {
		log_err("%s has no slow-path daemon of a read-write qcow2 overlay: nothing to commit.", c->name);
		return -EINVAL;
	}
	if (control_call(c->name, "ping", text, sizeof(text))) {
		log_err("The slow-path daemon of %s is not running: `qcowsetup reattach %s` first.", c->name, c->name);
		return -ENOTCONN;
	}
	rules = (struct trust_rules){ .trust_names = c->a->trust_names };
	o.backing_file = c->a->backing_file[0] ? c->a->backing_file : NULL;
	o.data_file = c->a->data_file[0] ? c->a->data_file : NULL;
	file_opener_init(&fo, false, &rules);
	r = image_open(&fo.ops, c->a->image, &o, &c->img);
	if (r)
		return r;
	c->base = c->img->backing;
	r = check_chain(c);
	if (!r)
		r = check_held(c);
	return r;
}

/* The backing image's passphrase: what ask() gives, until one opens it. */
static int unlock_base(struct commit_ctx *c)
{
	const struct image *b = c->base;

	for (unsigned int attempt = 1;; attempt++) {
		struct passphrase *pp = NULL;
		int r = c->p->ask ? c->p->ask(c->p->ask_opaque, b->path, attempt, &pp) : -ENOKEY;

		if (r < 0)
			return attempt > 1 || r == -ENOKEY ? -EPERM : r;
		r = luks_unlock(&b->io, b->crypt_header_offset, b->crypt_header_length, pp, &c->vk, NULL);
		passphrase_free(pp);
		if (r != -EPERM)
			return r;
		log_err("No key available with this passphrase for %s.", b->path);
	}
}

/* ---- step 1: the backing image read-write ---- */

static int open_base(struct commit_ctx *c)
{
	struct image_open_opts o = { .no_backing = true, .no_data_file = true,
				     .format = image_format_name(c->base->format) };
	char self[64];
	struct stat st;
	int r;

	r = commit_step(c, "open the backing image read-write");
	if (r)
		return r;
	/* the very file the chain named (and the mapping holds) */
	snprintf(self, sizeof(self), "/proc/self/fd/%d", file_io_fd(&c->base->io));
	c->base_fd = open(self, O_RDWR | O_CLOEXEC);
	if (c->base_fd < 0) {
		r = -errno;
		log_err("Cannot open %s for writing: %s.", c->base->path, strerror(-r));
		return r == -EROFS ? -EACCES : r;
	}
	r = file_io_from_fd(c->base_fd, c->base->path, &c->bio);
	if (!r)
		r = file_io_real_path(&c->bio, c->base_path, sizeof(c->base_path));
	if (!r)
		r = lock_image_upgrade(c->base_fd, c->base->path);
	if (!r)
		r = image_open_io(&file_io_opener, &c->bio, &o, &c->bimg);
	if (!r)
		r = stack_layers_read(c->bimg, c->tl, &c->ntl);
	if (r || !c->base_qcow2)
		return r;
	if (fstat(c->base_fd, &st) < 0)
		return -errno;
	c->old_size = (uint64_t)st.st_size;
	r = qcow2_used_end(c->bimg, &c->used_end);
	if (!r)
		r = qcow2_file_reserve(c->bimg, c->used_end, &c->reserve);
	if (!r && S_ISREG(st.st_mode) && c->reserve > c->old_size) {
		r = commit_step(c, "reserve room for new clusters");
		if (!r && ftruncate(c->base_fd, (off_t)c->reserve) < 0) {
			r = -errno;
			log_err("%s: cannot reserve room for new clusters: %s.", c->base->path, strerror(-r));
		}
		c->extended = r == 0;
		if (c->extended) {
			c->bimg->io.size = c->bimg->data_io.size = c->reserve;
		}
	}
	return r;
}

static int attach_base(struct commit_ctx *c)
{
	int r = commit_step(c, "attach a read-write loop device");

	if (!r)
		r = loop_attach(c->base_fd, false, true, true, &c->loop);
	if (r) {
		log_err("Cannot attach a loop device to %s: %s.", c->base->path, strerror(-r));
		return r;
	}
	c->attached = true;
	if (!c->a->allow_discards && loop_disable_discard(&c->loop))
		log_std("%s: cannot turn discards off on %s.", c->base->path, c->loop.path);
	snprintf(c->tl[0].host, sizeof(c->tl[0].host), "%u:%u", c->loop.major, c->loop.minor);
	log_verbose("%s: %s (read-write)", c->base->path, c->loop.path);
	return 0;
}

/* The stack of the backing image alone, under the mapping's identifier
 * (the top device keeps its UUID). */
static int build_base_stack(struct commit_ctx *c, const char *slow_dev)
{
	struct dm_layer_params lp = {
		.host_dev = c->tl[0].host,
		.cipher = c->tl[0].cipher[0] ? c->tl[0].cipher : NULL,
		.key_size = stack_layer_key_size(&c->tl[0]),
	};
	struct dm_stack_params sp = {
		.name = c->name,
		.id = c->a->id,
		.layers = &lp,
		.nlayers = 1,
		.allow_discards = c->a->allow_discards,
		.max_targets = c->a->max_targets,
		.slow_dev = slow_dev,
	};
	struct run_list runs;
	int r;

	run_list_init(&runs);
	r = image_map_chain(c->bimg, &runs);
	if (!r)
		r = dm_stack_build(&sp, c->bimg, &runs, &c->stack);
	run_list_free(&runs);
	return r;
}

/* NAME_crypt, or (old) the overlay's renamed aside */
static void crypt_name(const struct commit_ctx *c, bool old, char *buf, size_t size)
{
	snprintf(buf, size, "%s_crypt%s", c->name, old ? MAPPING_OLD_SUFFIX : "");
}

/* A LUKS overlay over a LUKS backing image: the overlay's NAME_crypt
 * renamed aside (back: the reverse). */
static int rename_over_crypt(struct commit_ctx *c, bool back)
{
	char cur[160], old[160];
	int r;

	crypt_name(c, false, cur, sizeof(cur));
	crypt_name(c, true, old, sizeof(old));
	if (back)
		return dm_rename_device(old, cur, true);
	r = commit_step(c, "rename the overlay's crypt device aside");
	if (!r)
		r = dm_rename_device(cur, old, true);
	c->crypt_renamed = r == 0;
	return r;
}

/* LUKS: NAME_crypt, read-write over the new loop device (its key through
 * the keyring, gone from here once dm-crypt has it). */
static int create_crypt(struct commit_ctx *c)
{
	char desc[DM_KEY_DESC_MAX];
	int r;

	for (size_t i = 0; i < c->stack->count; i++) {
		if (c->stack->devices[i].role != DM_ROLE_CRYPT)
			continue;
		if (c->over_luks) {
			r = rename_over_crypt(c, false);
			if (r)
				return r;
		}
		r = commit_step(c, "add the key to the kernel keyring");
		if (!r)
			r = dm_key_description(c->name, 0, desc, sizeof(desc));
		if (!r)
			r = keyring_add_logon(desc, c->vk->key, c->vk->size, &c->key_serial);
		if (!r)
			r = commit_step(c, c->stack->devices[i].name);
		if (!r)
			r = dm_create_stack_device(c->stack, i, !c->crypt_renamed, &c->crypt_created);
		keyring_remove(c->key_serial);
		c->key_serial = 0;
		if (r)
			return r;
	}
	volume_key_free(c->vk);
	c->vk = NULL;
	return 0;
}

/* ---- step 2: the guest's I/O held ---- */

static int daemon_say(struct commit_ctx *c, const char *request)
{
	int r = commit_step(c, request);

	return r ? r : control_call(c->name, request, NULL, 0);
}

static int mark(struct commit_ctx *c)
{
	char path[PATH_MAX];
	int fd, r = commit_step(c, "mark");

	if (r)
		return r;
	qs_state_path(path, sizeof(path), c->name, QS_STATE_SUSPENDED);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		log_err("Cannot create %s: %s.", path, strerror(-r));
		return r;
	}
	close(fd);
	c->marked = true;
	return 0;
}

static int hold_io(struct commit_ctx *c)
{
	int r = daemon_say(c, "suspend");

	c->daemon_held = r == 0;
	if (!r)
		r = mark(c);
	if (!r)
		r = commit_step(c, "suspend the top device");
	if (!r) {
		/* a flush and a filesystem freeze: what the guest wrote gets down */
		r = dm_suspend(c->name, 0);
		c->top_suspended = r == 0;
		if (r)
			log_err("Cannot suspend %s: %s.", c->name, strerror(-r));
	}
	if (!r)
		r = daemon_say(c, "suspend");	/* what was written meanwhile */
	return r;
}

/* ---- step 3: the copy ---- */

struct copy {
	struct commit_ctx *c;
	struct img_io io;		/* the overlay file, opened again */
	struct image *ov;		/* the overlay alone, parsed after the daemon wrote back */
	struct run_list runs;
	int ov_fd;			/* its plaintext: NAME_crypt or the file (direct I/O) */
	struct chain_reader *cr;
	struct file_rw f;
	struct qcow2_rw *w;
	uint8_t *buf;
	uint64_t total, done;
};

static int plain_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	return fd_pread_padded((int)(intptr_t)opaque, buf, len, off);
}

/* A run of the overlay that goes into the backing image. */
static bool copied(const struct run *ru)
{
	return ru->kind != RUN_UNALLOC;
}

/* The overlay's metadata as the daemon wrote it back, its plaintext, and
 * the backing image's writer. */
static int copy_open(struct copy *k)
{
	struct commit_ctx *c = k->c;
	struct image_open_opts o = { .no_backing = true, .no_data_file = true, .format = "qcow2" };
	struct chain_layer_io lio = { .data_pread = plain_pread };
	struct qcow2_rw_opts wo = { 0 };
	struct qcow2_rw_ops ops;
	char path[PATH_MAX];
	int r;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", file_io_fd(&c->img->io));
	r = file_io_open(path, O_RDONLY, &k->io);
	if (!r)
		r = image_open_io(&file_io_opener, &k->io, &o, &k->ov);
	if (!r)
		r = image_map_chain(k->ov, &k->runs);
	if (r)
		return r;
	if (c->over_luks) {
		strcpy(path, "/dev/mapper/");
		crypt_name(c, c->crypt_renamed, path + strlen(path), sizeof(path) - strlen(path));
	}
	k->ov_fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (k->ov_fd < 0) {
		r = -errno;
		log_err("Cannot open %s: %s.", path, strerror(-r));
		return r;
	}
	lio.opaque = (void *)(intptr_t)k->ov_fd;
	r = chain_reader_open(k->ov, &lio, 1, &k->cr);
	if (r)
		return r;
	for (size_t i = 0; i < k->runs.count; i++)
		if (copied(&k->runs.runs[i]))
			k->total += k->runs.runs[i].len;
	k->buf = aligned_alloc(4096, COPY_CHUNK);
	if (!k->buf)
		return -ENOMEM;
	if (!c->base_qcow2)
		return 0;
	k->f.meta_fd = c->base_fd;
	if (c->base_luks) {
		snprintf(path, sizeof(path), "/dev/mapper/%s_crypt", c->name);
		k->f.data_fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
		k->f.data_separate = true;
		wo.file_limit = c->bimg->io.size & ~511ULL;	/* what the crypt device covers */
	} else {
		k->f.data_fd = dup(c->base_fd);
		wo.file_limit = c->bimg->io.size;
	}
	if (k->f.data_fd < 0) {
		r = -errno;
		log_err("Cannot open the data of %s for writing: %s.", c->base->path, strerror(-r));
		return r;
	}
	file_rw_ops(&k->f, &ops);
	return qcow2_rw_open(c->bimg, &ops, &wo, &k->w);
}

static int copy_chunk(struct copy *k, uint64_t guest, size_t n)
{
	struct commit_ctx *c = k->c;
	int r = chain_read(k->cr, k->buf, n, guest);

	if (r) {
		log_err("%s: cannot read the overlay at %" PRIu64 ": %s.", c->name, guest, strerror(-r));
		return r;
	}
	if (k->w)
		r = qcow2_rw_write(k->w, k->buf, n, guest);
	else
		r = fd_pwrite_all(c->base_fd, k->buf, n, guest);
	if (r)
		log_err("%s: cannot write at %" PRIu64 ": %s.", c->base->path, guest, strerror(-r));
	return r;
}

static int copy_runs(struct copy *k)
{
	struct commit_ctx *c = k->c;
	const struct mapping_commit_params *p = c->p;
	bool half = false;
	int r = 0;

	if (p->progress_start)
		p->progress_start(p->progress_opaque, "Committing", k->total);
	for (size_t i = 0; !r && i < k->runs.count; i++) {
		const struct run *ru = &k->runs.runs[i];

		if (!copied(ru))
			continue;
		for (uint64_t off = 0; !r && off < ru->len;) {
			size_t n = (size_t)MIN((uint64_t)COPY_CHUNK, ru->len - off);

			r = copy_chunk(k, ru->guest + off, n);
			off += n;
			k->done += n;
			if (!r && !half && k->done * 2 >= k->total) {
				half = true;
				r = commit_step(c, "copy (half of it)");
			}
			if (p->progress_update)
				p->progress_update(p->progress_opaque, k->done);
		}
	}
	if (p->progress_end)
		p->progress_end(p->progress_opaque, r == 0);
	return r;
}

/* Copy, then close the writer (the image consistent either way). */
static int copy_overlay(struct commit_ctx *c)
{
	struct copy k = { .c = c, .ov_fd = -1, .f = { .meta_fd = -1, .data_fd = -1, .data_dfd = -1 } };
	int r, r2;

	run_list_init(&k.runs);
	r = commit_step(c, "open the overlay's data");
	if (!r)
		r = copy_open(&k);
	if (!r)
		r = copy_runs(&k);
	if (k.w) {
		r2 = qcow2_rw_close(k.w, &c->used_end);
		if (r2 && !r)
			r = r2;
	} else if (!r && fdatasync(c->base_fd) < 0) {
		r = -errno;
		log_err("%s: %s.", c->base->path, strerror(-r));
	}
	if (!r)
		log_verbose("%s: %" PRIu64 " bytes of the overlay committed into %s.", c->name, k.total, c->base->path);
	if (k.f.data_fd >= 0)
		close(k.f.data_fd);
	chain_reader_free(k.cr);
	if (k.ov_fd >= 0)
		close(k.ov_fd);
	free(k.buf);
	run_list_free(&k.runs);
	image_free(k.ov, &file_io_opener);
	file_io_free(&k.io);
	return r;
}

/* ---- step 4: the switch ---- */

/* A qcow2 backing image: its own daemon takes the top device over. */
static int start_base_daemon(struct commit_ctx *c)
{
	struct daemon_args *a = malloc(sizeof(*a));
	pid_t pid = 0;
	int nbd = -1, fd, r;

	if (!a)
		return -ENOMEM;
	r = commit_step(c, "start the daemon of the backing image");
	if (r)
		goto out;
	daemon_args_init(a);
	memcpy(a->name, c->a->name, sizeof(a->name));
	memcpy(a->id, c->a->id, sizeof(a->id));
	snprintf(a->image, sizeof(a->image), "%s", c->base_path);
	a->trust_names = c->a->trust_names;
	snprintf(a->layers[0].host, sizeof(a->layers[0].host), "%u:%u", c->loop.major, c->loop.minor);
	snprintf(a->layers[0].cipher, sizeof(a->layers[0].cipher), "%s", c->tl[0].cipher);
	a->layers[0].key_size = stack_layer_key_size(&c->tl[0]);
	a->nlayers = 1;
	snprintf(a->holds[a->nholds++], sizeof(a->holds[0]), "%u:%u", c->loop.major, c->loop.minor);
	a->allow_discards = c->a->allow_discards;
	a->max_targets = c->a->max_targets;
	a->keep_size = c->old_size;
	a->nbd_timeout = c->a->nbd_timeout;
	a->nbd_connections = c->a->nbd_connections;
	a->flush_interval_ms = c->a->flush_interval_ms;
	a->debug = c->p->debug;
	a->take_over = true;
	fd = dup(c->base_fd);	/* (the daemon's opener takes it) */
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	a->given[a->ngiven++] = (struct file_given){ .depth = 0, .fd = fd };
	r = mapping_start_daemon(a, &pid, &nbd);
	close(fd);
	if (r)
		log_err("%s: the daemon of %s failed: %s.", c->name, c->base->path, strerror(-r));
	else
		log_verbose("%s: daemon pid %d serves %s on nbd%d.", c->name, (int)pid, c->base->path, nbd);
out:
	free(a);
	return r;
}

/* A raw backing image: the top's table onto its loop device, resumed. */
static int load_base_table(struct commit_ctx *c)
{
	const struct dm_device *top = dm_stack_top(c->stack);
	struct dm_stack_table_iter it;
	struct dm_table t;
	int r = commit_step(c, "load the table of the backing image");

	if (r)
		return r;
	dm_stack_table(c->stack, top, &it, &t);
	r = dm_load_table(c->name, false, &t);
	if (r) {
		log_err("Cannot load a new table into %s: %s.", c->name, strerror(-r));
		return r;
	}
	r = dm_resume(c->name, false);
	if (r) {
		log_err("Cannot resume %s: %s.", c->name, strerror(-r));
		dm_clear_table(c->name);
	}
	return r;
}

/* ---- step 5: the overlay let go ---- */

struct old_devices {
	struct commit_ctx *c;
	char names[2 * IMG_MAX_CHAIN_DEPTH + 64][128];
	size_t n;
};

/* The internal devices of the old stack: all but the new crypt device and
 * (with a daemon, which removes what it no longer uses) the segments and
 * the fast device. */
static int collect_old(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct old_devices *o = opaque;
	struct commit_ctx *c = o->c;

	(void)major;
	(void)minor;
	if (!uuid || !dm_uuid_is_internal_of(uuid, c->top.uuid) || o->n == ARRAY_SIZE(o->names))
		return 0;
	if (c->crypt_created && !strncmp(name, c->name, strlen(c->name)) && !strcmp(name + strlen(c->name), "_crypt"))
		return 0;
	if (c->base_qcow2 && dm_is_daemon_device_name(name, c->name))
		return 0;
	snprintf(o->names[o->n++], sizeof(o->names[0]), "%s", name);
	return 0;
}

static void remove_old_stack(struct commit_ctx *c)
{
	struct old_devices *o = calloc(1, sizeof(*o));
	bool progress = true;

	if (!o)
		return;
	o->c = c;
	if (dm_list_devices(collect_old, o) == 0)
		while (progress) {
			progress = false;
			for (size_t i = 0; i < o->n; i++) {
				struct dm_dev_info info;

				if (!o->names[i][0] || dm_device_info(o->names[i], &info) || info.open_count)
					continue;
				if (info.exists && dm_remove_device(o->names[i], false, true))
					continue;
				o->names[i][0] = '\0';
				progress = true;
			}
		}
	for (size_t i = 0; i < o->n; i++)
		if (o->names[i][0])
			log_std("%s: the device %s of the overlay is still in use; remove it by hand.", c->name,
				o->names[i]);
	free(o);
	/* the backing image's crypt device made without its UUID */
	for (size_t i = 0; c->crypt_renamed && i < c->stack->count; i++)
		if (c->stack->devices[i].role == DM_ROLE_CRYPT &&
		    dm_set_uuid(c->stack->devices[i].name, c->stack->devices[i].uuid, true))
			log_std("%s: %s keeps no UUID (`qcowsetup close` will not find it).", c->name,
				c->stack->devices[i].name);
}

static void let_overlay_go(struct commit_ctx *c)
{
	int r = mapping_stop_daemon(c->name, c->old_nbd, c->old_pid);

	if (r)
		log_std("%s: the daemon of the overlay did not finish: %s.", c->name, strerror(-r));
	remove_old_stack(c);
	mapping_unmark_suspended(c->name);
	c->marked = false;
}

/* ---- undo ---- */

static void undo(struct commit_ctx *c)
{
	if (c->top_suspended && dm_resume(c->name, false))
		log_err("Cannot resume %s: `qcowsetup resume %s`.", c->name, c->name);
	if (c->daemon_held && control_call(c->name, "resume", NULL, 0))
		log_err("%s: its daemon did not resume table swaps: `qcowsetup suspend %s` and `resume`.", c->name,
			c->name);
	if (c->marked)
		mapping_unmark_suspended(c->name);
	if (c->crypt_created && c->stack) {
		for (size_t i = 0; i < c->stack->count; i++)
			if (c->stack->devices[i].role == DM_ROLE_CRYPT &&
			    dm_remove_device(c->stack->devices[i].name, false, true))
				log_err("Cannot remove %s while undoing the commit.", c->stack->devices[i].name);
	}
	if (c->crypt_renamed && rename_over_crypt(c, true))
		log_err("Cannot rename %s_crypt%s back: the mapping's daemon will not find it.", c->name,
			MAPPING_OLD_SUFFIX);
	if (c->key_serial)
		keyring_remove(c->key_serial);
	if (c->attached)
		close(c->loop.fd);	/* (autoclear: detached) */
	if (c->extended) {
		uint64_t size = MAX(c->old_size, c->used_end);

		if (ftruncate(c->base_fd, (off_t)size) < 0)
			log_std("%s: cannot give the file back its size (%" PRIu64 " bytes): %s.", c->base->path, size,
				strerror(errno));
	}
}

static void commit_ctx_free(struct commit_ctx *c)
{
	if (c->switched && c->attached)
		close(c->loop.fd);	/* the new tables hold it now */
	volume_key_free(c->vk);
	dm_stack_free(c->stack);
	image_free(c->bimg, &file_io_opener);
	if (c->bio.opaque)
		file_io_free(&c->bio);
	if (c->base_fd >= 0)
		close(c->base_fd);	/* the loop device keeps its description and locks */
	image_free(c->img, &file_io_opener);
	free(c->a);
	if (c->lock >= 0)
		qs_name_unlock(c->name, c->lock);
}

static int do_commit(struct commit_ctx *c)
{
	int r;

	r = prepare(c);
	if (!r && c->base_luks)
		r = unlock_base(c);
	if (r)
		return r;
	r = open_base(c);
	if (!r)
		r = attach_base(c);
	if (!r)
		r = build_base_stack(c, c->base_qcow2 ? "{nbd}" : NULL);
	if (!r && c->base_luks)
		r = create_crypt(c);
	if (!r)
		r = hold_io(c);
	if (!r)
		r = copy_overlay(c);
	if (!r)
		r = c->base_qcow2 ? start_base_daemon(c) : load_base_table(c);
	if (r) {
		undo(c);
		return r;
	}
	c->switched = true;
	c->top_suspended = false;
	let_overlay_go(c);
	return 0;
}

int mapping_commit(const char *name, const struct mapping_commit_params *p)
{
	struct commit_ctx *c = calloc(1, sizeof(*c));
	int r;

	if (!c)
		return -ENOMEM;
	c->name = name;
	c->p = p;
	c->lock = -1;
	c->base_fd = -1;
	r = do_commit(c);
	if (!r)
		log_verbose("%s: committed; the mapping runs on %s.", name, c->base->path);
	commit_ctx_free(c);
	dm_release();
	return r;
}
