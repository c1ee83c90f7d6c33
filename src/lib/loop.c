/* Loop devices over image files (see loop.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/loop.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"
#include "sysutil.h"
#include "loop.h"

#ifndef LOOP_CONFIGURE		/* headers older than Linux 5.8 */
#define LOOP_CONFIGURE		0x4C0A
struct loop_config {
	uint32_t fd;
	uint32_t block_size;
	struct loop_info64 info;
	uint64_t __reserved[8];
};
#endif
#ifndef LOOP_SET_DIRECT_IO
#define LOOP_SET_DIRECT_IO	0x4C08
#ifndef LOOP_SET_CAPACITY
#define LOOP_SET_CAPACITY	0x4C07
#endif
#endif
#ifndef LO_FLAGS_DIRECT_IO
#define LO_FLAGS_DIRECT_IO	16
#endif

#define LOOP_CONTROL		"/dev/loop-control"
#define ATTACH_TRIES		32

static bool legacy_ioctls;

void loop_test_legacy_ioctls(bool legacy)
{
	legacy_ioctls = legacy;
}

/* "MAJ:MIN\n" from a sysfs dev attribute. */
static int read_sysfs_dev(const char *path, dev_t *dev)
{
	unsigned int maj, min;
	FILE *f = fopen(path, "re");
	int n;

	if (!f)
		return -errno;
	n = fscanf(f, "%u:%u", &maj, &min);
	fclose(f);
	if (n != 2)
		return -EINVAL;
	*dev = makedev(maj, min);
	return 0;
}

/* Open a device node, creating it from sysfs when missing (no devtmpfs or
 * udev yet). sysattr is the sysfs "dev" file of the device. */
static int open_node(const char *path, const char *sysattr, mode_t type, int flags)
{
	struct stat st;
	dev_t dev;
	int fd, r;

	fd = open(path, flags | O_CLOEXEC);
	if (fd >= 0 || errno != ENOENT)
		return fd >= 0 ? fd : -errno;
	r = read_sysfs_dev(sysattr, &dev);
	if (r < 0)
		return -ENOENT;
	if (mknod(path, type | 0660, dev) < 0 && errno != EEXIST)
		return -errno;
	log_dbg("created %s (%u:%u): it was missing", path, major(dev), minor(dev));
	fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || (st.st_mode & S_IFMT) != type || st.st_rdev != dev) {
		close(fd);
		return -ENODEV;
	}
	return fd;
}

static int open_control(void)
{
	int fd;

	fd = open_node(LOOP_CONTROL, "/sys/class/misc/loop-control/dev", S_IFCHR, O_RDWR);
	if (fd == -ENOENT && sys_modprobe("loop") == 0)
		fd = open_node(LOOP_CONTROL, "/sys/class/misc/loop-control/dev", S_IFCHR, O_RDWR);
	if (fd == -ENOENT || fd == -ENODEV || fd == -ENXIO) {
		log_err("loop devices are not available: no %s (kernel module loop "
			"not loaded?)", LOOP_CONTROL);
		return -ENODEV;
	}
	if (fd < 0)
		log_err("cannot open %s: %s", LOOP_CONTROL, strerror(-fd));
	return fd;
}

static int open_loop(unsigned int n, int flags, char *path, size_t size)
{
	char sysattr[64];

	snprintf(path, size, "/dev/loop%u", n);
	snprintf(sysattr, sizeof(sysattr), "/sys/block/loop%u/dev", n);
	return open_node(path, sysattr, S_IFBLK, flags);
}

/* Bind lfd to fd. 0, -EBUSY (lost a race for the device) or -errno. */
static int configure(int lfd, int fd, uint32_t flags)
{
	struct loop_info64 info;

	if (!legacy_ioctls) {
		struct loop_config cfg;

		memset(&cfg, 0, sizeof(cfg));
		cfg.fd = (uint32_t)fd;
		cfg.block_size = 512;
		cfg.info.lo_flags = flags;
		if (ioctl(lfd, LOOP_CONFIGURE, &cfg) == 0)
			return 0;
		if (errno != EINVAL && errno != ENOTTY)
			return -errno;
		/* Kernels that refuse direct I/O instead of falling back: bind
		 * buffered, then ask for direct I/O separately. */
		if (flags & LO_FLAGS_DIRECT_IO) {
			cfg.info.lo_flags &= ~LO_FLAGS_DIRECT_IO;
			if (ioctl(lfd, LOOP_CONFIGURE, &cfg) == 0) {
				if (ioctl(lfd, LOOP_SET_DIRECT_IO, 1UL) < 0)
					log_dbg("loop: direct I/O refused (%s): buffered I/O",
						strerror(errno));
				return 0;
			}
			if (errno != EINVAL && errno != ENOTTY)
				return -errno;
		}
		log_dbg("loop: no LOOP_CONFIGURE (kernel < 5.8): LOOP_SET_FD");
	}

	/* Before Linux 5.8. Read-only follows the open mode of lfd. */
	if (ioctl(lfd, LOOP_SET_FD, (unsigned long)fd) < 0)
		return -errno;
	memset(&info, 0, sizeof(info));
	info.lo_flags = flags & LO_FLAGS_AUTOCLEAR;
	if (ioctl(lfd, LOOP_SET_STATUS64, &info) < 0) {
		int r = -errno;

		(void)ioctl(lfd, LOOP_CLR_FD, 0);
		return r;
	}
	if ((flags & LO_FLAGS_DIRECT_IO) && ioctl(lfd, LOOP_SET_DIRECT_IO, 1UL) < 0)
		log_dbg("loop: direct I/O refused (%s): buffered I/O", strerror(errno));
	return 0;
}

