/* The device-mapper stack builder: chains and runs made by hand, golden
 * tables, refusals, and a resolver that follows every guest sector through
 * the tables and compares where it lands with what the runs say. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dmtable.h"
#include "log.h"
#include "tap.h"
#include "util.h"

#define KiB 1024ULL
#define MiB (1024 * KiB)
#define MAX_LAYERS 4

/* ---- building chains and runs by hand ---- */

struct layer_spec {
	enum img_format format;
	uint32_t crypt;		/* enum img_crypt */
	uint64_t size;		/* guest bytes */
	uint64_t file_size;	/* bytes of the (data) file */
	const char *path;
};

struct chain {
	struct image img[MAX_LAYERS];
	struct dm_layer_params lp[MAX_LAYERS];
	unsigned int n;
};

static void chain_init(struct chain *c, const struct layer_spec *spec, unsigned int n)
{
	static char host[MAX_LAYERS][64];

	memset(c, 0, sizeof(*c));
	c->n = n;
	for (unsigned int d = 0; d < n; d++) {
		struct image *img = &c->img[d];

		img->format = spec[d].format;
		img->crypt_method = spec[d].crypt;
		img->size = spec[d].size;
		img->path = (char *)spec[d].path;
		img->data_io.size = spec[d].file_size;
		img->io.size = spec[d].file_size;
		img->depth = (int)d;
		img->snapshot_index = -1;
		img->backing = d + 1 < n ? &c->img[d + 1] : NULL;
		snprintf(host[d], sizeof(host[d]), "{loop:%s}", spec[d].path);
		c->lp[d].host_dev = host[d];
		if (spec[d].crypt == IMG_CRYPT_LUKS) {
			c->lp[d].cipher = "aes-xts-plain64";
			c->lp[d].key_size = 64;
		}
	}
}

static void runs_set(struct run_list *l, const struct run *r, size_t n)
{
	/* no run_list_add: keep the runs exactly as written (unmerged) */
	l->runs = malloc(n * sizeof(*r));
	memcpy(l->runs, r, n * sizeof(*r));
	l->count = l->alloc = n;
}

/* ---- capturing messages ---- */

static char last_err[1024];

static void capture_log(enum qs_log_level level, const char *msg, void *userdata)
{
	(void)userdata;
	if (level == QS_LOG_ERR)
		snprintf(last_err, sizeof(last_err), "%s", msg);
}

static char *format_stack(const struct dm_stack *s)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (dm_stack_format(s, f))
		printf("# dm_stack_format failed\n");
	fclose(f);
	return buf;
}

/* ---- the resolver: follow a sector through the tables ---- */

enum place_kind { P_ZERO, P_HOST, P_ERROR };

struct place {
	enum place_kind kind;
	unsigned int layer;	/* P_HOST */
	uint64_t sector;	/* P_HOST: on the layer's host device */
	int crypt_layer;	/* -1, or the layer whose key decrypts it */
	uint64_t iv;		/* sector number dm-crypt uses as IV */
};

static const struct dm_target *find_target(const struct dm_device *d, uint64_t sector)
{
	size_t lo = 0, hi = d->count;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		const struct dm_target *t = &d->targets[mid];

		if (sector < t->start)
			hi = mid;
		else if (sector >= t->start + t->len)
			lo = mid + 1;
		else
			return t;
	}
	return NULL;
}

static void resolve(const struct dm_stack *s, size_t dev, uint64_t sector, struct place *p)
{
	for (int hops = 0; hops < 64; hops++) {
		const struct dm_device *d = &s->devices[dev];
		const struct dm_target *t = find_target(d, sector);
		uint64_t off;

		if (!t)
			break;
		off = sector - t->start;
		switch (t->type) {
		case DM_TARGET_ZERO:
			p->kind = P_ZERO;
			return;
		case DM_TARGET_CRYPT:
			if (p->crypt_layer >= 0)
				goto error;	/* never decrypt twice */
			p->crypt_layer = d->layer;
			p->iv = off;	/* iv_offset 0: the sector in the target */
			/* fall through */
		case DM_TARGET_LINEAR:
			if (DM_DEV_IS_HOST(t->dev)) {
				p->kind = P_HOST;
				p->layer = DM_DEV_HOST_LAYER(t->dev);
				p->sector = t->offset + off;
				return;
			}
			if (t->dev >= dev)
				goto error;
			dev = t->dev;
			sector = t->offset + off;
			break;
		default:
			goto error;
		}
	}
error:
	p->kind = P_ERROR;
}

static struct place resolve_top(const struct dm_stack *s, uint64_t sector)
{
	struct place p = { .kind = P_ERROR, .crypt_layer = -1 };

	resolve(s, s->count - 1, sector, &p);
	return p;
}

/* Where the runs say guest sector g comes from, without the tables. */
static struct place expected_place(const struct chain *c, const struct run_list *runs, uint64_t g)
{
	struct place p = { .kind = P_ERROR, .crypt_layer = -1 };
	uint64_t byte = g * 512;

	for (size_t i = 0; i < runs->count; i++) {
		const struct run *r = &runs->runs[i];
		const struct image *img;
		uint64_t host;

		if (byte < r->guest || byte >= r->guest + r->len)
			continue;
		if (r->kind != RUN_DATA) {
			p.kind = P_ZERO;
			return p;
		}
		img = &c->img[r->depth];
		host = r->host + (byte - r->guest);
		if (img->crypt_method == IMG_CRYPT_LUKS) {
			p.crypt_layer = r->depth;
			p.iv = host / 512;	/* QEMU LUKS: IV = host sector */
		} else if (img->crypt_method == IMG_CRYPT_AES) {
			p.crypt_layer = r->depth;
			p.iv = g;		/* legacy AES: IV = guest sector */
		}
		if (host + 512 > img->data_io.size) {
			p.kind = P_ZERO;	/* past the end of the file: zeros (ciphertext) */
			return p;
		}
		p.kind = P_HOST;
		p.layer = r->depth;
		p.sector = host / 512;
		return p;
	}
	return p;
}

static bool place_eq(const struct place *a, const struct place *b)
{
	if (a->kind != b->kind || a->crypt_layer != b->crypt_layer)
		return false;
	if (a->crypt_layer >= 0 && a->iv != b->iv)
		return false;
	return a->kind != P_HOST || (a->layer == b->layer && a->sector == b->sector);
}

static void place_str(const struct place *p, char *buf, size_t size)
{
	static const char *kinds[] = { "zero", "host", "error" };

	snprintf(buf, size, "%s layer %u sector %" PRIu64 " crypt %d iv %" PRIu64,
		 kinds[p->kind], p->layer, p->sector, p->crypt_layer, p->iv);
}

/* Every guest sector lands where the runs (and, if given, another stack)
 * say. Returns the number of mismatches (and reports the first). */
