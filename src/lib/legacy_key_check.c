/* The plausibility check that stands in for the key check legacy AES
 * images lack. Pure: no outside library; decryption and signature probing
 * come from crypto_openssl.c and probe_blkid.c.
 *
 * A wrong AES key turns every sector into uniformly random bytes, whatever
 * the plaintext was. Real data, even compressed or encrypted files inside a
 * filesystem, almost always has some sectors with structure: zero runs,
 * text, tables. So: decrypt some of the layer's allocated data and accept
 * the key when libblkid recognises a signature or one sector does not look
 * random. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "keys.h"
#include "log.h"
#include "util.h"

/* ---- entropy without libm ---- */

/* log2(x) for x >= 1: integer part from the highest bit, fraction by
 * repeated squaring of the mantissa (24 bits, error < 1e-7). */
static double log2_u32(uint32_t x)
{
	int e = 31 - __builtin_clz(x);
	double m = (double)x / (double)(1ULL << e);	/* [1, 2) */
	double result = e, bit = 0.5;
	int i;

	for (i = 0; i < 24; i++) {
		m *= m;
		if (m >= 2.0) {
			m /= 2.0;
			result += bit;
		}
		bit /= 2.0;
	}
	return result;
}

double key_byte_entropy(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint32_t count[256] = { 0 };
	double sum = 0.0;
	size_t i;

	if (len == 0 || len > UINT32_MAX)
		return 0.0;
	for (i = 0; i < len; i++)
		count[p[i]]++;
	/* H = log2(n) - (1/n) * sum(c * log2 c) */
	for (i = 0; i < 256; i++)
		if (count[i] > 1)
			sum += count[i] * log2_u32(count[i]);
	return log2_u32((uint32_t)len) - sum / (double)len;
}

static bool has_equal_run(const uint8_t *p, size_t len, size_t run)
{
	size_t i, n = 1;

	if (run <= 1)
		return len > 0;
	for (i = 1; i < len; i++) {
		n = p[i] == p[i - 1] ? n + 1 : 1;
		if (n >= run)
			return true;
	}
	return false;
}

bool key_sector_looks_random(const void *sector)
{
	/* 512 uniformly random bytes: entropy estimate ~7.6 (the plug-in
	 * estimator is biased low by ~255/(2*512*ln2) = 0.36), and a run of 8
	 * equal bytes has a probability below 2^-46. */
	return key_byte_entropy(sector, KEY_SECTOR_SIZE) > KEY_RANDOM_ENTROPY_BITS &&
	       !has_equal_run(sector, KEY_SECTOR_SIZE, KEY_RANDOM_MAX_RUN);
}

/* ---- legacy AES key check ---- */

static const struct img_io *layer_data_io(const struct image *img)
{
	return img->data_io.pread ? &img->data_io : &img->io;
}

/* Read and decrypt guest sectors [guest, guest+len) of a data run into buf. */
static int read_decrypt(const struct image *img, const struct volume_key *vk,
			const struct run *rn, uint64_t guest, void *buf, size_t len)
{
	const struct img_io *io = layer_data_io(img);
	uint64_t host;
	int r;

	if (uadd64_overflow(rn->host, guest - rn->guest, &host))
		return -EUCLEAN;
	r = img_pread(io, buf, len, host);
	if (r < 0) {
		log_err("%s: cannot read data at offset %llu: %s", img->path ? img->path : "image",
			(unsigned long long)host, strerror(-r));
		return r;
	}
	return legacy_aes_decrypt(vk, guest / KEY_SECTOR_SIZE, buf, len);
}

/* Decrypt the data runs inside [0, wlen) of guest space into win (zeros
 * elsewhere); count the allocated sectors there and test up to max of them. */
static int check_window(const struct image *img, const struct volume_key *vk,
			const struct run_list *runs, uint8_t *win, uint64_t wlen,
			unsigned int max, unsigned int *tested, bool *plausible)
{
	size_t i;
	uint64_t s;
	int r;

	for (i = 0; i < runs->count; i++) {
		const struct run *rn = &runs->runs[i];
		uint64_t start = rn->guest, end;

		if (rn->kind != RUN_DATA || start >= wlen)
			continue;
		if (!is_aligned(start, KEY_SECTOR_SIZE) || !is_aligned(rn->len, KEY_SECTOR_SIZE))
			continue;
		if (uadd64_overflow(start, rn->len, &end))
			return -EUCLEAN;
		end = MIN(wlen, end);
		r = read_decrypt(img, vk, rn, start, win + start, (size_t)(end - start));
		if (r < 0)
			return r;
		for (s = start; s < end && *tested < max && !*plausible; s += KEY_SECTOR_SIZE) {
			(*tested)++;
			if (!key_sector_looks_random(win + s))
				*plausible = true;
		}
	}
	return 0;
}

