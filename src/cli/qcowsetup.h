/* The qcowsetup command: shared options, exit codes, helpers. */
#ifndef QS_CLI_H
#define QS_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "image.h"
#include "io.h"

/* Exit codes, as cryptsetup's */
#define EXIT_OK		0
#define EXIT_PARAMS	1	/* wrong parameters */
#define EXIT_PERM	2	/* no permission or bad passphrase */
#define EXIT_NOMEM	3	/* out of memory */
#define EXIT_DEVICE	4	/* wrong device or image: missing, malformed, unsupported */
#define EXIT_BUSY	5	/* device busy or already exists */

struct tools_opts {
	bool json;
	bool verbose;
	bool debug;
	bool batch_mode;
	bool readonly;
	bool allow_discards;
	bool skip_key_check;
	const char *key_file;
	uint64_t keyfile_offset;
	uint64_t keyfile_size;
	int tries;
	const char *snapshot;
	const char *format;	/* --format: force the top image's format */
	uint64_t max_targets;
	bool deferred;
	int debug_fail_step;	/* hidden: fail step K of open (tests) */
	bool tab;		/* --tab: open/close the entries of qcowtab */
	const char *qcowtab;	/* --qcowtab FILE instead of /etc/qcowtab */
	bool udev;		/* probe --udev: KEY=VALUE lines for udev */
	bool trust_names;	/* follow names inside images anywhere (SECURITY) */
	const char *data_file;		/* the top image's data file, instead of its name */
};

extern struct tools_opts opt;

struct command {
	const char *name;
	int (*run)(int argc, char **argv);	/* positional args only; returns -errno or 0 */
	int min_args;
	int max_args;
	const char *args_help;
	const char *help;
	int (*run_tab)(int argc, char **argv);	/* with --tab: [NAME...] */
};

/* -errno -> exit code */
int tools_exit_code(int r);

/* Opening the images named on the command line under the trust rules and
 * --format, --snapshot, --trust-names, --backing-file (kopt), --data-file
 * (fileio.c; lib/fileio.h has img_io over descriptors). */
#define TOOLS_OPEN_NO_BACKING	(1U << 0)	/* not the backing chain */
#define TOOLS_OPEN_WRITE	(1U << 1)	/* the top image and its data file read-write */
int tools_open_image(const char *path, unsigned int flags, struct image **img);
void tools_close_image(struct image *img);

/* Commands */
int cmd_info(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_table(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_open(int argc, char **argv);
int cmd_close(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_reattach(int argc, char **argv);
int cmd_open_tab(int argc, char **argv);	/* cmd_tab.c */
int cmd_close_tab(int argc, char **argv);
int cmd_probe(int argc, char **argv);		/* cmd_probe.c */

#endif
