/* /etc/qcowtab: the images to map at boot, one a line, crypttab-like:
 *
 *   # name   image                          key-file            options
 *   vm1      UUID=0b1f...:/images/vm1.qcow2 none                readonly,tries=3
 *   data     /dev/disk/by-id/virtio-data    /keys/d.key:LABEL=k readonly,nofail
 *
 * Fields are separated by blanks; \NNN octal escapes (\040 a space, \072 a
 * colon) stand for the characters that would otherwise split them. The key
 * and options fields may be left out (none, and no options).
 *
 * A location (the image, or a key file) is one of
 *   /abs/path                a file or a block device, as the system sees it
 *   TAG=VALUE:/path/inside   a file on the filesystem that TAG names
 *   /path/inside:TAG=VALUE   the same, crypttab's spelling for key files
 *   TAG=VALUE                the block device itself (image only: a qcow2
 *                            written straight onto a partition or disk)
 * with TAG one of UUID, LABEL, PARTUUID, PARTLABEL (as libblkid names them).
 * key-file "none" or "-": ask for a passphrase.
 *
 * Pure: parses a buffer and reports problems through a callback; nothing
 * here touches a file or a device (src/cli/cmd_tab.c does). */
#ifndef QS_QCOWTAB_H
#define QS_QCOWTAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOWTAB_PATH		"/etc/qcowtab"
#define QCOWTAB_NAME_MAX	100	/* as device-mapper names in qcowsetup */
#define QCOWTAB_TRIES_DEFAULT	3
#define QCOWTAB_TAG_MAX		16

enum qcowtab_source {
	QCOWTAB_NONE = 0,	/* key only: ask for a passphrase */
	QCOWTAB_PATH_ONLY,	/* an absolute path */
	QCOWTAB_TAG_PATH,	/* a path on the filesystem a tag names */
	QCOWTAB_TAG_ONLY,	/* the block device a tag names (image only) */
};

struct qcowtab_location {
	enum qcowtab_source source;
	char tag[QCOWTAB_TAG_MAX];	/* "UUID", "LABEL", "PARTUUID", "PARTLABEL" or "" */
	char *value;			/* the tag's value, decoded; NULL without a tag */
	char *path;			/* absolute; NULL for QCOWTAB_TAG_ONLY and NONE */
};

/* password-echo= (crypttab's): how a question shows what is typed */
enum qcowtab_echo {
	QCOWTAB_ECHO_DEFAULT = 0,	/* not given: the agent's default (masked), none on a terminal */
	QCOWTAB_ECHO_NO,
	QCOWTAB_ECHO_YES,
	QCOWTAB_ECHO_MASKED,		/* one '*' per character */
};

/* Where the unit gets the credential that credential= names (the generator
 * writes the setting; qcowsetup reads $CREDENTIALS_DIRECTORY/ID). */
enum qcowtab_credential_load {
	QCOWTAB_CRED_GIVEN = 0,		/* credential=ID: the unit gets it some other way */
	QCOWTAB_CRED_LOAD,		/* load-credential=ID[:PATH]: LoadCredential= */
	QCOWTAB_CRED_LOAD_ENCRYPTED,	/* load-credential-encrypted=ID[:PATH]: LoadCredentialEncrypted= */
};

struct qcowtab_entry {
	unsigned int line;		/* 1-based line in the file */
	char *name;
	struct qcowtab_location image;
	struct qcowtab_location key;	/* source QCOWTAB_NONE: ask */
	bool readonly;
	bool discard;
	bool nofail;
	bool noauto;
	bool initrd_attach;		/* x-initrd.attach */
	bool same_passphrase;
	bool allow_unencrypted;		/* an unencrypted image is fine (else one is refused) */
	bool trust_names;		/* --trust-names */
	bool clevis;			/* the image's clevis bindings first, then the key file or prompt */
	unsigned int token_timeout;	/* token-timeout=: seconds per clevis decrypt; 0 = default */
	bool netdev;			/* _netdev: needs the network (a tang binding) */
	const char *format;		/* format=: "qcow2", "qcow", "raw" (static), or NULL: probe */
	unsigned int tries;		/* passphrase attempts; 0 = until one works */
	unsigned int timeout;		/* seconds to wait for a passphrase; 0 = no limit */
	unsigned int device_timeout;	/* x-systemd.device-timeout=, seconds; 0 = default */
	uint64_t keyfile_offset;
	uint64_t keyfile_size;
	char *snapshot;			/* snapshot=ID|NAME, or NULL */
	/* key sources beyond the key file (crypttab's names where they exist) */
	bool keyfile_optional;		/* keyfile-timeout= given: without the key file, ask */
	unsigned int keyfile_timeout;	/* keyfile-timeout=: seconds to wait for the key file first */
	bool headless;			/* headless=: never ask, fail instead */
	enum qcowtab_echo password_echo;	/* password-echo= */
	char *credential;		/* the systemd credential holding the key, or NULL */
	char *credential_path;		/* its file for LoadCredential*=ID:PATH, or NULL (systemd searches) */
	enum qcowtab_credential_load credential_load;
	char *options;			/* the options field as written (decoded), or "" */
};

