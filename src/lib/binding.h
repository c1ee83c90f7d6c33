/* Bindings: key slots whose passphrase is kept in the image encrypted by
 * clevis (tang, tpm2, sss pins), so that an image unlocks with no person
 * present. Each binding names its LUKS key slot, the clevis pin and its
 * JSON configuration as given to `bind`, and the compact JWE that
 * `clevis decrypt` turns back into the slot's passphrase.
 *
 * They live in a qcow2 header extension of our own (QCOW2_EXT_BINDINGS):
 * QEMU keeps header extensions it does not know when it rewrites the header
 * (amend, resize, snapshots), so a binding travels with the image and its
 * key slot. All fields big-endian:
 *
 *   0  u32 version (1)
 *   4  u32 count (at most BINDING_MAX)
 *   8  count entries, each
 *        0  u8  key slot (0..7, distinct)
 *        1  u8  pin length (1..BINDING_PIN_MAX)
 *        2  u16 config length (0..BINDING_CONFIG_MAX)
 *        4  u32 JWE length (1..BINDING_JWE_MAX)
 *        8  pin, config, JWE (no padding, no NUL)
 *
 * the extension's length being exactly the sum. Pure: a buffer in, a
 * buffer out; the parser is fuzzed through the image parser (untrusted). */
#ifndef QS_BINDING_H
#define QS_BINDING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QCOW2_EXT_BINDINGS	0x71736b62U	/* "qskb" */
#define BINDING_VERSION		1
#define BINDING_MAX		8		/* one per LUKS1 key slot */
#define BINDING_PIN_MAX		31
#define BINDING_CONFIG_MAX	4096
#define BINDING_JWE_MAX		32768
#define BINDING_ENTRY_HDR	8

struct binding {
	unsigned int slot;
	char pin[BINDING_PIN_MAX + 1];	/* [a-z0-9_-]+ */
	char *config;			/* printable ASCII, "" allowed */
	char *jwe;			/* compact JWE: [A-Za-z0-9_.-]+ */
};

struct binding_set {
	unsigned int count;
	struct binding b[BINDING_MAX];	/* in slot order */
};

/* Parse len bytes of the extension's data. Returns 0, -EUCLEAN (malformed:
 * lengths, characters, duplicate slots, trailing bytes) or -ENOMEM. *out
 * is empty on failure. */
int binding_parse(const uint8_t *data, size_t len, struct binding_set *out);

/* The extension's data for s (malloc'ed, *len bytes). Returns 0, -EINVAL
 * (a field binding_parse would refuse) or -ENOMEM. */
int binding_serialize(const struct binding_set *s, uint8_t **out, size_t *len);

void binding_set_free(struct binding_set *s);

/* The binding of slot, or NULL. */
const struct binding *binding_find(const struct binding_set *s, unsigned int slot);

/* Add (replacing one for the same slot) a binding; strings are copied.
 * Returns 0, -EINVAL (slot, pin, config or JWE not acceptable) or -ENOMEM. */
int binding_set_put(struct binding_set *s, unsigned int slot, const char *pin, const char *config,
		    const char *jwe);
/* Remove the binding of slot; returns 0 or -ENOENT. */
int binding_set_remove(struct binding_set *s, unsigned int slot);

/* Whether a string is acceptable as the field (what binding_parse checks). */
bool binding_valid_pin(const char *s, size_t len);
bool binding_valid_config(const char *s, size_t len);
bool binding_valid_jwe(const char *s, size_t len);

/* Standard base64 with padding of n bytes into out (4 * ((n + 2) / 3) + 1
 * bytes with the NUL). Returns the length written. */
size_t binding_base64(const uint8_t *in, size_t n, char *out);

#endif
