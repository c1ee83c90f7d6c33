/* The /etc/qcowtab parser (see qcowtab.h). Pure: a buffer in, entries out. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcowtab.h"
#include "util.h"

static const char *const known_tags[] = { "UUID", "LABEL", "PARTUUID", "PARTLABEL" };

bool qcowtab_valid_name(const char *name)
{
	size_t len = strlen(name);

	if (!len || len > QCOWTAB_NAME_MAX || !strcmp(name, ".") || !strcmp(name, ".."))
		return false;
	for (const char *p = name; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
		      *p == '-' || *p == '_' || *p == '.' || *p == '+'))
			return false;
	return true;
}

static bool is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

static bool is_odigit(char c)
{
	return c >= '0' && c <= '7';
}

char *qcowtab_unescape(const char *src, size_t len)
{
	char *out = malloc(len + 1), *o = out;

	if (!out)
		return NULL;
	for (size_t i = 0; i < len; i++) {
		if (src[i] == '\\' && len - i > 3 && is_odigit(src[i + 1]) && is_odigit(src[i + 2]) && is_odigit(src[i + 3])) {
			unsigned int v = (unsigned int)(src[i + 1] - '0') * 64 +
					 (unsigned int)(src[i + 2] - '0') * 8 + (unsigned int)(src[i + 3] - '0');

			if (v && v < 256) {
				*o++ = (char)v;
				i += 3;
				continue;
			}
		}
		*o++ = src[i];
	}
	*o = '\0';
	return out;
}

/* "TAG=" at the start of s: the tag's length (without '='), or 0. */
static size_t tag_prefix(const char *s, size_t len, char *tag, size_t tagsize)
{
	for (size_t i = 0; i < ARRAY_SIZE(known_tags); i++) {
		size_t n = strlen(known_tags[i]);

		if (len > n && !strncmp(s, known_tags[i], n) && s[n] == '=') {
			if (tag)
				snprintf(tag, tagsize, "%s", known_tags[i]);
			return n;
		}
	}
	return 0;
}

void qcowtab_location_free(struct qcowtab_location *loc)
{
	free(loc->value);
	free(loc->path);
	memset(loc, 0, sizeof(*loc));
}

static bool path_ok(const char *p)
{
	return p[0] == '/';
}

int qcowtab_parse_location(const char *field, bool is_key, struct qcowtab_location *loc,
			   const char **why)
{
	size_t len = strlen(field), n;
	const char *sep;

	memset(loc, 0, sizeof(*loc));
	*why = NULL;
	if (is_key && (!strcmp(field, "none") || !strcmp(field, "-"))) {
		loc->source = QCOWTAB_NONE;
		return 0;
	}
	n = tag_prefix(field, len, loc->tag, sizeof(loc->tag));
	if (n) {
		/* TAG=VALUE[:/path] -- the first ":/" ends the value */
		const char *v = field + n + 1;

		sep = strstr(v, ":/");
		loc->value = qcowtab_unescape(v, sep ? (size_t)(sep - v) : strlen(v));
		if (!loc->value)
			goto nomem;
		if (!*loc->value) {
			*why = "empty tag value";
			goto inval;
		}
		if (sep) {
			loc->source = QCOWTAB_TAG_PATH;
			loc->path = qcowtab_unescape(sep + 1, strlen(sep + 1));
			if (!loc->path)
				goto nomem;
		} else {
			if (is_key) {
				*why = "a key file on a tagged device needs a path (/path:TAG=VALUE)";
				goto inval;
			}
			if (!strcmp(loc->tag, "UUID") || !strcmp(loc->tag, "LABEL")) {
				*why = "UUID= and LABEL= name a filesystem: add the image's path in it (UUID=...:/path)";
				goto inval;
			}
			loc->source = QCOWTAB_TAG_ONLY;
		}
		return 0;
	}
	if (field[0] != '/') {
		*why = is_key ? "a key file is none, -, an absolute path, or /path:TAG=VALUE"
			      : "an image is an absolute path, TAG=VALUE:/path or PARTUUID=/PARTLABEL=";
		goto inval;
	}
	/* /path[:TAG=VALUE] -- the last ':' followed by a known tag */
	sep = NULL;
	for (const char *c = field; (c = strchr(c, ':')); c++)
		if (tag_prefix(c + 1, strlen(c + 1), NULL, 0))
			sep = c;
	if (sep) {
		const char *v = sep + 1 + tag_prefix(sep + 1, strlen(sep + 1), loc->tag, sizeof(loc->tag)) + 1;

		loc->source = QCOWTAB_TAG_PATH;
		loc->path = qcowtab_unescape(field, (size_t)(sep - field));
		loc->value = qcowtab_unescape(v, strlen(v));
		if (!loc->path || !loc->value)
			goto nomem;
		if (!*loc->value) {
			*why = "empty tag value";
			goto inval;
		}
	} else {
		loc->source = QCOWTAB_PATH_ONLY;
		loc->path = qcowtab_unescape(field, len);
		if (!loc->path)
			goto nomem;
	}
	return 0;
inval:
	if (!*why)
		*why = "malformed location";
	qcowtab_location_free(loc);
	return -EINVAL;
nomem:
	qcowtab_location_free(loc);
	return -ENOMEM;
}

