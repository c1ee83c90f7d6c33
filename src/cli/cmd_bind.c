/* Bindings: key slots whose passphrase clevis keeps (binding.h), as
 * `clevis luks bind/unbind` for LUKS2 volumes:
 *   qcowsetup bind IMAGE PIN CONFIG     a new random passphrase in a free
 *                                       key slot, its JWE in the image
 *   qcowsetup unbind IMAGE SLOT         the key slot and its binding gone
 *   qcowsetup test-bindings IMAGE       does each binding still unlock
 * The existing passphrase comes as for add-key (--key-file, the prompt).
 * Write order, so that a crash leaves nothing that unlocks without a
 * passphrase nobody knows: bind writes the binding, then the key slot;
 * unbind removes the key slot, then the binding. A binding whose key slot
 * is disabled is harmless (it unlocks nothing) and is listed as such. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "clevis.h"
#include "cmd_keys.h"
#include "json.h"
#include "log.h"
#include "qcow2_create.h"
#include "qcowsetup.h"
#include "util.h"

#define SECRET_BYTES	32	/* random bytes of a bound passphrase, base64 */
#define CONFIG_SHOWN	60	/* characters of a configuration in listings */

static int copy_bindings(const struct image *img, struct binding_set *out)
{
	int r;

	memset(out, 0, sizeof(*out));
	for (unsigned int i = 0; img->bindings && i < img->bindings->count; i++) {
		const struct binding *b = &img->bindings->b[i];

		r = binding_set_put(out, b->slot, b->pin, b->config, b->jwe);
		if (r < 0) {
			binding_set_free(out);
			return r;
		}
	}
	return 0;
}

/* Write s as the image's bindings extension (none when s is empty). */
static int store_bindings(struct keyimg *k, const struct binding_set *s)
{
	uint8_t *ext = NULL;
	size_t len = 0;
	int r = 0;

	if (s->count)
		r = binding_serialize(s, &ext, &len);
	if (r == 0)
		r = qcow2_update_header_extension(k->fd, k->off, QCOW2_EXT_BINDINGS, ext, (uint32_t)len);
	if (r == -ENOSPC)
		log_err("%s: the bindings do not fit in the image's header cluster (%" PRIu64 " bytes).", k->path,
			k->img->cluster_size);
	else if (r < 0)
		log_err("%s: cannot write the bindings: %s", k->path, strerror(-r));
	free(ext);
	return r;
}

/* SECRET_BYTES random bytes, base64: a passphrase nobody types. */
static int random_passphrase(struct passphrase **pp)
{
	struct volume_key *raw = NULL;
	int r;

	r = volume_key_generate(SECRET_BYTES, &raw);
	if (r == 0)
		r = passphrase_alloc(4 * ((SECRET_BYTES + 2) / 3), pp);
	if (r == 0)
		binding_base64(raw->key, raw->size, (*pp)->data);
	volume_key_free(raw);
	return r;
}

static int refuse_invalid(const struct keyimg *k)
{
	if (!k->img->bindings_invalid)
		return 0;
	log_err("%s: the bindings extension is malformed; unbind --force SLOT drops it.", k->path);
	return -EUCLEAN;
}

