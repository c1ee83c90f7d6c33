/* Compressed clusters (compress.h): table-driven round trips and damaged
 * streams for zlib and zstd over several cluster sizes, a random-corruption
 * sweep, and, when qemu-img and qemu-io are installed, clusters written by
 * QEMU itself (qcow2 zlib, qcow2 zstd, qcow v1), found by walking the
 * header, L1 and L2 here. Fixtures are made at run time; no binary blobs. */

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "compress.h"
#include "log.h"
#include "tap.h"
#include "util.h"

#define GUARD_LEN 64
#define GUARD_BYTE 0xa5

/* xorshift64*: deterministic data, reproducible failures */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rng_next(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dULL;
}

static void fill_random(uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)(rng_next() >> 56);
}

static void *xmalloc(size_t len)
{
	void *p = malloc(len ? len : 1);

	if (!p) {
		fprintf(stderr, "out of memory\n");
		exit(99);
	}
	return p;
}

static const char *type_name(int type)
{
	return type == QCOW2_COMPRESSION_ZLIB ? "zlib" : type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "?";
}

/* ---- data patterns ---- */

enum pattern {
	PAT_ZERO,
	PAT_TEXT,		/* compressible, not uniform */
	PAT_HALF_RANDOM,	/* first half random, second half text */
	PAT_RANDOM,		/* incompressible */
};

static const char *const pattern_names[] = { "zero", "text", "half-random", "random" };

/* Lines of words: deflate and zstd both find matches and literals. */
static void fill_text(uint8_t *buf, size_t len)
{
	static const char *const words[] = {
		"qcow2", "cluster", "sector", "refcount", "table", "L1", "L2",
		"backing", "snapshot", "compressed", "zstd", "deflate", "device",
		"mapper", "offset", "guest", "host", "image", "header", "bitmap",
	};
	size_t pos = 0;
	unsigned line = 0;

	while (pos < len) {
		char tmp[64];
		int n;

		if (rng_next() % 8 == 0)
			n = snprintf(tmp, sizeof(tmp), "\nline %u: ", line++);
		else
			n = snprintf(tmp, sizeof(tmp), "%s ", words[rng_next() % ARRAY_SIZE(words)]);
		for (int i = 0; i < n && pos < len; i++)
			buf[pos++] = (uint8_t)tmp[i];
	}
}

static void fill_pattern(uint8_t *buf, size_t len, enum pattern pat)
{
	switch (pat) {
	case PAT_ZERO:
		memset(buf, 0, len);
		break;
	case PAT_TEXT:
		fill_text(buf, len);
		break;
	case PAT_HALF_RANDOM:
		fill_random(buf, len / 2);
		fill_text(buf + len / 2, len - len / 2);
		break;
	case PAT_RANDOM:
		fill_random(buf, len);
		break;
	}
}

/* ---- a destination with a guard zone behind it ---- */

static uint8_t *dst_alloc(size_t dst_len)
{
	uint8_t *dst = xmalloc(dst_len + GUARD_LEN);

	memset(dst, 0xee, dst_len);
	memset(dst + dst_len, GUARD_BYTE, GUARD_LEN);
	return dst;
}

static bool guard_intact(const uint8_t *dst, size_t dst_len)
{
	for (size_t i = 0; i < GUARD_LEN; i++)
		if (dst[dst_len + i] != GUARD_BYTE)
			return false;
	return true;
}

/* ---- argument checks ---- */

