/* The files a slow-path daemon keeps under /run/qcowsetup for the command
 * line: NAME.daemon (its pid, NBD index and arguments, for `status` and
 * `reattach`) and NAME.stats (its table-swap statistics, for `status`), and
 * NAME.lock while a command works on the mapping. The one place their names
 * are made. */
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

/* One open, close or reattach of a mapping NAME at a time: an exclusive
 * flock on QS_RUN_DIR/NAME.lock, waited for while another qcowsetup holds
 * it, held for the whole transaction, the file removed on release (so
 * nothing stays behind). Returns the descriptor or -errno (-EINVAL: not a
 * usable name). */
int qs_name_lock(const char *name);
void qs_name_unlock(const char *name, int fd);

#endif
