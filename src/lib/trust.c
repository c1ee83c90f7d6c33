/* The trust rules (see trust.h and qcowsetup(8) SECURITY).
 *
 * Why these rules: an image names its backing and data files by path, and
 * whoever made the image chose those paths. Followed blindly by a process
 * running as root, a name can make a guest read a host disk (/dev/sda,
 * ../../../dev/loop0), host kernel memory (/proc/kcore is a regular file to
 * fstat), or write to another file (a data file is written), and a FIFO
 * blocks whoever opens it. So a name is only followed to a regular file on
 * a storage filesystem; and, unless the admin says --trust-names, only into
 * the folder the admin chose by naming the top image, and only to files of
 * root or of the image's owner (an image is as trustworthy as its owner).
 * Names the admin gives (--backing-file, --data-file, the image itself) are
 * the admin's choice: they only have to be files or block devices.
 *
 * Nothing is opened by name for real before it passed: the path is opened
 * with O_PATH (no open of a device or FIFO happens), checked through that
 * descriptor, and reopened through /proc/self/fd, so that what was checked
 * is what gets read. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>
#include <linux/magic.h>

#include "fileio.h"
#include "image.h"
#include "log.h"
#include "sysutil.h"
#include "trust.h"
#include "util.h"

/* Filesystems that are kernel interfaces, not storage. */
static const struct {
	unsigned long magic;
	const char *name;
} pseudo_fs[] = {
	{ PROC_SUPER_MAGIC, "proc" },
	{ SYSFS_MAGIC, "sysfs" },
	{ DEBUGFS_MAGIC, "debugfs" },
	{ TRACEFS_MAGIC, "tracefs" },
	{ SECURITYFS_MAGIC, "securityfs" },
	{ CGROUP_SUPER_MAGIC, "cgroup" },
	{ CGROUP2_SUPER_MAGIC, "cgroup2" },
	{ BPF_FS_MAGIC, "bpf" },
	{ PSTOREFS_MAGIC, "pstore" },
	{ EFIVARFS_MAGIC, "efivarfs" },
	{ 0x62656570UL, "configfs" },
	{ DEVPTS_SUPER_MAGIC, "devpts" },
	{ BINFMTFS_MAGIC, "binfmt_misc" },
	{ SELINUX_MAGIC, "selinuxfs" },
	{ SMACK_MAGIC, "smackfs" },
	{ 0x65735543UL, "fusectl" },
	{ NSFS_MAGIC, "nsfs" },
	{ 0x19800202UL, "mqueue" },
};

/* The filesystem of fd when it is a kernel interface, else NULL. devtmpfs
 * has tmpfs's magic: a file on the filesystem mounted at /dev counts as
 * devtmpfs when /dev is a mount of its own. */
static const char *pseudo_fs_name(int fd, const struct stat *st)
{
	struct statfs sfs;
	struct stat dev, root;

	if (fstatfs(fd, &sfs) == 0)
		for (size_t i = 0; i < ARRAY_SIZE(pseudo_fs); i++)
			if ((unsigned long)sfs.f_type == pseudo_fs[i].magic)
				return pseudo_fs[i].name;
	if (stat("/dev", &dev) == 0 && stat("/", &root) == 0 && dev.st_dev != root.st_dev &&
	    st->st_dev == dev.st_dev)
		return "devtmpfs";
	return NULL;
}

static const char *type_name(mode_t mode)
{
	switch (mode & S_IFMT) {
	case S_IFIFO:
		return "a FIFO";
	case S_IFCHR:
		return "a character device";
	case S_IFDIR:
		return "a directory";
	case S_IFSOCK:
		return "a socket";
	case S_IFLNK:
		return "a symbolic link";
	default:
		return "not a file";
	}
}

/* Cut path at its last '/' (the folder; "/" for a file in the root). */
static void cut_to_folder(char *path)
{
	char *slash = strrchr(path, '/');

	if (slash == path)
		path[1] = '\0';
	else if (slash)
		*slash = '\0';
}

static bool is_under(const char *path, const char *folder)
{
	size_t len = strlen(folder);

	if (!strcmp(folder, "/"))
		return path[0] == '/';
	return !strncmp(path, folder, len) && path[len] == '/';
}

/* Whether real (a real path) lies in the top image's folder: the folder
 * as the top was named (symlinks resolved), or the folder of the file the
 * top really is. */
static bool in_top_folder(const struct image *top, const char *real)
{
	char folder[PATH_MAX], *named, *copy;
	bool in = false;

	if (file_io_real_path(&top->io, folder, sizeof(folder)) == 0) {
		cut_to_folder(folder);
		in = is_under(real, folder);
	}
	copy = strdup(top->path);
	if (!in && copy) {
		if (strchr(copy, '/'))
			cut_to_folder(copy);
		else
			strcpy(copy, ".");
		named = realpath(copy, NULL);
		in = named && is_under(real, named);
		free(named);
	}
	free(copy);
	return in;
}

