/* The qcow2 engine on images built in memory: parsing, the walk, merging,
 * and the validation that keeps a malicious image from mapping metadata. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "image.h"
#include "log.h"
#include "qcow2-builder.h"
#include "tap.h"
#include "util.h"

#define COPIED (1ULL << 63)

static char last_err[1024];

static void capture(enum qs_log_level level, const char *msg, void *ud)
{
	if (level == QS_LOG_ERR)
		snprintf(last_err, sizeof(last_err), "%s", msg);
}

static int walk(struct qb *b, struct run_list *runs)
{
	struct img_io io;
	struct mem_io mem;
	struct image *img = NULL;
	int r;

	last_err[0] = '\0';
	mem_io_init(&io, &mem, b->buf, b->size, "test.qcow2");
	r = image_open_io(NULL, &io, NULL, &img);
	if (r == 0)
		r = image_map_chain(img, runs);
	image_free(img, NULL);
	return r;
}

static void test_plain(void)
{
	struct qb b;
	struct run_list runs;
	uint64_t d1, d2, d3;
	int r;

	qb_init(&b, 16, 64 << 20, 0);
	d1 = qb_alloc_cluster(&b);
	d2 = qb_alloc_cluster(&b);
	d3 = qb_alloc_cluster(&b);
	qb_set_l2(&b, 0, d1 | COPIED, 0);
	qb_set_l2(&b, 65536, d2 | COPIED, 0);	/* host-contiguous with d1: merges */
	qb_set_l2(&b, 3 * 65536, d3 | COPIED | 1, 0);	/* zero, preallocated */
	qb_set_l2(&b, 4 * 65536, 1, 0);	/* zero, plain */
	run_list_init(&runs);
	r = walk(&b, &runs);
	CHECK(r == 0, "plain image walks (%d %s)", r, last_err);
	CHECK_EQ_U64(runs.count, 5, "runs");
	if (runs.count == 5) {
		CHECK(runs.runs[0].kind == RUN_DATA && runs.runs[0].len == 2 * 65536 && runs.runs[0].host == d1,
		      "two host-contiguous clusters merge into one data run");
		CHECK(runs.runs[1].kind == RUN_UNALLOC && runs.runs[1].len == 65536, "hole");
		CHECK(runs.runs[2].kind == RUN_ZERO && (runs.runs[2].flags & RUN_F_HOST), "preallocated zero");
		CHECK(runs.runs[3].kind == RUN_ZERO && !runs.runs[3].flags, "plain zero");
		CHECK(runs.runs[4].kind == RUN_UNALLOC && runs.runs[4].guest + runs.runs[4].len == 64 << 20,
		      "tail unallocated up to the virtual size");
	}
	run_list_free(&runs);
	qb_free(&b);
}

static void test_extended_l2(void)
{
	struct qb b;
	struct run_list runs;
	uint64_t d;
	int r;

	qb_init(&b, 16, 1 << 20, 1);
	d = qb_alloc_cluster(&b);
	/* subclusters 0-1 allocated, 2 zero, rest unallocated */
	qb_set_l2(&b, 0, d | COPIED, 0x3ULL | (0x4ULL << 32));
	run_list_init(&runs);
	r = walk(&b, &runs);
	CHECK(r == 0, "extended L2 walks (%s)", last_err);
	CHECK(runs.count >= 3 && runs.runs[0].kind == RUN_DATA && runs.runs[0].len == 4096 &&
	      runs.runs[1].kind == RUN_ZERO && runs.runs[1].len == 2048 && runs.runs[2].kind == RUN_UNALLOC,
	      "subcluster runs: 2 data, 1 zero, then unallocated");
	run_list_free(&runs);
	qb_set_l2(&b, 0, d | COPIED, 0x1ULL | (0x1ULL << 32));
	run_list_init(&runs);
	r = walk(&b, &runs);
	CHECK(r == -EUCLEAN && strstr(last_err, "both allocated and zero"), "alloc+zero bits refused: %s", last_err);
	run_list_free(&runs);
	qb_free(&b);
}

