/* Page-locked, wiped-on-free memory for keys and passphrases, and the
 * volume key and passphrase types built on it (secure.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "secure.h"
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

/* ---- typed secrets ---- */

struct volume_key *volume_key_alloc(size_t size)
{
	struct volume_key *vk;

	if (size > SIZE_MAX - sizeof(*vk))
		return NULL;
	vk = secure_alloc(sizeof(*vk) + size);	/* zeroed */
	if (vk)
		vk->size = size;
	return vk;
}

void volume_key_free(struct volume_key *vk)
{
	secure_free(vk);	/* wipes size and key */
}

int passphrase_alloc(size_t len, struct passphrase **out)
{
	struct passphrase *pp;

	*out = NULL;
	if (len > PASSPHRASE_MAX_SIZE)
		return -EINVAL;
	pp = secure_alloc(sizeof(*pp));
	if (!pp)
		return -ENOMEM;
	pp->data = secure_alloc(len + 1);	/* zeroed, so NUL-terminated */
	if (!pp->data) {
		secure_free(pp);
		return -ENOMEM;
	}
	pp->len = len;
	*out = pp;
	return 0;
}

int passphrase_from_buffer(const void *data, size_t len, struct passphrase **out)
{
	int r = passphrase_alloc(len, out);

	if (r == 0 && len)
		memcpy((*out)->data, data, len);
	return r;
}

void passphrase_free(struct passphrase *pp)
{
	if (!pp)
		return;
	secure_free(pp->data);
	secure_free(pp);
}