/* Why the name in req may not lead to the file open (O_PATH) on fd, or
 * NULL. trustable: --trust-names would allow it. */
static const char *refusal(const struct trust_rules *rules, const struct img_open_req *req, int fd,
			   const struct stat *st, char *why, size_t size, bool *trustable)
{
	char real[PATH_MAX] = "";
	const char *fs;
	struct stat by;
	int by_fd;

	/* a regular file on a kernel interface: never (a block device node
	 * lives on devtmpfs, and is judged as a device) */
	*trustable = false;
	fs = S_ISREG(st->st_mode) ? pseudo_fs_name(fd, st) : NULL;
	if (fs) {
		snprintf(why, size, "it is on %s, a kernel interface, not a storage filesystem", fs);
		return why;
	}
	*trustable = true;
	if (rules && rules->trust_names)
		return NULL;
	if (S_ISBLK(st->st_mode))
		return "it is a block device";
	if (fd_real_path(fd, real, sizeof(real)) < 0 || !req->top || !in_top_folder(req->top, real)) {
		snprintf(why, size, "it is %s, outside the folder of %s", real[0] == '/' ? real : "elsewhere",
			 req->top ? req->top->path : "the image");
		return why;
	}
	by_fd = req->by ? file_io_fd(&req->by->io) : -1;
	if (st->st_uid != 0 && (by_fd < 0 || fstat(by_fd, &by) < 0 || by.st_uid != st->st_uid)) {
		snprintf(why, size, "it belongs to user %u, neither root nor the owner of %s", (unsigned int)st->st_uid,
			 req->by ? req->by->path : "the image");
		return why;
	}
	return NULL;
}

static const char *role_name(enum img_file_role role)
{
	return role == IMG_FILE_BACKING ? "backing file" : role == IMG_FILE_DATA ? "external data file" : "image";
}

static void log_open_error(const struct img_open_req *req, int flags, int r)
{
	bool write = (flags & O_ACCMODE) == O_RDWR;

	if (req->by)
		log_err("%s: cannot open %s %s%s: %s%s.", req->by->path, role_name(req->role), req->path,
			write ? " for writing" : "", strerror(-r),
			write && (r == -EACCES || r == -EROFS || r == -EPERM) ? " (map it with --readonly)" : "");
	else
		log_err("Cannot open %s%s: %s%s.", req->path, write ? " for writing" : "", strerror(-r),
			write && (r == -EACCES || r == -EROFS || r == -EPERM) ? " (map it with --readonly)" : "");
}

int trust_open(const struct trust_rules *rules, const struct img_open_req *req, int flags)
{
	char proc[64], why[PATH_MAX + 128];
	const char *no;
	struct stat st, st2;
	bool trustable;
	int pfd, fd, r;

	pfd = open(req->path, O_PATH | O_CLOEXEC);
	if (pfd < 0) {
		r = -errno;
		log_open_error(req, O_RDONLY, r);
		return r;
	}
	if (fstat(pfd, &st) < 0) {
		r = -errno;
		log_open_error(req, O_RDONLY, r);
		goto out;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		if (req->by)
			log_err("%s: refusing %s %s: it is %s, not an image file or block device.", req->by->path,
				role_name(req->role), req->path, type_name(st.st_mode));
		else
			log_err("%s is %s, not an image file or block device.", req->path, type_name(st.st_mode));
		r = -ENODEV;
		goto out;
	}
	if (req->name) {
		no = refusal(rules, req, pfd, &st, why, sizeof(why), &trustable);
		if (no) {
			log_err("%s: refusing %s %s: %s (see SECURITY in qcowsetup(8): %s--%s FILE names it yourself).",
				req->by ? req->by->path : "?", role_name(req->role), req->path, no,
				trustable ? "--trust-names follows it, " : "",
				req->role == IMG_FILE_BACKING ? "backing-file" : "data-file");
			r = -EACCES;
			goto out;
		}
	}
	/* the file checked, not a file of that name: through the descriptor */
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", pfd);
	fd = open(proc, flags | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd < 0 && errno == ENOENT)
		fd = open(req->path, flags | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);	/* no /proc */
	if (fd < 0) {
		r = -errno;
		log_open_error(req, flags, r);
		if (r == -EROFS || r == -EPERM)
			r = -EACCES;	/* no permission to write it (exit 2) */
		goto out;
	}
	if (fstat(fd, &st2) < 0 || st2.st_dev != st.st_dev || st2.st_ino != st.st_ino) {
		log_err("%s changed while it was opened.", req->path);
		close(fd);
		r = -EAGAIN;
		goto out;
	}
	/* reads block as usual from here on */
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		r = -errno;
		close(fd);
		goto out;
	}
	r = fd;
out:
	close(pfd);
	return r;
}