int loop_attach(int fd, bool read_only, bool direct_io, bool autoclear, struct loop_dev *dev)
{
	struct loop_info64 info;
	uint32_t flags = 0;
	struct stat st;
	int ctl, lfd = -1, n, tries, r;

	if (!dev)
		return -EINVAL;
	memset(dev, 0, sizeof(*dev));
	dev->fd = -1;
	if (fd < 0 || fcntl(fd, F_GETFL) < 0)
		return -EBADF;
	if (read_only)
		flags |= LO_FLAGS_READ_ONLY;
	if (direct_io)
		flags |= LO_FLAGS_DIRECT_IO;
	if (autoclear)
		flags |= LO_FLAGS_AUTOCLEAR;

	ctl = open_control();
	if (ctl < 0)
		return ctl;
	for (tries = 0; tries < ATTACH_TRIES; tries++) {
		n = ioctl(ctl, LOOP_CTL_GET_FREE);
		if (n < 0) {
			r = -errno;
			log_err("no free loop device: %s", strerror(-r));
			goto out;
		}
		lfd = open_loop((unsigned int)n, read_only ? O_RDONLY : O_RDWR,
				dev->path, sizeof(dev->path));
		if (lfd < 0) {
			r = lfd;
			log_err("cannot open %s: %s", dev->path, strerror(-r));
			goto out;
		}
		r = configure(lfd, fd, flags);
		if (r != -EBUSY)
			break;
		/* Someone bound it between GET_FREE and our ioctl. */
		log_dbg("%s was taken meanwhile, trying another one", dev->path);
		close(lfd);
		lfd = -1;
	}
	if (r < 0) {
		if (r == -EBUSY)
			log_err("no free loop device after %d tries", ATTACH_TRIES);
		else
			log_err("cannot bind %s to the image: %s", dev->path, strerror(-r));
		goto out;
	}

	if (fstat(lfd, &st) < 0 || ioctl(lfd, LOOP_GET_STATUS64, &info) < 0) {
		r = -errno;
		(void)ioctl(lfd, LOOP_CLR_FD, 0);
		log_err("%s: %s", dev->path, strerror(-r));
		goto out;
	}
	dev->major = major(st.st_rdev);
	dev->minor = minor(st.st_rdev);
	dev->read_only = info.lo_flags & LO_FLAGS_READ_ONLY;
	dev->direct_io = info.lo_flags & LO_FLAGS_DIRECT_IO;
	dev->autoclear = info.lo_flags & LO_FLAGS_AUTOCLEAR;
	if (read_only && !dev->read_only) {
		/* Cannot happen with either ioctl path; never hand out a
		 * writable device that was asked read-only. */
		(void)ioctl(lfd, LOOP_CLR_FD, 0);
		log_err("%s: the kernel did not make the device read-only", dev->path);
		r = -EIO;
		goto out;
	}
	if (direct_io && !dev->direct_io)
		log_verbose("%s: the filesystem of the image does not allow direct I/O: "
			    "buffered I/O", dev->path);
	log_dbg("%s (%u:%u) bound%s%s%s", dev->path, dev->major, dev->minor,
		dev->read_only ? ", read-only" : "", dev->direct_io ? ", direct I/O" : "",
		dev->autoclear ? ", autoclear" : "");
	dev->fd = lfd;
	lfd = -1;
	r = 0;
out:
	if (lfd >= 0)
		close(lfd);
	close(ctl);
	return r;
}

int loop_set_capacity(int fd)
{
	return ioctl(fd, LOOP_SET_CAPACITY, 0) < 0 ? -errno : 0;
}

int loop_disable_discard(const struct loop_dev *dev)
{
	char path[96];
	int fd, r = 0;

	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/discard_max_bytes", dev->major, dev->minor);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;	/* no discard support at all */
	if (write(fd, "0", 1) != 1)
		r = -errno;
	close(fd);
	return r;
}

