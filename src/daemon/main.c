/* qcowsetup-daemon: the slow path of one qcowsetup mapping.
 *
 * `qcowsetup open` starts it (argv[0] "@qcowsetup-daemon": systemd's
 * storage-daemon convention, so that it survives the killing of processes at
 * switch_root and shutdown) once the loop and crypt devices exist. It
 *   - opens the image (the top layer read-write) and its backing chain,
 *   - connects a kernel NBD device to one end of --nbd-connections
 *     socketpairs and serves them (server.c, several threads): guest
 *     offsets 1:1; reads of zero, unallocated, backing,
 *     compressed and shared clusters; writes with allocation and
 *     copy-on-write through the metadata writer (src/lib/qcow2_rw.c),
 *     the data through the crypt device for LUKS images; flush and FUA make
 *     data and metadata durable,
 *   - creates the top device (and its segments): clusters of the top layer
 *     with refcount 1 map straight to the file (the kernel moves those
 *     bytes), everything else to the NBD device,
 *   - remaps newly allocated clusters to the fast path with batched table
 *     reloads (remap.c),
 *   - on NBD_CMD_DISC (`qcowsetup close`) flushes, clears the dirty bit of
 *     a lazy-refcounts image, gives the file back its size and exits; so
 *     it does on "detach" (`qcowsetup snapshot`, control.c), leaving the
 *     top device, which a new daemon takes over (--take-over).
 * Read-only mappings of images with compressed clusters use it too, to
 * serve those clusters.
 *
 * It opens the files of the chain as `qcowsetup open` did (the same trust
 * rules and overrides) and serves them only when each is the very file a
 * loop device of the mapping holds (device and inode): a name swapped for
 * another file since the open is refused, never followed.
 *
 * It locks in memory what its I/O path needs (memlock.c), marks itself an
 * I/O flusher (PR_SET_IO_FLUSHER: its allocations never wait for writeback,
 * which could need the device it serves), allocates nothing on its I/O
 * path, and logs to syslog. It keeps the loop devices open, so that the
 * image locks (held by the loop devices' file descriptions) last until its
 * last metadata write. If it dies, the fast
 * path goes on, new slow-path I/O fails at once and requests in flight fail
 * after the NBD timeout; `qcowsetup reattach NAME` starts a new one that
 * takes the NBD device over (the state file /run/qcowsetup/NAME.daemon keeps
 * the arguments).
 *
 * Usage (by qcowsetup, not by hand):
 *   @qcowsetup-daemon --name NAME --id ID --image PATH
 *       --layer HOST[,CIPHER,KEYSIZE]...  (one per layer, top first)
 *       [--hold MAJ:MIN]... [--readonly] [--allow-discards] [--max-targets N]
 *       [--trust-names] [--backing-file PATH] [--data-file PATH]
 *       [--ready-fd FD] [--keep-size BYTES] [--used-end BYTES]
 *       [--reattach NBDINDEX] [--take-over]
 *       [--nbd-timeout S] [--flush-interval MS] [--nbd-connections N] [--debug]
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <syslog.h>
#include <unistd.h>

#include "daemon.h"
#include "daemon_state.h"
#include "dm.h"
#include "fileio.h"
#include "log.h"
#include "loop.h"
#include "nbd.h"
#include "sysutil.h"
#include "util.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

static bool to_stderr = true;
static const char *log_name = "?";

static void log_to_syslog(enum qs_log_level level, const char *msg, void *ud)
{
	static const int prio[] = { LOG_ERR, LOG_NOTICE, LOG_INFO, LOG_DEBUG };

	(void)ud;
	syslog(prio[level <= QS_LOG_DEBUG ? level : QS_LOG_DEBUG], "%s: %s", log_name, msg);
	if (to_stderr && level <= QS_LOG_NORMAL)
		fprintf(stderr, "%s\n", msg);
}

void daemon_log_ready(void)
{
	to_stderr = false;
}

/* ---- files ---- */

static int layer_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	return dio_pread_padded(opaque, buf, len, off);
}

/* The O_DIRECT twin of fd (sysutil.h): -1 when the file system refuses it
 * (tmpfs), buffered reads and writes then. */
