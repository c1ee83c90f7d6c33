/* Keys: secure memory helpers, the entropy test, LUKS1 header parsing and
 * cipher specs (pure), then QEMU as the oracle: legacy AES images (qcow2
 * and qcow v1) written by qemu-io and decrypted here, the legacy key check
 * on an ext4 filesystem converted by qemu-img, and LUKS headers unlocked
 * through libcryptsetup. Fixtures are made at test time in a temporary
 * folder; without qemu-img the QEMU part is skipped (exit 77 if the pure
 * part passed). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "image.h"
#include "keys.h"
#include "log.h"
#include "tap.h"
#include "util.h"

static char tmpdir[256];
static bool have_mkfs;

/* ---- helpers ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint8_t rng_byte(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint8_t)((rng_state * 0x2545f4914f6cdd1dULL) >> 56);
}

static void fill_random(uint8_t *p, size_t len)
{
	while (len--)
		*p++ = rng_byte();
}

static bool sh_quiet;

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	fflush(stdout);
	st = system(cmd);
	if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st)) {
		if (!sh_quiet)
			printf("# command failed: %s\n", cmd);
		return -1;
	}
	return 0;
}

/* The engine's messages, expected errors included, as comments. */
static void log_to_stdout(enum qs_log_level level, const char *msg, void *userdata)
{
	printf("# %s%s\n", level == QS_LOG_ERR ? "error: " : "", msg);
}

static bool have_program(const char *name)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1 || test -x /sbin/%s || test -x /usr/sbin/%s",
		 name, name, name);
	return system(cmd) == 0;
}

static char *path_in_tmp(const char *name)
{
	static char buf[8][512];
	static int i;

	i = (i + 1) % 8;
	snprintf(buf[i], sizeof(buf[i]), "%s/%s", tmpdir, name);
	return buf[i];
}

/* qemu-img create for LUKS measures PBKDF2 speed through the thread CPU
 * clock and fails now and then on short iter-times ("Unable to get accurate
 * CPU usage"): retry. */
static int create_luks(const char *file, const char *extra)
{
	int i, r = -1;

	for (i = 0; i < 8 && r < 0; i++) {
		sh_quiet = i < 7;
		r = sh("qemu-img create -q -f qcow2 --object secret,id=s0,data=PASS "
		       "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10%s %s 4M 2>/dev/null",
		       extra, path_in_tmp(file));
	}
	sh_quiet = false;
	return r;
}

static int qemu_io(const char *driver, const char *file, const char *secret, const char *cmds)
{
	return sh("qemu-io --object secret,id=s0,data=%s --image-opts "
		  "driver=%s,file.filename=%s,encrypt.key-secret=s0 %s >/dev/null",
		  secret, driver, path_in_tmp(file), cmds);
}

/* Files for image_open */
struct tfile {
	int fd;
	char *name;
};

static int t_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	struct tfile *f = opaque;
	ssize_t n = pread(f->fd, buf, len, (off_t)off);

	return n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
}

static int t_open(void *opaque, const struct img_open_req *req, struct img_io *io)
{
	const char *path = req->path;
	struct tfile *f = calloc(1, sizeof(*f));
	struct stat st;

	if (!f)
		return -ENOMEM;
	f->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (f->fd < 0 || fstat(f->fd, &st) < 0) {
		int r = -errno;

		if (f->fd >= 0)
			close(f->fd);
		free(f);
		return r;
	}
	f->name = strdup(path);
	memset(io, 0, sizeof(*io));
	io->pread = t_pread;
	io->opaque = f;
	io->size = (uint64_t)st.st_size;
	io->name = f->name;
	return 0;
}

static void t_close(void *opaque, struct img_io *io)
{
	struct tfile *f = io->opaque;

	if (f) {
		close(f->fd);
		free(f->name);
		free(f);
	}
	io->opaque = NULL;
}

static const struct img_opener t_opener = { .open = t_open, .close = t_close };

static struct image *open_image(const char *file)
{
	struct image_open_opts o = { .no_backing = true };
	struct image *img = NULL;
	int r = image_open(&t_opener, path_in_tmp(file), &o, &img);

	CHECK(r == 0 && img, "image_open %s: %d", file, r);
	return r == 0 ? img : NULL;
}

