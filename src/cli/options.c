/* The options of qcowsetup, as cryptsetup's arg list: each named once with
 * its letter, its argument, its help and the commands that take it
 * (options.h). Numbers go through parse_u64 (lib/util.c). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stddef.h>
#include <string.h>

#include "keys.h"
#include "log.h"
#include "options.h"
#include "util.h"

struct tools_opts opt = {
	.tries = 3,
	.max_targets = 65536,
	.key_slot = -1,
};

enum arg_kind {
	ARG_NONE,	/* a bool set to true */
	ARG_STRING,
	ARG_NUMBER,	/* decimal digits */
	ARG_SIZE,	/* with K, M, G, T */
};

enum number_rule {
	ANY_NUMBER,
	MULTIPLE_OF_8,
	POWER_OF_2,
};

struct option_spec {
	const char *name;
	char letter;		/* 0: none */
	unsigned int cmds;	/* 1 << enum tools_cmd for each command taking it */
	enum arg_kind kind;
	const char *arg;	/* the value's name in the help */
	size_t offset;		/* its field in struct tools_opts */
	size_t size;
	uint64_t min, max;	/* numbers; max 0: the field's limit */
	enum number_rule rule;
	const char *help;	/* NULL: hidden */
};

#define CMD(c)		(1U << CMD_##c)
#define ALL		((1U << CMD_COUNT) - 1)
#define KEY_READERS	(CMD(OPEN) | CMD(RESUME) | CMD(REFRESH) | CMD(SNAPSHOT) | CMD(FORMAT) | CMD(ADD_KEY) | \
			 CMD(REMOVE_KEY) | CMD(CHANGE_KEY) | CMD(CONVERT) | CMD(BIND) | CMD(UNBIND) | CMD(RESIZE) | CMD(COMMIT))
#define NEW_KEYS	(CMD(ADD_KEY) | CMD(CHANGE_KEY) | CMD(CONVERT) | CMD(SNAPSHOT))
#define NEW_SLOTS	(NEW_KEYS | CMD(BIND))
#define IMAGE_READERS	(CMD(OPEN) | CMD(INFO) | CMD(MAP) | CMD(TABLE))
#define FIELD(f)	.offset = offsetof(struct tools_opts, f), .size = sizeof(((struct tools_opts *)0)->f)
#define FLAG(f)		.kind = ARG_NONE, FIELD(f)
#define STRING(f, a)	.kind = ARG_STRING, .arg = a, FIELD(f)
#define NUMBER(f, a)	.kind = ARG_NUMBER, .arg = a, FIELD(f)
#define SIZE(f, a)	.kind = ARG_SIZE, .arg = a, FIELD(f)

