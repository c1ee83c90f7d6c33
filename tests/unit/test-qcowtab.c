/* The qcowtab parser (src/lib/qcowtab.c): fields, locations, options, errors;
 * the names derived from it (systemd units); LUKS UUIDs as names
 * (src/lib/luks_uuid.c). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luks_uuid.h"
#include "qcowtab.h"
#include "tap.h"

struct reported {
	unsigned int errors, warnings, last_line;
	char last[512];
};

static void collect(void *opaque, enum qcowtab_severity sev, unsigned int line, const char *msg)
{
	struct reported *r = opaque;

	if (sev == QCOWTAB_ERROR)
		r->errors++;
	else
		r->warnings++;
	r->last_line = line;
	snprintf(r->last, sizeof(r->last), "%s", msg);
}

static const char *str(const char *s)
{
	return s ? s : "(null)";
}

/* Locations: field, is_key -> source, tag, value, path (or an error). */
static const struct {
	const char *field;
	bool is_key;
	int ret;
	enum qcowtab_source source;
	const char *tag, *value, *path;
} locations[] = {
	{ "/var/lib/vm.qcow2", false, 0, QCOWTAB_PATH_ONLY, "", NULL, "/var/lib/vm.qcow2" },
	{ "/dev/disk/by-id/virtio-x", false, 0, QCOWTAB_PATH_ONLY, "", NULL, "/dev/disk/by-id/virtio-x" },
	{ "UUID=0b1f-22:/images/vm.qcow2", false, 0, QCOWTAB_TAG_PATH, "UUID", "0b1f-22", "/images/vm.qcow2" },
	{ "LABEL=my\\072disk:/a/b", false, 0, QCOWTAB_TAG_PATH, "LABEL", "my:disk", "/a/b" },
	{ "LABEL=my\\040disk:/a\\040b", false, 0, QCOWTAB_TAG_PATH, "LABEL", "my disk", "/a b" },
	{ "/images/vm.qcow2:UUID=abcd", false, 0, QCOWTAB_TAG_PATH, "UUID", "abcd", "/images/vm.qcow2" },
	{ "PARTUUID=1234-5678", false, 0, QCOWTAB_TAG_ONLY, "PARTUUID", "1234-5678", NULL },
	{ "PARTLABEL=vmdisk", false, 0, QCOWTAB_TAG_ONLY, "PARTLABEL", "vmdisk", NULL },
	{ "/a:b/c.qcow2", false, 0, QCOWTAB_PATH_ONLY, "", NULL, "/a:b/c.qcow2" },
	{ "/a:UUID=1:LABEL=x", false, 0, QCOWTAB_TAG_PATH, "LABEL", "x", "/a:UUID=1" },
	{ "UUID=abcd", false, -EINVAL, 0, NULL, NULL, NULL },
	{ "LABEL=x", false, -EINVAL, 0, NULL, NULL, NULL },
	{ "UUID=:/x", false, -EINVAL, 0, NULL, NULL, NULL },
	{ "vm.qcow2", false, -EINVAL, 0, NULL, NULL, NULL },
	{ "none", false, -EINVAL, 0, NULL, NULL, NULL },
	{ "none", true, 0, QCOWTAB_NONE, "", NULL, NULL },
	{ "-", true, 0, QCOWTAB_NONE, "", NULL, NULL },
	{ "/etc/keys/vm.key", true, 0, QCOWTAB_PATH_ONLY, "", NULL, "/etc/keys/vm.key" },
	{ "/keys/k:UUID=5678", true, 0, QCOWTAB_TAG_PATH, "UUID", "5678", "/keys/k" },
	{ "LABEL=keys:/k", true, 0, QCOWTAB_TAG_PATH, "LABEL", "keys", "/k" },
	{ "PARTUUID=1234", true, -EINVAL, 0, NULL, NULL, NULL },
	{ "key", true, -EINVAL, 0, NULL, NULL, NULL },
};

