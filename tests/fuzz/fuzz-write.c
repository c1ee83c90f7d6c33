/* libFuzzer target for the metadata writer (qcow2_rw.c) on crafted
 * images. The input is a qcow2 image, optionally followed by a script of
 * operations and a 4-byte trailer (script length, big endian, then 0x0f
 * 0x5a); without the trailer the whole input is the image and the script is
 * drawn from a hash of it (so plain image seeds write too).
 *
 * The image is opened as `qcowsetup open` does (parse, walk the chain),
 * then handed to the writer through its pure callbacks over memory: the
 * image file (growable, up to FILE_LIMIT), an external data file (a
 * pattern, writable), backing files (a raw pattern, never written: there is
 * no callback to write them). A refused image (-EUCLEAN, -ENOTSUP...) ends
 * the input. Operations: guest writes of random offset, length and content
 * through the writer, the same as "fast path" writes straight into the host
 * ranges the writer declared writable (qcow2_rw_mark_writable, ops->mapped:
 * what the kernel does for the daemon), reads, writeback, flush, close and
 * reopen. Then, with a fresh parse of the final files:
 *   - the image still opens and walks, and passes the read-write checks
 *     (validate_writable) again;
 *   - every guest byte reads as the model says (written bytes as written,
 *     the rest as before; a failed write may have happened or not), through
 *     the writer while open and through the engine's chain reader at the
 *     end, around every write (whole clusters);
 *   - every internal snapshot (up to MAX_SNAPSHOTS) walks to the same runs
 *     and reads the same content as before (its data runs, up to a budget);
 *   - when the engine's check (qemu-img check's rules) found no corruption
 *     before, it finds none after.
 * Any violation aborts. ASan/UBSan find the rest; leaks are checked at exit.
 *
 * Build: make fuzz-write (tests/fuzz/Makemodule.am); replay: tests/fuzz/fuzz-write FILE */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"
#include "check.h"
#include "image.h"
#include "io.h"
#include "log.h"
#include "qcow2.h"
#include "qcow2_rw.h"
#include "runs.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define TRAILER_MAGIC	0x0f5a
#define MAX_OPS		24
#define MAX_WRITE	(32U << 10)	/* most writes; one in eight up to BIG_WRITE */
#define BIG_WRITE	(640U << 10)	/* more than one chunk of 512 clusters of 512 bytes */
#define FILE_LIMIT	(48ULL << 20)	/* image and data file, for the writer */
#define PATTERN_SIZE	(256U << 10)	/* backing and data files */
#define MAX_SNAPSHOTS	4
#define SNAPSHOT_BUDGET	(8ULL << 20)	/* bytes of each snapshot compared */
#define MAX_FILES	32

#define FAIL(...) do { fprintf(stderr, "fuzz-write: " __VA_ARGS__); fputc('\n', stderr); abort(); } while (0)

/* ---- files in memory ---- */

struct mfile {
	uint8_t *buf;
	size_t size, alloc;
	bool writable;
	uint64_t bytes_written;
};

static int mf_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	const struct mfile *f = opaque;

	if (off > f->size || len > f->size - off)
		return -EIO;
	memcpy(buf, f->buf + off, len);
	return 0;
}

