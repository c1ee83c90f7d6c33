/* qcowsetup probe [--udev] DEVICE: is there a qcow2 (or qcow) image on
 * DEVICE? libblkid has no qcow2 probe, so udev asks this (IMPORT{program}
 * in 60-qcowsetup.rules) for block devices on which blkid found nothing.
 *
 * --udev prints KEY=VALUE lines for udev:
 *   ID_QCOW2_FORMAT=qcow2|qcow
 *   ID_QCOW2_VERSION=3
 *   ID_QCOW2_CLUSTER_SIZE=65536
 *   ID_QCOW2_VIRTUAL_SIZE=<bytes>
 *   ID_QCOW2_ENCRYPTION=none|aes|luks
 *   ID_QCOW2_LUKS_UUID=<uuid>          (LUKS only)
 *   ID_QCOW2_BACKING=1                 (the image has a backing file)
 *   ID_QCOW2_QCOWTAB=<name> [<name>..] (qcowtab entries without noauto whose
 *                                       image is this device)
 *   ID_QCOW2_QCOWTAB_UNITS=qcowsetup@<name>.service ... (their units, as
 *                                       qcowsetup-generator names them)
 * Exit 0 only for a qcow2 or qcow image (udev then imports the lines); 4 for
 * anything else, without a message. Nothing is locked or written, and no
 * file the image names (backing or data file) is opened. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "keys.h"
#include "log.h"
#include "luks_uuid.h"
#include "fileio.h"
#include "qcowsetup.h"
#include "tab.h"

static const char *encryption_name(uint32_t m)
{
	switch (m) {
	case IMG_CRYPT_NONE:
		return "none";
	case IMG_CRYPT_AES:
		return "aes";
	case IMG_CRYPT_LUKS:
		return "luks";
	default:
		return "unknown";
	}
}

/* Is path (from qcowtab) one of udev's names for this device? DEVLINKS holds
 * the links that earlier rules gave it in this very event, before they
 * exist in /dev. */
static bool in_devlinks(const char *path)
{
	const char *links = getenv("DEVLINKS"), *p;
	size_t len = strlen(path);

	if (!links)
		return false;
	for (p = links; (p = strstr(p, path)); p += len)
		if ((p == links || p[-1] == ' ') && (p[len] == ' ' || !p[len]))
			return true;
	return false;
}

static bool entry_is_device(const struct qcowtab_entry *e, const char *dev, dev_t rdev)
{
	const struct qcowtab_location *l = &e->image;
	char found[4096];
	dev_t r;

	if (l->source == QCOWTAB_PATH_ONLY) {
		if (!strcmp(l->path, dev) || in_devlinks(l->path))
			return true;
	} else if (l->source == QCOWTAB_TAG_ONLY) {
		const char *v = NULL;

		/* this event's values (60-persistent-storage.rules), before any link */
		if (!strcmp(l->tag, "PARTUUID"))
			v = getenv("ID_PART_ENTRY_UUID");
		else if (!strcmp(l->tag, "PARTLABEL"))
			v = getenv("ID_PART_ENTRY_NAME");
		if (v && !strcasecmp(v, l->value))
			return true;
	} else {
		return false;
	}
	return tools_location_blockdev(l, found, sizeof(found), &r) == 0 && r == rdev;
}

/* The names of the qcowtab entries (not noauto) whose image is this device,
 * and their systemd units, space-separated, into buf and units. */
static void qcowtab_names(const char *dev, char *buf, size_t size, char *units, size_t usize)
{
	struct qcowtab tab;
	struct stat st;
	size_t pos = 0, upos = 0;

	buf[0] = '\0';
	units[0] = '\0';
	if (stat(dev, &st) < 0 || !S_ISBLK(st.st_mode))
		return;
	if (tools_load_qcowtab(&tab, true))
		return;
	for (size_t i = 0; i < tab.count; i++) {
		const struct qcowtab_entry *e = &tab.entries[i];
		char unit[512];
		int n, m;

		if (e->noauto || !entry_is_device(e, dev, st.st_rdev) || qcowtab_unit_name(e->name, unit, sizeof(unit)))
			continue;
		n = snprintf(buf + pos, size - pos, "%s%s", pos ? " " : "", e->name);
		m = snprintf(units + upos, usize - upos, "%s%s", upos ? " " : "", unit);
		if (n < 0 || (size_t)n >= size - pos || m < 0 || (size_t)m >= usize - upos) {
			buf[pos] = '\0';
			units[upos] = '\0';
			break;
		}
		pos += (size_t)n;
		upos += (size_t)m;
	}
	qcowtab_free(&tab);
}

static void quiet(enum qs_log_level level, const char *msg, void *ud)
{
	(void)level;
	(void)msg;
	(void)ud;
}

int cmd_probe(int argc, char **argv)
{
	const char *dev = argv[0];
	struct image_open_opts o = { .no_backing = true, .no_data_file = true };
	struct luks_info li;
	struct image *img = NULL;
	char names[4096], units[8192];
	bool have_luks = false;
	int r;

	(void)argc;
	/* udev runs this for devices strangers plug in: quiet, and nothing
	 * the image names is opened (only the header is read) */
	if (opt.udev)
		qs_log_set_callback(quiet, NULL);
	r = image_open(&file_io_opener, dev, &o, &img);
	if (r)
		return r == -ENOMEM ? r : -ENODEV;	/* the reason is logged */
	if (img->format != IMG_FMT_QCOW2 && img->format != IMG_FMT_QCOW) {
		if (!opt.udev)
			log_err("%s holds no qcow2 or qcow image.", dev);
		r = -ENODEV;
		goto out;
	}
	if (img->crypt_method == IMG_CRYPT_LUKS &&
	    luks_read_info(&img->io, img->crypt_header_offset, img->crypt_header_length, &li) == 0)
		have_luks = true;
	if (opt.udev) {
		qcowtab_names(dev, names, sizeof(names), units, sizeof(units));
		printf("ID_QCOW2_FORMAT=%s\n", image_format_name(img->format));
		printf("ID_QCOW2_VERSION=%" PRIu32 "\n", img->version);
		printf("ID_QCOW2_CLUSTER_SIZE=%" PRIu64 "\n", img->cluster_size);
		printf("ID_QCOW2_VIRTUAL_SIZE=%" PRIu64 "\n", img->size);
		printf("ID_QCOW2_ENCRYPTION=%s\n", encryption_name(img->crypt_method));
		if (have_luks && luks_uuid_valid(li.uuid))	/* it names a udev link */
			printf("ID_QCOW2_LUKS_UUID=%s\n", li.uuid);
		if (img->backing_file)
			printf("ID_QCOW2_BACKING=1\n");
		if (names[0])
			printf("ID_QCOW2_QCOWTAB=%s\nID_QCOW2_QCOWTAB_UNITS=%s\n", names, units);
	} else {
		printf("%s: %s version %" PRIu32 ", cluster size %" PRIu64 ", virtual size %" PRIu64
		       ", encryption %s%s%s%s\n", dev, image_format_name(img->format), img->version,
		       img->cluster_size, img->size, encryption_name(img->crypt_method),
		       have_luks ? " (UUID " : "", have_luks ? li.uuid : "", have_luks ? ")" : "");
	}
	r = 0;
out:
	image_free(img, &file_io_opener);
	return r;
}