static int direct_twin(int fd, const char *what)
{
	int dfd = dio_reopen(fd);

	if (dfd < 0)
		log_dbg("%s: no direct I/O (%s): buffered", what, strerror(-dfd));
	return dfd < 0 ? -1 : dfd;
}

/* /dev/mapper name of the crypt device of layer d (dmtable.h's naming). */
static void crypt_device(const struct daemon *d, unsigned int depth, char *buf, size_t size)
{
	if (depth)
		snprintf(buf, size, "/dev/mapper/%s_L%u_crypt", d->o.name, depth);
	else
		snprintf(buf, size, "/dev/mapper/%s_crypt", d->o.name);
}

/* A block device by number, for holding it open. */
static int open_devno(const char *majmin, int flags)
{
	char path[96], buf[256], *p, *nl;
	unsigned int maj, min;
	ssize_t n;
	int fd;

	if (sscanf(majmin, "%u:%u", &maj, &min) != 2)
		return -EINVAL;
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/uevent", maj, min);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -EIO;
	buf[n] = '\0';
	p = strstr(buf, "DEVNAME=");
	if (!p)
		return -ENODEV;
	p += strlen("DEVNAME=");
	nl = strchr(p, '\n');
	if (nl)
		*nl = '\0';
	snprintf(path, sizeof(path), "/dev/%s", p);
	fd = open(path, flags | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT) {
		/* no node (no devtmpfs): make a private one */
		snprintf(path, sizeof(path), QS_RUN_DIR "/.dev-%u-%u", maj, min);
		if (mknod(path, S_IFBLK | 0600, makedev(maj, min)) == 0 || errno == EEXIST) {
			fd = open(path, flags | O_CLOEXEC);
			unlink(path);
		}
	}
	return fd < 0 ? -errno : fd;
}

struct file_id {
	dev_t dev;
	ino_t ino;
};

/* The files the loop devices of the mapping hold (--hold), by device and
 * inode, into ids (at most n); returns how many. */
static unsigned int held_files(struct daemon *d, struct file_id *ids, unsigned int n)
{
	unsigned int k = 0;

	for (unsigned int i = 0; i < d->o.nholds && k < n; i++)
		if (d->hold_fd[i] >= 0 && loop_backing_file(d->hold_fd[i], &ids[k].dev, &ids[k].ino) == 0)
			k++;
	return k;
}

/* Every file of the chain must be one the mapping holds. */
static int verify_files(struct daemon *d)
{
	struct file_id held[DAEMON_MAX_HOLDS];
	unsigned int nheld = held_files(d, held, DAEMON_MAX_HOLDS);

	for (const struct image *l = d->img; l; l = l->backing) {
		const struct img_io *ios[2] = { &l->io, l->has_data_file ? &l->data_io : NULL };

		for (int k = 0; k < 2 && ios[k]; k++) {
			struct stat st;
			unsigned int i;
			int fd = file_io_fd(ios[k]);

			if (fd < 0 || fstat(fd, &st) < 0)
				return -EBADF;
			for (i = 0; i < nheld; i++)
				if (held[i].dev == st.st_dev && held[i].ino == st.st_ino)
					break;
			if (i == nheld) {
				log_err("%s is not the file the mapping %s holds (replaced since it was opened?): refused.",
					ios[k]->name, d->o.name);
				return -ESTALE;
			}
		}
	}
	return 0;
}

