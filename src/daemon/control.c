/* The daemon's end of the control channel (the socket and its protocol:
 * src/lib/control.h): a table of verbs, served from the main thread's remap
 * loop (daemon_control_poll between rounds), so that a verb may call
 * libdevmapper and never overlaps a table swap. That loop sleeps for
 * seconds when idle: a thread of its own (the waker) sleeps in poll on the
 * socket and wakes the loop when a connection waits.
 *
 * A new verb is one entry of `verbs` and its handler: the handler gets the
 * parsed request (its argument count already checked) and fills the reply's
 * text; it returns 0 or a negative errno (the reply's ERR). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "control.h"
#include "daemon.h"
#include "log.h"
#include "util.h"

#define CONTROL_READ_MS		1000	/* a client's time to send its line */
#define CONTROL_PER_POLL	8	/* connections served per round at most */
#define WAKER_STACK		(64U << 10)
#define WAKER_AGAIN_MS		20	/* a connection not taken yet: wake again */

struct verb {
	const char *name;
	unsigned int min_args, max_args;
	int (*run)(struct daemon *d, const struct control_request *req, char *text, size_t size);
};

static int verb_ping(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	(void)d;
	(void)req;
	snprintf(text, size, "%d", (int)getpid());
	return 0;
}

static int verb_state(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	(void)req;
	snprintf(text, size, "%s", d->suspended ? "suspended" : "active");
	return 0;
}

/* What a flush makes durable, made durable now: the devices are about to
 * be suspended and their keys wiped. */
static int verb_suspend(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	int r = 0;

	(void)req;
	(void)text;
	(void)size;
	pthread_mutex_lock(&d->lock);
	if (d->rw) {
		r = qcow2_rw_writeback(d->rw);
		if (!r)
			r = qcow2_rw_flush(d->rw);
	}
	if (!r)
		d->suspended = true;
	pthread_mutex_unlock(&d->lock);
	if (r)
		log_err("%s: cannot flush before the suspend: %s.", d->o.name, strerror(-r));
	else
		log_std("%s: suspended (no table swaps until resume)", d->o.name);
	return r;
}

static int verb_resume(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	(void)req;
	(void)text;
	(void)size;
	if (d->suspended)
		log_std("%s: resumed", d->o.name);
	d->suspended = false;
	return 0;
}

static int verb_refresh(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	bool on = !strcmp(req->args[0], "on"), was = d->o.allow_discards;
	int r;

	(void)text;
	(void)size;
	if (!on && strcmp(req->args[0], "off"))
		return -EINVAL;
	if (d->suspended)
		return -EBUSY;
	d->o.allow_discards = on;
	/* the NBD device's limit first: the top's tables take it at the reload */
	r = daemon_nbd_discards(d, on);
	if (!r)
		r = daemon_reload_top(d);
	if (r) {
		d->o.allow_discards = was;
		daemon_nbd_discards(d, was);
		daemon_reload_top(d);
		return r;
	}
	r = qs_state_write(&d->o, getpid(), d->nbd_index);
	if (r)
		log_std("%s: cannot rewrite its state file: %s (a reattach would start with the old discards).",
			d->o.name, strerror(-r));
	log_std("%s: refreshed, discards %s", d->o.name, on ? "on" : "off");
	return 0;
}

/* resize SIZE|+SIZE|-SIZE [shrink] [fail-step=K] (bytes): OK NEW_SIZE */
static int verb_resize(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	bool shrink = false;
	uint64_t new_size, k;
	int fail_step = 0, r;

	for (unsigned int i = 1; i < req->nargs; i++) {
		if (!strcmp(req->args[i], "shrink"))
			shrink = true;
		else if (!strncmp(req->args[i], "fail-step=", 10) && parse_u64(req->args[i] + 10, 0, &k) == 0 &&
			 k <= 10000)
			fail_step = (int)k;
		else
			return -EINVAL;
	}
	r = daemon_resize(d, req->args[0], shrink, fail_step, &new_size);
	if (!r || r == -ENOKEY)
		snprintf(text, size, "%" PRIu64, new_size);
	else if (r == -ENOTEMPTY)
		snprintf(text, size, "clusters past the new size are allocated (shrink the filesystem first)");
	else if (r == -EROFS)
		snprintf(text, size, "the mapping is read-only");
	else if (r == -EINVAL)
		snprintf(text, size, "a positive multiple of 512 bytes; smaller only with --shrink");
	return r;
}

/* The end of this daemon's session while the top device stays (snapshot:
 * qcowsetup holds it suspended, and a new daemon takes it over): what a
 * flush makes durable written now, then the NBD sockets shut down; the
 * server ends, and the daemon closes the image as at a close (dirty bit
 * cleared, the file given back its size) and exits. The NBD device stays,
 * without a server, for qcowsetup to disconnect (or a reattach). */
static int verb_detach(struct daemon *d, const struct control_request *req, char *text, size_t size)
{
	unsigned int shut;
	int r;

	r = verb_suspend(d, req, text, size);
	if (r)
		return r;
	d->quit = true;
	d->detached = true;
	shut = daemon_links_shutdown(d, &r);
	if (r) {
		if (!shut)	/* nothing changed: the daemon serves on */
			d->quit = d->detached = false;
		log_err("%s: cannot detach: %s.", d->o.name, strerror(-r));
		return r;
	}
	log_std("%s: detaching (snapshot)", d->o.name);
	return 0;
}

static const struct verb verbs[] = {
	{ "ping", 0, 0, verb_ping },
	{ "state", 0, 0, verb_state },
	{ "suspend", 0, 0, verb_suspend },
	{ "resume", 0, 0, verb_resume },
	{ "refresh", 1, 1, verb_refresh },
	{ "resize", 1, 3, verb_resize },
	{ "detach", 0, 0, verb_detach },
};

