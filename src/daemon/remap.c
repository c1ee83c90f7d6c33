/* The device stack of the mapping, and its reloads as clusters move to the
 * fast path.
 *
 * Read-write, the top device NAME is a switch over two paths (dmtable.h):
 * NAME_fast, whose table is the fast path of each cluster that has one and
 * the NBD device for the rest, and the NBD device itself (its last region
 * linear onto NAME_fast: dm-switch takes no flush, that target does, and
 * sends it through NAME_fast to every device under it). Both paths are
 * right for every region; the routing only decides the speed: a region
 * with any cluster on the fast path goes to NAME_fast (one all fast may
 * never come: copy-on-write and LUKS allocate a cluster at a time), the
 * others, all slow, straight to the NBD device (route: "set_region_mappings"
 * messages to the top's live table). So a round reloads NAME_fast, whose
 * suspend waits for fast-path I/O alone: the regions part fast are routed
 * straight to the NBD device first, and their slow requests in flight
 * through NAME_fast complete while nothing is held (drain_part; up to
 * 100 ms, then the suspend waits for the rest); they come back after the
 * swap. It waits for slow requests only while the routing is not whole
 * (after the top's own load, which routes region i to path i % 2, or a
 * failed message), never for those of the regions all slow, and never
 * suspends the top. The top is reloaded only
 * when its paths change: at setup (new mapping, reattach), by a resize
 * (its size) and by `refresh` (as it is); each time its regions are all
 * routed again after its resume.
 *
 * Every flush_interval the remap thread, holding the engine lock, writes the
 * cached metadata back (qcow2_rw_writeback: what a new cluster needs becomes
 * durable); the guest ranges that became writable in place wait in a queue
 * for a round. A swap holds the device's new I/O until every request in
 * flight on it completed; a swap of the top (and of NAME_fast while the
 * routing is not whole) waits for slow-path requests too, which the servers
 * serve one after the other: so a round is made (round_due) when the slow
 * path is idle (no request in service or waiting on the sockets, waited for
 * a few ms), or when it pays for its hold: the writer asks for one (clusters
 * mapped ahead of a sequential writer), the slow path serves clusters it
 * would move to the fast path (at most every second, and at most 5% of the
 * time held), the queue fills up, or a range waited 30 s. Ranges written
 * once and never again (a guest filling an image) wait for an idle moment.
 * A round, without the lock, takes the queue, patches its copy of the runs,
 * rebuilds the stack (dm_stack_build, the same function as `open`), and
 * when NAME_fast's table changed: loads the new table into the inactive
 * slot (the live table keeps serving), suspends (noflush, no filesystem
 * freeze) and resumes it, then routes the regions that joined the fast
 * path to it and those that left it to the NBD device (after the swap: a
 * region that leaves was all fast-path I/O until then, and a flush reaches
 * the NBD device through NAME_fast once its table names it). A
 * table split into segment devices (--max-targets) is never changed under
 * a live parent: a segment whose table changes gets a new name (a
 * generation, NAME_s<k>_g<n>, dm_stack_name_segments) and so does every
 * segment above it, up to NAME_fast; the round creates those beside the
 * live ones (the deepest level first; nothing uses them yet), loads
 * NAME_fast's new table, swaps it once, and removes the segments it no
 * longer names. A failure removes the new devices and leaves the live
 * stack as it was (the routing is made whole at the next round). A resize
 * goes the same way (a new segment is made at its new size; none changes
 * size under a parent), then swaps the top; and so does a reattach (every
 * segment made anew, in a generation newer than the live ones).
 *
 * Why a reload never deadlocks on the I/O the daemon serves:
 *   - a suspend, noflush or not, waits for the bios in flight on the device
 *     to complete (dm __dm_suspend -> dm_wait_for_completion); some of them
 *     may be NBD requests that only this daemon completes. The server threads
 *     keep serving them during the suspend: they never wait for the remap
 *     thread except on the engine lock, which the remap thread never holds
 *     across a device-mapper call (among themselves, on the locks of a
 *     connection and of the large buffer, held only by servers that wait
 *     for nothing else but the engine lock). New I/O to the suspended device queues
 *     inside device-mapper and goes on after the resume; a message to the
 *     top's switch waits for no I/O;
 *   - noflush + skip lockfs: no filesystem freeze (whose writeback would go
 *     through the suspended device) and no pushback of I/O;
 *   - the daemon never does I/O to a device it suspends (it writes data
 *     through the crypt device or the file, never through the top device,
 *     NAME_fast or the segments; those two are the only devices suspended,
 *     segments are created, with no I/O yet, and removed once unused);
 *   - no module is loaded between a suspend and its resume (a module load
 *     runs modprobe, which reads the root filesystem, maybe this mapping):
 *     dm-switch is loaded by `open` and again at setup (daemon_stack_setup),
 *     before any suspend;
 *   - memory: the daemon is mlocked and PR_SET_IO_FLUSHER, so reclaim in
 *     either thread never waits for writeback to the device being
 *     suspended; libdevmapper's own buffers are allocated before the
 *     suspend (the table is loaded first);
 *   - with udev, the resume waits for udev's event processing, which may
 *     read the device: those reads reach the server threads, which are free.
 * Every intermediate state is correct: a cluster that has just become
 * writable reads the same through the NBD device (the daemon reads the
 * new cluster) as through the fast path, so NAME_fast may switch at any
 * round and the top route a region either way at any moment, and a failed
 * reload or message only leaves clusters on the slow path.
 *
 * Idle (nothing queued, nothing to write back, no round asked for, for
 * IDLE_AFTER ticks) the remap thread sleeps IDLE_WAIT_MS between ticks: a
 * host's hundred idle mappings would otherwise wake 500 times a second,
 * and under emulation (TCG) take a third of a CPU, which every open and
 * close then waits for. A write through the writer wakes it (server.c
 * calls daemon_remap_wake once the write's metadata is cached), and so do the ranges a guest's flush
 * queued (daemon_mapped), a control connection (control.c's waker), a
 * kick and the stop; metadata made dirty without a write (a cluster of
 * zeros) is written back at the next tick, or by the guest's flush. A top
 * device removed by a deferred close is seen at the next tick (watch_top:
 * every second awake, every IDLE_WAIT_MS idle).
 *
 * A sequential writer on the fast path is unseen here, and used to be seen
 * only at the end of the window mapped ahead of it, where its writes went
 * to the slow path until the next round. Where the window came from holes
 * of the image file, its first write there makes data: while such a window
 * waits (qcow2_rw_ahead_probe), the tick is PROBE_WAIT_MS and each tick asks
 * the writer to look (qcow2_rw_ahead_poll), which maps the next window and
 * kicks a round, so the writer stays on the fast path. A window not
 * reached in PROBE_TICKS ticks (suspended ones too) is left to the slow
 * path to announce. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "daemon_state.h"
#include "dm.h"
#include "log.h"
#include "nbd.h"
#include "sysutil.h"
#include "util.h"

/* ---- the stack ---- */

