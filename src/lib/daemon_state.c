/* The daemon's state files and the mapping locks (see daemon_state.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
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

static void lock_path(char *buf, size_t size, const char *name)
{
	snprintf(buf, size, QS_RUN_DIR "/%s.lock", name);
}

int qs_name_lock(const char *name)
{
	char path[4096];
	struct stat a, b;
	int fd;

	if (!*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
		return -EINVAL;
	if (mkdir(QS_RUN_DIR, 0700) < 0 && errno != EEXIST)
		return -errno;
	lock_path(path, sizeof(path), name);
	for (;;) {
		fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (fd < 0)
			return -errno;
		if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
			if (errno != EWOULDBLOCK) {
				int r = -errno;

				close(fd);
				return r;
			}
			log_verbose("Waiting for another qcowsetup working on %s.", name);
			while (flock(fd, LOCK_EX) < 0)
				if (errno != EINTR) {
					int r = -errno;

					close(fd);
					return r;
				}
		}
		/* the holder before us removed the file on release: lock the
		 * one that is there now */
		if (fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
			return fd;
		close(fd);
	}
}

void qs_name_unlock(const char *name, int fd)
{
	char path[4096];

	if (fd < 0)
		return;
	lock_path(path, sizeof(path), name);
	unlink(path);	/* while held: the next holder sees it gone and retries */
	close(fd);
}
