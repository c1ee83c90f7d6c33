/* qcowsetup check IMAGE [--json]: refcount consistency, as qemu-img check
 * (without repair), with qemu-img's output and exit codes.
 *
 * Exit codes of `check` (qemu-img check's, which differ from the other
 * commands' in 2 and 3):
 *   0   no errors were found
 *   1   wrong parameters, or the check could not complete (read errors,
 *       unreadable refcounts, out of memory, file too large): "Check failed"
 *   2   corruptions were found (references above refcounts, bad entries,
 *       OFLAG_COPIED errors): data may be corrupted
 *   3   leaked clusters only: waste of space, no harm to data
 *   4   the image is missing, unreadable or too malformed to be opened
 *   63  the format has no refcounts to check (raw, qcow v1)
 * It returns them (its command table entry has exit_help). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "json.h"
#include "log.h"
#include "qcowsetup.h"

#define CHECK_EXIT_FAILED	1
#define CHECK_EXIT_CORRUPT	2
#define CHECK_EXIT_LEAKS	3
#define CHECK_EXIT_UNSUPPORTED	63

const char cmd_check_exit_help[] =
	"Exit codes of check (as qemu-img check): 0 no errors, 1 wrong parameters or check failed,\n"
	"2 corruptions found, 3 leaked clusters only, 4 image missing or malformed,\n"
	"63 format without refcounts (raw, qcow v1).\n";

/* Keys and order of qemu-img check --output=json; zero counters are left out
 * as qemu-img does, check-errors is always there. */
static void print_json(const char *filename, const struct qcow2_check_result *res)
{
	struct json j;

	json_init(&j, stdout, true);
	json_begin_object(&j, NULL);
	if (res->image_end_offset)
		json_u64(&j, "image-end-offset", res->image_end_offset);
	if (res->total_clusters)
		json_u64(&j, "total-clusters", res->total_clusters);
	json_u64(&j, "check-errors", res->check_errors);
	if (res->allocated_clusters)
		json_u64(&j, "allocated-clusters", res->allocated_clusters);
	json_string(&j, "filename", filename);
	json_string(&j, "format", "qcow2");
	if (res->leaks)
		json_u64(&j, "leaks", res->leaks);
	if (res->corruptions)
		json_u64(&j, "corruptions", res->corruptions);
	if (res->fragmented_clusters)
		json_u64(&j, "fragmented-clusters", res->fragmented_clusters);
	if (res->compressed_clusters)
		json_u64(&j, "compressed-clusters", res->compressed_clusters);
	json_end_object(&j);
	json_finish(&j);
}

static void print_human(const struct qcow2_check_result *res)
{
	if (!res->corruptions && !res->leaks && !res->check_errors) {
		printf("No errors were found on the image.\n");
	} else {
		if (res->corruptions)
			printf("\n%" PRIu64 " errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       res->corruptions);
		if (res->leaks)
			printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       res->leaks);
		if (res->check_errors)
			printf("\n%" PRIu64 " internal errors have occurred during the check.\n", res->check_errors);
	}
	if (res->total_clusters && res->allocated_clusters)
		printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
		       res->allocated_clusters, res->total_clusters,
		       res->allocated_clusters * 100.0 / res->total_clusters,
		       res->fragmented_clusters * 100.0 / res->allocated_clusters,
		       res->compressed_clusters * 100.0 / res->allocated_clusters);
	if (res->image_end_offset)
		printf("Image end offset: %" PRIu64 "\n", res->image_end_offset);
}

int cmd_check(int argc, char **argv)
{
	struct qcow2_check_result res;
	struct image *img = NULL;
	enum img_format fmt;
	int r;

	(void)argc;
	r = tools_open_image(argv[0], TOOLS_OPEN_NO_BACKING, &img);
	if (r < 0) {
		/* -ENOMEM and -EACCES would read as "leaks" and "corruptions" */
		return r == -EINVAL || r == -ENOMEM ? CHECK_EXIT_FAILED : EXIT_DEVICE;
	}
	fmt = img->format;
	if (fmt != IMG_FMT_QCOW2) {
		tools_close_image(img);
		log_err("%s: this image format (%s) does not support checks: it has no refcounts.", argv[0],
			image_format_name(fmt));
		return CHECK_EXIT_UNSUPPORTED;
	}
	r = qcow2_check(img, &res);
	tools_close_image(img);
	if (r < 0) {
		log_err("Check failed: %s", strerror(-r));
		return CHECK_EXIT_FAILED;
	}
	if (opt.json)
		print_json(argv[0], &res);
	else
		print_human(&res);
	if (res.check_errors) {
		log_err("Check failed");
		return CHECK_EXIT_FAILED;
	}
	return res.corruptions ? CHECK_EXIT_CORRUPT : res.leaks ? CHECK_EXIT_LEAKS : EXIT_OK;
}
