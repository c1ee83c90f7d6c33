/* Secrets in memory: passphrases, key file contents, volume keys.
 *
 * Every secret is an anonymous mapping of its own, whole pages: a small
 * header (magic, sizes) then the caller's bytes. Nothing else ever shares
 * those pages, so
 *   - mlock/munlock, which work on whole pages and do not count, cannot
 *     unlock a live key when a neighbour is freed (calloc + mlock did: the
 *     munlock of a freed passphrase unlocked the page a volume key shared),
 *     and no ordinary heap data pins or exposes them;
 *   - the pages are locked (mlock2 MLOCK_ONFAULT: an 8 MiB key file buffer
 *     costs only the pages it fills), left out of core dumps
 *     (MADV_DONTDUMP) and read as zeros in a forked child
 *     (MADV_WIPEONFORK: the children here only exec);
 *   - free wipes the caller's bytes (those in memory) with explicit_bzero,
 *     then unmaps.
 * A page per secret is cheap: a few dozen live at once at most (the
 * passphrases, one volume key per layer of a chain of up to 16).
 * libcryptsetup's and OpenSSL's own copies are their business
 * (crypt_safe_alloc, cleansed contexts); what we add is the flag below.
 *
 * The process is not dumpable while a secret lives: the first allocation
 * (0 -> 1 live) sets PR_SET_DUMPABLE 0, the last free puts back the value
 * found then. Counted rather than once for the whole process because:
 *   - it also keeps core dumps (whatever RLIMIT_CORE and core_pattern say;
 *     RLIMIT_CORE is not touched) from holding the copies in ordinary heap
 *     that MADV_DONTDUMP cannot reach: libcryptsetup's during
 *     crypt_volume_key_get, OpenSSL's key schedules (crypto_openssl.c
 *     allocates its cipher contexts' holder here to keep the flag up as
 *     long as they live); the rest of the time crashes stay debuggable;
 *   - its side effects are harmless here. qcowsetup runs as root, for whom
 *     the flag changes neither who may ptrace it nor who owns /proc/PID.
 *     An unprivileged run (format, convert, key slots on one's own files;
 *     the tests) sees /proc/self turn root-owned while secrets live: the
 *     kernel still lets a process at its own fd, fdinfo, exe and maps
 *     (crypto_luks.c opens /proc/self/fd/N), only mode-0400 files such as
 *     environ or auxv become unreadable, and nothing reads them; its user
 *     can no longer ptrace it, which is the point. A debugger attached
 *     before the first secret stays attached, in either scheme.
 *   - prctl can only set 0 or 1: a previous 2 (suid_dumpable) is not put
 *     back, the process stays at 0; a value changed by someone else while
 *     secrets lived (the flag is no longer 0) is left alone.
 * The count and the flag change under a mutex (the flag belongs to the
 * whole process).
 *
 * A forked child inherits the mappings wiped: their header reads zero, so
 * secure_free there leaves them (nothing is in them) and the count alone. */
#include <errno.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "log.h"
#include "secure.h"
#include "util.h"

#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

#define SECURE_MAGIC 0x3a5445524345531aULL

struct secure_hdr {
	uint64_t magic;
	size_t size;		/* bytes the caller asked for */
	size_t map_len;		/* bytes mapped: whole pages */
};

/* the caller's bytes start here, aligned as malloc's */
#define HDR_SIZE round_up_pow2(sizeof(struct secure_hdr), alignof(max_align_t))

void (*secure_free_hook)(const void *p, size_t size);

static pthread_mutex_t secure_lock = PTHREAD_MUTEX_INITIALIZER;
static size_t secure_live;		/* secrets allocated and not freed */
static int secure_saved_dumpable;	/* PR_GET_DUMPABLE at 0 -> 1 */

