/* convert_image (convert.h) on images built in a temporary folder: raw and
 * qcow2 sources (data, zero and unallocated clusters, a compressed cluster,
 * a backing chain kept or flattened, a LUKS source), each result opened
 * again here, decrypted with its new passphrase and compared with what the
 * source holds; then the failures: a wrong source passphrase, a short read,
 * a full disk, an existing destination, the source as destination. A failed
 * conversion leaves no file behind. Also the writer's data_zero over a file
 * (fileio.c): zeros read back, no block given up, no hole filled. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "compress.h"
#include "convert.h"
#include "fileio.h"
#include "image.h"
#include "keys.h"
#include "log.h"
#include "qcow2-builder.h"
#include "tap.h"
#include "util.h"

#define CB 16			/* cluster bits of the sources */
#define CS (1ULL << CB)
#define NCL 8			/* guest clusters */
#define SIZE (NCL * CS)
#define COPIED (1ULL << 63)
#define COMPRESSED (1ULL << 62)

static char tmpdir[] = "/tmp/test-convert.XXXXXX";

static void log_to_stdout(enum qs_log_level level, const char *msg, void *userdata)
{
	(void)userdata;
	printf("# %s%s\n", level == QS_LOG_ERR ? "error: " : "", msg);
}

static const char *tmp_path(const char *name)
{
	static char paths[8][PATH_MAX];
	static int next;
	char *p = paths[next++ % 8];

	snprintf(p, PATH_MAX, "%s/%s", tmpdir, name);
	return p;
}

static bool exists(const char *path)
{
	return access(path, F_OK) == 0;
}

/* Cluster i of a pattern: bytes no two clusters share; 0 gives zeros. */
static void pattern(uint8_t *p, unsigned int seed)
{
	for (uint64_t i = 0; i < CS; i++)
		p[i] = seed ? (uint8_t)(seed * 31 + i * 7 + (i >> 9)) : 0;
}

static void write_file(const char *path, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || write(fd, buf, len) != (ssize_t)len) {
		perror(path);
		exit(99);
	}
	close(fd);
}

/* ---- building sources ---- */

static void qb_data(struct qb *b, uint64_t cl, unsigned int seed, uint8_t *expect)
{
	uint64_t d = qb_alloc_cluster(b);

	pattern(b->buf + d, seed);
	pattern(expect + cl * CS, seed);
	qb_set_l2(b, cl * CS, d | COPIED, 0);
}

static void qb_compressed(struct qb *b, uint64_t cl, unsigned int seed, uint8_t *expect)
{
	uint8_t plain[CS], out[CS];
	ssize_t n;
	uint64_t d;

	for (uint64_t i = 0; i < CS; i++)
		plain[i] = (uint8_t)("compressible "[i % 13] + seed);
	memcpy(expect + cl * CS, plain, CS);
	n = zlib_compress_cluster(out, sizeof(out), plain, sizeof(plain));
	if (n <= 0)
		exit(99);
	d = qb_alloc_cluster(b);
	memcpy(b->buf + d, out, (size_t)n);
	/* bits 0..53: host offset; 54..61: 512-byte sectors after the first */
	qb_set_l2(b, cl * CS, COMPRESSED | d | ((uint64_t)((d % 512 + (uint64_t)n - 1) / 512) << (62 - (CB - 8))),
		  0);
}

static void qb_backing(struct qb *b, const char *name)
{
	memcpy(b->buf + 512, name, strlen(name));
	qb_put64(b, 8, 512);
	qb_put32(b, 16, (uint32_t)strlen(name));
}

static void qb_write(struct qb *b, const char *path)
{
	write_file(path, b->buf, b->size);
	qb_free(b);
}

/* ---- the callbacks ---- */

struct run_ctx {
	const char *src_pp[3];		/* the passphrases given, in turn */
	int asked;
	const char *new_pp;		/* NULL: the source's */
	const char *target_dev;		/* write to this file instead (/dev/full) */
	char tmp[PATH_MAX], dst[PATH_MAX];
	int fd;
	int created, committed, aborted;
};

