/* qcowsetup: map QEMU qcow2/qcow images as device-mapper devices. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmd_keys.h"
#include "log.h"
#include "qcowsetup.h"

struct tools_opts opt = {
	.tries = 3,
	.max_targets = 65536,
};

static const struct command commands[] = {
	{ "open", cmd_open, 2, 2, "IMAGE NAME", "map IMAGE as /dev/mapper/NAME, read-write unless --readonly;\n"
	  "                               open --tab [NAME...]: the entries of /etc/qcowtab", cmd_open_tab },
	{ "close", cmd_close, 1, 1, "NAME", "remove the mapping NAME and everything under it;\n"
	  "                               close --tab [NAME...]: the entries of /etc/qcowtab", cmd_close_tab },
	{ "status", cmd_status, 1, 1, "NAME", "show the mapping NAME: image files, cipher, devices" },
	{ "list", cmd_list, 0, 0, "", "list qcowsetup mappings" },
	{ "reattach", cmd_reattach, 1, 1, "NAME", "start a new slow-path daemon for NAME after its daemon died" },
	{ "format", cmd_format, 1, 2, "IMAGE [SIZE]", "create a LUKS-encrypted qcow2 image" },
	{ "add-key", cmd_add_key, 1, 2, "IMAGE [NEW_KEY_FILE]", "add a passphrase to a free LUKS key slot" },
	{ "remove-key", cmd_remove_key, 1, 2, "IMAGE [KEY_FILE]", "remove the key slot a passphrase opens (--key-slot N: slot N)" },
	{ "change-key", cmd_change_key, 1, 2, "IMAGE [NEW_KEY_FILE]", "replace a passphrase" },
	{ "dump-keys", cmd_dump_keys, 1, 1, "IMAGE", "show the LUKS header and its key slots" },
	{ "convert", cmd_convert, 1, 2, "SRC [DST]", "convert legacy AES, unencrypted qcow2/qcow or raw to LUKS qcow2 (--in-place: replace SRC)" },
	{ "info", cmd_info, 1, 1, "IMAGE", "show the image's format, features, encryption, backing chain and snapshots" },
	{ "map", cmd_map, 1, 1, "IMAGE", "show how guest space maps onto the image files (as qemu-img map)" },
	{ "table", cmd_table, 2, 2, "IMAGE NAME", "print the device-mapper tables `open` would load (keys as keyring references)" },
	{ "check", cmd_check, 1, 1, "IMAGE", "check refcount consistency (as qemu-img check)" },
	{ "probe", cmd_probe, 1, 1, "DEVICE", "is there a qcow2 image on DEVICE (--udev: ID_QCOW2_* lines for udev)" },
};

enum {
	OPT_JSON = 0x100,
	OPT_KEYFILE_OFFSET,
	OPT_KEYFILE_SIZE,
	OPT_SKIP_KEY_CHECK,
	OPT_ALLOW_DISCARDS,
	OPT_SNAPSHOT,
	OPT_FORMAT,
	OPT_MAX_TARGETS,
	OPT_DEBUG,
	OPT_DEFERRED,
	OPT_DEBUG_FAIL_STEP,
	OPT_TAB,
	OPT_QCOWTAB,
	OPT_UDEV,
	OPT_TRUST_NAMES,
	OPT_DATA_FILE,
};

static const struct option long_options[] = {
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ "verbose", no_argument, NULL, 'v' },
	{ "debug", no_argument, NULL, OPT_DEBUG },
	{ "batch-mode", no_argument, NULL, 'q' },
	{ "json", no_argument, NULL, OPT_JSON },
	{ "readonly", no_argument, NULL, 'r' },
	{ "allow-discards", no_argument, NULL, OPT_ALLOW_DISCARDS },
	{ "key-file", required_argument, NULL, 'd' },
	{ "keyfile-offset", required_argument, NULL, OPT_KEYFILE_OFFSET },
	{ "keyfile-size", required_argument, NULL, OPT_KEYFILE_SIZE },
	{ "tries", required_argument, NULL, 'T' },
	{ "skip-key-check", no_argument, NULL, OPT_SKIP_KEY_CHECK },
	{ "snapshot", required_argument, NULL, OPT_SNAPSHOT },
	{ "format", required_argument, NULL, OPT_FORMAT },
	{ "max-targets", required_argument, NULL, OPT_MAX_TARGETS },
	{ "deferred", no_argument, NULL, OPT_DEFERRED },
	{ "debug-fail-step", required_argument, NULL, OPT_DEBUG_FAIL_STEP },
	{ "tab", no_argument, NULL, OPT_TAB },
	{ "qcowtab", required_argument, NULL, OPT_QCOWTAB },
	{ "udev", no_argument, NULL, OPT_UDEV },
	{ "trust-names", no_argument, NULL, OPT_TRUST_NAMES },
	{ "data-file", required_argument, NULL, OPT_DATA_FILE },
	KEYS_LONG_OPTIONS,
	{ NULL, 0, NULL, 0 },
};

int tools_exit_code(int r)
{
	if (r >= 0)
		return EXIT_OK;
	switch (-r) {
	case EINVAL:
		return EXIT_PARAMS;
	case EPERM:
	case EACCES:
	case EKEYREJECTED:
		return EXIT_PERM;
	case ENOMEM:
		return EXIT_NOMEM;
	case EBUSY:
	case EEXIST:
	case EAGAIN:
		return EXIT_BUSY;
	default:
		return EXIT_DEVICE;
	}
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: qcowsetup [OPTION...] <command> <arguments>\n\nCommands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		char synopsis[64];

		snprintf(synopsis, sizeof(synopsis), "%s %s", commands[i].name, commands[i].args_help);
		if (strlen(synopsis) > 28)
			fprintf(f, "  %s\n  %-28s %s\n", synopsis, "", commands[i].help);
		else
			fprintf(f, "  %-28s %s\n", synopsis, commands[i].help);
	}
	fprintf(f, "\nOptions:\n"
		"  -v, --verbose             more messages\n"
		"      --debug               debug messages (never shows keys)\n"
		"  -q, --batch-mode          no questions\n"
		"      --json                machine-readable output (info, map, check, status, list, dump-keys)\n"
		"  -r, --readonly            map read-only\n"
		"      --deferred            close: remove on the last close of the device\n"
		"      --allow-discards      pass discards through (read-write: punches holes)\n"
		"      --max-targets N       open: targets per dm table before segments (default 65536)\n"
		"  -d, --key-file FILE       read the passphrase from FILE (- = stdin)\n"
		"      --keyfile-offset N    skip N bytes of the key file\n"
		"      --keyfile-size N      read at most N bytes of the key file\n"
		"  -T, --tries N             passphrase attempts on a terminal (default 3)\n"
		"      --skip-key-check      accept a legacy AES key that fails the plausibility check\n"
		"      --snapshot ID|NAME    map an internal snapshot (read-only)\n"
		"      --format FMT          the image's format (qcow2, qcow, raw) instead of probing;\n"
		"                            a raw image maps read-write only with --format raw\n"
		"      --trust-names         follow the backing and data file names inside images to\n"
		"                            block devices, other folders and other owners' files\n"
		"      --backing-file FILE   open, table, info, map: FILE is the image's backing file\n"
		"      --data-file FILE      FILE is the image's external data file\n"
		"      --tab                 open, close: the entries of qcowtab(5)\n"
		"      --qcowtab FILE        read FILE instead of /etc/qcowtab\n"
		"      --udev                probe: KEY=VALUE lines for udev's IMPORT{program}\n"
		"  -h, --help                this help\n"
		"  -V, --version             version\n"
		"\nExit codes: 0 success, 1 wrong parameters, 2 no permission or bad passphrase,\n"
		"3 out of memory, 4 wrong, missing or malformed image or device, 5 device busy or exists.\n");
	keys_usage(f);
}

static int parse_u64(const char *s, const char *what, uint64_t *v)
{
	char *end;

	errno = 0;
	*v = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-') {
		log_err("Invalid number for %s: %s", what, s);
		return -EINVAL;
	}
	return 0;
}

int main(int argc, char **argv)
{
	const struct command *cmd = NULL;
	uint64_t v;
	int c, r, nargs;

	/* GNU getopt permutes: options may come before or after the command. */
	while ((c = getopt_long(argc, argv, "hVvqrd:T:", long_options, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage(stdout);
			return EXIT_OK;
		case 'V':
			printf("qcowsetup %s\n", PACKAGE_VERSION);
			return EXIT_OK;
		case 'v':
			opt.verbose = true;
			if (qs_log_get_level() < QS_LOG_VERBOSE)
				qs_log_set_level(QS_LOG_VERBOSE);
			break;
		case OPT_DEBUG:
			opt.debug = opt.verbose = true;
			qs_log_set_level(QS_LOG_DEBUG);
			break;
		case 'q':
			opt.batch_mode = true;
			break;
		case OPT_JSON:
			opt.json = true;
			break;
		case 'r':
			opt.readonly = true;
			break;
		case OPT_ALLOW_DISCARDS:
			opt.allow_discards = true;
			break;
		case 'd':
			opt.key_file = optarg;
			break;
		case OPT_KEYFILE_OFFSET:
			if (parse_u64(optarg, "--keyfile-offset", &opt.keyfile_offset))
				return EXIT_PARAMS;
			break;
		case OPT_KEYFILE_SIZE:
			if (parse_u64(optarg, "--keyfile-size", &opt.keyfile_size))
				return EXIT_PARAMS;
			break;
		case 'T':
			if (parse_u64(optarg, "--tries", &v) || v < 1 || v > 1000) {
				log_err("--tries takes a number from 1 to 1000.");
				return EXIT_PARAMS;
			}
			opt.tries = (int)v;
			break;
		case OPT_SKIP_KEY_CHECK:
			opt.skip_key_check = true;
			break;
		case OPT_SNAPSHOT:
			opt.snapshot = optarg;
			break;
		case OPT_FORMAT:
			opt.format = optarg;
			break;
		case OPT_MAX_TARGETS:
			if (parse_u64(optarg, "--max-targets", &opt.max_targets) ||
			    opt.max_targets < 2 || opt.max_targets > 1048576) {
				log_err("--max-targets takes a number from 2 to 1048576.");
				return EXIT_PARAMS;
			}
			break;
		case OPT_DEFERRED:
			opt.deferred = true;
			break;
		case OPT_TAB:
			opt.tab = true;
			break;
		case OPT_QCOWTAB:
			opt.qcowtab = optarg;
			break;
		case OPT_UDEV:
			opt.udev = true;
			break;
		case OPT_TRUST_NAMES:
			opt.trust_names = true;
			break;
		case OPT_DATA_FILE:
			opt.data_file = optarg;
			break;
		case OPT_DEBUG_FAIL_STEP:
			if (parse_u64(optarg, "--debug-fail-step", &v) || v > 10000)
				return EXIT_PARAMS;
			opt.debug_fail_step = (int)v;
			break;
		default:
			r = keys_parse_option(c, optarg);
			if (r > 0)
				break;
			if (r == 0)
				usage(stderr);
			return EXIT_PARAMS;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return EXIT_PARAMS;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(argv[optind], commands[i].name))
			cmd = &commands[i];
	if (!cmd) {
		log_err("Unknown command %s (see qcowsetup --help).", argv[optind]);
		return EXIT_PARAMS;
	}
	nargs = argc - optind - 1;
	if (opt.tab) {
		if (!cmd->run_tab) {
			log_err("--tab goes with open and close only.");
			return EXIT_PARAMS;
		}
		return tools_exit_code(cmd->run_tab(nargs, argv + optind + 1));
	}
	if (nargs < cmd->min_args || nargs > cmd->max_args) {
		log_err("Usage: qcowsetup %s %s", cmd->name, cmd->args_help);
		return EXIT_PARAMS;
	}
	r = cmd->run(nargs, argv + optind + 1);
	return tools_exit_code(r);
}
