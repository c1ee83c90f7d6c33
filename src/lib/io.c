#include <errno.h>
#include <string.h>

#include "io.h"

static int mem_pread(void *opaque, void *buf, size_t len, uint64_t off)
{
	const struct mem_io *m = opaque;

	if (off > m->size || len > m->size - off)
		return -EIO;
	memcpy(buf, m->data + off, len);
	return 0;
}

void mem_io_init(struct img_io *io, struct mem_io *mem, const void *data, size_t size, const char *name)
{
	mem->data = data;
	mem->size = size;
	memset(io, 0, sizeof(*io));
	io->pread = mem_pread;
	io->opaque = mem;
	io->size = size;
	io->name = name;
}
