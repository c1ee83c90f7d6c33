/* Reading passphrases and key files the way cryptsetup does
 * (lib/utils_keyfile / src/utils_password):
 *   - a terminal: prompt, echo off, the passphrase ends at the newline;
 *   - stdin that is not a terminal, without --key-file: up to the newline;
 *   - --key-file - (stdin) or a file: binary, the whole content unless
 *     --keyfile-size, after skipping --keyfile-offset bytes; at most 8 MiB;
 *   - a key file that is an AF_UNIX socket: what a key server sends when
 *     connected to, as systemd-cryptsetup reads crypttab's key files.
 * Every byte read lands in secure memory and is wiped.
 *
 * No passphrase at all (end of input before a byte, no answer within the
 * timeout) is -EPERM, the "no permission or bad passphrase" exit status
 * (2), as a wrong one: nothing was wrong with the device. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "options.h"
#include "keys.h"
#include "log.h"
#include "passphrase.h"
#include "util.h"

#define READ_CHUNK 4096

/* A growable buffer in secure memory. */
struct secbuf {
	char *p;
	size_t len;
	size_t cap;
};

static int secbuf_reserve(struct secbuf *b, size_t need)
{
	size_t cap;
	char *n;

	if (need <= b->cap)
		return 0;
	if (need > PASSPHRASE_MAX_SIZE + 1)
		return -EINVAL;
	cap = b->cap ? b->cap : 512;
	while (cap < need)
		cap = cap > (PASSPHRASE_MAX_SIZE + 1) / 2 ? PASSPHRASE_MAX_SIZE + 1 : cap * 2;
	n = secure_alloc(cap);
	if (!n)
		return -ENOMEM;
	if (b->len)
		memcpy(n, b->p, b->len);
	secure_free(b->p);	/* wipes the old copy */
	b->p = n;
	b->cap = cap;
	return 0;
}

static int secbuf_finish(struct secbuf *b, struct passphrase **out)
{
	int r = passphrase_from_buffer(b->p, b->len, out);

	secure_free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
	return r;
}

static bool is_stdin(const char *key_file)
{
	return !key_file || !strcmp(key_file, "-");
}