/* Build the stack for runs, its changed segments named in generation gen
 * (cur: the live stack, NULL: none); devices that exist get their real
 * references. */
static int build(struct daemon *d, const struct image *img, const struct run_list *runs, const struct dm_stack *cur,
		 uint32_t gen, struct dm_stack **out)
{
	struct dm_layer_params lp[IMG_MAX_CHAIN_DEPTH] = { 0 };
	struct dm_stack_params p;
	struct dm_stack *s;
	char ref[32];
	int r;

	daemon_args_stack_params(&d->o, d->slow_ref, &p, lp);
	p.prev = cur;
	r = dm_stack_build(&p, img, runs, &s);
	if (r)
		return r;
	r = dm_stack_name_segments(&p, s, cur, gen);
	if (r)
		goto fail;
	for (size_t i = 0; i < s->count; i++) {
		struct dm_dev_info info;

		r = dm_device_info(s->devices[i].name, &info);
		if (r)
			goto fail;
		if (!info.exists)
			continue;
		snprintf(ref, sizeof(ref), "%u:%u", info.major, info.minor);
		r = dm_stack_set_ref(s, i, ref);
		if (r)
			goto fail;
	}
	*out = s;
	return 0;
fail:
	dm_stack_free(s);
	return r;
}

static const struct dm_device *find_device(const struct dm_stack *s, const char *name)
{
	for (size_t i = 0; s && i < s->count; i++)
		if (!strcmp(s->devices[i].name, name))
			return &s->devices[i];
	return NULL;
}

static int create(struct dm_stack *s, size_t i)
{
	return dm_create_stack_device(s, i, true, NULL);
}

static int load(const struct dm_stack *s, size_t i)
{
	const struct dm_device *dev = &s->devices[i];
	struct dm_stack_table_iter it;
	struct dm_table t;
	int r;

	dm_stack_table(s, dev, &it, &t);
	r = dm_load_table(dev->name, dev->read_only, &t);

	if (r)
		log_err("Cannot load a new table into %s: %s.", dev->name, strerror(-r));
	return r;
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* p50, p99 and max of the last samples, in ms */
static void percentiles(const uint32_t *v, uint64_t n, double *p50, double *p99, double *max)
{
	uint32_t s[1024];
	size_t k = (size_t)MIN(n, (uint64_t)1024);

	*p50 = *p99 = *max = 0;
	if (!k)
		return;
	memcpy(s, v, k * sizeof(*s));
	qsort(s, k, sizeof(*s), cmp_u32);
	*p50 = s[k / 2] / 1000.0;
	*p99 = s[(k * 99) / 100 < k ? (k * 99) / 100 : k - 1] / 1000.0;
	*max = s[k - 1] / 1000.0;
}

/* /run/qcowsetup/NAME.stats: what `qcowsetup status` shows of the daemon */
static void write_stats(struct daemon *d)
{
	static const struct {
		const char *key;
		size_t off;
		double unit;
	} series[] = {
		{ "held_ms", offsetof(struct daemon, swap_us), 1 },
		{ "round_ms", offsetof(struct daemon, round_us), 1 },
		{ "suspend_ms", offsetof(struct daemon, suspend_us), 1 },
		{ "udev_wait_ms", offsetof(struct daemon, udev_us), 1 },
		{ "busy_at_suspend", offsetof(struct daemon, busy_at), 1000 },
		{ "queued_kib_at_suspend", offsetof(struct daemon, queued_at), 1000.0 / 1024 },
		{ "served_in_hold", offsetof(struct daemon, served_in), 1000 },
		{ "route_ms", offsetof(struct daemon, route_us), 1 },
		{ "drain_ms", offsetof(struct daemon, drain_us), 1 },
	};
	char path[256], tmp[280];
	FILE *f;

	qs_state_path(path, sizeof(path), d->o.name, QS_STATE_STATS);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "we");
	if (!f)
		return;
	fprintf(f, "reloads=%" PRIu64 "\nremapped_bytes=%" PRIu64 "\n", d->reloads, d->remapped_bytes);
	if (d->rw) {
		/* the writer's counters since the daemon started */
		struct qcow2_rw_stats w;

		pthread_mutex_lock(&d->lock);
		qcow2_rw_get_stats(d->rw, &w);
		pthread_mutex_unlock(&d->lock);
		fprintf(f,
			"clusters_allocated=%" PRIu64 "\ncow_clusters=%" PRIu64 "\nahead_clusters=%" PRIu64
			"\nahead_windows=%" PRIu64 "\nahead_polled=%" PRIu64 "\nzero_skipped=%" PRIu64
			"\nahead_released=%" PRIu64 "\nwritebacks=%" PRIu64 "\nflushes=%" PRIu64 "\n",
			w.clusters_allocated, w.cow_clusters, w.ahead_clusters, w.ahead_sparse_windows, w.ahead_polled,
			w.zero_skipped, w.ahead_released, w.writebacks, w.flushes);
	}
	for (size_t i = 0; i < ARRAY_SIZE(series); i++) {
		const uint32_t *v = (const uint32_t *)((const char *)d + series[i].off);
		double p50, p99, max;

		percentiles(v, v == d->round_us ? d->nround : v == d->route_us ? d->nroute : d->nswap, &p50, &p99,
			    &max);
		fprintf(f, "%s_p50=%.2f\n%s_p99=%.2f\n%s_max=%.2f\n", series[i].key, p50 * series[i].unit,
			series[i].key, p99 * series[i].unit, series[i].key, max * series[i].unit);
	}
	if (d->broken_shown)
		fprintf(f, "broken=1\n");
	if (fclose(f) == 0)
		rename(tmp, path);
	else
		unlink(tmp);
}

