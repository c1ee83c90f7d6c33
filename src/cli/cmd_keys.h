/* Options and helpers shared by format, the key slot commands and convert
 * (cmd_format.c, cmd_keys.c, cmd_convert.c).
 *
 * The options are kept here, not in struct tools_opts, so that registering
 * the commands touches qcowsetup.c in three places only: KEYS_LONG_OPTIONS
 * in long_options[], keys_parse_option() in the default case of the option
 * switch, keys_usage() in usage(). */
#ifndef QS_CLI_KEYS_H
#define QS_CLI_KEYS_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "image.h"
#include "io.h"
#include "keys.h"

struct keys_opts {
	const char *cipher;		/* --cipher, "aes-xts-plain64" */
	uint32_t key_size;		/* --key-size, bits; 0 = 512 for xts, 256 otherwise */
	const char *hash;		/* --hash, "sha256" */
	uint32_t iter_time;		/* --iter-time, ms */
	uint32_t pbkdf_iterations;	/* --pbkdf-force-iterations */
	uint64_t cluster_size;		/* --cluster-size, bytes; 0 = default */
	const char *backing_file;	/* --backing-file (format) */
	const char *backing_format;	/* --backing-format (format) */
	const char *new_key_file;	/* --new-key-file */
	uint64_t new_keyfile_offset;	/* --new-keyfile-offset */
	uint64_t new_keyfile_size;	/* --new-keyfile-size */
	int key_slot;			/* --key-slot, -1 = any */
	bool progress;			/* --progress */
	bool quiet;			/* --quiet: no progress */
	bool in_place;			/* convert --in-place */
	bool flatten;			/* convert --flatten: drop the backing file */
	bool force;			/* overwrite a destination; remove the last key */
};

extern struct keys_opts kopt;

#define KEYS_OPT_BASE 0x200
enum {
	KEYS_OPT_CIPHER = KEYS_OPT_BASE,
	KEYS_OPT_KEY_SIZE,
	KEYS_OPT_HASH,
	KEYS_OPT_ITER_TIME,
	KEYS_OPT_PBKDF_ITERATIONS,
	KEYS_OPT_CLUSTER_SIZE,
	KEYS_OPT_BACKING_FILE,
	KEYS_OPT_BACKING_FORMAT,
	KEYS_OPT_NEW_KEY_FILE,
	KEYS_OPT_NEW_KEYFILE_OFFSET,
	KEYS_OPT_NEW_KEYFILE_SIZE,
	KEYS_OPT_KEY_SLOT,
	KEYS_OPT_PROGRESS,
	KEYS_OPT_QUIET,
	KEYS_OPT_IN_PLACE,
	KEYS_OPT_FLATTEN,
	KEYS_OPT_FORCE,
};

#define KEYS_LONG_OPTIONS \
	{ "cipher", required_argument, NULL, KEYS_OPT_CIPHER }, \
	{ "key-size", required_argument, NULL, KEYS_OPT_KEY_SIZE }, \
	{ "hash", required_argument, NULL, KEYS_OPT_HASH }, \
	{ "iter-time", required_argument, NULL, KEYS_OPT_ITER_TIME }, \
	{ "pbkdf-force-iterations", required_argument, NULL, KEYS_OPT_PBKDF_ITERATIONS }, \
	{ "cluster-size", required_argument, NULL, KEYS_OPT_CLUSTER_SIZE }, \
	{ "backing-file", required_argument, NULL, KEYS_OPT_BACKING_FILE }, \
	{ "backing-format", required_argument, NULL, KEYS_OPT_BACKING_FORMAT }, \
	{ "new-key-file", required_argument, NULL, KEYS_OPT_NEW_KEY_FILE }, \
	{ "new-keyfile-offset", required_argument, NULL, KEYS_OPT_NEW_KEYFILE_OFFSET }, \
	{ "new-keyfile-size", required_argument, NULL, KEYS_OPT_NEW_KEYFILE_SIZE }, \
	{ "key-slot", required_argument, NULL, KEYS_OPT_KEY_SLOT }, \
	{ "progress", no_argument, NULL, KEYS_OPT_PROGRESS }, \
	{ "quiet", no_argument, NULL, KEYS_OPT_QUIET }, \
	{ "in-place", no_argument, NULL, KEYS_OPT_IN_PLACE }, \
	{ "flatten", no_argument, NULL, KEYS_OPT_FLATTEN }, \
	{ "force", no_argument, NULL, KEYS_OPT_FORCE }

/* Handle one of the options above: 1 handled, 0 not one of them, -EINVAL
 * bad value (logged). */
int keys_parse_option(int c, const char *arg);
/* The help lines of the options above. */
void keys_usage(FILE *f);

/* ---- helpers (cmd_keys.c) ---- */

/* "1M", "64k", "2G", "512": bytes (K/M/G/T, powers of 1024). */
int keys_parse_size(const char *s, const char *what, uint64_t *v);

/* The existing passphrase (--key-file, --keyfile-offset/size, or the
 * prompt for image). */
int keys_read_passphrase(const char *image, struct passphrase **pp);

/* A new passphrase: from file (a key file, all of it, or - for stdin), or
 * the prompt, asked twice on a terminal. */
int keys_read_new_passphrase(const char *file, const char *image, struct passphrase **pp);

/* --cipher/--key-size/--hash/--iter-time/--pbkdf-force-iterations as
 * luks_format_params; *key_bytes gets the volume key size. name and mode
 * point into buffers of the caller (at least 33 bytes each). */
int keys_format_params(struct luks_format_params *p, char *name, char *mode, size_t *key_bytes);
void keys_pbkdf(struct luks_pbkdf *p);

/* An img_io reading fd (which the caller keeps open: its locks live with it). */

/* Lock fd as a writer of the image path (QEMU's lock bytes): refuses with
 * -EBUSY and a message when QEMU or another program has it open, unless
 * path is mapped by qcowsetup (a loop device backs it) and allow_mapped. */
int keys_lock_for_write(int fd, const char *path, bool allow_mapped);
/* Lock fd as a reader that refuses concurrent writers (QEMU read-only);
 * exclusive: refuse any other user (for a file about to be replaced). */
int keys_lock_for_read(int fd, const char *path, bool exclusive);

/* A new image written beside its final name and renamed into place. */
struct out_file {
	char *path;		/* final name */
	char *tmp;		/* PATH.qcowsetup-tmp */
	int fd;
};
/* Create path.qcowsetup-tmp (a stale one from a killed run is removed; one
 * another live run holds gives -EBUSY). Unless replace, an existing path is
 * refused (-EEXIST). SIGINT/SIGTERM/SIGHUP remove the temporary file. */
int out_file_create(const char *path, bool replace, struct out_file *o);
/* fsync, rename over path, fsync the folder. */
int out_file_commit(struct out_file *o, bool replace);
/* Remove the temporary file. */
void out_file_abort(struct out_file *o);

/* Progress on stderr: a bar on a terminal, lines with --progress otherwise. */
struct progress {
	bool on;
	bool tty;
	const char *label;
	uint64_t total;
	uint64_t done;
	int64_t last_ms;
	int64_t start_ms;
};
void progress_start(struct progress *p, const char *label, uint64_t total);
void progress_update(struct progress *p, uint64_t done);
void progress_end(struct progress *p, bool ok);

/* Commands */
int cmd_format(int argc, char **argv);
int cmd_add_key(int argc, char **argv);
int cmd_remove_key(int argc, char **argv);
int cmd_change_key(int argc, char **argv);
int cmd_dump_keys(int argc, char **argv);
int cmd_convert(int argc, char **argv);

#endif
