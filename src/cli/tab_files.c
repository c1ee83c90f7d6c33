/* qcowtab for the qcowsetup command: loading the file, finding the devices
 * its entries name (libblkid, through probe_blkid.c), mounting the
 * filesystems that hold images and key files (tab.h). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "qcowsetup.h"
#include "tab.h"

#define QCOWTAB_MAX_SIZE	((size_t)1 << 20)

const char *tools_qcowtab_path(void)
{
	return opt.qcowtab ? opt.qcowtab : QCOWTAB_PATH;
}

static void report_line(void *opaque, enum qcowtab_severity sev, unsigned int line, const char *msg)
{
	const char *path = opaque;

	if (sev == QCOWTAB_ERROR)
		log_err("%s:%u: %s (line ignored).", path, line, msg);
	else
		log_std("%s:%u: %s.", path, line, msg);
}

/* Up to max bytes of path into a new NUL-terminated buffer. */
static int read_text(const char *path, size_t max, bool missing_ok, char **out, size_t *outlen)
{
	char *buf;
	size_t len = 0;
	ssize_t n;
	int fd, r = 0;

	*out = NULL;
	*outlen = 0;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		if (r == -ENOENT && missing_ok)
			return 0;
		log_err("Cannot open %s: %s.", path, strerror(-r));
		return r;
	}
	buf = malloc(max + 2);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	while (len <= max) {
		n = read(fd, buf + len, max + 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			log_err("Cannot read %s: %s.", path, strerror(-r));
			break;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	if (!r && len > max) {
		log_err("%s is larger than %zu bytes.", path, max);
		r = -EFBIG;
	}
	if (r) {
		free(buf);
		return r;
	}
	buf[len] = '\0';
	*out = buf;
	*outlen = len;
	return 0;
}

int tools_load_qcowtab(struct qcowtab *tab, bool missing_ok)
{
	const char *path = tools_qcowtab_path();
	char *text = NULL, *cmdline = NULL, *extra = NULL, *all;
	size_t len = 0, clen = 0;
	bool initrd = access("/etc/initrd-release", F_OK) == 0;
	int r;

	memset(tab, 0, sizeof(*tab));
	/* in the initramfs, the images named on the kernel command line too */
	if (initrd && read_text("/proc/cmdline", 65536, true, &cmdline, &clen) == 0 && cmdline) {
		if (qcowtab_cmdline_disabled(cmdline)) {
			log_verbose("rd.qcowsetup=0: no images to map in the initramfs.");
			free(cmdline);
			return 0;
		}
		r = qcowtab_cmdline_lines(cmdline, &extra);
		free(cmdline);
		if (r)
			return r;
		if (*extra)
			missing_ok = true;
	}
	r = read_text(path, QCOWTAB_MAX_SIZE, missing_ok, &text, &len);
	if (r)
		goto out;
	all = malloc(len + (extra ? strlen(extra) : 0) + 2);
	if (!all) {
		r = -ENOMEM;
		goto out;
	}
	snprintf(all, len + (extra ? strlen(extra) : 0) + 2, "%s%s%s", text ? text : "",
		 len && text[len - 1] != '\n' ? "\n" : "", extra ? extra : "");
	r = qcowtab_parse(all, strlen(all), report_line, (void *)path, tab, NULL);
	free(all);
out:
	free(text);
	free(extra);
	return r;
}

/* ---- devices and mounts ---- */

int tools_location_blockdev(const struct qcowtab_location *loc, char *dev, size_t size, dev_t *rdev)
{
	struct stat st;
	int r;

	switch (loc->source) {
	case QCOWTAB_PATH_ONLY:
		if (stat(loc->path, &st) < 0)
			return -errno == -ENOENT ? -ENODEV : -errno;
		if (!S_ISBLK(st.st_mode))
			return -ENODEV;
		if ((size_t)snprintf(dev, size, "%s", loc->path) >= size)
			return -ENOSPC;
		break;
	case QCOWTAB_TAG_ONLY:
		r = probe_tag_device(loc->tag, loc->value, dev, size);
		if (r)
			return r;
		if (stat(dev, &st) < 0)
			return -errno == -ENOENT ? -ENODEV : -errno;
		if (!S_ISBLK(st.st_mode))
			return -ENODEV;
		break;
	default:
		return -ENODEV;
	}
	*rdev = st.st_rdev;
	return 0;
}

/* Undo \NNN escapes of /proc/self/mountinfo in place. */
static void unescape_mountinfo(char *s)
{
	char *o = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*o++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*o++ = *s;
		}
	}
	*o = '\0';
}