/* When rounds are made (round_due), in microseconds: a suspend waits for
 * every request in flight on the device, and those of the slow path are
 * served one after the other (allocations, copy-on-write: ~10 ms each
 * under TCG, so a queue of 16 random writes held I/O 180 ms). */
#define QUIET_WAIT_US	5000		/* for a slow path idle before a suspend */
#define DRAIN_WAIT_US	100000		/* for the slow requests of the regions part fast */
#define SWAP_NICE	-18		/* the remap thread's while it holds I/O (lvm2's) */
#define DEMAND_MIN_US	1000000		/* between rounds made for the traffic they move */
#define DEMAND_HELD_X	20		/* ... and 20x the last hold: at most 5% of the time held */
#define DEMAND_MIN	16		/* pieces of traffic a round would move ... */
#define DEMAND_SHARE	8		/* ... at least 1/8 of the requests served */
#define MAX_AGE_US	30000000	/* a range waits at most that long */
#define WATCH_US	1000000		/* the top checked for (watch_top), awake */
#define IDLE_AFTER	5		/* idle ticks before the long sleep */
#define IDLE_WAIT_MS	5000		/* the long sleep (and the top checked) */
#define PROBE_WAIT_MS	10		/* the tick while a window ahead waits for its writer */
#define PROBE_TICKS	100		/* ... at most that many ticks without it */


/* Whether no request is in service or waiting on the sockets, waiting for
 * that at most max_us: a suspend then drains only fast-path I/O. */
static bool slow_path_quiet(struct daemon *d, uint64_t max_us)
{
	uint64_t end = now_us() + max_us, served;

	for (;;) {
		if (!daemon_servers_busy(d, &served) && !daemon_links_queued(d))
			return true;
		if (now_us() >= end)
			return false;
		usleep(250);
	}
}

struct swap_clock {
	struct daemon *d;
	uint64_t resumed_us, served;
};

static void resumed(void *arg)
{
	struct swap_clock *c = arg;

	c->resumed_us = now_us();
	daemon_servers_busy(c->d, &c->served);
}

/* Swap the inactive table of dev in. I/O is held from the start of the
 * suspend to the end of the resume ioctl; udev's processing of the change
 * event, waited for after that, holds only this thread. The suspend waits
 * for the slow requests that pass the device too (of the top, or of the
 * fast device's regions part fast), so a few ms for a quiet slow path
 * first, unless they were drained (drain_part); those of the regions all
 * slow go past the fast device. */
static int swap(struct daemon *d, const struct dm_device *dev, bool drained)
{
	struct swap_clock c = { .d = d };
	uint64_t t0, t1, served0, k = d->nswap++ % 1024;
	int r, r2, nice;

	if (!drained) {
		d->drain_us[k] = 0;
		slow_path_quiet(d, QUIET_WAIT_US);
	}
	d->queued_at[k] = daemon_links_queued(d);
	d->busy_at[k] = daemon_servers_busy(d, &served0);
	nice = sys_thread_nice(SWAP_NICE);
	t0 = now_us();
	r = dm_suspend(dev->name, DM_SUSPEND_NOFLUSH | DM_SUSPEND_SKIP_LOCKFS);
	t1 = now_us();
	if (r)
		log_err("Cannot suspend %s: %s.", dev->name, strerror(-r));
	/* resume in any case: a suspended top device would hold the guest */
	r2 = dm_resume_then(dev->name, dev->hidden, resumed, &c);
	if (!c.resumed_us)	/* (not asked) */
		resumed(&c);
	sys_thread_nice_restore(nice);
	if (r2)
		log_err("Cannot resume %s: %s.", dev->name, strerror(-r2));
	d->swap_us[k] = (uint32_t)MIN(c.resumed_us - t0, (uint64_t)UINT32_MAX);
	d->suspend_us[k] = (uint32_t)MIN(t1 - t0, (uint64_t)UINT32_MAX);
	d->udev_us[k] = (uint32_t)MIN(now_us() - c.resumed_us, (uint64_t)UINT32_MAX);
	d->served_in[k] = (uint32_t)MIN(c.served - served0, (uint64_t)UINT32_MAX);
	d->swap_end_us = c.resumed_us;
	d->last_held_us = c.resumed_us - t0;
	return r ? r : r2;
}

