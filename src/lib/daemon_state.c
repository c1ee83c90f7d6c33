/* The daemon's arguments, its state files and the mapping locks (see
 * daemon_state.h). */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon_state.h"
#include "log.h"
#include "util.h"

void qs_state_path(char *buf, size_t size, const char *name, enum qs_state_file which)
{
	static const char *const suffix[] = {
		[QS_STATE_DAEMON] = "daemon",
		[QS_STATE_STATS] = "stats",
		[QS_STATE_SUSPENDED] = "suspended",
	};

	snprintf(buf, size, QS_RUN_DIR "/%s.%s", name, suffix[which]);
}

void qs_state_remove(const char *name)
{
	static const enum qs_state_file files[] = { QS_STATE_DAEMON, QS_STATE_STATS };
	char path[4096];

	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		qs_state_path(path, sizeof(path), name, files[i]);
		if (unlink(path) == 0)
			log_dbg("removed %s", path);
	}
}

static void lock_path(char *buf, size_t size, const char *name)
{
	snprintf(buf, size, QS_RUN_DIR "/%s.lock", name);
}

int qs_name_lock(const char *name)
{
	char path[4096];
	struct stat a, b;
	int fd;

	if (!*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
		return -EINVAL;
	if (mkdir(QS_RUN_DIR, 0700) < 0 && errno != EEXIST)
		return -errno;
	lock_path(path, sizeof(path), name);
	for (;;) {
		fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (fd < 0)
			return -errno;
		if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
			if (errno != EWOULDBLOCK) {
				int r = -errno;

				close(fd);
				return r;
			}
			log_verbose("Waiting for another qcowsetup working on %s.", name);
			while (flock(fd, LOCK_EX) < 0)
				if (errno != EINTR) {
					int r = -errno;

					close(fd);
					return r;
				}
		}
		/* the holder before us removed the file on release: lock the
		 * one that is there now */
		if (fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
			return fd;
		close(fd);
	}
}

void qs_name_unlock(const char *name, int fd)
{
	char path[4096];

	if (fd < 0)
		return;
	lock_path(path, sizeof(path), name);
	unlink(path);	/* while held: the next holder sees it gone and retries */
	close(fd);
}

/* ---- the daemon's arguments: one table, both ways ---- */

enum arg_kind {
	ARG_FLAG,	/* bool, no value */
	ARG_STRING,	/* char[size] */
	ARG_U64,	/* uint64_t */
	ARG_UINT,	/* unsigned int */
	ARG_FD,		/* int, -1 when absent */
	ARG_LAYER,	/* HOST[,CIPHER,KEYSIZE], repeated: layers[] */
	ARG_HOLD,	/* MAJ:MIN, repeated: holds[] */
	ARG_GIVEN,	/* DEPTH:i|d:FD, repeated: given[] */
};

#define FIELD(f) offsetof(struct daemon_args, f), sizeof(((struct daemon_args *)0)->f)

static const struct daemon_arg {
	const char *name;
	enum arg_kind kind;
	size_t off, size;
	bool persistent;	/* kept in the state file for reattach */
} args_table[] = {
	{ "--name", ARG_STRING, FIELD(name), true },
	{ "--id", ARG_STRING, FIELD(id), true },
	{ "--image", ARG_STRING, FIELD(image), true },
	{ "--layer", ARG_LAYER, FIELD(layers), true },
	{ "--hold", ARG_HOLD, FIELD(holds), true },
	{ "--trust-names", ARG_FLAG, FIELD(trust_names), true },
	{ "--backing-file", ARG_STRING, FIELD(backing_file), true },
	{ "--data-file", ARG_STRING, FIELD(data_file), true },
	{ "--readonly", ARG_FLAG, FIELD(read_only), true },
	{ "--allow-discards", ARG_FLAG, FIELD(allow_discards), true },
	{ "--max-targets", ARG_U64, FIELD(max_targets), true },
	{ "--keep-size", ARG_U64, FIELD(keep_size), true },
	{ "--used-end", ARG_U64, FIELD(used_end), false },
	{ "--nbd-timeout", ARG_UINT, FIELD(nbd_timeout), true },
	{ "--flush-interval", ARG_UINT, FIELD(flush_interval_ms), true },
	{ "--nbd-connections", ARG_UINT, FIELD(nbd_connections), true },
	{ "--debug", ARG_FLAG, FIELD(debug), false },
	{ "--ready-fd", ARG_FD, FIELD(ready_fd), false },
	{ "--reattach", ARG_FD, FIELD(reattach), false },
	{ "--take-over", ARG_FLAG, FIELD(take_over), false },
	{ "--guard", ARG_FD, FIELD(guard_fd), false },
	{ "--fd", ARG_GIVEN, FIELD(given), false },
};

void daemon_args_init(struct daemon_args *a)
{
	memset(a, 0, sizeof(*a));
	a->ready_fd = a->reattach = a->guard_fd = -1;
	a->nbd_timeout = 30;
	a->flush_interval_ms = 200;
	a->nbd_connections = 1;	/* a state file without it: a device of one */
	a->max_targets = 65536;
}

static int add(struct daemon_argv *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int add(struct daemon_argv *out, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (out->n >= DAEMON_MAX_ARGS)
		return -E2BIG;
	va_start(ap, fmt);
	n = vsnprintf(out->store[out->n], sizeof(out->store[0]), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(out->store[0]))
		return -E2BIG;
	out->v[out->n] = out->store[out->n];
	out->v[++out->n] = NULL;
	return 0;
}

int daemon_args_format(const struct daemon_args *a, bool persistent, struct daemon_argv *out)
{
	int r;

	out->n = 0;
	r = add(out, "%s", DAEMON_ARGV0);
	for (size_t i = 0; !r && i < ARRAY_SIZE(args_table); i++) {
		const struct daemon_arg *t = &args_table[i];
		const void *f = (const char *)a + t->off;

		if (persistent && !t->persistent)
			continue;
		switch (t->kind) {
		case ARG_FLAG:
			if (*(const bool *)f)
				r = add(out, "%s", t->name);
			break;
		case ARG_STRING:
			if (*(const char *)f && !(r = add(out, "%s", t->name)))
				r = add(out, "%s", (const char *)f);
			break;
		case ARG_U64:
			if (!(r = add(out, "%s", t->name)))
				r = add(out, "%llu", (unsigned long long)*(const uint64_t *)f);
			break;
		case ARG_UINT:
			if (!(r = add(out, "%s", t->name)))
				r = add(out, "%u", *(const unsigned int *)f);
			break;
		case ARG_FD:
			if (*(const int *)f >= 0 && !(r = add(out, "%s", t->name)))
				r = add(out, "%d", *(const int *)f);
			break;
		case ARG_LAYER:
			for (unsigned int k = 0; !r && k < a->nlayers; k++) {
				const struct daemon_layer *l = &a->layers[k];

				if (!(r = add(out, "%s", t->name)))
					r = l->cipher[0] ? add(out, "%s,%s,%u", l->host, l->cipher, l->key_size)
							 : add(out, "%s", l->host);
			}
			break;
		case ARG_HOLD:
			for (unsigned int k = 0; !r && k < a->nholds; k++)
				if (!(r = add(out, "%s", t->name)))
					r = add(out, "%s", a->holds[k]);
			break;
		case ARG_GIVEN:
			for (unsigned int k = 0; !r && k < a->ngiven; k++)
				if (a->given[k].fd >= 0 && !(r = add(out, "%s", t->name)))
					r = add(out, "%u:%c:%d", a->given[k].depth, a->given[k].data ? 'd' : 'i',
						a->given[k].fd);
			break;
		}
	}
	return r;
}

static int copy_string(char *dst, size_t size, const char *src)
{
	size_t len = strlen(src);

	if (len >= size)
		return -EINVAL;
	memcpy(dst, src, len + 1);
	return 0;
}

static int parse_layer(struct daemon_args *a, const char *arg)
{
	struct daemon_layer *l;
	char buf[256], *c1, *c2;
	uint64_t ks;

	if (a->nlayers >= IMG_MAX_CHAIN_DEPTH || copy_string(buf, sizeof(buf), arg))
		return -EINVAL;
	l = &a->layers[a->nlayers++];
	c1 = strchr(buf, ',');
	if (c1) {
		*c1++ = '\0';
		c2 = strchr(c1, ',');
		if (!c2)
			return -EINVAL;
		*c2++ = '\0';
		if (copy_string(l->cipher, sizeof(l->cipher), c1) || parse_u64(c2, 0, &ks) || !ks || ks > 512)
			return -EINVAL;
		l->key_size = (unsigned int)ks;
	}
	return copy_string(l->host, sizeof(l->host), buf);
}

static int parse_given(struct daemon_args *a, const char *v)
{
	char buf[64], *kind, *fd;
	uint64_t depth, n;

	if (a->ngiven >= DAEMON_MAX_HOLDS || copy_string(buf, sizeof(buf), v))
		return -EINVAL;
	kind = strchr(buf, ':');
	fd = kind ? strchr(kind + 1, ':') : NULL;
	if (!fd || fd != kind + 2 || (kind[1] != 'i' && kind[1] != 'd'))
		return -EINVAL;
	*kind = *fd = '\0';
	if (parse_u64(buf, 0, &depth) || depth >= IMG_MAX_CHAIN_DEPTH || parse_u64(fd + 1, 0, &n) || n < 3 ||
	    n > INT_MAX)
		return -EINVAL;
	a->given[a->ngiven++] = (struct file_given){ .depth = (unsigned int)depth, .data = kind[1] == 'd',
						     .fd = (int)n };
	return 0;
}

static int parse_value(struct daemon_args *a, const struct daemon_arg *t, const char *v)
{
	void *f = (char *)a + t->off;
	uint64_t n;

	switch (t->kind) {
	case ARG_FLAG:
		return 0;
	case ARG_STRING:
		return copy_string(f, t->size, v);
	case ARG_U64:
		return parse_u64(v, 0, (uint64_t *)f);
	case ARG_UINT:
	case ARG_FD:
		if (parse_u64(v, 0, &n) || n > INT_MAX)
			return -EINVAL;
		if (t->kind == ARG_UINT)
			*(unsigned int *)f = (unsigned int)n;
		else
			*(int *)f = (int)n;
		return 0;
	case ARG_LAYER:
		return parse_layer(a, v);
	case ARG_HOLD:
		if (a->nholds >= DAEMON_MAX_HOLDS)
			return -EINVAL;
		return copy_string(a->holds[a->nholds++], sizeof(a->holds[0]), v);
	case ARG_GIVEN:
		return parse_given(a, v);
	}
	return -EINVAL;
}

int daemon_args_parse(int argc, char **argv, struct daemon_args *a)
{
	daemon_args_init(a);
	for (int i = 1; i < argc; i++) {
		const struct daemon_arg *t = NULL;

		for (size_t k = 0; k < ARRAY_SIZE(args_table) && !t; k++)
			if (!strcmp(argv[i], args_table[k].name))
				t = &args_table[k];
		if (!t || (t->kind != ARG_FLAG && i + 1 >= argc)) {
			log_err("qcowsetup-daemon: unknown or incomplete argument %s.", argv[i]);
			return -EINVAL;
		}
		if (t->kind == ARG_FLAG)
			*(bool *)((char *)a + t->off) = true;
		else if (parse_value(a, t, argv[++i])) {
			log_err("qcowsetup-daemon: invalid value for %s.", t->name);
			return -EINVAL;
		}
	}
	if (a->guard_fd >= 0)
		return a->name[0] && a->id[0] ? 0 : -EINVAL;
	if (!dm_mapping_name_valid(a->name) || !a->id[0] || a->image[0] != '/' || !a->nlayers)
		return -EINVAL;
	if (a->flush_interval_ms < 10)
		a->flush_interval_ms = 10;
	if (a->nbd_connections < 1 || a->nbd_connections > 16)
		return -EINVAL;
	return 0;
}

void daemon_args_stack_params(const struct daemon_args *a, const char *slow_dev, struct dm_stack_params *p,
			      struct dm_layer_params *lp)
{
	memset(p, 0, sizeof(*p));
	for (unsigned int i = 0; i < a->nlayers; i++) {
		lp[i].host_dev = a->layers[i].host;
		lp[i].cipher = a->layers[i].cipher[0] ? a->layers[i].cipher : NULL;
		lp[i].key_size = a->layers[i].key_size;
	}
	p->name = a->name;
	p->id = a->id;
	p->layers = lp;
	p->nlayers = a->nlayers;
	p->read_only = a->read_only;
	p->allow_discards = a->allow_discards;
	p->max_targets = (size_t)a->max_targets;
	p->slow_dev = slow_dev;
}

/* ---- the state file ---- */

int qs_state_write(const struct daemon_args *a, pid_t pid, int nbd)
{
	struct daemon_argv *v = malloc(sizeof(*v));
	char path[PATH_MAX], tmp[PATH_MAX + 8];
	FILE *f;
	int r;

	if (!v)
		return -ENOMEM;
	r = daemon_args_format(a, true, v);
	if (r)
		goto out;
	if (mkdir(QS_RUN_DIR, 0700) < 0 && errno != EEXIST) {
		r = -errno;
		goto out;
	}
	qs_state_path(path, sizeof(path), a->name, QS_STATE_DAEMON);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "we");
	if (!f) {
		r = -errno;
		goto out;
	}
	fprintf(f, "pid=%d\nnbd=%d\n", (int)pid, nbd);
	for (int i = 1; i < v->n; i++)
		fprintf(f, "arg=%s\n", v->v[i]);
	if (fclose(f) != 0 || rename(tmp, path) < 0) {
		r = -errno;
		unlink(tmp);
	}
out:
	free(v);
	return r;
}

int qs_state_read(const char *name, pid_t *pid, int *nbd, struct daemon_args *a)
{
	struct daemon_argv *v = malloc(sizeof(*v));
	char path[PATH_MAX], line[PATH_MAX + 16];
	uint64_t n;
	FILE *f;
	int r = 0;

	*pid = 0;
	*nbd = -1;
	if (!v)
		return -ENOMEM;
	v->n = 0;
	qs_state_path(path, sizeof(path), name, QS_STATE_DAEMON);
	f = fopen(path, "re");
	if (!f) {
		r = -errno;
		goto out;
	}
	r = add(v, "%s", DAEMON_ARGV0);
	while (!r && fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		if (!strncmp(line, "pid=", 4) && !parse_u64(line + 4, 0, &n) && n <= INT_MAX)
			*pid = (pid_t)n;
		else if (!strncmp(line, "nbd=", 4) && !parse_u64(line + 4, 0, &n) && n <= INT_MAX)
			*nbd = (int)n;
		else if (!strncmp(line, "arg=", 4))
			r = add(v, "%s", line + 4);
	}
	fclose(f);
	if (!r && a)
		r = daemon_args_parse(v->n, v->v, a);
	if (r)
		r = -EINVAL;
out:
	free(v);
	return r;
}