static int open_files(struct daemon *d)
{
	bool rw = !d->o.read_only;
	struct trust_rules rules = { .trust_names = d->o.trust_names };
	struct image_open_opts oo = {
		.backing_file = d->o.backing_file[0] ? d->o.backing_file : NULL,
		.data_file = d->o.data_file[0] ? d->o.data_file : NULL,
	};
	struct file_opener fo;
	struct stat st;
	char path[256];
	int r;

	for (unsigned int i = 0; i < d->o.nholds; i++) {
		d->hold_fd[i] = open_devno(d->o.holds[i], O_RDONLY);
		if (d->hold_fd[i] < 0)
			log_std("Cannot hold device %s open: %s (the image locks may go before the daemon is done).",
				d->o.holds[i], strerror(-d->hold_fd[i]));
	}
	file_opener_init(&fo, rw, &rules);
	/* `qcowsetup open` passes the files it checked; reattach finds them
	 * by name (and verify_files makes sure they are the held ones) */
	fo.given = d->o.given;
	fo.ngiven = d->o.ngiven;
	r = image_open(&fo.ops, d->o.image, &oo, &d->img);
	for (unsigned int i = 0; i < d->o.ngiven; i++)
		if (d->o.given[i].fd >= 0) {
			close(d->o.given[i].fd);
			d->o.given[i].fd = -1;
		}
	if (r)
		return r;
	r = verify_files(d);
	if (r)
		return r;
	d->f.meta_fd = file_io_fd(&d->img->io);
	if (rw && d->img->format != IMG_FMT_QCOW2) {
		log_err("%s: only qcow2 images need the daemon to be written.", d->o.image);
		return -ENOTSUP;
	}
	/* where each layer's plaintext data comes from */
	for (struct image *l = d->img; l; l = l->backing) {
		unsigned int depth = (unsigned int)l->depth;
		struct chain_layer_io *lio = &d->lio[depth];
		int fd;

		if (rw && depth == 0)
			continue;
		if (l->crypt_method != IMG_CRYPT_NONE) {
			crypt_device(d, depth, path, sizeof(path));
			/* direct already, aligned or not (a block device) */
			fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
			if (fd < 0) {
				if (l->data_io.size < 512)
					continue;	/* an empty layer has no crypt device */
				r = -errno;
				log_err("Cannot open %s: %s.", path, strerror(-r));
				return r;
			}
			lio->by_guest = l->crypt_method == IMG_CRYPT_AES;
		} else {
			fd = dup(file_io_fd(&l->data_io));
			if (fd < 0)
				return -errno;
			/* read-only: nothing of it is written, through any fd */
			d->layer[depth].dfd = direct_twin(fd, l->path);
		}
		d->layer[depth].fd = fd;
		lio->data_pread = layer_pread;
		lio->opaque = &d->layer[depth];
	}
	if (!rw)
		return 0;
	/* the top layer's data: the image, its data file, or the crypt device */
	if (d->img->crypt_method == IMG_CRYPT_LUKS) {
		crypt_device(d, 0, path, sizeof(path));
		d->f.data_fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
		d->f.data_separate = true;
	} else if (d->img->has_data_file) {
		d->f.data_fd = dup(file_io_fd(&d->img->data_io));	/* opened read-write, verified */
		d->f.data_separate = true;
	} else {
		d->f.data_fd = dup(d->f.meta_fd);
	}
	if (d->f.data_fd < 0) {
		r = -errno;
		log_err("Cannot open the data of %s for writing: %s.", d->o.image, strerror(-r));
		return r;
	}
	/* data past the page cache where no page holds data and metadata
	 * both (clusters of a page at least; a data file holds data only):
	 * the kernel keeps requests coherent only where they do not share a
	 * page at the same time */
	if (d->img->crypt_method != IMG_CRYPT_LUKS && (d->img->has_data_file || d->img->cluster_size >= DIO_ALIGN))
		d->f.data_dfd = direct_twin(d->f.data_fd, d->o.image);
	d->f.data_direct = d->f.data_dfd >= 0;
	if (fstat(d->f.data_fd, &st) < 0)
		return -errno;
	return 0;
}

