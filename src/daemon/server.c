/* The NBD server loop: one request at a time, in the order the kernel sends
 * them (it does not need replies in order, and a single queue keeps
 * allocation simple: a write that allocates a cluster is complete, metadata
 * included in the cache, before the next request looks at that cluster).
 *
 * The engine lock is taken per request; the remap thread takes it only to
 * write back metadata and collect new mappings, never across a
 * device-mapper call, so a table reload never waits for this thread while
 * this thread waits for it (see remap.c for the whole argument). */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "nbd.h"
#include "util.h"

#define MAX_LOGGED_ERRORS 20

/* 1: read all; 0: end of file before anything; -errno otherwise. */
static int read_full(int fd, void *buf, size_t len)
{
	uint8_t *p = buf;
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(fd, p + got, len - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return got ? -ECONNRESET : 0;
		got += (size_t)n;
	}
	return 1;
}

static int write_full(int fd, struct iovec *iov, int iovcnt)
{
	while (iovcnt) {
		ssize_t n = writev(fd, iov, iovcnt);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		while (n > 0 && iovcnt) {
			if ((size_t)n >= iov->iov_len) {
				n -= (ssize_t)iov->iov_len;
				iov++;
				iovcnt--;
			} else {
				iov->iov_base = (uint8_t *)iov->iov_base + n;
				iov->iov_len -= (size_t)n;
				n = 0;
			}
		}
	}
	return 0;
}

static int reply(struct daemon *d, const struct nbd_req *req, int error, const void *data, size_t len)
{
	uint8_t hdr[NBD_REPLY_SIZE];
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)data, len } };

	nbd_format_reply(hdr, req, error);
	return write_full(d->sock, iov, error || !len ? 1 : 2);
}

/* Discard the payload of a write we refuse. */
static int drain(struct daemon *d, uint32_t len)
{
	while (len) {
		size_t n = MIN((size_t)len, (size_t)DAEMON_BUF_SIZE);
		int r = read_full(d->sock, d->buf, n);

		if (r <= 0)
			return r ? r : -ECONNRESET;
		len -= (uint32_t)n;
	}
	return 0;
}

static void log_failure(struct daemon *d, const char *what, const struct nbd_req *req, int r)
{
	static unsigned int logged;

	if (logged < MAX_LOGGED_ERRORS)
		log_err("%s: %s of %" PRIu32 " bytes at %" PRIu64 " failed: %s.", d->o.name, what, req->len, req->from,
			strerror(-r));
	else if (logged == MAX_LOGGED_ERRORS)
		log_err("%s: more I/O errors; not logging them any more.", d->o.name);
	logged++;
}

/* After the writer worked (engine lock held): the first time a metadata
 * write or flush failed, say what that means. From then on the writer
 * refuses writes and flushes, so nothing is acknowledged that might not be
 * durable; status shows it (remap.c writes it into the stats file). */
void daemon_check_broken(struct daemon *d)
{
	if (d->broken || !d->rw || !qcow2_rw_is_broken(d->rw))
		return;
	d->broken = true;
	log_err("%s: the image's metadata could not be written: writes to new clusters and flushes fail from now on, reads go on; close the mapping and run `qemu-img check` on %s.",
		d->o.name, d->o.image);
}

/* A new socket for the NBD device after the kernel shut ours down (a request
 * timed out). Fails when the device is being disconnected. */
static int reconnect(struct daemon *d)
{
	int sv[2], r;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return -errno;
	r = nbd_reconnect(d->nbd_index, sv[1], d->backend);
	close(sv[1]);
	if (r) {
		close(sv[0]);
		return r;
	}
	close(d->sock);
	d->sock = sv[0];
	log_std("%s: nbd%d reconnected after a timeout", d->o.name, d->nbd_index);
	return 0;
}

static int handle(struct daemon *d, const struct nbd_req *req)
{
	uint64_t size = d->img->size & ~511ULL;
	bool in_range = req->from <= size && req->len <= size - req->from;
	int r = 0;

	switch (req->command) {
	case NBD_REQ_READ:
		if (!in_range || req->len > DAEMON_BUF_SIZE)
			return reply(d, req, EINVAL, NULL, 0);
		pthread_mutex_lock(&d->lock);
		if (d->rw)
			r = qcow2_rw_read(d->rw, d->buf, req->len, req->from);
		else
			r = chain_read(d->f.chain, d->buf, req->len, req->from);
		pthread_mutex_unlock(&d->lock);
		if (r) {
			log_failure(d, "read", req, r);
			return reply(d, req, -r, NULL, 0);
		}
		return reply(d, req, 0, d->buf, req->len);
	case NBD_REQ_WRITE:
		if (!in_range || req->len > DAEMON_BUF_SIZE || !d->rw) {
			r = drain(d, req->len);
			if (r)
				return r;
			return reply(d, req, d->rw ? EINVAL : EROFS, NULL, 0);
		}
		r = read_full(d->sock, d->buf, req->len);
		if (r <= 0)
			return r ? r : -ECONNRESET;
		pthread_mutex_lock(&d->lock);
		r = qcow2_rw_write(d->rw, d->buf, req->len, req->from);
		if (r == 0 && req->fua)
			r = qcow2_rw_flush(d->rw);
		daemon_check_broken(d);
		pthread_mutex_unlock(&d->lock);
		if (r)
			log_failure(d, req->fua ? "write (FUA)" : "write", req, r);
		return reply(d, req, -r, NULL, 0);
	case NBD_REQ_FLUSH:
		pthread_mutex_lock(&d->lock);
		if (d->rw)
			r = qcow2_rw_flush(d->rw);
		daemon_check_broken(d);
		pthread_mutex_unlock(&d->lock);
		if (r)
			log_failure(d, "flush", req, r);
		return reply(d, req, -r, NULL, 0);
	case NBD_REQ_TRIM:
		/* allowed to do nothing: discarded data may read back as before */
		return reply(d, req, in_range ? 0 : EINVAL, NULL, 0);
	default:
		log_err("%s: unknown NBD command %u.", d->o.name, req->command);
		return reply(d, req, EINVAL, NULL, 0);
	}
}

int daemon_serve(struct daemon *d)
{
	uint8_t hdr[NBD_REQUEST_SIZE];
	struct nbd_req req;
	int r;

	for (;;) {
		r = read_full(d->sock, hdr, sizeof(hdr));
		if (r == 1 && nbd_parse_request(hdr, &req) < 0) {
			log_err("%s: garbage on the NBD socket.", d->o.name);
			r = -EPROTO;
		}
		if (r == 1 && req.command == NBD_REQ_DISC) {
			log_verbose("%s: disconnect requested", d->o.name);
			return 0;
		}
		if (r == 1)
			r = handle(d, &req);
		else if (r == 0)
			r = -ECONNRESET;
		if (r == 0)
			continue;
		/* the socket is gone: a timeout (reconnect) or the end */
		if (d->detached) {
			log_verbose("%s: detached from nbd%d", d->o.name, d->nbd_index);
			return 0;
		}
		log_verbose("%s: NBD socket: %s", d->o.name, strerror(-r));
		if (!d->quit && reconnect(d) == 0)
			continue;
		return -ECONNRESET;
	}
}