/* past the end: zeros (data files, as the daemon's preads) */
static int mf_pread_padded(struct mfile *f, void *buf, size_t len, uint64_t off)
{
	size_t n = off < f->size ? (size_t)MIN((uint64_t)len, f->size - off) : 0;

	memcpy(buf, f->buf + (n ? off : 0), n);
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

static void mf_write(struct mfile *f, const void *buf, size_t len, uint64_t off)
{
	if (!f->writable)
		FAIL("write of %zu bytes at 0x%" PRIx64 " to a file the writer must not write", len, off);
	if (off > FILE_LIMIT || len > FILE_LIMIT - off)
		FAIL("write at 0x%" PRIx64 " (%zu bytes) beyond the file limit", off, len);
	if (off + len > f->alloc) {
		size_t na = MAX((size_t)(off + len), f->alloc * 2);
		uint8_t *p = realloc(f->buf, na);

		if (!p)
			abort();
		memset(p + f->alloc, 0, na - f->alloc);
		f->buf = p;
		f->alloc = na;
	}
	memcpy(f->buf + off, buf, len);
	if (off + len > f->size)
		f->size = off + len;
	f->bytes_written += len;
}

static void mf_init(struct mfile *f, const void *data, size_t size, bool writable)
{
	memset(f, 0, sizeof(*f));
	f->alloc = size ? size : 1;
	f->buf = malloc(f->alloc);
	if (!f->buf)
		abort();
	memcpy(f->buf, data, size);
	f->size = size;
	f->writable = writable;
}

static void mf_free(struct mfile *f)
{
	free(f->buf);
	memset(f, 0, sizeof(*f));
}

static uint8_t pattern[PATTERN_SIZE];

/* ---- the state of one input ---- */

struct wr {
	uint64_t off, len;
	uint8_t seed;
	bool failed;		/* may have happened or not */
};

struct extent {
	uint64_t guest, len, host;
};

struct state {
	struct mfile file, orig_file;
	struct mfile *files[MAX_FILES];	/* the first open's other files (data, backing) */
	char *names[MAX_FILES];		/* their paths, for the later opens */
	unsigned int nfiles;
	const uint8_t *input;		/* the image bytes, for backing_mode 1 */
	size_t isize;
	int backing_mode;		/* first open: 0 raw pattern, 1 the input without its backing name */
	struct mfile pattern_file;	/* backing files after the first open */
	struct mfile *data, *orig_data;	/* the external data file, if any */
	bool opened;			/* data_path is known */
	char *data_path;
	bool no_backing;
	struct image *img;		/* the image the writer has */
	struct image *orig;		/* the input, for what was there before */
	struct chain_reader *orig_reader, *backing_reader;
	struct qcow2_rw *w;
	struct qcow2_rw_opts wopts;
	bool failed_writes;		/* a write failed: the writer may be broken */
	struct wr writes[MAX_OPS];
	unsigned int nwrites;
	struct extent *writable;	/* guest ranges written straight to the host */
	size_t nwritable, awritable;
	uint64_t *allocated;		/* starts of allocated runs at the first open */
	size_t nallocated;
	unsigned int fast_writes, reopens;
	uint8_t *exp, *alt, *amb, *got;	/* model buffers */
	uint64_t buf_len;
};

/* The first open gets a new file for each name: a raw pattern, or (mode
 * 1, for images whose backing file must be qcow2) the input itself without
 * its backing file name. The one that turns out to be the external data
 * file becomes writable. Later opens get the same files by name (the data
 * file: s->data, which the open of the original swaps for its copy). */
static int open_file(void *opaque, const struct img_open_req *req, struct img_io *io)
{
	const char *path = req->path;
	struct state *s = opaque;
	struct mfile *f = NULL;

	if (s->opened) {
		if (s->data_path && s->data && !strcmp(path, s->data_path))
			f = s->data;
		for (unsigned int i = 0; !f && i < s->nfiles; i++)
			if (!strcmp(path, s->names[i]))
				f = s->files[i];
		if (!f)
			f = &s->pattern_file;
	} else {
		if (s->nfiles == MAX_FILES)
			return -ENOENT;
		f = calloc(1, sizeof(*f));
		s->names[s->nfiles] = strdup(path);
		if (!f || !s->names[s->nfiles])
			abort();
		if (s->backing_mode == 0) {
			mf_init(f, pattern, PATTERN_SIZE, false);
		} else {
			mf_init(f, s->input, s->isize, false);
			if (f->size >= 20)
				memset(f->buf + 8, 0, 12);	/* backing name offset and length */
		}
		s->files[s->nfiles++] = f;
	}
	memset(io, 0, sizeof(*io));
	io->pread = mf_pread;
	io->opaque = f;
	io->size = f->size;
	io->name = "fuzz.other";
	return 0;
}

static void close_file(void *opaque, struct img_io *io)
{
	(void)opaque;
	(void)io;
}

static int open_image(struct state *s, struct mfile *f, bool no_backing, struct image **img)
{
	struct img_opener opener = { .open = open_file, .close = close_file, .opaque = s };
	struct image_open_opts opts = { .no_backing = no_backing };
	struct img_io io = { .pread = mf_pread, .opaque = f, .size = f->size, .name = "fuzz.img" };

	return image_open_io(&opener, &io, &opts, img);
}

static void free_image(struct image **img)
{
	struct img_opener opener = { .open = open_file, .close = close_file };

	image_free(*img, &opener);
	*img = NULL;
}

/* ---- what the writer is given ---- */

static struct mfile *data_of(struct state *s)
{
	return s->data ? s->data : &s->file;
}

static int op_meta_pwrite(void *opaque, const void *buf, size_t len, uint64_t off)
{
	struct state *s = opaque;

	mf_write(&s->file, buf, len, off);
	return 0;
}

static int op_flush(void *opaque)
{
	(void)opaque;
	return 0;
}

static int op_data_pread(void *opaque, void *buf, size_t len, uint64_t host)
{
	struct state *s = opaque;

	if ((host | len) % 512)
		FAIL("unaligned data read of %zu bytes at 0x%" PRIx64, len, host);
	return mf_pread_padded(data_of(s), buf, len, host);
}

static int op_data_pwrite(void *opaque, const void *buf, size_t len, uint64_t host)
{
	struct state *s = opaque;

	if ((host | len) % 512)
		FAIL("unaligned data write of %zu bytes at 0x%" PRIx64, len, host);
	if (!s->data && host < s->img->cluster_size)
		FAIL("data write at 0x%" PRIx64 " on the header cluster", host);
	mf_write(data_of(s), buf, len, host);
	return 0;
}

static int op_backing_pread(void *opaque, void *buf, size_t len, uint64_t guest)
{
	struct state *s = opaque;

	if (guest > s->img->size || len > s->img->size - guest)
		FAIL("backing read at 0x%" PRIx64 " beyond the guest size", guest);
	return chain_read(s->backing_reader, buf, len, guest);
}

static void add_writable(struct state *s, uint64_t guest, uint64_t len, uint64_t host)
{
	if (s->nwritable == s->awritable) {
		size_t na = s->awritable ? 2 * s->awritable : 64;
		struct extent *p = realloc(s->writable, na * sizeof(*p));

		if (!p)
			abort();
		s->writable = p;
		s->awritable = na;
	}
	s->writable[s->nwritable++] = (struct extent){ .guest = guest, .len = len, .host = host };
}

static void op_mapped(void *opaque, uint64_t guest, uint64_t len, uint64_t host)
{
	struct state *s = opaque;

	if (!len || guest % 512 || len % 512 || host % 512 || guest > s->img->size || len > s->img->size - guest)
		FAIL("bad mapping announced: guest 0x%" PRIx64 " +%" PRIu64 " host 0x%" PRIx64, guest, len, host);
	add_writable(s, guest, len, host);
}

/* layer reads for chain readers: depth 0 the top's data, below the backing files */
static int layer_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	const struct image *l = opaque;

	return mf_pread_padded(l->data_io.opaque, buf, len, off);
}

