#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/fs.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <unistd.h>

#include "sysutil.h"
#include "util.h"

extern char **environ;

int fd_size(int fd, uint64_t *size)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISREG(st.st_mode)) {
		*size = (uint64_t)st.st_size;
		return 0;
	}
	if (!S_ISBLK(st.st_mode))
		return -ENODEV;
	return ioctl(fd, BLKGETSIZE64, size) < 0 ? -errno : 0;
}

/* pad: past the end of the file, zeros rather than -EIO */
static int pread_loop(int fd, void *buf, size_t len, uint64_t off, bool pad)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			if (!pad)
				return -EIO;
			memset(p, 0, len);
			return 0;
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int fd_pread_all(int fd, void *buf, size_t len, uint64_t off)
{
	return pread_loop(fd, buf, len, off, false);
}

int fd_pread_padded(int fd, void *buf, size_t len, uint64_t off)
{
	return pread_loop(fd, buf, len, off, true);
}

int fd_write_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static bool dio_aligned(const struct dio_file *f, const void *buf, size_t len, uint64_t off)
{
	return f->dfd >= 0 && len >= DIO_MIN && !((off | len | (uintptr_t)buf) & (DIO_ALIGN - 1));
}

int dio_reopen(int fd)
{
	char path[64];
	int flags = fcntl(fd, F_GETFL), dfd;

	if (flags < 0)
		return -errno;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	dfd = open(path, (flags & O_ACCMODE) | O_DIRECT | O_CLOEXEC | O_NOCTTY);
	return dfd < 0 ? -errno : dfd;
}

/* The direct part of a dio_file request: the bytes it moved (all of them,
 * or what is left to the buffered descriptor: none tried, refused,
 * short), or -errno. */
static ssize_t dio_try(const struct dio_file *f, void *buf, size_t len, uint64_t off, bool write)
{
	ssize_t n;

	if (!dio_aligned(f, buf, len, off) || off > INT64_MAX || len > INT64_MAX - off)
		return 0;
	do
		n = write ? pwrite(f->dfd, buf, len, (off_t)off) : pread(f->dfd, buf, len, (off_t)off);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EINVAL ? 0 : -errno;
	return n;
}

int dio_pread_padded(const struct dio_file *f, void *buf, size_t len, uint64_t off)
{
	ssize_t n = dio_try(f, buf, len, off, false);

	if (n < 0)
		return (int)n;
	return pread_loop(f->fd, (uint8_t *)buf + n, len - (size_t)n, off + (uint64_t)n, true);
}

int dio_pwrite_all(const struct dio_file *f, const void *buf, size_t len, uint64_t off)
{
	ssize_t n = dio_try(f, (void *)buf, len, off, true);

	if (n < 0)
		return (int)n;
	return fd_pwrite_all(f->fd, (const uint8_t *)buf + n, len - (size_t)n, off + (uint64_t)n);
}

int fd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	if (off > INT64_MAX || len > INT64_MAX - off)
		return -EFBIG;
	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ENOSPC;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int fd_extent(int fd, uint64_t off, uint64_t *len, bool *is_data)
{
	off_t data, hole;

	data = lseek(fd, (off_t)off, SEEK_DATA);
	if (data < 0)
		return errno == ENXIO ? -ENXIO : -errno;
	if ((uint64_t)data > off) {
		*is_data = false;
		*len = (uint64_t)data - off;
		return 0;
	}
	hole = lseek(fd, (off_t)off, SEEK_HOLE);
	if (hole < 0)
		return -errno;
	*is_data = true;
	*len = (uint64_t)hole - off;
	return *len ? 0 : -ENXIO;
}

int sys_modprobe(const char *module)
{
	char *argv[] = { (char *)"modprobe", (char *)"-q", (char *)module, NULL };
	posix_spawn_file_actions_t fa;
	int status, r;
	pid_t pid;

	if (posix_spawn_file_actions_init(&fa))
		return -ENOMEM;
	posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
	r = posix_spawn(&pid, "/sbin/modprobe", &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (r)
		return -r;
	if (waitpid(pid, &status, 0) < 0)
		return -errno;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -ENOENT;
}

int fd_real_path(int fd, char *buf, size_t size)
{
	char link[64];
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, buf, size - 1);
	if (n < 0)
		return -errno;
	if ((size_t)n >= size - 1)
		return -ENAMETOOLONG;
	buf[n] = '\0';
	return 0;
}

int sys_thread_nice(int nice)
{
	id_t tid = (id_t)syscall(SYS_gettid);
	int old;

	errno = 0;
	old = getpriority(PRIO_PROCESS, tid);
	if ((old == -1 && errno) || old <= nice || setpriority(PRIO_PROCESS, tid, nice))
		return INT_MIN;
	return old;
}

void sys_thread_nice_restore(int old)
{
	if (old != INT_MIN)
		setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), old);
}

int sys_read_small(const char *path, char *buf, size_t size)
{
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	n = read(fd, buf, size - 1);
	if (n < 0)
		n = -errno;
	close(fd);
	if (n <= 0)
		return n ? (int)n : -EIO;
	buf[n] = '\0';
	return (int)n;
}

