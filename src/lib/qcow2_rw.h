/* Read-write access to the top layer of a qcow2 image: guest reads and
 * writes with cluster allocation, copy-on-write, refcount updates and the
 * growth of L2 tables, refcount blocks and the refcount table, in QEMU's
 * safe order. Pure: everything goes through callbacks (the daemon wraps
 * files and devices, the tests wrap memory).
 *
 * What a crash can leave behind (the order of the writes guarantees it,
 * tests/unit/test-alloc.c checks it by cutting the unflushed writes at
 * random): leaked clusters at worst, never a corruption; and every guest
 * write that was followed by a completed qcow2_rw_flush() reads back.
 * The rules:
 *   - a refcount increment is durable before any L2 or L1 entry, refcount
 *     table entry or header field refers to the cluster;
 *   - the data of a newly allocated (sub)cluster, copy-on-write included,
 *     is durable before the L2 entry that maps it;
 *   - a new L2 table is durable before the L1 entry that points to it, a
 *     new refcount block before the refcount table entry, a new refcount
 *     table before the header that names it;
 *   - a refcount decrement (the old cluster of a copy-on-write, the old
 *     copy of a shared L2 table, compressed clusters that are rewritten) is
 *     written only once the entries that stopped referring to the cluster
 *     are durable.
 * Metadata is cached (L2 tables and refcount blocks, write-back): writes
 * update the cache and qcow2_rw_writeback() (called by flush, when the
 * cache is full, and in write-through mode after every write) writes it in
 * the order above with the flushes in between.
 *
 * Clusters owned by the layer with refcount 1 (OFLAG_COPIED) are written in
 * place. Everything else is allocated: unallocated and zero clusters,
 * clusters shared with a snapshot, compressed clusters, and (extended L2)
 * unallocated or zero subclusters of an allocated cluster (those take no
 * new cluster, only their bitmap bits). Copy-on-write reads the current
 * guest content of the cluster: the old cluster, the backing chain
 * (backing_pread), zeros, or the decompressed cluster; a write that covers
 * whole clusters reads nothing, and a partial write into a new cluster over
 * zeros writes its sectors only, after data_zero (when there is one). With extended L2
 * entries only the touched subclusters (and, for a shared cluster, its
 * allocated ones) are written, as QEMU does.
 *
 * External data files: data clusters live at their guest offset (as QEMU
 * allocates them) and have no refcounts.
 *
 * Not thread-safe: one caller at a time (the daemon holds a mutex; its
 * threads move data outside it through qcow2_rw_extent and ops, below). No
 * memory is allocated on the I/O path after qcow2_rw_open(), except when
 * the refcount table grows.
 *
 * Read-write open duties (unless opts.read_only): an image marked corrupt is
 * refused (-EUCLEAN), a dirty one too (-EUCLEAN: repair it with `qemu-img
 * check -r all`); so is one whose references the refcounts do not cover
 * (validate_writable in qcow2.h: an OFLAG_COPIED entry naming a cluster of
 * refcount other than 1 or used elsewhere too, a compressed cluster sharing
 * a host cluster with data or metadata, a cluster referenced more often
 * than its refcount says), before anything is written. Then the writer
 * writes in place only clusters of refcount 1 (checked again on each such
 * write), takes only clusters of refcount 0, and drops a refcount only for
 * the reference it removed; autoclear bits other than "raw external data" are cleared
 * (persistent bitmaps become stale, as the specification intends for a
 * writer that does not update them); with lazy refcounts the dirty bit is
 * set until qcow2_rw_close() (refcounts are nevertheless written in the
 * safe order: the bit only tells QEMU the session is open). */
#ifndef QS_QCOW2_RW_H
#define QS_QCOW2_RW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image.h"
#include "runs.h"