static int read_file_at(const char *file, void *buf, size_t len, uint64_t off)
{
	int fd = open(path_in_tmp(file), O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = pread(fd, buf, len, (off_t)off);
	close(fd);
	return n == (ssize_t)len ? 0 : -EIO;
}

/* Host offset of guest byte g, read straight from the L1/L2 tables: an
 * oracle independent of the engine's walker. 0 = unallocated. */
static uint64_t host_offset(const char *file, uint64_t g)
{
	uint8_t h[48], e[8];
	unsigned int cb, l2b;
	uint64_t l1, l2, ent, mask;
	bool v1;

	if (read_file_at(file, h, sizeof(h), 0) < 0)
		return 0;
	v1 = get_be32(h + 4) == 1;
	if (v1) {
		cb = h[32];
		l2b = h[33];
		mask = ~(1ULL << 63);
	} else {
		cb = get_be32(h + 20);
		l2b = cb - 3;
		mask = 0x00fffffffffffe00ULL;
	}
	l1 = get_be64(h + 40);
	if (read_file_at(file, e, 8, l1 + 8 * (g >> (cb + l2b))) < 0)
		return 0;
	l2 = get_be64(e) & mask;
	if (!l2 || read_file_at(file, e, 8, l2 + 8 * ((g >> cb) & ((1ULL << l2b) - 1))) < 0)
		return 0;
	ent = get_be64(e) & mask;
	return ent ? ent + (g & ((1ULL << cb) - 1)) : 0;
}

static struct passphrase *pass(const char *s)
{
	struct passphrase *pp = NULL;

	if (passphrase_from_buffer(s, strlen(s), &pp) < 0)
		abort();
	return pp;
}

/* ---- pure tests ---- */

static void test_memory(void)
{
	struct volume_key *vk = volume_key_alloc(64);
	struct passphrase *pp = NULL;
	size_t i;
	bool zero = true;

	CHECK(vk && vk->size == 64, "volume_key_alloc(64)");
	for (i = 0; vk && i < vk->size; i++)
		zero &= vk->key[i] == 0;
	CHECK(zero, "volume key starts zeroed");
	volume_key_free(vk);
	volume_key_free(NULL);

	CHECK(passphrase_from_buffer("a\0b", 3, &pp) == 0 && pp->len == 3 && pp->data[3] == '\0' &&
	      !memcmp(pp->data, "a\0b", 3), "binary passphrase keeps NULs and a terminator");
	passphrase_free(pp);
	passphrase_free(NULL);
	CHECK(passphrase_alloc(PASSPHRASE_MAX_SIZE + 1, &pp) == -EINVAL && !pp, "passphrase over 8 MiB refused");
	CHECK(passphrase_alloc(0, &pp) == 0 && pp->len == 0, "empty passphrase");
	passphrase_free(pp);
}

static void test_entropy(void)
{
	static const char text[] =
		"The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
		"#!/bin/sh\nset -e\nexec /usr/sbin/qcowsetup open /var/lib/images/disk.qcow2 vm1\n";
	uint8_t s[KEY_SECTOR_SIZE], sb[KEY_SECTOR_SIZE];
	double h;
	size_t i;
	int randoms = 0;

	memset(s, 0, sizeof(s));
	CHECK(key_byte_entropy(s, sizeof(s)) == 0.0, "entropy of zeros is 0");
	CHECK(!key_sector_looks_random(s), "zero sector is not random-looking");

	for (i = 0; i < sizeof(s); i++)
		s[i] = (uint8_t)i;	/* every byte value twice */
	h = key_byte_entropy(s, sizeof(s));
	CHECK(h > 7.9999 && h < 8.0001, "entropy of a uniform histogram is 8 (%f)", h);
	CHECK(key_sector_looks_random(s), "0..255 twice looks random (no structure the test knows)");

	for (i = 0; i < 1000; i++) {
		fill_random(s, sizeof(s));
		randoms += key_sector_looks_random(s);
	}
	CHECK(randoms == 1000, "1000 random sectors all look random (%d)", randoms);
	fill_random(s, sizeof(s));
	h = key_byte_entropy(s, sizeof(s));
	CHECK(h > 7.3 && h < 7.9, "entropy estimate of a random sector ~7.6 (%f)", h);
	memset(s + 100, 0x42, KEY_RANDOM_MAX_RUN);
	CHECK(!key_sector_looks_random(s), "random sector with a run of 8 equal bytes has structure");
	fill_random(s, sizeof(s));
	memset(s + 100, 0x42, KEY_RANDOM_MAX_RUN - 1);
	s[100 + KEY_RANDOM_MAX_RUN - 1] = 0x43;
	s[99] = 0x41;
	CHECK(key_sector_looks_random(s), "a run of 7 does not count");

	for (i = 0; i < sizeof(s); i++)
		s[i] = (uint8_t)text[i % (sizeof(text) - 1)];
	h = key_byte_entropy(s, sizeof(s));
	CHECK(h < 5.5 && !key_sector_looks_random(s), "text sector is not random-looking (%f)", h);

	/* a filesystem superblock: mkfs.ext4's, or a crafted one */
	memset(sb, 0, sizeof(sb));
	if (have_mkfs && sh("truncate -s 4M %s && mkfs.ext4 -q -F %s >/dev/null 2>&1",
			    path_in_tmp("sb.raw"), path_in_tmp("sb.raw")) == 0 &&
	    read_file_at("sb.raw", sb, sizeof(sb), 1024) == 0) {
		CHECK(get_be16(sb + 56) == 0x53ef, "mkfs.ext4 superblock read");
	} else {
		put_be32(sb + 0, 0x00040000);	/* little-endian-ish counts, mostly zeros */
		sb[56] = 0x53;
		sb[57] = 0xef;
		fill_random(sb + 104, 16);	/* UUID */
		memcpy(sb + 120, "rootfs", 6);
	}
	CHECK(!key_sector_looks_random(sb), "ext4 superblock sector is not random-looking (%f)",
	      key_byte_entropy(sb, sizeof(sb)));
}

static void test_legacy_aes_pure(void)
{
	/* FIPS-197 C.1: AES-128(000102..0f, 00112233..ff) = 69c4e0d8.. */
	static const uint8_t fips_pt[16] = { 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
					     0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff };
	static const uint8_t fips_ct[16] = { 0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30,
					     0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a };
	uint8_t buf[3 * KEY_SECTOR_SIZE], orig[sizeof(buf)];
	struct volume_key *vk = NULL, *vk2 = NULL;
	struct passphrase *pp;
	int i;

	pp = pass("PASS");
	CHECK(legacy_aes_key(pp, &vk) == 0 && vk->size == 16 && !memcmp(vk->key, "PASS", 4) &&
	      !memcmp(vk->key + 4, "\0\0\0\0\0\0\0\0\0\0\0\0", 12), "legacy key = passphrase zero padded");
	passphrase_free(pp);
	volume_key_free(vk);

	pp = pass("0123456789abcdefTAIL");
	CHECK(legacy_aes_key(pp, &vk) == 0 && !memcmp(vk->key, "0123456789abcdef", 16),
	      "legacy key = first 16 bytes of a long passphrase");
	passphrase_free(pp);
	volume_key_free(vk);

	CHECK(passphrase_from_buffer("ab\0cd", 5, &pp) == 0 && legacy_aes_key(pp, &vk) == 0 &&
	      !memcmp(vk->key, "ab\0\0\0", 5), "legacy key stops at a NUL, as QEMU's strlen");
	passphrase_free(pp);
	volume_key_free(vk);

	/* known answer: sector 0 has an all-zero IV, so the first CBC block is
	 * plain AES */
	vk = volume_key_alloc(16);
	for (i = 0; i < 16; i++)
		vk->key[i] = (uint8_t)i;
	memset(buf, 0, sizeof(buf));
	memcpy(buf, fips_pt, 16);
	CHECK(legacy_aes_encrypt(vk, 0, buf, KEY_SECTOR_SIZE) == 0 && !memcmp(buf, fips_ct, 16),
	      "AES-128 known answer (FIPS-197 C.1) in sector 0");
	/* sector 1: IV = 01 00 .. 00, so block 0 = AES(pt ^ iv) */
	memset(buf, 0, sizeof(buf));
	memcpy(buf, fips_pt, 16);
	buf[0] ^= 1;
	CHECK(legacy_aes_encrypt(vk, 0, buf, KEY_SECTOR_SIZE) == 0, "encrypt pt^iv in sector 0");
	memcpy(orig, buf, 16);
	memset(buf, 0, sizeof(buf));
	memcpy(buf, fips_pt, 16);
	CHECK(legacy_aes_encrypt(vk, 1, buf, KEY_SECTOR_SIZE) == 0 && !memcmp(buf, orig, 16),
	      "plain64 IV: sector 1 uses IV 01 00..00 (little-endian)");

	fill_random(orig, sizeof(orig));
	memcpy(buf, orig, sizeof(buf));
	CHECK(legacy_aes_encrypt(vk, 0x123456789ULL, buf, sizeof(buf)) == 0 && memcmp(buf, orig, sizeof(buf)) &&
	      legacy_aes_decrypt(vk, 0x123456789ULL, buf, sizeof(buf)) == 0 && !memcmp(buf, orig, sizeof(buf)),
	      "encrypt/decrypt round trip over 3 sectors");
	memcpy(buf, orig, sizeof(buf));
	legacy_aes_encrypt(vk, 7, buf, sizeof(buf));
	legacy_aes_decrypt(vk, 7, buf + KEY_SECTOR_SIZE, KEY_SECTOR_SIZE);	/* wrong sector */
	CHECK(memcmp(buf + KEY_SECTOR_SIZE, orig + KEY_SECTOR_SIZE, 16) &&
	      !memcmp(buf + KEY_SECTOR_SIZE + 16, orig + KEY_SECTOR_SIZE + 16, KEY_SECTOR_SIZE - 16),
	      "a wrong IV garbles only the first block of a sector (CBC)");
	CHECK(legacy_aes_decrypt(vk, 0, buf, 100) == -EINVAL, "length not a multiple of 512 refused");
	vk2 = volume_key_alloc(32);
	CHECK(legacy_aes_decrypt(vk2, 0, buf, 512) == -EINVAL, "32-byte key refused for legacy AES");
	volume_key_free(vk);
	volume_key_free(vk2);
}

static void build_luks_header(uint8_t *h)
{
	int i;

	memset(h, 0, LUKS_PHDR_SIZE);
	memcpy(h, "LUKS\xba\xbe", 6);
	put_be16(h + 6, 1);
	strcpy((char *)h + 8, "aes");
	strcpy((char *)h + 40, "xts-plain64");
	strcpy((char *)h + 72, "sha256");
	put_be32(h + 104, 4040);
	put_be32(h + 108, 64);
	put_be32(h + 164, 1000);
	strcpy((char *)h + 168, "461377a9-78c9-4cf5-8811-caf790190e10");
	for (i = 0; i < LUKS_NUM_SLOTS; i++) {
		uint8_t *ks = h + 208 + 48 * i;

		put_be32(ks, i == 0 ? 0x00AC71F3 : 0x0000DEAD);
		put_be32(ks + 4, i == 0 ? 50000 : 0);
		put_be32(ks + 40, 8 + 504 * i);
		put_be32(ks + 44, 4000);
	}
}

static void test_luks_pure(void)
{
	static const struct {
		const char *name, *mode, *spec;
		int r;
	} specs[] = {
		{ "aes", "xts-plain64", "aes-xts-plain64", 0 },
		{ "aes", "cbc-essiv:sha256", "aes-cbc-essiv:sha256", 0 },
		{ "aes", "cbc-plain", "aes-cbc-plain", 0 },
		{ "serpent", "xts-plain64", "serpent-xts-plain64", 0 },
		{ "twofish", "cbc-plain64", "twofish-cbc-plain64", 0 },
		{ "cast5", "cbc-plain64", "cast5-cbc-plain64", 0 },
		{ "a es", "xts-plain64", NULL, -EUCLEAN },
		{ "aes-xts", "plain64", NULL, -EUCLEAN },
		{ "aes", "xts plain64", NULL, -EUCLEAN },
		{ "aes", "xts-plain64 0 /dev/sda", NULL, -EUCLEAN },
		{ "aes", "", NULL, -EUCLEAN },
	};
	uint8_t h[LUKS_PHDR_SIZE];
	struct luks_info info;
	char buf[64];
	size_t i;
	int r;

	build_luks_header(h);
	r = luks_parse_header(h, 2068480, &info);
	CHECK(r == 0 && !strcmp(info.cipher_name, "aes") && !strcmp(info.cipher_mode, "xts-plain64") &&
	      !strcmp(info.hash, "sha256") && info.key_bytes == 64 && info.active_slots == 1 &&
	      info.slots[0].active && info.slots[0].iterations == 50000 && info.slots[0].key_offset == 4096 &&
	      info.slots[0].stripes == 4000 && !info.slots[1].active && info.slots[7].key_offset == 1810432 &&
	      info.payload_offset == 2068480 && info.mk_iterations == 1000,
	      "crafted LUKS1 header parsed (%d)", r);

	build_luks_header(h);
	h[0] = 'X';
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "bad magic");
	build_luks_header(h);
	put_be16(h + 6, 2);
	CHECK(luks_parse_header(h, 2068480, &info) == -ENOTSUP, "LUKS2 is not supported");
	build_luks_header(h);
	memset(h + 8, 'a', 32);
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "unterminated cipher name");
	build_luks_header(h);
	h[40] = 0x1b;
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "control character in cipher mode");
	build_luks_header(h);
	put_be32(h + 108, 0);
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "zero key size");
	build_luks_header(h);
	put_be32(h + 208 + 48 * 3, 0x12345678);
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "invalid key slot state");
	build_luks_header(h);
	CHECK(luks_parse_header(h, 4096 + 64 * 4000 - 512, &info) == -EUCLEAN,
	      "key material past the end of the region");
	put_be32(h + 208 + 40, 0xffffffffU);
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "key material offset far past the region");
	build_luks_header(h);
	put_be32(h + 208 + 40, 0);
	CHECK(luks_parse_header(h, 2068480, &info) == -EUCLEAN, "key material over the binary header");
	CHECK(luks_parse_header(h, 100, &info) == -EUCLEAN, "region smaller than the header");

	for (i = 0; i < ARRAY_SIZE(specs); i++) {
		memset(&info, 0, sizeof(info));
		snprintf(info.cipher_name, sizeof(info.cipher_name), "%s", specs[i].name);
		snprintf(info.cipher_mode, sizeof(info.cipher_mode), "%s", specs[i].mode);
		r = luks_dm_cipher_spec(&info, buf, sizeof(buf));
		CHECK(r == specs[i].r && (r || !strcmp(buf, specs[i].spec)), "dm cipher spec %s + %s -> %s (%d)",
		      specs[i].name, specs[i].mode, r ? "error" : buf, r);
	}
	snprintf(info.cipher_name, sizeof(info.cipher_name), "aes");
	snprintf(info.cipher_mode, sizeof(info.cipher_mode), "xts-plain64");
	CHECK(luks_dm_cipher_spec(&info, buf, 10) == -ENOSPC, "dm cipher spec: buffer too small");
}

