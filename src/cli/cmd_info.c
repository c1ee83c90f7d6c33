/* qcowsetup info: format, sizes, features, encryption, chain, snapshots. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cmd_keys.h"
#include "json.h"
#include "keys.h"
#include "log.h"
#include "qcowsetup.h"

static const char *crypt_name(uint32_t m)
{
	return m == IMG_CRYPT_LUKS ? "luks" : m == IMG_CRYPT_AES ? "aes" : "none";
}

static void features_json(struct json *j, const struct image *img, const char *key, int type, uint64_t bits)
{
	char buf[64];

	json_begin_array(j, key);
	for (unsigned int b = 0; b < 64; b++)
		if (bits & (1ULL << b))
			json_string(j, NULL, image_feature_name(img, type, b, buf, sizeof(buf)));
	json_end_array(j);
}

static void features_human(const struct image *img, const char *label, int type, uint64_t bits)
{
	char buf[64];
	bool first = true;

	printf("%-22s", label);
	for (unsigned int b = 0; b < 64; b++)
		if (bits & (1ULL << b)) {
			printf("%s%s", first ? "" : ", ", image_feature_name(img, type, b, buf, sizeof(buf)));
			first = false;
		}
	printf("%s\n", first ? "none" : "");
}

static int luks_info_of(const struct image *img, struct luks_info *li)
{
	if (img->crypt_method != IMG_CRYPT_LUKS)
		return -ENOENT;
	return luks_read_info(&img->io, img->crypt_header_offset, img->crypt_header_length, li);
}

static void qcow2_json(struct json *j, const struct image *img)
{
	json_string(j, "compat", img->version == 2 ? "0.10" : "1.1");
	json_u64(j, "refcount-bits", 1ULL << img->refcount_order);
	json_string(j, "compression-type", img->compression_type ? "zstd" : "zlib");
	json_bool(j, "lazy-refcounts", img->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS);
	json_bool(j, "extended-l2", img->extended_l2);
	json_bool(j, "corrupt", img->incompatible_features & QCOW2_INCOMPAT_CORRUPT);
	json_bool(j, "dirty", img->incompatible_features & QCOW2_INCOMPAT_DIRTY);
	features_json(j, img, "incompatible-features", 0, img->incompatible_features);
	features_json(j, img, "compatible-features", 1, img->compatible_features);
	features_json(j, img, "autoclear-features", 2, img->autoclear_features);
	if (img->data_file) {
		json_string(j, "data-file", img->data_file);
		json_bool(j, "data-file-raw", img->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW);
	}
	if (img->unknown_extensions) {
		json_begin_array(j, "unknown-header-extensions");
		for (size_t i = 0; img->unknown_extensions[i]; i++)
			json_string(j, NULL, img->unknown_extensions[i]);
		json_end_array(j);
	}
}

static void encrypt_json(struct json *j, const struct image *img)
{
	struct luks_info li;
	char cipher[128];

	json_begin_object(j, "encrypt");
	json_string(j, "format", crypt_name(img->crypt_method));
	if (img->crypt_method == IMG_CRYPT_AES) {
		json_string(j, "cipher", "aes-cbc-plain64");
		json_u64(j, "key-size", 16);
	} else if (luks_info_of(img, &li) == 0) {
		if (luks_dm_cipher_spec(&li, cipher, sizeof(cipher)) == 0)
			json_string(j, "cipher", cipher);
		json_u64(j, "key-size", li.key_bytes);
		json_string(j, "hash", li.hash);
		json_string(j, "uuid", li.uuid);
		json_u64(j, "header-offset", img->crypt_header_offset);
		json_u64(j, "header-length", img->crypt_header_length);
		json_begin_array(j, "slots");
		for (int s = 0; s < LUKS_NUM_SLOTS; s++) {
			json_begin_object(j, NULL);
			json_u64(j, "slot", (uint64_t)s);
			json_bool(j, "active", li.slots[s].active);
			if (li.slots[s].active)
				json_u64(j, "iterations", li.slots[s].iterations);
			json_u64(j, "key-offset", li.slots[s].key_offset);
			json_end_object(j);
		}
		json_end_array(j);
		bindings_json(j, img, &li);
	}
	json_end_object(j);
}

/* Internal snapshots and persistent bitmaps. */
static void lists_json(struct json *j, const struct image *img)
{
	if (img->nb_snapshots) {
		json_begin_array(j, "snapshots");
		for (uint32_t i = 0; i < img->nb_snapshots; i++) {
			const struct qcow2_snapshot *sn = &img->snapshots[i];

			json_begin_object(j, NULL);
			json_string(j, "id", sn->id);
			json_string(j, "name", sn->name);
			json_u64(j, "vm-state-size", sn->vm_state_size);
			json_u64(j, "disk-size", sn->disk_size);
			json_u64(j, "date-sec", sn->date_sec);
			json_u64(j, "date-nsec", sn->date_nsec);
			json_u64(j, "vm-clock-nsec", sn->vm_clock_nsec);
			if (sn->has_icount)
				json_u64(j, "icount", sn->icount);
			json_end_object(j);
		}
		json_end_array(j);
	}
	if (img->nb_bitmaps) {
		json_begin_array(j, "bitmaps");
		for (uint32_t i = 0; i < img->nb_bitmaps; i++) {
			json_begin_object(j, NULL);
			json_string(j, "name", img->bitmaps[i].name);
			json_u64(j, "granularity", 1ULL << (img->bitmaps[i].granularity_bits & 63));
			json_u64(j, "flags", img->bitmaps[i].flags);
			json_end_object(j);
		}
		json_end_array(j);
	}
}

