/* libFuzzer target for the format engine: the input is one image file (qcow2,
 * qcow or raw, probed as the command would), read through mem_io. It is
 * opened with its backing chain (the opener refuses every further file, so a
 * backing or data file name ends the open with -ENOENT) and, when that fails,
 * again without the backing chain, with the input itself standing in for an
 * external data file; then walked (image_map_chain), its metadata
 * listed (image_metadata), mapped as `qemu-img map` would (qemu_map), and
 * every internal snapshot selected and walked. Everything is freed: the
 * leak checker of -fsanitize=address runs at exit.
 *
 * Build: make fuzz (tests/fuzz/Makemodule.am), or by hand:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc/lib \
 *     tests/fuzz/fuzz-image.c src/lib/{log,io,runs,image,qcow2,qcow1,validate,qemu_map}.c
 * Replay a crash: tests/fuzz/fuzz-image CRASH-FILE */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "image.h"
#include "io.h"
#include "log.h"
#include "qemu_map.h"
#include "runs.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* at most this many snapshots are selected and walked per input */
#define FUZZ_MAX_SNAPSHOTS 4

static void quiet(enum qs_log_level level, const char *msg, void *userdata)
{
	(void)level;
	(void)msg;
	(void)userdata;
}

static int refuse_open(void *opaque, const struct img_open_req *req, struct img_io *io)
{
	(void)opaque;
	(void)req;
	(void)io;
	return -ENOENT;
}

static void refuse_close(void *opaque, struct img_io *io)
{
	(void)opaque;
	(void)io;
}

static const struct img_opener refusing_opener = {
	.open = refuse_open,
	.close = refuse_close,
};

/* second pass: any file (only a data file is asked for) is the input again */
struct same_input {
	const uint8_t *data;
	size_t size;
	struct mem_io mem;
	int opened;
};

static int same_open(void *opaque, const struct img_open_req *req, struct img_io *io)
{
	struct same_input *s = opaque;

	(void)req;
	if (s->opened++)
		return -ENOENT;
	mem_io_init(io, &s->mem, s->data, s->size, "fuzz.data");
	return 0;
}

struct map_sum {
	uint64_t end;
	unsigned long records;
};

static int count_record(const struct qmap_entry *e, void *opaque)
{
	struct map_sum *s = opaque;

	/* records come in guest order, without gaps or overlaps */
	if (e->start != s->end || !e->length)
		abort();
	s->end = e->start + e->length;
	s->records++;
	return 0;
}

static void check_runs(const struct image *img, const struct run_list *runs)
{
	uint64_t g = 0;

	/* the chain map covers [0, map_size) in order, each run non-empty */
	for (size_t i = 0; i < runs->count; i++) {
		if (runs->runs[i].guest != g || !runs->runs[i].len)
			abort();
		g += runs->runs[i].len;
	}
	if (g != img->map_size)
		abort();
}

static void exercise(struct image *img)
{
	struct run_list runs;
	struct meta_range *meta = NULL;
	size_t nmeta = 0;
	struct map_sum sum = { 0 };
	int r;

	run_list_init(&runs);
	r = image_map_chain(img, &runs);
	if (r == 0)
		check_runs(img, &runs);
	run_list_free(&runs);

	if (image_metadata(img, &meta, &nmeta) == 0)
		free(meta);

	r = qemu_map(img, count_record, &sum);
	if (r == 0 && sum.end != img->map_size)
		abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	qs_log_set_callback(quiet, NULL);
	qs_log_set_level(QS_LOG_DEBUG);	/* format every message: it must not crash either */
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct image_open_opts opts = { 0 };
	struct same_input same = { .data = data, .size = size };
	struct img_opener same_opener = { .open = same_open, .close = refuse_close, .opaque = &same };
	const struct img_opener *opener = &refusing_opener;
	struct mem_io mem;
	struct img_io io;
	struct image *img = NULL;
	int r;

	mem_io_init(&io, &mem, data, size, "fuzz.img");
	r = image_open_io(opener, &io, &opts, &img);
	if (r == -ENOENT) {
		/* a backing or data file name: parse the layer alone */
		opts.no_backing = true;
		opener = &same_opener;
		r = image_open_io(opener, &io, &opts, &img);
	}
	if (r < 0)
		return 0;
	exercise(img);
	for (uint32_t i = 0; i < img->nb_snapshots && i < FUZZ_MAX_SNAPSHOTS; i++) {
		if (image_select_snapshot(img, img->snapshots[i].id) == 0)
			exercise(img);
	}
	image_free(img, opener);
	return 0;
}
