/* The qcowsetup command: exit codes, helpers, the commands (the options:
 * options.h). */
#ifndef QS_CLI_H
#define QS_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "image.h"
#include "io.h"
#include "options.h"

/* Exit codes, as cryptsetup's */
#define EXIT_OK		0
#define EXIT_PARAMS	1	/* wrong parameters */
#define EXIT_PERM	2	/* no permission or bad passphrase */
#define EXIT_NOMEM	3	/* out of memory */
#define EXIT_DEVICE	4	/* wrong device or image: missing, malformed, unsupported */
#define EXIT_BUSY	5	/* device busy or already exists */

/* -errno -> exit code */
int tools_exit_code(int r);

/* Opening the images named on the command line under the trust rules and
 * --format, --snapshot, --trust-names, --backing-file, --data-file
 * (utils_image.c; lib/fileio.h has img_io over descriptors). */
#define TOOLS_OPEN_NO_BACKING	(1U << 0)	/* not the backing chain */
#define TOOLS_OPEN_WRITE	(1U << 1)	/* the top image and its data file read-write */
int tools_open_image(const char *path, unsigned int flags, struct image **img);
void tools_close_image(struct image *img);

/* Commands */
int cmd_info(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_table(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_open(int argc, char **argv);
int cmd_close(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_reattach(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_suspend(int argc, char **argv);
int cmd_resume(int argc, char **argv);
int cmd_refresh(int argc, char **argv);
int cmd_commit(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_open_tab(int argc, char **argv);	/* cmd_tab.c */
int cmd_close_tab(int argc, char **argv);
int cmd_probe(int argc, char **argv);		/* cmd_probe.c */
extern const char cmd_check_exit_help[];	/* cmd_check.c */

#endif
