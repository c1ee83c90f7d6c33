/* qcowsetup: map QEMU qcow2/qcow images as device-mapper devices. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "cmd_keys.h"
#include "log.h"
#include "qcowsetup.h"
#include "util.h"

static const struct command commands[] = {
	{ "open", CMD_OPEN, false, cmd_open, 2, 2, "IMAGE NAME",
	  "map IMAGE as /dev/mapper/NAME, read-write unless --readonly" },
	{ "open", CMD_OPEN_TAB, true, cmd_open_tab, 0, INT_MAX, "--tab [NAME...]",
	  "map the entries of /etc/qcowtab (those named, or all but noauto)" },
	{ "close", CMD_CLOSE, false, cmd_close, 1, 1, "NAME", "remove the mapping NAME and everything under it" },
	{ "close", CMD_CLOSE_TAB, true, cmd_close_tab, 0, INT_MAX, "--tab [NAME...]",
	  "remove the mappings of the entries of /etc/qcowtab" },
	{ "status", CMD_STATUS, false, cmd_status, 1, 1, "NAME", "show the mapping NAME: image files, cipher, devices" },
	{ "list", CMD_LIST, false, cmd_list, 0, 0, "", "list qcowsetup mappings" },
	{ "reattach", CMD_REATTACH, false, cmd_reattach, 1, 1, "NAME",
	  "start a new slow-path daemon for NAME after its daemon died" },
	{ "resize", CMD_RESIZE, false, cmd_resize, 2, 2, "NAME [+|-]SIZE",
	  "grow the mapping NAME and its image while mapped (smaller: --shrink)" },
	{ "suspend", CMD_SUSPEND, false, cmd_suspend, 1, 1, "NAME",
	  "hold the I/O of NAME (writes flushed) and wipe its volume keys from the kernel" },
	{ "resume", CMD_RESUME, false, cmd_resume, 1, 1, "NAME",
	  "check the passphrase, give the keys back and let the I/O of NAME go on" },
	{ "refresh", CMD_REFRESH, false, cmd_refresh, 1, 1, "NAME",
	  "reload NAME's tables with discards switched (--allow-discards / --no-allow-discards)" },
	{ "commit", CMD_COMMIT, false, cmd_commit, 1, 1, "NAME",
	  "merge the overlay of NAME into its backing image while mapped; NAME then maps that image" },
	{ "snapshot", CMD_SNAPSHOT, false, cmd_snapshot, 2, 2, "NAME OVERLAY",
	  "live external snapshot: NAME moves onto a new OVERLAY backed by its image" },
	{ "format", CMD_FORMAT, false, cmd_format, 1, 2, "IMAGE [SIZE]", "create a LUKS-encrypted qcow2 image" },
	{ "add-key", CMD_ADD_KEY, false, cmd_add_key, 1, 2, "IMAGE [NEW_KEY_FILE]",
	  "add a passphrase to a free LUKS key slot" },
	{ "remove-key", CMD_REMOVE_KEY, false, cmd_remove_key, 1, 2, "IMAGE [KEY_FILE]",
	  "remove the key slot a passphrase opens (--key-slot N: slot N)" },
	{ "change-key", CMD_CHANGE_KEY, false, cmd_change_key, 1, 2, "IMAGE [NEW_KEY_FILE]", "replace a passphrase" },
	{ "dump-keys", CMD_DUMP_KEYS, false, cmd_dump_keys, 1, 1, "IMAGE",
	  "show the LUKS header, its key slots and their bindings" },
	{ "bind", CMD_BIND, false, cmd_bind, 3, 3, "IMAGE PIN CONFIG",
	  "add a key slot whose passphrase clevis keeps (PIN tang, tpm2 or sss)" },
	{ "unbind", CMD_UNBIND, false, cmd_unbind, 2, 2, "IMAGE SLOT", "remove a binding and its key slot" },
	{ "test-bindings", CMD_TEST_BINDINGS, false, cmd_test_bindings, 1, 1, "IMAGE",
	  "try each binding: does clevis give a passphrase that opens its key slot" },
	{ "convert", CMD_CONVERT, false, cmd_convert, 1, 2, "SRC [DST]",
	  "convert legacy AES, unencrypted qcow2/qcow or raw to LUKS qcow2 (--in-place: replace SRC)" },
	{ "info", CMD_INFO, false, cmd_info, 1, 1, "IMAGE",
	  "show the image's format, features, encryption, backing chain and snapshots" },
	{ "map", CMD_MAP, false, cmd_map, 1, 1, "IMAGE",
	  "show how guest space maps onto the image files (as qemu-img map)" },
	{ "table", CMD_TABLE, false, cmd_table, 2, 2, "IMAGE NAME",
	  "print the device-mapper tables `open` would load (keys as keyring references)" },
	{ "check", CMD_CHECK, false, cmd_check, 1, 1, "IMAGE", "check refcount consistency (as qemu-img check)",
	  cmd_check_exit_help },
	{ "probe", CMD_PROBE, false, cmd_probe, 1, 1, "DEVICE",
	  "is there a qcow2 image on DEVICE (--udev: ID_QCOW2_* lines for udev)" },
};

static const char exit_help[] =
	"Exit codes: 0 success, 1 wrong parameters, 2 no permission or bad passphrase,\n"
	"3 out of memory, 4 wrong, missing or malformed image or device, 5 device busy or exists.\n";

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
	for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
		char synopsis[64];

		snprintf(synopsis, sizeof(synopsis), "%s %s", commands[i].name, commands[i].args_help);
		if (strlen(synopsis) > 28)
			fprintf(f, "  %s\n  %-28s %s\n", synopsis, "", commands[i].help);
		else
			fprintf(f, "  %-28s %s\n", synopsis, commands[i].help);
	}
	fprintf(f, "\nOptions (qcowsetup COMMAND --help: those COMMAND takes):\n");
	options_usage(f, NULL);
	fprintf(f, "\n%s", exit_help);
}

/* qcowsetup COMMAND --help */
static void command_usage(const struct command *cmd)
{
	printf("Usage: qcowsetup [OPTION...] %s %s\n  %s\n\nOptions:\n", cmd->name, cmd->args_help, cmd->help);
	options_usage(stdout, cmd);
	for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
		if (&commands[i] != cmd && !strcmp(commands[i].name, cmd->name))
			printf("\nAlso qcowsetup %s %s: see qcowsetup %s%s --help.\n", cmd->name, commands[i].args_help,
			       cmd->name, commands[i].tab ? " --tab" : "");
	printf("\n%s", cmd->exit_help ? cmd->exit_help : exit_help);
}

