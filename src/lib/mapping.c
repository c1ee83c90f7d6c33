/* The mapping lifecycle (see mapping.h): open, close, status, list and
 * reattach; the daemon is started here and only here.
 *
 * Read-write (the default) for qcow2: the top image's data file is opened
 * for writing and locked as QEMU locks it for writing, extended (sparse) to
 * the most the image can ever need so that the loop device and the LUKS
 * crypt device never have to grow (`close` gives the file its size back),
 * and the slow-path daemon (src/daemon) is started once the loop and crypt
 * devices exist: it connects the NBD device, creates the top device (fast
 * path to the file for clusters with refcount 1, NBD for the rest) and
 * reports "READY nbdN" on a pipe. Read-only mappings of images with
 * compressed clusters use the daemon for those clusters. Raw images map
 * read-write without it. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clevis.h"
#include "control.h"
#include "daemon_state.h"
#include "dm.h"
#include "fileio.h"
#include "keyring.h"
#include "lock.h"
#include "log.h"
#include "loop.h"
#include "nbd.h"
#include "qcow2_rw.h"
#include "mapping.h"
#include "mapping_swap.h"
#include "stack.h"
#include "sysutil.h"
#include "trust.h"
#include "util.h"

#ifndef QCOWSETUP_DAEMON_PATH
#define QCOWSETUP_DAEMON_PATH "/usr/libexec/qcowsetup/qcowsetup-daemon"
#endif
#define DAEMON_READY_TIMEOUT_MS (300 * 1000)
#define DAEMON_EXIT_TIMEOUT_MS (300 * 1000)

/* One file of the chain held by the mapping: a loop device over it, which
 * also keeps the file's QEMU-compatible locks for the life of the mapping. */
struct held_file {
	struct loop_dev loop;
	int fd;			/* the image's descriptor (borrowed): the one parsed */
	const char *path;	/* its name, for messages */
	bool attached;
	bool extended;		/* hold_file grew the file from old_size */
	uint64_t old_size;
};

struct open_ctx {
	const struct mapping_params *p;
	const char *image_path;
	const char *name;
	struct image *img;
	struct run_list runs;
	struct stack_layer *tl;
	unsigned int nlayers;
	struct held_file data[IMG_MAX_CHAIN_DEPTH];	/* each layer's data file */
	struct held_file meta[IMG_MAX_CHAIN_DEPTH];	/* metadata file, when the data is external */
	struct volume_key *vk[IMG_MAX_CHAIN_DEPTH];
	int32_t key_serial[IMG_MAX_CHAIN_DEPTH];
	struct dm_stack *stack;
	size_t created;		/* devices of the stack created so far */
	int step;
	int name_lock;		/* qs_name_lock() of name, or -1 */
	bool rw;		/* read-write mapping */
	bool use_daemon;	/* the slow path: read-write qcow2, or compressed clusters */
	uint64_t keep_size;	/* size of the top's data file before open extended it */
	uint64_t used_end;	/* the top's qcow2_used_end (read-write qcow2), for the daemon */
	char id[DM_IMAGE_ID_MAX];	/* image identifier of the UUIDs */
	pid_t daemon_pid;	/* 0: none started */
	bool daemon_ready;	/* it created the top device */
	struct mapping_swap *swap;	/* snapshot: the stack goes under an existing top */
	struct passphrase **keep_pp;	/* unlock() gives the passphrase of layer 0 here */
};

/* Fault injection for the atomicity tests: --debug-fail-step K makes the
 * K-th step of open fail as if the kernel had refused it. */
static int fail_step_at(struct open_ctx *c, const char *what)
{
	c->step++;
	log_dbg("open step %d: %s", c->step, what);
	if (c->p->fail_step && c->step == c->p->fail_step) {
		log_err("Injected failure at step %d (%s).", c->step, what);
		return -EIO;
	}
	return 0;
}

/* Lock and attach one file of the chain, through the descriptor it was
 * parsed from (io): read-only, or (write) with QEMU's write locks. loop_rw:
 * the loop device is writable too (io was opened read-write). extend_to:
 * grow the file (sparse) to this size first (0: leave it). */
static int hold_file(struct open_ctx *c, const struct img_io *io, struct held_file *h, bool write, bool loop_rw,
		     uint64_t extend_to, uint64_t *old_size)
{
	const char *path = io->name;
	struct stat st;
	int r;

	r = fail_step_at(c, "lock and attach a loop device");
	if (r)
		return r;
	h->fd = file_io_fd(io);
	h->path = path;
	if (h->fd < 0)
		return -EBADF;
	if (c->swap && (h == &c->data[1] || h == &c->meta[1]))
		r = lock_image_unchecked(h->fd, write, path);	/* (the old loop device still holds it) */
	else
		r = lock_image(h->fd, write, path);
	if (r == 0 && extend_to && fstat(h->fd, &st) == 0 && S_ISREG(st.st_mode)) {
		if (old_size)
			*old_size = (uint64_t)st.st_size;
		if ((uint64_t)st.st_size < extend_to && ftruncate(h->fd, (off_t)extend_to) < 0)
			log_std("%s: cannot reserve room for new clusters (%s): writes will stop at %" PRIu64 " bytes of file.",
				path, strerror(errno), (uint64_t)st.st_size);
		else if ((uint64_t)st.st_size < extend_to) {
			h->extended = true;
			h->old_size = (uint64_t)st.st_size;
		}
	}
	if (r == 0) {
		r = loop_attach(h->fd, !loop_rw, true, true, &h->loop);
		if (r)
			log_err("Cannot attach a loop device to %s: %s.", path, strerror(-r));
		else if (loop_rw && !c->p->allow_discards && loop_disable_discard(&h->loop))
			log_std("%s: cannot turn discards off on %s.", path, h->loop.path);
	}
	if (r == 0) {
		h->attached = true;
		log_verbose("%s: %s (%s%s I/O)", path, h->loop.path, h->loop.direct_io ? "direct" : "buffered",
			    loop_rw ? ", read-write" : "");
	}
	return r;
}

/* A failed open gives a file it grew its size back (through the parsed
 * descriptor, while the loop device still holds the file, and with it the
 * write lock). */
static void restore_size(struct held_file *h)
{
	if (!h->extended)
		return;
	if (ftruncate(h->fd, (off_t)h->old_size) < 0)
		log_std("%s: cannot give the file back its size (%" PRIu64 " bytes): %s.", h->path, h->old_size,
			strerror(errno));
	h->extended = false;
}

static void release_file(struct held_file *h)
{
	if (!h->attached)
		return;
	/* autoclear: the last close detaches, unless a dm table holds it */
	close(h->loop.fd);
	h->loop.fd = -1;
	h->attached = false;
}

/* Unlock layer d: its clevis bindings (use_bindings), the passphrase that
 * opened the layer above, then what the caller's ask() gives, until one
 * opens it or ask() stops. */
