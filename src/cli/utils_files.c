/* The files format, the key slot commands and convert write: QEMU's lock
 * bytes (lib/lock.c), new images written beside their final name and
 * renamed into place, progress on stderr (cmd_keys.h). */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cmd_keys.h"
#include "lock.h"
#include "log.h"
#include "loop.h"
#include "qcowsetup.h"
#include "util.h"

/* ---- QEMU's locks (lock.c) ---- */

/* Whether another open file description holds lock bytes that conflict with
 * a user of used that shares shared (lock_image's test, without a message). */
static int lock_conflicts(int fd, unsigned int used, unsigned int shared, bool *conflict)
{
	unsigned int others_use, others_unshare;
	int r;

	r = lock_image_query(fd, &others_use, &others_unshare);
	if (r < 0)
		return r;
	*conflict = (others_unshare & used) || (others_use & ~shared);
	return 0;
}

/* Whether a loop device is bound to the file of fd (qcowsetup mapped it). */
static bool fd_is_looped(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 && loop_find_by_file(st.st_dev, st.st_ino, NULL) > 0;
}

int keys_lock_for_write(int fd, const char *path, bool allow_mapped)
{
	bool conflict = false;
	int r;

	if (allow_mapped) {
		r = lock_conflicts(fd, LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE | LOCK_PERM_RESIZE,
				   LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE_UNCHANGED, &conflict);
		if (r == 0 && conflict && fd_is_looped(fd)) {
			/* the header is metadata: no mapping reads or writes it */
			log_verbose("%s is mapped (a loop device backs it): its lock bytes are the mapping's; "
				    "the volume key does not change.", path);
			return 0;
		}
	}
	/* as a read-write QEMU: refuses an image QEMU has open at all */
	return lock_image(fd, true, path);
}

int keys_refuse_header_writer(int fd, const char *path)
{
	unsigned int others_use, others_unshare;
	int r;

	r = lock_image_query(fd, &others_use, &others_unshare);
	if (r < 0) {
		log_err("Cannot test the locks of %s: %s", path, strerror(-r));
		return r;
	}
	if (others_use & LOCK_PERM_WRITE) {
		log_err("%s is open for writing (mapped read-write, or by QEMU): its qcow2 header is the "
			"writer's; close it first.", path);
		return -EBUSY;
	}
	return 0;
}

int keys_lock_for_read(int fd, const char *path, bool exclusive)
{
	bool conflict = false;
	int r;

	if (exclusive) {
		r = lock_conflicts(fd, LOCK_PERM_ALL, 0, &conflict);
		if (r < 0) {
			log_err("Cannot test the locks of %s: %s", path, strerror(-r));
			return r;
		}
		if (conflict) {
			log_err("%s is in use by another process (QEMU?) or mapped: close it before "
				"replacing it.", path);
			return -EBUSY;
		}
	}
	/* as a read-only QEMU: refuses writers and resizers meanwhile */
	return lock_image(fd, false, path);
}

/* ---- output files ---- */

#define TMP_SUFFIX ".qcowsetup-tmp"

static const int cleanup_signals[] = { SIGINT, SIGTERM, SIGHUP };
static char *volatile cleanup_path;
static struct sigaction cleanup_old[ARRAY_SIZE(cleanup_signals)];

static void cleanup_handler(int sig)
{
	char *p = cleanup_path;

	if (p)
		unlink(p);
	signal(sig, SIG_DFL);
	raise(sig);
}

static void cleanup_arm(char *path)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = cleanup_handler;
	sigemptyset(&sa.sa_mask);
	cleanup_path = path;
	for (size_t i = 0; i < ARRAY_SIZE(cleanup_signals); i++)
		sigaction(cleanup_signals[i], &sa, &cleanup_old[i]);
}

static void cleanup_disarm(void)
{
	if (!cleanup_path)
		return;
	for (size_t i = 0; i < ARRAY_SIZE(cleanup_signals); i++)
		sigaction(cleanup_signals[i], &cleanup_old[i], NULL);
	cleanup_path = NULL;
}

