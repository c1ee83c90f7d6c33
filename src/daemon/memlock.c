/* What the daemon keeps in memory, and why not all of it.
 *
 * The danger: the daemon serves the slow path of a device and suspends and
 * resumes its tables. While the top device is suspended, or while a request
 * of the device is in flight to a server thread, no thread may wait
 * for I/O that needs that device: a page fault on a page of the binary or a
 * library whose file lives on the mapping itself (the root filesystem on a
 * qcowsetup image, the daemon reattached from it), or a swap-in from a swap
 * file there, would deadlock. That is why the daemon used to
 * mlockall(MCL_CURRENT | MCL_FUTURE): every library whole, an 8 MiB thread
 * stack, malloc's arenas, the caches: ~30 MiB locked per mapping, 6 GiB
 * that can never be reclaimed at 200 mappings.
 *
 * What daemon_lock_resident locks instead, once the mapping is up:
 *   - every anonymous page present (pagemap: present and not a file page):
 *     the I/O buffers, the metadata caches and cluster buffers, the remap
 *     queues (all written once at the start), the heap, the main stack and
 *     the server threads' fixed 128 KiB stacks, the libraries' relocated data;
 *     and, with mlockall(MCL_FUTURE | MCL_ONFAULT), what is mapped later, as
 *     it is touched. Anonymous memory can only come back from swap, and swap
 *     may be a file on the mapping: all of it stays resident;
 *   - the files mapped (the binary, the libraries) whole, when their file may
 *     need a qcowsetup device to be read: a filesystem on a device-mapper,
 *     loop, NBD or md device, or one whose device cannot be told (btrfs,
 *     overlayfs, NFS: major 0). That is the old cost, only where it buys
 *     something;
 *   - and nothing of files in RAM (tmpfs, ramfs: the initramfs the daemon of
 *     the root filesystem runs from, whose files stay in memory after
 *     switch_root) or on a plain disk or partition (a device with no device
 *     below it): reading a page back from those never waits for a mapping.
 * Locking the text pages in use only (MCL_ONFAULT, or the present pages
 * after the paths have run) was weighed: fault-around maps 64 KiB windows,
 * so "present" is nearly all of libc (1.4 MiB) anyway, and MCL_ONFAULT
 * counts every library's full size as locked (VmLck, RLIMIT_MEMLOCK).
 * glibc's arenas: one (M_ARENA_MAX 1: the server threads allocate nothing
 * on its I/O path), a fixed mmap threshold so that the large buffers of the
 * open (tables of big images) go back to the system when freed, and a trim
 * before the lock. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/magic.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "util.h"

void daemon_memory_setup(void)
{
	mallopt(M_ARENA_MAX, 1);
	/* fixed (no dynamic raise): large blocks are mmap'ed and returned */
	mallopt(M_MMAP_THRESHOLD, 128 << 10);
	mallopt(M_TRIM_THRESHOLD, 256 << 10);
}

static bool dir_is_empty(const char *path)
{
	DIR *dir = opendir(path);
	struct dirent *e;
	bool empty = true;

	if (!dir)
		return true;
	while (empty && (e = readdir(dir)))
		empty = e->d_name[0] == '.';
	closedir(dir);
	return empty;
}

/* Whether reading a page of the file open on fd may wait for a
 * device-mapper, loop, NBD or md device. */
static bool may_need_mapping(int fd)
{
	char path[128], real[PATH_MAX], *name;
	struct statfs sf;
	struct stat st;

	if (fstatfs(fd, &sf) == 0 && (sf.f_type == TMPFS_MAGIC || sf.f_type == RAMFS_MAGIC))
		return false;
	if (fstat(fd, &st) < 0 || major(st.st_dev) == 0)
		return true;
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u", major(st.st_dev), minor(st.st_dev));
	if (!realpath(path, real))
		return true;
	snprintf(path, sizeof(path), "%.100s/partition", real);
	if (stat(path, &st) == 0)
		*strrchr(real, '/') = '\0';	/* the disk of a partition */
	name = strrchr(real, '/') + 1;
	if (!strncmp(name, "dm-", 3) || !strncmp(name, "loop", 4) || !strncmp(name, "nbd", 3) || !strncmp(name, "md", 2))
		return true;
	snprintf(path, sizeof(path), "%.100s/slaves", real);
	return !dir_is_empty(path);
}

