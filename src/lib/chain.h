/* Reading the guest content of a backing chain (every layer below the one
 * being written): the merged runs of image_map_chain(), each read from where
 * its layer keeps it. Pure: each layer's data comes through a callback (the
 * file, or the crypt device in front of it); compressed clusters are read
 * raw from the layer's image file (img->io) and decompressed here.
 *
 * Used by the read-write path for copy-on-write and for reads of clusters
 * the top layer does not have, and by the slow path to serve compressed
 * clusters. No memory is allocated by chain_read(). Not thread-safe, but
 * for chain_read_direct(). */
#ifndef QS_CHAIN_H
#define QS_CHAIN_H

#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "runs.h"

/* How to read the plaintext data of one layer. */
struct chain_layer_io {
	/* Read len bytes at off: the host offset in the layer's data file,
	 * or (by_guest) the guest offset in the layer (legacy AES: its crypt
	 * device maps the layer's guest space). Offsets and lengths are
	 * multiples of 512; reads past the end of the file return zeros.
	 * NULL for a layer that provides no data clusters. */
	int (*data_pread)(void *opaque, void *buf, size_t len, uint64_t off);
	void *opaque;
	bool by_guest;
};

struct chain_reader;

/* A reader of the chain starting at img (a backing image: depth >= 1 for
 * the read-write path, or the top itself for the slow path of compressed
 * clusters), with io[d] for the layer at depth d (indexed like
 * image->depth; entries below img->depth are unused). 0, -ENOMEM, or the
 * errors of image_map_chain(). */
int chain_reader_open(struct image *img, const struct chain_layer_io *io, unsigned int nio,
		      struct chain_reader **out);
void chain_reader_free(struct chain_reader *cr);

/* Guest size of the chain (img->size). */
uint64_t chain_reader_size(const struct chain_reader *cr);

/* Read [guest, guest + len) of the chain; past its size: zeros. 0 or
 * -errno (-EIO for a corrupt compressed cluster). */
int chain_read(struct chain_reader *cr, void *buf, size_t len, uint64_t guest);

/* The same where no compressed cluster is in the way (those share the
 * reader's buffers), from any number of threads at once, also while
 * another runs chain_read(): -EAGAIN (nothing read) when a compressed
 * cluster is in the range. */
int chain_read_direct(struct chain_reader *cr, void *buf, size_t len, uint64_t guest);

/* Whether [guest, guest + len) of the chain is known to read zeros without
 * reading it: zero or unallocated clusters, past the chain's size, or data
 * of an unencrypted layer whose file has a hole there (img_io's extent). A
 * cheap answer, never a read: false also when it cannot tell. */
bool chain_is_zero(const struct chain_reader *cr, uint64_t guest, uint64_t len);

/* The runs it reads (the writer fuzzer compares guest views with them). */
const struct run_list *chain_reader_runs(const struct chain_reader *cr);

#endif
