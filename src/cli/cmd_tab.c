/* qcowsetup open --tab [NAME...] / close --tab [NAME...]: the entries of
 * /etc/qcowtab (qcowtab(5)), as systemd units, dracut and udev run them.
 *
 * For each entry: find the device that holds the image (libblkid, through
 * probe_blkid.c), mount its filesystem under /run/qcowsetup/mnt (read-only
 * unless the entry maps read-write; a filesystem already mounted somewhere is
 * used where it is), find the key file the same way (mounted read-only under
 * /run/qcowsetup/key only while it is read), then map it as `qcowsetup open`
 * does. Passphrases are asked on the terminal, through systemd's password
 * agents (systemd-ask-password) when there is no terminal and systemd runs,
 * or read as one line from standard input when it is a pipe (plymouth,
 * scripts); entries marked same-passphrase share the passphrase that opened
 * the first of them: one question for all.
 *
 * The mapping itself is lib/mapping.c's mapping_open() with the entry's
 * settings; it asks entry_passphrase() for passphrases when (and only
 * when) an encrypted layer needs one: the key file, the shared passphrase,
 * then the questions. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon_state.h"
#include "dm.h"
#include "dmtable.h"
#include "mapping.h"
#include "keys.h"
#include "log.h"
#include "passphrase.h"
#include "qcowsetup.h"
#include "tab.h"
#include "util.h"

#define QCOWTAB_MAX_SIZE	((size_t)1 << 20)
/* Where mounts made by qcowsetup live: the filesystems holding images (kept
 * while a mapping uses them) and those holding key files (unmounted after
 * use). Under /run, so they survive the initramfs's switch_root. */
#define MOUNT_DIR		QS_RUN_DIR "/mnt"
#define KEY_MOUNT_DIR		QS_RUN_DIR "/key"

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
struct held_mount {
	char dir[PATH_MAX];
	bool ours;	/* mounted here by this run */
};

/* Mount (or find mounted) the filesystem TAG=VALUE of loc names, under base.
 * Writes the file's full path into path. */
static int mount_location(const struct qcowtab_location *loc, const char *base, bool rw,
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
static void release_mount(struct held_mount *m, bool wait_busy)
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

/* ---- passphrases ---- */

enum ask_how {
	ASK_TTY,	/* standard input is a terminal */
	ASK_AGENT,	/* systemd-ask-password (systemd runs, nothing on stdin) */
	ASK_STDIN,	/* a pipe or file: one line */
	ASK_NOWHERE,
};

static const char *find_program(const char *name, char *buf, size_t size)
{
	const char *path = getenv("PATH");
	char dirs[4096];
	char *save = NULL;

	snprintf(dirs, sizeof(dirs), "%s:/usr/bin:/bin:/usr/sbin:/sbin", path ? path : "");
	for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
		if (!*d)
			continue;
		if ((size_t)snprintf(buf, size, "%s/%s", d, name) < size && access(buf, X_OK) == 0)
			return buf;
	}
	return NULL;
}

static enum ask_how ask_method(void)
{
	char prog[PATH_MAX];
	struct stat st;

	if (opt.batch_mode)
		return ASK_NOWHERE;	/* no questions: key files only */
	if (isatty(STDIN_FILENO))
		return ASK_TTY;
	if (fstat(STDIN_FILENO, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISREG(st.st_mode) || S_ISSOCK(st.st_mode)))
		return ASK_STDIN;
	if (access("/run/systemd/system", F_OK) == 0 && find_program("systemd-ask-password", prog, sizeof(prog)))
		return ASK_AGENT;
	return ASK_NOWHERE;
}

/* One line from systemd-ask-password, into secure memory. */
static int ask_agent(const char *names, const char *id, unsigned int timeout, bool accept_cached,
		     struct passphrase **out)
{
	char prog[PATH_MAX], prompt[512], idarg[256], tmo[64];
	const char *argv[10];
	int pfd[2], status, argc = 0, r;
	char *buf = NULL;
	size_t len = 0;
	pid_t pid;