/* The entry of name: its --tab form with --tab. */
static const struct command *find_command(const char *name)
{
	const struct command *found = NULL;

	for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
		if (!strcmp(name, commands[i].name) && (!found || commands[i].tab == opt.tab))
			found = &commands[i];
	return found;
}

int main(int argc, char **argv)
{
	const struct command *cmd;
	int nargs, r;

	if (options_parse(argc, argv) < 0)
		return EXIT_PARAMS;
	if (opt.version) {
		printf("qcowsetup %s\n", PACKAGE_VERSION);
		return EXIT_OK;
	}
	if (optind >= argc) {
		usage(opt.help ? stdout : stderr);
		return opt.help ? EXIT_OK : EXIT_PARAMS;
	}
	cmd = find_command(argv[optind]);
	if (!cmd) {
		log_err("Unknown command %s (see qcowsetup --help).", argv[optind]);
		return EXIT_PARAMS;
	}
	if (options_check(cmd) < 0)
		return EXIT_PARAMS;
	if (opt.help) {
		command_usage(cmd);
		return EXIT_OK;
	}
	nargs = argc - optind - 1;
	if (nargs < cmd->min_args || nargs > cmd->max_args) {
		log_err("Usage: qcowsetup %s %s", cmd->name, cmd->args_help);
		return EXIT_PARAMS;
	}
	r = cmd->run(nargs, argv + optind + 1);
	/* a command with exit codes of its own returns them */
	return r > 0 && cmd->exit_help ? r : tools_exit_code(r);
}
