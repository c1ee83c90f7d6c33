/* Secrets in memory (secure.c), seen from outside through /proc/self/smaps,
 * mincore, prctl and fork:
 *   - each secret on pages of its own, locked ("lo", Locked:), left out of
 *     core dumps ("dd"), wiped in a forked child ("wf", and the child reads
 *     zeros), for sizes from 0 to a full key file buffer;
 *   - freeing one secret leaves its neighbour locked (calloc + mlock +
 *     munlock unlocked the page they shared);
 *   - the process is not dumpable while a secret lives, and gets its flag
 *     back when the last one goes;
 *   - free wipes every byte (secure_free_hook sees them just before the
 *     pages are unmapped) and unmaps;
 *   - volume keys and passphrases are such secrets.
 * Locking is checked when RLIMIT_MEMLOCK (or root) allows it. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keys.h"
#include "log.h"
#include "tap.h"
#include "util.h"

static size_t page;

/* ---- what the kernel says about an address ---- */

struct vma {
	bool found;
	uintptr_t start, end;
	unsigned long locked_kb;
	char flags[520];	/* " rd wr mr ... " with a space either side */
};

static struct vma vma_of(const void *addr)
{
	uintptr_t a = (uintptr_t)addr, s, e;
	struct vma v = { 0 };
	bool in = false;
	char line[512];
	FILE *f = fopen("/proc/self/smaps", "re");

	if (!f)
		return v;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " ", &s, &e) == 2) {
			if (v.found)
				break;	/* the next mapping */
			in = a >= s && a < e;
			if (in) {
				v.found = true;
				v.start = s;
				v.end = e;
			}
		} else if (in && !strncmp(line, "Locked:", 7)) {
			v.locked_kb = strtoul(line + 7, NULL, 10);
		} else if (in && !strncmp(line, "VmFlags:", 8)) {
			line[strcspn(line, "\n")] = '\0';
			snprintf(v.flags, sizeof(v.flags), "%s ", line + 8);
		}
	}
	fclose(f);
	return v;
}

static bool has_flag(const struct vma *v, const char *flag)
{
	char word[8];

	snprintf(word, sizeof(word), " %s ", flag);
	return strstr(v->flags, word) != NULL;
}

static bool page_mapped(const void *addr)
{
	unsigned char vec;
	void *p = (void *)((uintptr_t)addr & ~(uintptr_t)(page - 1));

	return mincore(p, page, &vec) == 0;
}

static int dumpable(void)
{
	return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
}

/* Whether mlock of len more bytes can succeed here. */
static bool can_lock(size_t len)
{
	struct rlimit rl;

	if (geteuid() == 0)
		return true;	/* CAP_IPC_LOCK, as a rule */
	return getrlimit(RLIMIT_MEMLOCK, &rl) == 0 &&
	       (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= len + 4 * page);
}

/* ---- the free hook: what the bytes were just before unmapping ---- */

static const void *hook_p;
static size_t hook_size, hook_calls, hook_nonzero;

static void free_hook(const void *p, size_t size)
{
	const uint8_t *b = p;

	hook_calls++;
	hook_p = p;
	hook_size = size;
	hook_nonzero = 0;
	for (size_t i = 0; i < size; i++)
		hook_nonzero += b[i] != 0;
}

/* ---- one secret of each size ---- */

static const struct {
	const char *what;
	size_t size;
} sizes[] = {
	{ "empty", 0 },
	{ "one byte", 1 },
	{ "a 512-bit key", 64 },
	{ "a volume key block", sizeof(struct volume_key) + 64 },
	{ "one page", 4096 },
	{ "three pages and a bit", 3 * 4096 + 5 },
	{ "a full key file buffer", PASSPHRASE_MAX_SIZE + 1 },
};

static void check_secret_pages(const char *what, const uint8_t *p, size_t size, bool lock)
{
	const uint8_t *last = size ? p + size - 1 : p;
	struct vma first = vma_of(p), end = vma_of(last);

	CHECK(first.found && end.found, "%s: mapped", what);
	CHECK(has_flag(&first, "dd") && has_flag(&end, "dd"), "%s: not in core dumps (VmFlags dd)", what);
	CHECK(has_flag(&first, "wf") && has_flag(&end, "wf"), "%s: wiped on fork (VmFlags wf)", what);
	if (lock)
		CHECK(has_flag(&first, "lo") && has_flag(&end, "lo") && first.locked_kb >= page / 1024,
		      "%s: locked (VmFlags lo, Locked: %lu kB)", what, first.locked_kb);
	else
		CHECK(true, "%s: locked # SKIP RLIMIT_MEMLOCK too low", what);
}

static void test_sizes(void)
{
	int d0 = dumpable();

	for (size_t i = 0; i < ARRAY_SIZE(sizes); i++) {
		const char *what = sizes[i].what;
		size_t size = sizes[i].size, zero = 0;
		uint8_t *p = secure_alloc(size);

		CHECK(p != NULL, "%s: secure_alloc(%zu)", what, size);
		if (!p)
			continue;
		CHECK(dumpable() == 0, "%s: process not dumpable while it lives", what);
		for (size_t j = 0; j < size; j++)
			zero += p[j] == 0;
		CHECK(zero == size, "%s: starts zeroed", what);
		memset(p, 0xa5, size);	/* every page touched: resident */
		check_secret_pages(what, p, size, can_lock(size));

		hook_calls = 0;
		secure_free_hook = free_hook;
		secure_free(p);
		secure_free_hook = NULL;
		CHECK(hook_calls == 1 && hook_p == p && hook_size == size && hook_nonzero == 0,
		      "%s: wiped before unmapping (%zu of %zu bytes left)", what, hook_nonzero, hook_size);
		CHECK(!page_mapped(p) && !page_mapped(size ? p + size - 1 : p), "%s: unmapped after free", what);
		CHECK(dumpable() == d0, "%s: dumpable flag back to %d after free", what, d0);
	}
	errno = 0;
	CHECK(secure_alloc(SIZE_MAX) == NULL && errno == ENOMEM, "SIZE_MAX refused with ENOMEM");
	CHECK(secure_alloc(SIZE_MAX - page) == NULL, "SIZE_MAX - page refused");
	CHECK(dumpable() == d0, "a refused allocation does not change the dumpable flag");
	secure_free(NULL);
	CHECK(dumpable() == d0, "secure_free(NULL) does not change the dumpable flag");
}