struct bad_case {
	const char *what;
	void (*corrupt)(struct qb *b);
	int expect;
	const char *msg;
};

static void data_on_header(struct qb *b) { qb_set_l2(b, 0, 0 | COPIED | (1ULL << 9) * 0, 0); qb_set_l2(b, 0, COPIED | 0x0, 0); }
static void data_on_l1(struct qb *b) { qb_set_l2(b, 0, (3 * b->cs) | COPIED, 0); }
static void data_on_reftable(struct qb *b) { qb_set_l2(b, 0, (1 * b->cs) | COPIED, 0); }
static void data_on_l2(struct qb *b) { uint64_t l2 = qb_get_l2_table(b, 0); qb_set_l2(b, 0, l2 | COPIED, 0); }
static void data_past_eof(struct qb *b) { qb_set_l2(b, 0, (b->size + 10 * b->cs) | COPIED, 0); }
static void data_unaligned(struct qb *b) { uint64_t d = qb_alloc_cluster(b); qb_set_l2(b, 0, (d + 512) | COPIED, 0); }
static void alias_rc1(struct qb *b) { uint64_t d = qb_alloc_cluster(b); qb_set_l2(b, 0, d | COPIED, 0); qb_set_l2(b, b->cs, d | COPIED, 0); }
static void alias_rc2(struct qb *b) { uint64_t d = qb_alloc_cluster(b); qb_set_refcount(b, d, 2); qb_set_l2(b, 0, d, 0); qb_set_l2(b, b->cs, d, 0); }
static void alias_rc2_thrice(struct qb *b) { uint64_t d = qb_alloc_cluster(b); qb_set_refcount(b, d, 2); qb_set_l2(b, 0, d, 0); qb_set_l2(b, b->cs, d, 0); qb_set_l2(b, 2 * b->cs, d, 0); }
static void l2_past_eof(struct qb *b) { qb_put64(b, 3 * b->cs, (b->size + b->cs) | COPIED); }
static void l2_on_header(struct qb *b) { qb_put64(b, 3 * b->cs, 0 | COPIED | (1ULL << 9) * 0); qb_put64(b, 3 * b->cs, b->cs * 0 + (1ULL << 62) * 0 + 0x200 * 0 + COPIED); b->buf[3 * b->cs + 7] = 0; }
static void l2_on_reftable(struct qb *b) { qb_put64(b, 3 * b->cs, (1 * b->cs) | COPIED); }
static void l1_past_eof(struct qb *b) { qb_put64(b, 40, b->size + b->cs); }
static void l1_unaligned(struct qb *b) { qb_put64(b, 40, 3 * b->cs + 8); }
static void bad_version(struct qb *b) { qb_put32(b, 4, 4); }
static void bad_cluster_bits(struct qb *b) { qb_put32(b, 20, 22); }
static void bad_refcount_order(struct qb *b) { qb_put32(b, 96, 7); }
static void unknown_incompat(struct qb *b) { qb_put64(b, 72, 1ULL << 17); }
static void unknown_incompat_named(struct qb *b)
{
	uint8_t *e = b->buf + 104;

	qb_put64(b, 72, 1ULL << 9);
	qb_put32(b, 104, 0x6803f857);
	qb_put32(b, 108, 48);
	e[8] = 0;
	e[9] = 9;
	memcpy(e + 10, "frobnication", 12);
}
static void huge_size(struct qb *b) { qb_put64(b, 24, 1ULL << 62); }
static void l1_too_small(struct qb *b) { qb_put64(b, 24, 1ULL << 40); }
static void ext_too_long(struct qb *b) { qb_put32(b, 104, 0x12345678); qb_put32(b, 108, (uint32_t)b->cs); }
static void crypt_ext_no_luks(struct qb *b) { qb_put32(b, 104, 0x0537be77); qb_put32(b, 108, 16); qb_put64(b, 112, 5 * b->cs); qb_put64(b, 120, 4096); }
static void luks_no_ext(struct qb *b) { qb_put32(b, 32, 2); }
static void crypt_method_3(struct qb *b) { qb_put32(b, 32, 3); }
static void compression_type_2(struct qb *b) { qb_put32(b, 100, 112); b->buf[104] = 2; qb_put64(b, 72, 1ULL << 3); }
static void compression_bit_mismatch(struct qb *b) { qb_put32(b, 100, 112); b->buf[104] = 1; }
static void header_length_small(struct qb *b) { qb_put32(b, 100, 96); }
static void backing_name_long(struct qb *b) { qb_put64(b, 8, 512); qb_put32(b, 16, 2000); }
static void backing_name_outside(struct qb *b) { qb_put64(b, 8, b->cs - 4); qb_put32(b, 16, 16); }
static void refcount_table_past_eof(struct qb *b) { qb_put64(b, 48, b->size + b->cs); }
static void snapshots_past_eof(struct qb *b) { qb_put32(b, 60, 1); qb_put64(b, 64, b->size + b->cs); }
static void compressed_past_eof(struct qb *b) { qb_set_l2(b, 0, COPIED * 0 | (1ULL << 62) | (b->size + 100 * b->cs), 0); }

