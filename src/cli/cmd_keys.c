/* Key slots of the LUKS header embedded in a qcow2 image, as cryptsetup's
 * luksAddKey, luksRemoveKey (luksKillSlot with --key-slot), luksChangeKey
 * and luksDump:
 *   qcowsetup add-key IMAGE [NEW_KEY_FILE]
 *   qcowsetup remove-key IMAGE [KEY_FILE]
 *   qcowsetup change-key IMAGE [NEW_KEY_FILE]
 *   qcowsetup dump-keys IMAGE
 * The header region is edited in memory by libcryptsetup (crypto_luks.c)
 * and written back in place in a crash-safe order (qcow2_create.c): new key
 * material first, then the header sector, then the wiping of removed
 * slots, with an fsync after each. The volume key never changes, so these
 * work on images that are mapped; they refuse while QEMU has the image
 * open. The last key slot is only removed with --force.
 *
 * The shared parts (passphrases, LUKS parameters, locks) are in
 * utils_keys.c and utils_files.c. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "binding.h"
#include "cmd_keys.h"
#include "fileio.h"
#include "json.h"
#include "log.h"
#include "passphrase.h"
#include "qcow2_create.h"
#include "qcowsetup.h"

void keyimg_close(struct keyimg *k)
{
	if (k->img)
		image_free(k->img, &file_io_opener);
	file_io_free(&k->io);
	if (k->fd >= 0)
		close(k->fd);
	free(k->region);
	memset(k, 0, sizeof(*k));
	k->fd = -1;
}

int keyimg_open(const char *path, bool write, struct keyimg *k)
{
	struct image_open_opts oo = { .no_backing = true };
	int r;

	memset(k, 0, sizeof(*k));
	k->path = path;
	signal(SIGXFSZ, SIG_IGN);	/* a file size limit gives EFBIG, not death */
	k->fd = open(path, (write ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (k->fd < 0) {
		r = -errno;
		log_err("Cannot open %s: %s", path, strerror(-r));
		return r;
	}
	if (write) {
		r = keys_lock_for_write(k->fd, path, true);
		if (r < 0)
			goto fail;
	}
	r = file_io_from_fd(k->fd, path, &k->io);
	if (r < 0)
		goto fail;
	r = image_open_io(&file_io_opener, &k->io, &oo, &k->img);
	if (r < 0)
		goto fail;
	if (k->img->format != IMG_FMT_QCOW2 || k->img->crypt_method != IMG_CRYPT_LUKS) {
		log_err("%s is not a LUKS-encrypted qcow2 image%s.", path,
			k->img->crypt_method == IMG_CRYPT_AES ? " (legacy AES: see qcowsetup convert)" : "");
		r = -ENOTSUP;
		goto fail;
	}
	k->off = k->img->crypt_header_offset;
	k->len = k->img->crypt_header_length;
	r = luks_read_info(&k->io, k->off, k->len, &k->info);
	if (r < 0)
		goto fail;
	k->region = malloc(k->len);
	if (!k->region) {
		r = -ENOMEM;
		goto fail;
	}
	r = img_pread(&k->io, k->region, k->len, k->off);
	if (r < 0) {
		log_err("%s: cannot read the LUKS header: %s", path, strerror(-r));
		goto fail;
	}
	return 0;
fail:
	keyimg_close(k);
	return r;
}

/* Write the edited region back and check what is on disk. */
int keyimg_store(struct keyimg *k, const uint8_t *new)
{
	uint8_t *back;
	int r;

	r = qcow2_update_crypt_header(k->fd, k->off, k->region, new, k->len);
	if (r < 0) {
		log_err("%s: cannot write the LUKS header: %s", k->path, strerror(-r));
		return r;
	}
	back = malloc(k->len);
	if (!back)
		return -ENOMEM;
	r = img_pread(&k->io, back, k->len, k->off);
	if (r == 0 && memcmp(back, new, k->len)) {
		log_err("%s: the LUKS header reads back different from what was written.", k->path);
		r = -EIO;
	}
	free(back);
	return r;
}

void key_edit_end(struct key_edit *e)
{
	free(e->new);
	passphrase_free(e->newpp);
	volume_key_free(e->vk);
	keyimg_close(&e->k);
}

/* The volume key and the slot that the existing passphrase opens, asked
 * again on a terminal (--tries); keyfile_arg overrides --key-file. Then
 * the new passphrase (from new_file, with new_key), and a copy of the
 * region to edit. */
int key_edit_unlock(struct key_edit *e, const char *keyfile_arg, bool new_key, const char *new_file)
{
	struct passphrase_opts po = {
		.key_file = keyfile_arg ? keyfile_arg : opt.key_file,
		.keyfile_offset = opt.keyfile_offset,
		.keyfile_size = opt.keyfile_size,
		.image_name = e->k.path,
	};
	int tries = tools_passphrase_interactive(&po) ? opt.tries : 1, r = -EPERM;
	struct passphrase *pp = NULL;

	for (int i = 0; i < tries; i++) {
		r = tools_read_passphrase(&po, &pp);
		if (r < 0)
			return r;
		r = luks_unlock(&e->k.io, e->k.off, e->k.len, pp, &e->vk, &e->slot);
		passphrase_free(pp);
		pp = NULL;
		if (r != -EPERM)
			break;
		log_err("No key available with this passphrase.");
	}
	if (r == 0 && new_key)
		r = keys_read_new_passphrase(new_file, e->k.path, &e->newpp);
	if (r < 0)
		return r;
	e->new = malloc(e->k.len);
	if (!e->new)
		return -ENOMEM;
	memcpy(e->new, e->k.region, e->k.len);
	return 0;
}

int cmd_add_key(int argc, char **argv)
{
	struct key_edit e = { 0 };
	struct luks_pbkdf pbkdf;
	int slot, r;

	r = keyimg_open(argv[0], true, &e.k);
	if (r < 0)
		return r;
	if (e.k.info.active_slots >= LUKS_NUM_SLOTS) {
		log_err("%s: all %d key slots are in use.", e.k.path, LUKS_NUM_SLOTS);
		r = -ENOSPC;
	} else if (opt.key_slot >= 0 && e.k.info.slots[opt.key_slot].active) {
		log_err("%s: key slot %d is in use.", e.k.path, opt.key_slot);
		r = -EEXIST;
	} else {
		r = key_edit_unlock(&e, NULL, true, argc > 1 ? argv[1] : opt.new_key_file);
	}
	keys_pbkdf(&pbkdf);
	if (r == 0)
		r = luks_keyslot_add(e.new, e.k.len, e.vk, e.newpp, opt.key_slot, &pbkdf, &slot);
	if (r == 0)
		r = keyimg_store(&e.k, e.new);
	if (r == 0)
		log_verbose("Key slot %d created.", slot);
	key_edit_end(&e);
	return r;
}

int cmd_remove_key(int argc, char **argv)
{
	struct key_edit e = { 0 };
	int kill = opt.key_slot, r;

	r = keyimg_open(argv[0], true, &e.k);
	if (r < 0)
		return r;
	if (kill >= 0 && !e.k.info.slots[kill].active) {
		log_err("%s: key slot %d is not in use.", e.k.path, kill);
		r = -EINVAL;
	} else {
		r = key_edit_unlock(&e, argc > 1 ? argv[1] : NULL, false, NULL);
	}
	/* --key-slot N: remove N (luksKillSlot), the passphrase proves access */
	if (kill < 0)
		kill = e.slot;
	if (r == 0 && e.k.info.active_slots <= 1 && !opt.force) {
		log_err("%s: key slot %d holds the last key; without it the image can never be opened "
			"again (--force removes it anyway).", e.k.path, kill);
		r = -EPERM;
	}
	if (r == 0)
		r = luks_keyslot_remove(e.new, e.k.len, kill);
	if (r == 0)
		r = keyimg_store(&e.k, e.new);
	if (r == 0)
		log_verbose("Key slot %d removed.", kill);
	key_edit_end(&e);
	return r;
}

int cmd_change_key(int argc, char **argv)
{
	struct key_edit e = { 0 };
	struct luks_pbkdf pbkdf;
	int new_slot, r;
	bool in_place;

	r = keyimg_open(argv[0], true, &e.k);
	if (r < 0)
		return r;
	r = key_edit_unlock(&e, NULL, true, argc > 1 ? argv[1] : opt.new_key_file);
	keys_pbkdf(&pbkdf);
	if (r == 0)
		r = luks_keyslot_change(e.new, e.k.len, e.vk, e.slot, e.newpp, &pbkdf, &new_slot, &in_place);
	if (r == 0 && in_place)
		log_std("%s: no free key slot: key slot %d is overwritten in place (an interruption "
			"while writing it loses that key).", e.k.path, new_slot);
	if (r == 0)
		r = keyimg_store(&e.k, e.new);
	if (r == 0)
		log_verbose("Key slot %d changed (now key slot %d).", e.slot, new_slot);
	key_edit_end(&e);
	return r;
}
int cmd_dump_keys(int argc, char **argv)
{
	const struct luks_info *in;
	struct keyimg k;
	struct json j;
	int r;

	(void)argc;
	r = keyimg_open(argv[0], false, &k);
	if (r < 0)
		return r;
	in = &k.info;
	if (opt.json) {
		json_init(&j, stdout, true);
		json_begin_object(&j, NULL);
		json_string(&j, "filename", k.path);
		json_u64(&j, "version", 1);
		json_string(&j, "cipher-name", in->cipher_name);
		json_string(&j, "cipher-mode", in->cipher_mode);
		json_string(&j, "hash", in->hash);
		json_u64(&j, "key-bits", (uint64_t)in->key_bytes * 8);
		json_u64(&j, "payload-offset", in->payload_offset);
		json_u64(&j, "mk-iterations", in->mk_iterations);
		json_string(&j, "uuid", in->uuid);
		json_u64(&j, "header-offset", k.off);
		json_u64(&j, "header-length", k.len);
		json_begin_array(&j, "slots");
		for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
			json_begin_object(&j, NULL);
			json_u64(&j, "slot", (uint64_t)i);
			json_bool(&j, "active", in->slots[i].active);
			if (in->slots[i].active)
				json_u64(&j, "iterations", in->slots[i].iterations);
			json_u64(&j, "key-offset", in->slots[i].key_offset);
			if (in->slots[i].active)
				json_u64(&j, "stripes", in->slots[i].stripes);
			json_end_object(&j);
		}
		json_end_array(&j);
		bindings_json(&j, k.img, in);
		json_end_object(&j);
		json_finish(&j);
	} else {
		printf("LUKS header information for %s\n\n", k.path);
		printf("Version:        1\n");
		printf("Cipher name:    %s\n", in->cipher_name);
		printf("Cipher mode:    %s\n", in->cipher_mode);
		printf("Hash spec:      %s\n", in->hash);
		printf("Payload offset: %" PRIu64 " (not used: data lives in qcow2 clusters)\n",
		       in->payload_offset / 512);
		printf("MK bits:        %u\n", in->key_bytes * 8);
		printf("MK iterations:  %u\n", in->mk_iterations);
		printf("UUID:           %s\n", in->uuid);
		printf("Header region:  offset %" PRIu64 ", %" PRIu64 " bytes (qcow2 extension 0x0537be77)\n\n",
		       k.off, k.len);
		for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
			const struct luks_slot *s = &in->slots[i];

			printf("Key Slot %d: %s\n", i, s->active ? "ENABLED" : "DISABLED");
			if (!s->active)
				continue;
			printf("\tIterations:         \t%u\n", s->iterations);
			printf("\tKey material offset:\t%" PRIu64 "\n", s->key_offset / 512);
			printf("\tAF stripes:         \t%u\n", s->stripes);
		}
		if (k.img->bindings || k.img->bindings_invalid) {
			printf("\nBindings (clevis; qcow2 extension 0x%08x):\n", QCOW2_EXT_BINDINGS);
			bindings_human(k.img, in, "\t");
		}
	}
	keyimg_close(&k);
	return 0;
}
