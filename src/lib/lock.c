/* QEMU-compatible OFD byte locks on images (see lock.h). */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "lock.h"
#include "log.h"
#include "util.h"

static const char *const perm_names[LOCK_PERM_BITS] = {
	"consistent read", "write", "write unchanged", "resize",
};

/* What qcowsetup uses and shares per mode: what QEMU 7.2 takes for a qcow2
 * image opened read-only / read-write (measured, see lock.h). */
#define PERM_USED_RO	(LOCK_PERM_CONSISTENT_READ)
#define PERM_USED_RW	(LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE | LOCK_PERM_RESIZE)
#define PERM_SHARED	(LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE_UNCHANGED)

static int ofd_lock(int fd, int byte, short type)
{
	struct flock fl = {
		.l_type = type,
		.l_whence = SEEK_SET,
		.l_start = byte,
		.l_len = 1,
	};

	if (fcntl(fd, F_OFD_SETLK, &fl) < 0)
		return -errno;
	return 0;
}

/* Is byte locked by another open file description? 1 yes, 0 no, -errno. */
static int ofd_test(int fd, int byte)
{
	struct flock fl = {
		.l_type = F_WRLCK,
		.l_whence = SEEK_SET,
		.l_start = byte,
		.l_len = 1,
	};

	if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
		return -errno;
	return fl.l_type != F_UNLCK;
}

int lock_image_release(int fd)
{
	int i, r, ret = 0;

	for (i = 0; i < LOCK_PERM_BITS; i++) {
		r = ofd_lock(fd, LOCK_PERM_BASE + i, F_UNLCK);
		if (r < 0 && !ret)
			ret = r;
		r = ofd_lock(fd, LOCK_SHARED_BASE + i, F_UNLCK);
		if (r < 0 && !ret)
			ret = r;
	}
	return ret;
}

int lock_image_query(int fd, unsigned int *used, unsigned int *unshared)
{
	unsigned int u = 0, s = 0;
	int i, r;

	for (i = 0; i < LOCK_PERM_BITS; i++) {
		r = ofd_test(fd, LOCK_PERM_BASE + i);
		if (r < 0)
			return r;
		if (r)
			u |= 1u << i;
		r = ofd_test(fd, LOCK_SHARED_BASE + i);
		if (r < 0)
			return r;
		if (r)
			s |= 1u << i;
	}
	if (used)
		*used = u;
	if (unshared)
		*unshared = s;
	return 0;
}

/* Does this /proc/PID/fdinfo/N hold an OFD lock covering byte of the file
 * dev:ino? The lines read "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:123 100 101". */
static bool fdinfo_holds(const char *fdinfo, const struct stat *st, int byte)
{
	char line[256], want[64];
	bool found = false;
	FILE *f;

	snprintf(want, sizeof(want), "%02x:%02x:%llu ", major(st->st_dev), minor(st->st_dev),
		 (unsigned long long)st->st_ino);
	f = fopen(fdinfo, "re");
	if (!f)
		return false;
	while (!found && fgets(line, sizeof(line), f)) {
		unsigned long long start;
		char end[32];
		char *p;

		if (strncmp(line, "lock:", 5) || !strstr(line, "OFDLCK"))
			continue;
		p = strstr(line, want);
		if (!p || sscanf(p + strlen(want), "%llu %31s", &start, end) != 2)
			continue;
		if (start <= (unsigned long long)byte &&
		    (!strcmp(end, "EOF") || strtoull(end, NULL, 10) >= (unsigned long long)byte))
			found = true;
	}
	fclose(f);
	return found;
}

/* Best effort: name the processes whose descriptors of the file hold byte,
 * into buf ("pid 123 (qemu-io), ..."). Empty when none is found: the lock
 * then belongs to a file held by the kernel (a loop device) or to a
 * process in another PID namespace. */