static const struct bad_case bad_cases[] = {
	{ "data cluster on the header", data_on_header, 0, NULL },
	{ "data cluster on the L1 table", data_on_l1, -EUCLEAN, "overlaps the L1 table" },
	{ "data cluster on the refcount table", data_on_reftable, -EUCLEAN, "overlaps the refcount table" },
	{ "data cluster on its L2 table", data_on_l2, -EUCLEAN, "overlaps the L2 table" },
	{ "data cluster beyond EOF", data_past_eof, -EUCLEAN, "beyond the end" },
	{ "data cluster unaligned", data_unaligned, -EUCLEAN, "not cluster aligned" },
	{ "two guest clusters on one host cluster, refcount 1", alias_rc1, -EUCLEAN, "both map host offset" },
	{ "two guest clusters on one host cluster, refcount 2", alias_rc2, 0, NULL },
	{ "three guest clusters on one host cluster, refcount 2", alias_rc2_thrice, -EUCLEAN, "mapped 3 times but its refcount is 2" },
	{ "L2 table beyond EOF", l2_past_eof, -EUCLEAN, "L2 table at host offset" },
	{ "L2 table on the header", l2_on_header, 0, NULL },
	{ "L2 table on the refcount table", l2_on_reftable, -EUCLEAN, "overlaps" },
	{ "L1 table beyond EOF", l1_past_eof, -EUCLEAN, "L1 table" },
	{ "L1 table unaligned", l1_unaligned, -EUCLEAN, "not aligned" },
	{ "version 4", bad_version, -ENOTSUP, "version 4" },
	{ "cluster_bits 22", bad_cluster_bits, -EUCLEAN, "cluster_bits 22" },
	{ "refcount_order 7", bad_refcount_order, -EUCLEAN, "refcount_order 7" },
	{ "unknown incompatible bit", unknown_incompat, -ENOTSUP, "unknown incompatible feature bit 17" },
	{ "unknown incompatible bit named by the table", unknown_incompat_named, -ENOTSUP, "frobnication" },
	{ "virtual size 2^62", huge_size, -EUCLEAN, "too large" },
	{ "L1 too small for the size", l1_too_small, -EUCLEAN, "needed" },
	{ "extension beyond the header cluster", ext_too_long, -EUCLEAN, "header extension" },
	{ "crypt header extension without LUKS", crypt_ext_no_luks, -EUCLEAN, "not LUKS" },
	{ "LUKS without crypt header extension", luks_no_ext, -EUCLEAN, "without an encryption header" },
	{ "crypt_method 3", crypt_method_3, -ENOTSUP, "encryption method 3" },
	{ "compression type 2", compression_type_2, -ENOTSUP, "compression type 2" },
	{ "compression type without its bit", compression_bit_mismatch, -EUCLEAN, "does not agree" },
	{ "header_length 96", header_length_small, -EUCLEAN, "header_length" },
	{ "backing name of 2000 bytes", backing_name_long, -EUCLEAN, "backing file name length" },
	{ "backing name outside the header cluster", backing_name_outside, -EUCLEAN, "outside the header cluster" },
	{ "refcount table beyond EOF", refcount_table_past_eof, -EUCLEAN, "refcount table" },
	{ "snapshot table beyond EOF", snapshots_past_eof, -EUCLEAN, "snapshot table" },
	{ "compressed cluster beyond EOF", compressed_past_eof, -EUCLEAN, "compressed cluster" },
};