struct qcow2_rw_ops {
	/* The image file (metadata, compressed clusters; data clusters too
	 * unless external). Reads go through img->io; writes may extend the
	 * file. */
	int (*meta_pwrite)(void *opaque, const void *buf, size_t len, uint64_t off);
	int (*meta_flush)(void *opaque);
	/* Data clusters as plaintext: the image file, the external data file,
	 * or (LUKS) the crypt device over the image file. Buffers and offsets
	 * are multiples of 512 bytes; buffers are aligned to 4096. Reads past
	 * the end of the file must return zeros. */
	int (*data_pread)(void *opaque, void *buf, size_t len, uint64_t host);
	int (*data_pwrite)(void *opaque, const void *buf, size_t len, uint64_t host);
	/* Flush of the data; NULL when meta_flush makes the data durable too
	 * (same file underneath). */
	int (*data_flush)(void *opaque);
	/* Guest content of the backing chain, only called inside the layer's
	 * guest size; NULL: no backing file (zeros). */
	int (*backing_pread)(void *opaque, void *buf, size_t len, uint64_t guest);
	/* The same, called outside the caller's lock (an op's data, below),
	 * concurrently with anything: -EAGAIN where the chain needs the lock
	 * (compressed clusters). May be NULL (always the lock). */
	int (*backing_pread_direct)(void *opaque, void *buf, size_t len, uint64_t guest);
	/* Whether [guest, guest + len) of the backing chain is known to read
	 * zeros, cheaply (chain_is_zero): a copy-on-write there needs no copy.
	 * May be NULL (never known). */
	bool (*backing_zero)(void *opaque, uint64_t guest, uint64_t len);
	/* [guest, guest + len) now maps to host in a cluster with refcount 1
	 * whose metadata is durable: writes may go there directly from now on.
	 * Called from qcow2_rw_writeback() (and so flush). May be NULL. */
	void (*mapped)(void *opaque, uint64_t guest, uint64_t len, uint64_t host);
	/* Make [host, host + len) of the data read zeros without writing them
	 * and without freeing space a later write would need (unwritten
	 * extents in a plain image file, never a punched hole). NULL, or
	 * -EOPNOTSUPP: the zeros are written with data_pwrite (through the
	 * cipher for LUKS) where that is worth it. Another error (-ENOSPC,
	 * -EIO...): the optimisation that asked is dropped, the write is
	 * served without it. Made durable by data_flush (meta_flush when
	 * NULL). */
	int (*data_zero)(void *opaque, uint64_t len, uint64_t host);
	/* Where the data at host is (as img_io's extent: *len bytes of data or
	 * of a hole from host; -ENXIO: holes to the end of the file), for data
	 * kept in the image file itself. May be NULL: the writer then never
	 * counts on holes (allocation ahead of random writers stays off, every
	 * new cluster is zeroed). */
	int (*data_extent)(void *opaque, uint64_t host, uint64_t *len, bool *is_data);
	/* Clusters were mapped ahead of a sequential writer: a writeback soon
	 * moves them to the fast path before the writer gets there. Called
	 * from qcow2_rw_write(). May be NULL. */
	void (*kick)(void *opaque);
	void *opaque;
};