static int unlock_layer(struct open_ctx *c, unsigned int d, struct passphrase **shared)
{
	struct image *l = (struct image *)c->tl[d].img;
	bool wrong = false;
	int r;

	if (c->p->use_bindings && l->crypt_method == IMG_CRYPT_LUKS && l->bindings) {
		r = clevis_unlock(l, c->p->binding_timeout, &c->vk[d], NULL);
		if (r == 0 || r == -ENOMEM)
			return r;
		log_std(c->p->ask ? "%s: no binding unlocked it; asking for a passphrase." : "%s: no binding unlocked it.",
			l->path);
	}

	for (unsigned int attempt = 0;; attempt++) {
		struct passphrase *pp = NULL;

		if (attempt == 0) {
			if (!*shared)
				continue;
			pp = *shared;
		} else {
			r = c->p->ask ? c->p->ask(c->p->ask_opaque, l->path, attempt, &pp) : -ENOKEY;
			if (r < 0)
				return wrong || r == -ENOKEY ? -EPERM : r;
		}
		if (l->crypt_method == IMG_CRYPT_LUKS) {
			int slot = -1;

			r = luks_unlock(&l->io, l->crypt_header_offset, l->crypt_header_length, pp, &c->vk[d], &slot);
			if (r == 0)
				log_verbose("%s: key slot %d unlocked.", l->path, slot);
		} else {
			r = legacy_aes_key(pp, &c->vk[d]);
			if (r == 0 && !c->p->skip_key_check) {
				r = legacy_key_check(l, c->vk[d]);
				if (r == -EPERM) {
					volume_key_free(c->vk[d]);
					c->vk[d] = NULL;
				}
			}
		}
		if (r == 0) {
			if (pp != *shared) {
				passphrase_free(*shared);
				*shared = pp;
			}
			return 0;
		}
		if (pp != *shared)
			passphrase_free(pp);
		if (r != -EPERM)
			return r;
		if (attempt > 0) {
			wrong = true;
			log_err("No key available with this passphrase for %s%s.", l->path,
				l->crypt_method == IMG_CRYPT_AES ?
				" (legacy AES: the decrypted data looks random; --skip-key-check accepts it)" : "");
		}
	}
}

static int add_keys(struct open_ctx *c)
{
	char desc[DM_KEY_DESC_MAX];
	int r;

	for (unsigned int d = 0; d < c->nlayers; d++) {
		if (!c->vk[d])
			continue;
		r = fail_step_at(c, "add a key to the kernel keyring");
		if (r)
			return r;
		r = dm_key_description(c->name, d, desc, sizeof(desc));
		if (r == 0)
			r = keyring_add_logon(desc, c->vk[d]->key, c->vk[d]->size, &c->key_serial[d]);
		if (r) {
			log_err("Cannot add the volume key to the kernel keyring: %s.", strerror(-r));
			return r;
		}
	}
	return 0;
}

static void remove_keys(struct open_ctx *c)
{
	for (unsigned int d = 0; d < c->nlayers; d++)
		if (c->key_serial[d]) {
			keyring_remove(c->key_serial[d]);
			c->key_serial[d] = 0;
		}
}

/* Create the devices of the stack in order; with the daemon, only those
 * below the top table (the daemon creates the top device and segments). */
static int create_devices(struct open_ctx *c)
{
	int r;

	for (size_t i = 0; i < c->stack->count; i++) {
		const struct dm_device *dev = &c->stack->devices[i];
		bool made;

		if (c->use_daemon && dm_is_top_device(dev))
			break;
		r = fail_step_at(c, dev->name);
		if (r)
			return r;
		/* (snapshot: the old devices of these names still have the UUIDs) */
		r = dm_create_stack_device(c->stack, i, !c->swap, &made);
		if (made)
			c->created = i + 1;
		if (r)
			return r;
	}
	return 0;
}

static void remove_devices(struct open_ctx *c)
{
	while (c->created) {
		const struct dm_device *dev = &c->stack->devices[--c->created];
		int r = dm_remove_device(dev->name, false, true);

		if (r)
			log_err("Cannot remove %s while undoing the open: %s.", dev->name, strerror(-r));
	}
}

static void open_ctx_free(struct open_ctx *c)
{
	remove_keys(c);
	for (unsigned int d = 0; d < IMG_MAX_CHAIN_DEPTH; d++) {
		release_file(&c->data[d]);
		release_file(&c->meta[d]);
		volume_key_free(c->vk[d]);
	}
	dm_stack_free(c->stack);
	run_list_free(&c->runs);
	free(c->tl);
	image_free(c->img, &file_io_opener);
	qs_name_unlock(c->name, c->name_lock);
}

/* What a read-write mapping needs of the image; messages say what to do. */
static int check_writable(const struct open_ctx *c, const struct image *img)
{
	switch (img->format) {
	case IMG_FMT_RAW:
		/* a guest writing a raw disk can put a qcow2 header at its start
		 * that names host files: probing would follow it next time */
		if (!c->p->format) {
			log_err("%s has no qcow2 or qcow header: mapping it read-write as a raw disk needs --format raw (or map it --readonly).",
				img->path);
			return -EACCES;
		}
		return 0;
	case IMG_FMT_QCOW:
		log_err("%s: qcow (version 1) images can only be mapped read-only (--readonly); convert them with `qemu-img convert -O qcow2`.",
			img->path);
		return -ENOTSUP;
	case IMG_FMT_QCOW2:
		break;
	}
	if (img->crypt_method == IMG_CRYPT_AES) {
		log_err("%s: legacy AES encryption can only be mapped read-only (--readonly); `qcowsetup convert` moves the image to LUKS.",
			img->path);
		return -ENOTSUP;
	}
	if (img->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
		log_err("%s: the image is marked corrupt; map it read-only (--readonly), or repair it with `qemu-img check -r all`.",
			img->path);
		return -EUCLEAN;
	}
	if (img->incompatible_features & QCOW2_INCOMPAT_DIRTY) {
		log_err("%s: the image was not closed cleanly (dirty bit, lazy refcounts); repair its refcounts with `qemu-img check -r all` before mapping it read-write.",
			img->path);
		return -EUCLEAN;
	}
	return 0;
}

static int build_stack(struct open_ctx *c, const char *slow_dev)
{
	struct stack_options o = {
		.name = c->name,
		.read_only = !c->rw,
		.allow_discards = c->p->allow_discards,
		.max_targets = c->p->max_targets,
		.slow_dev = slow_dev,
		.id = c->swap ? c->swap->id : NULL,
	};

	return stack_build(c->img, c->tl, c->nlayers, &c->runs, &o, c->id, sizeof(c->id), &c->stack);
}

/* ---- the daemon ---- */

/* The daemon runs as root: it is found beside this program or where it is
 * installed, never through the environment. */
static int daemon_path(char *buf, size_t size)
{
	char self[PATH_MAX];
	ssize_t n;

	/* beside the qcowsetup binary (build tree, initramfs), else installed */
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0) {
		char *slash;

		self[n] = '\0';
		slash = strrchr(self, '/');
		if (slash && (size_t)(slash - self) + 18 < size) {
			memcpy(buf, self, (size_t)(slash - self) + 1);
			strcpy(buf + (slash - self) + 1, "qcowsetup-daemon");
			if (!access(buf, X_OK))
				return 0;
		}
	}
	snprintf(buf, size, "%s", QCOWSETUP_DAEMON_PATH);
	if (access(buf, X_OK)) {
		log_err("The slow-path daemon %s is missing.", buf);
		return -ENOENT;
	}
	return 0;
}