static void test_arguments(void)
{
	uint8_t in[512] = { 0 }, out[1024];
	ssize_t n;

	for (int type = 0; type <= 1; type++) {
		n = qcow_compress(type, out, sizeof(out), in, sizeof(in));
		CHECK(n > 0 && (size_t)n < sizeof(in), "%s: compress 512 zero bytes -> %zd", type_name(type), n);
		CHECK(qcow_decompress(type, out, 0, in, sizeof(in)) == -EINVAL,
		      "%s: decompress to 0 bytes is -EINVAL", type_name(type));
		CHECK(qcow_compress(type, out, sizeof(out), in, 0) == -EINVAL,
		      "%s: compress 0 bytes is -EINVAL", type_name(type));
		CHECK(qcow_compress(type, out, 1, in, sizeof(in)) == -ENOSPC,
		      "%s: compress into 1 byte is -ENOSPC", type_name(type));
		CHECK(qcow_compress(type, out, 0, in, sizeof(in)) == -ENOSPC,
		      "%s: compress into 0 bytes is -ENOSPC", type_name(type));
		CHECK(qcow_decompress(type, out, 512, in, 0) == -EBADMSG,
		      "%s: decompress empty input is -EBADMSG", type_name(type));
	}
	CHECK(qcow_decompress(2, out, 512, in, sizeof(in)) == -ENOTSUP, "type 2: decompress -ENOTSUP");
	CHECK(qcow_decompress(-1, out, 512, in, sizeof(in)) == -ENOTSUP, "type -1: decompress -ENOTSUP");
	CHECK(qcow_compress(2, out, sizeof(out), in, sizeof(in)) == -ENOTSUP, "type 2: compress -ENOTSUP");
}

/* ---- the table ---- */

enum mutation {
	MUT_NONE,		/* exactly the compressed bytes */
	MUT_SECTOR_PAD,		/* garbage to the sector end, plus one sector */
	MUT_GARBAGE_4K,		/* 4 KiB of garbage after the stream */
	MUT_ZERO_PAD,		/* zeros to the sector end, as past EOF */
	MUT_TRUNCATE_HALF,
	MUT_TRUNCATE_LAST,	/* the last byte missing */
	MUT_EMPTY,		/* no input at all */
	MUT_CORRUPT_HEADER,	/* first byte damaged */
	MUT_DST_DOUBLE,		/* dst twice the cluster: output too short */
	MUT_DST_HALF,		/* dst half the cluster: output too long */
	MUT_DST_MINUS_1,	/* dst one byte short: output one byte too long */
	MUT_WRONG_TYPE,		/* decoded as the other type */
	MUT_UNKNOWN_TYPE,
	MUT_CONCAT_HALVES,	/* each half compressed on its own, concatenated */
};

enum expect {
	EXPECT_OK,		/* 0, and dst equals the original */
	EXPECT_EBADMSG,
	EXPECT_ENOTSUP,
	EXPECT_OK_OR_EBADMSG,	/* refused, or the exact original: never wrong */
};

struct scenario {
	const char *name;
	enum mutation mut;
	enum expect expect[2];	/* indexed by compression type */
};

