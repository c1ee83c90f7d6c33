/* qcowsetup open / close / status / list: the device stack of DESIGN.md
 * through real device-mapper. Open is atomic: every failure removes what
 * was created (dm devices, keyring keys, loop devices and with them the
 * image locks) before returning. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "dm.h"
#include "json.h"
#include "keyring.h"
#include "lock.h"
#include "log.h"
#include "loop.h"
#include "passphrase.h"
#include "qcowsetup.h"
#include "stack.h"

/* One file of the chain held by the mapping: a loop device over it, which
 * also keeps the file's QEMU-compatible locks for the life of the mapping. */
struct held_file {
	struct loop_dev loop;
	bool attached;
};

struct open_ctx {
	const char *image_path;
	const char *name;
	struct image *img;
	struct run_list runs;
	struct tools_layer *tl;
	unsigned int nlayers;
	struct held_file data[IMG_MAX_CHAIN_DEPTH];	/* each layer's data file */
	struct held_file meta[IMG_MAX_CHAIN_DEPTH];	/* metadata file, when the data is external */
	struct volume_key *vk[IMG_MAX_CHAIN_DEPTH];
	int32_t key_serial[IMG_MAX_CHAIN_DEPTH];
	struct dm_stack *stack;
	size_t created;		/* devices of the stack created so far */
	int step;
};

/* Fault injection for the atomicity tests: --debug-fail-step K makes the
 * K-th step of open fail as if the kernel had refused it. */
static int fail_step_at(struct open_ctx *c, const char *what)
{
	c->step++;
	log_dbg("open step %d: %s", c->step, what);
	if (opt.debug_fail_step && c->step == opt.debug_fail_step) {
		log_err("Injected failure at step %d (%s).", c->step, what);
		return -EIO;
	}
	return 0;
}

static bool valid_dm_name(const char *name)
{
	size_t len = strlen(name);

	if (!len || len > 100 || !strcmp(name, ".") || !strcmp(name, ".."))
		return false;
	for (const char *p = name; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
		      *p == '-' || *p == '_' || *p == '.' || *p == '+'))
			return false;
	return true;
}

/* Open, lock and attach one file read-only. */
static int hold_file(struct open_ctx *c, const char *path, struct held_file *h)
{
	int fd, r;

	r = fail_step_at(c, "lock and attach a loop device");
	if (r)
		return r;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		log_err("Cannot open %s: %s.", path, strerror(-r));
		return r;
	}
	r = lock_image(fd, false, path);
	if (r == 0) {
		r = loop_attach(fd, true, true, true, &h->loop);
		if (r)
			log_err("Cannot attach a loop device to %s: %s.", path, strerror(-r));
	}
	close(fd);	/* the loop device holds the file, and with it the locks */
	if (r == 0) {
		h->attached = true;
		log_verbose("%s: %s (%s I/O)", path, h->loop.path, h->loop.direct_io ? "direct" : "buffered");
	}
	return r;
}

static void release_file(struct held_file *h)
{
	if (!h->attached)
		return;
	/* autoclear: the last close detaches, unless a dm table holds it */
	close(h->loop.fd);
	h->loop.fd = -1;
	h->attached = false;
}

static int unlock_layer(struct open_ctx *c, unsigned int d, struct passphrase **shared)
{
	struct image *l = (struct image *)c->tl[d].img;
	struct passphrase_opts po = {
		.key_file = opt.key_file,
		.keyfile_offset = opt.keyfile_offset,
		.keyfile_size = opt.keyfile_size,
		.image_name = l->path,
	};
	bool interactive = tools_passphrase_interactive(&po);
	int tries = interactive ? opt.tries : 1, r = -EPERM;

	for (int attempt = 0; attempt <= tries; attempt++) {
		struct passphrase *pp = NULL;

		if (attempt == 0) {
			/* the passphrase that opened the layer above comes first */
			if (!*shared)
				continue;
			pp = *shared;
		} else {
			if (attempt > 1 || *shared) {
				if (!interactive)
					break;
			}
			r = tools_read_passphrase(&po, &pp);
			if (r < 0)
				return r;
		}
		if (l->crypt_method == IMG_CRYPT_LUKS) {
			int slot = -1;

			r = luks_unlock(&l->io, l->crypt_header_offset, l->crypt_header_length, pp, &c->vk[d], &slot);
			if (r == 0)
				log_verbose("%s: key slot %d unlocked.", l->path, slot);
		} else {
			r = legacy_aes_key(pp, &c->vk[d]);
			if (r == 0 && !opt.skip_key_check) {
				r = legacy_key_check(l, c->vk[d]);
				if (r == -EPERM) {
					volume_key_free(c->vk[d]);
					c->vk[d] = NULL;
				}
			}
		}
		if (r == 0) {
			if (pp != *shared) {
				passphrase_free(*shared);
				*shared = pp;
			}
			return 0;
		}
		if (pp != *shared)
			passphrase_free(pp);
		if (r != -EPERM)
			return r;
		if (attempt > 0)
			log_err("No key available with this passphrase for %s%s.", l->path,
				l->crypt_method == IMG_CRYPT_AES ?
				" (legacy AES: the decrypted data looks random; --skip-key-check accepts it)" : "");
	}
	return -EPERM;
}