static void test_blkid_pure(void)
{
	uint8_t *buf = calloc(1, KEY_CHECK_WINDOW);
	char type[64];
	int r;

	r = probe_signature(buf, KEY_CHECK_WINDOW, type, sizeof(type));
	CHECK(r == 0, "no signature in zeros (%d)", r);
	fill_random(buf, KEY_CHECK_WINDOW);
	r = probe_signature(buf, KEY_CHECK_WINDOW, type, sizeof(type));
	CHECK(r == 0, "no signature in random data (%d %s)", r, r > 0 ? type : "");

	/* an MBR with one Linux partition */
	memset(buf, 0, KEY_CHECK_WINDOW);
	buf[446 + 4] = 0x83;
	put_be32(buf + 446 + 8, 0x00080000);	/* LE 2048 */
	put_be32(buf + 446 + 12, 0x00080000);	/* LE 2048 sectors */
	buf[510] = 0x55;
	buf[511] = 0xaa;
	r = probe_signature(buf, KEY_CHECK_WINDOW, type, sizeof(type));
	CHECK(r == 1 && !strcmp(type, "dos"), "MBR partition table found (%d %s)", r, r > 0 ? type : "");

	/* a LUKS1 header */
	memset(buf, 0, KEY_CHECK_WINDOW);
	build_luks_header(buf);
	r = probe_signature(buf, KEY_CHECK_WINDOW, type, sizeof(type));
	CHECK(r == 1 && !strcmp(type, "crypto_LUKS"), "LUKS header found (%d %s)", r, r > 0 ? type : "");

	if (have_mkfs && read_file_at("sb.raw", buf, KEY_CHECK_WINDOW, 0) == 0) {
		r = probe_signature(buf, KEY_CHECK_WINDOW, type, sizeof(type));
		CHECK(r == 1 && !strcmp(type, "ext4"), "ext4 found in the first MiB (%d %s)", r, r > 0 ? type : "");
	}
	free(buf);
}