/* Route the regions of the top's switch (dm_switch_message): none to do
 * without a switch. A failure leaves the routing to be made whole at the
 * next round (every region is correct on either path, only slower).
 * Returns the messages sent (0: no region to route), or -errno. */
static int route(struct daemon *d, const struct dm_stack *next, const struct dm_stack *cur, enum dm_route how)
{
	const struct dm_device *top = dm_stack_top(next);
	uint64_t pos = 0, t0 = now_us();
	char msg[8192];
	int n, r = 0, sent = 0;

	if (!next->region_sectors)
		return 0;
	if (d->route_all)
		how = DM_ROUTE_ALL;
	while (!r && (n = dm_switch_message(next, cur, how, &pos, msg, sizeof(msg))) > 0) {
		r = dm_target_message(top->name, msg);
		sent += !r;
	}
	if (n < 0 && !r)
		r = n;
	if (r) {
		log_err("%s: cannot route the regions of %s: %s.", d->o.name, top->name, strerror(-r));
		d->route_all = true;
		return r;
	}
	if (how == DM_ROUTE_ALL)
		d->route_all = false;
	d->route_us[d->nroute++ % 1024] = (uint32_t)MIN(now_us() - t0, (uint64_t)UINT32_MAX);
	return sent;
}

/* Requests in flight on the device of a sysfs inflight file (reads and
 * writes), -1 when unknown */
static long dev_inflight(const char *path)
{
	char buf[64];
	unsigned long rd, wr;

	if (sys_read_small(path, buf, sizeof(buf)) < 0 || sscanf(buf, "%lu %lu", &rd, &wr) != 2)
		return -1;
	return (long)(rd + wr);
}

/* Before a swap of the fast device dev of the live stack cur: its regions
 * part fast go straight to the NBD device, so that the slow requests they
 * sent through dev complete while nothing is held (new ones pass it by,
 * and its fast clusters are served by the daemon meanwhile, right on
 * either path); the suspend then waits for fast-path I/O alone. The route
 * after the swap brings them back (DM_ROUTE_BACK_TO_FAST). Whether any
 * region was routed away. */
static bool drain_part(struct daemon *d, const struct dm_stack *cur, const struct dm_device *dev)
{
	struct dm_dev_info info;
	uint64_t t0 = now_us();
	char path[64];

	if (dm_device_info(dev->name, &info) || !info.exists)
		return false;
	snprintf(path, sizeof(path), "/sys/dev/block/%" PRIu32 ":%" PRIu32 "/inflight", info.major, info.minor);
	/* (no message: no region part fast, nothing to drain) */
	if (route(d, cur, NULL, DM_ROUTE_PART_TO_SLOW) <= 0)
		return false;
	while (dev_inflight(path) > 0 && now_us() < t0 + DRAIN_WAIT_US)
		usleep(250);
	/* (the slot of the swap that follows) */
	d->drain_us[d->nswap % 1024] = (uint32_t)MIN(now_us() - t0, (uint64_t)UINT32_MAX);
	return true;
}

/* Segments of the top table named NAME_s<k>, NAME_ss<k>, ... (with their
 * generations), and their levels (the number of s); of any image
 * identifier (a snapshot's daemon takes over the segments of the image
 * before) */
struct stale_ctx {
	const char *name;
	const struct dm_stack *keep;
	struct stale_seg {
		char name[128];
		size_t level;
	} *segs;
	size_t n, alloc;
	bool list;	/* the stale ones wanted, not only the newest generation */
	uint32_t newest;
	bool any;
};

static int collect_stale(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct stale_ctx *c = opaque;
	uint32_t gen;

	(void)major;
	(void)minor;
	if (!uuid || strncmp(uuid, DM_UUID_PREFIX_INTERNAL, strlen(DM_UUID_PREFIX_INTERNAL)) ||
	    !dm_segment_generation(name, c->name, &gen))
		return 0;
	c->newest = MAX(c->newest, gen);
	c->any = true;
	if (!c->list || find_device(c->keep, name))
		return 0;
	if (c->n == c->alloc) {
		size_t n = c->alloc ? 2 * c->alloc : 64;
		struct stale_seg *v = realloc(c->segs, n * sizeof(*v));

		if (!v)
			return -ENOMEM;
		c->segs = v;
		c->alloc = n;
	}
	snprintf(c->segs[c->n].name, sizeof(c->segs[0].name), "%s", name);
	c->segs[c->n++].level = strspn(name + strlen(c->name) + 1, "s");
	return 0;
}

static int cmp_level_down(const void *a, const void *b)
{
	const struct stale_seg *x = a, *y = b;

	return x->level > y->level ? -1 : x->level < y->level;
}

/* The segments of the mapping that keep does not name, the highest level
 * first (a parent before the segments it names; segs NULL: not wanted;
 * free *segs); *next_gen: a generation newer than all its segments' (0
 * when it has none). 0 or -errno. */
static int list_stale(struct daemon *d, const struct dm_stack *keep, struct stale_seg **segs, size_t *n,
		      uint32_t *next_gen)
{
	struct stale_ctx c = { .name = d->o.name, .keep = keep, .list = segs != NULL };
	int r;

	r = dm_list_devices(collect_stale, &c);
	if (c.n)
		qsort(c.segs, c.n, sizeof(*c.segs), cmp_level_down);
	if (segs) {
		*segs = c.segs;
		*n = c.n;
	} else {
		free(c.segs);
	}
	if (next_gen)
		*next_gen = c.any ? c.newest + 1 : 0;
	return r;
}

/* A round may go on: the top is still there. */
static int round_allowed(struct daemon *d)
{
	struct dm_dev_info info;
	int r;

	r = dm_device_info(d->o.name, &info);
	if (!r && !info.exists)
		r = -ENODEV;
	return r;
}

