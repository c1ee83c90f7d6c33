#include <errno.h>
#include <stdlib.h>

#include "runs.h"

void run_list_init(struct run_list *l)
{
	l->runs = NULL;
	l->count = l->alloc = 0;
}

void run_list_free(struct run_list *l)
{
	free(l->runs);
	run_list_init(l);
}

static int mergeable(const struct run *a, const struct run *b)
{
	if (a->kind != b->kind || a->depth != b->depth || a->flags != b->flags)
		return 0;
	if (a->guest + a->len != b->guest)
		return 0;
	if (a->kind == RUN_COMPRESSED)
		return 0;
	if (a->kind == RUN_DATA || (a->flags & RUN_F_HOST))
		return a->host + a->len == b->host;
	return 1;
}

int run_list_add(struct run_list *l, const struct run *r)
{
	if (!r->len)
		return 0;
	if (l->count && mergeable(&l->runs[l->count - 1], r)) {
		l->runs[l->count - 1].len += r->len;
		return 0;
	}
	if (l->count == l->alloc) {
		size_t n = l->alloc ? l->alloc * 2 : 64;
		struct run *p = realloc(l->runs, n * sizeof(*p));

		if (!p)
			return -ENOMEM;
		l->runs = p;
		l->alloc = n;
	}
	l->runs[l->count++] = *r;
	return 0;
}

const char *run_kind_name(enum run_kind kind)
{
	switch (kind) {
	case RUN_UNALLOC:
		return "unallocated";
	case RUN_ZERO:
		return "zero";
	case RUN_DATA:
		return "data";
	case RUN_COMPRESSED:
		return "compressed";
	}
	return "?";
}
