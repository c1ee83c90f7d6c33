/* The NBD server: max(nlinks, 2) threads over the device's nlinks
 * connections (thread i serves link i % nlinks). The kernel sends each
 * request on the connection of the submitting CPU's queue and needs no
 * reply in order: the threads of a link take turns reading a request (its
 * payload too), then serve it while the next thread reads, and write their
 * replies under the link's tx lock.
 *
 * What runs in parallel and what does not: the writer (qcow2_rw) is one
 * caller at a time under the engine lock, and every allocation and
 * metadata update stays inside it: a write that allocates is planned
 * (clusters allocated) under the lock, moves its data (the copy-on-write
 * read, the cluster write) outside it as an op, and links its clusters
 * under it again; meanwhile the writer holds its clusters, so another
 * write to them waits (op_cond) and two writes to a new cluster never both
 * allocate, and QEMU's write order (qcow2_rw.h) is the writer's alone.
 * Also outside the lock go the data of clusters the writer will never move
 * (qcow2_rw_extent): reads and in-place writes of the layer's own clusters,
 * reads of the backing chain (but compressed clusters), zeros. A flush
 * takes the lock and covers every write acknowledged before it, on any
 * link: an in-place write is marked (qcow2_rw_data_written) once it
 * completed and before its reply.
 *
 * The engine lock is taken per request piece; the remap thread takes it
 * only to write back metadata and collect new mappings, never across a
 * device-mapper call, so a table reload never waits for a server while a
 * server waits for it (see remap.c for the whole argument). */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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

/* The reply to a request read from the link's socket of generation gen: an
 * error is left to the reader (the socket is dead: it reconnects). */
static void reply(struct daemon_link *l, unsigned int gen, const struct nbd_req *req, int error, const void *data,
		  size_t len)
{
	uint8_t hdr[NBD_REPLY_SIZE];
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)data, len } };

	nbd_format_reply(hdr, req, error);
	pthread_mutex_lock(&l->tx);
	if (l->gen == gen)
		write_full(l->sock, iov, error || !len ? 1 : 2);
	pthread_mutex_unlock(&l->tx);
}

/* Discard the payload of a write we refuse (rx held). */
static int drain(struct daemon_server *s, uint32_t len)
{
	while (len) {
		size_t n = MIN((size_t)len, s->buf_size);
		int r = read_full(s->link->sock, s->buf, n);

		if (r <= 0)
			return r ? r : -ECONNRESET;
		len -= (uint32_t)n;
	}
	return 0;
}