static int open_reader(struct image *img, struct chain_reader **cr)
{
	struct chain_layer_io lio[IMG_MAX_CHAIN_DEPTH] = { 0 };

	for (struct image *l = img; l; l = l->backing) {
		if (l->depth < 0 || l->depth >= IMG_MAX_CHAIN_DEPTH)
			return -ELOOP;
		lio[l->depth].data_pread = layer_pread;
		lio[l->depth].opaque = l;
	}
	return chain_reader_open(img, lio, IMG_MAX_CHAIN_DEPTH, cr);
}

/* ---- the writer ---- */

static int writer_open(struct state *s)
{
	struct qcow2_rw_ops ops = {
		.meta_pwrite = op_meta_pwrite,
		.meta_flush = op_flush,
		.data_pread = op_data_pread,
		.data_pwrite = op_data_pwrite,
		.data_flush = s->data ? op_flush : NULL,
		.backing_pread = s->img->backing ? op_backing_pread : NULL,
		.mapped = op_mapped,
		.opaque = s,
	};
	struct run_list runs, marked;
	int r;

	if (s->img->backing) {
		r = open_reader(s->img->backing, &s->backing_reader);
		if (r < 0)
			return r;
	}
	r = qcow2_rw_open(s->img, &ops, &s->wopts, &s->w);
	if (r < 0)
		return r;
	/* what the daemon maps straight to the host */
	s->nwritable = 0;
	run_list_init(&runs);
	run_list_init(&marked);
	r = image_map_chain(s->img, &runs);
	if (r == 0)
		r = qcow2_rw_mark_writable(s->w, &runs, &marked);
	if (r == 0 && !s->allocated) {
		/* writes aimed at what is there: data, compressed, zero clusters */
		s->allocated = calloc(runs.count + 1, sizeof(*s->allocated));
		if (!s->allocated)
			abort();
		for (size_t i = 0; i < runs.count; i++)
			if (runs.runs[i].depth == 0 && runs.runs[i].kind != RUN_UNALLOC)
				s->allocated[s->nallocated++] = runs.runs[i].guest;
	}
	for (size_t i = 0; r == 0 && i < marked.count; i++) {
		const struct run *ru = &marked.runs[i];

		if (ru->flags & RUN_F_WRITABLE) {
			if (ru->depth != 0 || ru->kind != RUN_DATA)
				FAIL("writable run of kind %u at depth %u", ru->kind, ru->depth);
			add_writable(s, ru->guest, ru->len, ru->host);
		}
	}
	run_list_free(&runs);
	run_list_free(&marked);
	return r;
}

