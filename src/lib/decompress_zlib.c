/* zlib wrapper: qcow2 compression_type 0 and qcow v1 compressed clusters,
 * raw deflate with a 4 KiB window (windowBits -12). The only file of the
 * engine that includes zlib.h. Semantics are documented in compress.h. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#define ZLIB_CONST
#include <zlib.h>

#include "compress.h"
#include "log.h"
#include "util.h"

/* negative windowBits: raw deflate, no zlib header or adler32 trailer */
#define QCOW_DEFLATE_WINDOW_BITS (-12)
#define QCOW_DEFLATE_MEM_LEVEL 9

static int zlib_error_to_errno(int zret)
{
	switch (zret) {
	case Z_MEM_ERROR:
		return -ENOMEM;
	case Z_DATA_ERROR:
	case Z_NEED_DICT:
		return -EBADMSG;
	default:		/* Z_VERSION_ERROR, Z_STREAM_ERROR */
		return -EIO;
	}
}

int zlib_decompress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len)
{
	z_stream strm;
	uint8_t probe;
	int zret, r;

	if (!dst_len || dst_len > UINT_MAX)
		return -EINVAL;

	memset(&strm, 0, sizeof(strm));
	zret = inflateInit2(&strm, QCOW_DEFLATE_WINDOW_BITS);
	if (zret != Z_OK) {
		log_dbg("zlib: inflateInit2 failed: %d", zret);
		return zlib_error_to_errno(zret);
	}

	strm.next_in = src;
	/* src_len is an upper bound: clamping it loses nothing a cluster needs */
	strm.avail_in = (uInt)MIN(src_len, (size_t)UINT_MAX);
	strm.next_out = dst;
	strm.avail_out = (uInt)dst_len;

	zret = inflate(&strm, Z_FINISH);
	if (zret != Z_STREAM_END && zret != Z_BUF_ERROR && zret != Z_OK) {
		log_dbg("zlib: corrupt stream: %s", strm.msg ? strm.msg : "?");
		r = zlib_error_to_errno(zret);
		goto out;
	}
	if (strm.avail_out) {
		log_dbg("zlib: stream %s after %zu of %zu bytes",
			zret == Z_STREAM_END ? "ended" : "truncated",
			dst_len - strm.avail_out, dst_len);
		r = -EBADMSG;
		goto out;
	}
	if (zret == Z_STREAM_END) {
		r = 0;
		goto out;
	}

	/* The cluster is full but the stream has not ended. QEMU stops here and
	 * accepts; we ask for one more byte to tell a missing terminator (the
	 * input ran out: accepted, as QEMU does) from a stream that would write
	 * past the cluster (refused). */
	strm.next_out = &probe;
	strm.avail_out = 1;
	zret = inflate(&strm, Z_FINISH);
	if (!strm.avail_out) {
		log_dbg("zlib: stream longer than the %zu-byte cluster", dst_len);
		r = -EBADMSG;
	} else if (zret == Z_STREAM_END || (zret == Z_BUF_ERROR && !strm.avail_in)) {
		r = 0;
	} else {
		log_dbg("zlib: corrupt stream after a full cluster: %s",
			strm.msg ? strm.msg : "?");
		r = zret == Z_BUF_ERROR ? -EBADMSG : zlib_error_to_errno(zret);
	}
out:
	inflateEnd(&strm);
	return r;
}

ssize_t zlib_compress_cluster(void *dst, size_t dst_len, const void *src, size_t src_len)
{
	z_stream strm;
	ssize_t r;
	int zret;

	if (!src_len || src_len > UINT_MAX)
		return -EINVAL;
	if (!dst_len)
		return -ENOSPC;

	memset(&strm, 0, sizeof(strm));
	zret = deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
			    QCOW_DEFLATE_WINDOW_BITS, QCOW_DEFLATE_MEM_LEVEL,
			    Z_DEFAULT_STRATEGY);
	if (zret != Z_OK) {
		log_dbg("zlib: deflateInit2 failed: %d", zret);
		return zlib_error_to_errno(zret);
	}

	strm.next_in = src;
	strm.avail_in = (uInt)src_len;
	strm.next_out = dst;
	/* SIZE_MAX / 2: the length must fit the ssize_t result */
	strm.avail_out = (uInt)MIN(MIN(dst_len, (size_t)UINT_MAX), SIZE_MAX / 2);

	zret = deflate(&strm, Z_FINISH);
	if (zret == Z_STREAM_END)
		r = (ssize_t)strm.total_out;
	else if (zret == Z_OK || zret == Z_BUF_ERROR)
		r = -ENOSPC;	/* ran out of output space */
	else
		r = zlib_error_to_errno(zret);

	deflateEnd(&strm);
	return r;
}