struct qcow2_rw_opts {
	/* New clusters stay below these sizes (bytes) of the image file and of
	 * the external data file; 0: no limit. Beyond: -ENOSPC. */
	uint64_t file_limit;
	uint64_t data_file_limit;
	/* Bytes of L2 tables and refcount blocks cached (each at least 4
	 * clusters); 0: 8 MiB. */
	size_t cache_bytes;
	/* Write back the metadata after every write (tests; the daemon
	 * writes back on flush, FUA and a timer). */
	bool write_through;
	/* Reads only: no header changes, writes fail with -EROFS. */
	bool read_only;
	/* Take over from a writer of the same mapping that died (the image
	 * stayed locked meanwhile): its dirty bit is accepted, since this
	 * writer never defers refcount updates (only leaks can be left). */
	bool resume;
	/* Guest size of the backing chain when img->backing is not set but
	 * backing_pread is (tests); 0: as large as any (resize). */
	uint64_t backing_size;
	/* Allocation ahead of a sequential writer: when writes allocate
	 * clusters in guest order, the clusters after them (unallocated, with
	 * no backing file) are allocated, zeroed (data_zero, or zeros written)
	 * and mapped before they are written, in a window that starts at 1 MiB
	 * and doubles each time the writer reaches its end, up to ahead_max
	 * bytes; a writer that jumps around gets nothing ahead. Each window is
	 * an ordinary allocation (zeros durable before the L2 entries), so a
	 * crash leaves mapped clusters that read zeros, or leaks.
	 * qcow2_rw_release_ahead() frees what was never written. It never
	 * costs a write: only clusters whose L2 table and refcount blocks
	 * exist (nothing of it can break the writer), a failed zeroing gives
	 * them back unreferenced, and with a file_limit short of every guest
	 * cluster (qcow2_file_reserve) it stays off. 0: off. */
	uint64_t ahead_max;
	/* The same where the new clusters come from holes of the file (no
	 * zeroing, no room taken until written): the first window is 64 MiB and
	 * they grow up to ahead_fresh_max (when larger than ahead_max), and the
	 * writer's first write into the last window, seen by
	 * qcow2_rw_ahead_poll() while it goes to the fast path, maps the next
	 * one before the writer gets there. */
	uint64_t ahead_fresh_max;
	/* Allocation ahead of random writers too, where it costs nothing but
	 * metadata: a write into unallocated clusters (with no backing file,
	 * or where the backing chain is known to read zeros) while
	 * every new cluster comes from where the file was never written (holes:
	 * no zeroing at all, data_extent tells at open) gets the aligned
	 * window of AHEAD_SPARSE bytes around it (at most ahead_max) mapped,
	 * so that its neighbours' first writes take the fast path. Released
	 * like the sequential windows (every one of them is remembered, up to
	 * a bound beyond which it stops). Needs ahead_max and data_extent. */
	bool ahead_sparse;
	/* qcow2_used_end() of the image when the caller has it (open computed
	 * it to extend the file): the check above then reads no refcount
	 * block. 0: computed when needed. */
	uint64_t used_end;
};

struct qcow2_rw;

/* Take over the qcow2 image img (its active layer: no snapshot selected)
 * for reading and writing; img stays owned by the caller and must outlive
 * the writer (its L1 table, refcount table fields and io.size follow the
 * changes). Returns 0, or with a message:
 *   -ENOTSUP  not qcow2, a snapshot selected, legacy encryption (writes),
 *   -EUCLEAN  corrupt or dirty image (writes), references the refcounts
 *             do not cover (writes), inconsistent refcount table,
 *   -ENOMEM, -errno of a header write. */
int qcow2_rw_open(struct image *img, const struct qcow2_rw_ops *ops,
		      const struct qcow2_rw_opts *opts, struct qcow2_rw **out);

/* Guest reads and writes inside the virtual size; any alignment. 0 or
 * -errno (-ENOSPC: no room for a new cluster; the write did not happen and
 * the image is unchanged but for leaks). After a failed metadata write the
 * writer refuses further writes (-EIO) but still reads. */
int qcow2_rw_read(struct qcow2_rw *w, void *buf, size_t len, uint64_t guest);
int qcow2_rw_write(struct qcow2_rw *w, const void *buf, size_t len, uint64_t guest);

/* A write whose data moves outside the caller's lock, as QEMU overlaps
 * allocating writes: qcow2_rw_write_begin() plans it under the lock (the
 * L2 entries, the new clusters allocated: step 2 above) and holds its
 * guest clusters; qcow2_rw_op_io() then reads what it copies (the backing
 * chain through backing_pread_direct, the old cluster) and writes the data
 * without the lock, while other requests run; qcow2_rw_op_end() under the
 * lock again links the new clusters (or gives them back after a failure).
 * The write order above holds: the entries change only after the data
 * was written, in the cache, and writeback flushes the data first. While
 * held, the clusters are planned by no other write (-EBUSY, below) nor
 * mapped ahead; reads of them return the old content until the end, as
 * for any request in flight together with a write. Resize and
 * release_ahead refuse (-EBUSY) while ops are in flight.
 *
 * An op is one write at a time, made with qcow2_rw_op_new() (NULL past
 * 256 KiB clusters or out of memory: qcow2_rw_write_begin() then writes
 * whole), so nothing is allocated on the I/O path. */
struct qcow2_rw_op;
struct qcow2_rw_op *qcow2_rw_op_new(struct qcow2_rw *w);
void qcow2_rw_op_free(struct qcow2_rw_op *op);
/* Under the lock. 1: planned, go on with qcow2_rw_op_io; 0: written whole
 * under the lock (more than 32 clusters, a compressed cluster to
 * copy, two partial clusters, no op), as qcow2_rw_write; -EBUSY: a write
 * in flight holds one of its clusters (also from qcow2_rw_write): wait
 * for a qcow2_rw_op_end and look again (qcow2_rw_extent too); else
 * -errno as qcow2_rw_write. */