/* The image as it is now, parsed afresh: it must open and walk. */
static void reparse(struct state *s)
{
	chain_reader_free(s->backing_reader);
	s->backing_reader = NULL;
	free_image(&s->img);
	if (open_image(s, &s->file, s->no_backing, &s->img) < 0)
		FAIL("the written image does not open again");
}

/* ---- the model ---- */

static uint8_t content(const struct wr *w, uint64_t guest)
{
	uint64_t i = guest - w->off;

	return (uint8_t)(w->seed * 37u + (i * 131u) + (i >> 9) * 7u + 1u);
}

static void fill(const struct wr *w, uint8_t *buf)
{
	for (uint64_t i = 0; i < w->len; i++)
		buf[i] = content(w, w->off + i);
}

static void reserve(struct state *s, uint64_t len)
{
	if (len <= s->buf_len)
		return;
	free(s->exp);
	free(s->alt);
	free(s->amb);
	free(s->got);
	s->exp = malloc(len);
	s->alt = malloc(len);
	s->amb = malloc(len);
	s->got = malloc(len);
	if (!s->exp || !s->alt || !s->amb || !s->got)
		abort();
	s->buf_len = len;
}

/* exp/alt/amb for [off, off + len): amb 0 exact, 1 exp or alt, 2 anything
 * (the content before could not be read: a corrupt compressed cluster) */
static void model(struct state *s, uint64_t off, uint64_t len)
{
	uint64_t cs = s->orig->cluster_size;

	reserve(s, len);
	memset(s->amb, 0, len);
	for (uint64_t p = off; p < off + len;) {
		uint64_t n = MIN(off + len - p, cs - (p & (cs - 1)));

		if (chain_read(s->orig_reader, s->exp + (p - off), n, p) < 0)
			memset(s->amb + (p - off), 2, n);
		p += n;
	}
	for (unsigned int k = 0; k < s->nwrites; k++) {
		const struct wr *w = &s->writes[k];
		uint64_t a = MAX(off, w->off), b = MIN(off + len, w->off + w->len);

		for (uint64_t p = a; p < b; p++) {
			uint64_t i = p - off;

			if (!w->failed) {
				s->exp[i] = content(w, p);
				s->amb[i] = s->amb[i] == 2 ? 2 : 0;
			} else if (s->amb[i] == 0) {
				s->alt[i] = content(w, p);
				s->amb[i] = 1;
			} else {
				s->amb[i] = 2;
			}
		}
	}
}

static void compare(struct state *s, uint64_t off, uint64_t len, const char *what)
{
	for (uint64_t i = 0; i < len; i++) {
		uint8_t g = s->got[i];

		if (s->amb[i] == 2 || g == s->exp[i] || (s->amb[i] == 1 && g == s->alt[i]))
			continue;
		FAIL("%s: guest byte 0x%" PRIx64 " reads 0x%02x, expected 0x%02x%s", what, off + i, g, s->exp[i],
		     s->amb[i] ? " (or the failed write's)" : "");
	}
}

