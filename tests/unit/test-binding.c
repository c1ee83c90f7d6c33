/* The bindings header extension (binding.c): round trips, every truncation
 * and corruption refused; the rewriting of the header extension area
 * (qcow2_header_set_extension); the qcowtab options clevis and
 * token-timeout=. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "qcow2.h"
#include "qcow2_create.h"
#include "qcowtab.h"
#include "tap.h"
#include "util.h"

static const char JWE[] = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIn0..aGVsbG8.d29ybGQ.dGFn";

static void test_round_trip(void)
{
	struct binding_set s = { 0 }, p;
	uint8_t *d = NULL;
	size_t len = 0;

	CHECK(binding_set_put(&s, 3, "tpm2", "{\"pcr_ids\":\"7\"}", JWE) == 0, "put slot 3");
	CHECK(binding_set_put(&s, 1, "tang", "{\"url\":\"http://127.0.0.1:1\"}", JWE) == 0, "put slot 1");
	CHECK(binding_set_put(&s, 3, "sss", "", JWE) == 0, "put slot 3 again replaces it");
	CHECK(s.count == 2 && s.b[0].slot == 1 && s.b[1].slot == 3 && !strcmp(s.b[1].pin, "sss"), "slot order");
	CHECK(binding_set_put(&s, 8, "tang", "", JWE) == -EINVAL, "slot 8 refused");
	CHECK(binding_set_put(&s, 2, "Tang", "", JWE) == -EINVAL, "pin with a capital refused");
	CHECK(binding_set_put(&s, 2, "tang", "a\nb", JWE) == -EINVAL, "config with a newline refused");
	CHECK(binding_set_put(&s, 2, "tang", "", "a b") == -EINVAL, "JWE with a blank refused");
	CHECK(binding_serialize(&s, &d, &len) == 0, "serialize");
	CHECK(binding_parse(d, len, &p) == 0, "parse back");
	CHECK(p.count == 2 && p.b[0].slot == 1 && !strcmp(p.b[0].pin, "tang") &&
	      !strcmp(p.b[0].config, "{\"url\":\"http://127.0.0.1:1\"}") && !strcmp(p.b[1].jwe, JWE),
	      "the same bindings");
	CHECK(binding_find(&p, 3) && !binding_find(&p, 2), "find");
	binding_set_free(&p);

	/* every shorter or longer buffer, and every byte changed in the entry headers */
	{
		unsigned int bad = 0, crashes_would_show = 0;
		uint8_t *m = malloc(len + 1);

		for (size_t n = 0; n < len; n++)
			bad += binding_parse(d, n, &p) == -EUCLEAN;
		CHECK(bad == len, "all %zu truncations refused", len);
		memcpy(m, d, len);
		m[len] = 0;
		CHECK(binding_parse(m, len + 1, &p) == -EUCLEAN, "a trailing byte refused");
		for (size_t i = 0; i < len; i++) {
			for (unsigned int v = 0; v < 256; v += 51) {
				memcpy(m, d, len);
				m[i] = (uint8_t)v;
				if (binding_parse(m, len, &p) == 0)
					binding_set_free(&p);
				crashes_would_show++;
			}
		}
		CHECK(crashes_would_show == len * 6, "byte changes parse or are refused");
		memcpy(m, d, len);
		m[8] = 3;	/* the first entry's slot made the second's */
		CHECK(binding_parse(m, len, &p) == -EUCLEAN, "a duplicate slot refused");
		memcpy(m, d, len);
		put_be32(m + 4, 9);
		CHECK(binding_parse(m, len, &p) == -EUCLEAN, "a count over 8 refused");
		memcpy(m, d, len);
		put_be32(m, 2);
		CHECK(binding_parse(m, len, &p) == -EUCLEAN, "version 2 refused");
		memcpy(m, d, len);
		put_be32(m + 8 + 4, 0xffffffffU);
		CHECK(binding_parse(m, len, &p) == -EUCLEAN, "a huge JWE length refused");
		free(m);
	}
	free(d);
	binding_set_free(&s);
	CHECK(binding_serialize(&s, &d, &len) == 0 && len == 8 && binding_parse(d, len, &p) == 0 && !p.count,
	      "an empty set");
	free(d);
}

static void test_base64(void)
{
	static const struct { const char *in, *out; } v[] = {
		{ "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" }, { "foob", "Zm9vYg==" },
		{ "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" }, { "\xff\xfe\xfd", "//79" },
	};
	char out[16];

	for (size_t i = 0; i < ARRAY_SIZE(v); i++) {
		binding_base64((const uint8_t *)v[i].in, strlen(v[i].in), out);
		CHECK(!strcmp(out, v[i].out), "base64 \"%s\" = %s", v[i].in, out);
	}
}

