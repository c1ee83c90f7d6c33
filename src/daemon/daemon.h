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
#include "sysutil.h"
#include "runs.h"

/* What one mapping's daemon keeps locked (see memlock.c): ~3 MiB at 64 KiB
 * clusters. */
#define DAEMON_REMAP_QUEUE	4096	/* new mappings between remap rounds (more: a rescan) */
/* Largest request (the daemon sets max_sectors_kb; the top device inherits
 * the smallest limit below it, and a loop device allows 1280 KiB anyway) */
#define DAEMON_BUF_SIZE		(1U << 20)
#define DAEMON_CACHE_BYTES	(1U << 20)	/* L2 tables and refcount blocks (at least 8 clusters) */
/* Each server thread's stack, locked (its deepest path, a logged error
 * from the writer, takes a few KiB), and its own buffer: requests larger
 * than that take turns with the one of DAEMON_BUF_SIZE. Two threads cost
 * what the one thread with a 256 KiB stack did, plus 128 KiB. */
#define DAEMON_STACK_SIZE	(128U << 10)
#define DAEMON_SERVER_BUF	(64U << 10)
#define DAEMON_MAX_LINKS	16	/* NBD connections (--nbd-connections) */
#define DAEMON_MAX_SERVERS	DAEMON_MAX_LINKS
/* Largest window of clusters mapped ahead of a sequential writer
 * (qcow2_rw_opts.ahead_max; unencrypted images in one file only) */
#define DAEMON_AHEAD_MAX	(32ULL << 20)
/* ... where its clusters are holes of the file: they cost no write and no
 * room until written (qcow2_rw_opts.ahead_fresh_max) */
#define DAEMON_AHEAD_FRESH_MAX	(256ULL << 20)

struct remap {
	uint64_t guest, len, host;
};

/* One connection of the NBD device (a socketpair, one hardware queue). */
struct daemon_link {
	int sock;		/* our end */
	pthread_mutex_t rx;	/* reading a request (and replacing sock) */
	pthread_mutex_t tx;	/* writing a reply (and replacing sock) */
	unsigned int gen;	/* sock replaced so often: a reply to a request
				 * of an older socket is dropped */
	bool done;		/* disconnected (result 0) or lost for good */
	int result;
};

/* One server thread: serves requests of its link, one at a time. */
struct daemon_server {
	struct daemon *d;
	struct daemon_link *link;
	uint8_t *buf;
	size_t buf_size;
	struct qcow2_rw_op *op;	/* its allocating write (read-write; may be NULL) */
	pthread_t thread;
	bool started;
	unsigned int busy;	/* serving a request now (atomic) */
	uint64_t served;	/* requests served (atomic) */
};

struct daemon {
	struct daemon_args o;	/* as started (daemon_state.h) */
	struct image *img;
	struct file_rw f;	/* the top image (read-write unless read-only), its data (the
				 * image, its data file, or the crypt device), and (f.chain)
				 * the backing chain or, read-only, the whole chain */
	struct dio_file layer[IMG_MAX_CHAIN_DEPTH];	/* backing layers' plaintext readers */
	int hold_fd[DAEMON_MAX_HOLDS];
	struct qcow2_rw *rw;	/* read-write: the top layer's metadata */
	struct qcow2_rw_ops ops;	/* rw's: the data moved outside the lock */
	struct chain_layer_io lio[IMG_MAX_CHAIN_DEPTH];

	/* everything below the engine lock: rw, chain (but chain_read_direct),
	 * the remap queue, nrunning */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_cond_t op_cond;	/* an op ended, or writes_paused was cleared */
	bool writes_paused;	/* no op may begin (daemon_writes_quiesce) */
	bool remap_sleeping;	/* the remap thread sleeps long: idle (remap.c) */
	pthread_t waker;	/* wakes the remap thread for a control connection (control.c) */
	bool waker_running;
	struct remap *queue, *queue_spare;
	size_t nqueue;
	bool queue_overflow;
	bool kicked;		/* the writer asked for a round (daemon_kick) */
	bool stopping;
	volatile bool quit;	/* setup failed: the server must not reconnect */
	volatile bool detached;	/* "detach": the socket shut down, a clean end */
	bool top_gone;		/* the top device went away (deferred close) */
	bool broken;		/* the metadata writer failed: no more writes,
				 * flushes or remaps (daemon_check_broken) */
	bool suspended;		/* `qcowsetup suspend`: no table swaps (main thread) */
	int ctl_fd;		/* the control socket (control.c), -1: none */
	ino_t ctl_ino;		/* its file (another daemon's after a commit) */

