/* qcowsetup table IMAGE NAME: the device-mapper tables `open` would load,
 * without a passphrase and without touching the kernel. Host devices show
 * as placeholders ({loop:/abs/path} for files, {dev:/dev/...} for block
 * devices), internal devices as /dev/mapper/NAME_..., keys as keyring
 * references. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "log.h"
#include "qcowsetup.h"
#include "stack.h"

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

int cmd_table(int argc, char **argv)
{
	struct stack_layer *tl = NULL;
	struct dm_stack *stack = NULL;
	struct run_list runs;
	struct image *img = NULL;
	unsigned int n = 0;
	char id[DM_IMAGE_ID_MAX];
	int r;

	(void)argc;	/* IMAGE NAME, checked by the command table */
	run_list_init(&runs);
	if (!dm_mapping_name_valid(argv[1])) {
		log_err("Invalid device name \"%s\": use letters, digits and - _ . + (at most %d).", argv[1],
			DM_MAPPING_NAME_MAX);
		return -EINVAL;
	}
	r = tools_open_image(argv[0], 0, &img);
	if (r < 0)
		return r;
	tl = calloc(IMG_MAX_CHAIN_DEPTH, sizeof(*tl));
	if (!tl) {
		r = -ENOMEM;
		goto out;
	}
	r = stack_layers_read(img, tl, &n);
	for (unsigned int i = 0; !r && i < n; i++)
		r = host_placeholder(stack_layer_data_path(tl[i].img), tl[i].host, sizeof(tl[i].host));
	if (!r)
		r = image_map_chain(img, &runs);
	if (!r)
		r = stack_build(img, tl, n, &runs, &(struct stack_options){ .name = argv[1], .read_only = true,
			.allow_discards = opt.allow_discards, .max_targets = opt.max_targets }, id, sizeof(id), &stack);
	if (!r) {
		r = dm_stack_format(stack, stdout);
		if (r)
			log_err("Cannot write the tables: %s.", strerror(-r));
	}
out:
	dm_stack_free(stack);
	run_list_free(&runs);
	free(tl);
	tools_close_image(img);
	return r;
}