static void test_locations(void)
{
	for (size_t i = 0; i < sizeof(locations) / sizeof(locations[0]); i++) {
		struct qcowtab_location l;
		const char *why = NULL;
		int r = qcowtab_parse_location(locations[i].field, locations[i].is_key, &l, &why);

		if (locations[i].ret) {
			CHECK(r == locations[i].ret && why, "location %s%s is refused (%s)", locations[i].field,
			      locations[i].is_key ? " (key)" : "", str(why));
			continue;
		}
		CHECK(r == 0 && l.source == locations[i].source && !strcmp(l.tag, locations[i].tag) &&
		      !strcmp(str(l.value), str(locations[i].value)) && !strcmp(str(l.path), str(locations[i].path)),
		      "location %s%s: source %d tag %s value %s path %s", locations[i].field,
		      locations[i].is_key ? " (key)" : "", l.source, l.tag, str(l.value), str(l.path));
		if (r == 0) {
			/* formatting and parsing again gives the same */
			char buf[512];
			struct qcowtab_location l2;

			CHECK(qcowtab_format_location(&l, buf, sizeof(buf)) > 0 &&
			      qcowtab_parse_location(buf, locations[i].is_key, &l2, &why) == 0 &&
			      l2.source == l.source && !strcmp(str(l2.value), str(l.value)) &&
			      !strcmp(str(l2.path), str(l.path)),
			      "location %s formats as %s and back", locations[i].field, buf);
			qcowtab_location_free(&l2);
		}
		qcowtab_location_free(&l);
	}
}

static const char tab_text[] =
	"# name  image  key  options\n"
	"\n"
	"   # indented comment\n"
	"root  UUID=0b1f:/images/root.qcow2  /keys/root.key:LABEL=keys  readonly,tries=5,x-initrd.attach\n"
	"data\tPARTUUID=aa-bb\tnone\tro,discard,nofail,noauto,timeout=30s,same-passphrase\n"
	"home /var/lib/home.qcow2\n"
	"snap /v/s.qcow2 - snapshot=before-upgrade,keyfile-size=64\n"
	"kf   /v/k.qcow2 /etc/k keyfile-offset=512,keyfile-size=32,readonly,x-systemd.device-timeout=2min,tries=0\n"
	"sp\\040x /v/x.qcow2\n"                           /* bad name: line 9 */
	"one\n"                                          /* too few fields: 10 */
	"five a b c d\n"                                 /* too many: 11 */
	"root /other.qcow2\n"                            /* duplicate: 12 */
	"bad1 /x.qcow2 none tries=abc\n"                 /* 13 */
	"bad2 /x.qcow2 none keyfile-size=0\n"            /* 14 */
	"bad3 /x.qcow2 none tries\n"                     /* 15 */
	"warn /x.qcow2 none readonly,frobnicate,x-foo.bar=1\n" /* 16: unknown option: warning */
	"bad4 relative.qcow2\n"                          /* 17 */
	"bad5 UUID=1:/a/../b\n"                          /* 18 */
	"last /no/newline.qcow2 none readonly";          /* 19 */

