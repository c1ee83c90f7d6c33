/* The kernel-facing wrappers for real: dm.c, loop.c, keyring.c, lock.c.
 *
 *   sys-wrappers host DIR              no root kernel features needed: locks
 *                                      against qemu-io, keyring, argument
 *                                      checks (run on the build host)
 *   sys-wrappers vm [--udev] [--targets N] EXT4DIR [OTHERDIR...]
 *                                      inside the test VM (tests/vm/guest/sys.sh,
 *                                      run by tests/vm/test-sys.sh):
 *                                      device-mapper, loop, dm-crypt with a
 *                                      logon key, locks held by loop devices
 *   sys-wrappers mem N                 peak memory of building an N-target
 *                                      table through libdevmapper (no kernel
 *                                      needed: the ioctl fails)
 *
 * One line per check: "PASS: ...", "FAIL: ...", "SKIP: ...", then a summary.
 * Exit 0 all passed, 1 a failure, 77 nothing could run. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dm.h"
#include "keyring.h"
#include "lock.h"
#include "log.h"
#include "loop.h"

static int passed, failed, skipped;
static bool udev_mode;

__attribute__((format(printf, 2, 3)))
static void check(bool ok, const char *fmt, ...)
{
	va_list ap;

	printf("%s: ", ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
	if (ok)
		passed++;
	else
		failed++;
}

__attribute__((format(printf, 1, 2)))
static void skip(const char *fmt, ...)
{
	va_list ap;

	printf("SKIP: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
	skipped++;
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
	va_list ap;

	printf("NOTE: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

/* Messages of the code under test, prefixed, so that the log shows them. */
static void log_cb(enum qs_log_level level, const char *msg, void *userdata)
{
	(void)userdata;
	printf("  [%s] %s\n", level == QS_LOG_ERR ? "err" : level == QS_LOG_DEBUG ? "dbg" : "msg", msg);
	fflush(stdout);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The type of the filesystem holding dir, from /proc/self/mounts (statfs
 * will not do: 9p reports the f_type of the host's filesystem). */
static const char *fs_name(const char *dir)
{
	static char best_type[32];
	char real[4096], mnt[4096], type[32];
	size_t best = 0;
	FILE *f;

	snprintf(best_type, sizeof(best_type), "?");
	if (!realpath(dir, real) || !(f = fopen("/proc/self/mounts", "re")))
		return best_type;
	while (fscanf(f, "%*s %4095s %31s %*[^\n]", mnt, type) == 2) {
		size_t len = strlen(mnt);

		if (!strncmp(real, mnt, len) && (real[len] == '/' || !real[len] || len == 1) &&
		    len >= best) {
			best = len;
			snprintf(best_type, sizeof(best_type), "%s", type);
		}
	}
	fclose(f);
	return best_type;
}

/* A file of size bytes whose every 4-byte word is its offset ^ seed. */
static int make_file(const char *path, size_t size, uint32_t seed)
{
	uint32_t *buf;
	size_t i, off;
	int fd, r = 0;

	buf = malloc(1 << 20);
	if (!buf)
		return -ENOMEM;
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		free(buf);
		return -errno;
	}
	for (off = 0; off < size && !r; off += 1 << 20) {
		for (i = 0; i < (1 << 20) / 4; i++)
			buf[i] = (uint32_t)(off + i * 4) ^ seed;
		if (pwrite(fd, buf, 1 << 20, (off_t)off) != 1 << 20)
			r = -EIO;
	}
	if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	free(buf);
	return r;
}

static bool pattern_ok(const void *p, size_t len, uint64_t off, uint32_t seed)
{
	const uint32_t *w = p;
	size_t i;

	for (i = 0; i < len / 4; i++)
		if (w[i] != ((uint32_t)(off + i * 4) ^ seed))
			return false;
	return true;
}

/* Read len bytes at off from path with O_DIRECT (no page cache). */
static int read_direct(const char *path, void *buf, size_t len, off_t off)
{
	int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = pread(fd, buf, len, off);
	close(fd);
	return n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
}

static int write_direct(const char *path, const void *buf, size_t len, off_t off)
{
	int fd = open(path, O_WRONLY | O_DIRECT | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = pwrite(fd, buf, len, off);
	if (fsync(fd) < 0 && n == (ssize_t)len)
		n = -1;
	close(fd);
	return n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
}

static void *aligned(size_t len)
{
	void *p = NULL;

	if (posix_memalign(&p, 4096, len))
		return NULL;
	return p;
}

static bool run_ok(const char *cmd)
{
	int st = system(cmd);

	return st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static bool have_program(const char *name)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1", name);
	return run_ok(cmd);
}

/* ------------------------------------------------------------ callbacks */

struct lines {
	int count;
	char first[512];
};

static int collect_line(void *opaque, uint64_t start, uint64_t length, const char *type,
			const char *params)
{
	struct lines *l = opaque;

	if (!l->count++)
		snprintf(l->first, sizeof(l->first), "%" PRIu64 " %" PRIu64 " %s%s%s", start,
			 length, type, *params ? " " : "", params);
	return 0;
}

struct find_dev {
	const char *name;
	char uuid[DM_INFO_UUID_SIZE];
	bool found;
};

static int find_device(void *opaque, const char *name, const char *uuid, uint32_t major,
		       uint32_t minor)
{
	struct find_dev *f = opaque;

	(void)major;
	(void)minor;
	if (strcmp(name, f->name))
		return 0;
	f->found = true;
	snprintf(f->uuid, sizeof(f->uuid), "%s", uuid);
	return 0;
}

static bool device_listed(const char *name, const char *uuid)
{
	struct find_dev f = { .name = name };

	return dm_list_devices(find_device, &f) == 0 && f.found && !strcmp(f.uuid, uuid);
}

static bool node_matches(const char *name, uint32_t major, uint32_t minor, bool *symlink)
{
	char path[256];
	struct stat st, lst;

	snprintf(path, sizeof(path), "/dev/mapper/%s", name);
	if (stat(path, &st) < 0 || lstat(path, &lst) < 0)
		return false;
	if (symlink)
		*symlink = S_ISLNK(lst.st_mode);
	return S_ISBLK(st.st_mode) && st.st_rdev == makedev(major, minor);
}

static bool node_exists(const char *name)
{
	char path[256];
	struct stat st;

	snprintf(path, sizeof(path), "/dev/mapper/%s", name);
	return lstat(path, &st) == 0;
}

static bool device_exists(const char *name)
{
	struct dm_dev_info info;

	return dm_device_info(name, &info) == 0 && info.exists;
}

/* udev: the property of a dm device in the udev database. */
static bool udev_property(uint32_t minor, const char *prop)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "udevadm info --query=property --name=/dev/dm-%u | "
		 "grep -qx '%s'", minor, prop);
	return run_ok(cmd);
}

