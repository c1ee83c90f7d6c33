/* qcowsetup-daemon: the slow path of one mapping (see main.c). */
#ifndef QS_DAEMON_H
#define QS_DAEMON_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "chain.h"
#include "daemon_state.h"
#include "dmtable.h"
#include "fileio.h"
#include "image.h"
#include "qcow2_rw.h"
#include "runs.h"

/* What one mapping's daemon keeps locked (see memlock.c): ~3 MiB at 64 KiB
 * clusters. */
#define DAEMON_REMAP_QUEUE	4096	/* new mappings between remap rounds (more: a rescan) */
/* Largest request (the daemon sets max_sectors_kb; the top device inherits
 * the smallest limit below it, and a loop device allows 1280 KiB anyway) */
#define DAEMON_BUF_SIZE		(1U << 20)
#define DAEMON_CACHE_BYTES	(1U << 20)	/* L2 tables and refcount blocks (at least 8 clusters) */
#define DAEMON_STACK_SIZE	(256U << 10)	/* the server thread's, locked */
/* Largest window of clusters mapped ahead of a sequential writer
 * (qcow2_rw_opts.ahead_max; unencrypted images in one file only) */
#define DAEMON_AHEAD_MAX	(32ULL << 20)

struct remap {
	uint64_t guest, len, host;
};

struct daemon {
	struct daemon_args o;	/* as started (daemon_state.h) */
	struct image *img;
	struct file_rw f;	/* the top image (read-write unless read-only), its data (the
				 * image, its data file, or the crypt device), and (f.chain)
				 * the backing chain or, read-only, the whole chain */
	int layer_fd[IMG_MAX_CHAIN_DEPTH];	/* backing layers' plaintext readers */
	int hold_fd[DAEMON_MAX_HOLDS];
	struct qcow2_rw *rw;	/* read-write: the top layer's metadata */
	struct chain_layer_io lio[IMG_MAX_CHAIN_DEPTH];

	/* everything below the engine lock: rw, chain, the remap queue */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct remap *queue, *queue_spare;
	size_t nqueue;
	bool queue_overflow;
	bool stopping;
	volatile bool quit;	/* setup failed: the server must not reconnect */
	bool top_gone;		/* the top device went away (deferred close) */
	bool broken;		/* the metadata writer failed: no more writes,
				 * flushes or remaps (daemon_check_broken) */
	bool suspended;		/* `qcowsetup suspend`: no table swaps (main thread) */
	int ctl_fd;		/* the control socket (control.c), -1: none */

	/* the stack (remap thread, after setup) */
	struct dm_stack *stack;
	struct run_list runs;
	char slow_ref[32];
	pthread_t server_thread;
	bool server_started;
	int serve_result;	/* daemon_serve's, once stopping is set */
	uint64_t reloads, remapped_bytes;
	bool broken_shown;	/* the stats file says broken */
	/* how long I/O was held: suspend to resume of each device swapped, and
	 * whole reload rounds, in microseconds (the last 1024 of each) */
	uint32_t swap_us[1024], round_us[1024];
	uint64_t nswap, nround;

	int nbd_index;
	int sock;		/* our end of the socketpair */
	int guard_pipe;		/* to the guardian: "B" on a clean exit; -1: none */
	pid_t guard_pid;
	uint8_t *buf;
	char backend[DM_MAPPING_NAME_MAX + 16];	/* "qcowsetup:NAME" */
};

/* main.c */
void daemon_log_ready(void);

/* memlock.c: malloc's settings (before any allocation or thread); the lock
 * of what the I/O path needs, once the mapping is up (0 or -errno); a
 * stack for a thread, every page present (size bytes above a guard page,
 * NULL: no memory); the main thread's stack touched depth bytes down. */
void daemon_memory_setup(void);
int daemon_lock_resident(void);
/* The guardian's: all of it when its files may sit on a mapping (it
 * resumes suspended devices), else nothing (0 or -errno). */
int daemon_lock_guardian(void);
void *daemon_alloc_stack(size_t size);
void daemon_prefault_stack(size_t depth);

/* server.c: serve the socket until NBD_CMD_DISC (0), or the connection is
 * lost and cannot be restored (-ECONNRESET). */
int daemon_serve(struct daemon *d);
/* With the engine lock held, after the writer worked: set broken (and log
 * it, once) when a metadata write or flush failed. */
void daemon_check_broken(struct daemon *d);

/* remap.c: build the stack, create (or, reattached, reload) the top
 * devices; then, until the server stops, move new clusters to the fast
 * path. Main thread only (libdevmapper is not thread-safe). */
int daemon_stack_setup(struct daemon *d);
void daemon_remap_loop(struct daemon *d);
/* After a deferred close: remove what is left of the mapping. */
void daemon_remove_leftovers(struct daemon *d);
/* The guardian's job once its daemon died: resume the mapping's suspended
 * top and segment devices (a kill between suspend and resume). */
void daemon_resume_suspended(const char *name, const char *id);
/* Reload the top device and its segments with the tables they have (so
 * that they take the limits of the devices under them): 0 or -errno. */
int daemon_reload_top(struct daemon *d);
/* The stack rebuilt from the image (its size too) and applied: 0 or -errno
 * (-ERANGE: segments would change). */
int daemon_reload_all(struct daemon *d);
void daemon_mapped(void *opaque, uint64_t guest, uint64_t len, uint64_t host);	/* qcow2_rw_ops.mapped */
void daemon_kick(void *opaque);	/* qcow2_rw_ops.kick: a round now */

/* control.c: the control socket (src/lib/control.h), main thread only.
 * open: 0 or -errno (logged; the daemon serves without it). poll: answer
 * the requests waiting, without blocking for new ones. */
int daemon_control_open(struct daemon *d);
void daemon_control_poll(struct daemon *d);
void daemon_control_close(struct daemon *d);

/* resize.c: resize the mapping to size_arg (bytes; +N, -N relative),
 * smaller only with shrink; fail_step K > 0: step K fails (tests). 0 with
 * the size in *new_size, or -errno (logged): -EROFS read-only mapping,
 * -EBUSY suspended, -EINVAL, -ENOKEY (LUKS: the crypt device must first
 * cover *new_size bytes, which takes its key), and qcow2_rw_resize's.
 * Main thread only. */
int daemon_resize(struct daemon *d, const char *size_arg, bool shrink, int fail_step, uint64_t *new_size);

#endif
