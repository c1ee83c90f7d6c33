/* VM test tool for read-write mappings (tests/vm/guest/rw.sh).
 *
 *   rw-workload write [--seed N] [--ops N] [--max BYTES] [--flush-every K]
 *                     [--log FILE] [--region OFF:LEN]... [--after-flush CMD]
 *                     [--sequential] DEV [REF]
 *       Seeded random writes of 512 B to --max (4 MiB) bytes, sector
 *       aligned or not (buffered, through the page cache of DEV), to DEV and
 *       (same bytes) to the raw reference REF; an fsync of DEV every K
 *       writes. --sequential: each write where the last one ended (from
 *       the start again at the end), the lengths as random. --region: offsets are drawn from these areas (else the whole
 *       device). With --log, every write is logged (and the log made
 *       durable) before it is issued, and "flushed N" after each successful
 *       fsync of DEV: what a crash test needs. --after-flush: "CMD N" runs
 *       (sh -c) after each successful fsync, N the last write it covered
 *       (the write log test marks its log there). Exits 0, or 1 on the first
 *       failed write, fsync or CMD (reported on stderr).
 *   rw-workload verify LOG ORIG DEV
 *       After a crash: ORIG is the device content before the workload (raw),
 *       DEV what is there now. Every byte written by a write up to the last
 *       "flushed" line must hold what the last of those wrote, unless a later
 *       write (logged, maybe not done) touched it; every other byte must be
 *       as in ORIG. Prints the number of flushed writes checked; exits 1 on
 *       a mismatch (first offset reported, then a line "lost: N flushed
 *       writes, N bytes outside them changed").
 * Data of write number i is a function of (seed, i, byte offset). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>

#include "sysutil.h"

static uint64_t rng;

static uint64_t rnd(void)
{
	uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint8_t data_byte(uint64_t seed, uint64_t i, uint64_t off)
{
	uint64_t z = seed * 0x100000001b3ULL ^ i * 0x9e3779b97f4a7c15ULL ^ (off >> 3) * 0xbf58476d1ce4e5b9ULL;

	z ^= z >> 29;
	z *= 0x94d049bb133111ebULL;
	z ^= z >> 32;
	return (uint8_t)(z >> ((off & 7) * 8));
}

static void fill(uint8_t *buf, uint64_t seed, uint64_t i, uint64_t off, size_t len)
{
	for (size_t k = 0; k < len; k++)
		buf[k] = data_byte(seed, i, off + k);
}

static uint64_t dev_size(int fd)
{
	struct stat st;
	uint64_t sz = 0;

	if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode) && ioctl(fd, BLKGETSIZE64, &sz) == 0)
		return sz;
	return fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

/* "CMD N" by the shell; 0 when it exits 0 */
static int run_after_flush(const char *cmd, uint64_t n)
{
	char *line;
	int r;

	if (asprintf(&line, "%s %" PRIu64, cmd, n) < 0)
		return -1;
	fflush(stdout);
	r = system(line);
	if (r)
		fprintf(stderr, "%s: status %d\n", line, r);
	free(line);
	return r ? -1 : 0;
}

struct region {
	uint64_t off, len;
};

