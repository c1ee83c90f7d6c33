/* The control channel's lines (src/lib/control.h): requests and replies
 * parsed and formatted, table-driven; and the daemon's arguments
 * (daemon_state.h) that pass one start only. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "daemon_state.h"
#include "tap.h"

struct request_case {
	const char *line;
	int result;
	const char *verb;
	unsigned int nargs;
	const char *arg0, *arg1;
};

static const struct request_case requests[] = {
	{ "ping\n", 0, "ping", 0, NULL, NULL },
	{ "ping", 0, "ping", 0, NULL, NULL },
	{ "refresh on\n", 0, "refresh", 1, "on", NULL },
	{ "resize 10G:shrink=1 x\n", 0, "resize", 2, "10G:shrink=1", "x" },
	{ "a 1 2 3 4 5 6 7 8\n", 0, "a", 8, "1", "2" },
	{ "a 1 2 3 4 5 6 7 8 9\n", -EINVAL, NULL, 0, NULL, NULL },	/* too many arguments */
	{ "\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "", -EINVAL, NULL, 0, NULL, NULL },
	{ " ping\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "ping \n", -EINVAL, NULL, 0, NULL, NULL },
	{ "refresh  on\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "ping\r\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "pi\tng\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "state /etc/passwd\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "ping\nping\n", -EINVAL, NULL, 0, NULL, NULL },
	{ "verb \xc3\xa9\n", -EINVAL, NULL, 0, NULL, NULL },
};

struct reply_case {
	const char *line;
	int result;
	const char *text;
};

static const struct reply_case replies[] = {
	{ "OK\n", 0, "" },
	{ "OK", 0, "" },
	{ "OK 1234\n", 0, "1234" },
	{ "OK suspended\n", 0, "suspended" },
	{ "ERR 16\n", -EBUSY, "" },
	{ "ERR 22 bad argument\n", -EINVAL, "bad argument" },
	{ "ERR 0\n", -EPROTO, NULL },
	{ "ERR -5\n", -EPROTO, NULL },
	{ "ERR x\n", -EPROTO, NULL },
	{ "ERR 5x\n", -EPROTO, NULL },
	{ "ERR 99999\n", -EPROTO, NULL },
	{ "ERR\n", -EPROTO, NULL },
	{ "OKAY\n", -EPROTO, NULL },
	{ "\n", -EPROTO, NULL },
	{ "HELLO\n", -EPROTO, NULL },
};

/* The used end open found reaches the daemon's start, not its state file
 * (a reattach computes it again: the image has changed since). */
static void test_daemon_used_end(void)
{
	struct daemon_args *a = malloc(sizeof(*a)), *back = malloc(sizeof(*back));
	struct daemon_argv *v = malloc(sizeof(*v));
	bool in_state = false;
	int r;

	daemon_args_init(a);
	snprintf(a->name, sizeof(a->name), "vm1");
	snprintf(a->id, sizeof(a->id), "0123456789abcdef");
	snprintf(a->image, sizeof(a->image), "/var/lib/vm1.qcow2");
	snprintf(a->layers[0].host, sizeof(a->layers[0].host), "7:3");
	a->nlayers = 1;
	a->used_end = 5ULL << 30;
	r = daemon_args_format(a, false, v);
	if (!r)
		r = daemon_args_parse(v->n, v->v, back);
	CHECK(r == 0 && back->used_end == a->used_end, "--used-end passes to the daemon (%d)", r);
	r = daemon_args_format(a, true, v);
	for (int i = 0; !r && i < v->n; i++)
		in_state |= !strcmp(v->v[i], "--used-end");
	CHECK(r == 0 && !in_state, "--used-end is not kept for reattach");
	if (!r)
		r = daemon_args_parse(v->n, v->v, back);
	CHECK(r == 0 && back->used_end == 0, "reattach: no used end, computed (%d)", r);
	free(a);
	free(back);
	free(v);
}

int main(void)
{
	struct control_request req;
	char buf[CONTROL_LINE_MAX + 16], text[CONTROL_LINE_MAX], long_line[CONTROL_LINE_MAX + 8];
	size_t n;
	int r;

	for (size_t i = 0; i < sizeof(requests) / sizeof(requests[0]); i++) {
		const struct request_case *c = &requests[i];

		r = control_parse_request(c->line, strlen(c->line), &req);
		CHECK(r == c->result, "request %zu: parse returns %d (want %d)", i, r, c->result);
		if (r || c->result)
			continue;
		CHECK(!strcmp(req.verb, c->verb), "request %zu: verb %s", i, req.verb);
		CHECK(req.nargs == c->nargs, "request %zu: %u arguments", i, req.nargs);
		if (c->arg0)
			CHECK(!strcmp(req.args[0], c->arg0), "request %zu: first argument %s", i, req.args[0]);
		if (c->arg1)
			CHECK(!strcmp(req.args[1], c->arg1), "request %zu: second argument %s", i, req.args[1]);
	}
	/* words and lines at their limits */
	memset(long_line, 'a', CONTROL_WORD_MAX);
	long_line[CONTROL_WORD_MAX] = '\0';
	CHECK(control_parse_request(long_line, strlen(long_line), &req) == 0, "a word of %d characters", CONTROL_WORD_MAX);
	memset(long_line, 'a', CONTROL_WORD_MAX + 1);
	long_line[CONTROL_WORD_MAX + 1] = '\0';
	CHECK(control_parse_request(long_line, strlen(long_line), &req) == -EINVAL, "a word too long");
	memset(long_line, 'a', sizeof(long_line) - 1);
	for (size_t i = 10; i < sizeof(long_line) - 1; i += 11)
		long_line[i] = ' ';
	long_line[sizeof(long_line) - 1] = '\0';
	CHECK(control_parse_request(long_line, strlen(long_line), &req) == -EINVAL, "a line too long");
	/* a NUL inside the line */
	CHECK(control_parse_request("pi\0ng\n", 6, &req) == -EINVAL, "a NUL in the line");

	for (size_t i = 0; i < sizeof(replies) / sizeof(replies[0]); i++) {
		const struct reply_case *c = &replies[i];

		r = control_parse_reply(c->line, strlen(c->line), text, sizeof(text));
		CHECK(r == c->result, "reply %zu: parse returns %d (want %d)", i, r, c->result);
		if (c->text && r == c->result)
			CHECK(!strcmp(text, c->text), "reply %zu: text \"%s\"", i, text);
	}

	/* formatted replies parse back */
	n = control_format_reply(buf, sizeof(buf), 0, NULL);
	CHECK(n == 3 && !strcmp(buf, "OK\n"), "OK without text");
	n = control_format_reply(buf, sizeof(buf), -EBUSY, "suspended\tnow\n");
	CHECK(!strcmp(buf, "ERR 16 suspended?now?\n") && n == strlen(buf), "ERR with text, controls replaced: %s", buf);
	r = control_parse_reply(buf, n, text, sizeof(text));
	CHECK(r == -EBUSY && !strcmp(text, "suspended?now?"), "ERR round trip");
	memset(long_line, 'x', sizeof(long_line) - 1);
	long_line[sizeof(long_line) - 1] = '\0';
	n = control_format_reply(buf, sizeof(buf), 0, long_line);
	CHECK(n <= CONTROL_LINE_MAX && buf[n - 1] == '\n', "a long text is cut to a line (%zu bytes)", n);
	n = control_format_reply(buf, 8, 0, "x");
	CHECK(n == 0, "no room: nothing");

	CHECK(control_socket_path(buf, sizeof(buf), "vm1") == 0 && !strcmp(buf, "/run/qcowsetup/vm1.ctl"),
	      "socket path %s", buf);
	memset(long_line, 'n', 127);
	long_line[127] = '\0';
	CHECK(control_socket_path(buf, sizeof(buf), long_line) == -ENAMETOOLONG, "a name too long for sun_path");
	test_daemon_used_end();
	return tap_done();
}