/* ------------------------------------------------------------ host tests */

/* A qemu-io holding the image open, as a child whose stdin we keep. */
static FILE *qemu_io_start(const char *args, const char *path)
{
	char cmd[1024];
	FILE *p;

	snprintf(cmd, sizeof(cmd), "exec qemu-io %s '%s' >/dev/null 2>&1", args, path);
	p = popen(cmd, "w");
	usleep(700 * 1000);	/* let it open the image and lock it */
	return p;
}

static bool qemu_io_fails_with(const char *args, const char *path, const char *msg)
{
	char cmd[1024];

	snprintf(cmd, sizeof(cmd), "qemu-io %s -c 'write 0 512' '%s' 2>&1 </dev/null | "
		 "grep -qF '%s'", args, path, msg);
	return run_ok(cmd);
}

static void test_locks(const char *dir)
{
	char img[512], raw[512];
	unsigned int used, unshared;
	FILE *q;
	int fd, fd2, r;

	snprintf(img, sizeof(img), "%s/lock.qcow2", dir);
	snprintf(raw, sizeof(raw), "%s/lock.raw", dir);
	if (!have_program("qemu-io") || !have_program("qemu-img")) {
		skip("locks: qemu-io/qemu-img not installed");
		return;
	}
	{
		char cmd[1200];

		snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 '%s' 16M", img);
		if (!run_ok(cmd)) {
			check(false, "locks: qemu-img create %s", img);
			return;
		}
	}

	/* Read-write lock, then QEMU wants to write: refused as QEMU words it. */
	fd = open(img, O_RDWR | O_CLOEXEC);
	r = lock_image(fd, true, img);
	check(r == 0, "lock_image(rw) on a free image: %d", r);
	check(qemu_io_fails_with("-f qcow2", img, "Failed to get \"write\" lock"),
	      "lock_image(rw) held: qemu-io write fails with 'Failed to get \"write\" lock'");
	check(qemu_io_fails_with("-r -f qcow2", img, "Failed to get shared \"write\" lock"),
	      "lock_image(rw) held: qemu-io -r fails with 'Failed to get shared \"write\" lock'");
	fd2 = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image_query(fd2, &used, &unshared);
	check(r == 0 && used == (LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE | LOCK_PERM_RESIZE) &&
	      unshared == (LOCK_PERM_WRITE | LOCK_PERM_RESIZE),
	      "lock_image(rw) bytes seen from another description: used 0x%x (100,101,103) "
	      "unshared 0x%x (201,203)", used, unshared);
	r = lock_image(fd2, false, img);
	check(r == -EBUSY, "a second lock_image(ro) while rw is held: -EBUSY (%d)", r);
	r = lock_image(fd2, true, img);
	check(r == -EBUSY, "a second lock_image(rw) while rw is held: -EBUSY (%d)", r);
	r = lock_image_query(fd, &used, &unshared);
	check(r == 0 && used == 0 && unshared == 0,
	      "the failed attempts left no lock behind (query from the holder: 0x%x 0x%x)",
	      used, unshared);
	close(fd2);
	r = lock_image_release(fd);
	check(r == 0, "lock_image_release: %d", r);
	fd2 = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image_query(fd2, &used, &unshared);
	check(r == 0 && !used && !unshared, "after release no byte is held (0x%x 0x%x)", used, unshared);
	close(fd2);
	close(fd);

	/* Read-only lock: qemu-io -r works, qemu-io rw does not. */
	fd = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image(fd, false, img);
	check(r == 0, "lock_image(ro): %d", r);
	check(qemu_io_fails_with("-f qcow2", img, "Failed to get \"write\" lock"),
	      "lock_image(ro) held: qemu-io write fails with 'Failed to get \"write\" lock'");
	{
		char cmd[1200];

		snprintf(cmd, sizeof(cmd), "qemu-io -r -f qcow2 -c 'read 0 512' '%s' >/dev/null 2>&1", img);
		check(run_ok(cmd), "lock_image(ro) held: qemu-io -r reads");
	}
	fd2 = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image(fd2, false, img);
	check(r == 0, "two read-only lockers coexist: %d", r);
	close(fd2);
	fd2 = open(img, O_RDWR | O_CLOEXEC);
	r = lock_image(fd2, true, img);
	check(r == -EBUSY, "lock_image(rw) while ro is held: -EBUSY (%d)", r);
	close(fd2);
	close(fd);

	/* QEMU first. */
	q = qemu_io_start("-f qcow2", img);
	fd = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image(fd, false, img);
	check(r == -EBUSY, "qemu-io (rw) running: lock_image(ro) -EBUSY (%d)", r);
	r = lock_image(fd, true, img);
	check(r == -EBUSY, "qemu-io (rw) running: lock_image(rw) -EBUSY (%d)", r);
	r = lock_image_query(fd, &used, &unshared);
	check(r == 0 && used == 0x0b && unshared == 0x0a,
	      "qemu-io (rw) holds used 0x%x unshared 0x%x: bytes 100,101,103,201,203", used, unshared);
	if (q)
		pclose(q);
	close(fd);

	q = qemu_io_start("-r -f qcow2", img);
	fd = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image_query(fd, &used, &unshared);
	check(r == 0 && used == 0x01 && unshared == 0x0a,
	      "qemu-io -r holds used 0x%x unshared 0x%x: bytes 100,201,203", used, unshared);
	r = lock_image(fd, false, img);
	check(r == 0, "qemu-io -r running: lock_image(ro) succeeds (%d)", r);
	close(fd);
	fd = open(img, O_RDWR | O_CLOEXEC);
	r = lock_image(fd, true, img);
	check(r == -EBUSY, "qemu-io -r running: lock_image(rw) -EBUSY (%d)", r);
	close(fd);
	if (q)
		pclose(q);

	q = qemu_io_start("-f raw", img);	/* raw: QEMU shares everything */
	fd = open(img, O_RDONLY | O_CLOEXEC);
	r = lock_image_query(fd, &used, &unshared);
	check(r == 0 && used == 0x03 && unshared == 0,
	      "qemu-io -f raw holds used 0x%x unshared 0x%x: bytes 100,101", used, unshared);
	r = lock_image(fd, false, img);
	check(r == -EBUSY, "qemu-io -f raw (writing) running: lock_image(ro) -EBUSY (%d)", r);
	close(fd);
	if (q)
		pclose(q);

	fd = open(img, O_RDWR | O_CLOEXEC);
	r = lock_image(fd, true, img);
	check(r == 0, "every qemu-io gone: lock_image(rw) succeeds (%d)", r);
	close(fd);
	check(lock_image(-1, false, img) == -EBADF, "lock_image(-1): -EBADF");
	unlink(img);
	unlink(raw);
}