static int open_engine(struct daemon *d)
{
	struct qcow2_rw_ops ops;
	/* what open found in use: no second pass over the refcount blocks */
	struct qcow2_rw_opts o = { .resume = d->o.reattach >= 0, .used_end = d->o.used_end };
	struct stat st;
	int r;

	if (d->o.read_only) {
		/* reads of compressed clusters (and nothing else) */
		return chain_reader_open(d->img, d->lio, IMG_MAX_CHAIN_DEPTH, &d->f.chain);
	}
	if (d->img->backing) {
		r = chain_reader_open(d->img->backing, d->lio, IMG_MAX_CHAIN_DEPTH, &d->f.chain);
		if (r)
			return r;
	}
	d->f.mapped = daemon_mapped;
	d->f.kick = daemon_kick;
	d->f.mapped_opaque = d;
	file_rw_ops(&d->f, &ops);
	d->ops = ops;
	o.cache_bytes = DAEMON_CACHE_BYTES;
	/* ahead only where zeros cost no write: through the cipher (LUKS) every
	 * cluster would be encrypted twice, zeros then data (tests/bench
	 * bench-rw.sh under TCG: 0.4x the sequential first writes) */
	o.ahead_max = d->f.data_separate ? 0 : DAEMON_AHEAD_MAX;
	o.ahead_fresh_max = o.ahead_max ? DAEMON_AHEAD_FRESH_MAX : 0;
	/* and around random writes where new clusters are holes: metadata only */
	o.ahead_sparse = !d->f.data_separate;
	/* new clusters stay inside the file as extended at open, or inside
	 * the block device the image is written on (its size is no st_size) */
	if (fstat(d->f.meta_fd, &st) == 0 && !d->img->has_data_file)
		o.file_limit = S_ISBLK(st.st_mode) ? d->img->io.size : (uint64_t)st.st_size;
	if (d->img->has_data_file && fstat(d->f.data_fd, &st) == 0 && S_ISREG(st.st_mode))
		o.data_file_limit = (uint64_t)st.st_size;
	if (d->img->crypt_method == IMG_CRYPT_LUKS) {
		uint64_t dev_size = 0;

		/* inside the crypt device: it covers the file as it was at open,
		 * or as `qcowsetup resize` grew it (the file may be larger) */
		if (fd_size(d->f.data_fd, &dev_size))
			dev_size = 0;
		o.file_limit = dev_size & ~511ULL;
	}
	return qcow2_rw_open(d->img, &ops, &o, &d->rw);
}

/* Requests of at most DAEMON_BUF_SIZE (the kernel allows 32 MiB): set
 * before anything stacks on the device, which inherits the limit. */
static void limit_requests(struct daemon *d)
{
	char path[96], val[32];
	int fd, n;

	snprintf(path, sizeof(path), "/sys/block/nbd%d/queue/max_sectors_kb", d->nbd_index);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		goto fail;
	n = snprintf(val, sizeof(val), "%u", DAEMON_BUF_SIZE >> 10);
	if (write(fd, val, (size_t)n) != n) {
		close(fd);
		goto fail;
	}
	close(fd);
	return;
fail:
	log_err("%s: cannot limit the NBD request size to %u KiB (%s); larger requests will fail.", d->o.name,
		DAEMON_BUF_SIZE >> 10, strerror(errno));
}

int daemon_nbd_discards(struct daemon *d, bool on)
{
	unsigned int maj, min;
	int r;

	if (d->o.read_only)
		return 0;
	if (sscanf(d->slow_ref, "%u:%u", &maj, &min) != 2)
		return -ENODEV;
	r = sys_block_discard(maj, min, on);
	if (r)
		log_err("%s: cannot turn the discards of nbd%d %s: %s.", d->o.name, d->nbd_index, on ? "on" : "off",
			strerror(-r));
	return r;
}