/* Create the top devices next has that do not exist (new segments, in
 * creation order: the deepest level first) and load the top's inactive
 * table when it changed, marking them in created[] and changed[]; the
 * devices below the top must exist. */
static int stage(struct daemon *d, struct dm_stack *next, const struct dm_stack *cur, bool *created, bool *changed)
{
	int r = 0;

	for (size_t i = 0; i < next->count && !r; i++) {
		const struct dm_device *dev = &next->devices[i], *old;
		struct dm_dev_info info;

		r = dm_device_info(dev->name, &info);
		if (r)
			break;
		if (!dm_is_top_device(dev) && !info.exists && dev->role == DM_ROLE_HOLD) {
			/* (a mapping opened without one) */
			r = create(next, i);
			created[i] = r == 0;
			continue;
		}
		if (!dm_is_top_device(dev)) {
			if (!info.exists) {
				log_err("Device %s is missing (`qcowsetup open` creates it).", dev->name);
				r = -ENODEV;
			}
			continue;
		}
		if (info.exists && dev->role == DM_ROLE_SEGMENT) {
			/* a live segment is never reloaded: next names it only
			 * with the table it has */
			old = find_device(cur, dev->name);
			if (!old || !dm_same_table(cur, old, next, dev)) {
				log_err("Device %s already exists.", dev->name);
				r = -EEXIST;
			}
			continue;
		}
		if (!info.exists && cur && (dev->role == DM_ROLE_TOP || dev->role == DM_ROLE_FAST)) {
			/* removed by `qcowsetup close` meanwhile: never bring it back */
			r = -ENODEV;
			break;
		}
		if (!info.exists) {
			r = create(next, i);
			created[i] = r == 0;
			continue;
		}
		if (!cur && d->o.reattach < 0 && !d->o.take_over) {
			/* a new mapping only makes devices: another's is never taken over
			 * (but by snapshot and commit, which hold it suspended meanwhile) */
			log_err("Device %s already exists.", dev->name);
			r = -EEXIST;
			break;
		}
		old = find_device(cur, dev->name);
		if (cur && old && dm_same_table(cur, old, next, dev))
			continue;
		r = load(next, i);
		changed[i] = r == 0;
	}
	return r;
}

/* Remove the segments of the mapping that next no longer uses, parents
 * first; a segment still open (udev's probe) is waited for once the rest
 * is gone. */
static void remove_stale(struct daemon *d, const struct dm_stack *next)
{
	struct stale_seg *segs = NULL;
	size_t n = 0;

	if (list_stale(d, next, &segs, &n, NULL) == 0)
		for (int pass = 0; pass < 2; pass++)
			for (size_t i = 0; i < n; i++) {
				struct dm_dev_info info;
				int r;

				if (!segs[i].name[0] ||
				    (!pass && !dm_device_info(segs[i].name, &info) && info.open_count))
					continue;
				r = dm_remove_device(segs[i].name, false, pass == 1);
				/* (-ENODEV: removed meanwhile, by a close) */
				if (!r || r == -ENODEV)
					segs[i].name[0] = '\0';
				else if (pass == 1)
					log_std("Cannot remove the unused segment %s.", segs[i].name);
			}
	free(segs);
}

/* Make the live devices what `next` says: create the new ones, reload the
 * fast device (the top without a switch) when it changed, and the top when
 * its own table did (all the top devices when `cur` is NULL: their
 * segments are new), then route the switch's regions that changed (all
 * of them after the top's own swap), remove the segments it no longer
 * has. On success
 * `next` is the current stack; on failure the devices made are removed
 * and the live ones are as they were. */
static int apply(struct daemon *d, struct dm_stack *next, const struct dm_stack *cur)
{
	bool *changed = calloc(next->count ? next->count : 1, sizeof(*changed));
	bool *created = calloc(next->count ? next->count : 1, sizeof(*created));
	bool top_new, part_drained = false;
	int r = 0;

	if (!changed || !created) {
		r = -ENOMEM;
		goto out;
	}
	if (cur)
		r = round_allowed(d);
	if (!r)
		r = stage(d, next, cur, created, changed);
	top_new = !cur || changed[next->count - 1] || created[next->count - 1] ||
		  cur->region_sectors != next->region_sectors;
	for (size_t i = 0; i < next->count && !r; i++)
		if (changed[i]) {
			bool drained = !top_new && !d->route_all && next->devices[i].role == DM_ROLE_FAST &&
				       drain_part(d, cur, &next->devices[i]);

			r = swap(d, &next->devices[i], drained);
			d->reloads++;
			part_drained |= drained;
		}
	/* the regions routed once the fast device has its table: one that
	 * leaves the fast path is all fast-path I/O until then (no slow
	 * request in the drain), and NAME_fast names the slow path before a
	 * region goes to it (a flush reaches the slow path through NAME_fast) */
	if (!r && top_new) {
		route(d, next, cur, DM_ROUTE_ALL);
	} else if (!r) {
		route(d, next, cur, DM_ROUTE_TO_SLOW);
		route(d, next, cur, part_drained ? DM_ROUTE_BACK_TO_FAST : DM_ROUTE_TO_FAST);
	}
	if (r) {
		/* (regions routed to the slow path already: all of them at the
		 * next round) */
		d->route_all = next->region_sectors != 0;
		/* (a device the top uses after all stays: busy) */
		for (size_t i = next->count; i-- > 0;) {
			if (changed[i])
				dm_clear_table(next->devices[i].name);
			if (created[i])
				dm_remove_device(next->devices[i].name, false, false);
		}
		goto out;
	}
	remove_stale(d, next);
out:
	free(changed);
	free(created);
	return r;
}