/* Where the filesystem of device rdev is mounted whole (root "/"), the
 * first such mount: its directory and whether it is read-only. With
 * at_dir, whether at_dir is a mount point at all (rdev ignored). Returns
 * 1 found, 0 not, -errno. */
static int find_mount(dev_t rdev, const char *at_dir, char *dir, size_t size, bool *read_only)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int found = 0;

	if (!f)
		return -errno;
	while (!found && getline(&line, &cap, f) > 0) {
		unsigned int maj, min;
		char root[PATH_MAX], mp[PATH_MAX], opts[1024];

		/* id parent maj:min root mountpoint options ... */
		if (sscanf(line, "%*u %*u %u:%u %4095s %4095s %1023s", &maj, &min, root, mp, opts) != 5)
			continue;
		unescape_mountinfo(root);
		unescape_mountinfo(mp);
		if (at_dir) {
			if (strcmp(mp, at_dir))
				continue;
		} else if (makedev(maj, min) != rdev || strcmp(root, "/")) {
			continue;
		}
		if (dir)
			snprintf(dir, size, "%s", mp);
		if (read_only)
			*read_only = !strncmp(opts, "ro", 2) && (opts[2] == ',' || !opts[2]);
		found = 1;
	}
	free(line);
	fclose(f);
	return found;
}