static int connect_nbd(struct daemon *d)
{
	struct nbd_params p = {
		.size = d->img->size & ~511ULL,
		.block_size = 512,
		.read_only = d->o.read_only,
		/* the slow path does nothing with a discard (allowed); the flag
		 * cannot change on the live device, so whether it passes any is
		 * its queue limit's (daemon_nbd_discards: --allow-discards,
		 * refresh), as for the fast path's loop devices and dm-crypt's
		 * allow_discards */
		.trim = !d->o.read_only,
		.timeout = d->o.nbd_timeout,
		.dead_conn_timeout = 0,
		.backend = d->backend,
	};
	int kernel_end[DAEMON_MAX_LINKS];
	uint32_t maj, min;
	int r = 0;

	d->nlinks = MIN(MAX(d->o.nbd_connections, 1U), (unsigned int)DAEMON_MAX_LINKS);
	for (unsigned int i = 0; i < d->nlinks && !r; i++) {
		int sv[2];

		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
			r = -errno;
			d->nlinks = i;
			break;
		}
		d->links[i].sock = sv[0];
		kernel_end[i] = sv[1];
	}
	if (!r && d->o.reattach >= 0) {
		d->nbd_index = d->o.reattach;
		r = nbd_reconnect(d->nbd_index, kernel_end, d->nlinks, d->backend);
	} else if (!r) {
		r = nbd_connect(kernel_end, d->nlinks, &p, &d->nbd_index);
	}
	for (unsigned int i = 0; i < d->nlinks; i++)
		close(kernel_end[i]);
	if (r)
		return r;
	r = nbd_device_number(d->nbd_index, &maj, &min);
	if (r) {
		log_err("Cannot find the device number of nbd%d: %s.", d->nbd_index, strerror(-r));
		return r;
	}
	snprintf(d->slow_ref, sizeof(d->slow_ref), "%u:%u", maj, min);
	limit_requests(d);
	/* before anything stacks on it (a reattach: as the state file says);
	 * a failure is logged: discards then reach the daemon, which leaves
	 * the clusters as they are */
	daemon_nbd_discards(d, d->o.allow_discards);
	log_verbose("%s: slow path on nbd%d (%s), %u connection%s", d->o.name, d->nbd_index, d->slow_ref, d->nlinks,
		    d->nlinks == 1 ? "" : "s");
	return 0;
}

/* The state file, for `qcowsetup status` and `reattach`. */
static void write_state(struct daemon *d)
{
	int r = qs_state_write(&d->o, getpid(), d->nbd_index);

	if (r)
		log_std("%s: cannot write its state file: %s (reattach will not work).", d->o.name, strerror(-r));
}

/* sysvinit's shutdown (sendsigs) spares the processes listed here: the
 * daemon and its guardian must outlive the filesystems on the mapping. */
#define OMIT_DIR "/run/sendsigs.omit.d"

static void omit_path(const struct daemon *d, int which, char *buf, size_t size)
{
	snprintf(buf, size, OMIT_DIR "/qcowsetup-%s%s.pid", d->o.name, which ? "-guard" : "");
}

static void write_omit(struct daemon *d)
{
	pid_t pids[2] = { getpid(), d->guard_pid };
	char path[256];

	for (int i = 0; i < 2; i++) {
		FILE *f;

		if (pids[i] <= 0)
			continue;
		omit_path(d, i, path, sizeof(path));
		f = fopen(path, "we");	/* no directory: no sysvinit to tell */
		if (!f)
			continue;
		fprintf(f, "%d\n", (int)pids[i]);
		fclose(f);
	}
}

static void remove_state(struct daemon *d)
{
	char path[256];
	pid_t pid = 0;
	int nbd;

	/* after a commit the files are the new daemon's */
	if (qs_state_read(d->o.name, &pid, &nbd, NULL) == 0 && pid != getpid())
		return;
	qs_state_remove(d->o.name);
	for (int i = 0; i < 2; i++) {
		omit_path(d, i, path, sizeof(path));
		unlink(path);
	}
}

static void report(struct daemon *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(struct daemon *d, const char *fmt, ...)
{
	char buf[128];
	va_list ap;
	int n;

	if (d->o.ready_fd < 0)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > 0 && write(d->o.ready_fd, buf, (size_t)MIN((size_t)n, sizeof(buf) - 1)) < 0)
		log_dbg("cannot report to qcowsetup: %s", strerror(errno));
	close(d->o.ready_fd);
	d->o.ready_fd = -1;
}