	*out = NULL;
	if (!find_program("systemd-ask-password", prog, sizeof(prog)))
		return -ENOENT;
	snprintf(prompt, sizeof(prompt), "Please enter passphrase for %s:", names);
	snprintf(idarg, sizeof(idarg), "--id=qcowsetup:%s", id);
	snprintf(tmo, sizeof(tmo), "--timeout=%us", timeout);
	argv[argc++] = prog;
	argv[argc++] = "--icon=drive-harddisk";
	argv[argc++] = idarg;
	argv[argc++] = "--keyname=qcowsetup";
	argv[argc++] = tmo;
	if (accept_cached)
		argv[argc++] = "--accept-cached";
	argv[argc++] = prompt;
	argv[argc] = NULL;
	if (pipe2(pfd, O_CLOEXEC) < 0)
		return -errno;
	pid = fork();
	if (pid < 0) {
		r = -errno;
		close(pfd[0]);
		close(pfd[1]);
		return r;
	}
	if (pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		execv(prog, (char *const *)argv);
		_exit(127);
	}
	close(pfd[1]);
	buf = secure_alloc(PASSPHRASE_MAX_SIZE + 1);
	r = buf ? 0 : -ENOMEM;
	for (;;) {
		ssize_t n;

		if (!buf)
			break;
		n = read(pfd[0], buf + len, PASSPHRASE_MAX_SIZE - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
		if (len == PASSPHRASE_MAX_SIZE)
			break;
	}
	close(pfd[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (r == 0 && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
		log_err("systemd-ask-password got no passphrase for %s.", names);
		r = -EPIPE;
	}
	if (r == 0) {
		char *nl = memchr(buf, '\n', len);

		if (nl)
			len = (size_t)(nl - buf);
		r = passphrase_from_buffer(buf, len, out);
	}
	secure_free(buf);
	return r;
}

/* ---- open ---- */

struct tab_run {
	struct qcowtab tab;
	struct passphrase *shared;	/* opened a same-passphrase entry */
	const char *group_names;	/* "root, data": the same-passphrase entries asked for */
};

/* Where the passphrases of one entry come from, in turn: its key file,
 * the passphrase that opened an earlier same-passphrase entry, then the
 * questions (tries= of them; one on a pipe). */
enum key_step {
	KEY_FILE = 0,
	KEY_SHARED,
	KEY_ASK,
};

struct entry_keys {
	struct tab_run *t;
	const struct qcowtab_entry *e;
	const char *key_file;		/* NULL: none */
	enum key_step step;
	enum ask_how how;
	unsigned int asked;		/* questions so far */
	bool asked_last;		/* the last passphrase handed out was asked for */
	struct passphrase *last;	/* a copy of it, for same-passphrase */
};

static int question(struct entry_keys *k, struct passphrase **pp)
{
	const struct qcowtab_entry *e = k->e;
	const char *names = e->same_passphrase && k->t->group_names ? k->t->group_names : e->name;
	struct passphrase_opts po = { .image_name = names, .timeout = e->timeout };
	int r;

	if (k->asked && (k->how == ASK_STDIN || (e->tries && k->asked >= e->tries))) {
		if (k->how != ASK_STDIN)
			log_err("%s: no passphrase opened it after %u attempts.", e->name, k->asked);
		return -EPERM;
	}
	k->asked++;
	switch (k->how) {
	case ASK_AGENT:
		r = ask_agent(names, e->name, e->timeout, e->same_passphrase && k->asked == 1, pp);
		break;
	case ASK_TTY:
	case ASK_STDIN:
		/* no key file: the terminal (prompt, no echo), or a line of stdin */
		r = tools_read_passphrase(&po, pp);
		break;
	default:
		log_err("%s: %s.", e->name, opt.batch_mode ? "a passphrase is needed and --batch-mode asks no questions"
			: "no terminal and no password agent to ask for a passphrase");
		return -EPERM;
	}
	/* no answer (end of input, timeout, the agent gave up): no permission */
	return r == -EPIPE || r == -ETIMEDOUT ? -EPERM : r;
}

/* mapping_ask_fn: the next passphrase for the entry. */
static int entry_passphrase(void *opaque, const char *image, unsigned int attempt, struct passphrase **pp)
{
	struct entry_keys *k = opaque;
	const struct qcowtab_entry *e = k->e;
	int r;

	(void)attempt;
	k->asked_last = false;
	if (k->step == KEY_FILE) {
		k->step = KEY_SHARED;
		if (k->key_file) {
			struct passphrase_opts po = {
				.key_file = k->key_file,
				.keyfile_offset = e->keyfile_offset,
				.keyfile_size = e->keyfile_size,
				.image_name = image,
			};

			r = tools_read_passphrase(&po, pp);
			if (r == 0)
				return 0;
			if (r == -ENOMEM)
				return r;
			log_std("%s: the key file %s cannot be read; asking for a passphrase.", e->name, k->key_file);
		}
	} else if (k->key_file && k->step == KEY_SHARED) {
		log_std("%s: the key file did not unlock %s; asking for a passphrase.", e->name, image);
	}
	if (k->step == KEY_SHARED) {
		k->step = KEY_ASK;
		if (e->same_passphrase && k->t->shared)
			return passphrase_from_buffer(k->t->shared->data, k->t->shared->len, pp);
	} else if (e->same_passphrase && k->t->shared && !k->asked) {
		log_std("%s: the shared passphrase does not open it; asking again.", e->name);
	}
	if (!k->asked)
		k->how = ask_method();
	r = question(k, pp);
	if (r == 0 && e->same_passphrase) {
		passphrase_free(k->last);
		k->last = NULL;
		r = passphrase_from_buffer((*pp)->data, (*pp)->len, &k->last);
		if (r) {
			passphrase_free(*pp);
			*pp = NULL;
		}
		k->asked_last = r == 0;
	}
	return r;
}

/* Map the entry: its settings, its key sources. */
static int map_entry(struct tab_run *t, const struct qcowtab_entry *e, const char *image, const char *key_file)
{
	struct entry_keys k = { .t = t, .e = e, .key_file = key_file };
	struct mapping_params p = {
		.image = image,
		.name = e->name,
		.read_only = e->readonly,
		.snapshot = e->snapshot,
		.format = e->format,
		.trust_names = e->trust_names,
		.allow_discards = e->discard,
		/* an entry expects a key (a key file, or a question) */
		.require_encryption = !e->allow_unencrypted,
		.max_targets = opt.max_targets,
		.ask = entry_passphrase,
		.ask_opaque = &k,
		.debug = opt.debug,
	};
	int r = mapping_open(&p);

	if (r == 0 && k.asked_last) {
		/* the question's answer opened it: the others' first try */
		passphrase_free(t->shared);
		t->shared = k.last;
		k.last = NULL;
	}
	passphrase_free(k.last);
	return r;
}

static bool entry_active(const char *name, bool *ours)
{
	struct dm_dev_info info;

	*ours = false;
	if (dm_device_info(name, &info) || !info.exists)
		return false;
	*ours = dm_uuid_is_top(info.uuid);
	return true;
}

static int open_entry(struct tab_run *t, const struct qcowtab_entry *e)
{
	struct held_mount img_mount = { 0 }, key_mount = { 0 };
	char image[PATH_MAX], key[PATH_MAX];
	const char *key_file = NULL;
	bool ours;
	int r;

	if (entry_active(e->name, &ours)) {
		if (!ours) {
			log_err("%s: a device-mapper device of that name exists and is not a qcowsetup mapping.", e->name);
			return -EEXIST;
		}
		log_verbose("%s is already active.", e->name);
		return 0;
	}
	switch (e->image.source) {
	case QCOWTAB_PATH_ONLY:
		snprintf(image, sizeof(image), "%s", e->image.path);
		break;
	case QCOWTAB_TAG_ONLY:
		r = probe_tag_device(e->image.tag, e->image.value, image, sizeof(image));
		if (r == -ENODEV)
			log_err("%s: no device with %s=%s (yet).", e->name, e->image.tag, e->image.value);
		if (r)
			return r;
		break;
	case QCOWTAB_TAG_PATH:
		r = mount_location(&e->image, MOUNT_DIR, !e->readonly && !e->snapshot, &img_mount, image, sizeof(image));
		if (r)
			return r;
		break;
	default:
		return -EINVAL;
	}
	switch (e->key.source) {
	case QCOWTAB_PATH_ONLY:
		key_file = e->key.path;
		break;
	case QCOWTAB_TAG_PATH:
		r = mount_location(&e->key, KEY_MOUNT_DIR, false, &key_mount, key, sizeof(key));
		if (r)
			goto out;
		key_file = key;
		break;
	default:
		break;
	}
	log_verbose("%s: mapping %s%s%s.", e->name, image, key_file ? " with key file " : "", key_file ? key_file : "");
	r = map_entry(t, e, image, key_file);
out:
	release_mount(&key_mount, false);
	if (r)
		release_mount(&img_mount, true);
	return r;
}

/* The entries to work on: names (each must exist), or all of the table
 * (without the noauto ones when skip_noauto). */
static int select_entries(const struct qcowtab *tab, int argc, char **argv, bool skip_noauto,
			  const struct qcowtab_entry ***out, size_t *count)
{
	const struct qcowtab_entry **v = calloc(argc ? (size_t)argc : tab->count + 1, sizeof(*v));
	size_t n = 0;

	if (!v)
		return -ENOMEM;
	if (argc) {
		for (int i = 0; i < argc; i++) {
			const struct qcowtab_entry *e = qcowtab_find(tab, argv[i]);

			if (!e) {
				log_err("No entry %s in %s.", argv[i], tools_qcowtab_path());
				free(v);
				return -EINVAL;
			}
			v[n++] = e;
		}
	} else {
		for (size_t i = 0; i < tab->count; i++)
			if (!skip_noauto || !tab->entries[i].noauto)
				v[n++] = &tab->entries[i];
	}
	*out = v;
	*count = n;
	return 0;
}

int cmd_open_tab(int argc, char **argv)
{
	struct tab_run t = { 0 };
	const struct qcowtab_entry **sel = NULL;
	size_t n = 0, glen = 0;
	char *group = NULL;
	int r, first_err = 0;

	if (opt.key_file || opt.keyfile_offset || opt.keyfile_size || opt.snapshot || opt.readonly) {
		log_err("With --tab, the key file, read-only and snapshot settings come from %s.",
			tools_qcowtab_path());
		return -EINVAL;
	}
	r = tools_load_qcowtab(&t.tab, false);
	if (r)
		return r;
	r = select_entries(&t.tab, argc, argv, true, &sel, &n);
	if (r)
		goto out;
	r = dm_check_control();
	if (r)
		goto out;
	/* the names one same-passphrase question is for */
	for (size_t i = 0; i < n; i++) {
		bool ours;

		if (!sel[i]->same_passphrase || entry_active(sel[i]->name, &ours))
			continue;
		glen += strlen(sel[i]->name) + 2;
	}
	if (glen) {
		group = calloc(1, glen + 1);
		if (!group) {
			r = -ENOMEM;
			goto out;
		}
		for (size_t i = 0; i < n; i++) {
			bool ours;

			if (!sel[i]->same_passphrase || entry_active(sel[i]->name, &ours))
				continue;
			if (*group)
				strcat(group, ", ");
			strcat(group, sel[i]->name);
		}
		t.group_names = group;
	}
	for (size_t i = 0; i < n; i++) {
		r = open_entry(&t, sel[i]);
		if (r == 0)
			continue;
		if (sel[i]->nofail) {
			log_std("%s could not be mapped (nofail: going on).", sel[i]->name);
			continue;
		}
		/* (its reason is the line logged above) */
		log_verbose("%s could not be mapped.", sel[i]->name);
		if (!first_err)
			first_err = r;
	}
	r = first_err;
out:
	passphrase_free(t.shared);
	free(group);
	free(sel);
	qcowtab_free(&t.tab);
	dm_release();
	return r;
}

/* ---- close ---- */

int cmd_close_tab(int argc, char **argv)
{
	struct qcowtab tab;
	const struct qcowtab_entry **sel = NULL;
	size_t n = 0;
	int r, first_err = 0;

	r = tools_load_qcowtab(&tab, false);
	if (r)
		return r;
	r = select_entries(&tab, argc, argv, false, &sel, &n);
	if (r)
		goto out;
	r = dm_check_control();
	if (r)
		goto out;
	/* the reverse of the order of opening */
	for (size_t i = n; i-- > 0;) {
		const struct qcowtab_entry *e = sel[i];
		bool ours;

		if (!entry_active(e->name, &ours)) {
			log_verbose("%s is not active.", e->name);
		} else if (!ours) {
			log_err("%s is not a qcowsetup mapping: left alone.", e->name);
			r = -EINVAL;
		} else {
			r = mapping_close(e->name, opt.deferred);
		}
		if (r == 0 && e->image.source == QCOWTAB_TAG_PATH && !opt.deferred) {
			struct held_mount m = { .ours = true };

			if (mount_dir_for(MOUNT_DIR, &e->image, m.dir, sizeof(m.dir)) == 0 &&
			    find_mount(0, m.dir, NULL, 0, NULL) > 0)
				release_mount(&m, true);
		}
		if (r && !first_err)
			first_err = r;
		r = 0;
	}
	r = first_err;
out:
	free(sel);
	qcowtab_free(&tab);
	dm_release();
	return r;
}