static const struct scenario scenarios[] = {
	{ "exact length", MUT_NONE, { EXPECT_OK, EXPECT_OK } },
	{ "garbage to the sector end", MUT_SECTOR_PAD, { EXPECT_OK, EXPECT_OK } },
	{ "4 KiB trailing garbage", MUT_GARBAGE_4K, { EXPECT_OK, EXPECT_OK } },
	{ "zero padding", MUT_ZERO_PAD, { EXPECT_OK, EXPECT_OK } },
	{ "truncated to half", MUT_TRUNCATE_HALF, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	/* zlib: QEMU accepts a full cluster whose end-of-block code is cut */
	{ "last byte missing", MUT_TRUNCATE_LAST, { EXPECT_OK_OR_EBADMSG, EXPECT_EBADMSG } },
	{ "empty input", MUT_EMPTY, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	{ "corrupt first byte", MUT_CORRUPT_HEADER, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	{ "output shorter than dst", MUT_DST_DOUBLE, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	{ "output twice dst", MUT_DST_HALF, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	{ "output one byte over dst", MUT_DST_MINUS_1, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	{ "decoded as the other type", MUT_WRONG_TYPE, { EXPECT_EBADMSG, EXPECT_EBADMSG } },
	{ "unknown type", MUT_UNKNOWN_TYPE, { EXPECT_ENOTSUP, EXPECT_ENOTSUP } },
	/* zstd: several frames are one stream (QEMU loops); deflate: one stream */
	{ "two streams, one per half", MUT_CONCAT_HALVES, { EXPECT_EBADMSG, EXPECT_OK } },
};

static const size_t cluster_sizes[] = { 512, 4096, 65536, 2 << 20 };

/* Room for incompressible data: stored blocks and raw blocks cost a few
 * bytes per 16 KiB (deflate) or 128 KiB (zstd). */
static size_t compress_bound(size_t len)
{
	return len + len / 64 + 1024;
}

/* Compressed bytes, made exactly src_len long in a buffer of that size so
 * that valgrind sees any read past it. */
static uint8_t *make_input(const struct scenario *sc, int type, const uint8_t *orig,
			   size_t cluster, const uint8_t *comp, size_t comp_len,
			   size_t *src_len)
{
	uint8_t *src;
	size_t len = comp_len, padded;

	switch (sc->mut) {
	case MUT_SECTOR_PAD:
	case MUT_ZERO_PAD:
		padded = round_up_pow2(comp_len, 512) + 512;
		src = xmalloc(padded);
		memcpy(src, comp, comp_len);
		if (sc->mut == MUT_SECTOR_PAD)
			fill_random(src + comp_len, padded - comp_len);
		else
			memset(src + comp_len, 0, padded - comp_len);
		*src_len = padded;
		return src;
	case MUT_GARBAGE_4K:
		src = xmalloc(comp_len + 4096);
		memcpy(src, comp, comp_len);
		fill_random(src + comp_len, 4096);
		*src_len = comp_len + 4096;
		return src;
	case MUT_TRUNCATE_HALF:
		len = comp_len / 2;
		break;
	case MUT_TRUNCATE_LAST:
		len = comp_len - 1;
		break;
	case MUT_EMPTY:
		len = 0;
		break;
	case MUT_CONCAT_HALVES: {
		size_t half = cluster / 2, cap = compress_bound(half);
		uint8_t *a = xmalloc(cap), *b = xmalloc(cap);
		ssize_t na = qcow_compress(type, a, cap, orig, half);
		ssize_t nb = qcow_compress(type, b, cap, orig + half, cluster - half);

		if (na <= 0 || nb <= 0) {
			free(a);
			free(b);
			return NULL;
		}
		src = xmalloc((size_t)(na + nb));
		memcpy(src, a, (size_t)na);
		memcpy(src + na, b, (size_t)nb);
		free(a);
		free(b);
		*src_len = (size_t)(na + nb);
		return src;
	}
	default:
		break;
	}
	src = xmalloc(len);
	memcpy(src, comp, len);
	if (sc->mut == MUT_CORRUPT_HEADER) {
		if (type == QCOW2_COMPRESSION_ZLIB)
			src[0] = 0xff;	/* BFINAL=1, BTYPE=11: reserved block type */
		else
			src[0] ^= 0xff;	/* frame magic */
	}
	*src_len = len;
	return src;
}

static bool result_matches(enum expect expect, int r, const uint8_t *dst,
			   const uint8_t *orig, size_t cluster)
{
	switch (expect) {
	case EXPECT_OK:
		return r == 0 && !memcmp(dst, orig, cluster);
	case EXPECT_EBADMSG:
		return r == -EBADMSG;
	case EXPECT_ENOTSUP:
		return r == -ENOTSUP;
	case EXPECT_OK_OR_EBADMSG:
		return r == -EBADMSG || (r == 0 && !memcmp(dst, orig, cluster));
	}
	return false;
}

static void test_table_one(int type, size_t cluster, enum pattern pat)
{
	uint8_t *orig = xmalloc(cluster);
	size_t cap = compress_bound(cluster);
	uint8_t *comp = xmalloc(cap);
	ssize_t n;

	fill_pattern(orig, cluster, pat);

	/* What QEMU does: compress into cluster_size - 1, fall back to an
	 * uncompressed cluster on -ENOSPC. */
	n = qcow_compress(type, comp, cluster - 1, orig, cluster);
	if (pat == PAT_RANDOM)
		CHECK(n == -ENOSPC, "%s %zu %s: compress into cluster-1 is -ENOSPC (%zd)",
		      type_name(type), cluster, pattern_names[pat], n);
	else
		CHECK(n > 0 && (size_t)n < cluster, "%s %zu %s: compress into cluster-1 -> %zd",
		      type_name(type), cluster, pattern_names[pat], n);

	/* With room enough, even random data yields a stream to decode. */
	n = qcow_compress(type, comp, cap, orig, cluster);
	CHECK(n > 0, "%s %zu %s: compress with room -> %zd",
	      type_name(type), cluster, pattern_names[pat], n);
	if (n <= 0)
		goto out;

	for (size_t i = 0; i < ARRAY_SIZE(scenarios); i++) {
		const struct scenario *sc = &scenarios[i];
		size_t src_len = 0, dst_len = cluster;
		int dec_type = type, r;
		uint8_t *src, *dst;

		src = make_input(sc, type, orig, cluster, comp, (size_t)n, &src_len);
		if (!src) {
			CHECK(false, "%s %zu %s: %s: could not build the input",
			      type_name(type), cluster, pattern_names[pat], sc->name);
			continue;
		}
		if (sc->mut == MUT_DST_DOUBLE)
			dst_len = cluster * 2;
		else if (sc->mut == MUT_DST_HALF)
			dst_len = cluster / 2;
		else if (sc->mut == MUT_DST_MINUS_1)
			dst_len = cluster - 1;
		else if (sc->mut == MUT_WRONG_TYPE)
			dec_type = !type;
		else if (sc->mut == MUT_UNKNOWN_TYPE)
			dec_type = 2;

		dst = dst_alloc(dst_len);
		r = qcow_decompress(dec_type, dst, dst_len, src, src_len);
		CHECK(result_matches(sc->expect[type], r, dst, orig, MIN(cluster, dst_len)) &&
		      guard_intact(dst, dst_len),
		      "%s %zu %s: %s (src %zu, dst %zu): %d",
		      type_name(type), cluster, pattern_names[pat], sc->name,
		      src_len, dst_len, r);
		free(dst);
		free(src);
	}
out:
	free(comp);
	free(orig);
}

static void test_table(void)
{
	for (int type = 0; type <= 1; type++)
		for (size_t c = 0; c < ARRAY_SIZE(cluster_sizes); c++)
			for (int pat = PAT_ZERO; pat <= PAT_RANDOM; pat++)
				test_table_one(type, cluster_sizes[c], pat);
}

/* ---- random damage: refused or full, never a write past dst ---- */

static void test_corruption_sweep(void)
{
	static const size_t sizes[] = { 4096, 65536 };
	const int rounds = 300;

	for (int type = 0; type <= 1; type++) {
		for (size_t s = 0; s < ARRAY_SIZE(sizes); s++) {
			size_t cluster = sizes[s], cap = compress_bound(cluster);
			uint8_t *orig = xmalloc(cluster), *comp = xmalloc(cap);
			uint8_t *dst = dst_alloc(cluster);
			int refused = 0, wrong = 0, same = 0, bad = 0;
			ssize_t n;

			fill_pattern(orig, cluster, PAT_TEXT);
			n = qcow_compress(type, comp, cap, orig, cluster);
			if (n <= 0) {
				CHECK(false, "%s %zu: compress for the sweep: %zd", type_name(type), cluster, n);
				goto next;
			}
			for (int round = 0; round < rounds; round++) {
				size_t len = (size_t)n;
				uint8_t *src;
				int flips = 1 + (int)(rng_next() % 3), r;

				if (rng_next() % 4 == 0)
					len = (size_t)(rng_next() % (uint64_t)n);	/* also cut */
				src = xmalloc(len);
				memcpy(src, comp, len);
				for (int f = 0; f < flips && len; f++)
					src[rng_next() % len] ^= (uint8_t)(1 + rng_next() % 255);
				r = qcow_decompress(type, dst, cluster, src, len);
				if (!guard_intact(dst, cluster) || (r != 0 && r != -EBADMSG))
					bad++;
				else if (r)
					refused++;
				else if (memcmp(dst, orig, cluster))
					wrong++;	/* no checksum in the format: possible */
				else
					same++;
				memset(dst + cluster, GUARD_BYTE, GUARD_LEN);
				free(src);
			}
			CHECK(bad == 0 && refused > rounds / 2,
			      "%s %zu: %d damaged streams: %d refused, %d decoded to other bytes, %d harmless, %d bad",
			      type_name(type), cluster, rounds, refused, wrong, same, bad);
next:
			free(dst);
			free(comp);
			free(orig);
		}
	}
}

/* ---- clusters written by QEMU ---- */

static bool in_path(const char *name)
{
	const char *path = getenv("PATH");
	char buf[4096];

	if (!path)
		path = "/usr/bin:/bin";
	while (*path) {
		size_t len = strcspn(path, ":");

		if (len && len + strlen(name) + 2 <= sizeof(buf)) {
			snprintf(buf, sizeof(buf), "%.*s/%s", (int)len, path, name);
			if (access(buf, X_OK) == 0)
				return true;
		}
		path += len;
		if (*path == ':')
			path++;
	}
	return false;
}

/* Runs argv without a shell; stdout to out_path (or /dev/null), stderr to
 * /dev/null. Returns the exit status, or -1. */
static int run(char *const argv[], const char *out_path)
{
	pid_t pid;
	int status;

	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		int out = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0600);
		int null = open("/dev/null", O_WRONLY);

		if (out < 0 || null < 0)
			_exit(127);
		dup2(out, STDOUT_FILENO);
		dup2(null, STDERR_FILENO);
		execvp(argv[0], argv);
		_exit(127);
	}
	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

static int read_whole(const char *path, uint8_t **buf, size_t *len)
{
	FILE *f = fopen(path, "rb");
	long size;
	int r = -EIO;

	if (!f)
		return -errno;
	if (fseek(f, 0, SEEK_END) || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET))
		goto out;
	*buf = xmalloc((size_t)size + 1);
	if (fread(*buf, 1, (size_t)size, f) != (size_t)size) {
		free(*buf);
		goto out;
	}
	(*buf)[size] = 0;
	*len = (size_t)size;
	r = 0;
out:
	fclose(f);
	return r;
}

static int write_at(const char *path, uint64_t offset, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT, 0600);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = pwrite(fd, buf, len, (off_t)offset);
	close(fd);
	return n == (ssize_t)len ? 0 : -EIO;
}

struct cref {
	uint64_t host;		/* byte offset of the compressed data */
	uint64_t len;		/* upper bound (qcow2) or exact size (qcow v1) */
};

/* The file holds [off, off+len)? */
static bool file_has(size_t file_len, uint64_t off, uint64_t len)
{
	uint64_t end;

	return !uadd64_overflow(off, len, &end) && end <= file_len;
}

/* qcow2, guest cluster index -> compressed descriptor. 0 or -errno. */
static int qcow2_find_compressed(const uint8_t *img, size_t img_len, uint64_t index,
				 unsigned *cluster_bits, struct cref *ref)
{
	uint64_t l1_offset, l1e, l2_offset, l2e, l2_entries, x_mask, csize_mask;
	unsigned cb, x;
	uint32_t l1_size;

	if (img_len < 104 || memcmp(img, "QFI\xfb", 4) || get_be32(img + 4) < 2)
		return -EINVAL;
	cb = get_be32(img + 20);
	if (cb < 9 || cb > 21)
		return -EINVAL;
	l1_size = get_be32(img + 36);
	l1_offset = get_be64(img + 40);
	l2_entries = (1ULL << cb) / 8;
	if (index / l2_entries >= l1_size || !file_has(img_len, l1_offset, (uint64_t)l1_size * 8))
		return -EINVAL;
	l1e = get_be64(img + l1_offset + index / l2_entries * 8);
	l2_offset = l1e & 0x00fffffffffffe00ULL;
	if (!l2_offset || !file_has(img_len, l2_offset, 1ULL << cb))
		return -ENOENT;
	l2e = get_be64(img + l2_offset + index % l2_entries * 8);
	if (!(l2e & (1ULL << 62)))
		return -ENOENT;		/* not compressed */
	x = 62 - (cb - 8);
	x_mask = (1ULL << x) - 1;
	csize_mask = (1ULL << (cb - 8)) - 1;
	ref->host = l2e & x_mask;
	ref->len = (((l2e >> x) & csize_mask) + 1) * 512 - (ref->host & 511);
	*cluster_bits = cb;
	return 0;
}

/* qcow v1: L2 bit 63 = compressed, then the exact size in bytes. */
static int qcow1_find_compressed(const uint8_t *img, size_t img_len, uint64_t index,
				 unsigned *cluster_bits, struct cref *ref)
{
	uint64_t l1_offset, l2_offset, l2e;
	unsigned cb, l2_bits;

	if (img_len < 48 || memcmp(img, "QFI\xfb", 4) || get_be32(img + 4) != 1)
		return -EINVAL;
	cb = img[32];
	l2_bits = img[33];
	if (cb < 9 || cb > 16 || l2_bits < 6 || l2_bits > cb - 3)
		return -EINVAL;
	l1_offset = get_be64(img + 40);
	if (!file_has(img_len, l1_offset, ((index >> l2_bits) + 1) * 8))
		return -EINVAL;
	l2_offset = get_be64(img + l1_offset + (index >> l2_bits) * 8);
	if (!l2_offset || !file_has(img_len, l2_offset, 8ULL << l2_bits))
		return -ENOENT;
	l2e = get_be64(img + l2_offset + (index & ((1ULL << l2_bits) - 1)) * 8);
	if (!(l2e & (1ULL << 63)))
		return -ENOENT;
	ref->host = l2e & ((1ULL << (63 - cb)) - 1);
	ref->len = (l2e >> (63 - cb)) & ((1ULL << cb) - 1);
	*cluster_bits = cb;
	return 0;
}

/* The compressed bytes as the engine will see them: exactly ref->len
 * long, zero-filled past the end of the file (QEMU's file layer does the
 * same for a compressed run that reaches past EOF). */
static uint8_t *compressed_bytes(const uint8_t *img, size_t img_len, const struct cref *ref)
{
	uint8_t *buf;
	size_t avail = 0;

	if (ref->len == 0 || ref->len > (64 << 20) || ref->host >= img_len)
		return NULL;
	buf = xmalloc(ref->len);
	avail = MIN(ref->len, img_len - ref->host);
	memcpy(buf, img + ref->host, avail);
	memset(buf + avail, 0, ref->len - avail);
	return buf;
}

struct qemu_fixture {
	const char *name;
	const char *format;	/* qemu-img -f */
	const char *options;	/* qemu-img -o, or NULL */
	int type;
	size_t cluster;		/* what the options (or the default) give */
	bool qcow1;		/* qcow v1: compressed writes one cluster at a time */
};

static const struct qemu_fixture qemu_fixtures[] = {
	{ "qcow2 zlib", "qcow2", "compression_type=zlib", QCOW2_COMPRESSION_ZLIB, 65536, false },
	{ "qcow2 zstd", "qcow2", "compression_type=zstd", QCOW2_COMPRESSION_ZSTD, 65536, false },
	{ "qcow2 zlib 4k clusters", "qcow2", "compression_type=zlib,cluster_size=4096",
	  QCOW2_COMPRESSION_ZLIB, 4096, false },
	{ "qcow2 zstd 512 clusters", "qcow2", "compression_type=zstd,cluster_size=512",
	  QCOW2_COMPRESSION_ZSTD, 512, false },
	{ "qcow2 zstd 2M clusters", "qcow2", "compression_type=zstd,cluster_size=2M",
	  QCOW2_COMPRESSION_ZSTD, 2 << 20, false },
	{ "qcow v1", "qcow", NULL, QCOW2_COMPRESSION_ZLIB, 4096, true },
};

#define TEXT_LEN (2 << 20)	/* the -s source file: the largest cluster */

static int qemu_create(const struct qemu_fixture *fx, const char *path, const char *size)
{
	char *argv[10];
	int i = 0;

	argv[i++] = "qemu-img";
	argv[i++] = "create";
	argv[i++] = "-q";
	argv[i++] = "-f";
	argv[i++] = (char *)fx->format;
	if (fx->options) {
		argv[i++] = "-o";
		argv[i++] = (char *)fx->options;
	}
	argv[i++] = (char *)path;
	argv[i++] = (char *)size;
	argv[i] = NULL;
	return run(argv, NULL);
}

static int qemu_io(const struct qemu_fixture *fx, const char *path, const char *cmd,
		   const char *out_path)
{
	char *argv[] = { "qemu-io", "-f", (char *)fx->format, "-c", (char *)cmd,
			 (char *)path, NULL };

	return run(argv, out_path);
}

/* Guest layout: [0, half) is 0x5a, [half, 2 * half) comes from the text
 * file, half = max(64 KiB, cluster). qemu-io -s reads its file from the
 * start on every command, so with one command per cluster (qcow v1) every
 * text cluster holds the file's first cluster. Fills guest; 0 or -1. */
static int qemu_write_guest(const struct qemu_fixture *fx, const char *path,
			    const char *text_path, const uint8_t *text,
			    uint8_t *guest, size_t half)
{
	size_t step = fx->qcow1 ? fx->cluster : half;
	char cmd[4200];

	memset(guest, 0x5a, half);
	for (size_t off = 0; off < half; off += step) {
		snprintf(cmd, sizeof(cmd), "write -c -P 0x5a %zu %zu", off, step);
		if (qemu_io(fx, path, cmd, NULL))
			return -1;
		snprintf(cmd, sizeof(cmd), "write -c -s %s %zu %zu", text_path, half + off, step);
		if (qemu_io(fx, path, cmd, NULL))
			return -1;
		memcpy(guest + half + off, text, step);
	}
	return 0;
}

static void test_qemu_fixture(const struct qemu_fixture *fx, const char *dir,
			      const uint8_t *text, const char *text_path)
{
	size_t half = MAX((size_t)64 << 10, fx->cluster), nb_clusters = 2 * half / fx->cluster;
	uint8_t *guest = xmalloc(2 * half), *img = NULL;
	size_t img_len = 0, good = 0;
	unsigned cluster_bits = 0;
	char path[4096];

	snprintf(path, sizeof(path), "%s/%s.img", dir, fx->format);
	unlink(path);
	if (qemu_create(fx, path, "8M")) {
		printf("# skip %s: qemu-img create -f %s -o %s failed (built without it?)\n",
		       fx->name, fx->format, fx->options ? fx->options : "");
		goto out;
	}
	if (qemu_write_guest(fx, path, text_path, text, guest, half)) {
		printf("# skip %s: qemu-io write -c failed\n", fx->name);
		goto out;
	}
	if (read_whole(path, &img, &img_len)) {
		CHECK(false, "%s: read the image back", fx->name);
		goto out;
	}
	if (!fx->qcow1 && fx->type == QCOW2_COMPRESSION_ZSTD) {
		/* v3 header: incompatible bit 3 and compression_type at 104 */
		CHECK(img_len > 104 && get_be32(img + 100) > 104 &&
		      (get_be64(img + 72) & (1ULL << 3)) && img[104] == QCOW2_COMPRESSION_ZSTD,
		      "%s: header says compression_type zstd", fx->name);
	}

	/* every guest cluster written must be compressed and decode to it */
	for (size_t index = 0; index < nb_clusters; index++) {
		struct cref ref;
		uint8_t *src, *dst;
		int r;

		r = fx->qcow1 ? qcow1_find_compressed(img, img_len, index, &cluster_bits, &ref)
			      : qcow2_find_compressed(img, img_len, index, &cluster_bits, &ref);
		if (r || ((size_t)1 << cluster_bits) != fx->cluster) {
			CHECK(false, "%s: guest cluster %zu: no compressed descriptor (%d)",
			      fx->name, index, r);
			break;
		}
		src = compressed_bytes(img, img_len, &ref);
		if (!src) {
			CHECK(false, "%s: cluster %zu: descriptor out of the file", fx->name, index);
			break;
		}
		dst = dst_alloc(fx->cluster);
		r = qcow_decompress(fx->type, dst, fx->cluster, src, (size_t)ref.len);
		if (r == 0 && guard_intact(dst, fx->cluster) &&
		    !memcmp(dst, guest + index * fx->cluster, fx->cluster))
			good++;
		else
			CHECK(false, "%s: cluster %zu at %#llx (+%llu): decompress %d, or data differs",
			      fx->name, index, (unsigned long long)ref.host,
			      (unsigned long long)ref.len, r);
		free(dst);
		free(src);
	}
	CHECK(good == nb_clusters,
	      "%s: %zu of %zu QEMU-compressed %zu-byte clusters decode to what was written",
	      fx->name, good, nb_clusters, fx->cluster);
out:
	free(img);
	free(guest);
	unlink(path);
}

/* The other way round, for `convert`: QEMU writes a text cluster, we put
 * our stream of a 0xa5 cluster in its place (it is much shorter, so it fits
 * in QEMU's sectors) and qemu-io must read 0xa5 back. Our text stream is
 * also compared with QEMU's, for information: same library, same settings. */
static void test_qemu_reads_ours(const struct qemu_fixture *fx, const char *dir,
				 const uint8_t *text, const char *text_path)
{
	char path[4096], out_path[4200], cmd[4200];
	uint8_t *img = NULL, *mine = NULL, *out = NULL, *pattern = NULL, *qemu_bytes = NULL;
	size_t img_len = 0, out_len = 0, cluster = fx->cluster;
	unsigned cluster_bits;
	struct cref ref;
	ssize_t n;
	int r;

	snprintf(path, sizeof(path), "%s/ours-%s.img", dir, type_name(fx->type));
	snprintf(out_path, sizeof(out_path), "%s/qemu-io.out", dir);
	snprintf(cmd, sizeof(cmd), "write -c -s %s 0 %zu", text_path, cluster);
	unlink(path);
	if (qemu_create(fx, path, "1M") || qemu_io(fx, path, cmd, NULL) ||
	    read_whole(path, &img, &img_len) ||
	    qcow2_find_compressed(img, img_len, 0, &cluster_bits, &ref) ||
	    ((size_t)1 << cluster_bits) != cluster) {
		printf("# skip %s: QEMU reading our stream: no fixture\n", fx->name);
		goto out;
	}
	mine = xmalloc(ref.len);
	memset(mine, 0, ref.len);
	qemu_bytes = compressed_bytes(img, img_len, &ref);
	n = qcow_compress(fx->type, mine, (size_t)ref.len, text, cluster);
	printf("# %s: our text stream %zd bytes, %s QEMU's\n", fx->name, n,
	       n > 0 && qemu_bytes && !memcmp(qemu_bytes, mine, (size_t)n) ?
	       "identical to" : "differs from");

	pattern = xmalloc(cluster);
	memset(pattern, 0xa5, cluster);
	memset(mine, 0, ref.len);
	n = qcow_compress(fx->type, mine, (size_t)ref.len, pattern, cluster);
	if (n <= 0) {
		CHECK(false, "%s: our 0xa5 stream fits QEMU's sectors (%zd)", fx->name, n);
		goto out;
	}
	/* overwrite only what lies inside the file: nothing else lives there */
	r = write_at(path, ref.host, mine, (size_t)MIN(ref.len, img_len - ref.host));
	snprintf(cmd, sizeof(cmd), "read -P 0xa5 0 %zu", cluster);
	if (!r)
		r = qemu_io(fx, path, cmd, out_path);
	if (!r)
		r = read_whole(out_path, &out, &out_len);
	if (!r && strstr((char *)out, "Pattern verification failed"))
		r = 1;
	CHECK(r == 0, "%s: qemu-io reads our %zd-byte stream as a cluster of 0xa5 (%d)",
	      fx->name, n, r);
out:
	free(out);
	free(mine);
	free(qemu_bytes);
	free(pattern);
	free(img);
	unlink(out_path);
	unlink(path);
}

static void test_qemu(void)
{
	char dir[] = "/tmp/test-decompress.XXXXXX";
	char text_path[sizeof(dir) + 16];
	uint8_t *text;

	if (!in_path("qemu-img") || !in_path("qemu-io")) {
		printf("# skip QEMU part: qemu-img or qemu-io not in PATH\n");
		return;
	}
	if (!mkdtemp(dir)) {
		CHECK(false, "mkdtemp: %s", strerror(errno));
		return;
	}
	text = xmalloc(TEXT_LEN);
	fill_text(text, TEXT_LEN);
	snprintf(text_path, sizeof(text_path), "%s/text", dir);
	if (write_at(text_path, 0, text, TEXT_LEN)) {
		CHECK(false, "write %s", text_path);
		goto out;
	}
	for (size_t i = 0; i < ARRAY_SIZE(qemu_fixtures); i++)
		test_qemu_fixture(&qemu_fixtures[i], dir, text, text_path);
	test_qemu_reads_ours(&qemu_fixtures[0], dir, text, text_path);
	test_qemu_reads_ours(&qemu_fixtures[1], dir, text, text_path);
out:
	unlink(text_path);
	rmdir(dir);
	free(text);
}

int main(void)
{
	if (getenv("QS_TEST_DEBUG"))
		qs_log_set_level(QS_LOG_DEBUG);
	test_arguments();
	test_table();
	test_corruption_sweep();
	test_qemu();
	return tap_done();
}