static int cb_passphrase(void *opaque, const char *image, struct passphrase **pp)
{
	struct run_ctx *x = opaque;
	const char *s = x->asked < 3 ? x->src_pp[x->asked++] : NULL;

	(void)image;
	if (!s)
		return -ENOKEY;
	return passphrase_from_buffer(s, strlen(s), pp);
}

static int cb_new_passphrase(void *opaque, const char *dst, struct passphrase *src_pp,
			     struct passphrase **pp)
{
	struct run_ctx *x = opaque;

	(void)dst;
	if (!x->new_pp && src_pp) {
		*pp = src_pp;
		return 0;
	}
	return passphrase_from_buffer(x->new_pp, strlen(x->new_pp), pp);
}

static int cb_create(void *opaque, const char *dst, int *fd, const char **tmp)
{
	struct run_ctx *x = opaque;

	snprintf(x->dst, sizeof(x->dst), "%s", dst);
	snprintf(x->tmp, sizeof(x->tmp), "%s", x->target_dev ? x->target_dev : dst);
	if (!x->target_dev)
		strncat(x->tmp, ".tmp", sizeof(x->tmp) - strlen(x->tmp) - 1);
	x->fd = open(x->tmp, x->target_dev ? O_WRONLY | O_CLOEXEC : O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (x->fd < 0)
		return -errno;
	x->created++;
	*fd = x->fd;
	*tmp = x->tmp;
	return 0;
}

static int cb_commit(void *opaque)
{
	struct run_ctx *x = opaque;

	x->committed++;
	close(x->fd);
	return rename(x->tmp, x->dst) < 0 ? -errno : 0;
}

static void cb_abort(void *opaque)
{
	struct run_ctx *x = opaque;

	x->aborted++;
	if (!x->target_dev)
		unlink(x->tmp);
	close(x->fd);
}

struct convert_case {
	const char *src, *dst;
	bool flatten, force;
	const struct img_io *io;	/* NULL: the source file */
};

static int run_convert(const struct convert_case *cc, struct run_ctx *x)
{
	struct luks_format_params fp = {
		.cipher = "aes", .cipher_mode = "xts-plain64", .hash = "sha256",
		.pbkdf = { .iterations = 1000 },
	};
	struct convert_params p = {
		.src_path = cc->src, .trust_names = true, .tries = 3,
		.dst_path = cc->dst, .flatten = cc->flatten, .force = cc->force, .verify_clusters = true,
		.luks = &fp, .key_bytes = 64,
		.read_passphrase = cb_passphrase, .read_new_passphrase = cb_new_passphrase,
		.create_target = cb_create, .commit_target = cb_commit, .abort_target = cb_abort,
		.opaque = x,
	};
	struct img_io io = { 0 };
	int r;

	if (!cc->io) {
		r = file_io_open(cc->src, O_RDONLY, &io);
		if (r < 0)
			return r;
	}
	p.src_io = cc->io ? cc->io : &io;
	r = convert_image(&p);
	file_io_free(&io);
	return r;
}

/* ---- reading a result ---- */

struct result {
	unsigned int data, zero, unalloc;	/* clusters of the top layer */
	bool backing;
	bool same;			/* every cluster reads as expected */
};

static bool read_top(struct image *img, struct luks_data_cipher *cipher, const uint8_t *expect,
		     const uint8_t *below, struct result *res)
{
	struct run_list runs;
	uint8_t *buf = malloc(SIZE);
	bool same = buf != NULL;

	run_list_init(&runs);
	if (!buf || image_walk_layer(img, &runs) < 0)
		same = false;
	for (size_t i = 0; same && i < runs.count; i++) {
		const struct run *rn = &runs.runs[i];
		unsigned int n = (unsigned int)(rn->len / CS);

		if (rn->kind == RUN_DATA) {
			res->data += n;
			same = img_pread(&img->io, buf, (size_t)rn->len, rn->host) == 0 &&
			       luks_data_decrypt(cipher, rn->host / 512, buf, (size_t)rn->len) == 0 &&
			       !memcmp(buf, expect + rn->guest, (size_t)rn->len);
			continue;
		}
		if (rn->kind == RUN_ZERO)
			res->zero += n;
		else
			res->unalloc += n;
		memset(buf, 0, (size_t)rn->len);
		same = !memcmp(rn->kind == RUN_UNALLOC && below ? below + rn->guest : buf, expect + rn->guest,
			       (size_t)rn->len);
	}
	run_list_free(&runs);
	free(buf);
	return same;
}

/* Open path with passphrase pp, read its top layer: below is what its
 * backing file holds (NULL: none). */
static void read_result(const char *path, const char *pp_text, const uint8_t *expect, const uint8_t *below,
			struct result *res)
{
	struct image_open_opts oo = { .format = "qcow2" };
	struct file_opener fo;
	struct image *img = NULL;
	struct passphrase *pp = NULL;
	struct volume_key *vk = NULL;
	struct luks_data_cipher *cipher = NULL;
	struct luks_info info;

	memset(res, 0, sizeof(*res));
	file_opener_init(&fo, false, &(struct trust_rules){ .trust_names = true });
	if (image_open(&fo.ops, path, &oo, &img) < 0 || img->crypt_method != IMG_CRYPT_LUKS ||
	    img->size != SIZE || passphrase_from_buffer(pp_text, strlen(pp_text), &pp) < 0 ||
	    luks_unlock(&img->io, img->crypt_header_offset, img->crypt_header_length, pp, &vk, NULL) < 0 ||
	    luks_read_info(&img->io, img->crypt_header_offset, img->crypt_header_length, &info) < 0 ||
	    luks_data_cipher_new(info.cipher_name, info.cipher_mode, vk, &cipher) < 0)
		goto out;
	res->backing = img->backing != NULL;
	res->same = read_top(img, cipher, expect, below, res);
out:
	luks_data_cipher_free(cipher);
	volume_key_free(vk);
	passphrase_free(pp);
	if (img)
		image_free(img, &file_io_opener);
}

static void check_result(const char *what, const struct result *res, unsigned int data, unsigned int zero,
			 unsigned int unalloc, bool backing)
{
	CHECK(res->same, "%s: every cluster reads as the source", what);
	CHECK(res->data == data && res->zero == zero && res->unalloc == unalloc,
	      "%s: %u data, %u zero, %u unallocated clusters (want %u, %u, %u)", what, res->data, res->zero,
	      res->unalloc, data, zero, unalloc);
	CHECK(res->backing == backing, "%s: %s backing file", what, backing ? "a" : "no");
}

/* ---- the cases ---- */

static uint8_t expect_raw[SIZE], expect_qcow2[SIZE], expect_base[SIZE], expect_chain[SIZE];

/* raw: clusters 0 and 2 data, 4 zeros written, the rest a hole */
static void test_raw(void)
{
	struct run_ctx x = { .new_pp = "new" };
	struct convert_case cc = { tmp_path("raw.img"), tmp_path("raw.qcow2") };
	struct result res;

	pattern(expect_raw, 1);
	pattern(expect_raw + 2 * CS, 2);
	write_file(cc.src, expect_raw, 5 * CS);
	if (truncate(cc.src, SIZE) < 0)
		exit(99);
	CHECK(run_convert(&cc, &x) == 0 && x.committed == 1 && !x.aborted, "raw -> LUKS qcow2");
	CHECK(x.asked == 0, "raw: no source passphrase asked");
	read_result(cc.dst, "new", expect_raw, NULL, &res);
	check_result("raw", &res, 2, 0, NCL - 2, false);
}

/* qcow2: data, zero flag, unallocated, compressed, data of zeros, data */
static void test_qcow2(void)
{
	struct run_ctx x = { .new_pp = "one" };
	struct convert_case cc = { tmp_path("plain.qcow2"), tmp_path("luks.qcow2") };
	struct result res;
	struct qb b;

	qb_init(&b, CB, SIZE, 0);
	qb_data(&b, 0, 3, expect_qcow2);
	qb_set_l2(&b, 1 * CS, 1, 0);
	qb_compressed(&b, 3, 4, expect_qcow2);
	qb_data(&b, 4, 0, expect_qcow2);
	qb_data(&b, 5, 5, expect_qcow2);
	qb_write(&b, cc.src);
	CHECK(run_convert(&cc, &x) == 0 && x.committed == 1, "qcow2 -> LUKS qcow2");
	read_result(cc.dst, "one", expect_qcow2, NULL, &res);
	/* the zero cluster stays one; the cluster of zeros is dropped */
	check_result("qcow2", &res, 3, 1, NCL - 4, false);
}

/* the result of test_qcow2 as a source: its passphrase asked until right */
static void test_luks_source(void)
{
	struct run_ctx x = { .src_pp = { "wrong", "one" }, .new_pp = "two" };
	struct run_ctx same = { .src_pp = { "one" } };
	struct run_ctx bad = { .src_pp = { "wrong", "wronger", "wrongest" }, .new_pp = "two" };
	struct convert_case cc = { tmp_path("luks.qcow2"), tmp_path("luks2.qcow2") };
	struct convert_case cc3 = { tmp_path("luks.qcow2"), tmp_path("luks3.qcow2") };
	struct result res;

	CHECK(run_convert(&cc, &x) == 0 && x.asked == 2, "LUKS -> LUKS: the second passphrase opens it");
	read_result(cc.dst, "two", expect_qcow2, NULL, &res);
	check_result("LUKS source", &res, 3, 1, NCL - 4, false);
	CHECK(run_convert(&cc3, &same) == 0, "LUKS -> LUKS with the source's passphrase");
	read_result(cc3.dst, "one", expect_qcow2, NULL, &res);
	CHECK(res.same, "the source's passphrase opens the result");
	unlink(cc3.dst);
	CHECK(run_convert(&cc3, &bad) == -EPERM && bad.asked == 3 && !bad.created,
	      "three wrong passphrases: -EPERM, no target");
	CHECK(!exists(cc3.dst), "no destination after a wrong passphrase");
}

/* base: clusters 0..3 data; top: 1 data, 2 zero, 6 data */
static void test_chain(void)
{
	struct run_ctx x = { .new_pp = "flat" }, y = { .new_pp = "kept" };
	struct convert_case flat = { tmp_path("top.qcow2"), tmp_path("flat.qcow2"), .flatten = true };
	struct convert_case kept = { tmp_path("top.qcow2"), tmp_path("kept.qcow2") };
	struct result res;
	struct qb b;

	qb_init(&b, CB, SIZE, 0);
	for (unsigned int i = 0; i < 4; i++)
		qb_data(&b, i, 10 + i, expect_base);
	qb_write(&b, tmp_path("base.qcow2"));
	memcpy(expect_chain, expect_base, SIZE);
	qb_init(&b, CB, SIZE, 0);
	qb_backing(&b, "base.qcow2");
	qb_data(&b, 1, 20, expect_chain);
	qb_set_l2(&b, 2 * CS, 1, 0);
	memset(expect_chain + 2 * CS, 0, CS);
	qb_data(&b, 6, 21, expect_chain);
	qb_write(&b, flat.src);

	CHECK(run_convert(&flat, &x) == 0, "backing chain flattened");
	read_result(flat.dst, "flat", expect_chain, NULL, &res);
	/* base clusters 0 and 3, top 1 and 6 become data; the zero cluster stays one */
	check_result("flattened", &res, 4, 1, NCL - 5, false);
	CHECK(run_convert(&kept, &y) == 0, "backing file kept");
	read_result(kept.dst, "kept", expect_chain, expect_base, &res);
	check_result("kept", &res, 2, 1, NCL - 3, true);
}

/* the source file, failing every read from fail_at on */
struct failing_io {
	struct img_io inner;
	uint64_t fail_at;
};

static int failing_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct failing_io *f = opaque;

	if (off + len > f->fail_at)
		return -EIO;
	return img_pread(&f->inner, buf, len, off);
}