int daemon_reload_top(struct daemon *d)
{
	int r = 0;

	for (size_t i = 0; d->stack && i < d->stack->count && !r; i++) {
		const struct dm_device *dev = &d->stack->devices[i];

		if (!dm_is_top_device(dev))
			continue;
		r = load(d->stack, i);
		if (!r)
			r = swap(d, dev, false);
		d->reloads += r == 0;
	}
	/* (the top's table loaded again routes region i to path i % 2) */
	if (!r && d->stack)
		route(d, d->stack, NULL, DM_ROUTE_ALL);
	return r;
}

int daemon_stack_setup(struct daemon *d)
{
	struct run_list all;
	struct dm_stack *s = NULL;
	int r;

	run_list_init(&all);
	r = image_map_chain(d->img, &all);
	if (!r && d->rw)
		r = qcow2_rw_mark_writable(d->rw, &all, &d->runs);
	if (r)
		goto out;
	if (!d->rw) {
		d->runs = all;
		run_list_init(&all);
	}
	/* segments left by the daemon before (a reattach): the new ones in a
	 * newer generation, beside them */
	r = list_stale(d, NULL, NULL, NULL, &d->seg_gen);
	if (!r)
		r = build(d, d->img, &d->runs, NULL, d->seg_gen, &s);
	/* dm-switch loaded now: never between a suspend and its resume (a
	 * module load reads the root filesystem, which may be this mapping) */
	if (!r && s->region_sectors)
		r = dm_check_target("switch");
	if (r)
		goto out;
	/* a new mapping: create the top devices; reattached: make new segments
	 * and reload the top */
	r = apply(d, s, NULL);
	if (r) {
		dm_stack_free(s);
		goto out;
	}
	d->stack = s;
out:
	run_list_free(&all);
	return r;
}

/* ---- patching the runs ---- */

static int cmp_remap(const void *a, const void *b)
{
	const struct remap *x = a, *y = b;

	return x->guest < y->guest ? -1 : x->guest > y->guest;
}

static int emit_piece(struct run_list *out, const struct run *b, uint64_t from, uint64_t to)
{
	struct run piece = *b;

	piece.guest = from;
	piece.len = to - from;
	if (b->kind == RUN_DATA || (b->flags & RUN_F_HOST))
		piece.host = b->host + (from - b->guest);
	return run_list_add(out, &piece);
}

/* base with the ranges of p (sorted, disjoint) now writable data of layer 0. */
static int overlay(const struct run_list *base, const struct remap *p, size_t n, struct run_list *out)
{
	size_t k = 0;
	int r;

	for (size_t i = 0; i < base->count; i++) {
		const struct run *b = &base->runs[i];
		uint64_t pos = b->guest, end = b->guest + b->len;

		while (pos < end) {
			while (k < n && p[k].guest + p[k].len <= pos)
				k++;
			if (k < n && p[k].guest < end) {
				if (p[k].guest > pos) {
					r = emit_piece(out, b, pos, p[k].guest);
					pos = p[k].guest;
				} else {
					uint64_t e = MIN(end, p[k].guest + p[k].len);
					struct run w = { .guest = pos, .len = e - pos, .host = p[k].host + (pos - p[k].guest),
							 .kind = RUN_DATA, .depth = 0, .flags = RUN_F_WRITABLE };

					r = run_list_add(out, &w);
					pos = e;
				}
			} else {
				r = emit_piece(out, b, pos, end);
				pos = end;
			}
			if (r)
				return r;
		}
	}
	return 0;
}

void daemon_mapped(void *opaque, uint64_t guest, uint64_t len, uint64_t host)
{
	struct daemon *d = opaque;	/* called with the engine lock held */
	struct remap *last = d->nqueue ? &d->queue[d->nqueue - 1] : NULL;

	d->remapped_bytes += len;
	if (last && last->guest + last->len == guest && last->host + last->len == host) {
		last->len += len;
		return;
	}
	if (d->nqueue == DAEMON_REMAP_QUEUE) {
		d->queue_overflow = true;	/* a full walk next time */
		return;
	}
	d->queue[d->nqueue++] = (struct remap){ .guest = guest, .len = len, .host = host };
	daemon_remap_wake(d);	/* (a flush wrote it back) a round soon */
}

void daemon_remap_wake(struct daemon *d)
{
	if (d->remap_sleeping)
		pthread_cond_signal(&d->cond);
}

void daemon_kick(void *opaque)
{
	struct daemon *d = opaque;	/* called with the engine lock held */

	d->kicked = true;
	pthread_cond_signal(&d->cond);
}

/* One round: new runs, the stack rebuilt and applied. */
static int remap_round(struct daemon *d, struct remap *q, size_t n, bool rescan)
{
	uint64_t t0 = now_us();
	struct run_list next;
	struct dm_stack *s = NULL;
	struct image top;
	int r;

	run_list_init(&next);
	if (rescan) {
		/* the queue overflowed: walk the image again (metadata is written
		 * back: the walk reads what the cache knows) */
		struct run_list all;

		run_list_init(&all);
		pthread_mutex_lock(&d->lock);
		r = qcow2_rw_writeback(d->rw);
		if (!r)
			r = image_map_chain(d->img, &all);
		if (!r)
			r = qcow2_rw_mark_writable(d->rw, &all, &next);
		top = *d->img;
		pthread_mutex_unlock(&d->lock);
		run_list_free(&all);
	} else {
		qsort(q, n, sizeof(*q), cmp_remap);
		r = overlay(&d->runs, q, n, &next);
		pthread_mutex_lock(&d->lock);
		top = *d->img;	/* sizes may change under the writer */
		pthread_mutex_unlock(&d->lock);
	}
	if (!r)
		r = build(d, &top, &next, d->stack, ++d->seg_gen, &s);
	if (!r)
		r = apply(d, s, d->stack);
	if (r) {
		dm_stack_free(s);
		run_list_free(&next);
		return r;
	}
	dm_stack_free(d->stack);
	d->stack = s;
	run_list_free(&d->runs);
	d->runs = next;
	d->round_us[d->nround++ % 1024] = (uint32_t)MIN(now_us() - t0, (uint64_t)UINT32_MAX);
	write_stats(d);
	return 0;
}