int out_file_create(const char *path, bool replace, struct out_file *o)
{
	struct stat st;
	int fd = -1, r, attempt;

	memset(o, 0, sizeof(*o));
	o->fd = -1;
	if (!replace && lstat(path, &st) == 0) {
		log_err("%s exists (--force overwrites it).", path);
		return -EEXIST;
	}
	o->path = strdup(path);
	if (!o->path || asprintf(&o->tmp, "%s%s", path, TMP_SUFFIX) < 0) {
		o->tmp = NULL;
		r = -ENOMEM;
		goto fail;
	}
	for (attempt = 0; attempt < 2; attempt++) {
		fd = open(o->tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd >= 0 || errno != EEXIST)
			break;
		/* left by a run that was killed, or in use by a live one */
		fd = open(o->tmp, O_RDWR | O_CLOEXEC);
		if (fd >= 0) {
			bool busy = false;

			r = lock_conflicts(fd, LOCK_PERM_ALL, 0, &busy);
			close(fd);
			fd = -1;
			if (r == 0 && busy) {
				log_err("%s is being written by another process.", o->tmp);
				r = -EBUSY;
				goto fail;
			}
		}
		log_verbose("Removing %s, left by an interrupted run.", o->tmp);
		if (unlink(o->tmp) < 0 && errno != ENOENT) {
			r = -errno;
			log_err("Cannot remove %s: %s", o->tmp, strerror(-r));
			goto fail;
		}
	}
	if (fd < 0) {
		r = -errno;
		log_err("Cannot create %s: %s", o->tmp, strerror(-r));
		goto fail;
	}
	o->fd = fd;
	cleanup_arm(o->tmp);
	/* neither QEMU nor another qcowsetup opens the file half-written */
	r = lock_image(fd, true, o->tmp);
	if (r < 0)
		goto fail;
	return 0;
fail:
	out_file_abort(o);
	return r;
}

static int sync_folder(const char *path)
{
	char *copy = strdup(path);
	int fd, r = 0;

	if (!copy)
		return -ENOMEM;
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0)
		r = -errno;
	if (fd >= 0)
		close(fd);
	free(copy);
	return r;
}

int out_file_commit(struct out_file *o, bool replace)
{
	int r;

	if (fsync(o->fd) < 0) {
		r = -errno;
		log_err("Cannot write %s: %s", o->tmp, strerror(-r));
		return r;
	}
	if (replace) {
		r = rename(o->tmp, o->path) < 0 ? -errno : 0;
	} else {
		r = renameat2(AT_FDCWD, o->tmp, AT_FDCWD, o->path, RENAME_NOREPLACE) < 0 ? -errno : 0;
		if (r == -EINVAL || r == -ENOSYS) {
			/* no RENAME_NOREPLACE here: link(2) does not replace either */
			r = link(o->tmp, o->path) < 0 ? -errno : 0;
			if (r == 0)
				unlink(o->tmp);
		}
	}
	if (r < 0) {
		log_err("Cannot rename %s to %s: %s", o->tmp, o->path, strerror(-r));
		return r;
	}
	cleanup_disarm();
	free(o->tmp);
	o->tmp = NULL;
	r = sync_folder(o->path);
	if (r < 0)
		log_err("Cannot sync the folder of %s: %s", o->path, strerror(-r));
	close(o->fd);
	o->fd = -1;
	free(o->path);
	o->path = NULL;
	return r;
}

void out_file_abort(struct out_file *o)
{
	if (o->tmp && o->fd >= 0)
		unlink(o->tmp);
	cleanup_disarm();
	if (o->fd >= 0)
		close(o->fd);
	o->fd = -1;
	free(o->tmp);
	free(o->path);
	o->tmp = o->path = NULL;
}

/* ---- progress ---- */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void progress_print(struct progress *p, bool final)
{
	double mib = 1024.0 * 1024.0, pct = p->total ? 100.0 * (double)p->done / (double)p->total : 100.0;
	double secs = (double)(now_ms() - p->start_ms) / 1000.0;
	int width = 30, fill = (int)(pct * width / 100.0);
	char bar[64];

	if (p->tty) {
		for (int i = 0; i < width; i++)
			bar[i] = i < fill ? '#' : '.';
		bar[width] = '\0';
		fprintf(stderr, "\r%s [%s] %5.1f%% %.1f/%.1f MiB%s", p->label, bar, pct,
			(double)p->done / mib, (double)p->total / mib, final ? "\n" : "");
	} else {
		fprintf(stderr, "%s: %.1f%% %.1f/%.1f MiB, %.1f s\n", p->label, pct,
			(double)p->done / mib, (double)p->total / mib, secs);
	}
	fflush(stderr);
}

void progress_start(struct progress *p, const char *label, uint64_t total)
{
	memset(p, 0, sizeof(*p));
	p->tty = isatty(STDERR_FILENO);
	p->on = !opt.quiet && (opt.progress || p->tty);
	p->label = label;
	p->total = total;
	p->start_ms = p->last_ms = now_ms();
	if (p->on && p->tty)
		progress_print(p, false);
}

void progress_update(struct progress *p, uint64_t done)
{
	int64_t t;

	p->done = done;
	if (!p->on)
		return;
	t = now_ms();
	if (t - p->last_ms < (p->tty ? 200 : 1000))
		return;
	p->last_ms = t;
	progress_print(p, false);
}

void progress_end(struct progress *p, bool ok)
{
	if (!p->on)
		return;
	if (ok) {
		p->done = p->total;
		progress_print(p, true);
	} else if (p->tty) {
		fputc('\n', stderr);
	}
}