static void log_failure(struct daemon *d, const char *what, const struct nbd_req *req, int r)
{
	static unsigned int count;
	unsigned int logged = __atomic_fetch_add(&count, 1, __ATOMIC_RELAXED);

	if (logged < MAX_LOGGED_ERRORS)
		log_err("%s: %s of %" PRIu32 " bytes at %" PRIu64 " failed: %s.", d->o.name, what, req->len, req->from,
			strerror(-r));
	else if (logged == MAX_LOGGED_ERRORS)
		log_err("%s: more I/O errors; not logging them any more.", d->o.name);
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

/* Whether the kernel kept the other end of our socket (we closed our copy
 * of it): a reconfigure finding no dead connection to replace drops the
 * socket and still succeeds. */
static bool kernel_holds(int sock)
{
	struct pollfd p = { .fd = sock, .events = POLLRDHUP };

	return poll(&p, 1, 0) == 0;
}

/* A new socket for the link after the kernel shut ours down (a request
 * timed out), rx held. Fails when the device is being disconnected, or
 * when the kernel has no dead connection to replace for a while (it marks
 * them dead asynchronously). */
static int reconnect(struct daemon *d, struct daemon_link *l)
{
	int sv[2], old, r = 0;

	for (int tries = 0; !d->quit && tries < 20; tries++) {
		if (tries)
			usleep(100000);
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
			return -errno;
		r = nbd_reconnect(d->nbd_index, &sv[1], 1, d->backend);
		close(sv[1]);
		if (r == 0 && kernel_holds(sv[0]))
			break;
		close(sv[0]);
		if (r)
			return r;
		r = -ENOSPC;
	}
	if (r || d->quit)
		return r ? r : -ECONNRESET;
	pthread_mutex_lock(&l->tx);
	old = l->sock;
	l->sock = sv[0];
	l->gen++;
	pthread_mutex_unlock(&l->tx);
	close(old);
	log_std("%s: nbd%d connection %u reconnected after a timeout", d->o.name, d->nbd_index,
		(unsigned int)(l - d->links));
	return 0;
}

/* Read [from, from + len) into buf: the pieces the writer's lock must
 * cover under it, the others outside. */
static int read_data(struct daemon *d, uint8_t *buf, uint32_t len, uint64_t from)
{
	int r = 0;

	if (!d->rw) {
		/* read-only: the chain, top included (compressed clusters) */
		r = chain_read_direct(d->f.chain, buf, len, from);
		if (r == -EAGAIN) {
			pthread_mutex_lock(&d->lock);
			r = chain_read(d->f.chain, buf, len, from);
			pthread_mutex_unlock(&d->lock);
		}
		return r;
	}
	while (len && !r) {
		struct qcow2_rw_extent x;

		pthread_mutex_lock(&d->lock);
		r = qcow2_rw_extent(d->rw, from, len, false, &x);
		if (r == 0 && x.kind == QCOW2_EXTENT_ENGINE)
			r = qcow2_rw_read(d->rw, buf, x.len, from);
		pthread_mutex_unlock(&d->lock);
		if (r)
			break;
		if (x.kind == QCOW2_EXTENT_DATA) {
			__atomic_fetch_add(&d->slow_data, 1, __ATOMIC_RELAXED);
			r = d->ops.data_pread(d->ops.opaque, buf, x.len, x.host);
		}
		else if (x.kind == QCOW2_EXTENT_ZERO)
			memset(buf, 0, x.len);
		else if (x.kind == QCOW2_EXTENT_BACKING && (r = chain_read_direct(d->f.chain, buf, x.len, from)) == -EAGAIN) {
			pthread_mutex_lock(&d->lock);
			r = qcow2_rw_read(d->rw, buf, x.len, from);
			pthread_mutex_unlock(&d->lock);
		}
		buf += x.len;
		from += x.len;
		len -= (uint32_t)x.len;
	}
	return r;
}

/* Under the lock: begin the write of [from, from + len) through the writer
 * (an op, or whole), waiting while a write in flight holds its clusters or
 * a resize wants none in flight; or, *x DATA, nothing (in place). */
static int write_begin(struct daemon *d, struct qcow2_rw_op *op, const uint8_t *buf, uint32_t len, uint64_t from,
		       struct qcow2_rw_extent *x)
{
	for (;;) {
		int r = 0;

		if (!d->writes_paused) {
			r = qcow2_rw_extent(d->rw, from, len, true, x);
			if (r || x->kind == QCOW2_EXTENT_DATA)
				return r;
			r = qcow2_rw_write_begin(d->rw, op, buf, x->len, from);
			if (r != -EBUSY)
				return r;
		}
		pthread_cond_wait(&d->op_cond, &d->lock);
	}
}

/* Write buf at from: in place outside the lock where the writer allows it,
 * the rest (allocation, copy-on-write) planned by the writer under it, its
 * data moved outside it where the writer allows (an op). */
static int write_data(struct daemon_server *s, const uint8_t *buf, uint32_t len, uint64_t from, bool fua)
{
	struct daemon *d = s->d;
	int r = 0;

	while (len && !r) {
		struct qcow2_rw_extent x;

		pthread_mutex_lock(&d->lock);
		r = write_begin(d, s->op, buf, len, from, &x);
		if (r == 0 && x.kind != QCOW2_EXTENT_DATA)
			daemon_remap_wake(d);
		daemon_check_broken(d);
		pthread_mutex_unlock(&d->lock);
		if (r == 1) {
			r = qcow2_rw_op_io(s->op, false);
			pthread_mutex_lock(&d->lock);
			if (r == -EAGAIN)
				r = qcow2_rw_op_io(s->op, true);
			r = qcow2_rw_op_end(s->op, r);
			daemon_remap_wake(d);
			daemon_check_broken(d);
			pthread_cond_broadcast(&d->op_cond);
			pthread_mutex_unlock(&d->lock);
		} else if (r == 0 && x.kind == QCOW2_EXTENT_DATA) {
			__atomic_fetch_add(&d->slow_data, 1, __ATOMIC_RELAXED);
			r = d->ops.data_pwrite(d->ops.opaque, buf, x.len, x.host);
			pthread_mutex_lock(&d->lock);
			qcow2_rw_data_written(d->rw);	/* written or not: flush it */
			pthread_mutex_unlock(&d->lock);
		}
		buf += x.len;
		from += x.len;
		len -= (uint32_t)x.len;
	}
	if (r == 0 && fua) {
		pthread_mutex_lock(&d->lock);
		r = qcow2_rw_flush(d->rw);
		daemon_check_broken(d);
		pthread_mutex_unlock(&d->lock);
	}
	return r;
}

void daemon_writes_quiesce(struct daemon *d)
{
	d->writes_paused = true;
	while (d->rw && qcow2_rw_in_flight(d->rw))
		pthread_cond_wait(&d->op_cond, &d->lock);
}

void daemon_writes_resume(struct daemon *d)
{
	d->writes_paused = false;
	pthread_cond_broadcast(&d->op_cond);
}

/* Serve req (its payload, if any, in buf), reply on l (generation gen). */
static void handle(struct daemon_server *s, const struct nbd_req *req, uint8_t *buf, unsigned int gen)
{
	struct daemon *d = s->d;
	struct daemon_link *l = s->link;
	int r = 0;

	switch (req->command) {
	case NBD_REQ_READ:
		r = read_data(d, buf, req->len, req->from);
		if (r) {
			log_failure(d, "read", req, r);
			return reply(l, gen, req, -r, NULL, 0);
		}
		return reply(l, gen, req, 0, buf, req->len);
	case NBD_REQ_WRITE:
		r = write_data(s, buf, req->len, req->from, req->fua);
		if (r)
			log_failure(d, req->fua ? "write (FUA)" : "write", req, r);
		return reply(l, gen, req, -r, NULL, 0);
	case NBD_REQ_FLUSH:
		pthread_mutex_lock(&d->lock);
		if (d->rw)
			r = qcow2_rw_flush(d->rw);
		daemon_check_broken(d);
		pthread_mutex_unlock(&d->lock);
		if (r)
			log_failure(d, "flush", req, r);
		return reply(l, gen, req, -r, NULL, 0);
	default:	/* next_request answers the others */
		return reply(l, gen, req, EINVAL, NULL, 0);
	}
}

/* Read the next request of s's link (rx held) and its payload into *buf
 * (s->buf, or d->buf with buf_lock taken: *big). 1: a request to handle;
 * 0: answered already (refused); -errno: the socket is gone. */
static int next_request(struct daemon_server *s, struct nbd_req *req, uint8_t **buf, bool *big)
{
	struct daemon *d = s->d;
	uint8_t hdr[NBD_REQUEST_SIZE];
	uint64_t size;
	bool in_range;
	int r, refuse = 0;

	*big = false;
	r = read_full(s->link->sock, hdr, sizeof(hdr));
	if (r == 0)
		return -ECONNRESET;
	if (r < 0)
		return r;
	if (nbd_parse_request(hdr, req) < 0) {
		log_err("%s: garbage on the NBD socket.", d->o.name);
		return -EPROTO;
	}
	/* the size now, not when the wait for the header began: a resize may
	 * have grown the device meanwhile (the writer checks it again under
	 * the lock, for a shrink) */
	size = __atomic_load_n(&d->img->size, __ATOMIC_RELAXED) & ~511ULL;
	in_range = req->from <= size && req->len <= size - req->from;
	switch (req->command) {
	case NBD_REQ_DISC:
		return 1;
	case NBD_REQ_READ:
	case NBD_REQ_WRITE:
		if (!in_range || req->len > DAEMON_BUF_SIZE)
			refuse = EINVAL;
		else if (req->command == NBD_REQ_WRITE && !d->rw)
			refuse = EROFS;
		break;
	case NBD_REQ_FLUSH:
		return 1;
	case NBD_REQ_TRIM:
		/* allowed to do nothing: discarded data may read back as before */
		refuse = in_range ? 0 : EINVAL;
		reply(s->link, s->link->gen, req, refuse, NULL, 0);
		return 0;
	default:
		log_err("%s: unknown NBD command %u.", d->o.name, req->command);
		refuse = EINVAL;
		break;
	}
	if (refuse) {
		if (req->command == NBD_REQ_WRITE && (r = drain(s, req->len)))
			return r;
		reply(s->link, s->link->gen, req, refuse, NULL, 0);
		return 0;
	}
	*buf = s->buf;
	if (req->len > s->buf_size) {
		pthread_mutex_lock(&d->buf_lock);
		*buf = d->buf;
		*big = true;
	}
	if (req->command == NBD_REQ_WRITE && (r = read_full(s->link->sock, *buf, req->len)) != 1) {
		if (*big)
			pthread_mutex_unlock(&d->buf_lock);
		return r ? r : -ECONNRESET;
	}
	return 1;
}

static void serve_link(struct daemon_server *s)
{
	struct daemon *d = s->d;
	struct daemon_link *l = s->link;

	for (;;) {
		struct nbd_req req;
		unsigned int gen;
		uint8_t *buf = NULL;
		bool big = false;
		int r;

		pthread_mutex_lock(&l->rx);
		if (l->done) {
			pthread_mutex_unlock(&l->rx);
			return;
		}
		gen = l->gen;
		r = next_request(s, &req, &buf, &big);
		if (r == 1 && req.command == NBD_REQ_DISC) {
			log_verbose("%s: disconnect requested", d->o.name);
			l->done = true;
			l->result = 0;
		} else if (r < 0 && d->detached) {
			/* "detach" shut the sockets down: a clean end */
			log_verbose("%s: detached from nbd%d", d->o.name, d->nbd_index);
			l->done = true;
			l->result = 0;
		} else if (r < 0) {
			/* the socket is gone: a timeout (reconnect) or the end */
			log_verbose("%s: NBD socket: %s", d->o.name, strerror(-r));
			if (d->quit || reconnect(d, l) < 0)
				l->done = true;
		}
		pthread_mutex_unlock(&l->rx);
		if (r == 1 && req.command != NBD_REQ_DISC) {
			__atomic_store_n(&s->busy, 1, __ATOMIC_RELAXED);
			handle(s, &req, buf, gen);
			__atomic_store_n(&s->busy, 0, __ATOMIC_RELAXED);
			__atomic_fetch_add(&s->served, 1, __ATOMIC_RELAXED);
		}
		if (r == 1 && big)
			pthread_mutex_unlock(&d->buf_lock);
	}
}

static void *server_main(void *arg)
{
	struct daemon_server *s = arg;
	struct daemon *d = s->d;

	serve_link(s);
	pthread_mutex_lock(&d->lock);
	if (--d->nrunning == 0) {
		d->serve_result = -ECONNRESET;
		for (unsigned int i = 0; i < d->nlinks; i++)
			if (d->links[i].result == 0)
				d->serve_result = 0;
		d->stopping = true;
		pthread_cond_broadcast(&d->cond);
	}
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

int daemon_servers_start(struct daemon *d)
{
	d->nservers = MIN(MAX(d->nlinks, 2U), (unsigned int)DAEMON_MAX_SERVERS);
	for (unsigned int i = 0; i < d->nservers; i++) {
		struct daemon_server *s = &d->servers[i];
		void *stack = daemon_alloc_stack(DAEMON_STACK_SIZE);
		pthread_attr_t attr;
		int r;

		s->d = d;
		s->link = &d->links[i % d->nlinks];
		s->buf_size = DAEMON_SERVER_BUF;
		/* written now: present, so locked once the mapping is up (the
		 * op's buffer too) */
		s->buf = aligned_alloc(4096, s->buf_size);
		if (!stack || !s->buf)
			return -ENOMEM;
		/* no op: every allocating write whole under the lock */
		if (d->rw && !s->op)
			s->op = qcow2_rw_op_new(d->rw);
		memset(s->buf, 0, s->buf_size);
		pthread_attr_init(&attr);
		r = pthread_attr_setstack(&attr, stack, DAEMON_STACK_SIZE);
		pthread_mutex_lock(&d->lock);
		if (!r)
			r = pthread_create(&s->thread, &attr, server_main, s);
		if (!r)
			d->nrunning++;
		pthread_mutex_unlock(&d->lock);
		pthread_attr_destroy(&attr);
		if (r) {
			log_err("Cannot start a server thread: %s.", strerror(r));
			return -r;
		}
		s->started = true;
	}
	return 0;
}

void daemon_servers_join(struct daemon *d)
{
	for (unsigned int i = 0; i < d->nservers; i++) {
		if (d->servers[i].started)
			pthread_join(d->servers[i].thread, NULL);
		d->servers[i].started = false;
	}
}

unsigned int daemon_links_shutdown(struct daemon *d, int *err)
{
	unsigned int shut = 0;

	*err = 0;
	for (unsigned int i = 0; i < d->nlinks; i++) {
		struct daemon_link *l = &d->links[i];

		pthread_mutex_lock(&l->tx);	/* (reconnect replaces sock under it) */
		if (l->sock >= 0 && shutdown(l->sock, SHUT_RDWR) == 0)
			shut++;
		else if (!*err)
			*err = l->sock >= 0 ? -errno : -EBADF;
		pthread_mutex_unlock(&l->tx);
	}
	return shut;
}

void daemon_servers_stop(struct daemon *d)
{
	int err;

	d->quit = true;
	daemon_links_shutdown(d, &err);
	daemon_servers_join(d);
}

unsigned int daemon_servers_busy(struct daemon *d, uint64_t *served)
{
	unsigned int busy = 0;

	*served = 0;
	for (unsigned int i = 0; i < d->nservers; i++) {
		busy += __atomic_load_n(&d->servers[i].busy, __ATOMIC_RELAXED);
		*served += __atomic_load_n(&d->servers[i].served, __ATOMIC_RELAXED);
	}
	return busy;
}

uint32_t daemon_links_queued(struct daemon *d)
{
	uint32_t queued = 0;

	for (unsigned int i = 0; i < d->nlinks; i++) {
		struct daemon_link *l = &d->links[i];
		int n = 0;

		pthread_mutex_lock(&l->tx);	/* (reconnect replaces sock under it) */
		if (l->sock >= 0 && ioctl(l->sock, FIONREAD, &n) == 0 && n > 0)
			queued += (uint32_t)n;
		pthread_mutex_unlock(&l->tx);
	}
	return queued;
}