static void find_holders(int fd, int byte, char *buf, size_t size)
{
	struct dirent *pe, *fe;
	struct stat st, fst;
	size_t len = 0;
	int n = 0;
	DIR *proc, *fds;

	buf[0] = '\0';
	if (fstat(fd, &st) < 0 || !(proc = opendir("/proc")))
		return;
	while (n < 4 && (pe = readdir(proc))) {
		char path[64], *end;
		long pid = strtol(pe->d_name, &end, 10);

		if (!isdigit((unsigned char)pe->d_name[0]) || *end || pid <= 0)
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/fd", pid);
		fds = opendir(path);
		if (!fds)
			continue;
		while ((fe = readdir(fds))) {
			char fpath[96], info[96], comm[64] = "?";
			long nfd = strtol(fe->d_name, &end, 10);
			FILE *cf;

			if (!isdigit((unsigned char)fe->d_name[0]) || *end ||
			    (pid == (long)getpid() && nfd == fd))	/* our own locks */
				continue;
			snprintf(fpath, sizeof(fpath), "/proc/%ld/fd/%ld", pid, nfd);
			if (stat(fpath, &fst) < 0 || fst.st_dev != st.st_dev || fst.st_ino != st.st_ino)
				continue;
			snprintf(info, sizeof(info), "/proc/%ld/fdinfo/%ld", pid, nfd);
			if (!fdinfo_holds(info, &st, byte))
				continue;
			snprintf(info, sizeof(info), "/proc/%ld/comm", pid);
			cf = fopen(info, "re");
			if (cf) {
				if (fgets(comm, sizeof(comm), cf))
					comm[strcspn(comm, "\n")] = '\0';
				fclose(cf);
			}
			if (len < size)
				len += (size_t)snprintf(buf + len, size - len, "%spid %ld (%s)",
							n ? ", " : "", pid, comm);
			n++;
			break;
		}
		closedir(fds);
	}
	closedir(proc);
}

static void report_conflict(int fd, const char *path, int byte)
{
	int bit = byte % 100;
	bool unshared = byte >= LOCK_SHARED_BASE;
	char holders[256], who[320];

	find_holders(fd, byte, holders, sizeof(holders));
	if (holders[0])
		snprintf(who, sizeof(who), "held by %s", holders);
	else
		snprintf(who, sizeof(who), "held by no process here: a loop device "
			 "(an existing mapping?) or another host");

	if (!unshared && bit == 1)
		log_err("%s: the image is in use for writing by another process (QEMU?) "
			"(lock byte %d %s)", path, byte, who);
	else if (!unshared)
		log_err("%s: the image is in use by another process (QEMU?) with the "
			"\"%s\" permission (lock byte %d %s)", path, perm_names[bit], byte, who);
	else if (bit == 1)
		log_err("%s: the image is open in another process (QEMU?) that does not "
			"allow others to write to it; close it there or map the image "
			"read-only (lock byte %d %s)", path, byte, who);
	else
		log_err("%s: the image is open in another process (QEMU?) that does not "
			"share the \"%s\" permission (lock byte %d %s)", path,
			perm_names[bit], byte, who);
}

static void report_lock_error(const char *path, int byte, int r)
{
	if (r == -EINVAL || r == -ENOLCK || r == -EOPNOTSUPP)
		log_err("%s: cannot lock the image (byte %d): %s: the filesystem or "
			"kernel does not support open file description locks",
			path, byte, strerror(-r));
	else
		log_err("%s: cannot lock the image (byte %d): %s", path, byte, strerror(-r));
}

/* Taking the locks failed at byte with r (1: a conflict found by a test):
 * say why, release them all. -EBUSY for a conflict, else r. */
static int lock_failed(int fd, const char *path, int byte, int r)
{
	/* A read lock refused (EAGAIN) means someone holds a write lock on the
	 * byte: a conflict as well. */
	if (r == 1 || r == -EAGAIN || r == -EACCES) {
		report_conflict(fd, path, byte);
		r = -EBUSY;
	} else {
		report_lock_error(path, byte, r);
	}
	(void)lock_image_release(fd);
	return r;
}

