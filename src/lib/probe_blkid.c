/* Signature probing of a memory buffer with libblkid. The only file of the
 * engine that includes blkid.h. libblkid probes file descriptors, so the
 * buffer goes into an anonymous memfd that never reaches a filesystem. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <blkid/blkid.h>

#include "keys.h"
#include "log.h"
#include "util.h"

static int write_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	ssize_t n;

	while (len) {
		n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void copy_value(blkid_probe pr, const char *name, char *type, size_t typelen)
{
	const char *val = NULL;

	if (!type || !typelen)
		return;
	if (blkid_probe_lookup_value(pr, name, &val, NULL) == 0 && val)
		snprintf(type, typelen, "%s", val);
}

int blkid_probe_signature(const void *buf, size_t len, char *type, size_t typelen)
{
	blkid_probe pr = NULL;
	int fd = -1, r;

	if (type && typelen)
		type[0] = '\0';
	if (!len)
		return 0;

	fd = memfd_create("qcowsetup-probe", MFD_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		log_dbg("memfd_create for signature probing failed: %s", strerror(-r));
		goto out;
	}
	r = write_all(fd, buf, len);
	if (r < 0)
		goto out;

	pr = blkid_new_probe();
	if (!pr) {
		r = -ENOMEM;
		goto out;
	}
	if (blkid_probe_set_device(pr, fd, 0, (blkid_loff_t)len) != 0 ||
	    blkid_probe_enable_superblocks(pr, 1) != 0 ||
	    blkid_probe_set_superblocks_flags(pr, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE) != 0 ||
	    blkid_probe_enable_partitions(pr, 1) != 0 ||
	    blkid_probe_set_partitions_flags(pr, BLKID_PARTS_MAGIC) != 0) {
		r = -EINVAL;
		goto out;
	}

	/* 0 found, 1 nothing, -2 ambivalent (several signatures), -1 error */
	switch (blkid_do_safeprobe(pr)) {
	case 0:
		copy_value(pr, "PTTYPE", type, typelen);
		copy_value(pr, "TYPE", type, typelen);	/* a filesystem wins */
		r = 1;
		break;
	case 1:
		r = 0;
		break;
	case -2:
		if (type && typelen)
			snprintf(type, typelen, "ambivalent");
		r = 1;
		break;
	default:
		r = -EIO;
		break;
	}
	log_dbg("Signature probe of %zu bytes: %s%s", len,
		r > 0 ? "found " : r == 0 ? "none" : "error",
		r > 0 && type ? type : "");
out:
	if (pr)
		blkid_free_probe(pr);
	if (fd >= 0)
		close(fd);
	return r;
}