static void check_path(struct qcowtab_location *loc, const char **why)
{
	if (loc->path && (!path_ok(loc->path) || strstr(loc->path, "/../") ||
			  (strlen(loc->path) >= 3 && !strcmp(loc->path + strlen(loc->path) - 3, "/.."))))
		*why = "the path must be absolute, without ..";
}

/* Append to buf with escapes for blanks, '\\', '#' at the start, and ':' when
 * esc_colon. */
static int put_escaped(char *buf, size_t size, size_t *pos, const char *s, bool esc_colon)
{
	for (const char *c = s; *c; c++) {
		unsigned char u = (unsigned char)*c;
		int n;

		if (u <= ' ' || u == '\\' || u == 0x7f || (esc_colon && u == ':') || (u == '#' && *pos == 0))
			n = snprintf(buf + *pos, *pos < size ? size - *pos : 0, "\\%03o", u);
		else
			n = snprintf(buf + *pos, *pos < size ? size - *pos : 0, "%c", u);
		if (n < 0)
			return -ENOSPC;
		*pos += (size_t)n;
	}
	return 0;
}

int qcowtab_format_location(const struct qcowtab_location *loc, char *buf, size_t size)
{
	size_t pos = 0;
	int n;

	if (size)
		buf[0] = '\0';
	switch (loc->source) {
	case QCOWTAB_NONE:
		n = snprintf(buf, size, "none");
		pos = n > 0 ? (size_t)n : 0;
		break;
	case QCOWTAB_PATH_ONLY:
		put_escaped(buf, size, &pos, loc->path, false);
		break;
	case QCOWTAB_TAG_ONLY:
	case QCOWTAB_TAG_PATH:
		n = snprintf(buf, size, "%s=", loc->tag);
		pos = n > 0 ? (size_t)n : 0;
		put_escaped(buf, size, &pos, loc->value, true);
		if (loc->source == QCOWTAB_TAG_PATH) {
			n = snprintf(buf + pos, pos < size ? size - pos : 0, ":");
			pos += n > 0 ? (size_t)n : 0;
			put_escaped(buf, size, &pos, loc->path, false);
		}
		break;
	}
	if (pos >= size)
		return -ENOSPC;
	return (int)pos;
}

/* ---- options ---- */

static void report(qcowtab_report_fn fn, void *opaque, enum qcowtab_severity sev,
		   unsigned int line, const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* The message, control characters of the fields it quotes (decoded: a
 * \012 in an option is a newline) written back as qcowtab's \NNN: one line
 * on a terminal or in the journal. */
static void report(qcowtab_report_fn fn, void *opaque, enum qcowtab_severity sev,
		   unsigned int line, const char *fmt, ...)
{
	char msg[512], shown[4 * sizeof(msg)];
	size_t pos = 0;
	va_list ap;

	if (!fn)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	for (const unsigned char *c = (const unsigned char *)msg; *c; c++) {
		if (*c < 0x20 || *c == 0x7f)
			pos += (size_t)snprintf(shown + pos, sizeof(shown) - pos, "\\%03o", *c);
		else
			shown[pos++] = (char)*c;
	}
	shown[pos] = '\0';
	fn(opaque, sev, line, shown);
}

/* A number up to max (util.h's parser). 0 or -EINVAL. */
static int parse_max(const char *s, uint64_t max, uint64_t *v)
{
	return parse_u64(s, 0, v) || *v > max ? -EINVAL : 0;
}

/* Seconds, with an optional unit as systemd time spans: s, sec, m, min, h. */
static int parse_seconds(const char *s, unsigned int *out)
{
	static const struct { const char *unit; uint64_t mult; } units[] = {
		{ "", 1 }, { "s", 1 }, { "sec", 1 }, { "m", 60 }, { "min", 60 }, { "h", 3600 },
	};
	char num[32];
	size_t n = strspn(s, "0123456789");
	uint64_t v;

	if (!n || n >= sizeof(num))
		return -EINVAL;
	memcpy(num, s, n);
	num[n] = '\0';
	if (parse_max(num, UINT32_MAX, &v))
		return -EINVAL;
	for (size_t i = 0; i < ARRAY_SIZE(units); i++)
		if (!strcmp(s + n, units[i].unit)) {
			if (umul64_overflow(v, units[i].mult, &v) || v > 86400 * 365)
				return -EINVAL;
			*out = (unsigned int)v;
			return 0;
		}
	return -EINVAL;
}

/* yes/no as systemd's parse_boolean(). 1, 0, or -EINVAL. */
static int parse_bool(const char *s)
{
	static const char *const yes[] = { "1", "yes", "y", "true", "t", "on" };
	static const char *const no[] = { "0", "no", "n", "false", "f", "off" };

	for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
		if (!strcmp(s, yes[i]))
			return 1;
		if (!strcmp(s, no[i]))
			return 0;
	}
	return -EINVAL;
}