/* Wait for "READY nbdN" (0) or "ERROR errno" on fd from pid. */
static int wait_ready(int fd, pid_t pid, int *nbd_index)
{
	char line[128];
	size_t got = 0;
	int status, r = -EIO;

	for (;;) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		ssize_t n;

		r = poll(&pfd, 1, DAEMON_READY_TIMEOUT_MS);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			log_err("The slow-path daemon did not get ready in %d seconds.", DAEMON_READY_TIMEOUT_MS / 1000);
			kill(pid, SIGKILL);
			r = -ETIMEDOUT;
			break;
		}
		n = read(fd, line + got, sizeof(line) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			log_err("The slow-path daemon ended without a word.");
			r = -EIO;
			break;
		}
		got += (size_t)n;
		line[got] = '\0';
		if (!strchr(line, '\n') && got < sizeof(line) - 1)
			continue;
		if (sscanf(line, "READY nbd%d", nbd_index) == 1)
			return 0;
		/* it logged why, on our standard error */
		if (sscanf(line, "ERROR %d", &r) == 1 && r > 0) {
			r = -r;
		} else {
			log_err("The slow-path daemon said something else than READY.");
			r = -EIO;
		}
		break;
	}
	/* it failed: it undoes its own work and exits */
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	return r;
}

/* In the child: close every descriptor but the ready pipe and the given
 * files, and let those through exec. */
static void keep_only(const struct daemon_args *a)
{
	int keep[DAEMON_MAX_HOLDS + 1], n = 0;
	unsigned int from = 3;

	keep[n++] = a->ready_fd;
	for (unsigned int i = 0; i < a->ngiven; i++)
		if (a->given[i].fd >= 0)
			keep[n++] = a->given[i].fd;
	for (int i = 1; i < n; i++)	/* (a few: insertion sort) */
		for (int k = i; k > 0 && keep[k - 1] > keep[k]; k--) {
			int t = keep[k];

			keep[k] = keep[k - 1];
			keep[k - 1] = t;
		}
	for (int i = 0; i < n; i++) {
		if ((unsigned int)keep[i] > from)
			close_range(from, (unsigned int)keep[i] - 1, 0);
		fcntl(keep[i], F_SETFD, 0);
		from = (unsigned int)keep[i] + 1;
	}
	close_range(from, ~0U, 0);
}

