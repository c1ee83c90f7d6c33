/* The device stack of one image chain, as `open` creates it and `table`
 * prints it: the per-layer parameters (host device, cipher) and the stable
 * image identifier of the DM UUIDs, around dmtable.c's dm_stack_build. The
 * one place they are made (the daemon gets them as its arguments). */
#ifndef QS_STACK_H
#define QS_STACK_H

#include <limits.h>
#include <stdbool.h>

#include "dmtable.h"
#include "keys.h"
#include "runs.h"

struct stack_layer {
	const struct image *img;
	char host[PATH_MAX + 16];	/* how tables refer to the layer's data device */
	char cipher[DM_CIPHER_MAX + 1];
	struct luks_info luks;		/* LUKS layers */
};

/* The file that holds a layer's data (its external data file, or itself). */
const char *stack_layer_data_path(const struct image *img);

/* Fill tl[0..*n) for the chain of img: cipher and key size of encrypted
 * layers (host left empty for the caller). 0 or -errno, logged. */
int stack_layers_read(const struct image *img, struct stack_layer *tl, unsigned int *n);

/* Key size in bytes of an encrypted layer (0: none). */
unsigned int stack_layer_key_size(const struct stack_layer *l);

struct stack_options {
	const char *name;		/* NAME */
	bool read_only;
	bool allow_discards;
	uint64_t max_targets;
	const char *slow_dev;		/* the slow-path device, or NULL */
	const char *id;			/* the image identifier, NULL: the image's (a
					 * snapshot keeps the top device's) */
};

/* The stack of the chain img (layers tl with hosts filled, chain runs)
 * into *out, its image identifier into id (o->id, else dm_image_id: the
 * top's LUKS UUID, else a hash of the file's real path). 0, -EINVAL (NAME too long
 * or invalid), -errno. */
int stack_build(const struct image *img, const struct stack_layer *tl, unsigned int n, const struct run_list *runs,
		const struct stack_options *o, char *id, size_t idsize, struct dm_stack **out);

/* Count of compressed clusters in runs (mapping them needs the daemon). */
size_t stack_count_compressed(const struct run_list *runs);

#endif