int daemon_reload_all(struct daemon *d)
{
	return remap_round(d, NULL, 0, true);
}

/* The top device gone without us (`close --deferred`: removed at its last
 * close): end the session ourselves. */
static void watch_top(struct daemon *d)
{
	struct dm_dev_info info;

	if (d->top_gone || dm_device_info(d->o.name, &info) || info.exists)
		return;
	log_std("%s: the device was removed: finishing", d->o.name);
	d->top_gone = true;
	nbd_disconnect(d->nbd_index);	/* the server gets NBD_CMD_DISC */
}

struct leftover_ctx {
	char prefix[DM_UUID_MAX + DM_MAPPING_NAME_MAX + 64];	/* (a prefix longer than a UUID matches none) */
	char names[64][128];
	size_t n;
};

static int collect_leftover(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct leftover_ctx *c = opaque;

	(void)major;
	(void)minor;
	if (uuid && !strncmp(uuid, c->prefix, strlen(c->prefix)) && c->n < 64)
		snprintf(c->names[c->n++], 128, "%s", name);
	return 0;
}

void daemon_remove_leftovers(struct daemon *d)
{
	struct leftover_ctx *c = calloc(1, sizeof(*c));
	bool progress = true;

	if (!c)
		return;
	snprintf(c->prefix, sizeof(c->prefix), "%s%s-%s_", DM_UUID_PREFIX_INTERNAL, d->o.id, d->o.name);
	if (dm_list_devices(collect_leftover, c) == 0)
		while (progress) {
			progress = false;
			for (size_t i = 0; i < c->n; i++) {
				struct dm_dev_info info;

				if (!c->names[i][0] || dm_device_info(c->names[i], &info))
					continue;
				if (!info.exists) {
					c->names[i][0] = '\0';
					continue;
				}
				if (info.open_count || dm_remove_device(c->names[i], false, true))
					continue;
				c->names[i][0] = '\0';
				progress = true;
			}
		}
	free(c);
}

struct suspended_ctx {
	const char *name;
	char top_uuid[DM_UUID_MAX + 1], seg_prefix[DM_UUID_MAX + 1], fast_uuid[DM_UUID_MAX + 1];
	char names[64][128];
	int order[64];	/* 0 segments, 1 the fast device, 2 the top */
	size_t n;
};

static int collect_suspended(void *opaque, const char *name, const char *uuid, uint32_t major, uint32_t minor)
{
	struct suspended_ctx *c = opaque;
	bool top, seg, fast;

	(void)major;
	(void)minor;
	if (!uuid || c->n == 64)
		return 0;
	top = !strcmp(uuid, c->top_uuid);
	seg = !strncmp(uuid, c->seg_prefix, strlen(c->seg_prefix)) && dm_is_segment_name(name, c->name);
	fast = !strcmp(uuid, c->fast_uuid);
	if (top || seg || fast) {
		c->order[c->n] = seg ? 0 : fast ? 1 : 2;
		snprintf(c->names[c->n++], 128, "%s", name);
	}
	return 0;
}