/* ---- QEMU as the oracle ---- */

/* Decrypt the host ciphertext behind guest [g, g+len) and compare. */
static void check_guest_data(const char *file, const struct volume_key *vk, uint64_t g, const uint8_t *want,
			     size_t len, const char *what)
{
	uint8_t *buf = malloc(len);
	uint64_t h = host_offset(file, g);
	bool ok;

	ok = h && read_file_at(file, buf, len, h) == 0 && memcmp(buf, want, len) != 0 &&
	     legacy_aes_decrypt(vk, g / KEY_SECTOR_SIZE, buf, len) == 0 && !memcmp(buf, want, len);
	CHECK(ok, "%s: guest %llu (host %llu) decrypts to what qemu-io wrote", what, (unsigned long long)g,
	      (unsigned long long)h);
	if (h && h != g) {
		read_file_at(file, buf, len, h);
		legacy_aes_decrypt(vk, h / KEY_SECTOR_SIZE, buf, len);
		CHECK(memcmp(buf, want, len), "%s: the host sector as IV does not decrypt it", what);
	}
	free(buf);
}

static void test_legacy_oracle(const char *fmt, const char *driver, const char *file, const char *secret)
{
	uint8_t pat[65536];
	struct volume_key *vk = NULL;
	struct passphrase *pp;
	size_t i;
	char cmds[1024];

	if (sh("qemu-img create -q -f %s --object secret,id=s0,data=%s "
	       "-o encrypt.format=aes,encrypt.key-secret=s0 %s 4M 2>/dev/null",
	       fmt, secret, path_in_tmp(file)) < 0) {
		CHECK(0, "qemu-img create %s legacy AES", fmt);
		return;
	}
	for (i = 0; i < sizeof(pat); i++)
		pat[i] = (uint8_t)(i * 7 + (i >> 9) * 13 + 1);
	{
		FILE *f = fopen(path_in_tmp("pattern.bin"), "wb");

		fwrite(pat, 1, sizeof(pat), f);
		fclose(f);
	}
	/* a constant pattern at 64 KiB, a varying one at 2 MiB + 8 KiB */
	snprintf(cmds, sizeof(cmds), "-c 'write -P 0x5a 65536 65536' -c 'write -s %s 2105344 65536'",
		 path_in_tmp("pattern.bin"));
	CHECK(qemu_io(driver, file, secret, cmds) == 0, "qemu-io writes to the %s image", fmt);

	pp = pass(secret);
	CHECK(legacy_aes_key(pp, &vk) == 0, "legacy key");
	{
		uint8_t c[65536];

		memset(c, 0x5a, sizeof(c));
		check_guest_data(file, vk, 65536, c, sizeof(c), fmt);
	}
	check_guest_data(file, vk, 2105344, pat, sizeof(pat), fmt);
	passphrase_free(pp);
	volume_key_free(vk);
}