static size_t check_every_sector(const struct chain *c, const struct run_list *runs,
				 const struct dm_stack *s, const struct dm_stack *ref, const char *what)
{
	const struct dm_device *top = dm_stack_top(s);
	size_t bad = 0;

	for (uint64_t g = 0; g < top->sectors; g++) {
		struct place want = expected_place(c, runs, g), got = resolve_top(s, g);
		struct place other = ref ? resolve_top(ref, g) : got;

		if (place_eq(&want, &got) && place_eq(&other, &got))
			continue;
		if (!bad++) {
			char a[128], b[128];

			place_str(&want, a, sizeof(a));
			place_str(&got, b, sizeof(b));
			printf("# %s: sector %" PRIu64 ": want %s, got %s\n", what, g, a, b);
		}
	}
	return bad;
}

/* Structural invariants of a stack. Returns a description of the first
 * violation, or NULL. */
static const char *check_invariants(const struct chain *c, const struct dm_stack *s, size_t max_targets,
				    const char *name)
{
	static char msg[256];

	if (!s->count || strcmp(dm_stack_top(s)->name, name))
		return "the top device is not last";
	for (size_t i = 0; i < s->count; i++) {
		const struct dm_device *d = &s->devices[i];
		uint64_t pos = 0;

		if (!d->count || d->count > max_targets) {
			snprintf(msg, sizeof(msg), "%s has %zu targets (max %zu)", d->name, d->count, max_targets);
			return msg;
		}
		if (d->hidden != (i + 1 < s->count))
			return "only internal devices are hidden";
		if (strlen(d->name) > DM_NAME_MAX || strlen(d->uuid) > DM_UUID_MAX)
			return "name or uuid too long";
		if (strncmp(d->uuid, d->hidden ? DM_UUID_PREFIX_INTERNAL : DM_UUID_PREFIX,
			    strlen(d->hidden ? DM_UUID_PREFIX_INTERNAL : DM_UUID_PREFIX)))
			return "uuid prefix";
		for (size_t j = 0; j < i; j++)
			if (!strcmp(s->devices[j].name, d->name) || !strcmp(s->devices[j].uuid, d->uuid))
				return "duplicate name or uuid";
		for (size_t k = 0; k < d->count; k++) {
			const struct dm_target *t = &d->targets[k];
			uint64_t limit;

			if (t->start != pos || !t->len) {
				snprintf(msg, sizeof(msg), "%s: target %zu not contiguous", d->name, k);
				return msg;
			}
			pos += t->len;
			if (k && t->type != DM_TARGET_CRYPT && t->type == t[-1].type && t->dev == t[-1].dev &&
			    (t->type == DM_TARGET_ZERO || t[-1].offset + t[-1].len == t->offset)) {
				snprintf(msg, sizeof(msg), "%s: targets %zu and %zu not merged", d->name, k - 1, k);
				return msg;
			}
			if (t->type == DM_TARGET_ZERO)
				continue;
			if (DM_DEV_IS_HOST(t->dev))
				limit = c->img[DM_DEV_HOST_LAYER(t->dev)].data_io.size / 512;
			else if (t->dev < i)
				limit = s->devices[t->dev].sectors;
			else
				return "a table refers to a later device";
			if (t->offset + t->len > limit) {
				snprintf(msg, sizeof(msg), "%s: target %zu maps beyond its device", d->name, k);
				return msg;
			}
		}
		if (pos != d->sectors)
			return "device size differs from its table";
	}
	return NULL;
}

/* ---- table-driven golden cases ---- */

#define R(g, l, h, k, d, f) { .guest = (g), .len = (l), .host = (h), .kind = (k), .depth = (d), .flags = (f) }

struct golden_case {
	const char *what;
	struct layer_spec layers[MAX_LAYERS];
	unsigned int nlayers;
	struct run runs[16];
	size_t nruns;
	bool read_only;
	bool allow_discards;
	size_t max_targets;
	int rc;
	const char *golden;	/* NULL: do not compare */
	const char *message;	/* substring of the error message */
};

