/* The daemon's state files (see daemon_state.h). */
#include <stdio.h>
#include <unistd.h>

#include "daemon_state.h"
#include "log.h"

void qs_state_path(char *buf, size_t size, const char *name, enum qs_state_file which)
{
	snprintf(buf, size, QS_RUN_DIR "/%s.%s", name, which == QS_STATE_STATS ? "stats" : "daemon");
}

void qs_state_remove(const char *name)
{
	static const enum qs_state_file files[] = { QS_STATE_DAEMON, QS_STATE_STATS };
	char path[4096];

	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		qs_state_path(path, sizeof(path), name, files[i]);
		if (unlink(path) == 0)
			log_dbg("removed %s", path);
	}
}