static const struct option_spec options[] = {
	{ "verbose", 'v', ALL, FLAG(verbose), .help = "more messages" },
	{ "debug", 0, ALL, FLAG(debug), .help = "debug messages (never shows keys)" },
	{ "batch-mode", 'q', ALL, FLAG(batch_mode), .help = "no questions" },
	{ "json", 0, CMD(INFO) | CMD(MAP) | CMD(CHECK) | CMD(STATUS) | CMD(LIST) | CMD(DUMP_KEYS) | CMD(TEST_BINDINGS),
	  FLAG(json),
	  .help = "machine-readable output" },
	{ "readonly", 'r', CMD(OPEN), FLAG(readonly), .help = "map read-only" },
	{ "deferred", 0, CMD(CLOSE) | CMD(CLOSE_TAB), FLAG(deferred),
	  .help = "remove on the last close of the device" },
	{ "allow-discards", 0, CMD(OPEN) | CMD(TABLE) | CMD(REFRESH), FLAG(allow_discards),
	  .help = "pass discards through (read-write: punches holes)" },
	{ "no-allow-discards", 0, CMD(REFRESH), FLAG(no_allow_discards), .help = "refresh: discards no longer pass" },
	{ "max-targets", 0, CMD(OPEN) | CMD(OPEN_TAB) | CMD(TABLE), NUMBER(max_targets, "N"), .min = 2, .max = 1048576,
	  .help = "targets per dm table before segments (default 65536)" },
	{ "nbd-connections", 0, CMD(OPEN) | CMD(OPEN_TAB), NUMBER(nbd_connections, "N"), .min = 1, .max = 16,
	  .help = "connections of the slow path's NBD device (default 1)" },
	{ "key-file", 'd', KEY_READERS, STRING(key_file, "FILE"),
	  .help = "read the passphrase from FILE (- = stdin)" },
	{ "keyfile-offset", 0, KEY_READERS, SIZE(keyfile_offset, "N"), .help = "skip N bytes of the key file" },
	{ "keyfile-size", 0, KEY_READERS, SIZE(keyfile_size, "N"), .help = "read at most N bytes of the key file" },
	{ "tries", 'T', CMD(OPEN) | CMD(RESUME) | CMD(REFRESH) | CMD(SNAPSHOT) | CMD(COMMIT) | CMD(ADD_KEY) |
	  CMD(REMOVE_KEY) | CMD(CHANGE_KEY) | CMD(CONVERT) | CMD(BIND) | CMD(UNBIND) | CMD(RESIZE),
	  NUMBER(tries, "N"), .min = 1, .max = 1000, .help = "passphrase attempts on a terminal (default 3)" },
	{ "clevis", 0, CMD(OPEN), FLAG(clevis),
	  .help = "try the image's clevis bindings first (qcowtab's clevis), then the key file or the question" },
	{ "token-only", 0, CMD(OPEN), FLAG(token_only),
	  .help = "unlock by the clevis bindings only: no key file, no question (cryptsetup's --token-only)" },
	{ "token-timeout", 0, CMD(OPEN), NUMBER(token_timeout, "SECONDS"), .min = 1, .max = 86400,
	  .help = "how long one binding may take (clevis decrypt), default 30" },
	{ "skip-key-check", 0, CMD(OPEN) | CMD(RESUME) | CMD(REFRESH) | CMD(CONVERT), FLAG(skip_key_check),
	  .help = "accept a legacy AES key that fails the plausibility check" },
	{ "snapshot", 0, IMAGE_READERS | CMD(CONVERT), STRING(snapshot, "ID|NAME"),
	  .help = "use an internal snapshot (read-only)" },
	{ "format", 0, IMAGE_READERS | CMD(CHECK) | CMD(CONVERT), STRING(format, "FMT"),
	  .help = "the image's format (qcow2, qcow, raw) instead of probing;\n"
		  "a raw image maps read-write only with --format raw" },
	{ "trust-names", 0, IMAGE_READERS | CMD(CHECK) | CMD(CONVERT), FLAG(trust_names),
	  .help = "follow the backing and data file names inside images to\n"
		  "block devices, other folders and other owners' files" },
	{ "backing-file", 0, IMAGE_READERS | CMD(FORMAT), STRING(backing_file, "FILE"),
	  .help = "FILE is the image's backing file (format: the new image's)" },
	{ "data-file", 0, IMAGE_READERS | CMD(CHECK), STRING(data_file, "FILE"),
	  .help = "FILE is the image's external data file" },
	/* open and close list it: it selects their --tab form */
	{ "tab", 0, CMD(OPEN) | CMD(OPEN_TAB) | CMD(CLOSE) | CMD(CLOSE_TAB), FLAG(tab),
	  .help = "open, close: the entries of qcowtab(5)" },
	{ "qcowtab", 0, CMD(OPEN_TAB) | CMD(CLOSE_TAB) | CMD(PROBE), STRING(qcowtab, "FILE"),
	  .help = "read FILE instead of /etc/qcowtab" },
	{ "udev", 0, CMD(PROBE), FLAG(udev), .help = "KEY=VALUE lines for udev's IMPORT{program}" },
	{ "cipher", 0, CMD(FORMAT) | CMD(CONVERT), STRING(cipher, "SPEC"),
	  .help = "cipher of a new LUKS header (default aes-xts-plain64)" },
	{ "key-size", 0, CMD(FORMAT) | CMD(CONVERT), NUMBER(key_size, "BITS"), .min = 8, .max = 2048,
	  .rule = MULTIPLE_OF_8, .help = "volume key size (default 512 for xts, 256 otherwise)" },
	{ "hash", 0, CMD(FORMAT) | CMD(CONVERT), STRING(hash, "HASH"),
	  .help = "PBKDF2 hash of a new header (default sha256)" },
	{ "iter-time", 0, CMD(FORMAT) | NEW_SLOTS, NUMBER(iter_time, "MS"), .min = 1, .max = 3600000,
	  .help = "PBKDF2 time of new key slots (default 2000)" },
	{ "pbkdf-force-iterations", 0, CMD(FORMAT) | NEW_SLOTS, NUMBER(pbkdf_iterations, "N"), .min = 1000,
	  .help = "PBKDF2 iterations of new key slots, no benchmark" },
	{ "cluster-size", 0, CMD(FORMAT) | CMD(CONVERT), SIZE(cluster_size, "SIZE"), .min = 512, .max = 2U << 20,
	  .rule = POWER_OF_2, .help = "cluster size of a new image (default 64K)" },
	{ "backing-format", 0, CMD(FORMAT), STRING(backing_format, "FMT"),
	  .help = "the format of --backing-file (default: probed)" },
	{ "new-key-file", 0, NEW_KEYS, STRING(new_key_file, "FILE"), .help = "the new passphrase (- = stdin)" },
	{ "new-keyfile-offset", 0, NEW_KEYS, SIZE(new_keyfile_offset, "N"), .help = "as --keyfile-offset" },
	{ "new-keyfile-size", 0, NEW_KEYS, SIZE(new_keyfile_size, "N"), .help = "as --keyfile-size" },
	{ "key-slot", 0, CMD(ADD_KEY) | CMD(REMOVE_KEY) | CMD(BIND), NUMBER(key_slot, "N"), .max = LUKS_NUM_SLOTS - 1,
	  .help = "key slot to add, or to remove (as luksKillSlot)" },
	{ "progress", 0, CMD(CONVERT) | CMD(COMMIT), FLAG(progress), .help = "progress lines even when stderr is not a terminal" },
	{ "quiet", 0, KEY_READERS | CMD(OPEN_TAB), FLAG(quiet),
	  .help = "no progress bar, no warning about a key file others can read" },
	{ "in-place", 0, CMD(CONVERT), FLAG(in_place), .help = "replace SRC, after verifying the new image" },
	{ "flatten", 0, CMD(CONVERT), FLAG(flatten), .help = "copy the backing chain's data, no backing file" },
	{ "force", 0, CMD(FORMAT) | CMD(REMOVE_KEY) | CMD(CONVERT) | CMD(UNBIND), FLAG(force),
	  .help = "overwrite an existing destination; remove the last key slot" },
	{ "shrink", 0, CMD(RESIZE), FLAG(shrink),
	  .help = "allow a smaller size (only past unallocated space)" },
	{ "debug-fail-step", 0, CMD(OPEN) | CMD(RESIZE) | CMD(SUSPEND) | CMD(RESUME) | CMD(REFRESH) | CMD(SNAPSHOT) |
	  CMD(COMMIT),
	  NUMBER(debug_fail_step, "K"), .max = 10000 },
	{ "help", 'h', ALL, FLAG(help), .help = "this help; after a command, the command's" },
	{ "version", 'V', ALL, FLAG(version), .help = "version" },
};