/* Right after keyring_remove, /proc/keys may still show the key revoked
 * ("R" flag, payload 0 bytes) until the garbage collector runs (soon: it is
 * unlinked); it must then be gone. */
static bool keys_gone(const char *desc)
{
	char line[512];
	FILE *f;
	int i;

	for (i = 0; i < 100; i++) {
		bool found = false;

		f = fopen("/proc/keys", "re");
		if (!f)
			return true;
		while (!found && fgets(line, sizeof(line), f))
			found = strstr(line, desc) != NULL;
		fclose(f);
		if (!found)
			return true;
		if (i == 0)
			note("/proc/keys right after the removal: %.*s", (int)strcspn(line, "\n"), line);
		usleep(50000);
	}
	return false;
}

static void test_keyring_host(void)
{
	static const uint8_t key[32] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 };
	int32_t serial = 0, found = 0;
	int r;

	check(keyring_add_logon("nocolon", key, sizeof(key), &serial) == -EINVAL,
	      "keyring_add_logon: description without \"service:\" -> -EINVAL");
	check(keyring_add_logon(":x", key, sizeof(key), &serial) == -EINVAL,
	      "keyring_add_logon: empty service -> -EINVAL");
	check(keyring_add_logon("qcowsetup:t", key, 0, &serial) == -EINVAL,
	      "keyring_add_logon: empty key -> -EINVAL");
	check(keyring_add_logon("qcowsetup:t", NULL, 32, &serial) == -EINVAL,
	      "keyring_add_logon: NULL key -> -EINVAL");
	check(keyring_add_logon("qcowsetup:t", key, KEYRING_LOGON_MAX + 1, &serial) == -EINVAL,
	      "keyring_add_logon: key over 32767 bytes -> -EINVAL");
	check(keyring_remove(0) == -EINVAL, "keyring_remove(0) -> -EINVAL");

	r = keyring_add_logon("qcowsetup:sys-wrappers:L0", key, sizeof(key), &serial);
	if (r == -ENOSYS) {
		skip("keyring: the kernel has no keys");
		return;
	}
	check(r == 0 && serial > 0, "keyring_add_logon into the thread keyring: %d, serial %d", r, serial);
	r = keyring_search("logon", "qcowsetup:sys-wrappers:L0", &found);
	check(r == 0 && found == serial, "the key is reachable from this thread (search: %d)", r);
	/* Children do not inherit the thread keyring. */
	{
		pid_t pid = fork();
		int st;

		if (pid == 0)
			_exit(keyring_search("logon", "qcowsetup:sys-wrappers:L0", NULL) == -ENOKEY ? 0 : 1);
		check(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "a child process does not see the key (thread keyring)");
	}
	r = keyring_remove(serial);
	check(r == 0, "keyring_remove: %d", r);
	r = keyring_search("logon", "qcowsetup:sys-wrappers:L0", NULL);
	check(r == -ENOKEY, "after keyring_remove the key is not found (%d)", r);
	r = keyring_remove(serial);
	check(r == 0 || r == -ENOKEY, "keyring_remove twice: %d (0 or -ENOKEY)", r);
	check(keys_gone("qcowsetup:sys-wrappers:L0"), "the key leaves /proc/keys (revoked, then collected)");
}