static void test_table(void)
{
	struct reported rep = { 0 };
	struct qcowtab t;
	unsigned int errors = 0;
	const struct qcowtab_entry *e;
	int r;

	r = qcowtab_parse(tab_text, sizeof(tab_text) - 1, collect, &rep, &t, &errors);
	CHECK(r == 0, "the table parses (%d)", r);
	CHECK(t.count == 7, "7 entries kept (%zu)", t.count);
	CHECK(errors == 9 && rep.errors == 9, "9 lines refused (%u, reported %u)", errors, rep.errors);
	CHECK(rep.warnings == 3, "3 warnings (unknown option, snapshot read-only, keyfile-size without a key file): %u", rep.warnings);

	e = qcowtab_find(&t, "root");
	CHECK(e && e->line == 4 && e->image.source == QCOWTAB_TAG_PATH && !strcmp(e->image.value, "0b1f") &&
	      e->key.source == QCOWTAB_TAG_PATH && !strcmp(e->key.tag, "LABEL") && !strcmp(e->key.path, "/keys/root.key") &&
	      e->readonly && e->tries == 5 && e->initrd_attach && !e->nofail && !e->same_passphrase,
	      "root: line 4, tag image, key on LABEL=keys, readonly, tries=5, x-initrd.attach");
	CHECK(e && !strcmp(e->image.path, "/images/root.qcow2"), "root: first of a duplicated name wins");

	e = qcowtab_find(&t, "data");
	CHECK(e && e->image.source == QCOWTAB_TAG_ONLY && e->key.source == QCOWTAB_NONE && e->readonly &&
	      e->discard && e->nofail && e->noauto && e->timeout == 30 && e->same_passphrase && e->tries == 3,
	      "data: tabs, PARTUUID device, none, ro discard nofail noauto timeout=30s same-passphrase, tries 3");

	e = qcowtab_find(&t, "home");
	CHECK(e && e->key.source == QCOWTAB_NONE && !e->readonly && e->options && !*e->options,
	      "home: two fields, no key, no options (read-write)");

	e = qcowtab_find(&t, "snap");
	CHECK(e && e->snapshot && !strcmp(e->snapshot, "before-upgrade") && e->readonly && e->keyfile_size == 64,
	      "snap: snapshot= makes it read-only");

	e = qcowtab_find(&t, "kf");
	CHECK(e && e->key.source == QCOWTAB_PATH_ONLY && e->keyfile_offset == 512 && e->keyfile_size == 32 &&
	      e->device_timeout == 120 && e->tries == 0,
	      "kf: keyfile-offset, keyfile-size, x-systemd.device-timeout=2min, tries=0");

	e = qcowtab_find(&t, "warn");
	CHECK(e && e->readonly, "warn: unknown options are ignored, the entry is kept");
	e = qcowtab_find(&t, "last");
	CHECK(e && e->readonly && e->line == 19, "last line without a newline");
	CHECK(!qcowtab_find(&t, "bad1") && !qcowtab_find(&t, "bad5") && !qcowtab_find(&t, "one"),
	      "refused lines are left out");
	qcowtab_free(&t);

	memset(&rep, 0, sizeof(rep));
	r = qcowtab_parse("n\\012x /x\nm /x none ro,x\\012y\\033z\n", 36, collect, &rep, &t, &errors);
	CHECK(r == 0 && t.count == 1 && rep.errors == 1 && rep.warnings == 1 &&
	      !strcmp(rep.last, "unknown option x\\012y\\033z ignored"),
	      "messages quote fields on one line: control characters as \\NNN (%s)", rep.last);
	qcowtab_free(&t);

	memset(&rep, 0, sizeof(rep));
	r = qcowtab_parse("n\\012x /x\n", 10, collect, &rep, &t, &errors);
	CHECK(r == 0 && t.count == 0 && !strncmp(rep.last, "invalid name \"n\\012x\"", 18),
	      "an invalid name is quoted as written (%s)", rep.last);
	qcowtab_free(&t);

	memset(&rep, 0, sizeof(rep));
	r = qcowtab_parse("a /x none\nb /y none\0c /z none\n", 30, collect, &rep, &t, &errors);
	CHECK(r == 0 && t.count == 2, "a NUL ends the table");
	qcowtab_free(&t);

	r = qcowtab_parse("", 0, NULL, NULL, &t, NULL);
	CHECK(r == 0 && t.count == 0, "an empty table");
	qcowtab_free(&t);
}

/* Key sources beyond the key file: crypttab's keyfile-timeout=, headless=,
 * password-echo=; systemd credentials; crypttab options ignored or refused. */