static void test_failures(void)
{
	struct run_ctx x = { .new_pp = "n" }, full = { .new_pp = "n", .target_dev = "/dev/full" };
	struct run_ctx exist = { .new_pp = "n" }, self = { .new_pp = "n" };
	struct convert_case cc = { tmp_path("plain.qcow2"), tmp_path("short.qcow2") };
	struct convert_case cfull = { tmp_path("plain.qcow2"), tmp_path("full.qcow2") };
	struct convert_case cexist = { tmp_path("plain.qcow2"), tmp_path("raw.img") };
	struct convert_case cself = { tmp_path("top.qcow2"), tmp_path("base.qcow2"), .force = true };
	struct failing_io f = { .fail_at = 0 };
	struct img_io io;
	struct stat before, after;

	if (file_io_open(cc.src, O_RDONLY, &f.inner) < 0)
		exit(99);
	/* past the metadata: the reads of data clusters fail */
	f.fail_at = 6 * CS;
	io = f.inner;
	io.pread = failing_pread;
	io.extent = NULL;
	io.opaque = &f;
	cc.io = &io;
	CHECK(run_convert(&cc, &x) == -EIO && x.created && x.aborted && !x.committed, "short read: -EIO");
	CHECK(!exists(cc.dst) && !exists(x.tmp), "short read: no file left");
	file_io_free(&f.inner);

	CHECK(run_convert(&cfull, &full) == -ENOSPC && full.aborted && !full.committed, "full disk: -ENOSPC");
	CHECK(!exists(cfull.dst), "full disk: no destination");

	stat(cexist.dst, &before);
	CHECK(run_convert(&cexist, &exist) == -EEXIST && !exist.created, "existing destination: -EEXIST");
	CHECK(stat(cexist.dst, &after) == 0 && after.st_size == before.st_size && after.st_ino == before.st_ino,
	      "existing destination untouched");
	CHECK(run_convert(&cself, &self) == -EINVAL && !self.created,
	      "destination in the source chain: -EINVAL, even with force");
}