static int lock_image_checked(int fd, bool write, const char *path, bool check)
{
	unsigned int used = write ? PERM_USED_RW : PERM_USED_RO;
	unsigned int shared = PERM_SHARED;
	int i, r, byte = 0;

	if (fd < 0)
		return -EBADF;
	if (!path)
		path = "image";

	/* Apply (raw_apply_lock_bytes) ... */
	for (i = 0; i < LOCK_PERM_BITS; i++) {
		if (used & (1u << i)) {
			byte = LOCK_PERM_BASE + i;
			r = ofd_lock(fd, byte, F_RDLCK);
			if (r < 0)
				goto fail;
		}
	}
	for (i = 0; i < LOCK_PERM_BITS; i++) {
		if (!(shared & (1u << i))) {
			byte = LOCK_SHARED_BASE + i;
			r = ofd_lock(fd, byte, F_RDLCK);
			if (r < 0)
				goto fail;
		}
	}

	/* ... then check (raw_check_lock_bytes): nobody refuses to share what
	 * we use, nobody uses what we do not share. */
	for (i = 0; check && i < LOCK_PERM_BITS; i++) {
		if (used & (1u << i)) {
			byte = LOCK_SHARED_BASE + i;
			r = ofd_test(fd, byte);
			if (r)
				goto fail;
		}
	}
	for (i = 0; check && i < LOCK_PERM_BITS; i++) {
		if (!(shared & (1u << i))) {
			byte = LOCK_PERM_BASE + i;
			r = ofd_test(fd, byte);
			if (r)
				goto fail;
		}
	}
	log_dbg("%s: locked for %s (QEMU lock bytes)", path, write ? "read-write" : "read-only");
	return 0;

fail:
	return lock_failed(fd, path, byte, r);
}

/* How many OFD locks cover byte of the file of fd (/proc/locks: "1: OFDLCK
 * ADVISORY  READ -1 fe:00:123 201 201"), or -errno. */
static int count_lock_holders(int fd, int byte)
{
	char line[256], want[64];
	struct stat st;
	int n = 0;
	FILE *f;

	if (fstat(fd, &st) < 0)
		return -errno;
	snprintf(want, sizeof(want), "%02x:%02x:%llu ", major(st.st_dev), minor(st.st_dev),
		 (unsigned long long)st.st_ino);
	f = fopen("/proc/locks", "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long start;
		char end[32];
		char *p = strstr(line, want);

		if (!p || !strstr(line, "OFDLCK") || sscanf(p + strlen(want), "%llu %31s", &start, end) != 2)
			continue;
		if (start <= (unsigned long long)byte &&
		    (!strcmp(end, "EOF") || strtoull(end, NULL, 10) >= (unsigned long long)byte))
			n++;
	}
	fclose(f);
	return n;
}

int lock_image_upgrade(int fd, const char *path)
{
	static const int mine_too[] = { LOCK_SHARED_BASE + 1, LOCK_SHARED_BASE + 3 };
	static const int others[] = { LOCK_SHARED_BASE + 0, LOCK_SHARED_BASE + 2, LOCK_PERM_BASE + 1,
				      LOCK_PERM_BASE + 3 };
	int byte = 0, r = 0;

	if (fd < 0)
		return -EBADF;
	for (int i = 0; i < LOCK_PERM_BITS && !r; i++) {
		if (PERM_USED_RW & (1u << i))
			r = ofd_lock(fd, byte = LOCK_PERM_BASE + i, F_RDLCK);
		if (!r && !(PERM_SHARED & (1u << i)))
			r = ofd_lock(fd, byte = LOCK_SHARED_BASE + i, F_RDLCK);
	}
	/* the mapping's read-only description holds none of these */
	for (size_t i = 0; !r && i < ARRAY_SIZE(others); i++)
		r = ofd_test(fd, byte = others[i]);
	/* these it holds, and so does fd now: a third is someone else */
	for (size_t i = 0; !r && i < ARRAY_SIZE(mine_too); i++) {
		r = count_lock_holders(fd, byte = mine_too[i]);
		if (r >= 0)
			r = r > 2;
	}
	if (r)
		return lock_failed(fd, path, byte, r);
	log_dbg("%s: locked for read-write (QEMU lock bytes, upgraded)", path);
	return 0;
}

int lock_image(int fd, bool write, const char *path)
{
	return lock_image_checked(fd, write, path, true);
}

int lock_image_unchecked(int fd, bool write, const char *path)
{
	return lock_image_checked(fd, write, path, false);
}

int lock_image_replaceable(const char *path)
{
	int fd, r;

	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	r = lock_image(fd, true, path);
	close(fd);
	return r;
}
