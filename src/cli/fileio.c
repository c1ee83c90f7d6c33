/* Opening the images named on the command line (lib/fileio.c does the reads). */
#include "fileio.h"
#include "qcowsetup.h"

int tools_open_image(const char *path, bool no_backing, struct image **img)
{
	struct image_open_opts o = {
		.format = opt.format,
		.no_backing = no_backing,
		.snapshot = opt.snapshot,
	};

	return image_open(&file_io_opener, path, &o, img);
}

void tools_close_image(struct image *img)
{
	image_free(img, &file_io_opener);
}