static void layer_json(struct json *j, const struct image *img)
{
	json_begin_object(j, NULL);
	json_string(j, "filename", img->path);
	json_string(j, "format", image_format_name(img->format));
	json_u64(j, "virtual-size", img->size);
	json_u64(j, "actual-size", img->io.size);
	if (img->format != IMG_FMT_RAW) {
		json_u64(j, "version", img->version);
		json_u64(j, "cluster-size", img->cluster_size);
		json_bool(j, "encrypted", img->crypt_method != IMG_CRYPT_NONE);
	}
	if (img->backing_file) {
		json_string(j, "backing-filename", img->backing_file);
		json_string(j, "full-backing-filename", img->backing_path);
		if (img->backing_format)
			json_string(j, "backing-filename-format", img->backing_format);
	}
	if (img->format == IMG_FMT_QCOW2)
		qcow2_json(j, img);
	if (img->crypt_method != IMG_CRYPT_NONE)
		encrypt_json(j, img);
	lists_json(j, img);
	json_end_object(j);
}

static void size_human(const char *label, uint64_t v)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	double d = (double)v;
	unsigned int u = 0;

	while (d >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
		d /= 1024;
		u++;
	}
	if (u)
		printf("%-22s%.3g %s (%" PRIu64 " bytes)\n", label, d, units[u], v);
	else
		printf("%-22s%" PRIu64 " bytes\n", label, v);
}