static int do_write(int argc, char **argv)
{
	uint64_t seed = 1, ops = 100, max = 4 << 20, flush_every = 8, size, next = 0;
	bool sequential = false;
	struct region regions[32];
	unsigned int nregions = 0;
	const char *log_path = NULL, *after_flush = NULL;
	FILE *log = NULL;
	uint8_t *buf;
	int fd, ref = -1, i, r;

	for (i = 2; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--seed") && i + 1 < argc)
			seed = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--ops") && i + 1 < argc)
			ops = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--max") && i + 1 < argc)
			max = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--flush-every") && i + 1 < argc)
			flush_every = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--log") && i + 1 < argc)
			log_path = argv[++i];
		else if (!strcmp(argv[i], "--after-flush") && i + 1 < argc)
			after_flush = argv[++i];
		else if (!strcmp(argv[i], "--sequential"))
			sequential = true;
		else if (!strcmp(argv[i], "--region") && i + 1 < argc && nregions < 32) {
			char *c;

			regions[nregions].off = strtoull(argv[++i], &c, 0);
			regions[nregions].len = *c == ':' ? strtoull(c + 1, NULL, 0) : 0;
			if (regions[nregions].len)
				nregions++;
		} else
			return 2;
	}
	if (argc - i < 1 || argc - i > 2)
		return 2;
	rng = seed;
	fd = open(argv[i], O_RDWR);
	if (fd < 0) {
		perror(argv[i]);
		return 1;
	}
	if (argc - i == 2) {
		ref = open(argv[i + 1], O_RDWR);
		if (ref < 0) {
			perror(argv[i + 1]);
			return 1;
		}
	}
	size = dev_size(fd);
	if (log_path) {
		log = fopen(log_path, "w");
		if (!log) {
			perror(log_path);
			return 1;
		}
		fprintf(log, "seed %" PRIu64 "\n", seed);
	}
	buf = malloc(max);
	if (!buf || size < 512)
		return 1;
	for (uint64_t n = 1; n <= ops; n++) {
		uint64_t len, off, lo = 0, hi = size;

		if (nregions) {
			const struct region *rg = &regions[rnd() % nregions];

			lo = rg->off;
			hi = rg->off + rg->len;
		}
		switch (rnd() % 4) {
		case 0: len = 512 * (1 + rnd() % 16); break;
		case 1: len = 1 + rnd() % 9000; break;
		case 2: len = 65536 * (1 + rnd() % 8); break;
		default: len = 512 + rnd() % (max - 511); break;
		}
		if (len > hi - lo)
			len = hi - lo;
		if (len > max)
			len = max;
		off = lo + rnd() % (hi - lo - len + 1);
		switch (rnd() % 4) {
		case 0: off &= ~511ULL; break;
		case 1: off &= ~4095ULL; break;
		case 2: off &= ~65535ULL; break;
		default: break;
		}
		if (off < lo)
			off = lo;
		if (sequential) {
			off = next < lo || next >= hi ? lo : next;
			if (len > hi - off)
				len = hi - off;
			next = off + len;
		}
		if (off + len > size)
			len = size - off;
		fill(buf, seed, n, off, len);
		if (log) {
			fprintf(log, "write %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", n, off, len);
			if (fflush(log) || fdatasync(fileno(log)))
				return 1;
		}
		r = fd_pwrite_all(fd, buf, len, off);
		if (r) {
			fprintf(stderr, "write %" PRIu64 " (%" PRIu64 " bytes at %" PRIu64 "): %s\n", n, len, off,
				strerror(-r));
			return 1;
		}
		if (ref >= 0 && fd_pwrite_all(ref, buf, len, off))
			return 1;
		if (flush_every && (n % flush_every == 0 || n == ops)) {
			if (fsync(fd)) {
				fprintf(stderr, "fsync after write %" PRIu64 ": %s\n", n, strerror(errno));
				return 1;
			}
			if (log) {
				fprintf(log, "flushed %" PRIu64 "\n", n);
				if (fflush(log) || fdatasync(fileno(log)))
					return 1;
			}
			if (after_flush && run_after_flush(after_flush, n))
				return 1;
		}
	}
	if (ref >= 0 && fsync(ref))
		return 1;
	printf("%" PRIu64 " writes done\n", ops);
	return 0;
}

struct logw {
	uint64_t n, off, len;
};

/* After a mismatch: the flushed writes that do not read back (a byte whose
 * last flushed writer is that write differs), and the changed bytes that no
 * write touched. known[] (1: a later write may have touched the byte) gets
 * bit 2 for the bytes claimed by a flushed write. */
