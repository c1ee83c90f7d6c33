/* The trust rules: what the files an image names (backing files, external
 * data files) may be. An image is untrusted input and so is every name in
 * it; qcowsetup runs as root. qcowsetup(8) SECURITY says the same for
 * admins, with the reasons. */
#ifndef QS_TRUST_H
#define QS_TRUST_H

#include <stdbool.h>

#include "io.h"

struct trust_rules {
	/* --trust-names: names may lead to block devices, outside the top
	 * image's folder and to other owners' files */
	bool trust_names;
};

/* Open req->path with flags (O_RDONLY or O_RDWR; O_CLOEXEC is added) as
 * the rules allow, without side effects on what it refuses: the path is
 * opened with O_PATH and checked first, then reopened through
 * /proc/self/fd (never by its name again), non-blocking and without
 * a controlling terminal.
 *
 * Every file must be a regular file or a block device. A name from an
 * image (req->name set) must also lead to
 *   - a regular file (a block device with trust_names),
 *   - on a storage filesystem, not a kernel interface (proc, sysfs,
 *     devtmpfs, debugfs, ...),
 *   - inside the folder of the top image, as named or as it really is
 *     (unless trust_names),
 *   - owned by root or by the owner of the image that names it (unless
 *     trust_names).
 * Returns the descriptor, or -errno with one line logged that names the
 * file and the reason: -EACCES refused by these rules (or no permission),
 * -ENODEV not a regular file or block device, -ENOENT, ... */
int trust_open(const struct trust_rules *rules, const struct img_open_req *req, int flags);

#endif