static void test_bad(void)
{
	for (size_t i = 0; i < ARRAY_SIZE(bad_cases); i++) {
		const struct bad_case *c = &bad_cases[i];
		struct run_list runs;
		struct qb b;
		int r;

		/* the two "0, NULL" header cases are fixed up below */
		qb_init(&b, 16, 64 << 20, 0);
		c->corrupt(&b);
		run_list_init(&runs);
		r = walk(&b, &runs);
		if (c->corrupt == data_on_header || c->corrupt == l2_on_header) {
			/* an entry of 0 means "unallocated": nothing can point at offset 0 */
			CHECK(r == 0, "%s: offset 0 reads as unallocated", c->what);
		} else {
			CHECK(r == c->expect && (!c->msg || strstr(last_err, c->msg)), "%s: %d \"%s\"", c->what, r, last_err);
		}
		run_list_free(&runs);
		qb_free(&b);
	}
}

/* A header cluster full of extensions: every unknown one counted, the first
 * 64 kept; feature name tables spread over many extensions all read. */
static void test_many_extensions(void)
{
	struct img_io io;
	struct mem_io mem;
	struct image *img = NULL;
	char name[64];
	struct qb b;
	uint64_t off = 104, end;
	uint32_t n = 0, tables = 0;
	size_t kept = 0;
	int r;

	qb_init(&b, 16, 1 << 20, 0);
	end = b.cs - 8;
	/* 100 feature name tables of one entry (compatible bit i % 64) */
	for (; tables < 100; tables++, off += 56) {
		qb_put32(&b, off, 0x6803f857);
		qb_put32(&b, off + 4, 48);
		b.buf[off + 8] = 1;
		b.buf[off + 9] = (uint8_t)(tables % 64);
		snprintf((char *)b.buf + off + 10, 46, "feature-%u", tables);
	}
	for (; off + 8 <= end; off += 8, n++) {
		qb_put32(&b, off, 0x12345600 + n % 7);
		qb_put32(&b, off + 4, 0);
	}
	qb_put64(&b, 80, 1ULL << 63);	/* a compatible bit the last table with bit 63 names */
	last_err[0] = '\0';
	mem_io_init(&io, &mem, b.buf, b.size, "test.qcow2");
	r = image_open_io(NULL, &io, NULL, &img);
	CHECK(r == 0, "%u empty extensions and %u feature tables parse (%d %s)", n, tables, r, last_err);
	if (r == 0) {
		while (img->unknown_extensions && img->unknown_extensions[kept])
			kept++;
		CHECK_EQ_U64(img->nb_unknown_extensions, n, "every unknown extension counted");
		CHECK_EQ_U64(kept, 64, "the first 64 kept");
		CHECK(!strcmp(img->unknown_extensions[63], "0x12345600"), "in order (%s)", img->unknown_extensions[63]);
		CHECK_EQ_U64(img->nb_feature_names, tables, "every feature name table read");
		CHECK(!strcmp(image_feature_name(img, 1, 63, name, sizeof(name)), "feature-63"),
		      "names from a later table found (%s)", name);
	}
	image_free(img, NULL);
	qb_free(&b);
}

int main(void)
{
	qs_log_set_callback(capture, NULL);
	test_plain();
	test_many_extensions();
	test_extended_l2();
	test_bad();
	return tap_done();
}