bool tools_passphrase_interactive(const struct passphrase_opts *opts)
{
	return is_stdin(opts->key_file) && isatty(STDIN_FILENO);
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for input on fd until deadline_ms (0 = forever). */
static int wait_input(int fd, int64_t deadline_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int64_t left;
	int r;

	if (!deadline_ms)
		return 0;
	for (;;) {
		left = deadline_ms - now_ms();
		if (left <= 0)
			return -ETIMEDOUT;
		r = poll(&pfd, 1, (int)MIN(left, (int64_t)INT32_MAX));
		if (r > 0)
			return 0;
		if (r == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}

/* ---- terminal ---- */

/* SIGTSTP is left alone: the shell saves and restores the terminal modes of
 * a stopped job. */
static const int tty_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT };

/* What the signal handler needs: set before echo is turned off. */
static volatile sig_atomic_t tty_restore_fd = -1;
static struct termios tty_saved;

static void tty_signal_handler(int sig)
{
	int fd = tty_restore_fd;

	if (fd >= 0) {
		tcsetattr(fd, TCSAFLUSH, &tty_saved);
		if (write(fd, "\n", 1) < 0) {
			/* nothing more to do in a signal handler */
		}
	}
	/* die (or stop) as the signal wants, with the terminal restored */
	signal(sig, SIG_DFL);
	raise(sig);
}

/* The terminal a prompt goes to, its echo turned off. */
struct tty {
	int in;			/* /dev/tty, or stdin */
	int out;		/* /dev/tty, or stderr */
	bool own_fd;
	bool handlers;
	bool echo_off;
	bool line_ended;	/* nothing of the prompt line is left open */
	struct sigaction old[ARRAY_SIZE(tty_signals)];
};

/* Finish the prompt line (echo is off, so a newline the user did not type
 * is not shown), before a message or on leaving. */
static void end_prompt_line(struct tty *t)
{
	if (!t->line_ended && write(t->out, "\n", 1) < 0)
		log_dbg("Cannot write to the terminal.");
	t->line_ended = true;
}

static int tty_echo_off(struct tty *t, enum passphrase_echo echo)
{
	struct sigaction sa;
	struct termios noecho;
	int r;

	t->line_ended = true;
	t->in = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
	t->own_fd = t->in >= 0;
	t->out = t->own_fd ? t->in : STDERR_FILENO;
	if (!t->own_fd)
		t->in = STDIN_FILENO;
	if (tcgetattr(t->in, &tty_saved) < 0) {
		r = -errno;
		log_err("Cannot read the terminal settings: %s", strerror(-r));
		return r;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = tty_signal_handler;
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < ARRAY_SIZE(tty_signals); i++)
		sigaction(tty_signals[i], &sa, &t->old[i]);
	t->handlers = true;
	tty_restore_fd = t->in;

	noecho = tty_saved;
	noecho.c_lflag &= ~(tcflag_t)ECHO;
	noecho.c_lflag |= ECHONL | ICANON;
	if (echo == PASSPHRASE_ECHO_ON) {
		noecho.c_lflag |= ECHO;
	} else if (echo == PASSPHRASE_ECHO_MASKED) {
		/* a byte at a time: read_line() writes the stars */
		noecho.c_lflag &= ~(tcflag_t)ICANON;
		noecho.c_cc[VMIN] = 1;
		noecho.c_cc[VTIME] = 0;
	}
	if (tcsetattr(t->in, TCSAFLUSH, &noecho) < 0) {
		r = -errno;
		log_err("Cannot turn off the terminal echo: %s", strerror(-r));
		return r;
	}
	t->echo_off = true;
	return 0;
}

static void tty_restore(struct tty *t)
{
	if (t->echo_off) {
		tcsetattr(t->in, TCSAFLUSH, &tty_saved);
		end_prompt_line(t);
	}
	if (t->handlers) {
		tty_restore_fd = -1;
		for (size_t i = 0; i < ARRAY_SIZE(tty_signals); i++)
			sigaction(tty_signals[i], &t->old[i], NULL);
	}
	if (t->own_fd)
		close(t->in);
}

/* A line of fd into b: up to the newline (not kept) or the end of input,
 * and at most max bytes (0: PASSPHRASE_MAX_SIZE, more is an error), one
 * byte at a time so that nothing past the newline is consumed; waiting
 * until deadline_ms (0: forever). *newline: the line ended with one. An
 * error is logged by the caller: -ETIMEDOUT, -EINVAL (too long), -errno of
 * the read (-EIO: none), -ENOMEM. */
/* A byte typed on a terminal without its line editing (password-echo=
 * masked): erase and kill edit b, shown as stars on out. Returns 1 when
 * the byte was taken, 0 when it is to be stored, -1 at the end of the
 * line (*c a newline) or of input (^D on an empty line). */
static int masked_key(int out, char *c, struct secbuf *b)
{
	if (*c == '\r')
		*c = '\n';
	if (*c == '\n')
		return -1;
	if (*c == 0x04)		/* ^D: the end of input on an empty line */
		return b->len ? 1 : -1;
	if (*c == 0x7f || *c == 0x08 || *c == 0x15) {
		/* erase one (backspace, delete) or all (^U) */
		while (b->len) {
			b->p[--b->len] = '\0';
			if (write(out, "\b \b", 3) != 3 || *c != 0x15)
				break;
		}
		return 1;
	}
	if (write(out, "*", 1) != 1)
		log_dbg("Cannot write to the terminal.");
	return 0;
}

static int read_line(int fd, uint64_t max, int64_t deadline_ms, struct secbuf *b, bool *newline, int mask_out)
{
	char c = 0;
	ssize_t n;
	int r = 0, m;

	*newline = false;
	for (;;) {
		r = wait_input(fd, deadline_ms);
		if (r < 0)
			break;
		n = read(fd, &c, 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = errno ? -errno : -EIO;
			break;
		}
		m = n > 0 && mask_out >= 0 ? masked_key(mask_out, &c, b) : 0;
		if (m > 0)
			continue;
		if (n == 0 || c == '\n' || m < 0) {
			*newline = n > 0 && c == '\n';
			break;
		}
		r = secbuf_reserve(b, b->len + 2);
		if (r < 0)
			break;
		b->p[b->len++] = c;
		if (b->len == max)
			break;
	}
	explicit_bzero(&c, sizeof(c));
	return r;
}

/* The end of read_line: its error logged (from: where the line came
 * from), or the passphrase. */
static int finish_line(int r, const char *from, struct secbuf *b, bool eof, struct passphrase **out)
{
	if (r == -ETIMEDOUT) {
		log_err("Timed out waiting for the passphrase.");
		r = -EPERM;
	} else if (r == -EINVAL) {
		log_err("The passphrase is longer than %u bytes.", PASSPHRASE_MAX_SIZE);
	} else if (r < 0 && r != -ENOMEM) {
		log_err("Error reading the passphrase%s: %s", from, strerror(-r));
	} else if (r == 0 && eof && !b->len) {
		log_err("Nothing to read on input.");
		r = -EPERM;
	} else if (r == 0) {
		r = secbuf_finish(b, out);
	}
	secure_free(b->p);
	b->p = NULL;
	return r;
}

static int read_terminal(const struct passphrase_opts *opts, struct passphrase **out)
{
	struct tty t = { .in = -1 };
	struct secbuf b = { 0 };
	bool newline = false;
	int r;

	if (opts->keyfile_offset) {
		log_err("Cannot use an offset with terminal input.");
		return -EINVAL;
	}
	r = tty_echo_off(&t, opts->echo);
	if (r == 0) {
		bool masked = opts->echo == PASSPHRASE_ECHO_MASKED;

		dprintf(t.out, "Enter passphrase for %s: ", opts->image_name ? opts->image_name : "image");
		t.line_ended = false;
		r = read_line(t.in, 0, opts->timeout ? now_ms() + (int64_t)opts->timeout * 1000 : 0, &b, &newline,
			      masked ? t.out : -1);
		/* a newline was echoed by the terminal (ECHONL; not without
		 * its line editing) */
		t.line_ended = newline && !masked;
		if (r < 0 || !newline)
			end_prompt_line(&t);
		r = finish_line(r, " from the terminal", &b, !newline, out);
	}
	tty_restore(&t);
	return r;
}

/* ---- files and stdin ---- */

/* Read up to want bytes; *got < want only at end of file. */
static int read_full(int fd, char *buf, size_t want, size_t *got)
{
	ssize_t n;

	*got = 0;
	while (*got < want) {
		n = read(fd, buf + *got, want - *got);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		*got += (size_t)n;
	}
	return 0;
}

static int skip_bytes(int fd, uint64_t skip)
{
	char junk[READ_CHUNK];
	size_t got;
	int r = 0;

	if (!skip)
		return 0;
	if (skip <= INT64_MAX && lseek(fd, (off_t)skip, SEEK_CUR) >= 0)
		return 0;
	/* pipes: read and drop (the bytes are part of the key file: wipe) */
	while (skip) {
		r = read_full(fd, junk, (size_t)MIN(skip, (uint64_t)sizeof(junk)), &got);
		if (r < 0)
			break;
		if (!got) {
			r = -EIO;
			break;
		}
		skip -= got;
	}
	explicit_bzero(junk, sizeof(junk));
	return r;
}

/* stdin without --key-file: up to the first newline (and at most max
 * bytes). */
static int read_line_fd(int fd, uint64_t max, struct passphrase **out)
{
	struct secbuf b = { 0 };
	bool newline;
	int r;

	r = read_line(fd, max, 0, &b, &newline, -1);
	return finish_line(r, "", &b, !newline && (!max || b.len < max), out);
}

/* A binary key: exactly size bytes, or (size 0) everything to the end. */
static int read_key_fd(int fd, const char *what, uint64_t size, struct passphrase **out)
{
	struct secbuf b = { 0 };
	size_t want, got;
	int r;

	if (size > PASSPHRASE_MAX_SIZE) {
		log_err("Key file size %llu exceeds the maximum of %u bytes.",
			(unsigned long long)size, PASSPHRASE_MAX_SIZE);
		return -EINVAL;
	}
	if (size) {
		r = secbuf_reserve(&b, (size_t)size + 1);
		if (r < 0)
			goto out;
		r = read_full(fd, b.p, (size_t)size, &got);
		if (r < 0)
			goto read_error;
		b.len = got;
		if (got < size) {
			log_err("Cannot read %llu bytes from %s: only %zu available.",
				(unsigned long long)size, what, got);
			r = -EIO;
			goto out;
		}
	} else {
		/* to the end of the file; one byte more than the maximum tells
		 * an oversized file */
		for (;;) {
			want = MIN((size_t)READ_CHUNK, PASSPHRASE_MAX_SIZE + 1 - b.len);
			r = secbuf_reserve(&b, b.len + want);
			if (r < 0)
				goto out;
			r = read_full(fd, b.p + b.len, want, &got);
			if (r < 0)
				goto read_error;
			b.len += got;
			if (b.len > PASSPHRASE_MAX_SIZE) {
				log_err("Key file %s exceeds the maximum of %u bytes (use --keyfile-size).",
					what, PASSPHRASE_MAX_SIZE);
				r = -EINVAL;
				goto out;
			}
			if (got < want)
				break;
		}
		if (!b.len) {
			log_err("Nothing to read on input.");
			r = -EPERM;
			goto out;
		}
	}
	r = secbuf_finish(&b, out);
	goto out;
read_error:
	log_err("Error reading %s: %s", what, strerror(-r));
out:
	secure_free(b.p);
	return r;
}

/* A key file other users can read is a key they have: one line about it,
 * as systemd-cryptsetup ("Key file ... is world-readable") and Debian's
 * cryptdisks ("insecure permissions for keyfile") warn for crypttab's key
 * files (cryptsetup itself says nothing); the key is used all the same.
 * Regular files only: not standard input, pipes (cmd_tab hands passphrases
 * over as /proc/self/fd/N), sockets or block and character devices. Not
 * with --quiet (nothing but errors on stderr). */
static void warn_readable_key_file(const char *path, const struct stat *st)
{
	if (opt.quiet || !S_ISREG(st->st_mode) || !(st->st_mode & (S_IRGRP | S_IROTH)))
		return;
	if (!strncmp(path, "/proc/self/fd/", 14) || !strncmp(path, "/dev/fd/", 8) ||
	    !strncmp(path, "/dev/stdin", 10))
		return;
	log_std("Warning: key file %s is readable by other users (mode %04o).", path,
		(unsigned int)(st->st_mode & 07777));
}

/* Connect to the key server listening on the AF_UNIX socket path, from a
 * socket bound to the abstract name "\0RANDOM/cryptsetup/VOLUME" (crypttab(5),
 * "AF_UNIX key files"), and shut down our side: the server sends the key
 * and closes. A path too long for sockaddr_un is reached through an O_PATH
 * descriptor (/proc/self/fd/N). Returns the connected descriptor or
 * -errno (-ENAMETOOLONG: VOLUME does not fit in a socket name). */
static int connect_key_socket(const char *path, const char *volume)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX }, self = { .sun_family = AF_UNIX };
	uint64_t rnd = 0;
	int fd, pathfd = -1, n, r;

	if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd))
		rnd ^= (uint64_t)now_ms() << 20 ^ (uint64_t)getpid();
	/* sun_path[0] stays 0: the abstract namespace */
	n = snprintf(self.sun_path + 1, sizeof(self.sun_path) - 1, "%016" PRIx64 "/cryptsetup/%s", rnd, volume);
	if (n < 0 || (size_t)n >= sizeof(self.sun_path) - 1) {
		log_err("The volume name %s is too long for the name of a key socket's client.", volume);
		return -ENAMETOOLONG;
	}
	if (strlen(path) >= sizeof(sa.sun_path)) {
		pathfd = open(path, O_PATH | O_CLOEXEC);
		if (pathfd < 0)
			return -errno;
		snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d", pathfd);
	} else {
		memcpy(sa.sun_path, path, strlen(path));
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	if (bind(fd, (struct sockaddr *)&self, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n)) < 0 ||
	    connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || shutdown(fd, SHUT_WR) < 0) {
		r = -errno;
		close(fd);
		goto out;
	}
	r = fd;