static int key_check(const char *file, const char *secret)
{
	struct volume_key *vk = NULL;
	struct passphrase *pp = pass(secret);
	struct image *img = open_image(file);
	int r = -EINVAL;

	if (img && legacy_aes_key(pp, &vk) == 0) {
		CHECK(img->crypt_method == IMG_CRYPT_AES, "%s is legacy AES encrypted", file);
		r = legacy_key_check(img, vk);
	}
	image_free(img, &t_opener);
	volume_key_free(vk);
	passphrase_free(pp);
	return r;
}

static void test_key_check(void)
{
	char cmds[1024];
	uint8_t buf[65536];
	FILE *f;
	size_t i;
	int r;

	/* an ext4 filesystem, converted by qemu-img (qcow2 and qcow v1) */
	if (have_mkfs) {
		CHECK(sh("truncate -s 16M %s && mkfs.ext4 -q -F %s >/dev/null 2>&1", path_in_tmp("fs.raw"),
			 path_in_tmp("fs.raw")) == 0, "mkfs.ext4 on a raw file");
		CHECK(sh("qemu-img convert -O qcow2 --object secret,id=s0,data=PASS "
			 "-o encrypt.format=aes,encrypt.key-secret=s0 %s %s", path_in_tmp("fs.raw"),
			 path_in_tmp("fs.qcow2")) == 0, "qemu-img convert -O qcow2 -o encrypt.format=aes");
		CHECK(sh("qemu-img convert -O qcow --object secret,id=s0,data=PASS "
			 "-o encrypt.format=aes,encrypt.key-secret=s0 %s %s", path_in_tmp("fs.raw"),
			 path_in_tmp("fs.qcow")) == 0, "qemu-img convert -O qcow -o encrypt.format=aes");
		r = key_check("fs.qcow2", "PASS");
		CHECK(r == 0, "ext4 qcow2: right passphrase accepted (%d)", r);
		r = key_check("fs.qcow2", "WRONG");
		CHECK(r == -EPERM, "ext4 qcow2: wrong passphrase rejected (%d)", r);
		r = key_check("fs.qcow2", "PASSX");
		CHECK(r == -EPERM, "ext4 qcow2: near-miss passphrase rejected (%d)", r);
		r = key_check("fs.qcow", "PASS");
		CHECK(r == 0, "ext4 qcow v1: right passphrase accepted (%d)", r);
		r = key_check("fs.qcow", "WRONG");
		CHECK(r == -EPERM, "ext4 qcow v1: wrong passphrase rejected (%d)", r);
	} else {
		printf("# mkfs.ext4 not found: ext4 key check cases skipped\n");
	}

	/* nothing allocated: nothing to protect */
	CHECK(sh("qemu-img create -q -f qcow2 --object secret,id=s0,data=PASS "
		 "-o encrypt.format=aes,encrypt.key-secret=s0 %s 8M 2>/dev/null", path_in_tmp("empty.qcow2")) == 0,
	      "empty legacy image");
	r = key_check("empty.qcow2", "WRONG");
	CHECK(r == 0, "no allocated data: any key accepted (%d)", r);

	/* text beyond the first MiB only: found by the spread sample */
	for (i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)("lorem ipsum dolor sit amet, consectetur\n"[i % 40]);
	f = fopen(path_in_tmp("text.bin"), "wb");
	fwrite(buf, 1, sizeof(buf), f);
	fclose(f);
	fill_random(buf, sizeof(buf));
	f = fopen(path_in_tmp("random.bin"), "wb");
	fwrite(buf, 1, sizeof(buf), f);
	fclose(f);

	CHECK(sh("qemu-img create -q -f qcow2 --object secret,id=s0,data=PASS "
		 "-o encrypt.format=aes,encrypt.key-secret=s0 %s 8M 2>/dev/null", path_in_tmp("text.qcow2")) == 0,
	      "text legacy image");
	snprintf(cmds, sizeof(cmds), "-c 'write -s %s 0 65536' -c 'write -s %s 5242880 65536'",
		 path_in_tmp("random.bin"), path_in_tmp("text.bin"));
	CHECK(qemu_io("qcow2", "text.qcow2", "PASS", cmds) == 0, "random data at 0, text at 5 MiB");
	r = key_check("text.qcow2", "PASS");
	CHECK(r == 0, "text past the window: right passphrase accepted (%d)", r);
	r = key_check("text.qcow2", "WRONG");
	CHECK(r == -EPERM, "text past the window: wrong passphrase rejected (%d)", r);

	/* only random plaintext: indistinguishable, the documented limit
	 * (--skip-key-check) */
	CHECK(sh("qemu-img create -q -f qcow2 --object secret,id=s0,data=PASS "
		 "-o encrypt.format=aes,encrypt.key-secret=s0 %s 8M 2>/dev/null", path_in_tmp("rand.qcow2")) == 0,
	      "random legacy image");
	snprintf(cmds, sizeof(cmds), "-c 'write -s %s 0 65536'", path_in_tmp("random.bin"));
	CHECK(qemu_io("qcow2", "rand.qcow2", "PASS", cmds) == 0, "random data written");
	r = key_check("rand.qcow2", "PASS");
	CHECK(r == -EPERM, "random plaintext is rejected even with the right key (%d): --skip-key-check", r);
}

