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
 * "wants" with nofail) and by /dev/mapper/NAME's device unit. An entry
 * with _netdev (an image bound to a tang server) is ordered after
 * network-online.target, which it wants, and before and pulled in by
 * remote-cryptsetup.target instead, as systemd-cryptsetup-generator does:
 * the generator reads qcowtab, not the images, so the option says it. The passphrase
 * is asked by qcowsetup through systemd-ask-password. In the initramfs,
 * `qcowsetup open` runs in a scope of its own (systemd-run --scope), so that
 * the slow-path daemon outlives the switch to the root filesystem's systemd
 * (put_exec()). An entry's systemd
 * credential (load-credential=, load-credential-encrypted=) becomes the
 * unit's LoadCredential=/LoadCredentialEncrypted=, which qcowsetup reads in
 * $CREDENTIALS_DIRECTORY; with keyfile-timeout= the key file's device and
 * mount are not waited for by the unit (qcowsetup waits, then asks).
 *
 * Everything qcowtab (or the kernel command line) gives goes into the units
 * escaped for its place, as systemd-cryptsetup-generator does: unit names
 * systemd-escape'd (device units as systemd-escape --path of their /dev
 * path), '%' doubled everywhere systemd expands specifiers, paths quoted in
 * RequiresMountsFor=, and ExecStart= arguments quoted with C escapes ('$'
 * doubled). What a unit cannot hold (a newline or invalid UTF-8 in a path
 * that RequiresMountsFor= needs, a unit name over 255 characters) makes the
 * entry an error, reported with its qcowtab line: no unit is written.
 *
 *   qcowsetup-generator NORMAL_DIR [EARLY_DIR LATE_DIR]
 * Environment (tests): QCOWSETUP_QCOWTAB (the table), SYSTEMD_IN_INITRD
 * (0/1), SYSTEMD_PROC_CMDLINE (the kernel command line), QCOWSETUP_BIN (the
 * qcowsetup program written into the units). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
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
static const char *tab_source = QCOWTAB_PATH;	/* the table, in messages */
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

/* An entry that cannot become a unit: one line naming its qcowtab line, as
 * the parser's errors. */
