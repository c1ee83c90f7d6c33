/* qcowsetup table IMAGE NAME: the device-mapper tables `open` would load,
 * without a passphrase and without touching the kernel. Host devices show
 * as placeholders ({loop:/abs/path} for files, {dev:/dev/...} for block
 * devices), internal devices as /dev/mapper/NAME_..., keys as keyring
 * references. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dmtable.h"
#include "keys.h"
#include "log.h"
#include "qcowsetup.h"

struct layer_strings {
	char host[PATH_MAX + 16];
	char cipher[DM_CIPHER_MAX + 1];
};

/* "{loop:/abs/path}" or "{dev:/dev/sdb}" for the file holding a layer's data */
static int host_placeholder(const char *path, char *buf, size_t size)
{
	char *abs = realpath(path, NULL);
	struct stat st;
	int n;

	n = snprintf(buf, size, "{%s:%s}",
		     abs && !stat(abs, &st) && S_ISBLK(st.st_mode) ? "dev" : "loop", abs ? abs : path);
	free(abs);
	if (n < 0 || (size_t)n >= size) {
		log_err("Path too long: %s", path);
		return -ENAMETOOLONG;
	}
	for (char *c = buf; *c; c++)
		if ((unsigned char)*c <= ' ' || *c == 0x7f) {
			log_err("Cannot show %s in a table: its path contains whitespace or control characters.", path);
			return -EINVAL;
		}
	return 0;
}

static int layer_params(const struct image *img, struct layer_strings *ls,
			struct dm_layer_params *lp, struct luks_info *li)
{
	int r;

	r = host_placeholder(img->has_data_file && img->data_io.name ? img->data_io.name : img->path,
			     ls->host, sizeof(ls->host));
	if (r)
		return r;
	lp->host_dev = ls->host;
	switch (img->crypt_method) {
	case IMG_CRYPT_AES:
		lp->cipher = LEGACY_AES_DM_CIPHER;
		lp->key_size = LEGACY_AES_KEY_SIZE;
		break;
	case IMG_CRYPT_LUKS:
		r = luks_read_info(&img->io, img->crypt_header_offset, img->crypt_header_length, li);
		if (r) {
			log_err("%s: cannot read the LUKS header: %s.", img->path, strerror(-r));
			return r;
		}
		r = luks_dm_cipher_spec(li, ls->cipher, sizeof(ls->cipher));
		if (r) {
			log_err("%s: the LUKS cipher %s-%s cannot be given to dm-crypt.", img->path,
				li->cipher_name, li->cipher_mode);
			return r;
		}
		lp->cipher = ls->cipher;
		lp->key_size = li->key_bytes;
		break;
	default:
		break;	/* dm_stack_build refuses unknown methods */
	}
	return 0;
}

int cmd_table(int argc, char **argv)
{
	struct dm_layer_params lp[IMG_MAX_CHAIN_DEPTH + 1] = { 0 };
	struct layer_strings *ls = NULL;
	struct dm_stack_params p = { .name = argv[1] };
	struct dm_stack *stack = NULL;
	struct luks_info li, top_li = { 0 };
	struct run_list runs;
	struct image *img = NULL;
	const struct image *layer;
	char id[64], *abs = NULL;
	unsigned int n = 0;
	int r;

	(void)argc;	/* IMAGE NAME, checked by the command table */
	run_list_init(&runs);
	r = tools_open_image(argv[0], false, &img);
	if (r < 0)
		return r;
	ls = calloc(IMG_MAX_CHAIN_DEPTH + 1, sizeof(*ls));
	if (!ls) {
		r = -ENOMEM;
		goto out;
	}
	for (layer = img; layer; layer = layer->backing, n++) {
		if (n > IMG_MAX_CHAIN_DEPTH) {
			r = -ELOOP;
			goto out;
		}
		r = layer_params(layer, &ls[n], &lp[n], n ? &li : &top_li);
		if (r)
			goto out;
	}

	abs = realpath(argv[0], NULL);
	r = dm_image_id(img->crypt_method == IMG_CRYPT_LUKS ? top_li.uuid : NULL,
			abs ? abs : argv[0], id, sizeof(id));
	if (r) {
		log_err("%s: no usable identifier for the device UUIDs.", img->path);
		goto out;
	}

	r = image_map_chain(img, &runs);
	if (r)
		goto out;

	p.id = id;
	p.layers = lp;
	p.nlayers = n;
	/* read-write is not implemented yet: every mapping is read-only */
	p.read_only = true;
	p.allow_discards = opt.allow_discards;
	p.max_targets = (size_t)opt.max_targets;
	r = dm_stack_build(&p, img, &runs, &stack);
	if (r == -ENAMETOOLONG)
		r = -EINVAL;	/* NAME too long: a wrong parameter (exit 1) */
	if (r)
		goto out;
	r = dm_stack_format(stack, stdout);
	if (r)
		log_err("Cannot write the tables: %s.", strerror(-r));
out:
	dm_stack_free(stack);
	run_list_free(&runs);
	free(abs);
	free(ls);
	tools_close_image(img);
	return r;
}