/* The clusters around [off, off + len), capped to the guest size. */
static void around(const struct state *s, uint64_t off, uint64_t len, uint64_t *a, uint64_t *b)
{
	uint64_t cs = s->orig->cluster_size;

	*a = off & ~(cs - 1);
	*b = MIN(round_up_pow2(off + len, cs), s->orig->size);
}

/* ---- operations ---- */

struct script {
	const uint8_t *p;
	size_t left;
	uint64_t rng;		/* when the script is drawn from a hash */
	bool drawn;
};

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* n bytes of the script as a number; false when it is exhausted */
static bool take(struct script *sc, unsigned int n, uint64_t *v)
{
	*v = 0;
	if (sc->drawn) {
		*v = splitmix(&sc->rng) & (n >= 8 ? ~0ULL : (1ULL << (8 * n)) - 1);
		return true;
	}
	if (sc->left < n)
		return false;
	for (unsigned int i = 0; i < n; i++)
		*v = *v << 8 | sc->p[i];
	sc->p += n;
	sc->left -= n;
	return true;
}

/* A guest range chosen by the script: [off, off + len) inside the guest. */
static bool pick_range(struct state *s, struct script *sc, unsigned int mode, uint64_t *off, uint64_t *len)
{
	uint64_t size = s->img->size, cs = s->img->cluster_size, o, l;

	if (!take(sc, 5, &o) || !take(sc, 3, &l))
		return false;
	if (!size)
		return false;
	l = 1 + (l & 0x1fffff) % MIN((uint64_t)(l >> 21 == 7 ? BIG_WRITE : MAX_WRITE), size);
	if ((mode & 4) && s->nallocated) {
		/* at (or just around) a run the image had: compressed clusters
		 * are rewritten, shared ones copied */
		o = s->allocated[(o >> 16) % s->nallocated] + (o & 0xffff) % (2 * cs) - MIN(cs, s->allocated[(o >> 16) % s->nallocated]);
		o = MIN(o, size - 1);
		if (mode & 8)
			o &= ~(cs - 1);
		*off = o;
		*len = MIN(l, size - o);
		return *len > 0;
	}
	switch (mode & 3) {
	case 0:
		o %= size;
		break;
	case 1:
		o = (o % size) & ~511ULL;
		l = round_up_pow2(l, 512);
		break;
	case 2:		/* whole clusters */
		o = (o % size) & ~(cs - 1);
		l = cs * (1 + l % 4);
		break;
	default:
		o = size - MIN(l, size);	/* the end of the disk */
		break;
	}
	*off = o;
	*len = MIN(l, size - o);
	return *len > 0;
}

/* A write straight to the host, as the kernel does on a mapping the writer
 * declared writable: somewhere inside one writable extent. */
static bool fast_write(struct state *s, struct script *sc)
{
	struct wr *w = &s->writes[s->nwrites];
	const struct extent *e;
	uint64_t i, o, l, seed;

	if (!s->nwritable || !take(sc, 2, &i) || !take(sc, 3, &o) || !take(sc, 2, &l) || !take(sc, 1, &seed))
		return false;
	e = &s->writable[i % s->nwritable];
	o %= e->len;
	w->off = e->guest + o;
	w->len = 1 + l % MIN(e->len - o, (uint64_t)MAX_WRITE);
	w->seed = (uint8_t)seed;
	w->failed = false;
	reserve(s, w->len);
	fill(w, s->got);
	s->nwrites++;
	mf_write(data_of(s), s->got, w->len, e->host + o);
	s->fast_writes++;
	return true;
}

static void do_write(struct state *s, struct script *sc, unsigned int op)
{
	struct wr *w = &s->writes[s->nwrites];
	uint64_t seed;
	int r;

	if (s->nwrites == MAX_OPS)
		return;
	if ((op & 7) == 1 && fast_write(s, sc))
		return;
	if (!pick_range(s, sc, op >> 3, &w->off, &w->len) || !take(sc, 1, &seed))
		return;
	w->seed = (uint8_t)seed;
	w->failed = false;
	reserve(s, w->len);
	fill(w, s->got);
	s->nwrites++;
	r = qcow2_rw_write(s->w, s->got, w->len, w->off);
	if (r == 0)
		return;
	/* no room, a cluster that cannot be read for a copy on write, a
	 * refcount table that cannot grow, or a writer that stopped */
	if (r != -ENOSPC && r != -EIO && r != -EFBIG)
		FAIL("write of %" PRIu64 " bytes at 0x%" PRIx64 ": %s", w->len, w->off, strerror(-r));
	w->failed = true;
	s->failed_writes = true;
}