out:
	if (pathfd >= 0)
		close(pathfd);
	return r;
}

/* The volume a key server is told: opts->volume, or the base name of the
 * image. */
static const char *socket_volume(const struct passphrase_opts *opts)
{
	const char *name = opts->volume ? opts->volume : opts->image_name ? opts->image_name : "image";
	const char *slash = strrchr(name, '/');

	return slash && slash[1] ? slash + 1 : name;
}

/* Open the key file: a file, a device or a pipe is opened; a socket
 * (open(2) says ENXIO) is connected to. Returns the descriptor or -errno,
 * logged. */
static int open_key_file(const struct passphrase_opts *opts)
{
	struct stat st;
	int fd, r;

	fd = open(opts->key_file, O_RDONLY | O_CLOEXEC);
	if (fd >= 0)
		return fd;
	r = -errno;
	if (r == -ENXIO && stat(opts->key_file, &st) == 0 && S_ISSOCK(st.st_mode)) {
		r = connect_key_socket(opts->key_file, socket_volume(opts));
		if (r >= 0) {
			log_dbg("Connected to the key socket %s for %s.", opts->key_file, socket_volume(opts));
			return r;
		}
		if (r != -ENAMETOOLONG)
			log_err("Cannot connect to the key socket %s: %s", opts->key_file, strerror(-r));
		return r;
	}
	log_err("Cannot open key file %s: %s", opts->key_file, strerror(-r));
	return r;
}

