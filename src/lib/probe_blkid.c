/* Signature probing of a memory buffer with libblkid. The only file of the
 * engine that includes blkid.h. libblkid probes file descriptors, so the
 * buffer goes into an anonymous memfd that never reaches a filesystem. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <blkid/blkid.h>

#include "keys.h"
#include "log.h"
#include "sysutil.h"
#include "qcowtab.h"
#include "util.h"

static void copy_value(blkid_probe pr, const char *name, char *type, size_t typelen)
{
	const char *val = NULL;

	if (!type || !typelen)
		return;
	if (blkid_probe_lookup_value(pr, name, &val, NULL) == 0 && val)
		snprintf(type, typelen, "%s", val);
}

int probe_signature(const void *buf, size_t len, char *type, size_t typelen)
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
	r = fd_write_all(fd, buf, len);
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

/* ---- Finding devices for qcowtab (qcowtab.h) ---- */

int probe_tag_device(const char *tag, const char *value, char *dev, size_t size)
{
	char *name;
	int n;

	if (!tag || !value || !*value)
		return -EINVAL;
	/* udev's /dev/disk/by-* links first, then a scan (blkid.conf EVALUATE) */
	name = blkid_evaluate_tag(tag, value, NULL);
	if (!name) {
		log_dbg("No device with %s=%s.", tag, value);
		return -ENODEV;
	}
	n = snprintf(dev, size, "%s", name);
	free(name);
	if (n < 0 || (size_t)n >= size)
		return -ENOSPC;
	log_dbg("%s=%s is %s.", tag, value, dev);
	return 0;
}

int probe_fstype(const char *dev, char *type, size_t size)
{
	blkid_probe pr;
	const char *val = NULL;
	int r;

	if (size)
		type[0] = '\0';
	pr = blkid_new_probe_from_filename(dev);
	if (!pr)
		return errno ? -errno : -EIO;
	if (blkid_probe_enable_superblocks(pr, 1) != 0 ||
	    blkid_probe_set_superblocks_flags(pr, BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE) != 0) {
		r = -EINVAL;
		goto out;
	}
	switch (blkid_do_safeprobe(pr)) {
	case 0:
		if (blkid_probe_lookup_value(pr, "USAGE", &val, NULL) == 0 && val && strcmp(val, "filesystem")) {
			r = -ENODEV;
			break;
		}
		val = NULL;
		if (blkid_probe_lookup_value(pr, "TYPE", &val, NULL) == 0 && val) {
			snprintf(type, size, "%s", val);
			r = 0;
		} else {
			r = -ENODEV;
		}
		break;
	case 1:
	case -2:
		r = -ENODEV;
		break;
	default:
		r = -EIO;
		break;
	}
out:
	blkid_free_probe(pr);
	return r;
}