static int add_keys(struct open_ctx *c)
{
	char desc[DM_KEY_DESC_MAX];
	int r;

	for (unsigned int d = 0; d < c->nlayers; d++) {
		if (!c->vk[d])
			continue;
		r = fail_step_at(c, "add a key to the kernel keyring");
		if (r)
			return r;
		r = dm_key_description(c->name, d, desc, sizeof(desc));
		if (r == 0)
			r = keyring_add_logon(desc, c->vk[d]->key, c->vk[d]->size, &c->key_serial[d]);
		if (r) {
			log_err("Cannot add the volume key to the kernel keyring: %s.", strerror(-r));
			return r;
		}
	}
	return 0;
}

static void remove_keys(struct open_ctx *c)
{
	for (unsigned int d = 0; d < c->nlayers; d++)
		if (c->key_serial[d]) {
			keyring_remove(c->key_serial[d]);
			c->key_serial[d] = 0;
		}
}

struct table_iter {
	const struct dm_stack *s;
	const struct dm_device *dev;
};

static int target_at(void *opaque, size_t i, struct dm_table_target *t, char *buf, size_t size)
{
	struct table_iter *it = opaque;
	const struct dm_target *dt = &it->dev->targets[i];
	int n;

	n = dm_target_params(it->s, it->dev, dt, buf, size);
	if (n < 0)
		return n;
	t->start = dt->start;
	t->length = dt->len;
	t->type = dm_target_type_name(dt->type);
	t->params = buf;
	return 0;
}

static int create_devices(struct open_ctx *c)
{
	char ref[32];
	int r;

	for (size_t i = 0; i < c->stack->count; i++) {
		const struct dm_device *dev = &c->stack->devices[i];
		struct table_iter it = { .s = c->stack, .dev = dev };
		struct dm_table t = { .count = dev->count, .target_fn = target_at, .opaque = &it };
		uint32_t maj, min;

		r = fail_step_at(c, dev->name);
		if (r)
			return r;
		r = dm_create_device(dev->name, dev->uuid, dev->read_only, dev->hidden, &t, &maj, &min);
		if (r) {
			log_err("Cannot create device %s: %s.", dev->name, strerror(-r));
			return r;
		}
		c->created = i + 1;
		snprintf(ref, sizeof(ref), "%u:%u", maj, min);
		r = dm_stack_set_ref(c->stack, i, ref);
		if (r)
			return r;
	}
	return 0;
}

static void remove_devices(struct open_ctx *c)
{
	while (c->created) {
		const struct dm_device *dev = &c->stack->devices[--c->created];
		int r = dm_remove_device(dev->name, false, true);

		if (r)
			log_err("Cannot remove %s while undoing the open: %s.", dev->name, strerror(-r));
	}
}

static void open_ctx_free(struct open_ctx *c)
{
	remove_keys(c);
	for (unsigned int d = 0; d < IMG_MAX_CHAIN_DEPTH; d++) {
		release_file(&c->data[d]);
		release_file(&c->meta[d]);
		volume_key_free(c->vk[d]);
	}
	dm_stack_free(c->stack);
	run_list_free(&c->runs);
	free(c->tl);
	tools_close_image(c->img);
}