int loop_detach(const char *path)
{
	int fd, r = 0;

	if (!path)
		return -EINVAL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (ioctl(fd, LOOP_CLR_FD, 0) < 0) {
		r = -errno;
		if (r != -ENXIO)
			log_err("cannot detach %s: %s", path, strerror(-r));
	}
	close(fd);
	return r;
}

/* The N of "/dev/loopN" or "loopN"; -1 when it is not one. */
static long loop_number(const char *name)
{
	const char *p = strrchr(name, '/');
	char *end;
	long n;

	p = p ? p + 1 : name;
	if (strncmp(p, "loop", 4) || p[4] < '0' || p[4] > '9')
		return -1;
	n = strtol(p + 4, &end, 10);
	return *end ? -1 : n;
}

/* lo_device is the kernel's new_encode_dev() of the file's st_dev */
static dev_t decode_lo_device(uint64_t lo_device)
{
	return makedev((unsigned int)((lo_device & 0xfff00) >> 8),
		       (unsigned int)((lo_device & 0xff) | ((lo_device >> 12) & 0xfff00)));
}

int loop_backing_file(int fd, dev_t *dev, ino_t *ino)
{
	struct loop_info64 li;

	if (ioctl(fd, LOOP_GET_STATUS64, &li) < 0)
		return -errno;
	*dev = decode_lo_device(li.lo_device);
	*ino = (ino_t)li.lo_inode;
	return 0;
}

int loop_get_info(const char *path, struct loop_dev_info *info)
{
	struct loop_info64 li;
	struct stat st;
	char sysattr[96];
	long n;
	FILE *f;
	int fd, r = 0;

	if (!path || !info)
		return -EINVAL;
	memset(info, 0, sizeof(*info));
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || ioctl(fd, LOOP_GET_STATUS64, &li) < 0) {
		r = -errno;
		goto out;
	}
	snprintf(info->path, sizeof(info->path), "%s", path);
	info->major = major(st.st_rdev);
	info->minor = minor(st.st_rdev);
	info->backing_dev = decode_lo_device(li.lo_device);
	info->backing_ino = li.lo_inode;
	info->offset = li.lo_offset;
	info->sizelimit = li.lo_sizelimit;
	info->read_only = li.lo_flags & LO_FLAGS_READ_ONLY;
	info->autoclear = li.lo_flags & LO_FLAGS_AUTOCLEAR;
	info->direct_io = li.lo_flags & LO_FLAGS_DIRECT_IO;
	info->partscan = li.lo_flags & LO_FLAGS_PARTSCAN;
	n = loop_number(path);
	if (n < 0)
		n = (long)info->minor;	/* loop minors are the device numbers */
	snprintf(sysattr, sizeof(sysattr), "/sys/block/loop%ld/loop/backing_file", n);
	f = fopen(sysattr, "re");
	if (f) {
		if (fgets(info->backing_file, sizeof(info->backing_file), f))
			info->backing_file[strcspn(info->backing_file, "\n")] = '\0';
		fclose(f);
	} else {
		snprintf(info->backing_file, sizeof(info->backing_file), "%.*s",
			 (int)sizeof(li.lo_file_name), (const char *)li.lo_file_name);
	}
out:
	close(fd);
	return r;
}

int loop_find_by_file(dev_t st_dev, ino_t st_ino, struct loop_dev_info *first)
{
	struct loop_dev_info info;
	struct dirent *de;
	long best = -1;
	int count = 0;
	DIR *d;

	d = opendir("/sys/block");
	if (!d)
		return -errno;
	while ((de = readdir(d))) {
		char path[LOOP_PATH_MAX], bf[96];
		long n = loop_number(de->d_name);

		if (n < 0)
			continue;
		/* backing_file exists only while the device is bound */
		snprintf(bf, sizeof(bf), "/sys/block/loop%ld/loop/backing_file", n);
		if (access(bf, F_OK) < 0)
			continue;
		snprintf(path, sizeof(path), "/dev/loop%ld", n);
		if (access(path, F_OK) < 0) {
			char sysattr[64];
			int fd;

			snprintf(sysattr, sizeof(sysattr), "/sys/block/loop%ld/dev", n);
			fd = open_node(path, sysattr, S_IFBLK, O_RDONLY);
			if (fd >= 0)
				close(fd);
		}
		if (loop_get_info(path, &info) < 0)
			continue;
		if (major(info.backing_dev) != major(st_dev) ||
		    minor(info.backing_dev) != minor(st_dev) || info.backing_ino != (uint64_t)st_ino)
			continue;
		count++;
		if (first && (best < 0 || n < best)) {
			best = n;
			*first = info;
		}
	}
	closedir(d);
	return count;
}