struct qcowtab {
	struct qcowtab_entry *entries;
	size_t count;
};

enum qcowtab_severity {
	QCOWTAB_WARNING = 0,	/* the line is used, something in it is ignored */
	QCOWTAB_ERROR,		/* the line is skipped */
};

/* Told about each problem: line (1-based) and a message naming the field. */
typedef void (*qcowtab_report_fn)(void *opaque, enum qcowtab_severity sev,
				  unsigned int line, const char *msg);

/* Parse len bytes of buf (NULs end the buffer early). Lines with errors
 * are reported and left out; a later line naming an entry again is an
 * error. Returns 0 (even when lines were left out: *errors counts them,
 * errors may be NULL) or -ENOMEM; free out with qcowtab_free(). */
int qcowtab_parse(const char *buf, size_t len, qcowtab_report_fn report, void *opaque,
		  struct qcowtab *out, unsigned int *errors);
void qcowtab_free(struct qcowtab *t);

/* The entry called name, or NULL. */
const struct qcowtab_entry *qcowtab_find(const struct qcowtab *t, const char *name);

/* Parse one location as the image (is_key false) or key-file field, raw
 * (escapes not yet decoded). Returns 0, -EINVAL (*why says what is wrong,
 * a static string) or -ENOMEM. Free with qcowtab_location_free(). */
int qcowtab_parse_location(const char *field, bool is_key, struct qcowtab_location *loc,
			   const char **why);
void qcowtab_location_free(struct qcowtab_location *loc);

/* Whether id can name a systemd credential (a file name: no '/', not "."
 * or "..", at most 255 bytes, no control characters; ':' would end the
 * ID in LoadCredential=, '%' is a specifier there). */
bool qcowtab_valid_credential(const char *id);

/* Whether name can name an entry (and a device-mapper device). */
bool qcowtab_valid_name(const char *name);

/* Decode \NNN octal escapes of src into a new string. NULL: -ENOMEM. */
char *qcowtab_unescape(const char *src, size_t len);

/* Write loc the way qcowtab spells it (escaped) into buf.
 * Returns the length, or -ENOSPC. */
int qcowtab_format_location(const struct qcowtab_location *loc, char *buf, size_t size);

/* ---- The kernel command line (initramfs) ----
 *   rd.qcowsetup.image=LOCATION   an image to map (repeatable)
 *   rd.qcowsetup.name=NAME        the name of the N-th image (default qcow-N)
 *   rd.qcowsetup.key=LOCATION     its key file (default none: ask)
 *   rd.qcowsetup.options=OPTIONS  its options (default none)
 * The N-th name, key and options go with the N-th image. Each image becomes
 * an entry "NAME LOCATION KEY OPTIONS,x-initrd.attach". Writes the entries
 * as qcowtab lines (malloc'ed, possibly "") into *text. Double quotes around
 * a word are removed. Returns 0 or -ENOMEM. Pure. */
int qcowtab_cmdline_lines(const char *cmdline, char **text);

/* Whether the kernel command line says rd.qcowsetup=0 (or =no, =false). */
bool qcowtab_cmdline_disabled(const char *cmdline);

/* ---- systemd unit names (the generator, udev's SYSTEMD_WANTS) ---- */

#define QCOWTAB_UNIT_NAME_MAX	255	/* systemd's UNIT_NAME_MAX less the NUL */

/* systemd's escaping of a string for a unit name (systemd-escape): bytes
 * outside [A-Za-z0-9:_.] (and a leading '.') become \xNN; with path, the
 * string is a path, simplified first as systemd does (empty and "."
 * components dropped, "/" alone is "-") and its components joined by '-'
 * (systemd-escape --path). Returns the length written into out, -EINVAL
 * (path with a ".." component, which systemd refuses) or -ENAMETOOLONG (out,
 * size bytes with the NUL, is too small). */
int qcowtab_systemd_escape(const char *s, bool path, char *out, size_t size);

/* "qcowsetup@NAME.service", NAME escaped. 0, -ENAMETOOLONG (longer than
 * systemd takes: QCOWTAB_UNIT_NAME_MAX) or -ENOSPC (buf too small). */
int qcowtab_unit_name(const char *name, char *buf, size_t size);

/* ---- Finding the devices that tags name (probe_blkid.c, libblkid) ---- */

/* The block device that TAG=VALUE names (UUID, LABEL, PARTUUID, PARTLABEL),
 * through udev's links or a scan of the block devices. Writes its path
 * into dev. Returns 0, -ENODEV (no such device yet), -EINVAL (tag) or
 * -ENOSPC/-ENOMEM. */
int probe_tag_device(const char *tag, const char *value, char *dev, size_t size);

/* The filesystem type libblkid sees on dev ("ext4", "xfs", ...). Returns
 * 0, -ENODEV (no filesystem recognised), -EIO or another -errno. */
int probe_fstype(const char *dev, char *type, size_t size);
#endif