#define UNIX_STATE_LISTEN	10	/* TCP_LISTEN: the state of a listening Unix socket */
#define UNIX_FLAG_LISTENING	0x10000	/* __SO_ACCEPTCON in /proc/net/unix */

/* One datagram of the dump: *found when a socket in it is bound at path,
 * *done at its end; 0, or -errno for an error message. */
static int diag_match(const struct nlmsghdr *h, size_t len, const char *path, bool *found, bool *done)
{
	size_t plen = strlen(path);

	for (; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
		const struct unix_diag_msg *m = NLMSG_DATA(h);
		const struct rtattr *a;
		size_t alen;

		if (h->nlmsg_type == NLMSG_DONE) {
			*done = true;
			return 0;
		}
		if (h->nlmsg_type == NLMSG_ERROR) {
			const struct nlmsgerr *e = NLMSG_DATA(h);

			return h->nlmsg_len >= NLMSG_LENGTH(sizeof(*e)) && e->error ? e->error : -EPROTO;
		}
		if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY || h->nlmsg_len < NLMSG_LENGTH(sizeof(*m)))
			continue;
		a = (const struct rtattr *)(m + 1);
		alen = h->nlmsg_len - NLMSG_LENGTH(sizeof(*m));
		for (; RTA_OK(a, alen); a = RTA_NEXT(a, alen))
			if (a->rta_type == UNIX_DIAG_NAME && RTA_PAYLOAD(a) >= plen && !memcmp(RTA_DATA(a), path, plen) &&
			    (RTA_PAYLOAD(a) == plen || ((const char *)RTA_DATA(a))[plen] == '\0'))
				*found = true;
	}
	return 0;
}

/* The listening Unix sockets with their names, from the kernel (the
 * unix_diag module): 1, 0 or -errno. */
static int unix_listening_diag(const char *path)
{
	struct {
		struct nlmsghdr h;
		struct unix_diag_req r;
	} req = {
		.h = { .nlmsg_len = sizeof(req), .nlmsg_type = SOCK_DIAG_BY_FAMILY,
		       .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP },
		.r = { .sdiag_family = AF_UNIX, .udiag_states = 1U << UNIX_STATE_LISTEN, .udiag_show = UDIAG_SHOW_NAME },
	};
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	long buf[8192 / sizeof(long)];
	bool found = false, done = false;
	int fd, r = 0;

	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
	if (fd < 0)
		return -errno;
	if (sendto(fd, &req, sizeof(req), 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		r = -errno;
	while (!r && !done) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			r = n < 0 ? -errno : -EPROTO;
			break;
		}
		r = diag_match((const struct nlmsghdr *)buf, (size_t)n, path, &found, &done);
	}
	close(fd);
	return r ? r : found;
}

/* The same from /proc/net/unix: 1, 0 or -errno. */
static int unix_listening_proc(const char *path)
{
	FILE *f = fopen("/proc/net/unix", "re");
	char line[512], name[256];
	unsigned long flags;
	bool found = false;

	if (!f)
		return -errno;
	/* Num RefCount Protocol Flags Type St Inode Path */
	while (!found && fgets(line, sizeof(line), f))
		found = sscanf(line, "%*s %*s %*s %lx %*s %*s %*s %255s", &flags, name) == 2 &&
			(flags & UNIX_FLAG_LISTENING) && !strcmp(name, path);
	fclose(f);
	return found;
}

int sys_unix_listening(const char *path)
{
	int r = -ENOENT;

	/* Only with unix_diag loaded already: the kernel would load it on
	 * demand (request_module), running modprobe, which reads the root
	 * filesystem; when that root is a mapping whose top device the
	 * caller holds suspended (a daemon's table swap waits for udev), the
	 * read waits for the resume and the resume for the read. */
	if (access("/sys/module/unix_diag", F_OK) == 0)
		r = unix_listening_diag(path);

	return r < 0 ? unix_listening_proc(path) : r;
}

int sys_block_discard(unsigned int major, unsigned int minor, bool on)
{
	char path[96], val[32] = "0";
	size_t n = 1;
	int fd, r = 0;

	if (on) {
		snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/discard_max_hw_bytes", major, minor);
		r = sys_read_small(path, val, sizeof(val));
		if (r < 0)
			return r;
		unsigned long long max = strtoull(val, NULL, 10), gran = 512;

		if (!max)
			return -EOPNOTSUPP;
		/* the kernel takes a multiple of the granularity, in 32 bits of
		 * bytes (queue_var_store: an NBD device's limit is larger) */
		snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/discard_granularity", major, minor);
		if (sys_read_small(path, val, sizeof(val)) > 0 && strtoull(val, NULL, 10) >= 512)
			gran = strtoull(val, NULL, 10);
		if (max > UINT32_MAX)
			max = UINT32_MAX;
		max -= max % gran;
		n = (size_t)snprintf(val, sizeof(val), "%llu", max);
		r = 0;
	}
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/discard_max_bytes", major, minor);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (write(fd, val, n) != (ssize_t)n)
		r = -errno;
	close(fd);
	return r;
}