static int do_open(struct open_ctx *c)
{
	struct passphrase *shared = NULL;
	struct dm_dev_info info;
	size_t ncomp;
	int r;

	if (!valid_dm_name(c->name)) {
		log_err("Invalid device name \"%s\": use letters, digits and - _ . + (at most 100).", c->name);
		return -EINVAL;
	}
	if (!opt.readonly && !opt.snapshot) {
		log_err("Read-write mapping is not available yet: use --readonly (-r).");
		return -EINVAL;
	}
	r = dm_check_control();
	if (r)
		return r;
	r = dm_device_info(c->name, &info);
	if (r == 0 && info.exists) {
		log_err("Device %s already exists.", c->name);
		return -EEXIST;
	}
	r = tools_open_image(c->image_path, false, &c->img);
	if (r)
		return r;
	c->tl = calloc(IMG_MAX_CHAIN_DEPTH, sizeof(*c->tl));
	if (!c->tl)
		return -ENOMEM;
	r = tools_stack_layers(c->img, c->tl, &c->nlayers);
	if (r)
		return r;
	r = image_map_chain(c->img, &c->runs);
	if (r)
		return r;
	ncomp = tools_count_compressed(&c->runs);
	if (ncomp) {
		log_err("%s: the image has %zu compressed clusters; mapping them is not supported yet (decompress with `qemu-img convert -O qcow2`).",
			c->image_path, ncomp);
		return -ENOTSUP;
	}
	/* keys first: a wrong passphrase must not cost a loop device */
	for (unsigned int d = 0; d < c->nlayers; d++) {
		if (c->tl[d].img->crypt_method == IMG_CRYPT_NONE)
			continue;
		r = unlock_layer(c, d, &shared);
		if (r)
			goto out;
	}
	passphrase_free(shared);
	shared = NULL;
	r = dm_check_target("linear");
	if (!r)
		r = dm_check_target("zero");
	for (unsigned int d = 0; !r && d < c->nlayers; d++)
		if (c->vk[d])
			r = dm_check_target("crypt");
	if (r)
		goto out;
	for (unsigned int d = 0; d < c->nlayers; d++) {
		const struct image *l = c->tl[d].img;

		r = hold_file(c, tools_layer_data_path(l), &c->data[d]);
		if (r)
			goto out;
		if (l->has_data_file) {
			r = hold_file(c, l->path, &c->meta[d]);
			if (r)
				goto out;
		}
		snprintf(c->tl[d].host, sizeof(c->tl[d].host), "%u:%u", c->data[d].loop.major, c->data[d].loop.minor);
	}
	r = tools_stack_build(c->img, c->image_path, c->name, c->tl, c->nlayers, &c->runs, true, &c->stack);
	if (r)
		goto out;
	r = add_keys(c);
	if (r)
		goto out;
	r = create_devices(c);
	if (r)
		goto out;
	/* dm-crypt copied the keys at table load */
	remove_keys(c);
	r = fail_step_at(c, "finish");
out:
	passphrase_free(shared);
	if (r)
		remove_devices(c);
	return r;
}

int cmd_open(int argc, char **argv)
{
	struct open_ctx c = { .image_path = argv[0], .name = argv[1] };
	int r;

	(void)argc;
	run_list_init(&c.runs);
	r = do_open(&c);
	open_ctx_free(&c);
	dm_release();
	if (r == 0)
		log_verbose("Device %s is ready: /dev/mapper/%s", c.name, c.name);
	return r;
}

/* ---- close, status, list ---- */

#define UUID_TOP_PREFIX "QCOW2-"
#define UUID_INT_PREFIX "QCOW2-INT-"

struct dev_entry {
	char name[128];
	char uuid[DM_INFO_UUID_SIZE];
	uint32_t major, minor;
};

struct dev_list {
	struct dev_entry *v;
	size_t n, alloc;
};

static int collect_dev(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct dev_list *l = opaque;

	if (!uuid || strncmp(uuid, UUID_TOP_PREFIX, strlen(UUID_TOP_PREFIX)))
		return 0;
	if (l->n == l->alloc) {
		size_t na = l->alloc ? 2 * l->alloc : 16;
		struct dev_entry *p = realloc(l->v, na * sizeof(*p));

		if (!p)
			return -ENOMEM;
		l->v = p;
		l->alloc = na;
	}
	snprintf(l->v[l->n].name, sizeof(l->v[l->n].name), "%s", name);
	snprintf(l->v[l->n].uuid, sizeof(l->v[l->n].uuid), "%s", uuid);
	l->v[l->n].major = major;
	l->v[l->n].minor = minor;
	l->n++;
	return 0;
}

