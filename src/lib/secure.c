/* Page-locked, wiped-on-free memory for keys and passphrases. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "util.h"

struct secure_hdr {
	size_t size;		/* bytes after the header */
	size_t pad;
};

void *secure_alloc(size_t size)
{
	struct secure_hdr *h;

	if (size > SIZE_MAX - sizeof(*h))
		return NULL;
	h = calloc(1, sizeof(*h) + size);
	if (!h)
		return NULL;
	h->size = size;
	/* mlock can fail for unprivileged users with a low RLIMIT_MEMLOCK;
	 * the memory is still wiped on free. */
	(void)mlock(h, sizeof(*h) + size);
	return h + 1;
}

void secure_free(void *p)
{
	struct secure_hdr *h;

	if (!p)
		return;
	h = (struct secure_hdr *)p - 1;
	explicit_bzero(p, h->size);
	(void)munlock(h, sizeof(*h) + h->size);
	free(h);
}

char *secure_strndup(const char *s, size_t len)
{
	char *d = secure_alloc(len + 1);

	if (d) {
		memcpy(d, s, len);
		d[len] = '\0';
	}
	return d;
}