bool qcowtab_valid_credential(const char *id)
{
	size_t len = strlen(id);

	if (!len || len > 255 || !strcmp(id, ".") || !strcmp(id, ".."))
		return false;
	for (const unsigned char *c = (const unsigned char *)id; *c; c++)
		if (*c < 0x20 || *c == 0x7f || *c == '/' || *c == ':' || *c == '%' || *c == '\\')
			return false;
	return true;
}

/* credential=ID, load-credential=ID[:PATH], load-credential-encrypted=ID[:PATH]. */
static int set_credential(struct qcowtab_entry *e, const char *val, enum qcowtab_credential_load load)
{
	const char *colon = load == QCOWTAB_CRED_GIVEN ? NULL : strchr(val, ':');

	free(e->credential);
	free(e->credential_path);
	e->credential_path = NULL;
	e->credential = strndup(val, colon ? (size_t)(colon - val) : strlen(val));
	if (!e->credential || (colon && !(e->credential_path = strdup(colon + 1))))
		return -ENOMEM;
	e->credential_load = load;
	if (!qcowtab_valid_credential(e->credential))
		return -EINVAL;
	if (e->credential_path) {
		for (const unsigned char *c = (const unsigned char *)e->credential_path; *c; c++)
			if (*c < 0x20 || *c == 0x7f)
				return -EINVAL;
		if (e->credential_path[0] != '/')
			return -EINVAL;
	}
	return 0;
}

/* The key sources beyond the key file: keyfile-timeout=, headless=,
 * password-echo= (crypttab's) and the systemd credentials. Returns 0 (an
 * option of these, taken), 1 (not one of these), -EINVAL (bad value, not
 * reported yet) or -ENOMEM. */
static int parse_key_source_option(struct qcowtab_entry *e, const char *key, size_t klen, const char *val)
{
	static const struct {
		const char *name;
		enum { KS_TIMEOUT, KS_HEADLESS, KS_ECHO, KS_CREDENTIAL } what;
		enum qcowtab_credential_load load;
	} opts[] = {
		{ "keyfile-timeout", KS_TIMEOUT, 0 },
		{ "headless", KS_HEADLESS, 0 },
		{ "password-echo", KS_ECHO, 0 },
		{ "credential", KS_CREDENTIAL, QCOWTAB_CRED_GIVEN },
		{ "load-credential", KS_CREDENTIAL, QCOWTAB_CRED_LOAD },
		{ "load-credential-encrypted", KS_CREDENTIAL, QCOWTAB_CRED_LOAD_ENCRYPTED },
	};
	int b;

	for (size_t i = 0; i < ARRAY_SIZE(opts); i++) {
		if (klen != strlen(opts[i].name) || strncmp(key, opts[i].name, klen))
			continue;
		if (!val && opts[i].what != KS_HEADLESS)
			return -EINVAL;
		switch (opts[i].what) {
		case KS_TIMEOUT:
			e->keyfile_optional = true;
			return parse_seconds(val, &e->keyfile_timeout);
		case KS_HEADLESS:
			b = val ? parse_bool(val) : 1;
			e->headless = b > 0;
			return b < 0 ? b : 0;
		case KS_ECHO:
			b = strcmp(val, "masked") ? parse_bool(val) : 2;
			e->password_echo = b == 2 ? QCOWTAB_ECHO_MASKED : b ? QCOWTAB_ECHO_YES : QCOWTAB_ECHO_NO;
			return b < 0 ? b : 0;
		case KS_CREDENTIAL:
			return set_credential(e, val, opts[i].load);
		}
	}
	return 1;
}