static void count_lost(const struct logw *w, uint64_t nw, uint64_t flushed, uint64_t size, uint8_t *known,
		       const uint8_t *expect, const uint8_t *got)
{
	uint64_t lost = 0, outside = 0;

	for (uint64_t k = nw; k-- > 0;) {
		bool bad = false;

		if (w[k].n > flushed || w[k].off + w[k].len > size)
			continue;
		for (uint64_t o = w[k].off; o < w[k].off + w[k].len; o++) {
			if (known[o])
				continue;
			known[o] = 2;
			bad |= expect[o] != got[o];
		}
		lost += bad;
	}
	for (uint64_t o = 0; o < size; o++)
		outside += !known[o] && expect[o] != got[o];
	fprintf(stderr, "lost: %" PRIu64 " flushed writes, %" PRIu64 " bytes outside them changed\n", lost, outside);
}

static int do_verify(int argc, char **argv)
{
	uint64_t seed = 0, flushed = 0, size, nw = 0, aw = 0, checked = 0;
	struct logw *w = NULL;
	uint8_t *expect, *known, *got;
	char line[256];
	FILE *log;
	int orig, dev;

	if (argc != 5)
		return 2;
	log = fopen(argv[2], "r");
	orig = open(argv[3], O_RDONLY);
	dev = open(argv[4], O_RDONLY);
	if (!log || orig < 0 || dev < 0) {
		perror("open");
		return 1;
	}
	while (fgets(line, sizeof(line), log)) {
		struct logw x;

		if (sscanf(line, "seed %" SCNu64, &seed) == 1)
			continue;
		if (sscanf(line, "flushed %" SCNu64, &x.n) == 1) {
			flushed = x.n;
			continue;
		}
		if (sscanf(line, "write %" SCNu64 " %" SCNu64 " %" SCNu64, &x.n, &x.off, &x.len) == 3) {
			if (nw == aw) {
				aw = aw ? 2 * aw : 1024;
				w = realloc(w, aw * sizeof(*w));
			}
			w[nw++] = x;
		}
	}
	size = dev_size(dev);
	if (dev_size(orig) < size)
		size = dev_size(orig);
	expect = malloc(size);
	known = calloc(1, size);
	got = malloc(size);
	if (!expect || !known || !got)
		return 1;
	if (fd_pread_all(orig, expect, size, 0) || fd_pread_all(dev, got, size, 0)) {
		fprintf(stderr, "cannot read the images\n");
		return 1;
	}
	/* the flushed writes in order; then what later writes may have touched */
	for (uint64_t k = 0; k < nw; k++) {
		if (w[k].n > flushed)
			continue;
		if (w[k].off + w[k].len > size)
			continue;
		fill(expect + w[k].off, seed, w[k].n, w[k].off, w[k].len);
		checked++;
	}
	for (uint64_t k = 0; k < nw; k++)
		if (w[k].n > flushed && w[k].off < size)
			memset(known + w[k].off, 1, w[k].off + w[k].len > size ? size - w[k].off : w[k].len);
	for (uint64_t o = 0; o < size; o++)
		if (!known[o] && expect[o] != got[o]) {
			fprintf(stderr, "mismatch at byte %" PRIu64 " (%" PRIu64 " flushed writes of %" PRIu64 ")\n", o,
				flushed, nw);
			count_lost(w, nw, flushed, size, known, expect, got);
			return 1;
		}
	printf("verified: %" PRIu64 " flushed writes of %" PRIu64 " logged intact\n", checked, nw);
	return 0;
}

int main(int argc, char **argv)
{
	int r = 2;

	if (argc > 1 && !strcmp(argv[1], "write"))
		r = do_write(argc, argv);
	else if (argc > 1 && !strcmp(argv[1], "verify"))
		r = do_verify(argc, argv);
	if (r == 2)
		fprintf(stderr, "usage: see the head of tests/vm/prog/rw-workload.c\n");
	return r;
}