	/* the stack (remap thread, after setup) */
	struct dm_stack *stack;
	uint32_t seg_gen;	/* the newest generation of segment names */
	struct run_list runs;
	char slow_ref[32];
	unsigned int nrunning;	/* server threads still serving */
	int serve_result;	/* the servers', once stopping is set */
	uint64_t reloads, remapped_bytes;
	bool broken_shown;	/* the stats file says broken */
	/* how long I/O was held: suspend to resume of each device swapped, and
	 * whole reload rounds, in microseconds (the last 1024 of each); of each
	 * swap: the suspend alone (the drain of the I/O in flight), the wait
	 * for udev after the resume (I/O goes on), the requests the servers
	 * were serving and the bytes waiting on the sockets when it began, the
	 * requests served while the device was suspended, the drain before
	 * it of the slow requests of regions part fast (remap.c, drain_part:
	 * I/O goes on; 0 when none); the messages that route the switch's
	 * regions after a swap (route_us) */
	uint32_t swap_us[1024], round_us[1024], route_us[1024];
	uint32_t suspend_us[1024], udev_us[1024], busy_at[1024], queued_at[1024], served_in[1024], drain_us[1024];
	uint64_t nswap, nround, nroute;
	/* the top's switch routes regions as the stack says only after a
	 * whole route (remap.c, route): none since its table was loaded, or
	 * a message failed */
	bool route_all;
	/* when rounds are made (remap.c, round_due): pieces of the layer's own
	 * clusters the servers read or wrote in place (atomic: traffic the fast
	 * path takes once those clusters are remapped), and of the remap
	 * thread: when the ranges waiting were first queued, the end and
	 * length of the last swap, the counters at the last round */
	uint64_t slow_data;
	uint64_t queued_since_us, swap_end_us, last_held_us, data_mark, served_mark;

	int nbd_index;
	struct daemon_link links[DAEMON_MAX_LINKS];
	unsigned int nlinks;
	struct daemon_server servers[DAEMON_MAX_SERVERS];
	unsigned int nservers;
	int guard_pipe;		/* to the guardian: "B" on a clean exit; -1: none */
	pid_t guard_pid;
	pthread_mutex_t buf_lock;	/* buf: requests larger than a server's own */
	uint8_t *buf;		/* DAEMON_BUF_SIZE */
	char backend[DM_MAPPING_NAME_MAX + 16];	/* "qcowsetup:NAME" */
};

/* main.c */
void daemon_log_ready(void);
/* The NBD device passes discards (on: its queue's discard_max_bytes back
 * to the hardware limit) or none (0): the TRIM its export offers is fixed
 * at connect (NBD_CMD_RECONFIGURE leaves the server flags alone), so a
 * writable export offers it and this limit decides whether the block
 * layer sends any. Tables loaded over the device afterwards take it. A
 * read-only mapping: nothing to do. 0 or -errno (logged). */
int daemon_nbd_discards(struct daemon *d, bool on);

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

/* server.c: the server threads (max(nlinks, 2), their buffers and
 * stacks), serving every link until NBD_CMD_DISC, or until it is lost and
 * cannot be restored; the last one to end sets stopping and serve_result
 * (0: a disconnect, -ECONNRESET). start: 0 or -errno (some may run: stop
 * them). stop: make them end (setup failed) and join them; join: wait. */
int daemon_servers_start(struct daemon *d);
/* Shut every link's socket down (its server's read ends): how many were,
 * *err the first failure (0: none). */
unsigned int daemon_links_shutdown(struct daemon *d, int *err);
void daemon_servers_stop(struct daemon *d);
/* Requests the servers are serving now, and (served) all they served. */
unsigned int daemon_servers_busy(struct daemon *d, uint64_t *served);
/* Bytes of requests waiting on the links' sockets, not read yet. */
uint32_t daemon_links_queued(struct daemon *d);
/* Under the engine lock: wait until no allocating write is in flight and
 * let none begin (a resize), then let them go again. */
void daemon_writes_quiesce(struct daemon *d);
/* Under the engine lock: the writer has metadata to write back, so the
 * remap thread's idle sleep ends (remap.c). */
void daemon_remap_wake(struct daemon *d);
void daemon_writes_resume(struct daemon *d);
void daemon_servers_join(struct daemon *d);
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
/* The stack rebuilt from the image (its size too) and applied: 0 or -errno. */
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
