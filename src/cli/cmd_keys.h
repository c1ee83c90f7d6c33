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
/* -EBUSY (with a message) when another user holds the write permission of
 * the image (a read-write mapping's daemon, QEMU): the qcow2 header, unlike
 * the LUKS header, is that writer's to rewrite. */
int keys_refuse_header_writer(int fd, const char *path);
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

/* An image whose LUKS header is read (and edited): cmd_keys.c. */
struct keyimg {
	const char *path;
	int fd;
	struct img_io io;
	struct image *img;
	uint8_t *region;	/* what is on disk */
	uint64_t off, len;
	struct luks_info info;
};

/* Open path (write: locked as a writer; a mapped image is allowed), a
 * LUKS qcow2, and read its header region. 0 or -errno, logged. */
int keyimg_open(const char *path, bool write, struct keyimg *k);
void keyimg_close(struct keyimg *k);
/* Write the edited region new back in the crash-safe order and read it
 * back. 0 or -errno, logged. */
int keyimg_store(struct keyimg *k, const uint8_t *new);

/* A key slot edit: the image, the volume key the existing passphrase
 * unlocked, the new passphrase, the header region as edited. */
struct key_edit {
	struct keyimg k;
	struct volume_key *vk;
	int slot;			/* the slot the existing passphrase opened */
	struct passphrase *newpp;	/* add-key, change-key */
	uint8_t *new;
};

/* The volume key and the slot the existing passphrase opens (--key-file,
 * keyfile_arg overriding it, or --tries questions); with new_key, the new
 * passphrase (new_file or the prompt); e->new a copy of the region to
 * edit. 0 or -errno. */
int key_edit_unlock(struct key_edit *e, const char *keyfile_arg, bool new_key, const char *new_file);
void key_edit_end(struct key_edit *e);

/* The bindings of img as lines ("Key slot N: PIN CONFIG", indent first)
 * or a "bindings" JSON array; li (may be NULL) marks disabled slots. */
struct json;
void bindings_human(const struct image *img, const struct luks_info *li, const char *indent);
void bindings_json(struct json *j, const struct image *img, const struct luks_info *li);

/* Commands */
int cmd_format(int argc, char **argv);
int cmd_add_key(int argc, char **argv);
int cmd_remove_key(int argc, char **argv);
int cmd_change_key(int argc, char **argv);
int cmd_dump_keys(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_bind(int argc, char **argv);
int cmd_unbind(int argc, char **argv);
int cmd_test_bindings(int argc, char **argv);

#endif
