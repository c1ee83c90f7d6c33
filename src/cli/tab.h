/* qcowtab for the qcowsetup command: loading the file, finding and
 * mounting what its entries name (tab_files.c), the passphrases of an
 * entry (tab_keys.c), open --tab and close --tab (cmd_tab.c). */
#ifndef QS_CLI_TAB_H
#define QS_CLI_TAB_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "daemon_state.h"
#include "keys.h"
#include "qcowtab.h"

/* Where mounts made by qcowsetup live: the filesystems holding images (kept
 * while a mapping uses them) and those holding key files (unmounted after
 * use). Under /run, so they survive the initramfs's switch_root. */
#define MOUNT_DIR		QS_RUN_DIR "/mnt"
#define KEY_MOUNT_DIR		QS_RUN_DIR "/key"

/* Read and parse --qcowtab FILE or /etc/qcowtab; problems in lines are
 * logged ("FILE:LINE: ...") and those lines left out. A missing file is an
 * empty table when missing_ok. Returns 0 or -errno. */
int tools_load_qcowtab(struct qcowtab *tab, bool missing_ok);
const char *tools_qcowtab_path(void);

/* The block device an image location names when it names one without
 * mounting anything (a path that is a block device, or TAG=VALUE without a
 * path): its path in dev and device number in *rdev. -ENODEV when it is not
 * present (or the location is a file), -errno otherwise. */
int tools_location_blockdev(const struct qcowtab_location *loc, char *dev, size_t size, dev_t *rdev);

/* A filesystem made available for one entry. */
struct held_mount {
	char dir[PATH_MAX];
	bool ours;	/* mounted here by this run */
};

/* Mount (or find mounted) the filesystem TAG=VALUE of loc names, under base
 * (read-write with rw). Writes the file's full path into path. */
int tab_mount_location(const struct qcowtab_location *loc, const char *base, bool rw, struct held_mount *m,
		       char *path, size_t size);
/* Unmount a filesystem qcowsetup mounted, if nothing uses it any more
 * (wait_busy: a few more chances while loop devices let go). */
void tab_release_mount(struct held_mount *m, bool wait_busy);
/* The same for the mount under base that loc's TAG=VALUE got, if any. */
void tab_release_location(const struct qcowtab_location *loc, const char *base);

/* Wait up to timeout seconds (keyfile-timeout=) for the key file loc
 * names: its path to exist, or its TAG=VALUE device to appear. 0, or
 * -ETIMEDOUT. */
int tab_wait_key_location(const struct qcowtab_location *loc, unsigned int timeout);

/* ---- passphrases (tab_keys.c) ---- */

enum ask_how {
	ASK_TTY,	/* standard input is a terminal */
	ASK_AGENT,	/* systemd-ask-password (systemd runs, nothing on stdin) */
	ASK_STDIN,	/* a pipe or file: one line */
	ASK_NOWHERE,
};

/* One open --tab run. */
struct tab_run {
	struct qcowtab tab;
	struct passphrase *shared;	/* opened a same-passphrase entry */
	const char *group_names;	/* "root, data": the same-passphrase entries asked for */
};

/* Where the passphrases of one entry come from, in turn: its systemd
 * credential (credential=, in $CREDENTIALS_DIRECTORY), its key file, the
 * passphrase that opened an earlier same-passphrase entry, then the
 * questions (tries= of them; one on a pipe; none with headless=). */
enum key_step {
	KEY_CREDENTIAL = 0,
	KEY_FILE,
	KEY_SHARED,
	KEY_ASK,
};

struct entry_keys {
	struct tab_run *t;
	const struct qcowtab_entry *e;
	const char *key_file;		/* NULL: none */
	enum key_step step;
	enum ask_how how;
	const char *served;		/* the key source handed out last ("the key file"), NULL: a question */
	unsigned int asked;		/* questions so far */
	bool asked_last;		/* the last passphrase handed out was asked for */
	struct passphrase *last;	/* a copy of it, for same-passphrase */
};

/* mapping_ask_fn (opaque: struct entry_keys): the entry's next passphrase. */
int tab_entry_passphrase(void *opaque, const char *image, unsigned int attempt, struct passphrase **pp);

/* Commands */
int cmd_open_tab(int argc, char **argv);
int cmd_close_tab(int argc, char **argv);

#endif