struct luks_case {
	const char *file;
	const char *opts;
	const char *spec;
	uint32_t key_bytes;
};

static void test_luks_oracle(void)
{
	static const struct luks_case cases[] = {
		{ "luks-aes-xts.qcow2", "", "aes-xts-plain64", 64 },
		{ "luks-aes-essiv.qcow2",
		  ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
		  "aes-cbc-essiv:sha256", 16 },
		{ "luks-serpent-xts.qcow2", ",encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=xts",
		  "serpent-xts-plain64", 64 },
		{ "luks-twofish-cbc.qcow2",
		  ",encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64",
		  "twofish-cbc-plain64", 32 },
	};
	struct volume_key *vk = NULL;
	struct passphrase *right = pass("PASS"), *wrong = pass("PASs");
	struct luks_info info;
	bool af_alg;
	char spec[64];
	size_t i;
	int fd, r, slot;

	fd = socket(38 /* AF_ALG */, SOCK_SEQPACKET, 0);
	af_alg = fd >= 0;
	if (fd >= 0)
		close(fd);

	for (i = 0; i < ARRAY_SIZE(cases); i++) {
		const struct luks_case *c = &cases[i];
		struct image *img;
		bool aes = !strncmp(c->spec, "aes-", 4);

		if (create_luks(c->file, c->opts) < 0) {
			CHECK(0, "qemu-img create %s", c->file);
			continue;
		}
		img = open_image(c->file);
		if (!img)
			continue;
		CHECK(img->crypt_method == IMG_CRYPT_LUKS, "%s: LUKS encrypted", c->file);
		r = luks_read_info(&img->io, img->crypt_header_offset, img->crypt_header_length, &info);
		CHECK(r == 0 && info.key_bytes == c->key_bytes && info.active_slots == 1 && info.slots[0].active &&
		      info.slots[0].stripes == 4000 && info.slots[0].key_offset == 4096 && !strcmp(info.hash, "sha256"),
		      "%s: header info (%d, %u key bytes)", c->file, r, info.key_bytes);
		r = luks_dm_cipher_spec(&info, spec, sizeof(spec));
		CHECK(r == 0 && !strcmp(spec, c->spec), "%s: dm-crypt cipher %s", c->file, spec);

		r = luks_unlock(&img->io, img->crypt_header_offset, img->crypt_header_length, right, &vk, &slot);
		if (!aes && !af_alg) {
			CHECK(r == -ENOTSUP && !vk, "%s: no AF_ALG here: unlock reports -ENOTSUP (%d)", c->file, r);
			printf("# %s: unlocking skipped: no kernel crypto API (AF_ALG) on this host\n", c->file);
		} else {
			CHECK(r == 0 && vk && vk->size == c->key_bytes && slot == 0, "%s: right passphrase unlocks slot %d (%d)",
			      c->file, slot, r);
			volume_key_free(vk);
			vk = NULL;
			r = luks_unlock(&img->io, img->crypt_header_offset, img->crypt_header_length, wrong, &vk, &slot);
			CHECK(r == -EPERM && !vk && slot == -1, "%s: wrong passphrase -> -EPERM (%d)", c->file, r);
		}
		volume_key_free(vk);
		vk = NULL;

		if (i == 0) {
			/* the header region as libblkid sees it */
			uint8_t *b = calloc(1, KEY_CHECK_WINDOW);
			char type[64];

			read_file_at(c->file, b, 4096, img->crypt_header_offset);
			r = probe_signature(b, KEY_CHECK_WINDOW, type, sizeof(type));
			CHECK(r == 1 && !strcmp(type, "crypto_LUKS"), "QEMU's LUKS header is crypto_LUKS to libblkid");
			free(b);
			/* a region past the end of the file */
			r = luks_read_info(&img->io, img->io.size - 1024, 4096, &info);
			CHECK(r == -EUCLEAN, "header region past the end of the file (%d)", r);
		}
		image_free(img, &t_opener);
	}
	passphrase_free(right);
	passphrase_free(wrong);
}

int main(void)
{
	const char *t = getenv("TMPDIR");
	bool qemu;

	qs_log_set_level(getenv("QS_TEST_DEBUG") ? QS_LOG_DEBUG : QS_LOG_ERR);
	qs_log_set_callback(log_to_stdout, NULL);
	snprintf(tmpdir, sizeof(tmpdir), "%s/test-keys.XXXXXX", t && *t ? t : "/tmp");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 99;
	}
	have_mkfs = have_program("mkfs.ext4");
	qemu = have_program("qemu-img") && have_program("qemu-io");

	test_memory();
	test_entropy();
	test_legacy_aes_pure();
	test_luks_pure();
	test_blkid_pure();

	if (qemu && !tap_failures) {
		test_legacy_oracle("qcow2", "qcow2", "legacy.qcow2", "PASS");
		test_legacy_oracle("qcow", "qcow", "legacy.qcow", "0123456789abcdefTAIL");
		test_key_check();
		test_luks_oracle();
	}

	sh("rm -rf '%s'", tmpdir);
	if (!qemu && !tap_failures) {
		printf("# qemu-img/qemu-io not found: QEMU oracle tests skipped\n");
		tap_done();
		return 77;
	}
	return tap_done();
}