void daemon_resume_suspended(const char *name, const char *id)
{
	struct suspended_ctx *c;
	char path[PATH_MAX];

	/* suspended by `qcowsetup suspend` (keys wiped): it stays so, until
	 * `qcowsetup resume`, which starts a new daemon */
	qs_state_path(path, sizeof(path), name, QS_STATE_SUSPENDED);
	if (access(path, F_OK) == 0) {
		log_std("%s: suspended by qcowsetup suspend: left suspended (qcowsetup resume %s)", name, name);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return;
	c->name = name;
	snprintf(c->top_uuid, sizeof(c->top_uuid), "%s%s-%s", DM_UUID_PREFIX, id, name);
	snprintf(c->seg_prefix, sizeof(c->seg_prefix), "%s%s-%s_s", DM_UUID_PREFIX_INTERNAL, id, name);
	snprintf(c->fast_uuid, sizeof(c->fast_uuid), "%s%s-%s_fast", DM_UUID_PREFIX_INTERNAL, id, name);
	if (dm_list_devices(collect_suspended, c) == 0)
		/* segments first, the top last */
		for (int k = 0; k < 3; k++)
			for (size_t i = 0; i < c->n; i++) {
				struct dm_dev_info info;

				if (c->order[i] != k || dm_device_info(c->names[i], &info) || !info.exists ||
				    !info.suspended)
					continue;
				if (dm_resume(c->names[i], c->order[i] < 2) == 0)
					log_std("%s: resumed %s, left suspended by the dead daemon", name, c->names[i]);
			}
	free(c);
	dm_release();
}

/* With the engine lock held: what new clusters need becomes durable. */
static void writeback(struct daemon *d)
{
	int r;

	if (!d->rw || d->broken || !qcow2_rw_has_pending(d->rw))
		return;
	r = qcow2_rw_writeback(d->rw);
	if (r)
		log_err("%s: metadata writeback failed: %s.", d->o.name, strerror(-r));
	daemon_check_broken(d);
}

/* Whether the ranges queued (pending) are worth a round now; see the
 * head of this file. */
static bool round_due(struct daemon *d, bool pending, bool kicked, bool nearly_full)
{
	uint64_t now = now_us(), served, data, gap;

	if (!pending) {
		d->queued_since_us = 0;
		return false;
	}
	if (!d->queued_since_us)
		d->queued_since_us = now;
	daemon_servers_busy(d, &served);
	data = __atomic_load_n(&d->slow_data, __ATOMIC_RELAXED) - d->data_mark;
	served -= d->served_mark;
	gap = MAX((uint64_t)DEMAND_MIN_US, DEMAND_HELD_X * d->last_held_us);
	if (kicked || nearly_full || now - d->queued_since_us >= MAX_AGE_US ||
	    (data >= DEMAND_MIN && data * DEMAND_SHARE >= served && now - d->swap_end_us >= gap))
		return true;
	return slow_path_quiet(d, QUIET_WAIT_US);
}

/* Whether this tick finds nothing to do (engine lock held): no range
 * queued, no metadata to write back, no round asked for. */
static bool tick_idle(const struct daemon *d)
{
	return !d->nqueue && !d->queue_overflow && !d->kicked && (!d->rw || !qcow2_rw_has_pending(d->rw));
}

void daemon_remap_loop(struct daemon *d)
{
	bool gave_up = false, probing;
	unsigned int idle_ticks = 0, probe_ticks = 0;
	uint64_t last_probe = 0, probe;
	uint64_t watched = now_us();

	for (;;) {
		struct timespec ts;
		struct remap *q;
		size_t n;
		bool rescan, broken, pending, nearly_full, kicked, drop;
		long wait_ms;
		int r;

		pthread_mutex_lock(&d->lock);
		d->remap_sleeping = idle_ticks >= IDLE_AFTER && tick_idle(d);
		wait_ms = d->remap_sleeping ? IDLE_WAIT_MS : (long)d->o.flush_interval_ms;
		probe = d->rw ? qcow2_rw_ahead_probe(d->rw) : 0;
		if (probe != last_probe)
			probe_ticks = 0;	/* a new window waits for its writer */
		last_probe = probe;
		probing = probe && probe_ticks < PROBE_TICKS;
		if (probing)
			wait_ms = MIN(wait_ms, PROBE_WAIT_MS);
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += wait_ms % 1000 * 1000000L;
		ts.tv_sec += wait_ms / 1000 + ts.tv_nsec / 1000000000L;
		ts.tv_nsec %= 1000000000L;
		if (!d->stopping)
			pthread_cond_timedwait(&d->cond, &d->lock, &ts);
		d->remap_sleeping = false;
		if (d->stopping) {
			pthread_mutex_unlock(&d->lock);
			break;
		}
		probe_ticks += probing;
		/* control requests between rounds, never during one */
		pthread_mutex_unlock(&d->lock);
		daemon_control_poll(d);
		pthread_mutex_lock(&d->lock);
		if (d->suspended) {
			/* `qcowsetup suspend`: the queue waits for the resume */
			pthread_mutex_unlock(&d->lock);
			continue;
		}
		/* a sequential writer on the fast path, seen in the window
		 * mapped ahead of it: the next one (a kick), before it gets
		 * there; a writer that went quiet is left to the slow path to
		 * be seen again, not polled for */
		if (probing && !d->broken)
			qcow2_rw_ahead_poll(d->rw);
		idle_ticks = tick_idle(d) ? idle_ticks + 1 : 0;
		writeback(d);
		broken = d->broken;
		pending = d->nqueue || d->queue_overflow;
		nearly_full = d->queue_overflow || d->nqueue >= DAEMON_REMAP_QUEUE / 4 * 3;
		kicked = d->kicked;
		d->kicked = false;
		pthread_mutex_unlock(&d->lock);
		if (broken && !d->broken_shown) {
			d->broken_shown = true;
			write_stats(d);
		}
		if (now_us() - watched >= WATCH_US) {
			watched = now_us();
			watch_top(d);
		}
		drop = gave_up || !d->rw || d->top_gone;
		if (!drop && !round_due(d, pending, kicked, nearly_full))
			continue;
		/* the ranges queued until now, their metadata written back (the
		 * later ones wait for the next round) */
		pthread_mutex_lock(&d->lock);
		writeback(d);
		q = d->queue;
		n = d->nqueue;
		rescan = d->queue_overflow;
		d->queue = d->queue_spare;
		d->queue_spare = q;
		d->nqueue = 0;
		d->queue_overflow = false;
		d->queued_since_us = 0;
		d->data_mark = __atomic_load_n(&d->slow_data, __ATOMIC_RELAXED);
		daemon_servers_busy(d, &d->served_mark);
		pthread_mutex_unlock(&d->lock);
		if ((!n && !rescan) || drop)
			continue;
		r = remap_round(d, q, n, rescan);
		if (r == -ENODEV || r == -ENXIO) {
			log_verbose("%s: the mapping is going away: no more remapping", d->o.name);
			gave_up = true;
			continue;
		}
		if (r) {
			/* keep the ranges for the next round */
			log_err("%s: table reload failed (%s); the new clusters stay on the slow path for now.",
				d->o.name, strerror(-r));
			pthread_mutex_lock(&d->lock);
			for (size_t i = 0; i < n; i++)
				if (d->nqueue < DAEMON_REMAP_QUEUE)
					d->queue[d->nqueue++] = q[i];
				else
					d->queue_overflow = true;
			pthread_mutex_unlock(&d->lock);
		} else {
			log_dbg("%s: %zu ranges remapped (%" PRIu64 " reloads)", d->o.name, n, d->reloads);
		}
	}
}
