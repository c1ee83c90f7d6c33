/* qcowsetup open --tab [NAME...] / close --tab [NAME...]: the entries of
 * /etc/qcowtab (qcowtab(5)), as systemd units, dracut and udev run them.
 *
 * For each entry: find the device that holds the image (libblkid, through
 * probe_blkid.c), mount its filesystem under /run/qcowsetup/mnt (read-only
 * unless the entry maps read-write; a filesystem already mounted somewhere is
 * used where it is), find the key file the same way (mounted read-only under
 * /run/qcowsetup/key only while it is read), then map it as `qcowsetup open`
 * does. Passphrases are asked on the terminal, through systemd's password
 * agents (systemd-ask-password) when there is no terminal and systemd runs,
 * or read as one line from standard input when it is a pipe (plymouth,
 * scripts); entries marked same-passphrase share the passphrase that opened
 * the first of them: one question for all.
 *
 * The mapping itself is lib/mapping.c's mapping_open() with the entry's
 * settings; it asks tab_entry_passphrase() (tab_keys.c) for passphrases
 * when (and only when) an encrypted layer needs one: the key file, the
 * shared passphrase, then the questions. Finding and mounting: tab_files.c. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dm.h"
#include "dmtable.h"
#include "mapping.h"
#include "log.h"
#include "qcowsetup.h"
#include "tab.h"

/* Map the entry: its settings, its key sources. */
static int map_entry(struct tab_run *t, const struct qcowtab_entry *e, const char *image, const char *key_file)
{
	struct entry_keys k = { .t = t, .e = e, .key_file = key_file };
	struct mapping_params p = {
		.image = image,
		.name = e->name,
		.read_only = e->readonly,
		.snapshot = e->snapshot,
		.format = e->format,
		.trust_names = e->trust_names,
		.use_bindings = e->clevis,
		.binding_timeout = e->token_timeout,
		.allow_discards = e->discard,
		/* an entry expects a key (a key file, or a question) */
		.require_encryption = !e->allow_unencrypted,
		.max_targets = opt.max_targets,
		.nbd_connections = (unsigned int)opt.nbd_connections,
		.ask = tab_entry_passphrase,
		.ask_opaque = &k,
		.debug = opt.debug,
	};
	int r = mapping_open(&p);

	if (r == 0 && k.asked_last) {
		/* the question's answer opened it: the others' first try */
		passphrase_free(t->shared);
		t->shared = k.last;
		k.last = NULL;
	}
	passphrase_free(k.last);
	return r;
}

static bool entry_active(const char *name, bool *ours)
{
	struct dm_dev_info info;

	*ours = false;
	if (dm_device_info(name, &info) || !info.exists)
		return false;
	*ours = dm_uuid_is_top(info.uuid);
	return true;
}

static int open_entry(struct tab_run *t, const struct qcowtab_entry *e)
{
	struct held_mount img_mount = { 0 }, key_mount = { 0 };
	char image[PATH_MAX], key[PATH_MAX];
	const char *key_file = NULL;
	bool ours;
	int r;

	if (entry_active(e->name, &ours)) {
		if (!ours) {
			log_err("%s: a device-mapper device of that name exists and is not a qcowsetup mapping.", e->name);
			return -EEXIST;
		}
		log_verbose("%s is already active.", e->name);
		return 0;
	}
	switch (e->image.source) {
	case QCOWTAB_PATH_ONLY:
		snprintf(image, sizeof(image), "%s", e->image.path);
		break;
	case QCOWTAB_TAG_ONLY:
		r = probe_tag_device(e->image.tag, e->image.value, image, sizeof(image));
		if (r == -ENODEV)
			log_err("%s: no device with %s=%s (yet).", e->name, e->image.tag, e->image.value);
		if (r)
			return r;
		break;
	case QCOWTAB_TAG_PATH:
		r = tab_mount_location(&e->image, MOUNT_DIR, !e->readonly && !e->snapshot, &img_mount, image, sizeof(image));
		if (r)
			return r;
		break;
	default:
		return -EINVAL;
	}
	/* keyfile-timeout=: wait that long for the key file, then ask */
	if (e->key.source != QCOWTAB_NONE && e->keyfile_optional &&
	    tab_wait_key_location(&e->key, e->keyfile_timeout) < 0) {
		log_std("%s: no key file after %u s (keyfile-timeout): going on without it.", e->name, e->keyfile_timeout);
	} else if (e->key.source == QCOWTAB_PATH_ONLY) {
		key_file = e->key.path;
	} else if (e->key.source == QCOWTAB_TAG_PATH) {
		r = tab_mount_location(&e->key, KEY_MOUNT_DIR, false, &key_mount, key, sizeof(key));
		if (r && !e->keyfile_optional)
			goto out;
		if (r)
			log_std("%s: the key file's filesystem cannot be used (keyfile-timeout): going on without it.", e->name);
		key_file = r ? NULL : key;
	}
	log_verbose("%s: mapping %s%s%s.", e->name, image, key_file ? " with key file " : "", key_file ? key_file : "");
	r = map_entry(t, e, image, key_file);
out:
	tab_release_mount(&key_mount, false);
	if (r)
		tab_release_mount(&img_mount, true);
	return r;
}