#define NOPTIONS ARRAY_SIZE(options)
#define LONG_ONLY 0x100	/* getopt's value of options[i] without a letter: LONG_ONLY + i */

static bool seen[NOPTIONS];

static const char *const rule_text[] = {
	[ANY_NUMBER] = "a number",
	[MULTIPLE_OF_8] = "a multiple of 8",
	[POWER_OF_2] = "a power of two",
};

static int store(const struct option_spec *o, const char *arg)
{
	void *field = (char *)&opt + o->offset;
	uint64_t v, max = o->max ? o->max : o->size == sizeof(uint32_t) ? UINT32_MAX : UINT64_MAX;

	switch (o->kind) {
	case ARG_NONE:
		*(bool *)field = true;
		return 0;
	case ARG_STRING:
		*(const char **)field = arg;
		return 0;
	default:
		break;
	}
	if (parse_u64(arg, o->kind == ARG_SIZE ? PARSE_SIZE : 0, &v) < 0) {
		log_err("qcowsetup: invalid %s for --%s: %s%s", o->kind == ARG_SIZE ? "size" : "number", o->name, arg,
			o->kind == ARG_SIZE ? " (a number of bytes, or with K, M, G, T)." : ".");
		return -EINVAL;
	}
	if (v < o->min || v > max || (o->rule == MULTIPLE_OF_8 && v % 8) || (o->rule == POWER_OF_2 && (v & (v - 1)))) {
		log_err("qcowsetup: --%s takes %s from %" PRIu64 " to %" PRIu64 ".", o->name, rule_text[o->rule],
			o->min, max);
		return -EINVAL;
	}
	/* the int fields (tries, key_slot, debug_fail_step) are 32 bits */
	if (o->size == sizeof(uint32_t))
		*(uint32_t *)field = (uint32_t)v;
	else
		*(uint64_t *)field = v;
	return 0;
}