static void do_read(struct state *s, struct script *sc, unsigned int op)
{
	uint64_t off, len, a, b;
	int r;

	if (!pick_range(s, sc, op >> 3, &off, &len))
		return;
	around(s, off, len, &a, &b);
	model(s, a, b - a);
	r = qcow2_rw_read(s->w, s->got, b - a, a);
	if (r == -EIO)
		return;		/* a corrupt compressed cluster */
	if (r < 0)
		FAIL("read of %" PRIu64 " bytes at 0x%" PRIx64 ": %s", b - a, a, strerror(-r));
	compare(s, a, b - a, "writer read");
}

static void do_reopen(struct state *s)
{
	int r = qcow2_rw_close(s->w, NULL);

	s->w = NULL;
	if (r < 0 && !s->failed_writes)
		FAIL("close: %s", strerror(-r));
	reparse(s);
	r = writer_open(s);
	if (r < 0)
		FAIL("the written image is refused on reopen: %s", strerror(-r));
	s->reopens++;
}

/* ---- the final checks ---- */

static void check_active(struct state *s)
{
	struct chain_reader *cr = NULL;
	uint64_t a, b;

	if (open_reader(s->img, &cr) < 0)
		FAIL("the written image does not walk");
	for (unsigned int k = 0; k < s->nwrites; k++) {
		around(s, s->writes[k].off, s->writes[k].len, &a, &b);
		model(s, a, b - a);
		for (uint64_t p = a; p < b;) {
			uint64_t n = MIN(b - p, s->orig->cluster_size - (p & (s->orig->cluster_size - 1)));

			if (chain_read(cr, s->got + (p - a), n, p) < 0)
				memset(s->amb + (p - a), 2, n);	/* compared only where it reads */
			p += n;
		}
		compare(s, a, b - a, "after");
	}
	chain_reader_free(cr);
}

static bool same_runs(const struct run_list *x, const struct run_list *y)
{
	if (x->count != y->count)
		return false;
	for (size_t i = 0; i < x->count; i++) {
		const struct run *a = &x->runs[i], *b = &y->runs[i];

		if (a->guest != b->guest || a->len != b->len || a->kind != b->kind || a->depth != b->depth ||
		    a->flags != b->flags || ((a->kind == RUN_DATA || a->kind == RUN_COMPRESSED ||
					       (a->flags & RUN_F_HOST)) && a->host != b->host))
			return false;
	}
	return true;
}

static void check_snapshots(struct state *s)
{
	uint8_t *x = malloc(65536), *y = malloc(65536);

	if (!x || !y)
		abort();
	for (uint32_t i = 0; i < s->orig->nb_snapshots && i < MAX_SNAPSHOTS; i++) {
		struct chain_reader *before = NULL, *after = NULL;
		const struct run_list *runs;
		uint64_t budget = SNAPSHOT_BUDGET;

		if (i >= s->img->nb_snapshots || strcmp(s->orig->snapshots[i].id, s->img->snapshots[i].id))
			FAIL("snapshot %u disappeared", i);
		if (image_select_snapshot(s->orig, s->orig->snapshots[i].id) < 0 ||
		    open_reader(s->orig, &before) < 0)
			continue;	/* it did not walk before */
		if (image_select_snapshot(s->img, s->img->snapshots[i].id) < 0 || open_reader(s->img, &after) < 0)
			FAIL("snapshot %s walked before the writes, not after", s->orig->snapshots[i].id);
		runs = chain_reader_runs(before);
		if (!same_runs(runs, chain_reader_runs(after)))
			FAIL("snapshot %s maps differently after the writes", s->orig->snapshots[i].id);
		for (size_t k = 0; k < runs->count && budget; k++) {
			const struct run *ru = &runs->runs[k];

			if (ru->kind != RUN_DATA && ru->kind != RUN_COMPRESSED)
				continue;
			for (uint64_t p = ru->guest; p < ru->guest + ru->len && budget;) {
				uint64_t n = MIN(MIN(ru->guest + ru->len - p, 65536), budget);

				if (chain_read(before, x, n, p) == 0 &&
				    (chain_read(after, y, n, p) < 0 || memcmp(x, y, n)))
					FAIL("snapshot %s: guest 0x%" PRIx64 " (+%" PRIu64 ") changed",
					     s->orig->snapshots[i].id, p, n);
				p += n;
				budget -= n;
			}
		}
		chain_reader_free(before);
		chain_reader_free(after);
	}
	image_select_snapshot(s->orig, NULL);
	image_select_snapshot(s->img, NULL);
	free(x);
	free(y);
}

