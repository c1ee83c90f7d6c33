/* The files a slow-path daemon keeps under /run/qcowsetup for the command
 * line: NAME.daemon (its pid, NBD index and arguments, for `status` and
 * `reattach`) and NAME.stats (its table-swap statistics, for `status`). The
 * one place their names are made. */
#ifndef QS_DAEMON_STATE_H
#define QS_DAEMON_STATE_H

#include <stddef.h>

#define QS_RUN_DIR "/run/qcowsetup"

enum qs_state_file {
	QS_STATE_DAEMON,
	QS_STATE_STATS,
};

/* QS_RUN_DIR/NAME.daemon or .stats into buf. */
void qs_state_path(char *buf, size_t size, const char *name, enum qs_state_file which);
/* Remove both (a clean exit, or what a killed daemon left). */
void qs_state_remove(const char *name);

#endif