/* crypttab(5) options that mean nothing here or cannot be honoured: each
 * with what qcowsetup does (a warning and the line is used, or an error and
 * the line is refused) and why. qcowtab(5) has the whole table. */
static const struct {
	const char *name;	/* without '=' */
	bool refuse;
	const char *why;
} crypttab_options[] = {
	{ "cipher", false, "the LUKS header in the image names the cipher" },
	{ "hash", false, "the LUKS header in the image names the hash" },
	{ "size", false, "the LUKS header in the image gives the key size" },
	{ "key-slot", false, "every key slot is tried" },
	{ "verify", false, "a passphrase is asked once" },
	{ "try-empty-password", false, "an empty passphrase is not tried" },
	{ "same-cpu-crypt", false, "dm-crypt runs with its default flags" },
	{ "submit-from-crypt-cpus", false, "dm-crypt runs with its default flags" },
	{ "no-read-workqueue", false, "dm-crypt runs with its default flags" },
	{ "no-write-workqueue", false, "dm-crypt runs with its default flags" },
	{ "bypass-workqueues", false, "dm-crypt runs with its default flags" },
	{ "tpm2-measure-pcr", false, "the volume key is not measured" },
	{ "tpm2-measure-bank", false, "the volume key is not measured" },
	{ "plain", true, "a qcow2 image is mapped as its header says, never as plain dm-crypt" },
	{ "bitlk", true, "a qcow2 image is not a BitLocker volume" },
	{ "tcrypt", true, "a qcow2 image is not a TrueCrypt volume" },
	{ "tcrypt-hidden", true, "a qcow2 image is not a TrueCrypt volume" },
	{ "tcrypt-system", true, "a qcow2 image is not a TrueCrypt volume" },
	{ "tcrypt-veracrypt", true, "a qcow2 image is not a VeraCrypt volume" },
	{ "tcrypt-keyfile", true, "a qcow2 image is not a TrueCrypt volume" },
	{ "veracrypt-pim", true, "a qcow2 image is not a VeraCrypt volume" },
	{ "swap", true, "qcowsetup never formats a mapping" },
	{ "tmp", true, "qcowsetup never formats a mapping" },
	{ "header", true, "the LUKS header lives inside the qcow2 image" },
	{ "offset", true, "the image's layout gives where the data is" },
	{ "skip", true, "the image's layout gives where the data is" },
	{ "sector-size", true, "QEMU encrypts 512-byte sectors" },
	{ "keyfile-erase", true, "qcowsetup does not erase key files" },
	{ "pkcs11-uri", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "fido2-device", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "fido2-cid", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "fido2-rp", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-device", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-pcrs", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-pin", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-signature", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-pcrlock", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-public-key", true, "a qcow2 image's LUKS1 header has no tokens" },
	{ "tpm2-public-key-pcrs", true, "a qcow2 image's LUKS1 header has no tokens" },
};

/* A crypttab option of the table: reported (warning or error). Returns 0
 * (ignored), -EINVAL (refused) or 1 (not one). */
static int crypttab_option(struct qcowtab_entry *e, const char *o, size_t klen, qcowtab_report_fn fn, void *opaque)
{
	for (size_t i = 0; i < ARRAY_SIZE(crypttab_options); i++) {
		if (klen != strlen(crypttab_options[i].name) || strncmp(o, crypttab_options[i].name, klen))
			continue;
		report(fn, opaque, crypttab_options[i].refuse ? QCOWTAB_ERROR : QCOWTAB_WARNING, e->line,
		       "crypttab option %.*s %s: %s", (int)klen, o, crypttab_options[i].refuse ? "refused" : "ignored",
		       crypttab_options[i].why);
		return crypttab_options[i].refuse ? -EINVAL : 0;
	}
	return 1;
}