static bool is_top_uuid(const char *uuid)
{
	return !strncmp(uuid, UUID_TOP_PREFIX, strlen(UUID_TOP_PREFIX)) &&
	       strncmp(uuid, UUID_INT_PREFIX, strlen(UUID_INT_PREFIX));
}

/* Internal devices of the mapping NAME whose top UUID is top_uuid
 * ("QCOW2-<id>-NAME"): UUID "QCOW2-INT-<id>-NAME_<suffix>". */
static bool belongs_to(const char *uuid, const char *top_uuid, const char *name)
{
	const char *id_name = top_uuid + strlen(UUID_TOP_PREFIX);
	size_t len = strlen(id_name);

	if (strncmp(uuid, UUID_INT_PREFIX, strlen(UUID_INT_PREFIX)))
		return false;
	uuid += strlen(UUID_INT_PREFIX);
	(void)name;
	return !strncmp(uuid, id_name, len) && uuid[len] == '_';
}

static int find_mapping(const char *name, struct dev_list *all, struct dm_dev_info *info)
{
	int r;

	r = dm_check_control();
	if (r)
		return r;
	r = dm_device_info(name, info);
	if (r)
		return r;
	if (!info->exists) {
		log_err("Device %s does not exist.", name);
		return -ENODEV;
	}
	if (!is_top_uuid(info->uuid)) {
		log_err("Device %s is not a qcowsetup mapping.", name);
		return -ENODEV;
	}
	return dm_list_devices(collect_dev, all);
}

int cmd_close(int argc, char **argv)
{
	const char *name = argv[0];
	struct dev_list all = { 0 };
	struct dm_dev_info info;
	bool progress = true;
	int r;

	(void)argc;
	r = find_mapping(name, &all, &info);
	if (r)
		goto out;
	if (info.open_count > 0 && !opt.deferred) {
		log_err("Device %s is still in use (open count %d).", name, info.open_count);
		r = -EBUSY;
		goto out;
	}
	r = dm_remove_device(name, opt.deferred, true);
	if (r) {
		log_err("Cannot remove %s: %s.", name, strerror(-r));
		goto out;
	}
	if (opt.deferred && info.open_count > 0) {
		log_verbose("Device %s will be removed on its last close.", name);
		goto out;	/* internal devices stay until then; a later close cleans up */
	}
	/* internal devices: remove those nothing holds, until none is left */
	while (progress) {
		progress = false;
		for (size_t i = 0; i < all.n; i++) {
			struct dm_dev_info di;

			if (!all.v[i].name[0] || !belongs_to(all.v[i].uuid, info.uuid, name))
				continue;
			if (dm_device_info(all.v[i].name, &di) || !di.exists) {
				all.v[i].name[0] = '\0';
				continue;
			}
			if (di.open_count > 0)
				continue;
			r = dm_remove_device(all.v[i].name, false, true);
			if (r) {
				log_err("Cannot remove %s: %s.", all.v[i].name, strerror(-r));
				goto out;
			}
			all.v[i].name[0] = '\0';
			progress = true;
		}
	}
	for (size_t i = 0; i < all.n; i++)
		if (all.v[i].name[0] && belongs_to(all.v[i].uuid, info.uuid, name)) {
			log_err("Internal device %s of %s is still in use.", all.v[i].name, name);
			r = -EBUSY;
		}
out:
	free(all.v);
	dm_release();
	return r;
}

/* The loop devices (and so the files) under a device, following tables. */
struct walk_ctx {
	struct json *j;
	int depth;
	unsigned int targets;
	char files[IMG_MAX_CHAIN_DEPTH * 2][4096];
	unsigned int nfiles;
	char cipher[DM_CIPHER_MAX + 1];
	struct dev_list *all;
};

static void note_file(struct walk_ctx *w, const char *path)
{
	for (unsigned int i = 0; i < w->nfiles; i++)
		if (!strcmp(w->files[i], path))
			return;
	if (w->nfiles < sizeof(w->files) / sizeof(w->files[0]))
		snprintf(w->files[w->nfiles++], sizeof(w->files[0]), "%s", path);
}

static int walk_device(struct walk_ctx *w, uint32_t major, uint32_t minor);