static int mkdir_p(const char *path, mode_t mode)
{
	char tmp[PATH_MAX];

	if ((size_t)snprintf(tmp, sizeof(tmp), "%s", path) >= sizeof(tmp))
		return -ENAMETOOLONG;
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(tmp, mode) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(tmp, mode) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/* The directory qcowsetup mounts TAG=VALUE at: BASE/tag-value, the value
 * with anything but [A-Za-z0-9._-] replaced. */
static int mount_dir_for(const char *base, const struct qcowtab_location *loc, char *dir, size_t size)
{
	int n = snprintf(dir, size, "%s/", base);
	size_t pos;

	if (n < 0 || (size_t)n >= size)
		return -ENAMETOOLONG;
	pos = (size_t)n;
	for (const char *t = loc->tag; *t && pos + 1 < size; t++)
		dir[pos++] = (char)(*t >= 'A' && *t <= 'Z' ? *t - 'A' + 'a' : *t);
	if (pos + 1 < size)
		dir[pos++] = '-';
	for (const char *v = loc->value; *v && pos + 1 < size; v++) {
		char c = *v;

		dir[pos++] = (char)((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
				    c == '.' || c == '_' || c == '-' ? c : '_');
	}
	if (pos + 1 >= size)
		return -ENAMETOOLONG;
	dir[pos] = '\0';
	return 0;
}

/* A filesystem made available for one entry. */

/* Mount (or find mounted) the filesystem TAG=VALUE of loc names, under base.
 * Writes the file's full path into path. */
int tab_mount_location(const struct qcowtab_location *loc, const char *base, bool rw,
		       struct held_mount *m, char *path, size_t size)
{
	char dev[PATH_MAX], fstype[64];
	struct stat st;
	bool ro = false;
	int r;

	m->ours = false;
	r = probe_tag_device(loc->tag, loc->value, dev, sizeof(dev));
	if (r == -ENODEV)
		log_err("No device with %s=%s (yet).", loc->tag, loc->value);
	if (r)
		return r;
	if (stat(dev, &st) < 0 || !S_ISBLK(st.st_mode)) {
		log_err("%s (%s=%s) is not a block device.", dev, loc->tag, loc->value);
		return -ENODEV;
	}
	r = find_mount(st.st_rdev, NULL, m->dir, sizeof(m->dir), &ro);
	if (r < 0)
		return r;
	if (r == 0) {
		r = mount_dir_for(base, loc, m->dir, sizeof(m->dir));
		if (r)
			return r;
		r = find_mount(0, m->dir, NULL, 0, NULL);
		if (r > 0) {
			log_err("%s is already a mount point, not of %s.", m->dir, dev);
			return -EBUSY;
		}
		r = probe_fstype(dev, fstype, sizeof(fstype));
		if (r) {
			log_err("No filesystem found on %s (%s=%s).", dev, loc->tag, loc->value);
			return r == -ENODEV ? -EINVAL : r;
		}
		r = mkdir_p(m->dir, 0700);
		if (r) {
			log_err("Cannot create %s: %s.", m->dir, strerror(-r));
			return r;
		}
		if (mount(dev, m->dir, fstype, (rw ? 0 : MS_RDONLY) | MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL) < 0) {
			r = -errno;
			log_err("Cannot mount %s (%s) %s at %s: %s.", dev, fstype, rw ? "read-write" : "read-only",
				m->dir, strerror(-r));
			rmdir(m->dir);
			return r;
		}
		m->ours = true;
		log_verbose("Mounted %s (%s=%s, %s) %s at %s.", dev, loc->tag, loc->value, fstype,
			    rw ? "read-write" : "read-only", m->dir);
	} else if (rw && ro) {
		log_err("%s (%s=%s) is mounted read-only at %s: a read-write image on it cannot be mapped.",
			dev, loc->tag, loc->value, m->dir);
		return -EROFS;
	} else {
		log_verbose("%s (%s=%s) is mounted at %s.", dev, loc->tag, loc->value, m->dir);
	}
	r = snprintf(path, size, "%s%s", strcmp(m->dir, "/") ? m->dir : "", loc->path);
	if (r < 0 || (size_t)r >= size)
		return -ENAMETOOLONG;
	return 0;
}

/* Unmount a filesystem qcowsetup mounted, if nothing uses it any more.
 * Loop devices let go of their file shortly after the mapping is removed:
 * a busy filesystem gets a few more chances. */
void tab_release_mount(struct held_mount *m, bool wait_busy)
{
	if (!m->ours)
		return;
	for (int i = 0; i < (wait_busy ? 20 : 1); i++) {
		if (umount2(m->dir, 0) == 0) {
			log_verbose("Unmounted %s.", m->dir);
			rmdir(m->dir);
			m->ours = false;
			return;
		}
		if (errno != EBUSY)
			break;
		if (wait_busy)
			usleep(100 * 1000);
	}
	log_dbg("%s stays mounted: %s.", m->dir, strerror(errno));
	m->ours = false;
}

void tab_release_location(const struct qcowtab_location *loc, const char *base)
{
	struct held_mount m = { .ours = true };

	if (loc->source == QCOWTAB_TAG_PATH && mount_dir_for(base, loc, m.dir, sizeof(m.dir)) == 0 &&
	    find_mount(0, m.dir, NULL, 0, NULL) > 0)
		tab_release_mount(&m, true);
}

int tab_wait_key_location(const struct qcowtab_location *loc, unsigned int timeout)
{
	char dev[PATH_MAX];
	struct timespec t0, now;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (loc->source == QCOWTAB_PATH_ONLY ? access(loc->path, F_OK) == 0
						      : probe_tag_device(loc->tag, loc->value, dev, sizeof(dev)) == 0)
			return 0;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - t0.tv_sec >= (time_t)timeout)
			return -ETIMEDOUT;
		usleep(200 * 1000);
	}
}
