/* The command line as data: every option once (long name, short letter,
 * argument, help, the commands that take it), the one struct of their
 * values, and the command table's shape (options.c; the commands are listed
 * in qcowsetup.c). An option a command does not take is a usage error. */
#ifndef QS_CLI_OPTIONS_H
#define QS_CLI_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* The commands, as the bits of an option's command set. open --tab and
 * close --tab are commands of their own: they take other options. */
enum tools_cmd {
	CMD_OPEN,
	CMD_OPEN_TAB,
	CMD_CLOSE,
	CMD_CLOSE_TAB,
	CMD_STATUS,
	CMD_LIST,
	CMD_REATTACH,
	CMD_RESIZE,
	CMD_SUSPEND,
	CMD_RESUME,
	CMD_REFRESH,
	CMD_SNAPSHOT,
	CMD_FORMAT,
	CMD_ADD_KEY,
	CMD_REMOVE_KEY,
	CMD_CHANGE_KEY,
	CMD_DUMP_KEYS,
	CMD_CONVERT,
	CMD_INFO,
	CMD_MAP,
	CMD_TABLE,
	CMD_CHECK,
	CMD_PROBE,
	CMD_BIND,
	CMD_UNBIND,
	CMD_TEST_BINDINGS,
	CMD_COMMIT,
	CMD_COUNT
};

struct command {
	const char *name;
	enum tools_cmd id;
	bool tab;		/* the --tab form of name */
	int (*run)(int argc, char **argv);	/* positional args only; 0 or -errno
						 * (or, with exit_help, its own exit code) */
	int min_args;
	int max_args;
	const char *args_help;
	const char *help;
	const char *exit_help;	/* the command's own exit codes, when it has them */
};

/* The values of the options. */
struct tools_opts {
	bool help;
	bool version;
	bool json;
	bool verbose;
	bool debug;
	bool batch_mode;
	bool readonly;
	bool allow_discards;
	bool no_allow_discards;		/* refresh: discards off */
	bool skip_key_check;
	bool clevis;			/* open: the image's clevis bindings first */
	bool token_only;		/* open: the bindings only, no key file or question */
	uint32_t token_timeout;		/* open: seconds per clevis decrypt; 0 = its default */
	const char *key_file;
	uint64_t keyfile_offset;
	uint64_t keyfile_size;
	int tries;
	const char *snapshot;
	const char *format;		/* --format: force the top image's format */
	uint64_t max_targets;
	uint64_t nbd_connections;	/* 0: the default */
	bool deferred;
	int debug_fail_step;		/* hidden: fail step K of open, resize, suspend,
					 * resume, refresh (tests) */
	bool shrink;			/* resize: a smaller size is allowed */
	bool tab;			/* --tab: open/close the entries of qcowtab */
	const char *qcowtab;		/* --qcowtab FILE instead of /etc/qcowtab */
	bool udev;			/* probe --udev: KEY=VALUE lines for udev */
	bool trust_names;		/* follow names inside images anywhere (SECURITY) */
	const char *data_file;		/* the top image's data file, instead of its name */
	const char *backing_file;	/* the top image's backing file (format: the new image's) */
	/* format, the key slot commands, convert */
	const char *cipher;		/* "aes-xts-plain64" */
	uint32_t key_size;		/* bits; 0 = 512 for xts, 256 otherwise */
	const char *hash;		/* "sha256" */
	uint32_t iter_time;		/* ms */
	uint32_t pbkdf_iterations;	/* --pbkdf-force-iterations */
	uint64_t cluster_size;		/* bytes; 0 = default */
	const char *backing_format;
	const char *new_key_file;
	uint64_t new_keyfile_offset;
	uint64_t new_keyfile_size;
	int key_slot;			/* -1 = any */
	bool progress;
	bool quiet;			/* no progress, no key file warning */
	bool in_place;			/* convert: replace SRC */
	bool flatten;			/* convert: drop the backing file */
	bool force;			/* overwrite a destination; remove the last key */
};

extern struct tools_opts opt;

/* Read the options of argv into opt (GNU getopt: before and after the
 * command); optind is then the command's index. A bad value or an unknown
 * option is logged: -EINVAL. */
int options_parse(int argc, char **argv);

/* -EINVAL (logged, one line) when an option given is not one cmd takes. */
int options_check(const struct command *cmd);

/* The help lines of the options cmd takes (all of them for NULL). */
void options_usage(FILE *f, const struct command *cmd);

#endif