static const struct golden_case golden_cases[] = {
	{
		.what = "plain: data, zero, unallocated; contiguous data runs merge",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 2 * MiB, 1 * MiB, "/img/a.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50000, RUN_DATA, 0, 0),
			R(64 * KiB, 64 * KiB, 0, RUN_ZERO, 0, 0),
			R(128 * KiB, 896 * KiB, 0, RUN_UNALLOC, 0, 0),
			R(1 * MiB, 64 * KiB, 0x60000, RUN_DATA, 0, 0),
			R(1 * MiB + 64 * KiB, 64 * KiB, 0x70000, RUN_DATA, 0, 0),
			R(1 * MiB + 128 * KiB, 64 * KiB, 0x80000, RUN_ZERO, 0, RUN_F_HOST),
			R(1 * MiB + 192 * KiB, 832 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 7,
		.read_only = true,
		.golden =
			"# vm uuid=QCOW2-ID-vm ro\n"
			"0 128 linear {loop:/img/a.qcow2} 640\n"
			"128 1920 zero \n"
			"2048 256 linear {loop:/img/a.qcow2} 768\n"
			"2304 1792 zero \n",
	},
	{
		.what = "LUKS: one crypt target over the whole host device, linear at host sectors",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 1 * MiB, 1 * MiB + 300, "/img/l.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50000, RUN_DATA, 0, 0),
			R(64 * KiB, 64 * KiB, 0x60000, RUN_DATA, 0, 0),
			R(128 * KiB, 128 * KiB, 0, RUN_UNALLOC, 0, 0),
			R(256 * KiB, 64 * KiB, 0x40000, RUN_DATA, 0, 0),
			R(320 * KiB, 704 * KiB, 0, RUN_ZERO, 0, 0),
		},
		.nruns = 5,
		.allow_discards = true,
		.golden =
			"# vm_crypt uuid=QCOW2-INT-ID-vm_crypt hidden\n"
			"0 2048 crypt aes-xts-plain64 :64:logon:qcowsetup:vm:L0 0 {loop:/img/l.qcow2} 0 1 allow_discards\n"
			"# vm uuid=QCOW2-ID-vm\n"
			"0 256 linear /dev/mapper/vm_crypt 640\n"
			"256 256 zero \n"
			"512 128 linear /dev/mapper/vm_crypt 512\n"
			"640 1408 zero \n",
	},
	{
		.what = "legacy AES: cipher map of guest space, crypt over it, top at guest sectors",
		.layers = { { IMG_FMT_QCOW, IMG_CRYPT_AES, 1 * MiB, 512 * KiB, "/img/old.qcow" } },
		.nlayers = 1,
		.runs = {
			R(0, 4 * KiB, 0, RUN_UNALLOC, 0, 0),
			R(4 * KiB, 4 * KiB, 0x30000, RUN_DATA, 0, 0),
			R(8 * KiB, 4 * KiB, 0x10000, RUN_DATA, 0, 0),
			R(12 * KiB, 4 * KiB, 0x11000, RUN_DATA, 0, 0),
			R(16 * KiB, 1008 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 5,
		.read_only = true,
		.golden =
			"# vm_cipher uuid=QCOW2-INT-ID-vm_cipher hidden ro\n"
			"0 8 zero \n"
			"8 8 linear {loop:/img/old.qcow} 384\n"
			"16 16 linear {loop:/img/old.qcow} 128\n"
			"32 2016 zero \n"
			"# vm_crypt uuid=QCOW2-INT-ID-vm_crypt hidden ro\n"
			"0 2048 crypt aes-cbc-plain64 :16:logon:qcowsetup:vm:L0 0 /dev/mapper/vm_cipher 0\n"
			"# vm uuid=QCOW2-ID-vm ro\n"
			"0 8 zero \n"
			"8 24 linear /dev/mapper/vm_crypt 8\n"
			"32 2016 zero \n",
	},
	{
		.what = "3 layers: LUKS over legacy AES over raw, flattened into one top table",
		.layers = {
			{ IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 2 * MiB, 1 * MiB, "/img/top.qcow2" },
			{ IMG_FMT_QCOW, IMG_CRYPT_AES, 2 * MiB, 1 * MiB, "/img/mid.qcow" },
			{ IMG_FMT_RAW, IMG_CRYPT_NONE, 1 * MiB, 1 * MiB, "/img/base.raw" },
		},
		.nlayers = 3,
		.runs = {
			R(0, 64 * KiB, 0x80000, RUN_DATA, 0, 0),
			R(64 * KiB, 64 * KiB, 0x20000, RUN_DATA, 1, 0),
			R(128 * KiB, 64 * KiB, 0x40000, RUN_DATA, 1, 0),
			R(192 * KiB, 320 * KiB, 192 * KiB, RUN_DATA, 2, 0),
			R(512 * KiB, 64 * KiB, 0, RUN_ZERO, 0, 0),
			R(576 * KiB, 448 * KiB, 576 * KiB, RUN_DATA, 2, 0),
			R(1 * MiB, 1 * MiB, 0, RUN_UNALLOC, 2, RUN_F_PAST_BACKING),
		},
		.nruns = 7,
		.read_only = true,
		.golden =
			"# vm_L1_cipher uuid=QCOW2-INT-ID-vm_L1_cipher hidden ro\n"
			"0 128 zero \n"
			"128 128 linear {loop:/img/mid.qcow} 256\n"
			"256 128 linear {loop:/img/mid.qcow} 512\n"
			"384 3712 zero \n"
			"# vm_L1_crypt uuid=QCOW2-INT-ID-vm_L1_crypt hidden ro\n"
			"0 4096 crypt aes-cbc-plain64 :16:logon:qcowsetup:vm:L1 0 /dev/mapper/vm_L1_cipher 0\n"
			"# vm_crypt uuid=QCOW2-INT-ID-vm_crypt hidden ro\n"
			"0 2048 crypt aes-xts-plain64 :64:logon:qcowsetup:vm:L0 0 {loop:/img/top.qcow2} 0\n"
			"# vm uuid=QCOW2-ID-vm ro\n"
			"0 128 linear /dev/mapper/vm_crypt 1024\n"
			"128 256 linear /dev/mapper/vm_L1_crypt 128\n"
			"384 640 linear {loop:/img/base.raw} 384\n"
			"1024 128 zero \n"
			"1152 896 linear {loop:/img/base.raw} 1152\n"
			"2048 2048 zero \n",
	},
	{
		.what = "plain data beyond the end of its file reads as zeros",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 1 * MiB, 0x58000, "/img/t.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50000, RUN_DATA, 0, 0),
			R(64 * KiB, 960 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 2,
		.golden =
			"# vm uuid=QCOW2-ID-vm\n"
			"0 64 linear {loop:/img/t.qcow2} 640\n"
			"64 1984 zero \n",
	},
	{
		.what = "compressed clusters refused with their number",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 1 * MiB, 1 * MiB, "/img/c.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50123, RUN_COMPRESSED, 0, 0),
			R(64 * KiB, 64 * KiB, 0x50800, RUN_COMPRESSED, 0, 0),
			R(128 * KiB, 64 * KiB, 0x60000, RUN_DATA, 0, 0),
			R(192 * KiB, 64 * KiB, 0x51000, RUN_COMPRESSED, 0, 0),
			R(256 * KiB, 768 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 5,
		.rc = -ENOTSUP,
		.message = "3 compressed clusters",
	},
	{
		.what = "misaligned guest run refused",
		.layers = { { IMG_FMT_RAW, IMG_CRYPT_NONE, 1000, 1000, "/img/odd.raw" } },
		.nlayers = 1,
		.runs = { R(0, 1000, 0, RUN_DATA, 0, 0) },
		.nruns = 1,
		.rc = -EUCLEAN,
		.message = "not aligned to 512 bytes",
	},
	{
		.what = "misaligned host offset refused",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 1 * MiB, 1 * MiB, "/img/m.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50100, RUN_DATA, 0, 0),
			R(64 * KiB, 960 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 2,
		.rc = -EUCLEAN,
		.message = "host offset 327936",
	},
	{
		.what = "misaligned run past a raw backing file of odd size refused",
		.layers = {
			{ IMG_FMT_QCOW2, IMG_CRYPT_NONE, 1 * MiB, 1 * MiB, "/img/top.qcow2" },
			{ IMG_FMT_RAW, IMG_CRYPT_NONE, 1000, 1000, "/img/odd.raw" },
		},
		.nlayers = 2,
		.runs = {
			R(0, 1000, 0, RUN_DATA, 1, 0),
			R(1000, 1 * MiB - 1000, 0, RUN_UNALLOC, 1, RUN_F_PAST_BACKING),
		},
		.nruns = 2,
		.rc = -EUCLEAN,
		.message = "not aligned",
	},
	{
		.what = "LUKS data beyond the end of the file refused",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 1 * MiB, 0x58000, "/img/lt.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50000, RUN_DATA, 0, 0),
			R(64 * KiB, 960 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 2,
		.rc = -EUCLEAN,
		.message = "beyond the end of its file",
	},
	{
		.what = "data in a partial last sector refused",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 1 * MiB, 0x58000 + 100, "/img/p.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 64 * KiB, 0x50000, RUN_DATA, 0, 0),
			R(64 * KiB, 960 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 2,
		.rc = -EUCLEAN,
		.message = "partial sector",
	},
	{
		.what = "runs not covering the image refused",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 2 * MiB, 1 * MiB, "/img/a.qcow2" } },
		.nlayers = 1,
		.runs = { R(0, 1 * MiB, 0, RUN_UNALLOC, 0, 0) },
		.nruns = 1,
		.rc = -EINVAL,
		.message = "cover",
	},
	{
		.what = "unknown encryption method refused",
		.layers = { { IMG_FMT_QCOW2, 7, 1 * MiB, 1 * MiB, "/img/x.qcow2" } },
		.nlayers = 1,
		.runs = { R(0, 1 * MiB, 0, RUN_UNALLOC, 0, 0) },
		.nruns = 1,
		.rc = -ENOTSUP,
		.message = "unknown encryption method 7",
	},
	{
		.what = "tiny max_targets: top split into segments (one-target segments stay inline)",
		.layers = { { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 24 * KiB, 1 * MiB, "/img/a.qcow2" } },
		.nlayers = 1,
		.runs = {
			R(0, 4 * KiB, 0x10000, RUN_DATA, 0, 0),
			R(4 * KiB, 4 * KiB, 0, RUN_ZERO, 0, 0),
			R(8 * KiB, 4 * KiB, 0x30000, RUN_DATA, 0, 0),
			R(12 * KiB, 4 * KiB, 0x20000, RUN_DATA, 0, 0),
			R(16 * KiB, 8 * KiB, 0, RUN_UNALLOC, 0, 0),
		},
		.nruns = 5,
		.max_targets = 2,
		.golden =
			"# vm_s1 uuid=QCOW2-INT-ID-vm_s1 hidden\n"
			"0 8 zero \n"
			"8 8 linear {loop:/img/a.qcow2} 384\n"
			"# vm_s2 uuid=QCOW2-INT-ID-vm_s2 hidden\n"
			"0 8 linear {loop:/img/a.qcow2} 256\n"
			"8 16 zero \n"
			"# vm_ss1 uuid=QCOW2-INT-ID-vm_ss1 hidden\n"
			"0 16 linear /dev/mapper/vm_s1 0\n"
			"16 24 linear /dev/mapper/vm_s2 0\n"
			"# vm uuid=QCOW2-ID-vm\n"
			"0 8 linear {loop:/img/a.qcow2} 128\n"
			"8 40 linear /dev/mapper/vm_ss1 0\n",
	},
};

static void run_golden_case(const struct golden_case *gc)
{
	struct dm_stack_params p = {
		.name = "vm", .id = "ID",
		.read_only = gc->read_only, .allow_discards = gc->allow_discards,
		.max_targets = gc->max_targets,
	};
	struct dm_stack *s = NULL;
	struct run_list runs;
	struct chain c;
	int r;

	chain_init(&c, gc->layers, gc->nlayers);
	p.layers = c.lp;
	p.nlayers = c.n;
	runs_set(&runs, gc->runs, gc->nruns);
	last_err[0] = '\0';
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	CHECK(r == gc->rc, "%s: returns %d (want %d)", gc->what, r, gc->rc);
	if (gc->message)
		CHECK(strstr(last_err, gc->message) != NULL, "%s: message \"%s\" has \"%s\"",
		      gc->what, last_err, gc->message);
	if (!r) {
		const char *bad = check_invariants(&c, s, gc->max_targets ? gc->max_targets : DM_MAX_TARGETS_DEFAULT, "vm");
		char *text = format_stack(s);

		CHECK(!bad, "%s: invariants (%s)", gc->what, bad ? bad : "ok");
		CHECK_EQ_U64(check_every_sector(&c, &runs, s, NULL, gc->what), 0, "sectors resolved as the runs say");
		if (gc->golden) {
			CHECK(text && !strcmp(text, gc->golden), "%s: golden table", gc->what);
			if (text && strcmp(text, gc->golden))
				printf("# got:\n%s# want:\n%s", text, gc->golden);
		}
		free(text);
	} else {
		CHECK(s == NULL, "%s: no stack on error", gc->what);
	}
	dm_stack_free(s);
	run_list_free(&runs);
}

/* ---- parameters and names ---- */

static void test_params(void)
{
	struct layer_spec luks = { IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 1 * MiB, 1 * MiB, "/img/l.qcow2" };
	struct run run = R(0, 1 * MiB, 0, RUN_UNALLOC, 0, 0);
	struct dm_stack_params p = { .name = "vm", .id = "ID" };
	char longname[200], buf[DM_PARAMS_MAX];
	struct dm_stack *s = NULL;
	struct run_list runs;
	struct chain c;
	char *text;
	int r;

	chain_init(&c, &luks, 1);
	p.layers = c.lp;
	p.nlayers = 1;
	runs_set(&runs, &run, 1);

	p.name = "a/b";
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL && !s, "name with '/' refused");
	p.name = "a b";
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "name with a space refused");
	p.name = "";
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "empty name refused");

	/* NAME itself fits, but NAME_crypt does not */
	memset(longname, 'x', 122);
	longname[122] = '\0';
	p.name = longname;
	p.id = "I";
	last_err[0] = '\0';
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	CHECK(r == -ENAMETOOLONG && strstr(last_err, "_crypt is too long"), "NAME_crypt over 127 characters refused (%d: %s)", r, last_err);
	p.id = "0123456789";
	c.img[0].crypt_method = IMG_CRYPT_NONE;
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	CHECK(r == -ENAMETOOLONG && strstr(last_err, "UUID"), "UUID over 128 characters refused (%d: %s)", r, last_err);
	c.img[0].crypt_method = IMG_CRYPT_LUKS;
	p.name = "vm";
	p.id = "ID";

	c.lp[0].cipher = NULL;
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "LUKS layer without cipher refused");
	c.lp[0].cipher = "aes-xts-plain64";
	c.lp[0].host_dev = NULL;
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "encrypted layer without host device refused");
	c.lp[0].host_dev = "7:3";
	c.lp[0].key_desc = "nocolon";
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "logon key description without prefix refused");
	c.lp[0].key_desc = "cryptsetup:custom-d0";
	p.max_targets = 1;
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "max_targets 1 refused");
	p.max_targets = 0;
	p.nlayers = 0;
	CHECK(dm_stack_build(&p, &c.img[0], &runs, &s) == -EINVAL, "too few layer parameters refused");
	p.nlayers = 1;

	/* an encrypted layer with no data still gets its crypt device; refs set
	 * by the caller show up in the tables that follow */
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	CHECK(r == 0 && s->count == 2, "LUKS layer without data: crypt device and top (%d)", r);
	if (!r) {
		CHECK(dm_stack_set_ref(s, 0, "253:7") == 0, "set ref");
		CHECK(dm_stack_set_ref(s, 0, "253 7") == -EINVAL, "ref with a space refused");
		CHECK(dm_stack_set_ref(s, 5, "253:7") == -EINVAL, "ref of a missing device refused");
		text = format_stack(s);
		CHECK(text && !strcmp(text,
			"# vm_crypt uuid=QCOW2-INT-ID-vm_crypt hidden\n"
			"0 2048 crypt aes-xts-plain64 :64:logon:cryptsetup:custom-d0 0 7:3 0\n"
			"# vm uuid=QCOW2-ID-vm\n"
			"0 2048 zero \n"), "custom key description, major:minor host");
		free(text);
		r = dm_target_params(s, &s->devices[0], &s->devices[0].targets[0], buf, 10);
		CHECK(r == -ENOSPC, "params into a small buffer: -ENOSPC");
		r = dm_target_params(s, &s->devices[0], &s->devices[0].targets[0], buf, sizeof(buf));
		CHECK(r > 0 && (size_t)r == strlen(buf) && !strstr(buf, "253:7"), "params: %s", buf);
	}
	dm_stack_free(s);
	s = NULL;

	/* the ref of a lower device is used by the tables above it */
	c.lp[0].key_desc = NULL;
	run = (struct run)R(0, 1 * MiB, 0, RUN_DATA, 0, 0);
	run_list_free(&runs);
	runs_set(&runs, &run, 1);
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	CHECK(r == 0, "LUKS whole-file data");
	if (!r) {
		dm_stack_set_ref(s, 0, "253:7");
		r = dm_target_params(s, dm_stack_top(s), &dm_stack_top(s)->targets[0], buf, sizeof(buf));
		CHECK(r > 0 && !strcmp(buf, "253:7 0"), "top refers to the crypt device as 253:7: %s", buf);
	}
	dm_stack_free(s);
	run_list_free(&runs);

	r = dm_image_id("d6e9c5a0-1b1e-4c5e-9d43-0a1b2c3d4e5f", "/img/l.qcow2", buf, sizeof(buf));
	CHECK(r == 0 && !strcmp(buf, "d6e9c5a0-1b1e-4c5e-9d43-0a1b2c3d4e5f"), "image id: LUKS UUID");
	r = dm_image_id(NULL, "/img/a.qcow2", buf, sizeof(buf));
	CHECK(r == 0 && strlen(buf) == 16 && strspn(buf, "0123456789abcdef") == 16, "image id: path hash %s", buf);
	r = dm_image_id("", "/img/a.qcow2", longname, sizeof(longname));
	CHECK(r == 0 && !strcmp(buf, longname), "image id: stable");
	r = dm_image_id(NULL, "/img/b.qcow2", longname, sizeof(longname));
	CHECK(r == 0 && strcmp(buf, longname), "image id: differs per path");
	CHECK(dm_image_id("a b", NULL, buf, sizeof(buf)) == -EINVAL, "image id: bad LUKS UUID and no path refused");
	r = dm_image_id("../../x\nSYSTEMD_WANTS=y", "/img/a.qcow2", buf, sizeof(buf));
	CHECK(r == 0 && strlen(buf) == 16 && !strchr(buf, '/') && !strchr(buf, '\n'),
	      "image id: a LUKS UUID that is not one gives the path hash (%s)", buf);
	r = dm_key_description("vm", 2, buf, sizeof(buf));
	CHECK(r == 0 && !strcmp(buf, "qcowsetup:vm:L2"), "default key description %s", buf);
	CHECK(dm_key_description("vm", 2, buf, 8) == -ENAMETOOLONG, "key description too long");
}