/* The guardian: a process of its own (exec'd while the daemon has no other
 * thread yet), holding nothing but a pipe from the daemon. When the pipe
 * closes without the daemon's "B" (a clean exit), the daemon died: if it
 * died between the suspend and the resume of a table swap, the device
 * would hold the guest's I/O forever; resume it.
 * Its cost: exec'd, not a forked copy, it shares nothing with the daemon's
 * buffers and caches and holds ~0.6 MiB RSS (the libraries' pages it
 * touched). It must run while a device of the mapping is suspended: where
 * its files may sit on a mapping it locks itself whole, as the daemon used
 * to; elsewhere nothing (its ~0.2 MiB of anonymous memory would have to be
 * swapped out to a swap file on the very mapping whose daemon dies in a
 * table swap; locking it page by page costs it 1.8 MiB RSS of libc, since
 * walking its maps pulls libc's pages in).
 *
 * One process per mapping, not one for all (as dmeventd serves all of
 * lvm2's devices): the daemon parses untrusted images and serves one
 * guest's disk; in one process a crash, a hang in a table swap, or a bug
 * that a hostile image triggers would stop the slow path of every mapping of
 * the host at once, and one image's parser would share an address space
 * with every other guest's metadata and keys. Per mapping the cost is now
 * ~3 MiB locked (memlock.c: the I/O buffer, the metadata caches, the code of
 * the I/O path) and two processes; a shared process would save the shared
 * libraries' pages, not the buffers and caches, which each mapping needs
 * anyway. */