static const char keysrc_text[] =
	"a /a.qcow2 /run/key.sock keyfile-timeout=10s,headless,password-echo=masked\n"	/* 1 */
	"b /b.qcow2 none credential=vm-b.key,headless=no,password-echo=no\n"		/* 2 */
	"c /c.qcow2 - load-credential=c.key:/etc/keys/c,password-echo=yes,headless=yes\n"	/* 3 */
	"d /d.qcow2 - load-credential-encrypted=qcow.d,keyfile-size=32\n"			/* 4 */
	"e /e.qcow2 /k cipher=aes-xts-plain64,same-cpu-crypt,no-read-workqueue,_netdev,luks\n"	/* 5: 3 warnings */
	"f /f.qcow2 - keyfile-timeout=1min\n"						/* 6: warning */
	"r1 /x.qcow2 - tpm2-device=auto\n"							/* 7: refused */
	"r2 /x.qcow2 - swap\n"								/* 8 */
	"r3 /x.qcow2 - header=/h\n"								/* 9 */
	"r4 /x.qcow2 - password-echo=loud\n"							/* 10 */
	"r5 /x.qcow2 - headless=maybe\n"							/* 11 */
	"r6 /x.qcow2 - credential=a/b\n"							/* 12 */
	"r7 /x.qcow2 - load-credential=x:relative\n"						/* 13 */
	"r8 /x.qcow2 - credential=a:b\n"							/* 14 */
	"r9 /x.qcow2 - keyfile-timeout=soon\n"						/* 15 */
	"r10 /x.qcow2 - credential\n";							/* 16 */

static void test_key_sources(void)
{
	struct reported rep = { 0 };
	const struct qcowtab_entry *e;
	unsigned int errors = 0;
	struct qcowtab t;
	int r;

	r = qcowtab_parse(keysrc_text, sizeof(keysrc_text) - 1, collect, &rep, &t, &errors);
	CHECK(r == 0 && t.count == 6 && errors == 10, "key sources: 6 entries, 10 refused (%zu, %u)", t.count, errors);
	CHECK(rep.warnings == 4, "4 warnings: 3 crypttab options ignored, keyfile-timeout without a key file (%u)",
	      rep.warnings);
	CHECK(rep.last_line == 16, "the last report is line 16 (%u)", rep.last_line);

	e = qcowtab_find(&t, "a");
	CHECK(e && e->keyfile_optional && e->keyfile_timeout == 10 && e->headless &&
	      e->password_echo == QCOWTAB_ECHO_MASKED && !e->credential,
	      "a: keyfile-timeout=10s, headless, password-echo=masked");
	e = qcowtab_find(&t, "b");
	CHECK(e && !e->headless && e->password_echo == QCOWTAB_ECHO_NO && e->credential &&
	      !strcmp(e->credential, "vm-b.key") && !e->credential_path && e->credential_load == QCOWTAB_CRED_GIVEN &&
	      !e->keyfile_optional, "b: credential=vm-b.key, headless=no, password-echo=no");
	e = qcowtab_find(&t, "c");
	CHECK(e && e->headless && e->password_echo == QCOWTAB_ECHO_YES && e->credential &&
	      !strcmp(e->credential, "c.key") && e->credential_path && !strcmp(e->credential_path, "/etc/keys/c") &&
	      e->credential_load == QCOWTAB_CRED_LOAD, "c: load-credential=c.key:/etc/keys/c");
	e = qcowtab_find(&t, "d");
	CHECK(e && e->credential && !strcmp(e->credential, "qcow.d") && !e->credential_path &&
	      e->credential_load == QCOWTAB_CRED_LOAD_ENCRYPTED && e->keyfile_size == 32 &&
	      e->password_echo == QCOWTAB_ECHO_DEFAULT,
	      "d: load-credential-encrypted=qcow.d, keyfile-size applies to the credential");
	e = qcowtab_find(&t, "e");
	CHECK(e && !e->readonly, "e: ignored crypttab options keep the entry");
	CHECK(e && e->netdev && !qcowtab_find(&t, "a")->netdev, "e: _netdev (no warning), a: not");
	CHECK(!qcowtab_find(&t, "r1") && !qcowtab_find(&t, "r10"), "refused lines are left out");
	qcowtab_free(&t);

	memset(&rep, 0, sizeof(rep));
	r = qcowtab_parse("t /x.qcow2 - tpm2-device=auto\n", 30, collect, &rep, &t, NULL);
	CHECK(r == 0 && t.count == 0 && strstr(rep.last, "tpm2-device refused") && strstr(rep.last, "no tokens"),
	      "a refused crypttab option says why (%s)", rep.last);
	qcowtab_free(&t);

	CHECK(qcowtab_valid_credential("cryptsetup.passphrase") && !qcowtab_valid_credential("") &&
	      !qcowtab_valid_credential("..") && !qcowtab_valid_credential("a%b") &&
	      !qcowtab_valid_credential("a\nb"), "credential names");
}