/* ---- random fragmented chains, with and without segments ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* runs over [0, guest) in 4 KiB clusters, random kinds and layers; data at
 * random host clusters (run lengths up to 4 clusters, some host-contiguous
 * neighbours so that merging happens) */
static void random_runs(const struct chain *c, uint64_t guest, struct run_list *out)
{
	const uint64_t cl = 4 * KiB;
	uint64_t host_next[MAX_LAYERS] = { 0 };

	run_list_init(out);
	for (uint64_t g = 0; g < guest;) {
		struct run r = { .guest = g };
		uint64_t n = 1 + rng() % 4;

		if (g + n * cl > guest)
			n = (guest - g) / cl;
		r.len = n * cl;
		r.depth = (uint8_t)(rng() % c->n);
		switch (rng() % 6) {
		case 0:
			r.kind = RUN_ZERO;
			break;
		case 1:
			r.kind = RUN_UNALLOC;
			break;
		default:
			r.kind = RUN_DATA;
			if (c->img[r.depth].format == IMG_FMT_RAW) {
				r.host = g;	/* raw: identity */
			} else if (rng() % 3 == 0) {
				r.host = host_next[r.depth];	/* continues the layer's last data */
			} else {
				uint64_t clusters = c->img[r.depth].data_io.size / cl;

				r.host = (rng() % (clusters - n + 1)) * cl;
			}
			if (r.host + r.len > c->img[r.depth].data_io.size)
				r.host = c->img[r.depth].data_io.size - r.len;
			host_next[r.depth] = r.host + r.len;
			break;
		}
		/* as image_map_chain would give them: merged */
		run_list_add(out, &r);
		g += r.len;
	}
}

