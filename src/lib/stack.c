/* The device stack of one image chain (see stack.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fileio.h"
#include "log.h"
#include "stack.h"

const char *stack_layer_data_path(const struct image *img)
{
	return img->has_data_file && img->data_io.name ? img->data_io.name : img->path;
}

static int layer_cipher(const struct image *img, struct stack_layer *tl)
{
	int r;

	switch (img->crypt_method) {
	case IMG_CRYPT_AES:
		snprintf(tl->cipher, sizeof(tl->cipher), "%s", LEGACY_AES_DM_CIPHER);
		return 0;
	case IMG_CRYPT_LUKS:
		r = luks_read_info(&img->io, img->crypt_header_offset, img->crypt_header_length, &tl->luks);
		if (r) {
			log_err("%s: cannot read the LUKS header: %s.", img->path, strerror(-r));
			return r;
		}
		r = luks_dm_cipher_spec(&tl->luks, tl->cipher, sizeof(tl->cipher));
		if (r)
			log_err("%s: the LUKS cipher %s-%s cannot be given to dm-crypt.", img->path,
				tl->luks.cipher_name, tl->luks.cipher_mode);
		return r;
	default:
		return 0;	/* dm_stack_build refuses unknown methods */
	}
}

int stack_layers_read(const struct image *img, struct stack_layer *tl, unsigned int *n)
{
	int r;

	*n = 0;
	for (const struct image *l = img; l; l = l->backing) {
		if (*n >= IMG_MAX_CHAIN_DEPTH)
			return -ELOOP;
		memset(&tl[*n], 0, sizeof(tl[*n]));
		tl[*n].img = l;
		r = layer_cipher(l, &tl[*n]);
		if (r)
			return r;
		(*n)++;
	}
	return 0;
}

unsigned int stack_layer_key_size(const struct stack_layer *l)
{
	switch (l->img->crypt_method) {
	case IMG_CRYPT_LUKS:
		return l->luks.key_bytes;
	case IMG_CRYPT_AES:
		return LEGACY_AES_KEY_SIZE;
	default:
		return 0;
	}
}

int stack_build(const struct image *img, const struct stack_layer *tl, unsigned int n, const struct run_list *runs,
		const struct stack_options *o, char *id, size_t idsize, struct dm_stack **out)
{
	struct dm_layer_params lp[IMG_MAX_CHAIN_DEPTH] = { 0 };
	struct dm_stack_params p = { .name = o->name };
	char real[PATH_MAX];
	int r;

	for (unsigned int i = 0; i < n; i++) {
		lp[i].host_dev = tl[i].host;
		lp[i].cipher = tl[i].cipher[0] ? tl[i].cipher : NULL;
		lp[i].key_size = stack_layer_key_size(&tl[i]);
	}
	if (file_io_real_path(&img->io, real, sizeof(real)))
		snprintf(real, sizeof(real), "%s", img->path);
	if (o->id)
		r = snprintf(id, idsize, "%s", o->id) < (int)idsize ? 0 : -ENOSPC;
	else
		r = dm_image_id(img->crypt_method == IMG_CRYPT_LUKS ? tl[0].luks.uuid : NULL, real, id, idsize);
	if (r) {
		log_err("%s: no usable identifier for the device UUIDs.", img->path);
		return r;
	}
	p.id = id;
	p.layers = lp;
	p.nlayers = n;
	p.read_only = o->read_only;
	p.allow_discards = o->allow_discards;
	p.max_targets = (size_t)(o->max_targets ? o->max_targets : 65536);
	p.slow_dev = o->slow_dev;
	r = dm_stack_build(&p, img, runs, out);
	if (r == -ENAMETOOLONG)
		r = -EINVAL;	/* NAME too long: a wrong parameter (exit 1) */
	return r;
}

size_t stack_count_compressed(const struct run_list *runs)
{
	size_t n = 0;

	for (size_t i = 0; i < runs->count; i++)
		n += runs->runs[i].kind == RUN_COMPRESSED;
	return n;
}