int cmd_bind(int argc, char **argv)
{
	const char *pin = argv[1], *config = argv[2];
	struct binding_set set = { 0 }, old = { 0 };
	struct passphrase *secret = NULL;
	struct key_edit e = { 0 };
	struct luks_pbkdf pbkdf;
	char *jwe = NULL;
	int slot = opt.key_slot, r;

	(void)argc;
	if (!binding_valid_pin(pin, strlen(pin)) || !binding_valid_config(config, strlen(config))) {
		log_err("Invalid pin %s or configuration (printable ASCII, at most %d characters).", pin,
			BINDING_CONFIG_MAX);
		return -EINVAL;
	}
	r = keyimg_open(argv[0], true, &e.k);
	if (r < 0)
		return r;
	r = keys_refuse_header_writer(e.k.fd, e.k.path);
	if (r == 0)
		r = refuse_invalid(&e.k);
	if (r == 0 && e.k.info.active_slots >= LUKS_NUM_SLOTS) {
		log_err("%s: all %d key slots are in use.", e.k.path, LUKS_NUM_SLOTS);
		r = -ENOSPC;
	} else if (r == 0 && slot >= 0 && e.k.info.slots[slot].active) {
		log_err("%s: key slot %d is in use.", e.k.path, slot);
		r = -EEXIST;
	}
	if (r == 0)
		r = key_edit_unlock(&e, NULL, false, NULL);
	if (r == 0)
		r = random_passphrase(&secret);
	/* before anything is written: a pin that fails leaves the image alone */
	if (r == 0)
		r = clevis_encrypt(pin, config, opt.batch_mode, secret, &jwe);
	keys_pbkdf(&pbkdf);
	if (r == 0)
		r = luks_keyslot_add(e.new, e.k.len, e.vk, secret, slot, &pbkdf, &slot);
	if (r == 0)
		r = copy_bindings(e.k.img, &old);
	if (r == 0)
		r = copy_bindings(e.k.img, &set);
	if (r == 0)
		r = binding_set_put(&set, (unsigned int)slot, pin, config, jwe);
	if (r == 0)
		r = store_bindings(&e.k, &set);
	if (r == 0) {
		r = keyimg_store(&e.k, e.new);
		if (r < 0 && store_bindings(&e.k, &old) < 0)
			log_err("%s: the binding of key slot %d stays, its key slot was not written.", e.k.path, slot);
	}
	if (r == 0)
		log_verbose("Key slot %d created and bound to %s.", slot, pin);
	binding_set_free(&set);
	binding_set_free(&old);
	free(jwe);
	passphrase_free(secret);
	key_edit_end(&e);
	return r;
}

int cmd_unbind(int argc, char **argv)
{
	struct binding_set set = { 0 };
	struct key_edit e = { 0 };
	uint64_t v;
	int slot, r;

	(void)argc;
	if (parse_u64(argv[1], 0, &v) < 0 || v >= LUKS_NUM_SLOTS) {
		log_err("Invalid key slot %s (0..%d).", argv[1], LUKS_NUM_SLOTS - 1);
		return -EINVAL;
	}
	slot = (int)v;
	r = keyimg_open(argv[0], true, &e.k);
	if (r < 0)
		return r;
	r = keys_refuse_header_writer(e.k.fd, e.k.path);
	if (r < 0)
		goto out;
	if (e.k.img->bindings_invalid) {
		if (opt.force) {
			log_std("%s: dropping the malformed bindings extension.", e.k.path);
			r = store_bindings(&e.k, &set);
		} else {
			r = refuse_invalid(&e.k);
		}
		goto out;
	}
	if (!e.k.img->bindings || !binding_find(e.k.img->bindings, (unsigned int)slot)) {
		log_err("%s: key slot %d has no binding (remove-key --key-slot %d removes a key slot).", e.k.path,
			slot, slot);
		r = -EINVAL;
		goto out;
	}
	if (e.k.info.slots[slot].active) {
		if (e.k.info.active_slots <= 1 && !opt.force) {
			log_err("%s: key slot %d holds the last key; without it the image can never be opened "
				"again (--force removes it anyway).", e.k.path, slot);
			r = -EPERM;
			goto out;
		}
		/* a passphrase proves access, as remove-key --key-slot */
		r = key_edit_unlock(&e, NULL, false, NULL);
		if (r == 0)
			r = luks_keyslot_remove(e.new, e.k.len, slot);
		if (r == 0)
			r = keyimg_store(&e.k, e.new);
	}
	if (r == 0)
		r = copy_bindings(e.k.img, &set);
	if (r == 0)
		binding_set_remove(&set, (unsigned int)slot);
	if (r == 0)
		r = store_bindings(&e.k, &set);
	if (r == 0)
		log_verbose("Key slot %d and its binding removed.", slot);
out:
	binding_set_free(&set);
	key_edit_end(&e);
	return r;
}

