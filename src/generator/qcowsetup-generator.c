/* qcowsetup-generator: a systemd generator turning /etc/qcowtab (and, in the
 * initramfs, the rd.qcowsetup.* kernel command line options) into units, as
 * systemd-cryptsetup-generator does for /etc/crypttab.
 *
 * C rather than a shell script: it parses qcowtab with the very code the
 * command uses (src/lib/qcowtab.c: escapes, locations, options), it runs
 * before any filesystem but the root is mounted, where a shell and its
 * tools may be missing or slow, and it needs no library beyond libc.
 *
 * For each entry NAME it writes qcowsetup@NAME.service (NAME escaped as
 * systemd escapes unit names) running `qcowsetup open --tab NAME` and
 * `qcowsetup close --tab NAME`, bound to the device that holds the image,
 * with RequiresMountsFor= for images and key files on mounted filesystems,
 * ordered before cryptsetup.target and, when it needs no mount,
 * local-fs-pre.target; pulled in by cryptsetup.target (unless noauto; a
 * "wants" with nofail) and by /dev/mapper/NAME's device unit. The passphrase
 * is asked by qcowsetup through systemd-ask-password.
 *
 *   qcowsetup-generator NORMAL_DIR [EARLY_DIR LATE_DIR]
 * Environment (tests): QCOWSETUP_QCOWTAB (the table), SYSTEMD_IN_INITRD
 * (0/1), SYSTEMD_PROC_CMDLINE (the kernel command line), QCOWSETUP_BIN (the
 * qcowsetup program written into the units). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcowtab.h"

#ifndef SBINDIR
#define SBINDIR "/usr/sbin"
#endif

static const char *me = "qcowsetup-generator";
static int failures;

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", me);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void report(void *opaque, enum qcowtab_severity sev, unsigned int line, const char *msg)
{
	logmsg("%s:%u: %s%s", (const char *)opaque, line, msg, sev == QCOWTAB_ERROR ? " (line ignored)" : "");
	if (sev == QCOWTAB_ERROR)
		failures++;
}

/* snprintf that says when it cut: names longer than PATH_MAX are refused
 * rather than written truncated. */
static bool fmt(char *buf, size_t size, const char *format, ...) __attribute__((format(printf, 3, 4)));
static bool fmt(char *buf, size_t size, const char *format, ...)
{
	va_list ap;
	int n;

	va_start(ap, format);
	n = vsnprintf(buf, size, format, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= size) {
		logmsg("name too long: %.60s...", buf);
		failures++;
		return false;
	}
	return true;
}

