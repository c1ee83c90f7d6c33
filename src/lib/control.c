/* The control channel's lines and its client (see control.h). */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "control.h"
#include "daemon_state.h"
#include "log.h"
#include "util.h"

int control_socket_path(char *buf, size_t size, const char *name)
{
	struct sockaddr_un sa;
	int n = snprintf(buf, size, QS_RUN_DIR "/%s.ctl", name);

	if (n < 0 || (size_t)n >= size || (size_t)n >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	return 0;
}

static bool word_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("._:=+-", c);
}

int control_parse_request(const char *line, size_t len, struct control_request *req)
{
	unsigned int nwords = 0;
	size_t i = 0;

	memset(req, 0, sizeof(*req));
	if (len && line[len - 1] == '\n')
		len--;
	if (len == 0 || len >= CONTROL_LINE_MAX)
		return -EINVAL;
	for (;;) {
		size_t start = i;
		char *dst;

		while (i < len && line[i] != ' ') {
			if (!line[i] || !word_char(line[i]))
				return -EINVAL;
			i++;
		}
		if (i == start || i - start > CONTROL_WORD_MAX || nwords > CONTROL_ARGS_MAX)
			return -EINVAL;	/* an empty word: a leading, double or trailing space */
		dst = nwords ? req->args[nwords - 1] : req->verb;
		memcpy(dst, line + start, i - start);
		dst[i - start] = '\0';
		nwords++;
		if (i == len)
			break;
		i++;	/* the space */
	}
	req->nargs = nwords - 1;
	return 0;
}

size_t control_format_reply(char *buf, size_t size, int err, const char *text)
{
	size_t n;
	int k;

	if (size < 16)
		return 0;
	k = err ? snprintf(buf, size, "ERR %d", -err) : snprintf(buf, size, "OK");
	n = (size_t)k;
	if (text && *text && n + 2 < size) {
		buf[n++] = ' ';
		for (; *text && n + 2 < size && n + 1 < CONTROL_LINE_MAX; text++)
			buf[n++] = (*text >= ' ' && *text < 0x7f) ? *text : '?';
	}
	buf[n++] = '\n';
	buf[n] = '\0';
	return n;
}

int control_parse_reply(const char *line, size_t len, char *text, size_t size)
{
	const char *p, *end;
	char *num_end;
	long e;
	int r;

	if (len && line[len - 1] == '\n')
		len--;
	end = line + len;
	if (len >= 2 && !memcmp(line, "OK", 2) && (len == 2 || line[2] == ' ')) {
		p = line + MIN(len, (size_t)3);
		r = 0;
	} else if (len >= 5 && !memcmp(line, "ERR ", 4)) {
		char num[16];
		size_t k = 0;

		for (p = line + 4; p < end && *p != ' ' && k < sizeof(num) - 1; p++)
			num[k++] = *p;
		num[k] = '\0';
		errno = 0;
		e = strtol(num, &num_end, 10);
		if (!k || *num_end || errno || e <= 0 || e > 4095 || (p < end && *p != ' '))
			return -EPROTO;
		if (p < end)
			p++;
		r = -(int)e;
	} else {
		return -EPROTO;
	}
	if (size) {
		size_t k = MIN((size_t)(end - p), size - 1);

		memcpy(text, p, k);
		text[k] = '\0';
	}
	return r;
}

static int elapsed_ms(const struct timespec *t0)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int)((now.tv_sec - t0->tv_sec) * 1000 + (now.tv_nsec - t0->tv_nsec) / 1000000);
}

/* One line from fd (up to '\n'), within the time left of CONTROL_TIMEOUT_MS. */
static int read_line(int fd, char *buf, size_t size, const struct timespec *t0)
{
	size_t got = 0;

	while (got < size - 1) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int left = CONTROL_TIMEOUT_MS - elapsed_ms(t0), r;
		ssize_t n;

		if (left <= 0)
			return -ETIMEDOUT;
		r = poll(&pfd, 1, left);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -ETIMEDOUT;
		n = read(fd, buf + got, size - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EPROTO;	/* closed without a reply */
		got += (size_t)n;
		buf[got] = '\0';
		if (memchr(buf, '\n', got))
			return (int)got;
	}
	return -EPROTO;
}

int control_call(const char *name, const char *request, char *text, size_t size)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char line[CONTROL_LINE_MAX + 1], reply_text[CONTROL_LINE_MAX];
	struct control_request check;
	struct timespec t0;
	size_t len = strlen(request);
	int fd, r;

	if (text && size)
		text[0] = '\0';
	if (len + 1 >= sizeof(line) || control_parse_request(request, len, &check))
		return -EINVAL;
	r = control_socket_path(sa.sun_path, sizeof(sa.sun_path), name);
	if (r)
		return r;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = -errno;
		log_dbg("control %s: %s: %s", name, sa.sun_path, strerror(-r));
		goto out;
	}
	memcpy(line, request, len);
	line[len] = '\n';
	log_dbg("control %s: > %s", name, request);
	if (send(fd, line, len + 1, MSG_NOSIGNAL) != (ssize_t)(len + 1)) {
		r = errno ? -errno : -EIO;
		goto out;
	}
	r = read_line(fd, line, sizeof(line), &t0);
	if (r < 0) {
		log_err("The slow-path daemon of %s did not answer \"%s\": %s.", name, check.verb, strerror(-r));
		goto out;
	}
	r = control_parse_reply(line, strcspn(line, "\n") + 1, reply_text, sizeof(reply_text));
	log_dbg("control %s: < %s", name, r == -EPROTO ? "(garbage)" : line);
	if (r == -EPROTO)
		log_err("The slow-path daemon of %s answered something else than OK or ERR.", name);
	else if (r == -ENOKEY)
		log_verbose("The slow-path daemon of %s needs a key for \"%s\" (%s).", name, check.verb, reply_text);
	else if (r < 0)
		log_err("The slow-path daemon of %s refused \"%s\": %s%s%s.", name, check.verb, strerror(-r),
			reply_text[0] ? ": " : "", reply_text);
	if ((r == 0 || r == -ENOKEY) && text && size)
		snprintf(text, size, "%s", reply_text);
out:
	close(fd);
	return r;
}