/* Start the daemon with args (ready_fd set here) and wait until it serves. */
static int start_daemon(struct daemon_args *args, pid_t *pid_out, int *nbd_index)
{
	struct daemon_argv *argv = NULL;
	char path[PATH_MAX];
	int pfd[2], r;
	pid_t pid = -1;

	r = daemon_path(path, sizeof(path));
	if (r)
		return r;
	if (pipe2(pfd, O_CLOEXEC) < 0) {
		r = -errno;
		log_err("Cannot start the slow-path daemon: %s.", strerror(-r));
		return r;
	}
	args->ready_fd = pfd[1];
	argv = malloc(sizeof(*argv));
	r = argv ? daemon_args_format(args, false, argv) : -ENOMEM;
	fflush(NULL);
	if (!r && (pid = fork()) < 0)
		r = -errno;
	if (r) {
		log_err("Cannot start the slow-path daemon: %s.", strerror(-r));
		close(pfd[0]);
		close(pfd[1]);
		free(argv);
		return r;
	}
	if (pid == 0) {
		/* its own session: no terminal signals; nothing of ours but the
		 * ready pipe and the chain's files (no key, no loop device) */
		setsid();
		keep_only(args);
		execv(path, argv->v);
		fprintf(stderr, "Cannot run %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	free(argv);
	close(pfd[1]);
	log_dbg("daemon %s started (pid %d)", path, (int)pid);
	r = wait_ready(pfd[0], pid, nbd_index);
	close(pfd[0]);
	if (r == 0)
		*pid_out = pid;
	return r;
}

/* path made absolute against the working directory, symlinks kept: the
 * daemon resolves the image's names against the folder as it was named,
 * as this process did. */
static int absolute_path(const char *path, char *buf, size_t size)
{
	char cwd[PATH_MAX];
	int n;

	if (path[0] == '/')
		n = snprintf(buf, size, "%s", path);
	else if (!getcwd(cwd, sizeof(cwd)))
		return -errno;
	else
		n = snprintf(buf, size, "%s/%s", strcmp(cwd, "/") ? cwd : "", path);
	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

static void hold_arg(struct daemon_args *a, const struct held_file *h)
{
	if (h->attached && a->nholds < DAEMON_MAX_HOLDS)
		snprintf(a->holds[a->nholds++], sizeof(a->holds[0]), "%u:%u", h->loop.major, h->loop.minor);
}

static int spawn_daemon(struct open_ctx *c)
{
	struct daemon_args *a = malloc(sizeof(*a));
	int nbd = -1, r;

	if (!a)
		return -ENOMEM;
	r = fail_step_at(c, "start the slow-path daemon");
	if (r)
		goto out;
	qs_state_remove(c->name);	/* of an earlier mapping of that name */
	daemon_args_init(a);
	snprintf(a->name, sizeof(a->name), "%s", c->name);
	snprintf(a->id, sizeof(a->id), "%s", c->id);
	r = absolute_path(c->image_path, a->image, sizeof(a->image));
	/* the same trust as this open: the daemon opens the same files, which
	 * it checks against the loop devices that hold them */
	a->trust_names = c->p->trust_names;
	if (!r && c->p->backing_file)
		r = absolute_path(c->p->backing_file, a->backing_file, sizeof(a->backing_file));
	if (!r && c->p->data_file)
		r = absolute_path(c->p->data_file, a->data_file, sizeof(a->data_file));
	if (r)
		goto out;
	/* the files this open parsed and checked: the daemon serves these,
	 * not whatever their names lead to now */
	for (const struct image *l = c->img; l && a->ngiven + 2 <= DAEMON_MAX_HOLDS; l = l->backing) {
		a->given[a->ngiven++] = (struct file_given){ .depth = (unsigned int)l->depth,
							     .fd = file_io_fd(&l->io) };
		if (l->has_data_file)
			a->given[a->ngiven++] = (struct file_given){ .depth = (unsigned int)l->depth, .data = true,
								     .fd = file_io_fd(&l->data_io) };
	}
	for (unsigned int d = 0; d < c->nlayers; d++) {
		struct daemon_layer *l = &a->layers[a->nlayers++];

		/* a loop device's "MAJ:MIN" */
		snprintf(l->host, sizeof(l->host), "%.*s", (int)sizeof(l->host) - 1, c->tl[d].host);
		snprintf(l->cipher, sizeof(l->cipher), "%s", c->tl[d].cipher);
		l->key_size = stack_layer_key_size(&c->tl[d]);
		hold_arg(a, &c->data[d]);
		hold_arg(a, &c->meta[d]);
	}
	a->read_only = !c->rw;
	a->allow_discards = c->p->allow_discards;
	if (c->p->max_targets)
		a->max_targets = c->p->max_targets;
	a->keep_size = c->keep_size;
	a->used_end = c->used_end;
	if (c->p->nbd_timeout)
		a->nbd_timeout = c->p->nbd_timeout;
	/* one by default: on Linux 6.1 each connection's receiver is a work
	 * item that never ends, on a workqueue whose rescuer runs them one
	 * after the other when kernel workers are slow to start (memory
	 * pressure, a loaded host): a second connection's replies then go
	 * unread until the request timeout (qcowsetup(8), Connections) */
	a->nbd_connections = c->p->nbd_connections ? c->p->nbd_connections : 1;
	a->debug = c->p->debug;
	a->take_over = c->swap != NULL;
	r = start_daemon(a, &c->daemon_pid, &nbd);
	if (r)
		log_verbose("The slow-path daemon failed: %s.", strerror(-r));
	else
		c->daemon_ready = true;
out:
	free(a);
	return r;
}

/* The chain, parsed once: the descriptors it holds are the ones locked,
 * attached and served. */
static int open_chain(struct open_ctx *c)
{
	struct trust_rules rules = { .trust_names = c->p->trust_names };
	struct image_open_opts o = {
		.format = c->p->format,
		.snapshot = c->p->snapshot,
		.backing_file = c->p->backing_file,
		.data_file = c->p->data_file,
	};
	struct file_opener fo;

	file_opener_init(&fo, c->rw, &rules);
	return image_open(&fo.ops, c->image_path, &o, &c->img);
}

static int teardown(const char *name);

/* NAME locked, and free. */
static int claim_name(struct open_ctx *c)
{
	struct dm_dev_info info;
	int r;

	/* one open, close or reattach of NAME at a time, from here to the end */
	c->name_lock = qs_name_lock(c->name);
	if (c->name_lock < 0) {
		log_err("Cannot lock the name %s (%s/%s.lock): %s.", c->name, QS_RUN_DIR, c->name,
			strerror(-c->name_lock));
		return c->name_lock;
	}
	r = dm_device_info(c->name, &info);
	if (r == 0 && info.exists) {
		log_err("Device %s already exists.", c->name);
		return -EEXIST;
	}
	mapping_unmark_suspended(c->name);	/* of a mapping of that name removed by hand */
	return r;
}

/* Phase 1: NAME free and locked (a snapshot holds it already), the chain
 * parsed and fit for the mode. */
static int prepare(struct open_ctx *c)
{
	int r;

	if (!dm_mapping_name_valid(c->name)) {
		log_err("Invalid device name \"%s\": use letters, digits and - _ . + (at most %d).", c->name,
			DM_MAPPING_NAME_MAX);
		return -EINVAL;
	}
	c->rw = !c->p->read_only && !c->p->snapshot;
	r = dm_check_control();
	if (!r && !c->swap)
		r = claim_name(c);
	if (r)
		return r;
	/* parsed, validated, locked, attached and served: one descriptor per
	 * file, opened here once */
	r = open_chain(c);
	if (r)
		return r;
	if (c->rw) {
		r = check_writable(c, c->img);
		if (r)
			return r;
	}
	if (c->p->require_encryption && c->img->crypt_method == IMG_CRYPT_NONE) {
		/* (a stick with the same label, a replaced file): checked on the
		 * very bytes that get mapped */
		log_err("%s is not encrypted, but its qcowtab entry expects a key: refused (option allow-unencrypted accepts it).",
			c->img->path);
		return -EACCES;
	}
	c->tl = calloc(IMG_MAX_CHAIN_DEPTH, sizeof(*c->tl));
	if (!c->tl)
		return -ENOMEM;
	r = stack_layers_read(c->img, c->tl, &c->nlayers);
	if (!r)
		r = image_map_chain(c->img, &c->runs);
	if (r)
		return r;
	c->use_daemon = stack_count_compressed(&c->runs) || (c->rw && c->img->format == IMG_FMT_QCOW2);
	return 0;
}

/* Phase 2: the volume keys (before anything costs a device), and the
 * kernel features the stack needs. */
static int unlock(struct open_ctx *c)
{
	struct passphrase *shared = NULL;
	int r = 0;

	for (unsigned int d = 0; !r && d < c->nlayers; d++) {
		if (c->tl[d].img->crypt_method == IMG_CRYPT_NONE)
			continue;
		if (c->swap && c->swap->vk[d]) {
			c->vk[d] = c->swap->vk[d];
			c->swap->vk[d] = NULL;
			continue;
		}
		r = unlock_layer(c, d, &shared);
		if (!r && d == 0 && c->keep_pp && shared)
			r = passphrase_from_buffer(shared->data, shared->len, c->keep_pp);
	}
	passphrase_free(shared);
	if (!r)
		r = dm_check_target("linear");
	if (!r)
		r = dm_check_target("zero");
	for (unsigned int d = 0; !r && d < c->nlayers; d++)
		if (c->vk[d])
			r = dm_check_target("crypt");
	if (!r && c->use_daemon)
		r = nbd_check();
	/* read-write with a slow path: the top is a switch (dmtable.h); its
	 * module loaded here, never by the daemon between a suspend and its
	 * resume */
	if (!r && c->use_daemon && c->rw)
		r = dm_check_target("switch");
	return r;
}

/* Phase 3: each layer's files locked and attached to loop devices, the
 * top's file extended for new clusters. */
static int hold_files(struct open_ctx *c)
{
	int r;

	for (unsigned int d = 0; d < c->nlayers; d++) {
		struct image *l = (struct image *)c->tl[d].img;
		bool write = c->rw && d == 0;
		uint64_t reserve = 0, old = 0;

		if (write && l->format == IMG_FMT_QCOW2) {
			uint64_t used;

			r = qcow2_used_end(l, &used);
			if (!r)
				r = qcow2_file_reserve(l, used, &reserve);
			if (r)
				return r;
			c->used_end = used;
		}
		r = hold_file(c, &l->data_io, &c->data[d], write, write, reserve, &old);
		if (r)
			return r;
		if (reserve) {
			/* the crypt device covers the file as it is now */
			c->keep_size = l->has_data_file ? 0 : old;
			if (l->data_io.size < reserve)
				l->data_io.size = reserve;
			if (!l->has_data_file)
				l->io.size = l->data_io.size;
		}
		if (l->has_data_file) {
			r = hold_file(c, &l->io, &c->meta[d], write, false, 0, NULL);
			if (r)
				return r;
		}
		snprintf(c->tl[d].host, sizeof(c->tl[d].host), "%u:%u", c->data[d].loop.major, c->data[d].loop.minor);
	}
	return 0;
}

/* Phase 4: the devices below the top (keys through the keyring, freed as
 * soon as dm-crypt has them), then the top (or the daemon, which makes it). */
static int create_stack(struct open_ctx *c)
{
	int r;

	r = build_stack(c, c->use_daemon ? "{nbd}" : NULL);
	if (!r)
		r = add_keys(c);
	if (!r)
		r = create_devices(c);
	if (r)
		return r;
	/* dm-crypt copied the keys at table load: none stays in this process */
	remove_keys(c);
	for (unsigned int d = 0; d < c->nlayers; d++) {
		volume_key_free(c->vk[d]);
		c->vk[d] = NULL;
	}
	if (c->use_daemon)
		r = spawn_daemon(c);
	return r;
}

static int do_open(struct open_ctx *c)
{
	int r;

	r = prepare(c);
	if (r)
		return r;
	r = unlock(c);
	if (!r)
		r = hold_files(c);
	if (!r)
		r = create_stack(c);
	/* (a snapshot: the daemon's READY was the switch, nothing fails after) */
	if (!r && !c->swap)
		r = fail_step_at(c, "finish");
	if (r && c->daemon_ready) {
		/* the daemon made the top device: undo as close does */
		c->created = 0;
		teardown(c->name);
	}
	if (r)
		remove_devices(c);
	if (r && !c->daemon_ready && c->nlayers)
		/* (once the daemon made the top, it did so at its exit) */
		restore_size(&c->data[0]);
	return r;
}

int mapping_open(const struct mapping_params *p)
{
	struct open_ctx c = { .p = p, .image_path = p->image, .name = p->name, .name_lock = -1 };
	int r;

	run_list_init(&c.runs);
	r = do_open(&c);
	open_ctx_free(&c);
	dm_release();
	if (r == 0)
		log_verbose("Device %s is ready: /dev/mapper/%s", c.name, c.name);
	return r;
}

/* ---- close, status, list ---- */

struct dev_entry {
	char name[128];
	char uuid[DM_INFO_UUID_SIZE];
	uint32_t major, minor;
};

struct dev_list {
	struct dev_entry *v;
	size_t n, alloc;
};

static int collect_dev(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct dev_list *l = opaque;

	if (!uuid || strncmp(uuid, DM_UUID_PREFIX, strlen(DM_UUID_PREFIX)))
		return 0;
	if (l->n == l->alloc) {
		size_t na = l->alloc ? 2 * l->alloc : 16;
		struct dev_entry *p = realloc(l->v, na * sizeof(*p));

		if (!p)
			return -ENOMEM;
		l->v = p;
		l->alloc = na;
	}
	snprintf(l->v[l->n].name, sizeof(l->v[l->n].name), "%s", name);
	snprintf(l->v[l->n].uuid, sizeof(l->v[l->n].uuid), "%s", uuid);
	l->v[l->n].major = major;
	l->v[l->n].minor = minor;
	l->n++;
	return 0;
}

static int find_mapping(const char *name, struct dev_list *all, struct dm_dev_info *info)
{
	int r;

	r = dm_check_control();
	if (!r)
		r = mapping_find_top(name, info);
	return r ? r : dm_list_devices(collect_dev, all);
}

int mapping_find_top(const char *name, struct dm_dev_info *info)
{
	int r = dm_device_info(name, info);

	if (r)
		return r;
	if (!info->exists) {
		log_err("Device %s does not exist.", name);
		return -ENODEV;
	}
	if (!dm_uuid_is_top(info->uuid)) {
		log_err("Device %s is not a qcowsetup mapping.", name);
		return -ENODEV;
	}
	return 0;
}

/* The loop devices (and so the files) under a device, following tables. */
struct walk_ctx {
	int depth;
	unsigned int targets;
	char files[IMG_MAX_CHAIN_DEPTH * 2][4096];
	unsigned int nfiles;
	char cipher[DM_CIPHER_MAX + 1];
	struct dev_list *all;
	const char *name;	/* the mapping */
	bool count_fast;	/* the top is a switch: the fast device's targets counted */
	int nbd[8];		/* slow-path devices under it */
	unsigned int nnbd;
	/* devices walked already: a big table names the same few devices
	 * millions of times */
	uint32_t seen[256][2];
	unsigned int nseen;
};

static void note_file(struct walk_ctx *w, const char *path)
{
	for (unsigned int i = 0; i < w->nfiles; i++)
		if (!strcmp(w->files[i], path))
			return;
	if (w->nfiles < sizeof(w->files) / sizeof(w->files[0]))
		snprintf(w->files[w->nfiles++], sizeof(w->files[0]), "%s", path);
}

static int walk_device(struct walk_ctx *w, uint32_t major, uint32_t minor);

static int walk_target(void *opaque, uint64_t start, uint64_t length, const char *type, const char *params)
{
	struct walk_ctx *w = opaque;
	unsigned int maj, min;
	const char *dev = NULL;
	char spec[DM_CIPHER_MAX + 1];

	(void)start;
	(void)length;
	/* (a switch top: the fast device's targets, not the top's) */
	if ((w->depth == 0 && !w->count_fast) || (w->depth == 1 && w->count_fast))
		w->targets++;
	if (!strcmp(type, "switch")) {
		unsigned int npaths, nopt;
		int used = 0;

		/* paths nregion_size nopt [opt...] (dev offset)... : path 0
		 * (the fast device) counts as the table */
		if (sscanf(params, "%u %*s %u%n", &npaths, &nopt, &used) != 2)
			return 0;
		if (w->depth == 0) {
			w->targets--;
			w->count_fast = true;
		}
		dev = params + used;
		for (unsigned int skip = 0; dev && skip < nopt; skip++)
			dev = strchr(dev + 1, ' ');
		for (unsigned int i = 0; dev && i < npaths; i++) {
			int r;

			dev++;
			if (sscanf(dev, "%u:%u", &maj, &min) == 2) {
				r = walk_device(w, maj, min);
				if (r)
					return r;
			}
			dev = strchr(dev, ' ');		/* the offset */
			dev = dev ? strchr(dev + 1, ' ') : NULL;
		}
		return 0;
	}
	if (!strcmp(type, "linear")) {
		dev = params;
	} else if (!strcmp(type, "crypt")) {
		/* cipher key iv_offset device offset */
		if (sscanf(params, "%128s", spec) == 1)
			snprintf(w->cipher, sizeof(w->cipher), "%s", spec);
		dev = params;
		for (int skip = 0; dev && skip < 3; skip++) {
			dev = strchr(dev, ' ');
			if (dev)
				dev++;
		}
	}
	if (dev && sscanf(dev, "%u:%u", &maj, &min) == 2)
		return walk_device(w, maj, min);
	return 0;
}

/* A segment's devices from sysfs: its table has up to --max-targets
 * entries, all naming the same few devices (and nothing else to show). */
static int walk_slaves(struct walk_ctx *w, uint32_t major, uint32_t minor)
{
	char path[PATH_MAX], buf[32];
	struct dirent *e;
	DIR *dir;
	int r = 0;

	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/slaves", major, minor);
	dir = opendir(path);
	if (!dir)
		return -errno;
	while (!r && (e = readdir(dir))) {
		unsigned int maj, min;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/block/%s/dev", e->d_name);
		if (sys_read_small(path, buf, sizeof(buf)) > 0 && sscanf(buf, "%u:%u", &maj, &min) == 2)
			r = walk_device(w, maj, min);
	}
	closedir(dir);
	return r;
}

static int walk_device(struct walk_ctx *w, uint32_t major, uint32_t minor)
{
	struct loop_dev_info li;
	char path[64];
	int r;

	for (unsigned int i = 0; i < w->nseen; i++)
		if (w->seen[i][0] == major && w->seen[i][1] == minor)
			return 0;
	if (w->nseen < ARRAY_SIZE(w->seen)) {
		w->seen[w->nseen][0] = major;
		w->seen[w->nseen++][1] = minor;
	}
	if (major == LOOP_DEV_MAJOR) {
		snprintf(path, sizeof(path), "/dev/loop%u", minor);
		if (loop_get_info(path, &li) == 0)
			note_file(w, li.backing_file);
		return 0;
	}
	if (major == NBD_DEV_MAJOR) {
		int idx = nbd_index_of(major, minor);
		unsigned int i;

		for (i = 0; i < w->nnbd && w->nbd[i] != idx; i++)
			;
		if (idx >= 0 && i == w->nnbd && w->nnbd < ARRAY_SIZE(w->nbd))
			w->nbd[w->nnbd++] = idx;
		return 0;
	}
	for (size_t i = 0; i < w->all->n; i++)
		if (w->all->v[i].major == major && w->all->v[i].minor == minor && w->depth < 64) {
			w->depth++;
			if (w->name && dm_is_segment_name(w->all->v[i].name, w->name))
				r = walk_slaves(w, major, minor);
			else
				r = dm_get_table(w->all->v[i].name, walk_target, w);
			w->depth--;
			return r;
		}
	return 0;
}

/* The daemon serving nbd index of mapping name: from its state file (a
 * reattached daemon is not the one the kernel remembers), else sysfs. */
static pid_t daemon_pid(const char *name, int index)
{
	pid_t pid = 0, sysfs = 0;
	int nbd = -1;

	if (qs_state_read(name, &pid, &nbd, NULL) == 0 && pid > 0 && nbd == index)
		return pid;
	nbd_device_pid(index, &sysfs);
	return sysfs;
}

/* Whether the daemon process pid is gone (or a zombie, or the pid now
 * belongs to another program: state files outlive their daemons). */
static bool process_gone(pid_t pid)
{
	static const char argv0[] = DAEMON_ARGV0;
	char path[64], buf[256], *p;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return true;
	n = read(fd, buf, sizeof(argv0));
	close(fd);
	if (n != (ssize_t)sizeof(argv0) || memcmp(buf, argv0, sizeof(argv0)))
		return true;	/* argv0 and its NUL */
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return true;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return true;
	buf[n] = '\0';
	p = strrchr(buf, ')');
	return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

static int wait_gone(pid_t pid, int timeout_ms)
{
	struct timespec ts = { .tv_nsec = 20 * 1000 * 1000 };

	for (int waited = 0; !process_gone(pid); waited += 20) {
		if (waited >= timeout_ms)
			return -ETIMEDOUT;
		nanosleep(&ts, NULL);
		/* reap it when it is our child (open's rollback) */
		waitpid(pid, NULL, WNOHANG);
	}
	return 0;
}

/* Stop the slow path of a mapping whose top device is gone: disconnect its
 * NBD devices; their daemons flush, clear the dirty bit and exit. */
static int stop_daemons(const char *name, const int *nbd, unsigned int n, const pid_t *pids)
{
	int r = 0;

	for (unsigned int i = 0; i < n; i++) {
		/* a daemon that saw its device go disconnects itself first */
		if (nbd_disconnect(nbd[i]) && (pids[i] <= 0 || !process_gone(pids[i])))
			log_verbose("nbd%d: disconnect failed; waiting for its daemon anyway.", nbd[i]);
	}
	for (unsigned int i = 0; i < n; i++) {
		if (pids[i] <= 0)
			continue;
		log_dbg("waiting for the daemon of %s (pid %d) to finish", name, (int)pids[i]);
		if (wait_gone(pids[i], DAEMON_EXIT_TIMEOUT_MS)) {
			log_err("The slow-path daemon of %s (pid %d) did not finish in %d seconds.", name, (int)pids[i],
				DAEMON_EXIT_TIMEOUT_MS / 1000);
			if (!r)
				r = -ETIMEDOUT;
		}
	}
	return r;
}

/* Remove the internal devices of the mapping (top already gone) that
 * nothing holds, until none is left. */
static int remove_internal(const char *name, struct dev_list *all, const char *top_uuid)
{
	bool progress = true;
	int r = 0;

	while (progress) {
		progress = false;
		for (size_t i = 0; i < all->n; i++) {
			struct dm_dev_info di;

			if (!all->v[i].name[0] || !dm_uuid_is_internal_of(all->v[i].uuid, top_uuid))
				continue;
			if (dm_device_info(all->v[i].name, &di) || !di.exists) {
				all->v[i].name[0] = '\0';
				continue;
			}
			if (di.open_count > 0)
				continue;
			r = dm_remove_device(all->v[i].name, false, true);
			if (r == -ENODEV || r == -ENXIO)
				r = 0;	/* gone meanwhile (its daemon cleaned up) */
			if (r) {
				log_err("Cannot remove %s: %s.", all->v[i].name, strerror(-r));
				return r;
			}
			all->v[i].name[0] = '\0';
			progress = true;
		}
	}
	for (size_t i = 0; i < all->n; i++)
		if (all->v[i].name[0] && dm_uuid_is_internal_of(all->v[i].uuid, top_uuid)) {
			log_err("Internal device %s of %s is still in use.", all->v[i].name, name);
			r = -EBUSY;
		}
	return r;
}

/* A read-write mapping whose every cluster has moved to the fast path names
 * no slow-path device in its tables, yet its daemon serves on and holds the
 * crypt layer: find it by its state file, if the NBD device is still its. */
static void add_idle_daemon(const char *name, struct walk_ctx *w)
{
	pid_t pid = 0, sysfs = 0;
	int nbd = -1;

	if (w->nnbd || qs_state_read(name, &pid, &nbd, NULL) || pid <= 0 || nbd < 0 || process_gone(pid))
		return;
	if (nbd_device_pid(nbd, &sysfs) == 0 && sysfs > 0 && sysfs != pid)
		return;	/* the NBD device serves another process now */
	w->nbd[w->nnbd++] = nbd;
}

/* Close NAME: the top device, then its slow path, then the rest. */
static int close_mapping(const char *name, bool deferred)
{
	struct dev_list all = { 0 };
	struct dm_dev_info info;
	struct walk_ctx *w = NULL;
	pid_t pids[8] = { 0 };
	int r;

	r = find_mapping(name, &all, &info);
	if (r)
		goto out;
	if (info.open_count > 0 && !deferred) {
		log_err("Device %s is still in use (open count %d).", name, info.open_count);
		r = -EBUSY;
		goto out;
	}
	w = calloc(1, sizeof(*w));
	if (!w) {
		r = -ENOMEM;
		goto out;
	}
	w->all = &all;
	w->name = name;
	dm_get_table(name, walk_target, w);
	add_idle_daemon(name, w);
	for (unsigned int i = 0; i < w->nnbd; i++)
		pids[i] = daemon_pid(name, w->nbd[i]);
	r = dm_remove_device(name, deferred, true);
	if (r) {
		log_err("Cannot remove %s: %s.", name, strerror(-r));
		goto out;
	}
	if (deferred && info.open_count > 0) {
		log_verbose("Device %s will be removed on its last close%s.", name,
			    w->nnbd ? "; its slow-path daemon stays until then" : "");
		goto out;	/* internal devices stay until then; a later close cleans up */
	}
	if (w->nnbd) {
		/* the fast device and the segments go first: they hold the NBD
		 * device (the fast device the segments) */
		for (int pass = 0; pass < 2; pass++)
			for (size_t i = 0; i < all.n; i++) {
				struct dm_dev_info di;

				if (dm_uuid_is_internal_of(all.v[i].uuid, info.uuid) &&
				    dm_is_daemon_device_name(all.v[i].name, name) &&
				    dm_is_segment_name(all.v[i].name, name) == (pass == 1) &&
				    !dm_device_info(all.v[i].name, &di) && di.exists && !di.open_count)
					dm_remove_device(all.v[i].name, false, true);
			}
		r = stop_daemons(name, w->nbd, w->nnbd, pids);
		if (!r)
			qs_state_remove(name);
	}
	{
		int r2 = remove_internal(name, &all, info.uuid);

		if (!r)
			r = r2;
	}
out:
	free(w);
	free(all.v);
	return r;
}

static int teardown(const char *name)
{
	return close_mapping(name, false);
}

int mapping_lock_name(const char *name)
{
	int lock;

	if (!dm_mapping_name_valid(name)) {
		log_err("Device %s is not a qcowsetup mapping.", name);
		return -ENODEV;
	}
	lock = qs_name_lock(name);
	if (lock < 0)
		log_err("Cannot lock the name %s: %s.", name, strerror(-lock));
	return lock;
}

/* The name lock of NAME, which `qcowsetup suspend` does not hold (close,
 * reattach: resume first). */
static int lock_active_mapping(const char *name)
{
	int lock = mapping_lock_name(name);

	if (lock >= 0 && mapping_is_marked_suspended(name)) {
		log_err("%s is suspended: `qcowsetup resume %s` first.", name, name);
		qs_name_unlock(name, lock);
		return -EBUSY;
	}
	return lock;
}

int mapping_close(const char *name, bool deferred)
{
	int lock, r;

	lock = lock_active_mapping(name);
	if (lock < 0)
		return lock;
	r = close_mapping(name, deferred);
	qs_name_unlock(name, lock);
	dm_release();
	return r;
}

/* The daemon's reload statistics (/run/qcowsetup/NAME.stats), if any. */
static void read_daemon_stats(const char *name, struct mapping_status *st)
{
	char path[PATH_MAX], line[128], key[64];
	double v;
	FILE *f;

	qs_state_path(path, sizeof(path), name, QS_STATE_STATS);
	f = fopen(path, "re");
	if (!f)
		return;
	st->have_stats = true;
	while (fgets(line, sizeof(line), f)) {
		if (!strcmp(line, "broken=1\n")) {
			st->broken = true;
			continue;
		}
		if (sscanf(line, "reloads=%llu", &st->reloads) == 1 ||
		    sscanf(line, "remapped_bytes=%llu", &st->remapped_bytes) == 1)
			continue;
		if (sscanf(line, "%63[^=]=%lf", key, &v) != 2)
			continue;
		if (!strcmp(key, "held_ms_p99"))
			st->held_ms_p99 = v;
		else if (!strcmp(key, "held_ms_max"))
			st->held_ms_max = v;
		else if (!strcmp(key, "round_ms_p99"))
			st->round_ms_p99 = v;
	}
	fclose(f);
}

static int fill_status(struct mapping_status *st, const char *name, struct dev_list *all,
		       const struct dm_dev_info *info)
{
	struct walk_ctx *w = calloc(1, sizeof(*w));

	if (!w)
		return -ENOMEM;
	memset(st, 0, sizeof(*st));
	w->all = all;
	w->name = name;
	dm_get_table(name, walk_target, w);
	/* (a mapping whose every cluster is on the fast path names no NBD
	 * device: its daemon is in the state file) */
	add_idle_daemon(name, w);
	snprintf(st->name, sizeof(st->name), "%s", name);
	snprintf(st->uuid, sizeof(st->uuid), "%s", info->uuid);
	st->read_only = info->read_only;
	st->suspended = info->suspended || mapping_is_marked_suspended(name);
	st->open_count = info->open_count;
	st->targets = w->targets;
	for (size_t i = 0; i < all->n; i++)
		st->internal += dm_uuid_is_internal_of(all->v[i].uuid, info->uuid);
	snprintf(st->cipher, sizeof(st->cipher), "%s", w->cipher);
	for (unsigned int i = 0; i < w->nfiles && i < MAPPING_MAX_FILES; i++)
		snprintf(st->files[st->nfiles++], sizeof(st->files[0]), "%s", w->files[i]);
	for (unsigned int i = 0; i < w->nnbd && i < MAPPING_MAX_SLOW; i++) {
		pid_t pid = daemon_pid(name, w->nbd[i]);

		st->slow[i].nbd = w->nbd[i];
		st->slow[i].pid = pid;
		st->slow[i].running = pid > 0 && !process_gone(pid);
		st->nslow++;
	}
	if (w->nnbd)
		read_daemon_stats(name, st);
	free(w);
	return 0;
}

int mapping_get_status(const char *name, struct mapping_status *st)
{
	struct dev_list all = { 0 };
	struct dm_dev_info info;
	int r;

	r = find_mapping(name, &all, &info);
	if (r == 0)
		r = fill_status(st, name, &all, &info);
	free(all.v);
	return r;
}

int mapping_list(int (*fn)(void *opaque, const char *name), void *opaque)
{
	struct dev_list all = { 0 };
	int r;

	r = dm_check_control();
	if (!r)
		r = dm_list_devices(collect_dev, &all);
	for (size_t i = 0; !r && i < all.n; i++) {
		struct dm_dev_info info;

		if (!dm_uuid_is_top(all.v[i].uuid) || dm_device_info(all.v[i].name, &info) || !info.exists)
			continue;
		r = fn(opaque, all.v[i].name);
	}
	free(all.v);
	return r;
}

void mapping_release(void)
{
	dm_release();
}

/* ---- reattach: a new daemon for a mapping whose daemon died ---- */

int mapping_reattach_locked(const char *name, bool debug)
{
	struct dev_list all = { 0 };
	struct dm_dev_info info;
	struct walk_ctx *w = NULL;
	struct daemon_args *a = NULL;
	pid_t pid = 0, state_pid;
	int nbd = -1, state_nbd, r;

	r = find_mapping(name, &all, &info);
	if (r)
		goto out;
	w = calloc(1, sizeof(*w));
	a = malloc(sizeof(*a));
	if (!w || !a) {
		r = -ENOMEM;
		goto out;
	}
	w->all = &all;
	w->name = name;
	dm_get_table(name, walk_target, w);
	if (w->nnbd != 1) {
		log_err("%s has no slow path to reattach.", name);
		r = -EINVAL;
		goto out;
	}
	pid = daemon_pid(name, w->nbd[0]);
	if (pid > 0 && !process_gone(pid)) {
		log_err("The daemon of %s (pid %d) is running.", name, (int)pid);
		r = -EBUSY;
		goto out;
	}
	r = qs_state_read(name, &state_pid, &state_nbd, a);
	if (r) {
		log_err("Cannot read the daemon's state of %s (%s/%s.daemon): %s.", name, QS_RUN_DIR, name,
			strerror(-r));
		goto out;
	}
	a->reattach = w->nbd[0];
	a->debug = debug;
	r = start_daemon(a, &pid, &nbd);
	if (r)
		log_verbose("The new daemon failed: %s.", strerror(-r));
	else
		log_verbose("%s: daemon pid %d serves nbd%d again.", name, (int)pid, nbd);
out:
	free(a);
	free(w);
	free(all.v);
	return r;
}

int mapping_reattach(const char *name, bool debug)
{
	int lock, r;

	lock = lock_active_mapping(name);	/* (resume starts a daemon itself) */
	if (lock < 0)
		return lock;
	r = mapping_reattach_locked(name, debug);
	qs_name_unlock(name, lock);
	dm_release();
	return r;
}

/* ---- resize: the daemon of a read-write mapping resizes its image ---- */

/* One resize request to the daemon; fail_step 0: none. */
static int resize_request(const struct mapping_resize_params *p, int fail_step, char *text, size_t size)
{
	char req[CONTROL_LINE_MAX];

	snprintf(req, sizeof(req), "resize %s%" PRIu64 "%s", p->relative > 0 ? "+" : p->relative < 0 ? "-" : "",
		 p->size, p->shrink ? " shrink" : "");
	if (fail_step > 0)
		snprintf(req + strlen(req), sizeof(req) - strlen(req), " fail-step=%d", fail_step);
	return control_call(p->name, req, text, size);
}

/* The daemon's -ENOKEY: the crypt device must cover the bytes in text
 * first (fail step 2 of a LUKS resize past its room), then the request
 * again (its daemon's steps from 3). */
static int resize_with_key(const struct mapping_resize_params *p, char *text, size_t size)
{
	struct mapping_live_params lp = { .ask = p->ask, .ask_opaque = p->ask_opaque, .fail_step = p->fail_step };
	uint64_t bytes;
	int r;

	if (parse_u64(text, 0, &bytes) < 0)
		return -EPROTO;
	r = mapping_grow_crypt_locked(p->name, bytes, &lp, 1);
	if (!r)
		r = resize_request(p, p->fail_step > 2 ? p->fail_step - 2 : 0, text, size);
	if (r == -ENOKEY) {
		log_err("%s: the crypt device is still too small for the new size.", p->name);
		r = -EIO;
	}
	return r;
}

int mapping_resize(const struct mapping_resize_params *p, uint64_t *new_size)
{
	struct dev_list all = { 0 };
	struct dm_dev_info info;
	char text[CONTROL_LINE_MAX] = "";
	int lock, r;

	*new_size = 0;
	lock = mapping_lock_name(p->name);
	if (lock < 0)
		return lock;
	r = find_mapping(p->name, &all, &info);
	if (!r && info.read_only) {
		log_err("%s: the mapping is read-only: it cannot be resized.", p->name);
		r = -EINVAL;
	}
	if (r)
		goto out;
	r = resize_request(p, p->fail_step, text, sizeof(text));
	if (r == -ENOKEY)
		r = resize_with_key(p, text, sizeof(text));
	switch (r) {
	case 0:
		if (parse_u64(text, 0, new_size) < 0)
			r = -EPROTO;
		break;
	case -ENOENT:
	case -ECONNREFUSED:
		log_err("%s: no daemon answers (a read-only mapping, or its daemon died: qcowsetup reattach %s).",
			p->name, p->name);
		r = -ENODEV;
		break;
	case -EROFS:
	case -ENOTEMPTY:
		r = -EINVAL;	/* wrong parameters: the daemon said why */
		break;
	default:
		break;
	}
out:
	free(all.v);
	qs_name_unlock(p->name, lock);
	return r;
}

/* ---- for commit.c: a daemon started and stopped as open and close do ---- */

int mapping_start_daemon(struct daemon_args *a, pid_t *pid, int *nbd_index)
{
	return start_daemon(a, pid, nbd_index);
}

int mapping_stop_daemon(const char *name, int nbd, pid_t pid)
{
	return stop_daemons(name, &nbd, 1, &pid);
}

/* ---- for a live snapshot (mapping_swap.h) ---- */

int mapping_open_swap(const struct mapping_params *p, struct mapping_swap *s)
{
	struct open_ctx c = { .p = p, .image_path = p->image, .name = p->name, .name_lock = -1, .swap = s };
	int r;

	run_list_init(&c.runs);
	c.step = s->step;
	r = do_open(&c);
	s->step = c.step;
	if (r == 0) {
		if (s->switched)
			s->switched(s->opaque);
		/* the old devices gone, their UUIDs are free */
		for (size_t i = 0; i < c.created; i++) {
			const struct dm_device *dev = &c.stack->devices[i];

			if (dm_set_uuid(dev->name, dev->uuid, dev->hidden))
				log_std("%s keeps no UUID: `qcowsetup close %s` will not find it (dmsetup remove %s).",
					dev->name, c.name, dev->name);
		}
	}
	open_ctx_free(&c);
	return r;
}

int mapping_read_chain_keys(const struct mapping_params *p, struct mapping_chain_keys *k)
{
	struct open_ctx c = { .p = p, .image_path = p->image, .name = p->name, .name_lock = -1, .keep_pp = &k->pp };
	int r;

	run_list_init(&c.runs);
	r = open_chain(&c);	/* (c.rw false: read-only) */
	if (!r) {
		c.tl = calloc(IMG_MAX_CHAIN_DEPTH, sizeof(*c.tl));
		r = c.tl ? stack_layers_read(c.img, c.tl, &c.nlayers) : -ENOMEM;
	}
	if (!r)
		r = unlock(&c);
	if (!r) {
		k->size = c.img->size;
		k->cluster_bits = c.img->cluster_bits;
		k->luks = c.img->crypt_method == IMG_CRYPT_LUKS;
		if (k->luks)
			k->luks0 = c.tl[0].luks;
		for (unsigned int d = 0; d < c.nlayers; d++) {
			k->legacy_aes = k->legacy_aes || c.tl[d].img->crypt_method == IMG_CRYPT_AES;
			k->vk[d] = c.vk[d];
			c.vk[d] = NULL;
		}
	}
	open_ctx_free(&c);
	return r;
}

void mapping_chain_keys_free(struct mapping_chain_keys *k)
{
	for (unsigned int d = 0; d < IMG_MAX_CHAIN_DEPTH; d++) {
		volume_key_free(k->vk[d]);
		k->vk[d] = NULL;
	}
	passphrase_free(k->pp);
	k->pp = NULL;
}

int mapping_restart_daemon(struct daemon_args *a, int nbd)
{
	pid_t pid = 0;
	int index = -1;

	a->reattach = nbd;
	a->take_over = false;
	a->ngiven = 0;
	return start_daemon(a, &pid, &index);
}

int mapping_wait_daemon_exit(pid_t pid)
{
	return wait_gone(pid, DAEMON_EXIT_TIMEOUT_MS);
}