/* Returns 0, or -EINVAL with the problem reported (as an error). */
static int parse_option(struct qcowtab_entry *e, const char *o, qcowtab_report_fn fn, void *opaque)
{
	const char *eq = strchr(o, '=');
	size_t klen = eq ? (size_t)(eq - o) : strlen(o);
	const char *val = eq ? eq + 1 : NULL;
	uint64_t v;
	int r;

	r = parse_key_source_option(e, o, klen, val);
	if (r == -EINVAL)
		goto bad;
	if (r <= 0)
		return r;
	r = crypttab_option(e, o, klen, fn, opaque);
	if (r <= 0)
		return r;
#define IS(k) (klen == strlen(k) && !strncmp(o, k, klen))
	if (!val) {
		if (IS("readonly") || IS("read-only") || IS("ro"))
			e->readonly = true;
		else if (IS("discard"))
			e->discard = true;
		else if (IS("nofail"))
			e->nofail = true;
		else if (IS("noauto"))
			e->noauto = true;
		else if (IS("x-initrd.attach"))
			e->initrd_attach = true;
		else if (IS("same-passphrase"))
			e->same_passphrase = true;
		else if (IS("allow-unencrypted"))
			e->allow_unencrypted = true;
		else if (IS("trust-names"))
			e->trust_names = true;
		else if (IS("clevis"))
			e->clevis = true;
		else if (IS("_netdev"))
			e->netdev = true;
		else if (IS("tries") || IS("timeout") || IS("keyfile-offset") || IS("keyfile-size") ||
			 IS("snapshot") || IS("format") ||
			 IS("token-timeout")) {
			report(fn, opaque, QCOWTAB_ERROR, e->line, "option %s needs a value (%s=...)", o, o);
			return -EINVAL;
		} else if (!strncmp(o, "x-", 2) || IS("auto") || IS("rw") || IS("luks"))
			;	/* other programs' options, and defaults */
		else
			report(fn, opaque, QCOWTAB_WARNING, e->line, "unknown option %s ignored", o);
		return 0;
	}
	if (IS("tries")) {
		if (parse_max(val, 1000, &v))
			goto bad;
		e->tries = (unsigned int)v;
	} else if (IS("timeout")) {
		if (parse_seconds(val, &e->timeout))
			goto bad;
	} else if (IS("token-timeout")) {
		if (parse_seconds(val, &e->token_timeout))
			goto bad;
	} else if (IS("x-systemd.device-timeout")) {
		if (parse_seconds(val, &e->device_timeout))
			goto bad;
	} else if (IS("keyfile-offset")) {
		if (parse_max(val, INT64_MAX, &e->keyfile_offset))
			goto bad;
	} else if (IS("keyfile-size")) {
		if (parse_max(val, 8U << 20, &e->keyfile_size) || !e->keyfile_size)
			goto bad;
	} else if (IS("format")) {
		static const char *const formats[] = { "qcow2", "qcow", "raw" };

		e->format = NULL;
		for (size_t i = 0; i < ARRAY_SIZE(formats); i++)
			if (!strcmp(val, formats[i]))
				e->format = formats[i];
		if (!e->format)
			goto bad;
	} else if (IS("snapshot")) {
		if (!*val)
			goto bad;
		free(e->snapshot);
		e->snapshot = strdup(val);
		if (!e->snapshot)
			return -ENOMEM;
	} else if (!strncmp(o, "x-", 2)) {
		;
	} else {
		report(fn, opaque, QCOWTAB_WARNING, e->line, "unknown option %.*s ignored", (int)klen, o);
	}
	return 0;
bad:
	report(fn, opaque, QCOWTAB_ERROR, e->line, "bad value in option %s", o);
	return -EINVAL;
#undef IS
}