static void test_names_and_escapes(void)
{
	char *s;

	CHECK(qcowtab_valid_name("vm-1_a.b+c"), "valid name");
	CHECK(!qcowtab_valid_name("") && !qcowtab_valid_name("..") && !qcowtab_valid_name("a/b") &&
	      !qcowtab_valid_name("a b"), "invalid names");
	s = qcowtab_unescape("a\\040b\\\\c\\0", 12);
	CHECK(s && !strcmp(s, "a b\\\\c\\0"), "escapes: \\040 decoded, others kept (%s)", s);
	free(s);
	s = qcowtab_unescape("x\\000y", 6);
	CHECK(s && !strcmp(s, "x\\000y"), "\\000 is not decoded (%s)", s);
	free(s);
}

static void test_cmdline(void)
{
	char *text = NULL;
	struct qcowtab t;
	const struct qcowtab_entry *e;
	int r;

	r = qcowtab_cmdline_lines("BOOT_IMAGE=/vmlinuz root=/dev/mapper/root ro "
				  "rd.qcowsetup.image=UUID=12:/r.qcow2 rd.qcowsetup.name=root "
				  "rd.qcowsetup.key=/k:LABEL=keys rd.qcowsetup.options=readonly,tries=2 "
				  "rd.qcowsetup.image=\"LABEL=a b:/d.qcow2\" quiet", &text);
	CHECK(r == 0 && text && !strcmp(text,
		"root UUID=12:/r.qcow2 /k:LABEL=keys readonly,tries=2,x-initrd.attach\n"
		"qcow-2 LABEL=a\\040b:/d.qcow2 none x-initrd.attach\n"),
	      "command line: N-th name/key/options with the N-th image, defaults, quotes, blanks escaped");
	r = qcowtab_parse(text, strlen(text), NULL, NULL, &t, NULL);
	e = qcowtab_find(&t, "root");
	CHECK(r == 0 && e && e->initrd_attach && e->readonly && e->tries == 2 && e->key.source == QCOWTAB_TAG_PATH,
	      "command line entries parse");
	e = qcowtab_find(&t, "qcow-2");
	CHECK(t.count == 2 && e && !strcmp(e->image.value, "a b"), "a quoted label with a space");
	qcowtab_free(&t);
	free(text);

	r = qcowtab_cmdline_lines("rd.qcowsetup.image=\"/a\\b\tc\nd\" rd.qcowsetup.name=n", &text);
	CHECK(r == 0 && text && !strcmp(text, "n /a\\134b\\011c\\012d none x-initrd.attach\n"),
	      "command line: a backslash, a tab and a newline in quotes are escaped, the line stays one (%s)",
	      text ? text : "(null)");
	free(text);

	r = qcowtab_cmdline_lines("quiet splash", &text);
	CHECK(r == 0 && text && !*text, "no rd.qcowsetup.image: no lines");
	free(text);
	CHECK(qcowtab_cmdline_disabled("a rd.qcowsetup=0 b") && !qcowtab_cmdline_disabled("rd.qcowsetup.image=x") &&
	      !qcowtab_cmdline_disabled("rd.qcowsetup=0 rd.qcowsetup=1"), "rd.qcowsetup=0, the last one wins");
}

