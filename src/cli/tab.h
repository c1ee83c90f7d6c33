/* qcowtab for the qcowsetup command (cmd_tab.c): loading the file and
 * finding the devices its entries name. */
#ifndef QS_CLI_TAB_H
#define QS_CLI_TAB_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "qcowtab.h"

/* Read and parse --qcowtab FILE or /etc/qcowtab; problems in lines are
 * logged ("FILE:LINE: ...") and those lines left out. A missing file is an
 * empty table when missing_ok. Returns 0 or -errno. */
int tools_load_qcowtab(struct qcowtab *tab, bool missing_ok);
const char *tools_qcowtab_path(void);

/* The block device an image location names when it names one without
 * mounting anything (a path that is a block device, or TAG=VALUE without a
 * path): its path in dev and device number in *rdev. -ENODEV when it is not
 * present (or the location is a file), -errno otherwise. */
int tools_location_blockdev(const struct qcowtab_location *loc, char *dev, size_t size, dev_t *rdev);

/* Commands */
int cmd_open_tab(int argc, char **argv);
int cmd_close_tab(int argc, char **argv);

#endif