/* Does binding b unlock the header: 0, -EPERM (clevis or the passphrase
 * failed), -ENOENT (its key slot is disabled), -errno. */
static int try_binding(const struct keyimg *k, const struct binding *b)
{
	struct passphrase *pp = NULL;
	struct volume_key *vk = NULL;
	int slot = -1, r;

	if (!k->info.slots[b->slot].active)
		return -ENOENT;
	r = clevis_decrypt(b->jwe, 0, &pp);
	if (r == 0)
		r = luks_unlock(&k->io, k->off, k->len, pp, &vk, &slot);
	if (r == 0 && slot != (int)b->slot)
		log_std("%s: the binding of key slot %u opened key slot %d.", k->path, b->slot, slot);
	volume_key_free(vk);
	passphrase_free(pp);
	return r == -ETIMEDOUT ? -EPERM : r;
}

static const char *result_name(int r)
{
	return r == 0 ? "unlocks" : r == -ENOENT ? "key slot disabled" : r == -EPERM ? "does not unlock" : "error";
}

int cmd_test_bindings(int argc, char **argv)
{
	struct keyimg k;
	struct json j;
	unsigned int ok = 0;
	int r;

	(void)argc;
	r = keyimg_open(argv[0], false, &k);
	if (r < 0)
		return r;
	r = refuse_invalid(&k);
	if (r == 0 && (!k.img->bindings || !k.img->bindings->count)) {
		log_err("%s has no bindings.", k.path);
		r = -ENOENT;
	}
	if (r < 0)
		goto out;
	if (opt.json) {
		json_init(&j, stdout, true);
		json_begin_array(&j, NULL);
	}
	for (unsigned int i = 0; i < k.img->bindings->count; i++) {
		const struct binding *b = &k.img->bindings->b[i];
		int t = try_binding(&k, b);

		if (t == -ENOMEM) {
			r = t;
			break;
		}
		ok += t == 0;
		if (opt.json) {
			json_begin_object(&j, NULL);
			json_u64(&j, "slot", b->slot);
			json_string(&j, "pin", b->pin);
			json_bool(&j, "unlocks", t == 0);
			json_string(&j, "result", result_name(t));
			json_end_object(&j);
		} else {
			printf("Key slot %u (%s): %s\n", b->slot, b->pin, result_name(t));
		}
	}
	if (opt.json) {
		json_end_array(&j);
		json_finish(&j);
	}
	if (r == 0 && !ok)
		r = -EPERM;
out:
	keyimg_close(&k);
	return r;
}

void bindings_human(const struct image *img, const struct luks_info *li, const char *indent)
{
	if (img->bindings_invalid) {
		printf("%sbindings: malformed (ignored)\n", indent);
		return;
	}
	for (unsigned int i = 0; img->bindings && i < img->bindings->count; i++) {
		const struct binding *b = &img->bindings->b[i];
		size_t n = strlen(b->config);

		printf("%sKey slot %u: %s %.*s%s%s\n", indent, b->slot, b->pin, CONFIG_SHOWN, b->config,
		       n > CONFIG_SHOWN ? "..." : "",
		       li && b->slot < LUKS_NUM_SLOTS && !li->slots[b->slot].active ? " (key slot disabled)" : "");
	}
}

void bindings_json(struct json *j, const struct image *img, const struct luks_info *li)
{
	if (img->bindings_invalid)
		json_bool(j, "bindings-malformed", true);
	json_begin_array(j, "bindings");
	for (unsigned int i = 0; img->bindings && i < img->bindings->count; i++) {
		const struct binding *b = &img->bindings->b[i];

		json_begin_object(j, NULL);
		json_u64(j, "slot", b->slot);
		json_string(j, "pin", b->pin);
		json_string(j, "config", b->config);
		if (li)
			json_bool(j, "slot-active", li->slots[b->slot].active);
		json_end_object(j);
	}
	json_end_array(j);
}
