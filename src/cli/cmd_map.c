/* qcowsetup map: how guest space maps onto the files, as qemu-img map. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>

#include "log.h"
#include "qcowsetup.h"
#include "qemu_map.h"

struct map_out {
	unsigned long n;
	int bad_human;
};

static int print_json(const struct qmap_entry *e, void *opaque)
{
	struct map_out *o = opaque;

	if (o->n++)
		puts(",");
	printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, \"present\": %s, \"zero\": %s, \"data\": %s",
	       e->start, e->length, e->depth, e->present ? "true" : "false", e->zero ? "true" : "false",
	       e->data ? "true" : "false");
	if (e->compressed)
		printf(", \"compressed\": true");
	if (e->has_offset)
		printf(", \"offset\": %" PRIu64, e->offset);
	else if (e->has_host)
		printf(", \"offset\": %" PRIu64, e->host);
	putchar('}');
	return 0;
}

static int print_human(const struct qmap_entry *e, void *opaque)
{
	struct map_out *o = opaque;

	if (e->data && !e->has_offset) {
		log_err("File contains external, encrypted or compressed clusters (use --json).");
		o->bad_human = 1;
		return -ENOTSUP;
	}
	if (e->data && !e->zero)
		printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length, e->offset,
		       e->filename ? e->filename : "");
	return 0;
}

int cmd_map(int argc, char **argv)
{
	struct map_out o = { 0 };
	struct image *img = NULL;
	int r;

	r = tools_open_image(argv[0], 0, &img);
	if (r < 0)
		return r;
	if (opt.json) {
		printf("[");
		r = qemu_map(img, print_json, &o);
		printf("]\n");
	} else {
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
		r = qemu_map(img, print_human, &o);
	}
	tools_close_image(img);
	return r;
}