/* The same for the file mapped at [start, end), also when it was deleted
 * (the initramfs after switch_root). */
static bool mapped_file_may_need_mapping(uintptr_t start, uintptr_t end)
{
	char path[96];
	bool r;
	int fd;

	snprintf(path, sizeof(path), "/proc/self/map_files/%" PRIxPTR "-%" PRIxPTR, start, end);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return true;
	r = may_need_mapping(fd);
	close(fd);
	return r;
}

/* mlock the runs of [start, end) that hold anonymous memory: present and
 * not a file page (pagemap bits 63, 61), or in swap (bit 62: brought back). */
static int lock_anonymous(int pagemap, uintptr_t start, uintptr_t end, size_t page, size_t *locked)
{
	uint64_t ent[512];
	uintptr_t run = 0;
	bool in_run = false;

	for (uintptr_t a = start; a < end;) {
		size_t n = MIN((size_t)((end - a) / page), sizeof(ent) / sizeof(ent[0]));
		ssize_t got = pread(pagemap, ent, n * sizeof(ent[0]), (off_t)(a / page * sizeof(ent[0])));

		if (got <= 0)
			return got < 0 ? -errno : -EIO;
		n = (size_t)got / sizeof(ent[0]);
		for (size_t i = 0; i < n; i++, a += page) {
			bool anon = (ent[i] >> 62 & 1) || ((ent[i] >> 63 & 1) && !(ent[i] >> 61 & 1));

			if (anon && !in_run) {
				run = a;
				in_run = true;
			} else if (!anon && in_run) {
				if (mlock((void *)run, a - run) == 0)
					*locked += a - run;
				in_run = false;
			}
		}
	}
	if (in_run && mlock((void *)run, end - run) == 0)
		*locked += end - run;
	return 0;
}

int daemon_lock_resident(void)
{
	char line[PATH_MAX + 128];
	size_t page = (size_t)sysconf(_SC_PAGESIZE), files = 0, anon = 0;
	FILE *maps;
	int pagemap, r = 0;

	malloc_trim(0);
	maps = fopen("/proc/self/maps", "re");
	pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (!maps || pagemap < 0) {
		r = -errno;
		goto out;
	}
	while (fgets(line, sizeof(line), maps)) {
		uintptr_t start, end;
		unsigned long ino;
		char perms[8];

		if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %7s %*s %*s %lu", &start, &end, perms, &ino) < 4)
			continue;
		/* no access (guard pages, reservations) or the kernel's ([vdso]) */
		if (perms[0] != 'r' || strstr(line, " [v"))
			continue;
		if (ino && mapped_file_may_need_mapping(start, end)) {
			if (mlock((void *)start, end - start) == 0)
				files += end - start;
			else
				r = -errno;
		} else if (lock_anonymous(pagemap, start, end, page, &anon) < 0) {
			r = -EIO;
		}
	}
	/* what is mapped from now on: locked as it is touched */
	if (mlockall(MCL_FUTURE | MCL_ONFAULT) < 0)
		r = -errno;
	log_dbg("locked: %zu KiB of files, %zu KiB anonymous", files >> 10, anon >> 10);
out:
	if (maps)
		fclose(maps);
	if (pagemap >= 0)
		close(pagemap);
	if (r)
		log_std("Cannot lock the daemon in memory: %s.", strerror(-r));
	return r;
}

int daemon_lock_guardian(void)
{
	int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
	bool need = fd < 0 || may_need_mapping(fd);

	if (fd >= 0)
		close(fd);
	if (need && mlockall(MCL_CURRENT | MCL_FUTURE) < 0) {
		log_std("Cannot lock the guardian in memory: %s.", strerror(errno));
		return -errno;
	}
	return 0;
}

/* Touch the main thread's stack down to depth bytes below here. */
void daemon_prefault_stack(size_t depth)
{
	volatile uint8_t *p = alloca(depth);

	for (size_t i = 0; i < depth; i += 4096)
		p[i] = 0;
}

void *daemon_alloc_stack(size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	uint8_t *p = mmap(NULL, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	/* a guard page below it, and every page of it present */
	mprotect(p, page, PROT_NONE);
	memset(p + page, 0, size);
	return p + page;
}
