/* What `table` and `open` share: the per-layer parameters of the dm stack
 * (host device, cipher) and the stable image identifier of the UUIDs. */
#ifndef QS_CLI_STACK_H
#define QS_CLI_STACK_H

#include <limits.h>

#include "dmtable.h"
#include "keys.h"
#include "runs.h"

struct tools_layer {
	const struct image *img;
	char host[PATH_MAX + 16];	/* how tables refer to the layer's data device */
	char cipher[DM_CIPHER_MAX + 1];
	struct luks_info luks;		/* LUKS layers */
};

/* The file that holds a layer's data (its external data file, or itself). */
const char *tools_layer_data_path(const struct image *img);

/* Fill tl[0..*n) for the chain of img: cipher and key size of encrypted
 * layers (host left empty for the caller). */
int tools_stack_layers(const struct image *img, struct tools_layer *tl, unsigned int *n);

/* Build the stack of NAME from the layers (hosts filled) and the chain runs. */
int tools_stack_build(const struct image *img, const char *image_path, const char *name,
		      const struct tools_layer *tl, unsigned int n, const struct run_list *runs,
		      bool read_only, struct dm_stack **out);

/* Count of compressed clusters in runs (mapping them needs the daemon). */
size_t tools_count_compressed(const struct run_list *runs);

#endif