/* Test up to max allocated sectors spread evenly over all nsect allocated
 * sectors of the layer. */
static int check_spread(const struct image *img, const struct volume_key *vk,
			const struct run_list *runs, uint64_t nsect, unsigned int max,
			unsigned int *tested, bool *plausible)
{
	uint8_t sector[KEY_SECTOR_SIZE];
	uint64_t base = 0, want;
	unsigned int j = 0, n = nsect < max ? (unsigned int)nsect : max;
	size_t i = 0;
	int r;

	for (j = 0; j < n && !*plausible; j++) {
		want = (uint64_t)((unsigned __int128)j * nsect / n);
		/* advance to the run holding allocated sector number want */
		while (i < runs->count) {
			const struct run *rn = &runs->runs[i];
			uint64_t rs = rn->len / KEY_SECTOR_SIZE;

			if (rn->kind == RUN_DATA && is_aligned(rn->guest, KEY_SECTOR_SIZE) &&
			    is_aligned(rn->len, KEY_SECTOR_SIZE)) {
				if (want < base + rs)
					break;
				base += rs;
			}
			i++;
		}
		if (i == runs->count)
			break;
		r = read_decrypt(img, vk, &runs->runs[i],
				 runs->runs[i].guest + (want - base) * KEY_SECTOR_SIZE,
				 sector, sizeof(sector));
		if (r < 0)
			return r;
		(*tested)++;
		if (!key_sector_looks_random(sector))
			*plausible = true;
	}
	explicit_bzero(sector, sizeof(sector));
	return 0;
}

int legacy_key_check(struct image *img, const struct volume_key *vk)
{
	const char *name = img->path ? img->path : "image";
	struct run_list runs;
	uint8_t *win = NULL;
	uint64_t nsect = 0, wlen;
	unsigned int tested = 0;
	bool plausible = false;
	char type[64];
	size_t i;
	int r;

	run_list_init(&runs);
	if (img->crypt_method != IMG_CRYPT_AES || !vk || vk->size != LEGACY_AES_KEY_SIZE)
		return -EINVAL;

	r = image_walk_layer(img, &runs);
	if (r < 0)
		goto out;

	for (i = 0; i < runs.count; i++) {
		const struct run *rn = &runs.runs[i];

		if (rn->kind == RUN_DATA && is_aligned(rn->guest, KEY_SECTOR_SIZE) &&
		    is_aligned(rn->len, KEY_SECTOR_SIZE) &&
		    uadd64_overflow(nsect, rn->len / KEY_SECTOR_SIZE, &nsect)) {
			r = -EUCLEAN;
			goto out;
		}
	}
	if (!nsect) {
		log_verbose("%s: no allocated data, nothing to check the key against.", name);
		r = 0;
		goto out;
	}

	/* (a) the first MiB of guest space, holes as zeros, through libblkid */
	wlen = MIN((uint64_t)KEY_CHECK_WINDOW, img->map_size) & ~(uint64_t)(KEY_SECTOR_SIZE - 1);
	if (wlen) {
		win = calloc(1, (size_t)wlen);
		if (!win) {
			r = -ENOMEM;
			goto out;
		}
		r = check_window(img, vk, &runs, win, wlen, KEY_CHECK_MAX_SECTORS / 2,
				 &tested, &plausible);
		if (r < 0)
			goto out;
		r = probe_signature(win, (size_t)wlen, type, sizeof(type));
		if (r > 0) {
			log_verbose("%s: key check: %s signature found in the decrypted data.", name, type);
			r = 0;
			goto out;
		}
		if (r < 0)
			log_dbg("%s: signature probing failed (%s), using the entropy test only.",
				name, strerror(-r));
	}

	/* (b) sectors spread over the whole layer */
	if (!plausible) {
		r = check_spread(img, vk, &runs, nsect, KEY_CHECK_MAX_SECTORS - tested,
				 &tested, &plausible);
		if (r < 0)
			goto out;
	}
	if (plausible) {
		log_verbose("%s: key check: decrypted data has structure.", name);
		r = 0;
	} else {
		log_err("%s: decrypted data looks random: wrong passphrase? (%u sectors tested; "
			"--skip-key-check overrides)", name, tested);
		r = -EPERM;
	}
out:
	if (win) {
		explicit_bzero(win, (size_t)wlen);
		free(win);
	}
	run_list_free(&runs);
	return r;
}