static int parse_options(struct qcowtab_entry *e, char *opts, qcowtab_report_fn fn, void *opaque)
{
	char *save = NULL, *o;
	int r;

	for (o = strtok_r(opts, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		r = parse_option(e, o, fn, opaque);
		if (r)
			return r;
	}
	return 0;
}

static void entry_free(struct qcowtab_entry *e)
{
	free(e->name);
	qcowtab_location_free(&e->image);
	qcowtab_location_free(&e->key);
	free(e->snapshot);
	free(e->credential);
	free(e->credential_path);
	free(e->options);
	memset(e, 0, sizeof(*e));
}

void qcowtab_free(struct qcowtab *t)
{
	for (size_t i = 0; i < t->count; i++)
		entry_free(&t->entries[i]);
	free(t->entries);
	t->entries = NULL;
	t->count = 0;
}

const struct qcowtab_entry *qcowtab_find(const struct qcowtab *t, const char *name)
{
	for (size_t i = 0; i < t->count; i++)
		if (!strcmp(t->entries[i].name, name))
			return &t->entries[i];
	return NULL;
}

#define MAX_FIELDS 4

/* Split one line into at most MAX_FIELDS raw fields; returns the count, or
 * MAX_FIELDS + 1 when there are more. */
static int split_fields(const char *p, const char *end, const char **f, size_t *flen)
{
	int n = 0;

	while (p < end) {
		while (p < end && is_blank(*p))
			p++;
		if (p == end)
			break;
		if (n == MAX_FIELDS)
			return MAX_FIELDS + 1;
		f[n] = p;
		while (p < end && !is_blank(*p))
			p++;
		flen[n] = (size_t)(p - f[n]);
		n++;
	}
	return n;
}

static int parse_line(const char *p, const char *end, unsigned int line, qcowtab_report_fn fn,
		      void *opaque, struct qcowtab *t, struct qcowtab_entry *e)
{
	const char *f[MAX_FIELDS];
	size_t flen[MAX_FIELDS];
	char *raw = NULL, *opts = NULL;
	const char *why;
	int n, r;

	n = split_fields(p, end, f, flen);
	if (n < 2 || n > MAX_FIELDS) {
		report(fn, opaque, QCOWTAB_ERROR, line, "expected 2 to 4 fields (name image [key-file [options]]), found %s",
		       n > MAX_FIELDS ? "more" : n == 1 ? "1" : "0");
		return -EINVAL;
	}
	e->line = line;
	e->tries = QCOWTAB_TRIES_DEFAULT;
	e->name = qcowtab_unescape(f[0], flen[0]);
	if (!e->name)
		return -ENOMEM;
	if (!qcowtab_valid_name(e->name)) {
		report(fn, opaque, QCOWTAB_ERROR, line,
		       "invalid name \"%.*s\": use letters, digits and - _ . + (at most %d)", (int)MIN(flen[0], 200),
		       f[0], QCOWTAB_NAME_MAX);
		return -EINVAL;
	}
	if (qcowtab_find(t, e->name)) {
		report(fn, opaque, QCOWTAB_ERROR, line, "%s is already defined above", e->name);
		return -EINVAL;
	}

	raw = strndup(f[1], flen[1]);
	if (!raw)
		return -ENOMEM;
	r = qcowtab_parse_location(raw, false, &e->image, &why);
	free(raw);
	if (r == -EINVAL) {
		report(fn, opaque, QCOWTAB_ERROR, line, "%s: image: %s", e->name, why);
		return r;
	}
	if (r)
		return r;
	why = NULL;
	check_path(&e->image, &why);
	if (why) {
		report(fn, opaque, QCOWTAB_ERROR, line, "%s: image: %s", e->name, why);
		return -EINVAL;
	}

	if (n >= 3) {
		raw = strndup(f[2], flen[2]);
		if (!raw)
			return -ENOMEM;
		r = qcowtab_parse_location(raw, true, &e->key, &why);
		free(raw);
		if (r == -EINVAL) {
			report(fn, opaque, QCOWTAB_ERROR, line, "%s: key file: %s", e->name, why);
			return r;
		}
		if (r)
			return r;
		why = NULL;
		check_path(&e->key, &why);
		if (why) {
			report(fn, opaque, QCOWTAB_ERROR, line, "%s: key file: %s", e->name, why);
			return -EINVAL;
		}
	}

	e->options = n >= 4 ? qcowtab_unescape(f[3], flen[3]) : strdup("");
	if (!e->options)
		return -ENOMEM;
	if (n >= 4) {
		opts = strdup(e->options);
		if (!opts)
			return -ENOMEM;
		r = parse_options(e, opts, fn, opaque);
		free(opts);
		if (r)
			return r;
	}
	if (e->snapshot && !e->readonly) {
		report(fn, opaque, QCOWTAB_WARNING, line, "%s: a snapshot is always mapped read-only", e->name);
		e->readonly = true;
	}
	if (e->key.source == QCOWTAB_NONE && !e->credential && (e->keyfile_offset || e->keyfile_size))
		report(fn, opaque, QCOWTAB_WARNING, line, "%s: keyfile-offset and keyfile-size apply to key files only",
		       e->name);
	if (e->key.source == QCOWTAB_NONE && e->keyfile_optional)
		report(fn, opaque, QCOWTAB_WARNING, line, "%s: keyfile-timeout applies to key files only", e->name);
	return 0;
}

int qcowtab_parse(const char *buf, size_t len, qcowtab_report_fn fn, void *opaque,
		  struct qcowtab *out, unsigned int *errors)
{
	const char *p = buf, *end, *nul = memchr(buf, '\0', len);
	unsigned int line = 0, nerr = 0;
	size_t alloc = 0;
	int r = 0;

	memset(out, 0, sizeof(*out));
	if (nul)
		len = (size_t)(nul - buf);
	while (p < buf + len) {
		struct qcowtab_entry e = { 0 };
		const char *s;

		end = memchr(p, '\n', (size_t)(buf + len - p));
		if (!end)
			end = buf + len;
		line++;
		for (s = p; s < end && is_blank(*s); s++)
			;
		if (s == end || *s == '#') {
			p = end + 1;
			continue;
		}
		r = parse_line(s, end, line, fn, opaque, out, &e);
		if (r == -ENOMEM) {
			entry_free(&e);
			goto fail;
		}
		if (r) {
			entry_free(&e);
			nerr++;
			r = 0;
			p = end + 1;
			continue;
		}
		if (out->count == alloc) {
			size_t na = alloc ? alloc * 2 : 8;
			struct qcowtab_entry *v = realloc(out->entries, na * sizeof(*v));

			if (!v) {
				entry_free(&e);
				r = -ENOMEM;
				goto fail;
			}
			out->entries = v;
			alloc = na;
		}
		out->entries[out->count++] = e;
		p = end + 1;
	}
	if (errors)
		*errors = nerr;
	return 0;
fail:
	qcowtab_free(out);
	return r;
}

/* ---- kernel command line ---- */

#define CMDLINE_MAX_IMAGES 64

/* Next word of the command line (quotes removed) into a new string; NULL
 * at the end. *err set on out of memory. */
static char *next_word(const char **p, bool *err)
{
	const char *s = *p;
	char *w, *o;
	bool quoted = false;

	while (*s == ' ' || *s == '\t' || *s == '\n')
		s++;
	if (!*s) {
		*p = s;
		return NULL;
	}
	w = malloc(strlen(s) + 1);
	if (!w) {
		*err = true;
		return NULL;
	}
	for (o = w; *s && (quoted || (*s != ' ' && *s != '\t' && *s != '\n')); s++) {
		if (*s == '"')
			quoted = !quoted;
		else
			*o++ = *s;
	}
	*o = '\0';
	*p = s;
	return w;
}

/* A copy of s with blanks, newlines and backslashes as \NNN escapes (a
 * quoted word of the command line may hold them; a raw newline would end
 * the qcowtab line). */
static char *escape_blanks(const char *s)
{
	char *out = malloc(4 * strlen(s) + 1), *o = out;

	if (!out)
		return NULL;
	for (; *s; s++) {
		if (is_blank(*s) || *s == '\n' || *s == '\\')
			o += sprintf(o, "\\%03o", (unsigned char)*s);
		else
			*o++ = *s;
	}
	*o = '\0';
	return out;
}

bool qcowtab_cmdline_disabled(const char *cmdline)
{
	const char *p = cmdline;
	bool err = false, off = false;
	char *w;

	while ((w = next_word(&p, &err))) {
		if (!strcmp(w, "rd.qcowsetup=0") || !strcmp(w, "rd.qcowsetup=no") || !strcmp(w, "rd.qcowsetup=false"))
			off = true;
		else if (!strcmp(w, "rd.qcowsetup=1") || !strcmp(w, "rd.qcowsetup=yes"))
			off = false;
		free(w);
	}
	return off;
}

int qcowtab_cmdline_lines(const char *cmdline, char **text)
{
	static const char *const keys[] = { "rd.qcowsetup.image=", "rd.qcowsetup.name=",
					    "rd.qcowsetup.key=", "rd.qcowsetup.options=" };
	char *vals[4][CMDLINE_MAX_IMAGES] = { { NULL } };
	unsigned int count[4] = { 0 };
	const char *p = cmdline;
	bool err = false;
	size_t size = 1, pos = 0;
	char *w, *out = NULL;
	int r = -ENOMEM;

	*text = NULL;
	while ((w = next_word(&p, &err))) {
		for (unsigned int k = 0; k < 4; k++) {
			size_t n = strlen(keys[k]);

			if (!strncmp(w, keys[k], n) && w[n] && count[k] < CMDLINE_MAX_IMAGES) {
				vals[k][count[k]] = escape_blanks(w + n);
				if (!vals[k][count[k]])
					err = true;
				count[k]++;
			}
		}
		free(w);
	}
	if (err)
		goto out;
	for (unsigned int i = 0; i < count[0]; i++)
		for (unsigned int k = 0; k < 4; k++)
			size += (i < count[k] && vals[k][i] ? strlen(vals[k][i]) : 0) + 40;
	out = malloc(size);
	if (!out)
		goto out;
	out[0] = '\0';
	for (unsigned int i = 0; i < count[0]; i++) {
		char name[32];
		const char *opts = i < count[3] ? vals[3][i] : "";
		int n;

		snprintf(name, sizeof(name), "qcow-%u", i + 1);
		n = snprintf(out + pos, size - pos, "%s %s %s %s%sx-initrd.attach\n",
			     i < count[1] ? vals[1][i] : name, vals[0][i],
			     i < count[2] ? vals[2][i] : "none", opts, *opts ? "," : "");
		if (n < 0 || (size_t)n >= size - pos)
			goto out;
		pos += (size_t)n;
	}
	*text = out;
	out = NULL;
	r = 0;
out:
	free(out);
	for (unsigned int k = 0; k < 4; k++)
		for (unsigned int i = 0; i < count[k] && i < CMDLINE_MAX_IMAGES; i++)
			free(vals[k][i]);
	return r;
}

/* ---- systemd unit names ---- */

static bool unit_char_ok(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == ':' ||
	       c == '_' || c == '.';
}

/* Append n bytes to out (size bytes), at *pos; false when they do not fit
 * (with the terminating NUL). */
static bool put_bytes(char *out, size_t size, size_t *pos, const char *b, size_t n)
{
	if (*pos + n >= size)
		return false;
	memcpy(out + *pos, b, n);
	*pos += n;
	return true;
}

int qcowtab_systemd_escape(const char *s, bool path, char *out, size_t size)
{
	size_t pos = 0;
	bool first = true;

	if (!size)
		return -ENAMETOOLONG;
	out[0] = '\0';
	if (!path) {
		for (const char *c = s; *c; c++) {
			char hex[5];

			snprintf(hex, sizeof(hex), "\\x%02x", (unsigned char)*c);
			if (unit_char_ok(*c) && !(*c == '.' && c == s) ? !put_bytes(out, size, &pos, c, 1)
								       : !put_bytes(out, size, &pos, hex, 4))
				return -ENAMETOOLONG;
		}
		out[pos] = '\0';
		return (int)pos;
	}
	/* a path: its components joined by '-', as systemd-escape --path after
	 * path_simplify(): empty and "." components dropped, ".." refused */
	for (const char *c = s; *c;) {
		size_t n;

		while (*c == '/')
			c++;
		n = strcspn(c, "/");
		if (!n || (n == 1 && c[0] == '.')) {
			c += n;
			continue;
		}
		if (n == 2 && c[0] == '.' && c[1] == '.')
			return -EINVAL;
		if (!first && !put_bytes(out, size, &pos, "-", 1))
			return -ENAMETOOLONG;
		for (size_t i = 0; i < n; i++) {
			char hex[5];

			snprintf(hex, sizeof(hex), "\\x%02x", (unsigned char)c[i]);
			if (unit_char_ok(c[i]) && !(c[i] == '.' && first && i == 0) ? !put_bytes(out, size, &pos, c + i, 1)
										   : !put_bytes(out, size, &pos, hex, 4))
				return -ENAMETOOLONG;
		}
		first = false;
		c += n;
	}
	if (first && !put_bytes(out, size, &pos, "-", 1))	/* the root directory */
		return -ENAMETOOLONG;
	out[pos] = '\0';
	return (int)pos;
}

int qcowtab_unit_name(const char *name, char *buf, size_t size)
{
	char esc[QCOWTAB_UNIT_NAME_MAX + 1];
	int n;

	if (qcowtab_systemd_escape(name, false, esc, sizeof(esc)) < 0)
		return -ENAMETOOLONG;
	n = snprintf(buf, size, "qcowsetup@%s.service", esc);
	if (n < 0 || n > QCOWTAB_UNIT_NAME_MAX)
		return -ENAMETOOLONG;
	return (size_t)n >= size ? -ENOSPC : 0;
}
