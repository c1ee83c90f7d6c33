/* What passes between qcowsetup and its slow-path daemon, in one place:
 *   - the daemon's arguments (struct daemon_args): made into an argv by the
 *     mapping code (open, reattach), parsed back by the daemon;
 *   - the files under /run/qcowsetup: NAME.daemon (the daemon's pid, NBD
 *     index and arguments, for `status` and `reattach`), NAME.stats (its
 *     table-swap statistics, for `status`), NAME.suspended while `qcowsetup
 *     suspend` holds the mapping, NAME.ctl (the daemon's control socket,
 *     control.h), NAME.lock while a command works on the mapping. */
#ifndef QS_DAEMON_STATE_H
#define QS_DAEMON_STATE_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "dmtable.h"
#include "fileio.h"
#include "image.h"

#define QS_RUN_DIR "/run/qcowsetup"

enum qs_state_file {
	QS_STATE_DAEMON,
	QS_STATE_STATS,
	QS_STATE_SUSPENDED,	/* `qcowsetup suspend` made it: the guardian leaves the
				 * devices suspended (qs_state_remove keeps it) */
};

/* QS_RUN_DIR/NAME.daemon, .stats or .suspended into buf. */
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

/* ---- the daemon's arguments ---- */

#define DAEMON_ARGV0		"@qcowsetup-daemon"	/* systemd's storage-daemon mark */
#define DAEMON_MAX_HOLDS	(2 * IMG_MAX_CHAIN_DEPTH)
#define DAEMON_MAX_ARGS		(48 + 4 * IMG_MAX_CHAIN_DEPTH)

struct daemon_layer {
	char host[64];			/* "7:3": how tables refer to the layer's data device */
	char cipher[DM_CIPHER_MAX + 1];	/* encrypted layers, else "" */
	unsigned int key_size;
};

struct daemon_args {
	/* the mapping (kept in NAME.daemon for reattach) */
	char name[DM_MAPPING_NAME_MAX + 1];
	char id[DM_IMAGE_ID_MAX];	/* image identifier of the UUIDs (dm_image_id) */
	char image[PATH_MAX];		/* absolute path of the top image, as named */
	bool trust_names;		/* the open's trust (trust.h) and overrides */
	char backing_file[PATH_MAX];	/* "" when none */
	char data_file[PATH_MAX];
	bool read_only;
	bool allow_discards;
	uint64_t max_targets;
	struct daemon_layer layers[IMG_MAX_CHAIN_DEPTH];
	unsigned int nlayers;
	char holds[DAEMON_MAX_HOLDS][32];	/* loop devices to keep open, "7:3" */
	unsigned int nholds;
	uint64_t keep_size;		/* never truncate the image file below this */
	uint64_t used_end;		/* the top image's qcow2_used_end as open found it
					 * (this start only: reattach computes it); 0: unknown */
	unsigned int nbd_timeout;	/* seconds */
	unsigned int flush_interval_ms;	/* write back metadata (and remap) this often */
	unsigned int nbd_connections;	/* of the NBD device (reattach: as many as it has) */
	bool debug;
	/* this start only */
	struct file_given given[DAEMON_MAX_HOLDS];	/* the chain's files, open */
	unsigned int ngiven;
	int ready_fd;			/* "READY nbdN" or "ERROR errno" goes there; -1: none */
	int reattach;			/* NBD index to take over; -1: connect a new one */
	bool take_over;			/* load the tables of a top device that exists and
					 * resume it (snapshot, commit: NAME moves onto
					 * this image) */
	int guard_fd;			/* >= 0: run as the guardian, reading this pipe */
};

/* An argv: pointers into its own storage. */
struct daemon_argv {
	char *v[DAEMON_MAX_ARGS + 1];
	int n;
	char store[DAEMON_MAX_ARGS][PATH_MAX + 64];
};

/* Defaults: no descriptors, a new NBD device, 30 s timeout, 200 ms. */
void daemon_args_init(struct daemon_args *a);
/* a as an argv (argv[0] DAEMON_ARGV0); with persistent only, the arguments
 * worth keeping for a later start (not ready/reattach/guard). 0 or -E2BIG. */
int daemon_args_format(const struct daemon_args *a, bool persistent, struct daemon_argv *out);
/* Parse argv (as exec'd) into a. 0, or -EINVAL naming the argument. */
int daemon_args_parse(int argc, char **argv, struct daemon_args *a);

/* The parameters of the mapping's stack (dm_stack_build) from a, the slow
 * path on slow_dev; lp has IMG_MAX_CHAIN_DEPTH entries. */
void daemon_args_stack_params(const struct daemon_args *a, const char *slow_dev, struct dm_stack_params *p,
			      struct dm_layer_params *lp);

/* The daemon's state file: pid, NBD index and its persistent arguments.
 * Written by the daemon once it serves (atomically), read by status and
 * reattach. read: 0, -ENOENT, -EINVAL (not a state file). */
int qs_state_write(const struct daemon_args *a, pid_t pid, int nbd);
int qs_state_read(const char *name, pid_t *pid, int *nbd, struct daemon_args *a);

#endif