/* data_zero of file_rw_ops on a file that has its blocks (written) and a
 * hole after them: the range reads zeros, the blocks stay the file's (a
 * punched hole would have to be found again by the next write, on a full
 * file system or in a preallocated image), the hole stays a hole. */
static void test_data_zero(void)
{
	char path[PATH_MAX];
	struct qcow2_rw_ops ops;
	struct file_rw f = { 0 };
	uint8_t *buf = malloc(SIZE);
	struct stat before, after;
	int fd, r;

	snprintf(path, sizeof(path), "%s/zero.img", tmpdir);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	memset(buf, 0xa5, SIZE);
	if (fd < 0 || pwrite(fd, buf, SIZE, 0) != (ssize_t)SIZE || fsync(fd) || ftruncate(fd, 2 * SIZE) ||
	    fstat(fd, &before)) {
		CHECK(0, "data_zero: test file: %s", strerror(errno));
		goto out;
	}
	f.meta_fd = f.data_fd = fd;
	file_rw_ops(&f, &ops);
	r = ops.data_zero(ops.opaque, SIZE, SIZE / 2);
	if (r == -EOPNOTSUPP) {
		printf("# data_zero: no FALLOC_FL_ZERO_RANGE here (the writer writes zeros)\n");
		goto out;
	}
	fsync(fd);
	/* (SEEK_HOLE tells nothing: ext4 counts unwritten extents as holes) */
	CHECK(r == 0 && pread(fd, buf, SIZE, SIZE / 2) == (ssize_t)SIZE && buf[0] == 0 &&
	      !memcmp(buf, buf + 1, SIZE - 1) && fstat(fd, &after) == 0 && after.st_blocks == before.st_blocks &&
	      after.st_size == before.st_size,
	      "data_zero: over written blocks and a hole: zeros, %lld blocks before and after (%lld) (%d)",
	      (long long)before.st_blocks, (long long)after.st_blocks, r);
out:
	if (fd >= 0)
		close(fd);
	free(buf);
}

int main(void)
{
	qs_log_set_callback(log_to_stdout, NULL);
	qs_log_set_level(QS_LOG_VERBOSE);
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 99;
	}
	test_raw();
	test_qcow2();
	test_luks_source();
	test_chain();
	test_failures();
	test_data_zero();
	if (!tap_failures) {
		char cmd[PATH_MAX + 16];

		snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
		if (system(cmd) != 0)
			printf("# cannot remove %s\n", tmpdir);
	}
	return tap_done();
}