/* The entries to work on: names (each must exist), or all of the table
 * (without the noauto ones when skip_noauto). */
static int select_entries(const struct qcowtab *tab, int argc, char **argv, bool skip_noauto,
			  const struct qcowtab_entry ***out, size_t *count)
{
	const struct qcowtab_entry **v = calloc(argc ? (size_t)argc : tab->count + 1, sizeof(*v));
	size_t n = 0;

	if (!v)
		return -ENOMEM;
	if (argc) {
		for (int i = 0; i < argc; i++) {
			const struct qcowtab_entry *e = qcowtab_find(tab, argv[i]);

			if (!e) {
				log_err("No entry %s in %s.", argv[i], tools_qcowtab_path());
				free(v);
				return -EINVAL;
			}
			v[n++] = e;
		}
	} else {
		for (size_t i = 0; i < tab->count; i++)
			if (!skip_noauto || !tab->entries[i].noauto)
				v[n++] = &tab->entries[i];
	}
	*out = v;
	*count = n;
	return 0;
}

/* "root, data": the names one same-passphrase question is for (the entries
 * not active yet); *out NULL when there are none. */
static int group_names(const struct qcowtab_entry **sel, size_t n, char **out)
{
	size_t len = 0;
	char *group;
	bool ours;

	*out = NULL;
	for (size_t i = 0; i < n; i++)
		if (sel[i]->same_passphrase && !entry_active(sel[i]->name, &ours))
			len += strlen(sel[i]->name) + 2;
	if (!len)
		return 0;
	group = calloc(1, len + 1);
	if (!group)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (!sel[i]->same_passphrase || entry_active(sel[i]->name, &ours))
			continue;
		if (*group)
			strcat(group, ", ");
		strcat(group, sel[i]->name);
	}
	*out = group;
	return 0;
}

int cmd_open_tab(int argc, char **argv)
{
	struct tab_run t = { 0 };
	const struct qcowtab_entry **sel = NULL;
	size_t n = 0;
	char *group = NULL;
	int r, first_err = 0;

	r = tools_load_qcowtab(&t.tab, false);
	if (r)
		return r;
	r = select_entries(&t.tab, argc, argv, true, &sel, &n);
	if (r)
		goto out;
	r = dm_check_control();
	if (r)
		goto out;
	r = group_names(sel, n, &group);
	if (r)
		goto out;
	t.group_names = group;
	for (size_t i = 0; i < n; i++) {
		r = open_entry(&t, sel[i]);
		if (r == 0)
			continue;
		if (sel[i]->nofail) {
			log_std("%s could not be mapped (nofail: going on).", sel[i]->name);
			continue;
		}
		/* (its reason is the line logged above) */
		log_verbose("%s could not be mapped.", sel[i]->name);
		if (!first_err)
			first_err = r;
	}
	r = first_err;
out:
	passphrase_free(t.shared);
	free(group);
	free(sel);
	qcowtab_free(&t.tab);
	dm_release();
	return r;
}

/* ---- close ---- */

int cmd_close_tab(int argc, char **argv)
{
	struct qcowtab tab;
	const struct qcowtab_entry **sel = NULL;
	size_t n = 0;
	int r, first_err = 0;

	r = tools_load_qcowtab(&tab, false);
	if (r)
		return r;
	r = select_entries(&tab, argc, argv, false, &sel, &n);
	if (r)
		goto out;
	r = dm_check_control();
	if (r)
		goto out;
	/* the reverse of the order of opening */
	for (size_t i = n; i-- > 0;) {
		const struct qcowtab_entry *e = sel[i];
		bool ours;

		if (!entry_active(e->name, &ours)) {
			log_verbose("%s is not active.", e->name);
		} else if (!ours) {
			log_err("%s is not a qcowsetup mapping: left alone.", e->name);
			r = -EINVAL;
		} else {
			r = mapping_close(e->name, opt.deferred);
		}
		if (r == 0 && !opt.deferred)
			tab_release_location(&e->image, MOUNT_DIR);
		if (r && !first_err)
			first_err = r;
		r = 0;
	}
	r = first_err;
out:
	free(sel);
	qcowtab_free(&tab);
	dm_release();
	return r;
}