static void wake_loop(struct daemon *d)
{
	pthread_mutex_lock(&d->lock);
	pthread_cond_signal(&d->cond);
	pthread_mutex_unlock(&d->lock);
}

/* Until cancelled (poll and nanosleep are its cancellation points, where it
 * holds no lock): a connection waiting wakes the remap loop, again every
 * WAKER_AGAIN_MS until the loop took it (a wakeup during a round is lost). */
static void *waker_main(void *arg)
{
	struct daemon *d = arg;
	const struct timespec again = { .tv_nsec = WAKER_AGAIN_MS * 1000000L };
	struct pollfd pfd = { .fd = d->ctl_fd, .events = POLLIN };

	for (;;) {
		if (poll(&pfd, 1, -1) <= 0)
			continue;
		do {
			wake_loop(d);
			nanosleep(&again, NULL);
		} while (poll(&pfd, 1, 0) > 0);
	}
	return NULL;
}

static void start_waker(struct daemon *d)
{
	void *stack = daemon_alloc_stack(WAKER_STACK);
	pthread_attr_t attr;
	int r;

	if (!stack) {
		log_std("%s: no control waker: %s (control requests wait for the remap loop's tick).", d->o.name,
			strerror(ENOMEM));
		return;
	}
	pthread_attr_init(&attr);
	r = pthread_attr_setstack(&attr, stack, WAKER_STACK);
	if (!r)
		r = pthread_create(&d->waker, &attr, waker_main, d);
	pthread_attr_destroy(&attr);
	if (r)
		log_std("%s: no control waker: %s (control requests wait for the remap loop's tick).", d->o.name,
			strerror(r));
	d->waker_running = r == 0;
}

static void stop_waker(struct daemon *d)
{
	if (!d->waker_running)
		return;
	pthread_cancel(d->waker);
	pthread_join(d->waker, NULL);
	d->waker_running = false;
}

int daemon_control_open(struct daemon *d)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	mode_t old;
	int fd, r;

	r = control_socket_path(sa.sun_path, sizeof(sa.sun_path), d->o.name);
	if (r)
		return r;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	unlink(sa.sun_path);	/* of a daemon that died */
	old = umask(0177);
	r = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ? -errno : 0;
	umask(old);
	if (!r && (chmod(sa.sun_path, 0600) < 0 || listen(fd, 8) < 0))
		r = -errno;
	if (r) {
		log_std("%s: no control socket %s: %s (suspend, resume and refresh will not work).", d->o.name,
			sa.sun_path, strerror(-r));
		close(fd);
		unlink(sa.sun_path);
		return r;
	}
	d->ctl_fd = fd;
	if (stat(sa.sun_path, &st) == 0)
		d->ctl_ino = st.st_ino;
	start_waker(d);
	return 0;
}

void daemon_control_close(struct daemon *d)
{
	char path[108];
	struct stat st;

	if (d->ctl_fd < 0)
		return;
	stop_waker(d);
	close(d->ctl_fd);
	d->ctl_fd = -1;
	if (control_socket_path(path, sizeof(path), d->o.name) == 0 && stat(path, &st) == 0 &&
	    st.st_ino == d->ctl_ino)
		unlink(path);
}

static int read_request(int fd, char *line, size_t size, size_t *len)
{
	size_t got = 0;

	while (got < size) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		ssize_t n;
		int r = poll(&pfd, 1, CONTROL_READ_MS);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r ? -errno : -ETIMEDOUT;
		n = read(fd, line + got, size - got);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			return n ? -errno : -EPROTO;
		got += (size_t)n;
		if (memchr(line, '\n', got)) {
			*len = (size_t)((char *)memchr(line, '\n', got) - line) + 1;
			return 0;
		}
	}
	return -EINVAL;	/* longer than a line */
}

static int dispatch(struct daemon *d, const char *line, size_t len, char *text, size_t size)
{
	struct control_request req;

	if (control_parse_request(line, len, &req))
		return -EINVAL;
	for (size_t i = 0; i < ARRAY_SIZE(verbs); i++) {
		if (strcmp(verbs[i].name, req.verb))
			continue;
		if (req.nargs < verbs[i].min_args || req.nargs > verbs[i].max_args)
			return -EINVAL;
		log_verbose("%s: control request %s", d->o.name, req.verb);
		return verbs[i].run(d, &req, text, size);
	}
	return -EOPNOTSUPP;
}

static void serve_one(struct daemon *d, int fd)
{
	char line[CONTROL_LINE_MAX], text[CONTROL_LINE_MAX] = "", reply[CONTROL_LINE_MAX + 16];
	struct ucred cred;
	socklen_t cl = sizeof(cred);
	size_t len = 0, n;
	int r;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0 || cl != sizeof(cred) || cred.uid != 0) {
		log_std("%s: control request from uid %d refused.", d->o.name, cl == sizeof(cred) ? (int)cred.uid : -1);
		r = -EPERM;
	} else {
		r = read_request(fd, line, sizeof(line), &len);
		if (!r)
			r = dispatch(d, line, len, text, sizeof(text));
	}
	n = control_format_reply(reply, sizeof(reply), r, text);
	if (send(fd, reply, n, MSG_NOSIGNAL) != (ssize_t)n)
		log_dbg("control: cannot send the reply: %s", strerror(errno));
}

void daemon_control_poll(struct daemon *d)
{
	for (int i = 0; d->ctl_fd >= 0 && i < CONTROL_PER_POLL; i++) {
		int fd = accept4(d->ctl_fd, NULL, NULL, SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				log_dbg("control: accept: %s", strerror(errno));
			return;
		}
		serve_one(d, fd);
		close(fd);
	}
}