static void test_args(void)
{
	struct dm_table_target t = { 0, 8, "zero", "" };
	struct dm_table tbl = { .count = 1, .targets = &t };
	struct dm_table empty = { .count = 0 };
	char longname[200];
	struct loop_dev ld;

	memset(longname, 'a', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	check(dm_create_device("a/b", NULL, false, false, &tbl, NULL, NULL) == -EINVAL,
	      "dm_create_device: name with '/' -> -EINVAL");
	check(dm_create_device("", NULL, false, false, &tbl, NULL, NULL) == -EINVAL,
	      "dm_create_device: empty name -> -EINVAL");
	check(dm_create_device(longname, NULL, false, false, &tbl, NULL, NULL) == -ENAMETOOLONG,
	      "dm_create_device: 199-character name -> -ENAMETOOLONG");
	check(dm_create_device("qs_t_x", longname, false, false, &tbl, NULL, NULL) == -ENAMETOOLONG,
	      "dm_create_device: 199-character UUID -> -ENAMETOOLONG");
	check(dm_create_device("qs_t_x", NULL, false, false, &empty, NULL, NULL) == -EINVAL,
	      "dm_create_device: empty table -> -EINVAL");
	check(dm_check_target("bad/type") == -EINVAL, "dm_check_target(\"bad/type\") -> -EINVAL");
	check(loop_attach(-1, true, false, false, &ld) == -EBADF, "loop_attach(-1) -> -EBADF");
	check(loop_attach(9999, true, false, false, &ld) == -EBADF, "loop_attach(closed fd) -> -EBADF");
}

/* ------------------------------------------------------------ memory */

struct gen {
	uint64_t sectors_per_target;
	unsigned int dev_major, dev_minor;
	uint64_t dev_sectors;
};

/* Shuffled linear targets of the same size over one device. */
static int gen_target(void *opaque, size_t i, struct dm_table_target *t, char *buf, size_t size)
{
	const struct gen *g = opaque;
	uint64_t slots = g->dev_sectors / g->sectors_per_target;
	uint64_t slot = (i * 2654435761u) % slots;

	t->start = i * g->sectors_per_target;
	t->length = g->sectors_per_target;
	t->type = "linear";
	snprintf(buf, size, "%u:%u %" PRIu64, g->dev_major, g->dev_minor, slot * g->sectors_per_target);
	t->params = buf;
	return 0;
}

static long maxrss_kib(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_maxrss;
}

/* In a child: create an n-target table; prints the peak RSS growth. */
static int measure_create(size_t n, const char *name, unsigned int maj, unsigned int min,
			  uint64_t dev_sectors, double *seconds, long *peak_kib)
{
	int pfd[2], st;
	pid_t pid;
	char buf[128] = "";

	if (pipe(pfd) < 0)
		return -errno;
	pid = fork();
	if (pid == 0) {
		struct gen g = { 8, maj, min, dev_sectors };
		struct dm_table tbl = { .count = n, .target_fn = gen_target, .opaque = &g };
		long before = maxrss_kib();
		double t0 = now();
		int r;

		r = dm_create_device(name, NULL, true, true, &tbl, NULL, NULL);
		dprintf(pfd[1], "%d %.3f %ld\n", r, now() - t0, maxrss_kib() - before);
		_exit(0);
	}
	close(pfd[1]);
	if (read(pfd[0], buf, sizeof(buf) - 1) <= 0)
		buf[0] = '\0';
	close(pfd[0]);
	waitpid(pid, &st, 0);
	{
		int r = -EIO;

		if (sscanf(buf, "%d %lf %ld", &r, seconds, peak_kib) != 3)
			return -EIO;
		return r;
	}
}

/* ------------------------------------------------------------ VM tests */

static void test_control(void)
{
	int r;
	pid_t pid;
	int st;

	r = dm_check_control();
	check(r == 0, "dm_check_control: %d", r);
	check(dm_udev_in_use() == udev_mode, "dm_udev_in_use() = %d (udev mode %d)",
	      dm_udev_in_use(), udev_mode);
	check(dm_check_target("linear") == 0, "dm_check_target(linear)");
	check(dm_check_target("crypt") == 0, "dm_check_target(crypt)");
	/* The modprobe path: unload dm-zero, then ask for it. */
	if (run_ok("grep -q '^dm_zero ' /proc/modules && rmmod dm_zero 2>/dev/null")) {
		check(!run_ok("grep -q '^dm_zero ' /proc/modules"), "dm_zero unloaded for the test");
		r = dm_check_target("zero");
		check(r == 0 && run_ok("grep -q '^dm_zero ' /proc/modules"),
		      "dm_check_target(zero) loaded the module with modprobe: %d", r);
	} else {
		r = dm_check_target("zero");
		check(r == 0, "dm_check_target(zero): %d (dm_zero could not be unloaded first)", r);
	}
	r = dm_check_target("nosuchtarget");
	check(r == -ENODEV, "dm_check_target(nosuchtarget): -ENODEV (%d)", r);

	pid = fork();
	if (pid == 0) {
		if (setgid(65534) < 0 || setuid(65534) < 0)
			_exit(2);
		_exit(dm_check_control() == -EACCES ? 0 : 1);
	}
	r = waitpid(pid, &st, 0) == pid && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	check(r == 0, "dm_check_control as nobody: -EACCES (child exit %d)", r);
}

static void test_dm_basic(void)
{
	struct dm_table_target t = { 0, 2048, "zero", "" };
	struct dm_table tbl = { .count = 1, .targets = &t };
	struct dm_dev_info info;
	struct lines l = { 0 };
	uint32_t maj = 0, min = 0;
	bool symlink = false, ok;
	char buf[4096];
	int fd, r, ro = 0;
	size_t i;
	bool zeros = true;

	r = dm_create_device("qs_t_zero", "QCOW2-TEST-zero", true, false, &tbl, &maj, &min);
	check(r == 0, "dm_create_device(zero, read-only): %d (%u:%u)", r, maj, min);
	r = dm_device_info("qs_t_zero", &info);
	check(r == 0 && info.exists && info.read_only && !info.suspended && info.open_count == 0 &&
	      info.target_count == 1 && info.major == maj && info.minor == min &&
	      !strcmp(info.uuid, "QCOW2-TEST-zero") && info.live_table && !info.inactive_table,
	      "dm_device_info: exists ro=%d suspended=%d open=%d targets=%u uuid=%s",
	      info.read_only, info.suspended, info.open_count, info.target_count, info.uuid);
	ok = node_matches("qs_t_zero", maj, min, &symlink);
	check(ok, "/dev/mapper/qs_t_zero is the block device %u:%u (%s)", maj, min,
	      symlink ? "a symlink: made by udev" : "a node: made by libdevmapper");
	if (udev_mode) {
		check(symlink, "with udev, udev made the /dev/mapper entry");
		check(access("/dev/disk/by-id/dm-name-qs_t_zero", F_OK) == 0,
		      "with udev, a visible device gets /dev/disk/by-id/dm-name-qs_t_zero");
		check(!udev_property(min, "DM_UDEV_DISABLE_DISK_RULES_FLAG=1"),
		      "with udev, a visible device has no DISABLE_DISK_RULES flag");
	} else {
		check(!symlink, "without udev, libdevmapper made a real node");
	}
	fd = open("/dev/mapper/qs_t_zero", O_RDONLY | O_CLOEXEC);
	check(fd >= 0 && pread(fd, buf, sizeof(buf), 0) == sizeof(buf), "reading the zero device");
	for (i = 0; i < sizeof(buf); i++)
		zeros &= buf[i] == 0;
	check(zeros, "it reads zeros");
	check(fd >= 0 && ioctl(fd, BLKROGET, &ro) == 0 && ro == 1, "BLKROGET says read-only");

	r = dm_remove_device("qs_t_zero", false, false);
	check(r == -EBUSY && device_exists("qs_t_zero"),
	      "dm_remove_device of an open device: -EBUSY (%d), still there", r);
	if (fd >= 0)
		close(fd);

	check(dm_get_table("qs_t_zero", collect_line, &l) == 0 && l.count == 1 &&
	      !strcmp(l.first, "0 2048 zero"), "dm_get_table: \"%s\"", l.first);
	memset(&l, 0, sizeof(l));
	check(dm_get_status("qs_t_zero", collect_line, &l) == 0 && l.count == 1 &&
	      !strncmp(l.first, "0 2048 zero", 11), "dm_get_status: \"%s\"", l.first);
	check(device_listed("qs_t_zero", "QCOW2-TEST-zero"), "dm_list_devices lists it with its UUID");

	r = dm_create_device("qs_t_zero", NULL, false, false, &tbl, NULL, NULL);
	check(r == -EEXIST, "dm_create_device with an existing name: -EEXIST (%d)", r);
	r = dm_create_device("qs_t_zero2", "QCOW2-TEST-zero", false, false, &tbl, NULL, NULL);
	check(r == -EBUSY && !device_exists("qs_t_zero2") && !node_exists("qs_t_zero2"),
	      "dm_create_device with an existing UUID: -EBUSY (%d), nothing left", r);

	r = dm_remove_device("qs_t_zero", false, false);
	check(r == 0, "dm_remove_device: %d", r);
	check(!device_exists("qs_t_zero") && !node_exists("qs_t_zero"),
	      "the device and its /dev/mapper entry are gone");
	r = dm_remove_device("qs_t_zero", false, false);
	check(r == -ENODEV, "dm_remove_device of a missing device: -ENODEV (%d)", r);
	r = dm_device_info("qs_t_zero", &info);
	check(r == 0 && !info.exists, "dm_device_info of a missing device: exists=0");

	/* A bad table: the kernel refuses it, nothing is left. */
	{
		struct dm_table_target bad = { 0, 2048, "linear", "999:999 0" };
		struct dm_table btbl = { .count = 1, .targets = &bad };

		r = dm_create_device("qs_t_bad", NULL, false, false, &btbl, NULL, NULL);
		check(r < 0 && !device_exists("qs_t_bad") && !node_exists("qs_t_bad"),
		      "a table the kernel refuses: %d, no device and no node left", r);
	}

	/* Deferred removal. */
	r = dm_create_device("qs_t_def", NULL, false, false, &tbl, &maj, &min);
	fd = open("/dev/mapper/qs_t_def", O_RDONLY | O_CLOEXEC);
	r = dm_remove_device("qs_t_def", true, false);
	if (dm_device_info("qs_t_def", &info))
		info.exists = false;
	check(r == 0 && info.exists && info.deferred_remove,
	      "deferred removal of an open device: %d, still there, deferred_remove=%d", r,
	      info.deferred_remove);
	note("after a deferred removal the /dev/mapper entry %s while the device is open",
	     node_exists("qs_t_def") ? "stays" : "is already gone");
	if (fd >= 0)
		close(fd);
	for (i = 0; i < 50 && device_exists("qs_t_def"); i++)
		usleep(20000);
	check(!device_exists("qs_t_def"), "the device went at its last close");
	if (!udev_mode) {
		/* libdevmapper removed the node at the remove call already */
		check(!node_exists("qs_t_def"), "its node is gone");
	} else {
		for (i = 0; i < 100 && node_exists("qs_t_def"); i++)
			usleep(20000);
		check(!node_exists("qs_t_def"), "udev removed its /dev/mapper entry");
	}
}

struct loopfile {
	char path[512];
	const char *fs;
};

static void test_loop(const char *dir, bool primary)
{
	char path[512];
	struct loop_dev ld;
	struct loop_dev_info li, first;
	struct stat st;
	uint8_t *buf = aligned(1 << 20);
	int fd, r, ro = 0, flags;
	const char *fs = fs_name(dir);

	snprintf(path, sizeof(path), "%s/loop.img", dir);
	r = make_file(path, 8 << 20, 0x5a5a1234);
	if (r) {
		check(false, "[%s] creating %s: %d", fs, path, r);
		free(buf);
		return;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	fstat(fd, &st);
	r = loop_attach(fd, true, true, false, &ld);
	check(r == 0 && ld.fd >= 0 && ld.read_only && !strncmp(ld.path, "/dev/loop", 9) &&
	      ld.major == 7, "[%s] loop_attach(read-only, direct I/O): %d %s (%u:%u)", fs, r,
	      ld.path, ld.major, ld.minor);
	if (r) {
		close(fd);
		free(buf);
		return;
	}
	note("[%s] direct I/O on the loop device: %s", fs,
	     ld.direct_io ? "yes" : "no (the filesystem refused it: buffered)");
	if (!strcmp(fs, "ext4"))
		check(ld.direct_io, "[ext4] direct I/O is used on ext4");
	flags = fcntl(fd, F_GETFL);
	note("[%s] the image descriptor's flags after the attach: %s", fs,
	     (flags & O_DIRECT) ? "O_DIRECT set (shared file description!)" : "no O_DIRECT");
	check(ioctl(ld.fd, BLKROGET, &ro) == 0 && ro == 1, "[%s] BLKROGET on the loop: read-only", fs);
	r = read_direct(ld.path, buf, 1 << 20, 4 << 20);
	check(r == 0 && pattern_ok(buf, 1 << 20, 4 << 20, 0x5a5a1234),
	      "[%s] the loop device reads the file's bytes (O_DIRECT, 1 MiB at 4 MiB): %d", fs, r);
	r = loop_get_info(ld.path, &li);
	check(r == 0 && li.read_only && li.direct_io == ld.direct_io &&
	      li.backing_ino == (uint64_t)st.st_ino && major(li.backing_dev) == major(st.st_dev) &&
	      minor(li.backing_dev) == minor(st.st_dev) && strstr(li.backing_file, "loop.img"),
	      "[%s] loop_get_info: ino %" PRIu64 " dev %u:%u file %s", fs, li.backing_ino,
	      major(li.backing_dev), minor(li.backing_dev), li.backing_file);
	r = loop_find_by_file(st.st_dev, st.st_ino, &first);
	check(r == 1 && !strcmp(first.path, ld.path), "[%s] loop_find_by_file finds %s (%d)", fs,
	      first.path, r);
	close(ld.fd);
	r = loop_detach(ld.path);
	check(r == 0, "[%s] loop_detach: %d", fs, r);
	r = loop_find_by_file(st.st_dev, st.st_ino, NULL);
	check(r == 0, "[%s] after detach loop_find_by_file finds nothing (%d)", fs, r);
	r = loop_detach(ld.path);
	check(r == -ENXIO, "[%s] loop_detach of an unbound device: -ENXIO (%d)", fs, r);
	close(fd);

	/* Read-write: a write through the loop lands in the file. */
	fd = open(path, O_RDWR | O_CLOEXEC);
	r = loop_attach(fd, false, true, false, &ld);
	check(r == 0 && !ld.read_only, "[%s] loop_attach(read-write, direct I/O): %d %s dio=%d", fs,
	      r, ld.path, ld.direct_io);
	if (r == 0) {
		memset(buf, 0xab, 4096);
		r = write_direct(ld.path, buf, 4096, 8192);
		close(ld.fd);
		loop_detach(ld.path);
		memset(buf, 0, 4096);
		{
			int f2 = open(path, O_RDONLY | O_CLOEXEC);

			check(r == 0 && pread(f2, buf, 4096, 8192) == 4096 && buf[0] == 0xab &&
			      buf[4095] == 0xab, "[%s] a write through the loop lands in the file", fs);
			close(f2);
		}
	}
	close(fd);

	if (primary) {
		/* The old-kernel path: LOOP_SET_FD + LOOP_SET_STATUS64. */
		fd = open(path, O_RDONLY | O_CLOEXEC);
		loop_test_legacy_ioctls(true);
		r = loop_attach(fd, true, true, true, &ld);
		loop_test_legacy_ioctls(false);
		check(r == 0 && ld.read_only && ld.autoclear,
		      "[%s] legacy ioctls: read-only=%d autoclear=%d dio=%d (%d)", fs, ld.read_only,
		      ld.autoclear, ld.direct_io, r);
		if (r == 0) {
			r = read_direct(ld.path, buf, 65536, 65536);
			check(r == 0 && pattern_ok(buf, 65536, 65536, 0x5a5a1234),
			      "[%s] legacy ioctls: reads the file", fs);
			close(ld.fd);	/* autoclear, nobody else: detached now */
			r = loop_get_info(ld.path, &li);
			check(r == -ENXIO, "[%s] autoclear: the last close detached it (%d)", fs, r);
		}
		close(fd);

		/* Racing attachers: GET_FREE hands the same device to several,
		 * the losers must take another one. */
		{
			int pfd[2], bar[2], k, ok = 0, wst, lines_seen = 0;
			char got[4096] = "";
			ssize_t n, total = 0;

			/* bar: the children keep their loops until the parent has
			 * read all 16 names, so a detached number cannot be reused
			 * by a slower child and look like a duplicate */
			if (pipe(pfd) == 0 && pipe(bar) == 0) {
				for (k = 0; k < 4; k++) {
					if (fork() == 0) {
						struct loop_dev d[4];
						char line[256] = "";
						int j, f = open(path, O_RDONLY | O_CLOEXEC);

						for (j = 0; j < 4; j++) {
							if (loop_attach(f, true, false, false, &d[j]))
								_exit(1);
							snprintf(line + strlen(line), sizeof(line) - strlen(line),
								 "%s\n", d[j].path);
						}
						if (write(pfd[1], line, strlen(line)) < 0)
							_exit(1);
						close(pfd[1]);	/* EOF for the parent once all have written */
						close(bar[1]);
						{
							char c;

							while (read(bar[0], &c, 1) > 0)
								;
						}
						for (j = 0; j < 4; j++) {
							close(d[j].fd);
							loop_detach(d[j].path);
						}
						_exit(0);
					}
				}
				close(pfd[1]);
				close(bar[0]);
				while (lines_seen < 16 &&
				       (n = read(pfd[0], got + total, sizeof(got) - 1 - (size_t)total)) > 0) {
					for (ssize_t q = total; q < total + n; q++)
						lines_seen += got[q] == '\n';
					total += n;
				}
				close(bar[1]);
				close(pfd[0]);
				for (k = 0; k < 4; k++)
					if (wait(&wst) > 0 && WIFEXITED(wst) && WEXITSTATUS(wst) == 0)
						ok++;
				got[total] = '\0';
				{
					/* 16 lines, all different */
					char *lines[16], *save = NULL, *tok;
					int nl = 0, a, b, dup = 0;

					for (tok = strtok_r(got, "\n", &save); tok && nl < 16;
					     tok = strtok_r(NULL, "\n", &save))
						lines[nl++] = tok;
					for (a = 0; a < nl; a++)
						for (b = a + 1; b < nl; b++)
							dup += !strcmp(lines[a], lines[b]);
					check(ok == 4 && nl == 16 && !dup,
					      "[%s] 4 processes x 4 concurrent loop_attach: %d ok, %d devices, "
					      "%d duplicates", fs, ok, nl, dup);
				}
			}
		}

		/* A missing /dev/loopN node is created. */
		{
			int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
			int n = ctl >= 0 ? ioctl(ctl, LOOP_CTL_GET_FREE) : -1;
			char node[64];

			if (ctl >= 0)
				close(ctl);
			snprintf(node, sizeof(node), "/dev/loop%d", n);
			if (n >= 0 && unlink(node) == 0) {
				fd = open(path, O_RDONLY | O_CLOEXEC);
				r = loop_attach(fd, true, false, false, &ld);
				check(r == 0 && !strcmp(ld.path, node) && stat(node, &st) == 0 &&
				      S_ISBLK(st.st_mode), "[%s] %s was deleted: loop_attach made it again (%d)",
				      fs, node, r);
				if (r == 0) {
					close(ld.fd);
					loop_detach(ld.path);
				}
				close(fd);
			} else {
				skip("[%s] could not delete a free loop node", fs);
			}
		}
	}
	unlink(path);
	free(buf);
}

/* The locks live with the loop device, not with the process that took them. */
static void test_lock_lifetime(const char *dir)
{
	char path[512], devpath[LOOP_PATH_MAX] = "";
	unsigned int used = 0, unshared = 0;
	int pfd[2], fd, r, st;
	pid_t pid;

	snprintf(path, sizeof(path), "%s/locked.img", dir);
	if (make_file(path, 4 << 20, 7) || pipe(pfd) < 0) {
		check(false, "lock lifetime: setup");
		return;
	}
	pid = fork();
	if (pid == 0) {
		struct loop_dev ld;
		int cfd = open(path, O_RDWR | O_CLOEXEC);

		if (lock_image(cfd, true, path) || loop_attach(cfd, false, true, false, &ld))
			_exit(1);
		if (write(pfd[1], ld.path, strlen(ld.path)) < 0)
			_exit(1);
		_exit(0);	/* every descriptor closes; the loop keeps the file */
	}
	close(pfd[1]);
	r = (int)read(pfd[0], devpath, sizeof(devpath) - 1);
	close(pfd[0]);
	waitpid(pid, &st, 0);
	check(r > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
	      "a child locked the image read-write, bound %s to it and exited", devpath);
	if (r <= 0)
		return;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	r = lock_image_query(fd, &used, &unshared);
	check(r == 0 && used == 0x0b && unshared == 0x0a,
	      "the locks outlive the process: used 0x%x unshared 0x%x", used, unshared);
	r = lock_image(fd, false, path);
	check(r == -EBUSY, "lock_image(ro) against the loop-held locks: -EBUSY (%d)", r);
	if (have_program("qemu-io"))
		check(qemu_io_fails_with("-f raw", path, "Failed to get \"write\" lock"),
		      "qemu-io write on the mapped image: 'Failed to get \"write\" lock'");
	r = loop_detach(devpath);
	check(r == 0, "loop_detach: %d", r);
	r = lock_image_query(fd, &used, &unshared);
	check(r == 0 && !used && !unshared, "after the detach the locks are gone (0x%x 0x%x)", used,
	      unshared);
	r = lock_image(fd, false, path);
	check(r == 0, "lock_image(ro) now succeeds (%d)", r);
	close(fd);
	unlink(path);
}

static void test_crypt(const char *dir)
{
	static const char *desc = "qcowsetup:qs_t_crypt:L0";
	uint8_t key[64];
	char path[512], params[512], hexkey[129];
	struct dm_table_target t = { 0, 16384, "crypt", params };
	struct dm_table tbl = { .count = 1, .targets = &t };
	struct dm_dev_info info;
	struct lines l = { 0 };
	struct loop_dev ld;
	uint8_t *buf = aligned(1 << 20), *raw = aligned(1 << 20);
	uint32_t maj = 0, min = 0;
	int32_t serial = 0;
	int fd, r;
	size_t i;

	for (i = 0; i < sizeof(key); i++)
		key[i] = (uint8_t)(i * 37 + 11);
	for (i = 0; i < sizeof(key); i++)
		snprintf(hexkey + 2 * i, 3, "%02x", key[i]);

	snprintf(path, sizeof(path), "%s/crypt.img", dir);
	if (make_file(path, 8 << 20, 0) || !buf || !raw) {
		check(false, "crypt: setup");
		return;
	}
	fd = open(path, O_RDWR | O_CLOEXEC);
	r = loop_attach(fd, false, true, true, &ld);
	close(fd);
	if (r) {
		check(false, "crypt: loop_attach %d", r);
		return;
	}
	snprintf(params, sizeof(params), "aes-xts-plain64 :%zu:logon:%s 0 %u:%u 0", sizeof(key),
		 desc, ld.major, ld.minor);

	r = dm_create_device("qs_t_crypt", "QCOW2-INT-test-crypt", false, true, &tbl, NULL, NULL);
	check(r == -ENOKEY && !device_exists("qs_t_crypt"),
	      "crypt table whose key is not in the keyring: -ENOKEY (%d), nothing left", r);

	r = keyring_add_logon(desc, key, sizeof(key), &serial);
	check(r == 0, "keyring_add_logon(%s, 64 bytes): serial %d", desc, serial);
	r = dm_create_device("qs_t_crypt", "QCOW2-INT-test-crypt", false, true, &tbl, &maj, &min);
	check(r == 0, "dm_create_device(crypt, hidden) with the logon key: %d (%u:%u)", r, maj, min);
	close(ld.fd);	/* the crypt table holds the autoclear loop now */
	r = keyring_remove(serial);
	check(r == 0, "keyring_remove right after the table load: %d", r);
	check(keyring_search("logon", desc, NULL) == -ENOKEY, "the key is no longer reachable");
	check(keys_gone(desc), "the key leaves /proc/keys (revoked, then collected)");
	if (have_program("keyctl")) {
		check(run_ok("! keyctl show 2>&1 | grep -q qcowsetup"), "`keyctl show` lists no qcowsetup key");
		system("keyctl show 2>&1 | sed 's/^/  keyctl show: /'");
	}
	check(node_matches("qs_t_crypt", maj, min, NULL), "/dev/mapper/qs_t_crypt exists (hidden device)");
	if (udev_mode) {
		check(udev_property(min, "DM_UDEV_DISABLE_DISK_RULES_FLAG=1") &&
		      udev_property(min, "DM_UDEV_DISABLE_OTHER_RULES_FLAG=1") &&
		      udev_property(min, "DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG=1"),
		      "udev database: the hidden device has the three DISABLE flags");
		check(access("/dev/disk/by-id/dm-name-qs_t_crypt", F_OK) != 0,
		      "udev made no /dev/disk/by-id link for the hidden device");
	}

	for (i = 0; i < (1 << 20) / 4; i++)
		((uint32_t *)buf)[i] = (uint32_t)(i * 4) ^ 0xc0ffee;
	r = write_direct("/dev/mapper/qs_t_crypt", buf, 1 << 20, 1 << 20);
	check(r == 0, "writing 1 MiB through dm-crypt after the key left the keyring: %d", r);
	memset(buf, 0, 1 << 20);
	r = read_direct("/dev/mapper/qs_t_crypt", buf, 1 << 20, 1 << 20);
	check(r == 0 && pattern_ok(buf, 1 << 20, 0, 0xc0ffee), "reading it back (O_DIRECT): %d", r);
	r = read_direct(ld.path, raw, 1 << 20, 1 << 20);
	check(r == 0 && !pattern_ok(raw, 1 << 20, 0, 0xc0ffee), "the loop (file) holds ciphertext");
	check(dm_get_table("qs_t_crypt", collect_line, &l) == 0 && strstr(l.first, ":64:logon:"),
	      "dm_get_table shows the keyring reference: \"%s\"", l.first);
	r = dm_device_info("qs_t_crypt", &info);
	check(r == 0 && info.open_count == 0 && !strcmp(info.uuid, "QCOW2-INT-test-crypt"),
	      "info: uuid %s open %d", info.uuid, info.open_count);
	r = dm_remove_device("qs_t_crypt", false, false);
	check(r == 0, "dm_remove_device(crypt): %d", r);
	r = loop_get_info(ld.path, &(struct loop_dev_info){ 0 });
	check(r == -ENXIO, "removing the crypt device released the autoclear loop (%d)", r);

	/* The same bytes with the key in hex: the keyring key was ours. */
	fd = open(path, O_RDWR | O_CLOEXEC);
	r = loop_attach(fd, true, true, true, &ld);
	close(fd);
	snprintf(params, sizeof(params), "aes-xts-plain64 %s 0 %u:%u 0", hexkey, ld.major, ld.minor);
	r = r ? r : dm_create_device("qs_t_crypt_hex", NULL, true, true, &tbl, NULL, NULL);
	explicit_bzero(params, sizeof(params));
	close(ld.fd);
	check(r == 0, "a read-only crypt device with the same key in hex: %d", r);
	memset(buf, 0, 1 << 20);
	r = read_direct("/dev/mapper/qs_t_crypt_hex", buf, 1 << 20, 1 << 20);
	check(r == 0 && pattern_ok(buf, 1 << 20, 0, 0xc0ffee),
	      "it decrypts what the keyring-keyed device wrote: %d", r);
	memset(&l, 0, sizeof(l));
	check(dm_get_table("qs_t_crypt_hex", collect_line, &l) == 0 && !strstr(l.first, hexkey) &&
	      !strstr(l.first, "0b30"), "dm_get_table masks a hex key: \"%.60s...\"", l.first);
	r = dm_remove_device("qs_t_crypt_hex", false, true);
	check(r == 0, "dm_remove_device(crypt_hex, retry): %d", r);
	unlink(path);
	free(buf);
	free(raw);
}

static void test_reload(const char *dir)
{
	char path[512], params[64];
	struct dm_table_target lin = { 0, 16384, "linear", params };
	struct dm_table_target zero = { 0, 16384, "zero", "" };
	struct dm_table tl = { .count = 1, .targets = &lin };
	struct dm_table tz = { .count = 1, .targets = &zero };
	struct dm_dev_info info;
	struct lines l = { 0 };
	struct loop_dev ld;
	int fd, r;

	snprintf(path, sizeof(path), "%s/reload.img", dir);
	make_file(path, 8 << 20, 1);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	r = loop_attach(fd, true, true, true, &ld);
	close(fd);
	if (r) {
		check(false, "reload: loop_attach %d", r);
		return;
	}
	snprintf(params, sizeof(params), "%u:%u 0", ld.major, ld.minor);
	r = dm_create_device("qs_t_reload", NULL, true, false, &tl, NULL, NULL);
	close(ld.fd);
	check(r == 0, "dm_create_device(linear over the loop): %d", r);
	r = dm_load_table("qs_t_reload", true, &tz);
	check(r == 0 && dm_device_info("qs_t_reload", &info) == 0 && info.inactive_table &&
	      !info.suspended, "dm_load_table: inactive table loaded (%d), live one serving", r);
	check(dm_get_table("qs_t_reload", collect_line, &l) == 0 && strstr(l.first, "linear"),
	      "the live table is still \"%s\"", l.first);
	r = dm_suspend("qs_t_reload", DM_SUSPEND_SKIP_LOCKFS);
	if (dm_device_info("qs_t_reload", &info))
		info.suspended = false;
	check(r == 0 && info.suspended, "dm_suspend: %d suspended=%d", r, info.suspended);
	r = dm_resume("qs_t_reload", false);
	memset(&l, 0, sizeof(l));
	check(r == 0 && dm_device_info("qs_t_reload", &info) == 0 && !info.suspended &&
	      !info.inactive_table && dm_get_table("qs_t_reload", collect_line, &l) == 0 &&
	      !strcmp(l.first, "0 16384 zero"), "dm_resume swapped the table in: \"%s\"", l.first);
	r = dm_load_table("qs_t_reload", true, &tl);
	r = r ? r : dm_clear_table("qs_t_reload");
	check(r == 0 && dm_device_info("qs_t_reload", &info) == 0 && !info.inactive_table,
	      "dm_clear_table dropped an inactive table (%d)", r);
	check(dm_load_table("qs_t_nosuch", true, &tz) == -ENODEV, "dm_load_table on a missing device: -ENODEV");
	check(dm_suspend("qs_t_nosuch", 0) == -ENODEV, "dm_suspend on a missing device: -ENODEV");
	check(dm_resume("qs_t_nosuch", false) == -ENODEV, "dm_resume on a missing device: -ENODEV");
	r = dm_remove_device("qs_t_reload", false, false);
	check(r == 0, "dm_remove_device(reload): %d", r);
	usleep(100000);
	check(loop_find_by_file(0, 0, NULL) >= 0, "loop_find_by_file works with no match");
	unlink(path);
}

static void test_big(const char *dir, size_t n)
{
	char path[512];
	struct loop_dev ld;
	struct dm_dev_info info;
	double secs = 0, t0;
	long peak = 0;
	int fd, r;

	snprintf(path, sizeof(path), "%s/big.img", dir);
	make_file(path, 64 << 20, 3);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	r = loop_attach(fd, true, true, true, &ld);
	close(fd);
	if (r) {
		check(false, "big table: loop_attach %d", r);
		return;
	}
	r = measure_create(n, "qs_t_big", ld.major, ld.minor, (64 << 20) / 512, &secs, &peak);
	close(ld.fd);
	check(r == 0 && dm_device_info("qs_t_big", &info) == 0 && info.exists &&
	      info.target_count == n, "a %zu-target table (callback) created in %.2f s, peak RSS "
	      "growth %ld KiB (%.0f bytes/target): %d", n, secs, peak, peak * 1024.0 / (double)n, r);
	t0 = now();
	r = dm_remove_device("qs_t_big", false, false);
	check(r == 0, "removing it: %d (%.2f s)", r, now() - t0);
	unlink(path);
}

static void cleanup_leftovers(void)
{
	static const char *const names[] = {
		"qs_t_zero", "qs_t_zero2", "qs_t_def", "qs_t_bad", "qs_t_crypt", "qs_t_crypt_hex",
		"qs_t_reload", "qs_t_big", "qs_t_x",
	};
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (device_exists(names[i]))
			dm_remove_device(names[i], false, true);
}

static int summary(void)
{
	printf("sys-wrappers: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
	return failed ? 1 : passed ? 0 : 77;
}

static int usage(void)
{
	fprintf(stderr, "usage: sys-wrappers host DIR | vm [--udev] [--targets N] EXT4DIR [DIR...] | mem N\n");
	return 2;
}

int main(int argc, char **argv)
{
	size_t targets = 100000;
	int i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	qs_log_set_callback(log_cb, NULL);
	qs_log_set_level(getenv("QS_DEBUG") ? QS_LOG_DEBUG : QS_LOG_VERBOSE);
	if (argc < 3)
		return usage();

	if (!strcmp(argv[1], "mem")) {
		size_t n = strtoul(argv[2], NULL, 10);
		double secs = 0;
		long peak = 0;

		qs_log_set_level(QS_LOG_ERR);
		qs_log_set_callback(NULL, NULL);
		measure_create(n, "qs_t_mem", 7, 0, 1 << 20, &secs, &peak);
		printf("%zu targets: peak RSS growth %ld KiB (%.0f bytes/target), %.2f s\n", n, peak,
		       peak * 1024.0 / (double)n, secs);
		return 0;
	}
	if (!strcmp(argv[1], "host")) {
		int r;

		test_args();
		test_keyring_host();
		test_locks(argv[2]);
		r = dm_check_control();
		if (r == 0)
			note("device-mapper is available here");
		else
			check(r == -ENODEV || r == -EACCES,
			      "dm_check_control without device-mapper: %d (-ENODEV)", r);
		return summary();
	}
	if (strcmp(argv[1], "vm"))
		return usage();
	for (i = 2; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--udev"))
			udev_mode = true;
		else if (!strcmp(argv[i], "--targets") && i + 1 < argc)
			targets = strtoul(argv[++i], NULL, 10);
		else
			return usage();
	}
	if (i >= argc)
		return usage();
	if (geteuid() != 0) {
		printf("SKIP: not root\n");
		return 77;
	}
	if (dm_check_control()) {
		printf("SKIP: no device-mapper here\n");
		return 77;
	}
	cleanup_leftovers();
	printf("== sys-wrappers in the VM (%s)\n", udev_mode ? "with udev" : "without udev");
	test_control();
	test_args();
	test_dm_basic();
	if (!udev_mode) {
		int d;

		for (d = i; d < argc; d++)
			test_loop(argv[d], d == i);
		test_lock_lifetime(argv[i]);
		test_keyring_host();
		test_reload(argv[i]);
		if (targets)
			test_big(argv[i], targets);
	}
	test_crypt(argv[i]);
	cleanup_leftovers();
	dm_release();
	return summary();
}