static void layer_human(struct image *img)
{
	struct luks_info li;
	char cipher[128];

	printf("%-22s%s\n", "image:", img->path);
	printf("%-22s%s\n", "file format:", image_format_name(img->format));
	size_human("virtual size:", img->size);
	size_human("file size:", img->io.size);
	if (img->format == IMG_FMT_RAW)
		return;
	printf("%-22s%" PRIu64 "\n", "cluster_size:", img->cluster_size);
	if (img->format == IMG_FMT_QCOW2) {
		printf("%-22s%s (version %u)\n", "compat:", img->version == 2 ? "0.10" : "1.1", img->version);
		printf("%-22s%u\n", "refcount bits:", 1U << img->refcount_order);
		printf("%-22s%s\n", "compression type:", img->compression_type ? "zstd" : "zlib");
		printf("%-22s%s\n", "extended l2:", img->extended_l2 ? "true" : "false");
		printf("%-22s%s\n", "lazy refcounts:", img->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS ? "true" : "false");
		printf("%-22s%s\n", "corrupt:", img->incompatible_features & QCOW2_INCOMPAT_CORRUPT ? "true" : "false");
		printf("%-22s%s\n", "dirty:", img->incompatible_features & QCOW2_INCOMPAT_DIRTY ? "true" : "false");
		features_human(img, "incompatible features:", 0, img->incompatible_features);
		features_human(img, "compatible features:", 1, img->compatible_features);
		features_human(img, "autoclear features:", 2, img->autoclear_features);
		if (img->data_file)
			printf("%-22s%s%s\n", "data file:", img->data_file,
			       img->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW ? " (raw)" : "");
	}
	printf("%-22s%s\n", "encrypted:", img->crypt_method == IMG_CRYPT_NONE ? "no" :
	       img->crypt_method == IMG_CRYPT_AES ? "yes (legacy AES-128-CBC, no key check in the format)" : "yes (LUKS)");
	if (luks_info_of(img, &li) == 0) {
		if (luks_dm_cipher_spec(&li, cipher, sizeof(cipher)) == 0)
			printf("%-22s%s, %u-bit key, %s\n", "cipher:", cipher, li.key_bytes * 8, li.hash);
		printf("%-22s%s\n", "LUKS UUID:", li.uuid);
		printf("%-22s", "key slots:");
		for (int s = 0; s < LUKS_NUM_SLOTS; s++)
			printf("%d:%s%s", s, li.slots[s].active ? "ENABLED" : "DISABLED", s + 1 < LUKS_NUM_SLOTS ? " " : "\n");
		if (img->bindings || img->bindings_invalid) {
			printf("bindings:\n");
			bindings_human(img, &li, "    ");
		}
	}
	if (img->backing_file)
		printf("%-22s%s (actual path: %s)%s%s\n", "backing file:", img->backing_file, img->backing_path,
		       img->backing_format ? ", format " : "", img->backing_format ? img->backing_format : "");
	if (img->nb_snapshots) {
		printf("Snapshot list:\n%-10s%-20s%12s%22s%16s\n", "ID", "TAG", "VM SIZE", "DATE", "DISK SIZE");
		for (uint32_t i = 0; i < img->nb_snapshots; i++) {
			const struct qcow2_snapshot *sn = &img->snapshots[i];
			time_t t = sn->date_sec;
			struct tm tm;
			char date[32] = "";

			if (gmtime_r(&t, &tm))
				strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
			printf("%-10s%-20s%12" PRIu64 "%22s%16" PRIu64 "\n", sn->id, sn->name, sn->vm_state_size, date,
			       sn->disk_size);
		}
	}
	if (img->nb_bitmaps) {
		printf("Bitmaps:\n");
		for (uint32_t i = 0; i < img->nb_bitmaps; i++)
			printf("    %s\n", img->bitmaps[i].name);
	}
}

int cmd_info(int argc, char **argv)
{
	struct image *img = NULL;
	struct json j;
	int r;

	r = tools_open_image(argv[0], 0, &img);
	if (r < 0)
		return r;
	if (opt.json) {
		json_init(&j, stdout, true);
		json_begin_object(&j, NULL);
		json_string(&j, "filename", img->path);
		json_string(&j, "format", image_format_name(img->format));
		json_u64(&j, "virtual-size", img->size);
		json_begin_array(&j, "backing-chain");
		for (struct image *l = img; l; l = l->backing)
			layer_json(&j, l);
		json_end_array(&j);
		json_end_object(&j);
		json_finish(&j);
	} else {
		for (struct image *l = img; l; l = l->backing) {
			if (l != img)
				printf("\n");
			layer_human(l);
		}
	}
	tools_close_image(img);
	return 0;
}
