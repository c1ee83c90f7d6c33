/* qcowsetup open / close / status / list / reattach / resize / suspend /
 * resume / refresh / snapshot / commit: the command line over
 * the mapping lifecycle of lib/mapping.c (passphrases from --key-file or
 * the terminal, output as text or JSON). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmd_keys.h"
#include "json.h"
#include "log.h"
#include "mapping.h"
#include "passphrase.h"
#include "qcowsetup.h"
#include "util.h"

/* Passphrases as cryptsetup reads them: a key file once, the terminal up
 * to --tries times for each encrypted layer. */
struct ask_ctx {
	struct passphrase_opts po;
	bool interactive;
	bool served;
};

static int ask(void *opaque, const char *image, unsigned int attempt, struct passphrase **pp)
{
	struct ask_ctx *a = opaque;

	if (a->interactive ? attempt > (unsigned int)opt.tries : a->served)
		return -ENOKEY;
	a->served = true;
	a->po.image_name = image;
	return tools_read_passphrase(&a->po, pp);
}

static void mapping_params_from_options(struct mapping_params *p, const char *image, const char *name)
{
	*p = (struct mapping_params){
		.image = image,
		.name = name,
		.read_only = opt.readonly,
		.snapshot = opt.snapshot,
		.format = opt.format,
		.backing_file = opt.backing_file,
		.data_file = opt.data_file,
		.trust_names = opt.trust_names,
		.allow_discards = opt.allow_discards,
		.skip_key_check = opt.skip_key_check,
		.max_targets = opt.max_targets,
		.nbd_connections = (unsigned int)opt.nbd_connections,
		.debug = opt.debug,
		.fail_step = opt.debug_fail_step,
	};
}

/* volume: the mapping's name, what a key socket is told */
static void ask_from_options(struct ask_ctx *a, const char *volume)
{
	*a = (struct ask_ctx){
		.po = {
			.volume = volume,
			.key_file = opt.key_file,
			.keyfile_offset = opt.keyfile_offset,
			.keyfile_size = opt.keyfile_size,
		},
	};
	a->interactive = tools_passphrase_interactive(&a->po);
}

int cmd_open(int argc, char **argv)
{
	struct ask_ctx a;
	struct mapping_params p;

	(void)argc;
	mapping_params_from_options(&p, argv[0], argv[1]);
	if (opt.token_only && opt.key_file) {
		log_err("--token-only unlocks by the bindings only: no --key-file with it.");
		return -EINVAL;
	}
	p.use_bindings = opt.clevis || opt.token_only || opt.token_timeout;
	p.binding_timeout = opt.token_timeout;
	ask_from_options(&a, argv[1]);
	if (!opt.token_only) {
		p.ask = ask;
		p.ask_opaque = &a;
	}
	return mapping_open(&p);
}

int cmd_suspend(int argc, char **argv)
{
	(void)argc;
	return mapping_suspend(argv[0], opt.debug_fail_step);
}

static void live_params_from_options(struct mapping_live_params *p, struct ask_ctx *a, const char *name)
{
	ask_from_options(a, name);
	*p = (struct mapping_live_params){
		.ask = ask,
		.ask_opaque = a,
		.skip_key_check = opt.skip_key_check,
		.debug = opt.debug,
		.fail_step = opt.debug_fail_step,
	};
}

int cmd_resume(int argc, char **argv)
{
	struct mapping_live_params p;
	struct ask_ctx a;

	(void)argc;
	live_params_from_options(&p, &a, argv[0]);
	return mapping_resume(argv[0], &p);
}

int cmd_refresh(int argc, char **argv)
{
	struct mapping_live_params p;
	struct ask_ctx a;

	(void)argc;
	if (opt.allow_discards == opt.no_allow_discards) {
		log_err("refresh takes one of --allow-discards and --no-allow-discards.");
		return -EINVAL;
	}
	live_params_from_options(&p, &a, argv[0]);
	return mapping_refresh(argv[0], opt.allow_discards, &p);
}

static void on_progress_start(void *opaque, const char *label, uint64_t total)
{
	progress_start(opaque, label, total);
}

static void on_progress_update(void *opaque, uint64_t done)
{
	progress_update(opaque, done);
}

static void on_progress_end(void *opaque, bool ok)
{
	progress_end(opaque, ok);
}

int cmd_commit(int argc, char **argv)
{
	struct progress prog;
	struct ask_ctx a;
	struct mapping_commit_params p = {
		.ask = ask,
		.ask_opaque = &a,
		.debug = opt.debug,
		.fail_step = opt.debug_fail_step,
		.progress_start = on_progress_start,
		.progress_update = on_progress_update,
		.progress_end = on_progress_end,
		.progress_opaque = &prog,
	};

	(void)argc;
	ask_from_options(&a, argv[0]);
	return mapping_commit(argv[0], &p);
}

/* The overlay's passphrase: --new-key-file, else the one that opens the
 * image (the library keeps it from the unlock). */
int cmd_snapshot(int argc, char **argv)
{
	struct mapping_snapshot_params p = {
		.name = argv[0],
		.image = argv[1],
		.debug = opt.debug,
		.fail_step = opt.debug_fail_step,
	};
	struct ask_ctx a;
	int r = 0;

	(void)argc;
	ask_from_options(&a, argv[0]);
	p.ask = ask;
	p.ask_opaque = &a;
	keys_pbkdf(&p.pbkdf);
	if (opt.new_key_file)
		r = keys_read_new_passphrase(opt.new_key_file, argv[1], &p.new_passphrase);
	if (r == 0)
		r = mapping_snapshot(&p);
	else
		mapping_release();
	return r;
}

int cmd_close(int argc, char **argv)
{
	(void)argc;
	return mapping_close(argv[0], opt.deferred);
}