/* Two live secrets; freeing one leaves the other locked, on its own page. */
static void test_neighbours(void)
{
	int d0 = dumpable();
	uint8_t *a = secure_alloc(64), *b = secure_alloc(64), *zero_a = secure_alloc(0);
	uint8_t *zero_b = secure_alloc(0);
	char *heap = malloc(64);
	uintptr_t pa, pb, ph;
	struct vma v;

	if (!a || !b || !zero_a || !zero_b || !heap) {
		CHECK(false, "allocations for the neighbour test");
		abort();
	}
	memset(a, 0x11, 64);
	memset(b, 0x22, 64);
	pa = (uintptr_t)a / page;
	pb = (uintptr_t)b / page;
	ph = (uintptr_t)heap / page;
	CHECK(pa != pb && ph != pa && ph != pb, "two secrets and a heap block on three different pages");
	CHECK(zero_a != zero_b && (uintptr_t)zero_a / page != (uintptr_t)zero_b / page,
	      "two empty secrets are two different pages");
	CHECK(dumpable() == 0, "not dumpable with four secrets alive");

	secure_free(a);
	v = vma_of(b);
	if (can_lock(page))
		CHECK(v.found && has_flag(&v, "lo") && v.locked_kb >= page / 1024,
		      "the neighbour stays locked when a secret is freed (Locked: %lu kB)", v.locked_kb);
	else
		CHECK(true, "the neighbour stays locked # SKIP RLIMIT_MEMLOCK too low");
	CHECK(v.found && has_flag(&v, "dd") && has_flag(&v, "wf"), "the neighbour stays out of dumps and forks");
	CHECK(b[0] == 0x22 && b[63] == 0x22, "the neighbour keeps its bytes");
	CHECK(!page_mapped(a), "the freed secret's page is gone");
	CHECK(dumpable() == 0, "still not dumpable while one secret lives");
	secure_free(zero_a);
	secure_free(zero_b);
	CHECK(dumpable() == 0, "still not dumpable after freeing the empty ones");
	secure_free(b);
	CHECK(dumpable() == d0, "dumpable flag back to %d with the last secret", d0);
	free(heap);
}

/* A forked child sees zeros (and may free them); the parent keeps its bytes. */
static void test_fork(void)
{
	uint8_t *p = secure_alloc(32);
	int status = -1;
	pid_t pid;

	if (!p) {
		CHECK(false, "secure_alloc for the fork test");
		return;
	}
	memset(p, 0x5a, 32);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		size_t nonzero = 0;

		for (size_t i = 0; i < 32; i++)
			nonzero += p[i] != 0;
		secure_free(p);	/* its header is wiped too: left alone */
		_exit(nonzero ? 1 : 0);
	}
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "a forked child reads the secret as zeros and can free it (status %d)", status);
	CHECK(p[0] == 0x5a && p[31] == 0x5a, "the parent keeps the secret across fork");
	secure_free(p);
}

static void test_typed(void)
{
	int d0 = dumpable();
	struct volume_key *vk = volume_key_alloc(64);
	struct passphrase *pp = NULL;
	struct vma v;

	CHECK(vk && vk->size == 64, "volume_key_alloc(64)");
	if (vk) {
		v = vma_of(vk->key);
		CHECK(has_flag(&v, "dd") && has_flag(&v, "wf"), "a volume key is secure memory");
	}
	CHECK(passphrase_from_buffer("secret", 6, &pp) == 0 && pp->len == 6 && !strcmp(pp->data, "secret"),
	      "passphrase_from_buffer");
	if (pp) {
		v = vma_of(pp);
		CHECK(has_flag(&v, "dd") && has_flag(&v, "wf"), "a passphrase struct is secure memory");
		v = vma_of(pp->data);
		CHECK(has_flag(&v, "dd") && has_flag(&v, "wf"), "a passphrase's bytes are secure memory");
	}
	CHECK(dumpable() == 0, "not dumpable with a key and a passphrase alive");
	volume_key_free(vk);
	CHECK(dumpable() == 0, "still not dumpable with the passphrase alive");
	passphrase_free(pp);
	CHECK(dumpable() == d0, "dumpable flag back to %d", d0);
	CHECK(passphrase_alloc(PASSPHRASE_MAX_SIZE + 1, &pp) == -EINVAL && !pp && dumpable() == d0,
	      "an oversized passphrase is refused without a trace");
}

int main(void)
{
	qs_log_set_level(getenv("QS_TEST_DEBUG") ? QS_LOG_DEBUG : QS_LOG_ERR);
	page = (size_t)sysconf(_SC_PAGESIZE);
	/* setvbuf before the first secret: stdio's buffer is ordinary heap */
	setvbuf(stdout, NULL, _IOLBF, 0);
	/* start dumpable, so that getting the flag back means something */
	if (dumpable() != 1)
		prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
	CHECK(dumpable() == 1, "the test starts dumpable");

	test_sizes();
	test_neighbours();
	test_fork();
	test_typed();
	return tap_done();
}