static void dumpable_hold(void)
{
	pthread_mutex_lock(&secure_lock);
	if (secure_live++ == 0) {
		secure_saved_dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
		if (secure_saved_dumpable != 0 && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
			log_dbg("Cannot make the process non-dumpable: %s", strerror(errno));
	}
	pthread_mutex_unlock(&secure_lock);
}

static void dumpable_release(void)
{
	pthread_mutex_lock(&secure_lock);
	if (secure_live && --secure_live == 0 && secure_saved_dumpable == 1 &&
	    prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
		prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
	pthread_mutex_unlock(&secure_lock);
}

static size_t page_size(void)
{
	long n = sysconf(_SC_PAGESIZE);

	return n > 0 ? (size_t)n : 4096;
}

static void lock_pages(void *base, size_t len)
{
	static bool told, no_mlock2;	/* benign races: once or twice */
	int r = -1;

#ifdef MLOCK_ONFAULT
	if (!no_mlock2) {
		r = mlock2(base, len, MLOCK_ONFAULT);
		/* a kernel before 4.4 (or valgrind) */
		no_mlock2 = r < 0 && (errno == ENOSYS || errno == EINVAL);
		if (r < 0 && !no_mlock2)
			goto failed;
	}
#endif
	if (r < 0)
		r = mlock(base, len);
	if (r == 0)
		return;
#ifdef MLOCK_ONFAULT
failed:
#endif
	/* an unprivileged user's RLIMIT_MEMLOCK: still wiped on free */
	if (!told)
		log_dbg("Cannot lock secrets in memory: %s", strerror(errno));
	told = true;
}

void *secure_alloc(size_t size)
{
	size_t page = page_size(), len;
	struct secure_hdr *h;
	void *base;

	if (size > SIZE_MAX - HDR_SIZE - page) {
		errno = ENOMEM;
		return NULL;
	}
	len = (size_t)round_up_pow2(HDR_SIZE + size, page);
	base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		return NULL;
	/* both are defence in depth (non-dumpable, children exec): an old
	 * kernel without them is not a reason to refuse */
	if (madvise(base, len, MADV_DONTDUMP) < 0)
		log_dbg("MADV_DONTDUMP: %s", strerror(errno));
	if (madvise(base, len, MADV_WIPEONFORK) < 0)
		log_dbg("MADV_WIPEONFORK: %s", strerror(errno));
	lock_pages(base, len);
	h = base;
	h->magic = SECURE_MAGIC;
	h->size = size;
	h->map_len = len;
	dumpable_hold();
	return (uint8_t *)base + HDR_SIZE;
}

/* Wipe [p, p + size) where its pages are in memory. A page never touched
 * holds nothing, and writing it would only allocate it (most of an 8 MiB
 * key file buffer); one swapped out (mlock refused) cannot be wiped from
 * here anyway. If mincore fails, wipe it all. */
static void wipe(uint8_t *base, size_t map_len, uint8_t *p, size_t size, size_t page)
{
	unsigned char vec[64];
	uint8_t *end = p + size;

	for (size_t off = 0; off < map_len && size; off += sizeof(vec) * page) {
		size_t n = MIN(sizeof(vec) * page, map_len - off);

		if (mincore(base + off, n, vec) < 0) {
			explicit_bzero(p, size);
			return;
		}
		for (size_t i = 0; i < n / page; i++) {
			uint8_t *from = MAX(base + off + i * page, p);
			uint8_t *to = MIN(base + off + (i + 1) * page, end);

			if ((vec[i] & 1) && from < to)
				explicit_bzero(from, (size_t)(to - from));
		}
	}
}

void secure_free(void *p)
{
	struct secure_hdr *h;

	if (!p)
		return;
	h = (struct secure_hdr *)((uint8_t *)p - HDR_SIZE);
	if (h->magic != SECURE_MAGIC) {
		if (!h->magic && !h->size && !h->map_len)
			return;	/* a forked child's wiped copy: nothing in it */
		abort();	/* not ours, or freed twice */
	}
	wipe((uint8_t *)h, h->map_len, p, h->size, page_size());
	if (secure_free_hook)
		secure_free_hook(p, h->size);
	h->magic = 0;
	/* munmap unlocks: no munlock, which could reach nothing else anyway */
	if (munmap(h, h->map_len) < 0)
		log_dbg("Cannot unmap a secret: %s", strerror(errno));
	dumpable_release();
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
	/* the struct and its bytes in one block: data follows, zeroed, so
	 * NUL-terminated */
	pp = secure_alloc(sizeof(*pp) + len + 1);
	if (!pp)
		return -ENOMEM;
	pp->data = (char *)(pp + 1);
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
	secure_free(pp);	/* wipes the struct and the bytes */
}
