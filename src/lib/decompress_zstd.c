/* zstd wrapper: qcow2 compression_type 1. The only file of the engine that
 * includes zstd.h. Semantics are documented in compress.h; the decoding loop
 * follows QEMU's qcow2_zstd_decompress (block/qcow2-threads.c): stream the
 * input, since its exact length is unknown, until the cluster is full. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>

#include <zstd.h>
#include <zstd_errors.h>

#include "compress.h"
#include "log.h"
#include "util.h"

/* fallback: what any error other than running out of memory means here */
static int zstd_error_to_errno(size_t zret, int fallback)
{
	if (ZSTD_getErrorCode(zret) == ZSTD_error_memory_allocation)
		return -ENOMEM;
	return fallback;
}

int zstd_decompress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len)
{
	ZSTD_DCtx *dctx;
	ZSTD_inBuffer in = { .src = src, .size = src_len, .pos = 0 };
	ZSTD_outBuffer out = { .dst = dst, .size = dst_len, .pos = 0 };
	size_t zret = 0;
	int r = 0;

	if (!dst_len || dst_len > UINT_MAX)
		return -EINVAL;

	/* One context per call: no shared state between threads (compress.h). */
	dctx = ZSTD_createDCtx();
	if (!dctx)
		return -ENOMEM;

	/* Several frames may follow each other: ZSTD_decompressStream returns 0
	 * at the end of each and starts the next on the following call. Bytes
	 * after the frame that fills the cluster are never looked at. */
	while (out.pos < out.size) {
		size_t in_pos = in.pos, out_pos = out.pos;

		zret = ZSTD_decompressStream(dctx, &out, &in);
		if (ZSTD_isError(zret)) {
			log_dbg("zstd: corrupt stream after %zu of %zu bytes: %s",
				out.pos, dst_len, ZSTD_getErrorName(zret));
			r = zstd_error_to_errno(zret, -EBADMSG);
			goto out;
		}
		if (in.pos == in_pos && out.pos == out_pos) {
			/* input exhausted: truncated, or the frames end early */
			log_dbg("zstd: stream %s after %zu of %zu bytes",
				zret ? "truncated" : "ended", out.pos, dst_len);
			r = -EBADMSG;
			goto out;
		}
	}
	if (zret) {
		/* the cluster is full but the frame goes on: longer than a
		 * cluster, or its last block or epilogue is missing */
		log_dbg("zstd: frame not finished at the end of the %zu-byte cluster",
			dst_len);
		r = -EBADMSG;
	}
out:
	ZSTD_freeDCtx(dctx);
	return r;
}

ssize_t zstd_compress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len)
{
	size_t zret;

	if (!src_len || src_len > UINT_MAX)
		return -EINVAL;
	if (!dst_len)
		return -ENOSPC;

	/* Same frame as QEMU's ZSTD_compressStream2(ZSTD_e_end) with a default
	 * context: level 3, content size in the header, no checksum. */
	/* SIZE_MAX / 2: the length must fit the ssize_t result */
	zret = ZSTD_compress(dst, MIN(dst_len, SIZE_MAX / 2), src, src_len,
			     ZSTD_CLEVEL_DEFAULT);
	if (ZSTD_isError(zret)) {
		if (ZSTD_getErrorCode(zret) == ZSTD_error_dstSize_tooSmall)
			return -ENOSPC;
		log_dbg("zstd: compression failed: %s", ZSTD_getErrorName(zret));
		return zstd_error_to_errno(zret, -EIO);
	}
	return (ssize_t)zret;
}