/* A v3 header in a 4096-byte buffer: a feature table extension of one
 * entry, the end marker, the backing name at the given offset. */
static void make_header(uint8_t *h, size_t size, uint64_t backing_off)
{
	memset(h, 0, size);
	put_be32(h, QCOW_MAGIC);
	put_be32(h + QCOW2_HDR_VERSION, 3);
	put_be32(h + QCOW2_HDR_CLUSTER_BITS, 12);
	put_be32(h + QCOW2_HDR_HEADER_LENGTH, 112);
	put_be32(h + 112, QCOW2_EXT_FEATURE_TABLE);
	put_be32(h + 116, 48);
	memcpy(h + 120 + 2, "dirty bit", 9);
	/* end marker at 168 */
	put_be64(h + QCOW2_HDR_BACKING_OFFSET, backing_off);
	put_be32(h + QCOW2_HDR_BACKING_SIZE, 9);
	memcpy(h + backing_off, "base.img!", 9);
}

static void test_header_extension(void)
{
	uint8_t h[4096], big[5000];
	size_t used;
	uint64_t bo;

	make_header(h, sizeof(h), 176);
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, "abcdefghij", 10, &used) == 0, "add");
	bo = get_be64(h + QCOW2_HDR_BACKING_OFFSET);
	CHECK(get_be32(h + 112) == QCOW2_EXT_FEATURE_TABLE && !memcmp(h + 122, "dirty bit", 9), "the table is kept first");
	CHECK(get_be32(h + 168) == QCOW2_EXT_BINDINGS && get_be32(h + 172) == 10 && !memcmp(h + 176, "abcdefghij", 10) &&
	      h[186] == 0 && h[191] == 0, "the new extension, padded");
	CHECK(get_be32(h + 192) == 0 && get_be32(h + 196) == 0, "the end marker");
	CHECK(bo == 200 && !memcmp(h + bo, "base.img!", 9) && used == 209, "the backing name after it (at %llu)",
	      (unsigned long long)bo);
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, "xy", 2, &used) == 0, "replace");
	CHECK(get_be32(h + 172) == 2 && get_be64(h + QCOW2_HDR_BACKING_OFFSET) == 192 && used == 209,
	      "replaced in place, the old tail to be zeroed");
	CHECK(!memcmp(h + 192, "base.img!", 9) && h[201] == 0 && h[208] == 0, "... and zeroed");
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, NULL, 0, &used) == 0, "remove");
	CHECK(get_be64(h + QCOW2_HDR_BACKING_OFFSET) == 176 && get_be32(h + 168) == 0 &&
	      !memcmp(h + 176, "base.img!", 9), "back to the original layout");
	memset(big, 'a', sizeof(big));
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, big, 3900, &used) == -ENOSPC,
	      "too big for the cluster: -ENOSPC");
	CHECK(get_be64(h + QCOW2_HDR_BACKING_OFFSET) == 176, "... and nothing changed");
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, big, 3800, &used) == 0, "what fits fits");
	make_header(h, sizeof(h), 176);
	put_be32(h + 116, 4000);
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, "a", 1, &used) == -EUCLEAN,
	      "an extension past the backing name: -EUCLEAN");
	make_header(h, sizeof(h), 176);
	put_be64(h + QCOW2_HDR_BACKING_OFFSET, 4090);
	CHECK(qcow2_header_set_extension(h, sizeof(h), QCOW2_EXT_BINDINGS, "a", 1, &used) == -EUCLEAN,
	      "a backing name past the cluster: -EUCLEAN");
}

static void test_qcowtab(void)
{
	static const char text[] = "a /x.qcow2 none clevis,token-timeout=2min\nb /y.qcow2 none token-timeout\n";
	struct qcowtab t;
	unsigned int errors = 0;

	CHECK(qcowtab_parse(text, sizeof(text) - 1, NULL, NULL, &t, &errors) == 0, "parse");
	CHECK(t.count == 1 && t.entries[0].clevis && t.entries[0].token_timeout == 120, "clevis, token-timeout=2min");
	CHECK(errors == 1, "token-timeout without a value is an error");
	qcowtab_free(&t);
}

int main(void)
{
	test_round_trip();
	test_base64();
	test_header_extension();
	test_qcowtab();
	return tap_done();
}