static void test_segments(void)
{
	static const struct layer_spec specs[][MAX_LAYERS] = {
		{
			{ IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 2 * MiB, 2 * MiB, "/img/top.qcow2" },
			{ IMG_FMT_QCOW, IMG_CRYPT_AES, 2 * MiB, 2 * MiB, "/img/mid.qcow" },
			{ IMG_FMT_RAW, IMG_CRYPT_NONE, 2 * MiB, 2 * MiB, "/img/base.raw" },
		},
		{
			{ IMG_FMT_QCOW, IMG_CRYPT_AES, 2 * MiB, 1 * MiB, "/img/a.qcow" },
			{ IMG_FMT_QCOW2, IMG_CRYPT_NONE, 2 * MiB, 1 * MiB, "/img/b.qcow2" },
			{ IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 2 * MiB, 1 * MiB, "/img/c.qcow2" },
		},
		{
			{ IMG_FMT_QCOW2, IMG_CRYPT_NONE, 2 * MiB, 4 * MiB, "/img/plain.qcow2" },
		},
	};
	static const unsigned int nlayers[] = { 3, 3, 1 };
	static const size_t maxes[] = { 2, 3, 7, 50, 1000 };

	for (size_t sc = 0; sc < ARRAY_SIZE(specs); sc++) {
		struct dm_stack_params p = { .name = "vm", .id = "ID" };
		struct dm_stack *flat = NULL;
		struct run_list runs;
		struct chain c;
		int r;

		chain_init(&c, specs[sc], nlayers[sc]);
		p.layers = c.lp;
		p.nlayers = c.n;
		random_runs(&c, 2 * MiB, &runs);
		r = dm_stack_build(&p, &c.img[0], &runs, &flat);
		CHECK(r == 0, "chain %zu: %zu runs, unsegmented", sc, runs.count);
		if (r) {
			run_list_free(&runs);
			continue;
		}
		CHECK(flat->devices[flat->count - 1].count <= runs.count,
		      "chain %zu: top table has %zu targets for %zu runs", sc, flat->devices[flat->count - 1].count, runs.count);
		CHECK_EQ_U64(check_every_sector(&c, &runs, flat, NULL, "unsegmented"), 0, "unsegmented: every sector where the runs say");
		{
			const char *bad = check_invariants(&c, flat, DM_MAX_TARGETS_DEFAULT, "vm");

			CHECK(!bad, "chain %zu unsegmented: invariants (%s)", sc, bad ? bad : "ok");
		}

		for (size_t m = 0; m < ARRAY_SIZE(maxes); m++) {
			struct dm_stack *seg = NULL;
			const char *bad;
			size_t nseg = 0, ncipherseg = 0;

			p.max_targets = maxes[m];
			r = dm_stack_build(&p, &c.img[0], &runs, &seg);
			CHECK(r == 0, "chain %zu, max_targets %zu: built", sc, maxes[m]);
			if (r)
				continue;
			bad = check_invariants(&c, seg, maxes[m], "vm");
			CHECK(!bad, "chain %zu, max_targets %zu: %zu devices, invariants (%s)", sc, maxes[m], seg->count, bad ? bad : "ok");
			for (size_t i = 0; i < seg->count; i++) {
				nseg += seg->devices[i].role == DM_ROLE_SEGMENT;
				ncipherseg += seg->devices[i].role == DM_ROLE_CIPHER_SEGMENT;
			}
			if (maxes[m] < 50) {
				CHECK(nseg > 0, "chain %zu, max_targets %zu: %zu top segments", sc, maxes[m], nseg);
				if (c.img[0].crypt_method == IMG_CRYPT_AES || (c.n > 1 && c.img[1].crypt_method == IMG_CRYPT_AES))
					CHECK(ncipherseg > 0, "chain %zu, max_targets %zu: %zu cipher segments", sc, maxes[m], ncipherseg);
			}
			CHECK_EQ_U64(check_every_sector(&c, &runs, seg, flat, "segmented"), 0,
				     "segmented: every sector where the runs and the unsegmented stack say");
			dm_stack_free(seg);
		}
		dm_stack_free(flat);
		run_list_free(&runs);
	}
}