static char *read_all(const char *path, size_t max)
{
	FILE *f = fopen(path, "re");
	char *buf;
	size_t n;

	if (!f)
		return NULL;
	buf = malloc(max + 1);
	if (!buf) {
		fclose(f);
		return NULL;
	}
	n = fread(buf, 1, max, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

/* ---- systemd names ---- */

/* udev's encoding of link names (/dev/disk/by-label/...): bytes outside
 * [0-9A-Za-z#+-.:=@_] (and valid UTF-8) become \xNN. */
static void udev_encode(const char *s, char *out, size_t size)
{
	size_t pos = 0;

	for (const unsigned char *c = (const unsigned char *)s; *c && pos + 5 < size; c++) {
		if ((*c >= '0' && *c <= '9') || (*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') ||
		    strchr("#+-.:=@_", *c) || *c >= 0x80)
			out[pos++] = (char)*c;
		else
			pos += (size_t)snprintf(out + pos, size - pos, "\\x%02x", *c);
	}
	out[pos] = '\0';
}

/* The /dev path of a tagged device, as udev links it. */
static void tag_device_path(const struct qcowtab_location *l, char *out, size_t size)
{
	char enc[1024], low[1024];
	size_t i;

	if (!strcmp(l->tag, "UUID") || !strcmp(l->tag, "PARTUUID")) {
		/* lower case, as blkid reports them */
		for (i = 0; l->value[i] && i + 1 < sizeof(low); i++)
			low[i] = (char)(l->value[i] >= 'A' && l->value[i] <= 'F' ? l->value[i] - 'A' + 'a' : l->value[i]);
		low[i] = '\0';
		udev_encode(low, enc, sizeof(enc));
	} else {
		udev_encode(l->value, enc, sizeof(enc));
	}
	fmt(out, size, "/dev/disk/by-%s/%s", !strcmp(l->tag, "UUID") ? "uuid" : !strcmp(l->tag, "LABEL") ? "label" :
		 !strcmp(l->tag, "PARTUUID") ? "partuuid" : "partlabel", enc);
}

/* The device unit of a location's device, or "" when it is a file on a
 * mounted filesystem (then *mount_path is what RequiresMountsFor= needs). */
static void location_units(const struct qcowtab_location *l, char *dev_unit, size_t size, const char **mount_path)
{
	char path[2048], esc[4096];

	dev_unit[0] = '\0';
	*mount_path = NULL;
	switch (l->source) {
	case QCOWTAB_TAG_ONLY:
	case QCOWTAB_TAG_PATH:
		tag_device_path(l, path, sizeof(path));
		break;
	case QCOWTAB_PATH_ONLY:
		if (strncmp(l->path, "/dev/", 5)) {
			*mount_path = l->path;
			return;
		}
		fmt(path, sizeof(path), "%s", l->path);
		break;
	default:
		return;
	}
	qcowtab_systemd_escape(path, true, esc, sizeof(esc));
	fmt(dev_unit, size, "%s.device", esc);
}

/* ---- writing ---- */

static int mkdir_in(const char *dir, const char *sub, char *out, size_t size)
{
	if (!fmt(out, size, "%s/%s", dir, sub))
		return -ENAMETOOLONG;
	if (mkdir(out, 0755) < 0 && errno != EEXIST) {
		logmsg("cannot create %s: %s", out, strerror(errno));
		return -errno;
	}
	return 0;
}

static int link_unit(const char *dir, const char *sub, const char *unit)
{
	char d[4096], l[8192], target[4096];

	if (mkdir_in(dir, sub, d, sizeof(d)))
		return -1;
	if (!fmt(l, sizeof(l), "%s/%s", d, unit) || !fmt(target, sizeof(target), "../%s", unit))
		return -1;
	unlink(l);
	if (symlink(target, l) < 0) {
		logmsg("cannot link %s: %s", l, strerror(errno));
		return -1;
	}
	return 0;
}

static int write_device_timeout(const char *dir, const char *dev_unit, unsigned int seconds)
{
	char d[4096], sub[2048], f[8192];
	FILE *fp;

	if (!fmt(sub, sizeof(sub), "%s.d", dev_unit))
		return -1;
	if (mkdir_in(dir, sub, d, sizeof(d)))
		return -1;
	if (!fmt(f, sizeof(f), "%s/40-qcowsetup-device-timeout.conf", d))
		return -1;
	fp = fopen(f, "we");
	if (!fp)
		return -1;
	fprintf(fp, "# Automatically generated by %s\n\n[Unit]\nJobRunningTimeoutSec=%u\n", me, seconds);
	return fclose(fp) ? -1 : 0;
}

static int write_unit(const char *dir, const struct qcowtab_entry *e, const char *tab_arg, const char *bin)
{
	char unit[1100], path[8192], img_dev[4096], key_dev[4096], mapper[1200], mapper_esc[2048];
	const char *img_mount, *key_mount;
	bool needs_mount;
	FILE *f;

	qcowtab_unit_name(e->name, unit, sizeof(unit));
	fmt(mapper, sizeof(mapper), "/dev/mapper/%s", e->name);
	qcowtab_systemd_escape(mapper, true, mapper_esc, sizeof(mapper_esc));
	location_units(&e->image, img_dev, sizeof(img_dev), &img_mount);
	location_units(&e->key, key_dev, sizeof(key_dev), &key_mount);
	needs_mount = img_mount || key_mount;

	if (!fmt(path, sizeof(path), "%s/%s", dir, unit))
		return -1;
	f = fopen(path, "we");
	if (!f) {
		logmsg("cannot write %s: %s", path, strerror(errno));
		return -1;
	}
	fprintf(f, "# Automatically generated by %s\n\n"
		"[Unit]\n"
		"Description=qcowsetup: map the qcow2 image %s\n"
		"Documentation=man:qcowtab(5) man:qcowsetup(8)\n"
		"SourcePath=%s\n"
		"DefaultDependencies=no\n"
		"IgnoreOnIsolate=true\n"
		"After=cryptsetup-pre.target systemd-udevd-kernel.socket\n"
		"Before=blockdev@%s.target\n"
		"Wants=blockdev@%s.target\n",
		me, e->name, tab_arg ? tab_arg : QCOWTAB_PATH, mapper_esc, mapper_esc);
	if (!e->initrd_attach)
		/* an image attached in the initramfs may hold the root: it stays */
		fprintf(f, "Conflicts=umount.target\nBefore=umount.target\n");
	if (!e->nofail)
		fprintf(f, "Before=cryptsetup.target\n");
	if (!e->nofail && !needs_mount)
		fprintf(f, "Before=local-fs-pre.target\n");
	if (img_dev[0])
		fprintf(f, "BindsTo=%s\nAfter=%s\n", img_dev, img_dev);
	if (key_dev[0])
		fprintf(f, "Wants=%s\nAfter=%s\n", key_dev, key_dev);
	if (img_mount)
		fprintf(f, "RequiresMountsFor=%s\n", img_mount);
	if (key_mount)
		fprintf(f, "RequiresMountsFor=%s\n", key_mount);
	fprintf(f, "\n[Service]\n"
		"Type=oneshot\n"
		"RemainAfterExit=yes\n"
		"TimeoutSec=infinity\n"
		"KeyringMode=shared\n"
		"OOMScoreAdjust=500\n"
		"ExecStart=%s open --tab%s%s %s\n"
		"ExecStop=%s close --tab%s%s %s\n",
		bin, tab_arg ? " --qcowtab " : "", tab_arg ? tab_arg : "", e->name,
		bin, tab_arg ? " --qcowtab " : "", tab_arg ? tab_arg : "", e->name);
	if (fclose(f)) {
		logmsg("cannot write %s: %s", path, strerror(errno));
		return -1;
	}

	if (!e->noauto && link_unit(dir, e->nofail ? "cryptsetup.target.wants" : "cryptsetup.target.requires", unit))
		return -1;
	if (!fmt(path, sizeof(path), "%s.device.requires", mapper_esc))
		return -1;
	if (link_unit(dir, path, unit))
		return -1;
	if (e->device_timeout && img_dev[0] && write_device_timeout(dir, img_dev, e->device_timeout))
		return -1;
	return 0;
}

static bool env_true(const char *name, bool def)
{
	const char *v = getenv(name);

	if (!v || !*v)
		return def;
	return !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "on");
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : NULL;
	const char *tab_env = getenv("QCOWSETUP_QCOWTAB");
	const char *tab_path = tab_env && *tab_env ? tab_env : QCOWTAB_PATH;
	const char *bin_env = getenv("QCOWSETUP_BIN");
	const char *bin = bin_env && *bin_env ? bin_env : SBINDIR "/qcowsetup";
	bool initrd = env_true("SYSTEMD_IN_INITRD", access("/etc/initrd-release", F_OK) == 0);
	char *text, *cmdline = NULL, *extra = NULL, *all;
	const char *cl_env = getenv("SYSTEMD_PROC_CMDLINE");
	struct qcowtab tab;
	size_t len;

	if (argc != 2 && argc != 4) {
		logmsg("usage: %s NORMAL_DIR [EARLY_DIR LATE_DIR]", me);
		return 1;
	}
	if (initrd) {
		cmdline = cl_env ? strdup(cl_env) : read_all("/proc/cmdline", 65536);
		if (cmdline && qcowtab_cmdline_disabled(cmdline)) {
			free(cmdline);
			return 0;
		}
		if (cmdline && qcowtab_cmdline_lines(cmdline, &extra)) {
			logmsg("out of memory");
			return 1;
		}
		free(cmdline);
	}
	text = read_all(tab_path, 1 << 20);
	if (!text && errno != ENOENT)
		logmsg("cannot read %s: %s", tab_path, strerror(errno));
	len = (text ? strlen(text) : 0) + (extra ? strlen(extra) : 0) + 2;
	all = malloc(len);
	if (!all)
		return 1;
	snprintf(all, len, "%s%s%s", text ? text : "", text && *text && text[strlen(text) - 1] != '\n' ? "\n" : "",
		 extra ? extra : "");
	free(text);
	free(extra);
	if (qcowtab_parse(all, strlen(all), report, (void *)tab_path, &tab, NULL)) {
		logmsg("out of memory");
		return 1;
	}
	free(all);
	for (size_t i = 0; i < tab.count; i++)
		if (write_unit(dir, &tab.entries[i], tab_env && *tab_env ? tab_env : NULL, bin))
			failures++;
	qcowtab_free(&tab);
	return failures ? 1 : 0;
}
