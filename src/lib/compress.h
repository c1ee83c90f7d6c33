/* Compressed clusters: qcow2 (compression_type 0 zlib, 1 zstd) and qcow v1
 * (always zlib). One cluster in, one cluster out; buffers only, no I/O.
 *
 * Formats (QEMU docs/interop/qcow2.rst, block/qcow2-threads.c, block/qcow.c):
 *   zlib: RAW deflate (windowBits -12, no zlib header, no checksum).
 *   zstd: one or more zstd frames, decoded as a stream.
 * The L2 descriptor of a compressed cluster only counts 512-byte sectors, so
 * src_len is an UPPER BOUND: the stream may be followed by padding or by the
 * start of the next compressed cluster, which is never read. A compressed run
 * that reaches past the end of the image file must be zero-filled by the
 * caller up to src_len, as QEMU's file layer does.
 *
 * What is accepted (decompress), checked against QEMU 5.1+:
 *   - the stream must produce EXACTLY dst_len bytes. Shorter output is an
 *     error (QEMU: qcow2_zlib_decompress requires avail_out == 0, qcow.c
 *     decompress_buffer requires out_len == out_buf_size, and
 *     qcow2_zstd_decompress fails when no further progress is possible);
 *   - output that would exceed dst_len is an error. QEMU agrees for zstd
 *     (frame not finished once the cluster is full); for zlib QEMU silently
 *     truncates such a stream, we refuse it as corrupt (no QEMU writer makes
 *     one: it always deflates exactly one cluster with Z_FINISH);
 *   - zlib only: a stream whose input ends exactly when the cluster is full,
 *     before its end-of-block code, is accepted, as QEMU accepts it (the data
 *     is complete; only the terminator is missing).
 *   - zstd: several concatenated frames are accepted (QEMU loops over them),
 *     skippable frames too; zlib: one deflate stream only.
 * Deflate carries no checksum, and QEMU's zstd frames none either: damage to
 * literal data can decode "successfully" into wrong bytes. What is
 * guaranteed is that nothing is written past dst[dst_len - 1] and that
 * success always means dst is entirely filled.
 *
 * Threads: every call uses its own library context (z_stream on the stack,
 * ZSTD_DCtx / ZSTD_CCtx created and freed inside the call, as QEMU does);
 * there is no shared state, all functions may run concurrently. Cost: one
 * inflate state (~7 KiB) or one ZSTD_DCtx (~94 KiB) per call; for zstd that
 * is ~8 us on top of ~50 us to decode a 64 KiB cluster. If that ever
 * matters, add a context object owned by each worker thread; do not add a
 * hidden static one.
 *
 * dst and src must not overlap.
 */
#ifndef QS_COMPRESS_H
#define QS_COMPRESS_H

#include <errno.h>
#include <stddef.h>
#include <sys/types.h>

/* qcow2 header field compression_type (identical to image.h; an identical
 * macro redefinition is valid C, so both headers may be included). */
#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* Decompress one cluster.
 *   dst_len: the cluster size (> 0, at most UINT_MAX); exactly this many
 *            bytes must come out of src.
 *   src_len: an upper bound on the compressed bytes (see above).
 * Returns 0, or:
 *   -ENOTSUP  unknown compression_type
 *   -EINVAL   dst_len 0 or too large for the library
 *   -EBADMSG  corrupt stream, output shorter or longer than dst_len,
 *             truncated input
 *   -ENOMEM   the library could not allocate its context
 *   -EIO      any other library failure (e.g. zlib version mismatch)
 * dst contents are unspecified after an error. */
int zlib_decompress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len);
int zstd_decompress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len);

/* Compress one cluster in QEMU's format (zlib: level Z_DEFAULT_COMPRESSION,
 * windowBits -12, memLevel 9; zstd: ZSTD_CLEVEL_DEFAULT, one frame with its
 * content size, no checksum).
 * Returns the compressed length (> 0), or:
 *   -ENOSPC   the result does not fit in dst_len. Callers pass
 *             dst_len = cluster_size - 1 as QEMU does and, on -ENOSPC,
 *             write the cluster uncompressed (incompressible data).
 *   -ENOTSUP  unknown compression_type
 *   -EINVAL   src_len 0 or too large for the library
 *   -ENOMEM / -EIO as above. */
ssize_t zlib_compress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len);
ssize_t zstd_compress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len);

static inline int qcow_decompress(int compression_type, void *dst, size_t dst_len,
				  const void *src, size_t src_len)
{
	switch (compression_type) {
	case QCOW2_COMPRESSION_ZLIB:
		return zlib_decompress_cluster(dst, dst_len, src, src_len);
	case QCOW2_COMPRESSION_ZSTD:
		return zstd_decompress_cluster(dst, dst_len, src, src_len);
	default:
		return -ENOTSUP;
	}
}

static inline ssize_t qcow_compress(int compression_type, void *dst, size_t dst_len,
				    const void *src, size_t src_len)
{
	switch (compression_type) {
	case QCOW2_COMPRESSION_ZLIB:
		return zlib_compress_cluster(dst, dst_len, src, src_len);
	case QCOW2_COMPRESSION_ZSTD:
		return zstd_compress_cluster(dst, dst_len, src, src_len);
	default:
		return -ENOTSUP;
	}
}

#endif
