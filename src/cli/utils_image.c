/* Opening the images named on the command line for info, map, table,
 * check and format (lib/fileio.c does the reads, lib/trust.c decides what
 * the names inside them may lead to; open goes through lib/mapping.c). */
#include "fileio.h"
#include "qcowsetup.h"

int tools_open_image(const char *path, unsigned int flags, struct image **img)
{
	struct trust_rules rules = { .trust_names = opt.trust_names };
	struct image_open_opts o = {
		.format = opt.format,
		.no_backing = flags & TOOLS_OPEN_NO_BACKING,
		.snapshot = opt.snapshot,
		/* the top's backing file: not when the chain is not opened */
		.backing_file = flags & TOOLS_OPEN_NO_BACKING ? NULL : opt.backing_file,
		.data_file = opt.data_file,
	};
	struct file_opener fo;

	/* the opener's settings are copied into each file as it is opened */
	file_opener_init(&fo, flags & TOOLS_OPEN_WRITE, &rules);
	return image_open(&fo.ops, path, &o, img);
}

void tools_close_image(struct image *img)
{
	image_free(img, &file_io_opener);
}