/* ---- a million runs stay cheap ---- */

static void test_large(void)
{
	struct layer_spec spec = { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 0, 0, "/img/big.qcow2" };
	const size_t nruns = 1000000;
	const uint64_t cl = 64 * KiB;
	struct dm_stack_params p = { .name = "big", .id = "ID" };
	struct dm_stack *s = NULL;
	struct run_list runs;
	struct chain c;
	struct timespec t0, t1;
	size_t targets = 0, top_segments = 0;
	int r;

	spec.size = nruns * cl;
	spec.file_size = nruns * cl;
	chain_init(&c, &spec, 1);
	p.layers = c.lp;
	p.nlayers = 1;
	run_list_init(&runs);
	/* every other cluster allocated, in reverse host order: nothing merges */
	for (size_t i = 0; i < nruns; i++) {
		struct run run = { .guest = i * cl, .len = cl, .kind = i % 2 ? RUN_UNALLOC : RUN_DATA,
				   .host = (nruns - 1 - i) * cl };
		run_list_add(&runs, &run);
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	CHECK(r == 0, "1,000,000 runs: built in %.3f s",
	      (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	if (!r) {
		for (size_t i = 0; i < s->count; i++) {
			targets += s->devices[i].count;
			top_segments += s->devices[i].role == DM_ROLE_SEGMENT;
		}
		CHECK(top_segments == 16 && dm_stack_top(s)->count == 16,
		      "1,000,000 targets in %zu segments of at most %d", top_segments, DM_MAX_TARGETS_DEFAULT);
		CHECK_EQ_U64(targets, nruns + 16, "targets in all tables");
		CHECK(!check_invariants(&c, s, DM_MAX_TARGETS_DEFAULT, "big"), "invariants");
		{
			struct place pl = resolve_top(s, (777777 * cl) / 512 + 5), want = expected_place(&c, &runs, (777777 * cl) / 512 + 5);
			struct place pl2 = resolve_top(s, (888888 * cl) / 512 + 1), want2 = expected_place(&c, &runs, (888888 * cl) / 512 + 1);

			CHECK(place_eq(&pl, &want) && place_eq(&pl2, &want2), "sampled sectors resolve");
		}
	}
	dm_stack_free(s);
	run_list_free(&runs);
}

/* Read-write with a slow path: a one-sector read-only device holds each
 * unencrypted layer's host device (the encrypted one's crypt device holds
 * it); read-only or without a slow path: none. */
static void test_hold(void)
{
	static const struct layer_spec spec[] = {
		{ IMG_FMT_QCOW2, IMG_CRYPT_NONE, 1 * MiB, 1 * MiB, "/img/top.qcow2" },
		{ IMG_FMT_QCOW2, IMG_CRYPT_LUKS, 1 * MiB, 1 * MiB, "/img/mid.qcow2" },
		{ IMG_FMT_RAW, IMG_CRYPT_NONE, 1 * MiB, 1 * MiB, "/img/base.raw" },
	};
	static const char *const want[] = { "vm_L2_hold", "vm_L1_crypt", "vm_hold", "vm_fast", "vm" };
	struct run run = R(0, 1 * MiB, 0, RUN_UNALLOC, 0, 0);
	struct dm_stack_params p = { .name = "vm", .id = "ID", .slow_dev = "{nbd}" };
	struct dm_stack *s = NULL;
	struct run_list runs;
	struct chain c;
	bool ok;
	int r;

	chain_init(&c, spec, 3);
	p.layers = c.lp;
	p.nlayers = c.n;
	runs_set(&runs, &run, 1);
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	ok = r == 0 && s->count == ARRAY_SIZE(want);
	for (size_t i = 0; ok && i < ARRAY_SIZE(want); i++)
		ok = !strcmp(s->devices[i].name, want[i]);
	CHECK(ok, "read-write: a hold device under each unencrypted layer");
	if (ok) {
		char params[DM_PARAMS_MAX];
		const struct dm_device *h = &s->devices[2];

		CHECK(h->role == DM_ROLE_HOLD && h->read_only && h->hidden && h->sectors == 1 && h->count == 1 &&
		      dm_target_params(s, h, &h->targets[0], params, sizeof(params)) > 0 &&
		      !strcmp(params, "{loop:/img/top.qcow2} 0"), "the hold device: one read-only sector, hidden");
	}
	dm_stack_free(s);
	s = NULL;
	p.read_only = true;
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	CHECK(r == 0 && s->count == 2, "read-only: no hold device");
	dm_stack_free(s);
	run_list_free(&runs);
}

/* Runs of n pieces of a region (DM_SWITCH_REGION_MIN) each: w[i] 1
 * writable data, 2 data not writable, 3 writable but for its last 64 KiB
 * cluster (unallocated), 0 unallocated. */
static void switch_runs(struct run_list *runs, const uint8_t *w, size_t n)
{
	const uint64_t rs = DM_SWITCH_REGION_MIN;

	run_list_init(runs);
	for (size_t i = 0; i < n; i++) {
		struct run run = { .guest = i * rs, .len = rs, .kind = w[i] ? RUN_DATA : RUN_UNALLOC,
				   .host = w[i] ? (i + 1) * rs : 0, .flags = w[i] == 1 || w[i] == 3 ? RUN_F_WRITABLE : 0 };
		struct run hole = { .guest = (i + 1) * rs - 64 * KiB, .len = 64 * KiB, .kind = RUN_UNALLOC };

		if (w[i] == 3)
			run.len -= 64 * KiB;
		run_list_add(runs, &run);
		if (w[i] == 3)
			run_list_add(runs, &hole);
	}
}

/* Read-write with a slow path: the top is a switch over the fast device
 * (the table the top has otherwise) and the slow path; a region goes to
 * path 0 when any of it is on the fast path; the messages route
 * every region, or those that changed, in hex with repeats. */
static void test_switch(void)
{
	const uint64_t rsec = DM_SWITCH_REGION_MIN / 512;
	struct layer_spec spec = { IMG_FMT_QCOW2, IMG_CRYPT_NONE, 64 * DM_SWITCH_REGION_MIN, 128 * DM_SWITCH_REGION_MIN,
				   "/img/w.qcow2" };
	struct dm_stack_params p = { .name = "vm", .id = "ID", .slow_dev = "43:0" };
	uint8_t w[64] = { 1, 1, 1, 1, 0, 1, 3 };
	char want[128];
	struct dm_stack *s = NULL, *s2 = NULL;
	struct run_list runs;
	struct chain c;
	char params[DM_PARAMS_MAX], msg[256];
	size_t total = 0, count = 0;
	uint64_t pos = 0;
	int r, n;

	chain_init(&c, &spec, 1);
	p.layers = c.lp;
	p.nlayers = 1;
	switch_runs(&runs, w, 64);
	r = dm_stack_build(&p, &c.img[0], &runs, &s);
	run_list_free(&runs);
	CHECK(r == 0 && s->count == 3 && !strcmp(s->devices[1].name, "vm_fast") &&
	      s->devices[1].role == DM_ROLE_FAST && s->devices[1].hidden && dm_is_top_device(&s->devices[1]),
	      "read-write with a slow path: vm_fast under the top");
	if (r)
		goto out;
	dm_stack_set_ref(s, 1, "253:7");
	snprintf(want, sizeof(want), "2 %" PRIu64 " 0 253:7 0 43:0 0", rsec);
	CHECK(s->devices[2].count == 2 && s->devices[2].targets[0].len == 63 * rsec &&
	      dm_target_params(s, &s->devices[2], &s->devices[2].targets[0], params, sizeof(params)) > 0 &&
	      !strcmp(params, want) && s->devices[2].sectors == 64 * rsec,
	      "the top: a switch target, regions of DM_SWITCH_REGION_MIN, fast device and slow path (%s)", params);
	snprintf(want, sizeof(want), "253:7 %" PRIu64, 63 * rsec);
	CHECK(s->devices[2].targets[1].type == DM_TARGET_LINEAR && s->devices[2].targets[1].start == 63 * rsec &&
	      dm_target_params(s, &s->devices[2], &s->devices[2].targets[1], params, sizeof(params)) > 0 &&
	      !strcmp(params, want), "and the last region linear onto the fast device, for flushes (%s)", params);
	CHECK(s->nregions == 64 && dm_stack_region_fast(s, 0) && dm_stack_region_fast(s, 3) &&
	      !dm_stack_region_fast(s, 4) && dm_stack_region_fast(s, 5) && dm_stack_region_fast(s, 6) &&
	      !dm_stack_region_fast(s, 7),
	      "regions with any of the fast path are fast (one part slow too), those all slow not");
	n = dm_switch_message(s, NULL, DM_ROUTE_ALL, &pos, msg, sizeof(msg));
	CHECK(n > 0 && !strcmp(msg, "set_region_mappings 0:0 R1,3 :1 :0 R1,1 :1 R1,37") && pos == 63,
	      "every region routed: %s", n > 0 ? msg : "none");
	CHECK(dm_switch_message(s, NULL, DM_ROUTE_ALL, &pos, msg, sizeof(msg)) == 0, "and no more");
	/* region 7 part written: it joins the fast path; 1 and 2 left it */
	w[7] = 3;
	w[1] = w[2] = 2;
	switch_runs(&runs, w, 64);
	r = dm_stack_build(&p, &c.img[0], &runs, &s2);
	run_list_free(&runs);
	CHECK(r == 0, "rebuilt");
	if (r)
		goto out;
	pos = 0;
	n = dm_switch_message(s2, s, DM_ROUTE_TO_SLOW, &pos, msg, sizeof(msg));
	CHECK(n > 0 && !strcmp(msg, "set_region_mappings 1:1 R1,1"), "leaving the fast path: %s", n > 0 ? msg : "none");
	pos = 0;
	n = dm_switch_message(s2, s, DM_ROUTE_TO_FAST, &pos, msg, sizeof(msg));
	CHECK(n > 0 && !strcmp(msg, "set_region_mappings 7:0"), "joining it: %s", n > 0 ? msg : "none");
	/* around a swap of the fast device: the regions part fast (6) leave
	 * it first, and come back after it with those joining (7) */
	CHECK(dm_stack_region_part(s, 6) && !dm_stack_region_part(s, 5) && !dm_stack_region_part(s, 4),
	      "region 6 part fast, 5 all fast, 4 all slow");
	pos = 0;
	n = dm_switch_message(s, NULL, DM_ROUTE_PART_TO_SLOW, &pos, msg, sizeof(msg));
	CHECK(n > 0 && !strcmp(msg, "set_region_mappings 6:1") && pos == 63, "the part fast ones drained: %s",
	      n > 0 ? msg : "none");
	pos = 0;
	n = dm_switch_message(s2, s, DM_ROUTE_BACK_TO_FAST, &pos, msg, sizeof(msg));
	CHECK(n > 0 && !strcmp(msg, "set_region_mappings 6:0 R1,1"), "and back with the new ones: %s",
	      n > 0 ? msg : "none");
	/* 4 MiB of alternating regions: the messages split */
	for (size_t i = 0; i < 64; i++)
		w[i] = 1 + i % 2;
	switch_runs(&runs, w, 64);
	dm_stack_free(s2);
	s2 = NULL;
	r = dm_stack_build(&p, &c.img[0], &runs, &s2);
	run_list_free(&runs);
	for (pos = 0; !r && (n = dm_switch_message(s2, NULL, DM_ROUTE_ALL, &pos, msg, 128)) > 0; count++)
		total += (size_t)n < 128 && !strncmp(msg, "set_region_mappings ", 20) && msg[20] != ':';
	CHECK(!r && count > 1 && total == count && pos == 63,
	      "alternating regions: %zu messages under 128 bytes, each with its first index", count);
	/* 2^24 regions at most: 4 regions of DM_SWITCH_REGION_MIN in one */
	{
		uint64_t size = (1ULL << 26) * DM_SWITCH_REGION_MIN;
		struct layer_spec big = { IMG_FMT_QCOW2, IMG_CRYPT_NONE, size, 1 * MiB, "/img/big.qcow2" };
		struct run run = { .guest = 0, .len = size, .kind = RUN_UNALLOC };

		dm_stack_free(s2);
		s2 = NULL;
		chain_init(&c, &big, 1);
		p.layers = c.lp;
		run_list_init(&runs);
		run_list_add(&runs, &run);
		r = dm_stack_build(&p, &c.img[0], &runs, &s2);
		run_list_free(&runs);
		CHECK(!r && s2->region_sectors == 4 * rsec && s2->nregions == (1 << 24),
		      "a huge image: %" PRIu64 " regions of %" PRIu64 " sectors",
		      r ? 0 : s2->nregions, r ? 0 : s2->region_sectors);
	}
out:
	dm_stack_free(s);
	dm_stack_free(s2);
}

static void test_segment_names(void)
{
	CHECK(dm_is_segment_name("vm1_s0", "vm1") && dm_is_segment_name("vm1_s12", "vm1") &&
	      dm_is_segment_name("vm1_ss3", "vm1"), "segment names of vm1 are recognised");
	CHECK(dm_is_daemon_device_name("vm1_fast", "vm1") && dm_is_daemon_device_name("vm1_s2_g3", "vm1") &&
	      !dm_is_daemon_device_name("vm1_fast", "vm") && !dm_is_daemon_device_name("vm1_crypt", "vm1"),
	      "the daemon's devices: segments and NAME_fast");
	CHECK(!dm_is_segment_name("vm1_crypt", "vm1") && !dm_is_segment_name("vm1_s", "vm1") &&
	      !dm_is_segment_name("vm1_sx1", "vm1") && !dm_is_segment_name("vm1_s1", "vm") &&
	      !dm_is_segment_name("vm1", "vm1") && !dm_is_segment_name("vm1_L1_crypt", "vm1"),
	      "and nothing else (crypt devices, other mappings, bare prefixes)");
}

static void test_segment_generations(void)
{
	uint32_t gen = 99;

	CHECK(dm_segment_generation("vm1_s3", "vm1", &gen) && gen == 0, "vm1_s3: generation 0");
	CHECK(dm_segment_generation("vm1_ss12_g7", "vm1", &gen) && gen == 7 && dm_is_segment_name("vm1_ss12_g7", "vm1"),
	      "vm1_ss12_g7: generation 7, a segment");
	CHECK(dm_segment_generation("vm1_s0_g99999999999", "vm1", &gen) && gen == UINT32_MAX, "a huge generation saturates");
	CHECK(!dm_is_segment_name("vm1_s3_g", "vm1") && !dm_is_segment_name("vm1_s3_x1", "vm1") &&
	      !dm_is_segment_name("vm1_s3_g1x", "vm1") && !dm_is_segment_name("vm1_s_g1", "vm1") &&
	      !dm_is_segment_name("vm1_s3_g1_crypt", "vm1"),
	      "and no other suffix");
}

/* dev's targets as `dmsetup table` prints them (references by name) */
static void device_text(const struct dm_stack *s, const struct dm_device *d, char *buf, size_t size)
{
	size_t n = 0;

	buf[0] = '\0';
	for (size_t k = 0; k < d->count && n < size; k++) {
		char params[DM_PARAMS_MAX];

		dm_target_params(s, d, &d->targets[k], params, sizeof(params));
		n += (size_t)snprintf(buf + n, size - n, "%" PRIu64 " %" PRIu64 " %s %s\n", d->targets[k].start,
				      d->targets[k].len, dm_target_type_name((enum dm_target_type)d->targets[k].type), params);
	}
}

/* One round of the daemon's remapping: runs built (split where prev was,
 * or balanced without it) and named against prev in generation gen.
 * Counts the segments made anew; every other one must be prev's device of
 * that name, with the same table. */
static struct dm_stack *remap_build(struct dm_stack_params *p, const struct chain *c, const struct run_list *runs,
				    const struct dm_stack *prev, bool stable, uint32_t gen, size_t *made)
{
	static char a[1 << 16], b[1 << 16];
	struct dm_stack *s = NULL;
	int r;

	p->prev = stable ? prev : NULL;
	r = dm_stack_build(p, &c->img[0], runs, &s);
	if (!r)
		r = dm_stack_name_segments(p, s, prev, gen);
	CHECK(r == 0, "generation %" PRIu32 " built and named (%s)", gen, stable ? "split kept" : "balanced");
	if (r) {
		dm_stack_free(s);
		return NULL;
	}
	for (size_t i = 0; i < s->count; i++) {
		const struct dm_device *d = &s->devices[i];
		uint32_t g;

		if (d->role != DM_ROLE_SEGMENT)
			continue;
		if (!dm_segment_generation(d->name, "vm", &g) || g == gen) {
			(*made)++;
			continue;
		}
		for (size_t j = 0; prev && j < prev->count; j++)
			if (!strcmp(prev->devices[j].name, d->name)) {
				device_text(s, d, a, sizeof(a));
				device_text(prev, &prev->devices[j], b, sizeof(b));
				g = strcmp(a, b) ? UINT32_MAX : gen;
			}
		if (g != gen) {
			CHECK(0, "generation %" PRIu32 ": %s kept its name but not its table (or came from nowhere)", gen,
			      d->name);
			break;
		}
	}
	return s;
}

/* Clusters written one by one into a table split into segments: a round
 * makes new segments only where its table changed, the rest keep their
 * names; the names of a round never clash, the content is the runs'. */
static void test_remap_generations(void)
{
	const uint64_t cl = 64 * KiB;
	const size_t nclusters = 512, rounds = 40, max = 8;
	struct layer_spec spec = { IMG_FMT_QCOW2, IMG_CRYPT_NONE, nclusters * 64 * KiB, 2 * nclusters * 64 * KiB,
				   "/img/w.qcow2" };
	struct dm_stack_params p = { .name = "vm", .id = "ID", .max_targets = max };
	struct dm_stack *cur[2] = { NULL, NULL };
	size_t made[2] = { 0, 0 }, nseg = 0;
	uint8_t kind[512];
	struct chain c;
	bool ok = true;

	chain_init(&c, &spec, 1);
	p.layers = c.lp;
	p.nlayers = 1;
	/* a cluster with data, two unallocated (zeros), and again: a write
	 * makes a target more or none */
	for (size_t i = 0; i < nclusters; i++)
		kind[i] = i % 3 ? RUN_UNALLOC : RUN_DATA;
	for (uint32_t gen = 0; gen <= rounds && ok; gen++) {
		struct run_list runs;

		if (gen) {
			size_t i;

			/* an unallocated cluster written (at a host cluster of its own) */
			do
				i = (size_t)(rng() % nclusters);
			while (kind[i] != RUN_UNALLOC);
			kind[i] = RUN_DATA;
		}
		run_list_init(&runs);
		for (size_t i = 0; i < nclusters; i++) {
			struct run run = { .guest = i * cl, .len = cl, .kind = kind[i], .host = (2 * nclusters - 1 - i) * cl };

			run_list_add(&runs, &run);
		}
		for (int st = 0; st < 2 && ok; st++) {
			size_t before = made[st];
			struct dm_stack *s = remap_build(&p, &c, &runs, cur[st], st == 1, gen, &made[st]);
			const char *bad;

			ok = s != NULL;
			if (!ok)
				break;
			bad = check_invariants(&c, s, max, "vm");
			if (bad || check_every_sector(&c, &runs, s, NULL, "remapped")) {
				CHECK(0, "generation %" PRIu32 ": invariants (%s) and content", gen, bad ? bad : "ok");
				ok = false;
			}
			if (!gen) {
				made[st] = 0;
				nseg = before = 0;
				for (size_t i = 0; i < s->count; i++)
					nseg += s->devices[i].role == DM_ROLE_SEGMENT;
			} else if (st == 1 && made[st] - before > 2 * s->nsplit) {
				CHECK(0, "generation %" PRIu32 ": %zu segments made anew (%u levels)", gen, made[st] - before,
				      s->nsplit);
				ok = false;
			}
			dm_stack_free(cur[st]);
			cur[st] = s;
		}
		run_list_free(&runs);
	}
	CHECK(ok, "%zu clusters written one by one, %zu segments at first: %zu segments made anew with the split kept, %zu balanced",
	      rounds, nseg, made[1], made[0]);
	CHECK(made[1] * 4 < made[0], "keeping the split makes far fewer segments");
	dm_stack_free(cur[0]);
	dm_stack_free(cur[1]);
}

int main(void)
{
	qs_log_set_callback(capture_log, NULL);
	for (size_t i = 0; i < ARRAY_SIZE(golden_cases); i++)
		run_golden_case(&golden_cases[i]);
	test_params();
	test_segments();
	test_large();
	test_hold();
	test_switch();
	test_segment_names();
	test_segment_generations();
	test_remap_generations();
	return tap_done();
}