int options_parse(int argc, char **argv)
{
	struct option longopts[NOPTIONS + 1];
	char shortopts[2 * NOPTIONS + 1];
	size_t n = 0;
	int c;

	for (size_t i = 0; i < NOPTIONS; i++) {
		const struct option_spec *o = &options[i];

		longopts[i] = (struct option){ o->name, o->kind == ARG_NONE ? no_argument : required_argument, NULL,
					       o->letter ? o->letter : (int)(LONG_ONLY + i) };
		if (o->letter) {
			shortopts[n++] = o->letter;
			if (o->kind != ARG_NONE)
				shortopts[n++] = ':';
		}
	}
	longopts[NOPTIONS] = (struct option){ 0 };
	shortopts[n] = '\0';
	/* GNU getopt permutes: options may come before or after the command;
	 * an unknown option or a missing value gets getopt's one line */
	while ((c = getopt_long(argc, argv, shortopts, longopts, NULL)) != -1) {
		size_t i = c >= LONG_ONLY ? (size_t)(c - LONG_ONLY) : 0;

		while (c < LONG_ONLY && i < NOPTIONS && options[i].letter != c)
			i++;
		if (i >= NOPTIONS || store(&options[i], optarg) < 0)
			return -EINVAL;
		seen[i] = true;
	}
	if (opt.debug) {
		opt.verbose = true;
		qs_log_set_level(QS_LOG_DEBUG);
	} else if (opt.verbose) {
		qs_log_set_level(QS_LOG_VERBOSE);
	}
	return 0;
}

int options_check(const struct command *cmd)
{
	for (size_t i = 0; i < NOPTIONS; i++) {
		if (!seen[i] || (options[i].cmds & (1U << cmd->id)))
			continue;
		log_err("qcowsetup: %s%s does not take --%s (see qcowsetup %s%s --help).", cmd->name,
			cmd->tab ? " --tab" : "", options[i].name, cmd->name, cmd->tab ? " --tab" : "");
		return -EINVAL;
	}
	return 0;
}

#define HELP_COLUMN 28

void options_usage(FILE *f, const struct command *cmd)
{
	for (size_t i = 0; i < NOPTIONS; i++) {
		const struct option_spec *o = &options[i];
		int n;

		if (!o->help || (cmd && !(o->cmds & (1U << cmd->id))))
			continue;
		if (o->letter)
			n = fprintf(f, "  -%c, --%s", o->letter, o->name);
		else
			n = fprintf(f, "      --%s", o->name);
		if (o->arg)
			n += fprintf(f, " %s", o->arg);
		if (n >= HELP_COLUMN - 1) {
			fputc('\n', f);
			n = 0;
		}
		fprintf(f, "%*s", HELP_COLUMN - n, "");
		for (const char *h = o->help; *h; h++) {
			fputc(*h, f);
			if (*h == '\n')
				fprintf(f, "%*s", HELP_COLUMN, "");
		}
		fputc('\n', f);
	}
}
