/* `qcowsetup resize NAME SIZE` in the daemon of a read-write mapping, which
 * owns the image's metadata: the request comes over the control socket
 * (control.c, verb "resize"), on the main thread between reload rounds.
 *
 * The steps, each a failure point for the tests (fail-step=K):
 *   1. growing: room for the new clusters: the image file grows by what the
 *      new guest space may need (qcow2_file_reserve) and its loop device
 *      takes the new size (LOOP_SET_CAPACITY); the writer may allocate up
 *      to there. A LUKS image's new clusters must stay inside its crypt
 *      device, whose key the daemon does not have: when the room it covers
 *      is short, the file and its loop device grow and the request ends
 *      with -ENOKEY and the size the crypt device must cover; qcowsetup
 *      loads the crypt table larger (src/lib/live.c, with the passphrase)
 *      and asks again, and step 1 then finds the room;
 *   2. growing: the NBD device (the slow path, guest offsets 1:1) takes the
 *      new size;
 *   3. the image: qcow2_rw_resize (qcow2_rw.h: the L1 table and the header
 *      in QEMU's order, zeros over a backing file, a shrink only past
 *      unallocated clusters);
 *   4. the stack rebuilt from the image and the top device (and segments)
 *      reloaded: the device shows the new size without being reopened.
 * Steps 1 and 2 only enlarge what is under the mapping, which stays correct
 * if the rest fails. When step 4 fails, the image goes back to its old
 * size (nothing can have been written past it through the old table). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "loop.h"
#include "nbd.h"
#include "sysutil.h"
#include "util.h"

struct resize_ctx {
	struct daemon *d;
	int step, fail_step;
};

/* The failure points of the tests (open's --debug-fail-step, for resize). */
static int step_at(struct resize_ctx *c, const char *what)
{
	c->step++;
	log_dbg("%s: resize step %d: %s", c->d->o.name, c->step, what);
	if (c->fail_step && c->step == c->fail_step) {
		log_err("%s: injected failure at resize step %d (%s).", c->d->o.name, c->step, what);
		return -EIO;
	}
	return 0;
}

/* The loop device (one the mapping holds) over the top image's file. */
static int top_loop_fd(struct daemon *d)
{
	struct stat st;

	if (fstat(d->f.meta_fd, &st) < 0)
		return -errno;
	for (unsigned int i = 0; i < d->o.nholds; i++) {
		dev_t dev;
		ino_t ino;

		if (d->hold_fd[i] >= 0 && loop_backing_file(d->hold_fd[i], &dev, &ino) == 0 && dev == st.st_dev &&
		    ino == st.st_ino)
			return d->hold_fd[i];
	}
	return -ENODEV;
}

/* The image file grown to target bytes (when smaller) and its loop device
 * given the new size. */
static int grow_file(struct daemon *d, uint64_t target)
{
	struct stat st;
	int fd, r;

	if (fstat(d->f.meta_fd, &st) < 0)
		return -errno;
	if ((uint64_t)st.st_size < target && ftruncate(d->f.meta_fd, (off_t)target) < 0) {
		r = -errno;
		log_err("%s: cannot grow the image file to %" PRIu64 " bytes: %s.", d->o.image, target, strerror(-r));
		return r;
	}
	fd = top_loop_fd(d);
	r = fd < 0 ? fd : loop_set_capacity(fd);
	if (r)
		log_err("%s: cannot give the loop device of %s its new size: %s.", d->o.name, d->o.image, strerror(-r));
	return r;
}

/* LUKS: new clusters must stay inside the crypt device, which covers the
 * file as open reserved it for the old size. The room the new size needs
 * (qcow2_file_reserve over what the file held before open) is either
 * there, or the file and its loop device grow and -ENOKEY asks qcowsetup
 * to load the crypt table larger (it has the key) and to ask again. */
static int crypt_room(struct daemon *d, uint64_t new_size, uint64_t *need)
{
	struct image tmp;
	uint64_t have = 0;
	int r;

	pthread_mutex_lock(&d->lock);
	tmp = *d->img;
	pthread_mutex_unlock(&d->lock);
	tmp.size = new_size;
	if (qcow2_file_reserve(&tmp, d->o.keep_size, need))
		return -EFBIG;
	r = fd_size(d->f.data_fd, &have);
	if (r)
		return r;
	have &= ~511ULL;
	if (have >= *need) {
		pthread_mutex_lock(&d->lock);
		qcow2_rw_file_grown(d->rw, have);
		pthread_mutex_unlock(&d->lock);
		log_verbose("%s: the crypt device (%" PRIu64 " bytes) has room for %" PRIu64 " bytes", d->o.name, have,
			    new_size);
		return 0;
	}
	r = grow_file(d, *need);
	if (r)
		return r;
	log_verbose("%s: the crypt device covers %" PRIu64 " bytes, %" PRIu64 " bytes needs %" PRIu64 ": its key is needed",
		    d->o.name, have, new_size, *need);
	return -ENOKEY;
}