int cmd_reattach(int argc, char **argv)
{
	(void)argc;
	return mapping_reattach(argv[0], opt.debug);
}

/* SIZE, +SIZE or -SIZE, as qemu-img resize: bytes or with K, M, G, T
 * (powers of 1024); a multiple of 512. */
int cmd_resize(int argc, char **argv)
{
	struct mapping_resize_params p = {
		.name = argv[0],
		.shrink = opt.shrink,
		.fail_step = opt.debug_fail_step,
	};
	const char *s = argv[1];
	struct ask_ctx a;
	uint64_t new_size;
	int r;

	(void)argc;
	ask_from_options(&a, p.name);
	p.ask = ask;
	p.ask_opaque = &a;
	if (*s == '+' || *s == '-')
		p.relative = *s++ == '+' ? 1 : -1;
	if (parse_u64(s, PARSE_SIZE, &p.size) < 0 || !p.size || p.size % 512) {
		log_err("qcowsetup: invalid size %s (a multiple of 512 bytes, or with K, M, G, T; +SIZE, -SIZE relative).",
			argv[1]);
		return -EINVAL;
	}
	if (p.relative < 0 && !p.shrink) {
		log_err("qcowsetup: -%s shrinks %s: that takes --shrink.", s, p.name);
		return -EINVAL;
	}
	r = mapping_resize(&p, &new_size);
	if (r == 0)
		log_verbose("/dev/mapper/%s: %llu bytes.", p.name, (unsigned long long)new_size);
	mapping_release();
	return r;
}

static void print_json(struct json *j, const struct mapping_status *st)
{
	json_begin_object(j, NULL);
	json_string(j, "name", st->name);
	json_string(j, "uuid", st->uuid);
	json_string(j, "device", st->name);
	json_bool(j, "read-only", st->read_only);
	json_string(j, "state", st->suspended ? "suspended" : "active");
	json_i64(j, "open-count", st->open_count);
	json_u64(j, "targets", st->targets);
	json_u64(j, "internal-devices", st->internal);
	json_string(j, "encryption", st->cipher[0] ? st->cipher : "none");
	json_begin_array(j, "files");
	for (unsigned int i = 0; i < st->nfiles; i++)
		json_string(j, NULL, st->files[i]);
	json_end_array(j);
	json_begin_array(j, "slow-path");
	for (unsigned int i = 0; i < st->nslow; i++) {
		char dev[32];

		snprintf(dev, sizeof(dev), "/dev/nbd%d", st->slow[i].nbd);
		json_begin_object(j, NULL);
		json_string(j, "device", dev);
		json_i64(j, "daemon-pid", st->slow[i].pid);
		json_bool(j, "running", st->slow[i].running);
		json_bool(j, "broken", st->broken);
		json_end_object(j);
	}
	json_end_array(j);
	json_end_object(j);
}

static void print_text(const struct mapping_status *st)
{
	printf("/dev/mapper/%s is %s%s.\n", st->name, st->suspended ? "suspended" : "active",
	       st->open_count > 0 ? " and is in use" : "");
	printf("  uuid:      %s\n", st->uuid);
	printf("  mode:      %s\n", st->read_only ? "read-only" : "read/write");
	printf("  targets:   %u (top table)\n", st->targets);
	printf("  devices:   1 + %u internal\n", st->internal);
	printf("  cipher:    %s\n", st->cipher[0] ? st->cipher : "none");
	for (unsigned int i = 0; i < st->nfiles; i++)
		printf("  file:      %s\n", st->files[i]);
	for (unsigned int i = 0; i < st->nslow; i++) {
		if (st->slow[i].running)
			printf("  slow path: /dev/nbd%d, daemon pid %d (running)\n", st->slow[i].nbd,
			       (int)st->slow[i].pid);
		else
			printf("  slow path: /dev/nbd%d, daemon not running (qcowsetup reattach %s)\n", st->slow[i].nbd,
			       st->name);
	}
	if (st->have_stats)
		printf("  remapped:  %llu MiB to the fast path, %llu table swaps (I/O held p99 %.1f ms, max %.1f ms; reload p99 %.1f ms)\n",
		       st->remapped_bytes >> 20, st->reloads, st->held_ms_p99, st->held_ms_max, st->round_ms_p99);
	if (st->broken)
		printf("  writer:    broken: a metadata write or flush failed (see syslog); writes to new clusters and flushes fail, reads go on\n");
}

int cmd_status(int argc, char **argv)
{
	struct mapping_status *st = malloc(sizeof(*st));
	struct json j;
	int r;

	(void)argc;
	if (!st)
		return -ENOMEM;
	r = mapping_get_status(argv[0], st);
	if (r == 0 && opt.json) {
		json_init(&j, stdout, true);
		print_json(&j, st);
		json_finish(&j);
	} else if (r == 0) {
		print_text(st);
	}
	free(st);
	mapping_release();
	return r;
}

static int list_one(void *opaque, const char *name)
{
	struct json *j = opaque;
	struct mapping_status *st;
	int r;

	if (!j) {
		printf("%s\n", name);
		return 0;
	}
	st = malloc(sizeof(*st));
	if (!st)
		return -ENOMEM;
	r = mapping_get_status(name, st);
	if (r == 0)
		print_json(j, st);
	free(st);
	return r == -ENODEV ? 0 : r;	/* gone meanwhile */
}

int cmd_list(int argc, char **argv)
{
	struct json j;
	int r;

	(void)argc;
	(void)argv;
	if (opt.json) {
		json_init(&j, stdout, true);
		json_begin_array(&j, NULL);
	}
	r = mapping_list(list_one, opt.json ? &j : NULL);
	if (opt.json) {
		json_end_array(&j);
		json_finish(&j);
	}
	mapping_release();
	return r;
}