static void test_unit_names(void)
{
	static const struct { const char *in; bool path; const char *out; } v[] = {
		{ "root", false, "root" },
		{ "vm-1", false, "vm\\x2d1" },
		{ "a+b.c_d", false, "a\\x2bb.c_d" },
		{ ".hidden", false, "\\x2ehidden" },
		{ "/dev/mapper/vm-1", true, "dev-mapper-vm\\x2d1" },
		{ "/dev/disk/by-label/my\\x20disk", true, "dev-disk-by\\x2dlabel-my\\x5cx20disk" },
		{ "//a//b/", true, "a-b" },
		{ "/", true, "-" },
		/* as systemd-escape --path after path_simplify() */
		{ "/dev/./disk//by-id/.", true, "dev-disk-by\\x2did" },
		{ "/.x/.y", true, "\\x2ex-.y" },
		{ "/dev/disk/by-id/a b%\\\"'\n\xc3\xa9", true, "dev-disk-by\\x2did-a\\x20b\\x25\\x5c\\x22\\x27\\x0a\\xc3\\xa9" },
		{ "100%", false, "100\\x25" },
	};
	char buf[256], name[QCOWTAB_NAME_MAX + 1];

	for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
		int r = qcowtab_systemd_escape(v[i].in, v[i].path, buf, sizeof(buf));

		CHECK(r == (int)strlen(v[i].out) && !strcmp(buf, v[i].out), "systemd-escape%s %s = %s (%s)",
		      v[i].path ? " --path" : "", v[i].in, v[i].out, buf);
	}
	CHECK(qcowtab_systemd_escape("/dev/../x", true, buf, sizeof(buf)) == -EINVAL,
	      "systemd-escape --path refuses a .. component");
	CHECK(qcowtab_systemd_escape("/dev/mapper/a-b", true, buf, 17) == -ENAMETOOLONG &&
	      qcowtab_systemd_escape("/dev/mapper/a-b", true, buf, 18) == 17,
	      "systemd-escape into a buffer too small fails, never cuts (17 characters need 18 bytes)");
	CHECK(qcowtab_unit_name("vm-1", buf, sizeof(buf)) == 0 && !strcmp(buf, "qcowsetup@vm\\x2d1.service"),
	      "unit name %s", buf);
	memset(name, '+', QCOWTAB_NAME_MAX);
	name[QCOWTAB_NAME_MAX] = '\0';
	CHECK(qcowtab_valid_name(name) && qcowtab_unit_name(name, buf, sizeof(buf)) == -ENAMETOOLONG,
	      "a valid name of %d '+' is refused as a unit name (each one is \\x2b: over 255 characters)",
	      QCOWTAB_NAME_MAX);
	memset(name, 'a', QCOWTAB_NAME_MAX);
	CHECK(qcowtab_unit_name(name, buf, sizeof(buf)) == 0 && strlen(buf) == 100 + strlen("qcowsetup@.service"),
	      "a name of %d letters makes a unit name", QCOWTAB_NAME_MAX);
}

/* A LUKS UUID from an image goes into a udev link: the pattern only. */
static void test_luks_uuid(void)
{
	static const struct { const char *s; bool ok; } v[] = {
		{ "0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6b", true },
		{ "0B1F22C4-5A6E-4B7D-9E2F-1C2D3E4F5A6B", true },	/* uuid_parse takes both cases */
		{ "00000000-0000-0000-0000-000000000000", true },
		{ "", false },
		{ "0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6", false },	/* short */
		{ "0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6b0", false },	/* long */
		{ "0b1f22c45a6e4b7d9e2f1c2d3e4f5a6b", false },		/* no dashes */
		{ "0b1f22c4-5a6e-4b7d-9e2f1-c2d3e4f5a6b", false },	/* dash misplaced */
		{ "0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6g", false },
		{ "../../../../../../../../../etc/passw", false },	/* 36 characters */
		{ "0b1f22c4/5a6e-4b7d-9e2f-1c2d3e4f5a6b", false },
		{ "0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6 ", false },
		{ "0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6\n", false },
		{ " 0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6", false },
	};

	for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
		CHECK(luks_uuid_valid(v[i].s) == v[i].ok, "LUKS UUID \"%s\" is %s", v[i].s, v[i].ok ? "valid" : "refused");
	CHECK(!luks_uuid_valid(NULL), "a NULL LUKS UUID is refused");
}

int main(void)
{
	test_locations();
	test_table();
	test_key_sources();
	test_names_and_escapes();
	test_cmdline();
	test_unit_names();
	test_luks_uuid();
	return tap_done();
}