static int guard_main(struct daemon_args *o)
{
	bool clean = false;
	char buf[16];

	for (;;) {
		ssize_t n = read(o->guard_fd, buf, sizeof(buf));

		if (n > 0) {
			clean = clean || memchr(buf, 'B', (size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		break;
	}
	if (!clean) {
		log_std("%s: the daemon died", o->name);
		daemon_resume_suspended(o->name, o->id);
	}
	return 0;
}

static void start_guard(struct daemon *d)
{
	int p[2];
	pid_t pid;

	if (pipe2(p, O_CLOEXEC) < 0)
		return;
	pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return;
	}
	if (pid == 0) {
		static struct daemon_argv argv;
		struct daemon_args g;

		/* nothing but the read end: no loop device, no crypt device */
		if (p[0] == 3)
			fcntl(3, F_SETFD, 0);	/* dup2(3, 3) would keep O_CLOEXEC */
		else
			dup2(p[0], 3);
		close_range(4, ~0U, 0);
		daemon_args_init(&g);
		memcpy(g.name, d->o.name, sizeof(g.name));
		memcpy(g.id, d->o.id, sizeof(g.id));
		g.guard_fd = 3;
		if (daemon_args_format(&g, false, &argv) == 0)
			execv("/proc/self/exe", argv.v);
		_exit(127);
	}
	close(p[0]);
	d->guard_pipe = p[1];
	d->guard_pid = pid;
}

static void dismiss_guard(struct daemon *d)
{
	if (d->guard_pipe < 0)
		return;
	if (write(d->guard_pipe, "B", 1) != 1)
		log_dbg("guardian: %s", strerror(errno));
	close(d->guard_pipe);
	d->guard_pipe = -1;
}

static bool top_exists(struct daemon *d)
{
	struct dm_dev_info info;

	return dm_device_info(d->o.name, &info) || info.exists;
}

/* The end of a clean session: flush, clear the dirty bit, give the file
 * back the size it needs. */
static int finish(struct daemon *d)
{
	uint64_t used_end = 0, size;
	struct stat st;
	bool gone;
	int r = 0;

	if (!d->rw)
		return 0;
	/* the fast path gone, nothing writes into what was mapped ahead */
	gone = !top_exists(d);
	pthread_mutex_lock(&d->lock);
	if (gone)
		qcow2_rw_release_ahead(d->rw);
	r = qcow2_rw_close(d->rw, &used_end);
	d->rw = NULL;
	pthread_mutex_unlock(&d->lock);
	if (r) {
		log_err("%s: the image could not be closed cleanly: %s; `qemu-img check` will tell.", d->o.image,
			strerror(-r));
		return r;
	}
	if (!d->img->has_data_file && fstat(d->f.meta_fd, &st) == 0) {
		size = MAX(used_end, d->o.keep_size);
		if (size && size < (uint64_t)st.st_size) {
			if (ftruncate(d->f.meta_fd, (off_t)size) < 0 || fsync(d->f.meta_fd) < 0)
				log_std("%s: cannot give the file back its size: %s.", d->o.image, strerror(errno));
			else
				log_dbg("%s: file truncated to %" PRIu64 " bytes", d->o.image, size);
		}
	}
	log_verbose("%s: closed cleanly", d->o.image);
	return 0;
}


static void close_dio(int *fd, int *dfd)
{
	if (*fd >= 0)
		close(*fd);
	if (*dfd >= 0)
		close(*dfd);
	*fd = *dfd = -1;
}

/* Close what holds the crypt devices (not the loop devices). */
static void close_io(struct daemon *d)
{
	chain_reader_free(d->f.chain);
	d->f.chain = NULL;
	close_dio(&d->f.data_fd, &d->f.data_dfd);
	for (unsigned int i = 0; i < IMG_MAX_CHAIN_DEPTH; i++)
		close_dio(&d->layer[i].fd, &d->layer[i].dfd);
}

static void cleanup(struct daemon *d)
{
	chain_reader_free(d->f.chain);
	qcow2_rw_free(d->rw);
	if (d->stack)
		dm_stack_free(d->stack);
	run_list_free(&d->runs);
	image_free(d->img, &file_io_opener);
	close_dio(&d->f.data_fd, &d->f.data_dfd);
	for (unsigned int i = 0; i < IMG_MAX_CHAIN_DEPTH; i++)
		close_dio(&d->layer[i].fd, &d->layer[i].dfd);
	for (unsigned int i = 0; i < DAEMON_MAX_LINKS; i++) {
		if (d->links[i].sock >= 0)
			close(d->links[i].sock);
		pthread_mutex_destroy(&d->links[i].rx);
		pthread_mutex_destroy(&d->links[i].tx);
	}
	for (unsigned int i = 0; i < d->nservers; i++) {
		free(d->servers[i].buf);
		qcow2_rw_op_free(d->servers[i].op);
	}
	free(d->queue);
	free(d->queue_spare);
	free(d->buf);
	/* the loop devices last: the locks go with them */
	for (unsigned int i = 0; i < d->o.nholds; i++)
		if (d->hold_fd[i] >= 0)
			close(d->hold_fd[i]);
	dm_release();
}

static void init_daemon(struct daemon *d)
{
	d->f.meta_fd = d->f.data_fd = d->f.data_dfd = d->guard_pipe = d->ctl_fd = -1;
	d->nbd_index = -1;
	for (unsigned int i = 0; i < IMG_MAX_CHAIN_DEPTH; i++)
		d->layer[i].fd = d->layer[i].dfd = -1;
	for (unsigned int i = 0; i < DAEMON_MAX_HOLDS; i++)
		d->hold_fd[i] = -1;
	for (unsigned int i = 0; i < DAEMON_MAX_LINKS; i++) {
		d->links[i].sock = -1;
		d->links[i].result = -ECONNRESET;
		pthread_mutex_init(&d->links[i].rx, NULL);
		pthread_mutex_init(&d->links[i].tx, NULL);
	}
	run_list_init(&d->runs);
	pthread_mutex_init(&d->lock, NULL);
	pthread_mutex_init(&d->buf_lock, NULL);
	pthread_cond_init(&d->cond, NULL);
	pthread_cond_init(&d->op_cond, NULL);
}

/* The process itself: signals, buffers, memory lock, I/O flusher, the
 * guardian. */
static int prepare_process(struct daemon *d, const char *argv0)
{
	struct sigaction sa = { .sa_handler = SIG_IGN };

	daemon_memory_setup();

	snprintf(d->backend, sizeof(d->backend), "qcowsetup:%.*s", DM_MAPPING_NAME_MAX, d->o.name);
	/* SIGTERM from a shutdown must not cut the disk's slow path */
	sigaction(SIGPIPE, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	if (argv0[0] != '@')
		log_dbg("started without '@' in argv[0]: not protected from switch_root");
	if (mkdir(QS_RUN_DIR, 0700) < 0 && errno != EEXIST)
		log_dbg("cannot create " QS_RUN_DIR ": %s", strerror(errno));

	/* written now: present, so locked once the mapping is up */
	d->buf = aligned_alloc(4096, DAEMON_BUF_SIZE);
	d->queue = calloc(DAEMON_REMAP_QUEUE, sizeof(*d->queue));
	d->queue_spare = calloc(DAEMON_REMAP_QUEUE, sizeof(*d->queue_spare));
	if (!d->buf || !d->queue || !d->queue_spare)
		return -ENOMEM;
	memset(d->buf, 0, DAEMON_BUF_SIZE);
	memset(d->queue, 0, DAEMON_REMAP_QUEUE * sizeof(*d->queue));
	memset(d->queue_spare, 0, DAEMON_REMAP_QUEUE * sizeof(*d->queue_spare));
	daemon_prefault_stack(128 << 10);
	if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0)
		log_dbg("PR_SET_IO_FLUSHER: %s", strerror(errno));
	/* before any thread: the guardian resumes what a killed daemon left
	 * suspended */
	if (!d->o.read_only)
		start_guard(d);
	return 0;
}

/* The image, the NBD device and its server, the device stack. */
static int bring_up(struct daemon *d)
{
	int r;

	r = open_files(d);
	if (!r)
		r = open_engine(d);
	if (!r)
		r = connect_nbd(d);
	/* serve before anything opens the NBD device: the kernel reads its
	 * partition table at the first open (the table load below), udev
	 * probes it */
	if (!r)
		r = daemon_servers_start(d);
	if (!r)
		r = daemon_stack_setup(d);
	return r;
}

/* Undo a failed bring_up and tell `qcowsetup open`. */
static void abandon(struct daemon *d, int r)
{
	report(d, "ERROR %d\n", -r);
	if (d->nbd_index >= 0 && d->o.reattach < 0)
		nbd_disconnect(d->nbd_index);
	daemon_servers_stop(d);
	if (d->rw) {
		/* nothing was written: undo the header changes */
		qcow2_rw_close(d->rw, NULL);
		d->rw = NULL;
	}
}

/* Ready: serve and remap until the close, then close the image. */
static int serve(struct daemon *d)
{
	int r, devnull;

	daemon_control_open(d);	/* before READY: a resume that reattached uses it */
	daemon_lock_resident();
	report(d, "READY nbd%d\n", d->nbd_index);
	write_state(d);
	write_omit(d);
	log_std("%s: %s mapped %s (slow path nbd%d)%s", d->o.name, d->o.image,
		d->o.read_only ? "read-only" : "read-write", d->nbd_index, d->o.reattach >= 0 ? ", reattached" : "");
	daemon_log_ready();
	devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (devnull >= 0) {
		dup2(devnull, 0);
		dup2(devnull, 1);
		dup2(devnull, 2);
		close(devnull);
	}
	daemon_remap_loop(d);	/* until the server stops */
	daemon_control_close(d);
	daemon_servers_join(d);
	r = d->serve_result;
	if (r == 0)
		r = finish(d);
	else
		finish(d);
	remove_state(d);
	log_std("%s: daemon exits%s", d->o.name, r ? " after an error" : "");
	if (d->top_gone || !top_exists(d)) {
		/* the top is gone (a deferred close: nobody else will remove the
		 * rest; or a close racing with a segment made by the last round) */
		close_io(d);
		daemon_remove_leftovers(d);
	}
	return r;
}

int main(int argc, char **argv)
{
	static struct daemon dd;
	struct daemon *d = &dd;
	int r;

	init_daemon(d);
	if (daemon_args_parse(argc, argv, &d->o)) {
		fprintf(stderr, "qcowsetup-daemon is started by `qcowsetup open`; see the head of src/daemon/main.c.\n");
		return 1;
	}
	log_name = d->o.name;
	openlog("qcowsetup-daemon", LOG_PID | LOG_NDELAY, LOG_DAEMON);
	qs_log_set_callback(log_to_syslog, NULL);
	qs_log_set_level(d->o.debug ? QS_LOG_DEBUG : QS_LOG_VERBOSE);
	if (d->o.guard_fd >= 0) {
		to_stderr = false;
		daemon_lock_guardian();
		return guard_main(&d->o);
	}
	r = prepare_process(d, argv[0]);
	if (!r)
		r = bring_up(d);
	if (r)
		abandon(d, r);
	else
		r = serve(d);
	dismiss_guard(d);
	cleanup(d);
	return r ? 1 : 0;
}
