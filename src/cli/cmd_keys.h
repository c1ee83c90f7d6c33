/* What format, the key slot commands and convert share: passphrases and
 * LUKS parameters from the options (utils_keys.c), QEMU's locks, new files
 * written beside their final name, progress (utils_files.c). The options
 * themselves are in options.h. */
#ifndef QS_CLI_KEYS_H
#define QS_CLI_KEYS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "image.h"
#include "io.h"
#include "keys.h"

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