/* ---- one input ---- */

static void drop_files(struct state *s)
{
	for (unsigned int i = 0; i < s->nfiles; i++) {
		mf_free(s->files[i]);
		free(s->files[i]);
		free(s->names[i]);
	}
	s->nfiles = 0;
}

static void state_free(struct state *s)
{
	qcow2_rw_free(s->w);
	chain_reader_free(s->backing_reader);
	chain_reader_free(s->orig_reader);
	free_image(&s->img);
	free_image(&s->orig);
	drop_files(s);
	if (s->orig_data) {
		mf_free(s->orig_data);
		free(s->orig_data);
	}
	mf_free(&s->file);
	mf_free(&s->orig_file);
	free(s->data_path);
	free(s->writable);
	free(s->allocated);
	free(s->exp);
	free(s->alt);
	free(s->amb);
	free(s->got);
	free(s);
}

static bool verbose;

static void quiet(enum qs_log_level level, const char *msg, void *userdata)
{
	(void)level;
	(void)userdata;
	if (verbose)
		fprintf(stderr, "  log: %s\n", msg);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	for (size_t i = 0; i < sizeof(pattern); i++)
		pattern[i] = (uint8_t)(0xa5 ^ (i * 7) ^ (i >> 8));
	pattern[0] = 0;	/* not a qcow magic: probed as raw */
	verbose = getenv("FUZZ_WRITE_VERBOSE") != NULL;
	qs_log_set_callback(quiet, NULL);
	qs_log_set_level(QS_LOG_DEBUG);	/* format every message: it must not crash either */
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct script sc = { 0 };
	struct qcow2_check_result res;
	struct state *s;
	size_t isize = size;
	bool clean_before;
	uint64_t flags = 0;
	int r;

	if (size >= 4 && get_be16(data + size - 2) == TRAILER_MAGIC && get_be16(data + size - 4) <= size - 4) {
		size_t n = get_be16(data + size - 4);

		isize = size - 4 - n;
		sc.p = data + isize;
		sc.left = n;
	} else {
		sc.drawn = true;
		sc.rng = size;
		for (size_t i = 0; i < size; i++)
			sc.rng = (sc.rng ^ data[i]) * 0x100000001b3ULL;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		abort();
	s->pattern_file = (struct mfile){ .buf = pattern, .size = PATTERN_SIZE, .alloc = PATTERN_SIZE };
	mf_init(&s->file, data, isize, true);
	mf_init(&s->orig_file, data, isize, false);
	s->input = data;
	s->isize = isize;
	r = open_image(s, &s->file, false, &s->img);
	if (r < 0) {
		/* a backing file that must be qcow2: the input without its backing name */
		drop_files(s);
		s->backing_mode = 1;
		r = open_image(s, &s->file, false, &s->img);
	}
	if (r < 0) {
		drop_files(s);
		s->no_backing = true;
		r = open_image(s, &s->file, true, &s->img);
	}
	if (r < 0 || s->img->format != IMG_FMT_QCOW2)
		goto out;
	s->opened = true;
	if (s->img->has_data_file) {
		s->data = s->img->data_io.opaque;
		s->data->writable = true;
		s->data_path = image_resolve_path(s->img->path, s->img->data_file);
		s->orig_data = calloc(1, sizeof(*s->orig_data));
		if (!s->data_path || !s->orig_data)
			abort();
		mf_init(s->orig_data, s->data->buf, s->data->size, false);
	}
	/* `qcowsetup open` walks the chain before the daemon writes */
	{
		struct run_list runs;

		run_list_init(&runs);
		r = image_map_chain(s->img, &runs);
		run_list_free(&runs);
		if (r < 0)
			goto out;
	}
	take(&sc, 1, &flags);
	/* a file limit close to the current size: -ENOSPC, undone allocations */
	s->wopts.file_limit = (flags & 0x30) == 0x30 ? round_up_pow2(isize, s->img->cluster_size) + (flags >> 6) * 3 *
			      s->img->cluster_size : FILE_LIMIT;
	s->wopts.data_file_limit = FILE_LIMIT;
	/* small caches: evictions (the default 8 MiB costs 16 MiB of memset per open) */
	s->wopts.cache_bytes = (flags & 3) == 0 ? 1 : (flags & 3) == 1 ? 65536 : (flags & 3) == 2 ? 256 << 10 : 1 << 20;
	s->wopts.write_through = flags & 4;
	s->wopts.resume = flags & 8;
	r = writer_open(s);
	if (r < 0)
		goto out;	/* refused: fine */
	/* (the open wrote header fields at most: not what the check counts) */
	memset(&res, 0, sizeof(res));
	clean_before = qcow2_check(s->img, &res) == 0 && !res.corruptions;
	/* the same bytes, never written: what the guest saw before */
	{
		struct mfile *d = s->data;

		s->data = s->orig_data;		/* the opener serves the untouched copy */
		r = open_image(s, &s->orig_file, s->no_backing, &s->orig);
		s->data = d;
		if (r < 0 || open_reader(s->orig, &s->orig_reader) < 0)
			FAIL("the same bytes do not open twice");
	}
	for (unsigned int n = 0; n < MAX_OPS; n++) {
		uint64_t op;

		if (!take(&sc, 1, &op) || (sc.drawn && n == 16))
			break;
		switch (op % 8) {
		case 0:
		case 1:
		case 2:
			do_write(s, &sc, (unsigned int)op);
			break;
		case 3:
			do_read(s, &sc, (unsigned int)op);
			break;
		case 4:
			r = qcow2_rw_writeback(s->w);
			if (r < 0 && !s->failed_writes)
				FAIL("writeback: %s", strerror(-r));
			break;
		case 5:
			r = qcow2_rw_flush(s->w);
			if (r < 0 && !s->failed_writes)
				FAIL("flush: %s", strerror(-r));
			break;
		case 6:
			do_reopen(s);
			break;
		default:
			/* whole clusters through the writer */
			do_write(s, &sc, 2 << 3);
			break;
		}
	}
	{
		uint64_t used_end = 0;

		r = qcow2_rw_close(s->w, flags & 0x40 ? &used_end : NULL);
		s->w = NULL;
		if (r < 0 && !s->failed_writes)
			FAIL("close: %s", strerror(-r));
		/* (refcounts may count clusters past the end of the file: leaks) */
		if (r == 0 && used_end % s->img->cluster_size)
			FAIL("close: used end 0x%" PRIx64 " is not a cluster boundary", used_end);
	}
	reparse(s);
	{
		struct run_list runs;

		run_list_init(&runs);
		r = image_map_chain(s->img, &runs);
		run_list_free(&runs);
		if (r < 0)
			FAIL("the written image does not walk: %s", strerror(-r));
	}
	if (validate_writable(s->img) < 0)
		FAIL("the written image fails the read-write checks");
	if (clean_before) {
		memset(&res, 0, sizeof(res));
		r = qcow2_check(s->img, &res);
		if (r < 0 || res.corruptions)
			FAIL("the check finds %" PRIu64 " corruptions after the writes (%d)", res.corruptions, r);
	}
	check_active(s);
	check_snapshots(s);
	if (verbose)
		fprintf(stderr, "fuzz-write: %u writes (%u straight to the host), %u reopens, %" PRIu64 " bytes written to the image file, %" PRIu64 " to the data file, %u snapshots\n",
			s->nwrites, s->fast_writes, s->reopens, s->file.bytes_written, s->data ? s->data->bytes_written : 0,
			s->img->nb_snapshots);
out:
	state_free(s);
	return 0;
}
