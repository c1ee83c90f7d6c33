/* Converting an image to a LUKS qcow2 image (qcowsetup convert).
 *
 * Any image the engine reads (legacy AES qcow2 or qcow v1, unencrypted
 * qcow2 or qcow, raw, LUKS qcow2) becomes a LUKS qcow2 image that QEMU
 * opens with the new passphrase. Userspace only: the source is read through
 * the engine's runs (decrypting legacy AES with the source key, checked with
 * legacy_key_check; LUKS with its volume key; decompressing compressed
 * clusters), every data cluster of the result is encrypted with a new volume
 * key and IV = its host sector (OpenSSL) and written by qcow2_create.c.
 *
 * Sparseness: the cluster size is the source's (raw: 64 KiB) unless
 * cluster_size; a cluster unallocated in the source stays unallocated; zero
 * clusters stay zero clusters; a data cluster that reads as zeros becomes a
 * zero cluster (with a backing file) or unallocated (without). The backing
 * file is kept (same name, made absolute when the result is in another
 * folder where the name would resolve elsewhere) unless flatten copies the
 * chain's data instead. A cluster of the result that mixes the top layer's
 * data with the backing file's (another cluster size, subclusters) is
 * written whole, read through the chain.
 *
 * The phases: open the source, check the target, plan the result (cluster
 * size, backing file), unlock the source, prepare the target (new
 * passphrase, LUKS header, the file from the caller's create_target), copy
 * the clusters, verify (the header, the new passphrase, the refcounts; with
 * verify_clusters every cluster's plaintext against the source) and commit.
 * The source is never written. Messages go through log.h; nothing is
 * printed otherwise. */
#ifndef QS_CONVERT_H
#define QS_CONVERT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io.h"
#include "keys.h"

struct convert_params {
	/* the source */
	const char *src_path;		/* named in messages; relative backing names resolve from it */
	const struct img_io *src_io;	/* the source file, opened (and locked) by the caller */
	const char *format;		/* NULL: probed */
	const char *snapshot;		/* an internal snapshot to convert; NULL: the active layer */
	bool trust_names;		/* trust.h: follow backing names beyond the rules */
	bool skip_key_check;		/* legacy AES: no legacy_key_check */
	unsigned int tries;		/* source passphrases asked before -EPERM (0 = 1) */

	/* the result */
	const char *dst_path;		/* its final name */
	bool in_place;			/* dst_path is the source (its real path) */
	bool force;			/* an existing dst_path is replaced; in place: internal
					 * snapshots are dropped */
	bool flatten;			/* no backing file: the chain's data is copied */
	bool verify_clusters;		/* read the result back and compare every cluster */
	uint64_t cluster_size;		/* 0: the source's (raw: 64 KiB) */
	const struct luks_format_params *luks;	/* cipher, mode, hash, PBKDF of the new header */
	size_t key_bytes;		/* of the new volume key */

	/* The source passphrase, for image (the first encrypted layer read);
	 * asked again, up to tries times, while it opens nothing. */
	int (*read_passphrase)(void *opaque, const char *image, struct passphrase **pp);
	/* The new passphrase of dst; *pp may be src_pp itself (src_pp: the
	 * source's, NULL when nothing was decrypted). */
	int (*read_new_passphrase)(void *opaque, const char *dst, struct passphrase *src_pp,
				   struct passphrase **pp);
	/* The file the result is written to, beside dst (*fd open for writing,
	 * empty; *tmp its name), renamed into place by commit_target once
	 * verified; abort_target removes it (after a failed commit too). */
	int (*create_target)(void *opaque, const char *dst, int *fd, const char **tmp);
	int (*commit_target)(void *opaque);
	void (*abort_target)(void *opaque);
	/* Optional progress of the copy ("Converting") and of the comparison
	 * ("Verifying "), in guest bytes. */
	void (*progress_start)(void *opaque, const char *label, uint64_t total);
	void (*progress_update)(void *opaque, uint64_t done);
	void (*progress_end)(void *opaque, bool ok);
	void *opaque;
};

/* Convert p->src_io into a LUKS qcow2 image at p->dst_path. Returns 0, or
 * -errno with a message logged:
 *   -EINVAL  dst_path is in the source chain; in place with internal
 *            snapshots and no force; parameters the writer refuses,
 *   -EEXIST  dst_path exists and not force,
 *   -EBUSY   someone has dst_path open (QEMU's locks),
 *   -EPERM   no source passphrase opened an encrypted layer,
 *   -ENOTSUP a cipher the host cannot run in userspace,
 *   -EIO     the result is not what was written (verification),
 *   -EUCLEAN a corrupt source, or the errors of the callbacks, the reads and
 *            the writes (-ENOSPC, -EFBIG). On failure the target is aborted. */
int convert_image(const struct convert_params *p);

#endif