static int grow_room(struct daemon *d, uint64_t old, uint64_t new_size, uint64_t *need)
{
	struct image tmp;
	uint64_t r_old, r_new, target;
	struct stat st;
	int r;

	if (d->img->crypt_method == IMG_CRYPT_LUKS && !d->img->has_data_file)
		return crypt_room(d, new_size, need);
	if (d->img->crypt_method == IMG_CRYPT_LUKS) {
		log_verbose("%s: the crypt device keeps its size: new clusters use the room reserved at open",
			    d->o.name);
		return 0;
	}
	if (fstat(d->f.meta_fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return 0;	/* a block device does not grow */
	pthread_mutex_lock(&d->lock);
	tmp = *d->img;
	pthread_mutex_unlock(&d->lock);
	tmp.size = old;
	r = qcow2_file_reserve(&tmp, 0, &r_old);
	tmp.size = new_size;
	if (!r)
		r = qcow2_file_reserve(&tmp, 0, &r_new);
	if (r || uadd64_overflow((uint64_t)st.st_size, r_new - r_old, &target))
		return -EFBIG;
	r = grow_file(d, target);
	if (r)
		return r;
	pthread_mutex_lock(&d->lock);
	qcow2_rw_file_grown(d->rw, target);
	pthread_mutex_unlock(&d->lock);
	log_verbose("%s: image file grown to %" PRIu64 " bytes", d->o.name, target);
	return 0;
}

static int grow_nbd(struct daemon *d, uint64_t new_size)
{
	char path[64], buf[32];
	uint64_t sectors = 0;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/sys/block/nbd%d/size", d->nbd_index);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (n > 0) {
			buf[n] = '\0';
			sectors = strtoull(buf, NULL, 10);
		}
	}
	if (sectors * 512 >= new_size)
		return 0;
	return nbd_set_size(d->nbd_index, new_size & ~511ULL, d->backend);
}

/* SIZE, +SIZE or -SIZE (bytes) against old. */
static int target_size(const char *arg, uint64_t old, uint64_t *out)
{
	int sign = arg[0] == '+' ? 1 : arg[0] == '-' ? -1 : 0;
	uint64_t v;

	if (parse_u64(arg + (sign != 0), 0, &v) < 0)
		return -EINVAL;
	if (sign > 0)
		return uadd64_overflow(old, v, out) ? -EFBIG : 0;
	if (sign < 0) {
		if (v >= old)
			return -EINVAL;
		*out = old - v;
		return 0;
	}
	*out = v;
	return 0;
}

int daemon_resize(struct daemon *d, const char *size_arg, bool shrink, int fail_step, uint64_t *new_size)
{
	struct resize_ctx c = { .d = d, .fail_step = fail_step };
	uint64_t old, size;
	int r;

	if (!d->rw) {
		log_err("%s: the mapping is read-only: it cannot be resized.", d->o.name);
		return -EROFS;
	}
	if (d->suspended || d->top_gone)
		return -EBUSY;
	pthread_mutex_lock(&d->lock);
	old = d->img->size;
	pthread_mutex_unlock(&d->lock);
	*new_size = old;
	r = target_size(size_arg, old, &size);
	if (r || size % 512 || !size) {
		log_err("%s: %s: the new size must be a positive multiple of 512 bytes.", d->o.name, size_arg);
		return r == -EFBIG ? r : -EINVAL;
	}
	if (size == old)
		return 0;
	if (size < old && !shrink) {
		log_err("%s: %" PRIu64 " bytes is smaller than the mapping (%" PRIu64 "): shrinking takes --shrink.",
			d->o.name, size, old);
		return -EINVAL;
	}
	if (size > old) {
		r = step_at(&c, "room for new clusters");
		if (!r)
			r = grow_room(d, old, size, new_size);
		if (!r)
			r = step_at(&c, "the slow-path device's size");
		if (!r)
			r = grow_nbd(d, size);
		/* (the kernel's new size gives the device its full discard
		 * limit back) */
		if (!r && !d->o.allow_discards)
			r = daemon_nbd_discards(d, false);
		if (r)
			return r;
	}
	r = step_at(&c, "the image's size");
	if (!r) {
		pthread_mutex_lock(&d->lock);
		daemon_writes_quiesce(d);
		r = qcow2_rw_resize(d->rw, size, shrink);
		daemon_writes_resume(d);
		pthread_mutex_unlock(&d->lock);
	}
	if (r)
		return r;
	r = step_at(&c, "reload the top device");
	if (!r)
		r = daemon_reload_all(d);
	if (r) {
		int r2;

		/* the old table still serves: the old size again */
		pthread_mutex_lock(&d->lock);
		daemon_writes_quiesce(d);
		r2 = qcow2_rw_resize(d->rw, old, true);
		daemon_writes_resume(d);
		pthread_mutex_unlock(&d->lock);
		if (r2)
			log_err("%s: the image keeps %" PRIu64 " bytes while the device shows %" PRIu64 ": %s.", d->o.name,
				size, old, strerror(-r2));
		return r;
	}
	*new_size = size;
	log_std("%s: resized from %" PRIu64 " to %" PRIu64 " bytes", d->o.name, old, size);
	return 0;
}