int tools_read_passphrase(const struct passphrase_opts *opts, struct passphrase **out)
{
	struct stat st;
	int fd = -1, r;

	*out = NULL;
	if (tools_passphrase_interactive(opts))
		return read_terminal(opts, out);

	if (is_stdin(opts->key_file)) {
		fd = STDIN_FILENO;
		r = skip_bytes(fd, opts->keyfile_offset);
		if (r < 0) {
			log_err("Cannot skip %llu bytes of the key file on standard input.",
				(unsigned long long)opts->keyfile_offset);
			return r;
		}
		/* no --key-file: a line (--keyfile-size caps it); --key-file -: binary */
		if (!opts->key_file)
			return read_line_fd(fd, opts->keyfile_size ? opts->keyfile_size : PASSPHRASE_MAX_SIZE, out);
		return read_key_fd(fd, "standard input", opts->keyfile_size, out);
	}

	fd = open_key_file(opts);
	if (fd < 0)
		return fd;
	if (fstat(fd, &st) == 0)
		warn_readable_key_file(opts->key_file, &st);
	else
		st.st_mode = 0;
	if (S_ISREG(st.st_mode) && !opts->keyfile_size &&
	    (uint64_t)st.st_size > opts->keyfile_offset &&
	    (uint64_t)st.st_size - opts->keyfile_offset > PASSPHRASE_MAX_SIZE) {
		log_err("Key file %s exceeds the maximum of %u bytes (use --keyfile-size).",
			opts->key_file, PASSPHRASE_MAX_SIZE);
		r = -EINVAL;
		goto out;
	}
	r = skip_bytes(fd, opts->keyfile_offset);
	if (r < 0) {
		log_err("Cannot skip %llu bytes of key file %s.",
			(unsigned long long)opts->keyfile_offset, opts->key_file);
		goto out;
	}
	r = read_key_fd(fd, opts->key_file, opts->keyfile_size, out);
out:
	close(fd);
	return r;
}