int qcow2_rw_write_begin(struct qcow2_rw *w, struct qcow2_rw_op *op, const void *buf, size_t len, uint64_t guest);
/* Without the lock (locked: with it, after -EAGAIN: a read needed it). */
int qcow2_rw_op_io(struct qcow2_rw_op *op, bool locked);
/* Under the lock, with what qcow2_rw_op_io returned: 0 or -errno as
 * qcow2_rw_write. The op is free for the next write. */
int qcow2_rw_op_end(struct qcow2_rw_op *op, int r);
/* Ops between begin and end. */
unsigned int qcow2_rw_in_flight(const struct qcow2_rw *w);

/* What the guest range [guest, guest + len) is from its start, so that a
 * caller may move the data itself, outside the lock it holds around the
 * writer (several threads serving requests): x->len bytes (whole clusters
 * but for the ends) of one kind:
 *   DATA     a cluster of the layer with refcount 1 (OFLAG_COPIED), every
 *            subcluster allocated, at host x->host onwards (data_pread /
 *            data_pwrite): written in place, and never freed or reused
 *            while the writer is open, so the I/O needs no lock;
 *   BACKING  (reads) nothing in the layer: the guest reads the backing
 *            chain (backing_pread; a backing file never changes);
 *   ZERO     (reads) zero clusters, or no backing file;
 *   ENGINE   anything else (compressed, a mix of subclusters, clusters to
 *            allocate or copy, a broken writer): qcow2_rw_read/write.
 * A write that allocates, or copies, is planned under the caller's lock and
 * holds its clusters until its end (ops above), so two writes never
 * allocate the same cluster; a read that looked up BACKING
 * and races a write of the same cluster returns the old or the new data, as
 * the block layer allows for requests in flight together. After data_pwrite
 * of a DATA extent completed (not before: a flush in between would miss
 * it), qcow2_rw_data_written() under the lock: the next flush then flushes
 * the data. 0 or -errno (-EINVAL outside the size, a metadata read's). */
enum qcow2_rw_extent_kind {
	QCOW2_EXTENT_ENGINE,
	QCOW2_EXTENT_DATA,
	QCOW2_EXTENT_BACKING,
	QCOW2_EXTENT_ZERO,
};
struct qcow2_rw_extent {
	enum qcow2_rw_extent_kind kind;
	uint64_t len;
	uint64_t host;		/* DATA: where the range starts */
};
int qcow2_rw_extent(struct qcow2_rw *w, uint64_t guest, uint64_t len, bool write, struct qcow2_rw_extent *x);
void qcow2_rw_data_written(struct qcow2_rw *w);

/* Write the cached metadata in the safe order; what it maps becomes
 * durable and is announced through ops->mapped. */
int qcow2_rw_writeback(struct qcow2_rw *w);
/* writeback, then make every completed write durable. */
int qcow2_rw_flush(struct qcow2_rw *w);
/* Whether writeback has something to do (metadata or mappings pending). */
bool qcow2_rw_has_pending(const struct qcow2_rw *w);
/* Whether a metadata write or a flush failed (an I/O error, no room): the
 * writer then refuses writes and flushes (-EIO) for good, since what it
 * wrote since the last completed flush may not have reached the disk;
 * reads go on. */
bool qcow2_rw_is_broken(const struct qcow2_rw *w);

/* Unmap and free the clusters mapped ahead of a writer (the last windows of
 * a sequential one, every window of random ones) that still read zeros: the guest reads zeros there either way,
 * and the image does not keep clusters nobody wrote. Only once nothing
 * else writes to them (the fast path is gone: before the close). The L2
 * entries are written back before the refcounts drop (a crash in between
 * leaks them). 0 or -errno (-EIO: a broken writer). */
int qcow2_rw_release_ahead(struct qcow2_rw *w);

/* The guest offset of the window mapped ahead from holes that waits for
 * its first write (ahead_fresh_max), 0: none: the caller polls
 * qcow2_rw_ahead_poll() while the writer may be writing it on the fast
 * path. */