static void entry_error(const struct qcowtab_entry *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void entry_error(const struct qcowtab_entry *e, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	logmsg("%s:%u: %s: %s (line ignored)", tab_source, e->line, e->name, msg);
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

/* ---- systemd names and unit file syntax ---- */

/* Append n bytes to out (size bytes, room for a NUL kept) at *pos. */
static bool put_bytes_checked(char *out, size_t size, size_t *pos, const char *b, size_t n)
{
	if (*pos + n >= size)
		return false;
	memcpy(out + *pos, b, n);
	*pos += n;
	return true;
}

/* The length of the valid UTF-8 sequence at s (1 to 4 bytes, a character
 * of at least 0x80), or 0: not one (overlong, surrogate, over U+10FFFF,
 * truncated), as systemd's and udev's utf8_encoded_valid_unichar(). */
static size_t utf8_sequence(const unsigned char *s)
{
	size_t len, i;
	uint32_t cp;

	if (s[0] < 0xc2 || s[0] > 0xf4)
		return 0;
	len = s[0] < 0xe0 ? 2 : s[0] < 0xf0 ? 3 : 4;
	cp = s[0] & (0xff >> (len + 1));
	for (i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return len;
}

/* Whether s can stand, quoted, in a unit file setting without C escapes
 * (RequiresMountsFor=, SourcePath=): valid UTF-8 (systemd ignores the
 * setting otherwise) and no control character but a tab (a newline or \r
 * ends the line; systemd takes others as blanks). */
static bool unit_plain_value_ok(const char *s)
{
	for (const unsigned char *c = (const unsigned char *)s; *c;) {
		size_t n;

		if (*c < 0x80) {
			if ((*c < 0x20 && *c != '\t') || *c == 0x7f)
				return false;
			c++;
			continue;
		}
		n = utf8_sequence(c);
		if (!n)
			return false;
		c += n;
	}
	return true;
}

/* Write s for a setting that expands specifiers and takes quoted words
 * without C escapes (RequiresMountsFor=): '%' doubled, and, when it holds a
 * blank, a quote or a backslash, in double quotes with '\\' and '"'
 * backslashed. The caller checked unit_plain_value_ok(). */
static void put_quoted_path(FILE *f, const char *s)
{
	bool quote = strpbrk(s, " \t\"'\\") != NULL;

	if (quote)
		fputc('"', f);
	for (const char *c = s; *c; c++) {
		if (*c == '\\' || *c == '"')
			fputc('\\', f);
		else if (*c == '%')
			fputc('%', f);
		fputc(*c, f);
	}
	if (quote)
		fputc('"', f);
}

/* Write s as one word of ExecStart=/ExecStop= (systemd.service(5), "Command
 * lines"): as is when it holds only [A-Za-z0-9/._+:@=,-], else in double
 * quotes with C escapes ('\\', '"', control and non-ASCII bytes as \xNN).
 * '%' is doubled in both (specifiers), and '$' in an argument
 * (environment variables: "$$" is a '$'); not in the program's path, which
 * systemd does not expand. */
static void put_exec_word(FILE *f, const char *s, bool program)
{
	bool plain = *s != '\0';

	for (const char *c = s; *c && plain; c++)
		plain = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
			strchr("/._+:@=,-%", *c) || (*c == '$' && !program);
	if (!plain)
		fputc('"', f);
	for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
		if (*c == '%')
			fputs("%%", f);
		else if (*c == '$' && !program)
			fputs("$$", f);
		else if (*c == '\\' || *c == '"')
			fprintf(f, "\\%c", *c);
		else if (*c < 0x20 || *c >= 0x7f)
			fprintf(f, "\\x%02x", *c);
		else
			fputc(*c, f);
	}
	if (!plain)
		fputc('"', f);
}

/* s with '%' doubled, for settings that expand specifiers and take the
 * rest of the line as it is (Description=, SourcePath=). */
static void put_specifier_escaped(FILE *f, const char *s)
{
	for (const char *c = s; *c; c++) {
		if (*c == '%')
			fputc('%', f);
		fputc(*c, f);
	}
}

/* udev's (and libblkid's) encoding of link names (/dev/disk/by-label/...,
 * ID_FS_LABEL_ENC): bytes outside [0-9A-Za-z#+-.:=@_] become \xNN, valid
 * UTF-8 sequences stay. false when out (size bytes) is too small. */
static bool udev_encode(const char *s, char *out, size_t size)
{
	size_t pos = 0;

	for (const unsigned char *c = (const unsigned char *)s; *c;) {
		size_t n = *c >= 0x80 ? utf8_sequence(c) : 0;
		char hex[5];

		if (n) {
			if (!put_bytes_checked(out, size, &pos, (const char *)c, n))
				return false;
			c += n;
			continue;
		}
		if ((*c >= '0' && *c <= '9') || (*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') ||
		    strchr("#+-.:=@_", *c)) {
			if (!put_bytes_checked(out, size, &pos, (const char *)c, 1))
				return false;
		} else {
			snprintf(hex, sizeof(hex), "\\x%02x", *c);
			if (!put_bytes_checked(out, size, &pos, hex, 4))
				return false;
		}
		c++;
	}
	out[pos] = '\0';
	return true;
}

/* loc as qcowtab writes it (octal escapes), bytes that are not UTF-8 too,
 * for a message that stays on one line and shows what is wrong. */
static void show_location(const struct qcowtab_location *l, char *out, size_t size)
{
	char raw[4096];
	size_t pos = 0;

	if (qcowtab_format_location(l, raw, sizeof(raw)) < 0) {
		snprintf(out, size, "(too long to show)");
		return;
	}
	for (const unsigned char *c = (const unsigned char *)raw; *c;) {
		size_t n = *c >= 0x80 ? utf8_sequence(c) : 1;
		char oct[5];

		if (!n) {
			snprintf(oct, sizeof(oct), "\\%03o", *c);
			if (!put_bytes_checked(out, size, &pos, oct, 4))
				break;
			c++;
			continue;
		}
		if (!put_bytes_checked(out, size, &pos, (const char *)c, n))
			break;
		c += n;
	}
	out[pos] = '\0';
}

/* The /dev path of a tagged device, as udev links it. false: too long. */
static bool tag_device_path(const struct qcowtab_location *l, char *out, size_t size)
{
	char enc[4096], low[1024];
	size_t i;
	int n;

	if (!strcmp(l->tag, "UUID") || !strcmp(l->tag, "PARTUUID")) {
		/* lower case, as blkid reports them */
		if (strlen(l->value) >= sizeof(low))
			return false;
		for (i = 0; l->value[i]; i++)
			low[i] = (char)(l->value[i] >= 'A' && l->value[i] <= 'F' ? l->value[i] - 'A' + 'a' : l->value[i]);
		low[i] = '\0';
		if (!udev_encode(low, enc, sizeof(enc)))
			return false;
	} else if (!udev_encode(l->value, enc, sizeof(enc))) {
		return false;
	}
	n = snprintf(out, size, "/dev/disk/by-%s/%s", !strcmp(l->tag, "UUID") ? "uuid" : !strcmp(l->tag, "LABEL") ? "label" :
		     !strcmp(l->tag, "PARTUUID") ? "partuuid" : "partlabel", enc);
	return n > 0 && (size_t)n < size;
}

/* The device unit of a location's device ("" when it is a file on a mounted
 * filesystem: then *mount_path is what RequiresMountsFor= needs). Returns
 * false, with the entry reported, when the location cannot be written into
 * a unit. */
static bool location_units(const struct qcowtab_entry *e, const struct qcowtab_location *l, const char *what,
			   char *dev_unit, size_t size, const char **mount_path)
{
	char path[8192], esc[QCOWTAB_UNIT_NAME_MAX + 1], shown[4096];
	int r;

	dev_unit[0] = '\0';
	*mount_path = NULL;
	show_location(l, shown, sizeof(shown));
	switch (l->source) {
	case QCOWTAB_TAG_ONLY:
	case QCOWTAB_TAG_PATH:
		if (!tag_device_path(l, path, sizeof(path))) {
			entry_error(e, "%s %s: the tag value is too long for a device name", what, shown);
			return false;
		}
		break;
	case QCOWTAB_PATH_ONLY:
		if (strncmp(l->path, "/dev/", 5)) {
			if (!unit_plain_value_ok(l->path)) {
				entry_error(e, "%s %s: systemd's RequiresMountsFor= cannot hold a newline, a control "
					    "character or invalid UTF-8", what, shown);
				return false;
			}
			*mount_path = l->path;
			return true;
		}
		snprintf(path, sizeof(path), "%s", l->path);
		break;
	default:
		return true;
	}
	r = qcowtab_systemd_escape(path, true, esc, sizeof(esc) - strlen(".device"));
	if (r < 0) {
		entry_error(e, "%s %s: %s", what, shown, r == -EINVAL ? "systemd takes no \"..\" in a device path"
			    : "the device's systemd unit name would be longer than 255 characters");
		return false;
	}
	r = snprintf(dev_unit, size, "%s.device", esc);
	return r > 0 && (size_t)r < size;	/* esc left room for it */
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

/* KEY=BIN VERB --tab [--qcowtab TAB] NAME; with scope (the initramfs'
 * ExecStart=), run by `systemd-run --scope` in that scope unit of its own,
 * where the slow-path daemon it starts stays: a scope is kept when systemd
 * isolates a target, and, transient, its unit lives in /run/systemd/transient,
 * which switch-root carries over, whereas the service's own unit, generated,
 * is gone in the root filesystem's systemd unless the root's qcowtab makes it
 * again, and a unit without its file is stopped there. Without default
 * dependencies, shutdown does not stop the scope either: the daemon ('@')
 * lives until dracut's shutdown hook closes the mapping (qcowsetup-dracut(7)). */
static void put_exec(FILE *f, const char *key, const char *bin, const char *verb, const char *tab_arg,
		     const char *name, const char *scope)
{
	char desc[1200];

	fprintf(f, "%s=", key);
	if (scope) {
		snprintf(desc, sizeof(desc), "--description=qcowsetup: the slow-path daemon of %s", name);
		fputs("systemd-run --scope --quiet --property=DefaultDependencies=no ", f);
		put_exec_word(f, scope, false);
		fputc(' ', f);
		put_exec_word(f, desc, false);
		fputc(' ', f);
	}
	put_exec_word(f, bin, !scope);
	fprintf(f, " %s --tab", verb);
	if (tab_arg) {
		fputs(" --qcowtab ", f);
		put_exec_word(f, tab_arg, false);
	}
	fputc(' ', f);
	put_exec_word(f, name, false);
	fputc('\n', f);
}

/* Whether the entry's credential can be written into LoadCredential*=:
 * the parser checked the ID; a path must be plain (no blank, quote or
 * backslash: the setting takes the rest of the line). */
static bool credential_ok(const struct qcowtab_entry *e)
{
	const char *p = e->credential_path;

	if (!e->credential || e->credential_load == QCOWTAB_CRED_GIVEN || !p)
		return true;
	if (unit_plain_value_ok(p) && !strpbrk(p, " \t\"'\\"))
		return true;
	entry_error(e, "credential %s: its path cannot be written into LoadCredential= (a blank, a quote, a "
		    "backslash, a control character or invalid UTF-8)", e->credential);
	return false;
}

/* LoadCredential=ID[:PATH] or LoadCredentialEncrypted=ID[:PATH]: systemd
 * puts the credential into $CREDENTIALS_DIRECTORY/ID for qcowsetup
 * (without PATH it searches its credential stores, /etc/credstore and
 * /etc/credstore.encrypted among them, and the credentials the system was
 * booted with). */
static void put_credential(FILE *f, const struct qcowtab_entry *e)
{
	if (!e->credential || e->credential_load == QCOWTAB_CRED_GIVEN)
		return;
	fprintf(f, "%s=%s", e->credential_load == QCOWTAB_CRED_LOAD ? "LoadCredential" : "LoadCredentialEncrypted",
		e->credential);
	if (e->credential_path) {
		fputc(':', f);
		put_specifier_escaped(f, e->credential_path);
	}
	fputc('\n', f);
}

static int write_unit(const char *dir, const struct qcowtab_entry *e, const char *tab_arg, const char *bin,
		      bool initrd)
{
	char unit[QCOWTAB_UNIT_NAME_MAX + 1], scope[QCOWTAB_UNIT_NAME_MAX + 16], path[8192],
	     img_dev[QCOWTAB_UNIT_NAME_MAX + 1],
	     key_dev[QCOWTAB_UNIT_NAME_MAX + 1], mapper[1200], mapper_esc[QCOWTAB_UNIT_NAME_MAX + 1];
	const char *img_mount, *key_mount, *source = tab_arg ? tab_arg : QCOWTAB_PATH;
	bool needs_mount;
	FILE *f;

	/* everything checked before a file is written: a refused entry leaves
	 * no unit behind */
	snprintf(mapper, sizeof(mapper), "/dev/mapper/%s", e->name);
	if (qcowtab_unit_name(e->name, unit, sizeof(unit)) ||
	    qcowtab_systemd_escape(mapper, true, mapper_esc, sizeof(mapper_esc) - strlen(".device.requires")) < 0) {
		entry_error(e, "the name is too long once escaped for a systemd unit name (at most %d characters)",
			    QCOWTAB_UNIT_NAME_MAX);
		return -1;
	}
	/* --unit=qcowsetup-ESC.scope, ESC as in qcowsetup@ESC.service: shorter */
	snprintf(scope, sizeof(scope), "--unit=qcowsetup-%.*s.scope",
		 (int)(strlen(unit) - strlen("qcowsetup@") - strlen(".service")), unit + strlen("qcowsetup@"));
	if (!location_units(e, &e->image, "image", img_dev, sizeof(img_dev), &img_mount) ||
	    !location_units(e, &e->key, "key file", key_dev, sizeof(key_dev), &key_mount) ||
	    !credential_ok(e))
		return -1;
	if (e->keyfile_optional)
		key_mount = NULL;	/* qcowsetup waits keyfile-timeout for it */
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
		"Description=qcowsetup: map the qcow2 image ", me);
	put_specifier_escaped(f, e->name);
	fprintf(f, "\nDocumentation=man:qcowtab(5) man:qcowsetup(8)\n");
	/* SourcePath= takes the rest of the line as a path: left out when
	 * it could not be read back as it is */
	if (unit_plain_value_ok(source) && source[0] == '/' && !strchr(" \t", source[strlen(source) - 1])) {
		fputs("SourcePath=", f);
		put_specifier_escaped(f, source);
		fputc('\n', f);
	}
	fprintf(f, "DefaultDependencies=no\n"
		"IgnoreOnIsolate=true\n"
		"After=cryptsetup-pre.target systemd-udevd-kernel.socket\n"
		"Before=blockdev@%s.target\n"
		"Wants=blockdev@%s.target\n",
		mapper_esc, mapper_esc);
	if (!e->initrd_attach)
		/* an image attached in the initramfs may hold the root: it stays */
		fprintf(f, "Conflicts=umount.target\nBefore=umount.target\n");
	if (e->netdev)
		/* a tang server, as systemd-cryptsetup-generator orders _netdev:
		 * remote-cryptsetup.target, never cryptsetup.target or
		 * local-fs-pre.target, which the network services come after */
		fprintf(f, "After=remote-fs-pre.target network-online.target\n"
			"Wants=network-online.target\n");
	if (!e->nofail)
		fprintf(f, "Before=%s\n", e->netdev ? "remote-cryptsetup.target" : "cryptsetup.target");
	if (!e->nofail && !needs_mount && !e->netdev)
		fprintf(f, "Before=local-fs-pre.target\n");
	/* escaped unit names: [A-Za-z0-9:_.\\-] only, no quoting needed */
	if (img_dev[0])
		fprintf(f, "BindsTo=%s\nAfter=%s\n", img_dev, img_dev);
	if (key_dev[0] && e->keyfile_optional)
		fprintf(f, "Wants=%s\n", key_dev);
	else if (key_dev[0])
		fprintf(f, "Wants=%s\nAfter=%s\n", key_dev, key_dev);
	if (img_mount) {
		fputs("RequiresMountsFor=", f);
		put_quoted_path(f, img_mount);
		fputc('\n', f);
	}
	if (key_mount) {
		fputs("RequiresMountsFor=", f);
		put_quoted_path(f, key_mount);
		fputc('\n', f);
	}
	fprintf(f, "\n[Service]\n"
		"Type=oneshot\n"
		"RemainAfterExit=yes\n"
		"TimeoutSec=infinity\n"
		"KeyringMode=shared\n"
		"OOMScoreAdjust=500\n");
	put_credential(f, e);
	put_exec(f, "ExecStart", bin, "open", tab_arg, e->name, initrd ? scope : NULL);
	put_exec(f, "ExecStop", bin, "close", tab_arg, e->name, NULL);
	if (fclose(f)) {
		logmsg("cannot write %s: %s", path, strerror(errno));
		return -1;
	}

	if (!fmt(path, sizeof(path), "%scryptsetup.target.%s", e->netdev ? "remote-" : "",
		 e->nofail ? "wants" : "requires"))
		return -1;
	if (!e->noauto && link_unit(dir, path, unit))
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
	if (bin[0] != '/' || strpbrk(bin, "\"'\\") || !unit_plain_value_ok(bin) || strchr(bin, '\t')) {
		/* systemd refuses such a program ("Executable name contains
		 * special characters") */
		logmsg("cannot run %s from a unit: a program's path is absolute, without quotes, "
		       "backslashes or control characters", bin);
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
	tab_source = tab_path;
	if (qcowtab_parse(all, strlen(all), report, (void *)tab_path, &tab, NULL)) {
		logmsg("out of memory");
		return 1;
	}
	free(all);
	for (size_t i = 0; i < tab.count; i++)
		if (write_unit(dir, &tab.entries[i], tab_env && *tab_env ? tab_env : NULL, bin, initrd))
			failures++;
	qcowtab_free(&tab);
	return failures ? 1 : 0;
}