static int walk_target(void *opaque, uint64_t start, uint64_t length, const char *type, const char *params)
{
	struct walk_ctx *w = opaque;
	unsigned int maj, min;
	const char *dev = NULL;
	char spec[DM_CIPHER_MAX + 1];

	(void)start;
	(void)length;
	if (w->depth == 0)
		w->targets++;
	if (!strcmp(type, "linear")) {
		dev = params;
	} else if (!strcmp(type, "crypt")) {
		/* cipher key iv_offset device offset */
		if (sscanf(params, "%128s", spec) == 1)
			snprintf(w->cipher, sizeof(w->cipher), "%s", spec);
		dev = params;
		for (int skip = 0; dev && skip < 3; skip++) {
			dev = strchr(dev, ' ');
			if (dev)
				dev++;
		}
	}
	if (dev && sscanf(dev, "%u:%u", &maj, &min) == 2)
		return walk_device(w, maj, min);
	return 0;
}

static int walk_device(struct walk_ctx *w, uint32_t major, uint32_t minor)
{
	struct loop_dev_info li;
	char path[64];
	int r;

	if (major == 7) {
		snprintf(path, sizeof(path), "/dev/loop%u", minor);
		if (loop_get_info(path, &li) == 0)
			note_file(w, li.backing_file);
		return 0;
	}
	for (size_t i = 0; i < w->all->n; i++)
		if (w->all->v[i].major == major && w->all->v[i].minor == minor && w->depth < 64) {
			w->depth++;
			r = dm_get_table(w->all->v[i].name, walk_target, w);
			w->depth--;
			return r;
		}
	return 0;
}

static void status_one(struct json *j, const char *name, struct dev_list *all, const struct dm_dev_info *info)
{
	struct walk_ctx *w = calloc(1, sizeof(*w));
	unsigned int internal = 0;

	if (!w)
		return;
	w->all = all;
	dm_get_table(name, walk_target, w);
	for (size_t i = 0; i < all->n; i++)
		internal += belongs_to(all->v[i].uuid, info->uuid, name);
	if (j) {
		json_begin_object(j, NULL);
		json_string(j, "name", name);
		json_string(j, "uuid", info->uuid);
		json_string(j, "device", name);
		json_bool(j, "read-only", info->read_only);
		json_i64(j, "open-count", info->open_count);
		json_u64(j, "targets", w->targets);
		json_u64(j, "internal-devices", internal);
		json_string(j, "encryption", w->cipher[0] ? w->cipher : "none");
		json_begin_array(j, "files");
		for (unsigned int i = 0; i < w->nfiles; i++)
			json_string(j, NULL, w->files[i]);
		json_end_array(j);
		json_end_object(j);
	} else {
		printf("/dev/mapper/%s is active%s.\n", name, info->open_count > 0 ? " and is in use" : "");
		printf("  uuid:      %s\n", info->uuid);
		printf("  mode:      %s\n", info->read_only ? "read-only" : "read/write");
		printf("  targets:   %u (top table)\n", w->targets);
		printf("  devices:   1 + %u internal\n", internal);
		printf("  cipher:    %s\n", w->cipher[0] ? w->cipher : "none");
		for (unsigned int i = 0; i < w->nfiles; i++)
			printf("  file:      %s\n", w->files[i]);
	}
	free(w);
}

int cmd_status(int argc, char **argv)
{
	struct dev_list all = { 0 };
	struct dm_dev_info info;
	struct json j;
	int r;

	(void)argc;
	r = find_mapping(argv[0], &all, &info);
	if (r == 0) {
		if (opt.json) {
			json_init(&j, stdout, true);
			status_one(&j, argv[0], &all, &info);
			json_finish(&j);
		} else {
			status_one(NULL, argv[0], &all, &info);
		}
	}
	free(all.v);
	dm_release();
	return r;
}

int cmd_list(int argc, char **argv)
{
	struct dev_list all = { 0 };
	struct json j;
	int r;

	(void)argc;
	(void)argv;
	r = dm_check_control();
	if (!r)
		r = dm_list_devices(collect_dev, &all);
	if (r)
		goto out;
	if (opt.json) {
		json_init(&j, stdout, true);
		json_begin_array(&j, NULL);
	}
	for (size_t i = 0; i < all.n; i++) {
		struct dm_dev_info info;

		if (!is_top_uuid(all.v[i].uuid) || dm_device_info(all.v[i].name, &info) || !info.exists)
			continue;
		if (opt.json)
			status_one(&j, all.v[i].name, &all, &info);
		else
			printf("%s\n", all.v[i].name);
	}
	if (opt.json) {
		json_end_array(&j);
		json_finish(&j);
	}
out:
	free(all.v);
	dm_release();
	return r;
}