uint64_t qcow2_rw_ahead_probe(const struct qcow2_rw *w);
/* When the first cluster of the last window mapped ahead reads as data
 * (the writer got there), map the next window, twice as large: 1 when
 * it mapped clusters (announced through ops->kick), 0 when not. */
int qcow2_rw_ahead_poll(struct qcow2_rw *w);

/* Flush and end the read-write session: the dirty bit set for lazy
 * refcounts is cleared. *used_end (may be NULL): end of the last cluster
 * in use (for truncating the file). The writer is freed in any case. */
int qcow2_rw_close(struct qcow2_rw *w, uint64_t *used_end);
/* Free without touching the image (after a failure, or a crash test). */
void qcow2_rw_free(struct qcow2_rw *w);

/* Change the guest size to new_size (a multiple of 512), as `qemu-img
 * resize` does; the image is consistent after every write (a crash leaves
 * the old or the new size, and leaks at worst). Growing: a larger L1 table
 * when needed (written and flushed, its refcounts durable first, then the
 * header switched to it, then the old one freed); over a backing file that
 * reaches past the old size, the new area is made to read zeros (zero
 * clusters, zeros written over the rest of the last subcluster) before the
 * header's size changes. Shrinking (allow_shrink): only when no cluster
 * (extended L2: subcluster) past the new size is allocated; the header's
 * size first, then the L2 tables past it unlinked and freed. img->size and
 * map_size follow. 0 or, with a message:
 *   -EINVAL     new_size not a positive multiple of 512, or smaller
 *               without allow_shrink,
 *   -ENOTEMPTY  shrinking past allocated clusters (nothing changed),
 *   -ENOTSUP    external data file; version 2 with snapshots, or grown
 *               over a backing file (zero clusters need version 3),
 *   -EFBIG      the L1 table would exceed QCOW2_MAX_L1_BYTES,
 *   -EROFS, -EIO (a broken writer), -ENOSPC, -ENOMEM, -errno of a write. */
int qcow2_rw_resize(struct qcow2_rw *w, uint64_t new_size, bool allow_shrink);

/* The image file grew to size bytes under a live writer (resize): its
 * size as the image knows it (img->io.size, and data_io.size when the data
 * is in the file) and the limit of new clusters (opts.file_limit) become
 * size. */
void qcow2_rw_file_grown(struct qcow2_rw *w, uint64_t size);

/* Split the DATA runs of layer 0 in runs (image_map_chain) by whether their
 * clusters may be written in place (OFLAG_COPIED, not compressed): those get
 * RUN_F_WRITABLE. 0 or -errno. */
int qcow2_rw_mark_writable(struct qcow2_rw *w, const struct run_list *in, struct run_list *out);

/* End (bytes, a multiple of the cluster size) of the last cluster with a
 * non-zero refcount, from the refcount blocks on disk. */
int qcow2_used_end(const struct image *img, uint64_t *end);

/* An upper bound of the size of the image file once every guest cluster is
 * allocated (data, L2 tables, refcount blocks and tables, their copies),
 * starting from used_end; for an external data file the guest size rounded
 * up to clusters. -EFBIG when it overflows. */
int qcow2_file_reserve(const struct image *img, uint64_t used_end, uint64_t *size);

/* Counters since open (tests, status). */
struct qcow2_rw_stats {
	uint64_t clusters_allocated;
	uint64_t l2_tables_allocated;
	uint64_t refblocks_allocated;
	uint64_t reftable_growths;
	uint64_t cow_clusters;		/* copied from a shared, compressed or backing cluster */
	uint64_t ahead_clusters;	/* allocated ahead of a writer */
	uint64_t ahead_sparse_windows;	/* of those, windows around random writes */
	uint64_t ahead_polled;		/* windows mapped on a writer seen by qcow2_rw_ahead_poll */
	uint64_t zero_skipped;		/* new clusters not zeroed: holes never written */
	uint64_t ahead_released;	/* of those, freed unwritten (release_ahead) */
	uint64_t writebacks;
	uint64_t flushes;
};
void qcow2_rw_get_stats(const struct qcow2_rw *w, struct qcow2_rw_stats *st);

#endif
