/* The libdevmapper wrapper (see dm.h). The only file including
 * libdevmapper.h: its 1/0 returns become 0/-errno here. */
#include <errno.h>
#include <fcntl.h>
#include <libdevmapper.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/dm-ioctl.h>

#include "dm.h"
#include "dmtable.h"
#include "log.h"
#include "sysutil.h"

/* libdevmapper's log levels (lvm2 lib/log/log.h); the flags above 0x7f
 * (_LOG_STDERR, _LOG_ONCE, ...) are masked off. */
#define LIBDM_LOG_ERR		3
#define LIBDM_LOG_WARN		4
#define LIBDM_LOG_LEVEL_MASK	0x7f

#define NAME_SIZE		128	/* DM_NAME_LEN of linux/dm-ioctl.h */
#define UUID_SIZE		DM_INFO_UUID_SIZE

#define UDEV_CONTROL		"/run/udev/control"
#define UDEV_HIDDEN_FLAGS	(DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG | \
				 DM_UDEV_DISABLE_DISK_RULES_FLAG | \
				 DM_UDEV_DISABLE_OTHER_RULES_FLAG)

static bool initialised;
static bool use_udev;
static int quiet;	/* > 0: libdevmapper's errors are expected, log them as debug */
static int secure;	/* > 0: a task holding crypt params runs */

__attribute__((format(printf, 5, 6)))
static void libdm_log(int level, const char *file, int line, int dm_errno_or_class,
		      const char *f, ...)
{
	const char *prefix;
	char msg[1024];
	va_list ap;

	(void)file;
	(void)line;
	(void)dm_errno_or_class;
	level &= LIBDM_LOG_LEVEL_MASK;
	if (level > LIBDM_LOG_WARN && qs_log_get_level() < QS_LOG_DEBUG)
		return;		/* do not even format the chatter */
	va_start(ap, f);
	vsnprintf(msg, sizeof(msg), f, ap);
	va_end(ap);
	/* libdevmapper prints table params only in debug messages of the
	 * deptree code we do not use; drop anything resembling a crypt table
	 * line while one is in flight, whatever the level. */
	if (secure && (strstr(msg, " crypt ") || strstr(msg, "params") || strstr(msg, ":logon:")))
		return;
	prefix = strncmp(msg, "device-mapper:", 14) ? "device-mapper: " : "";
	if (level <= LIBDM_LOG_ERR && !quiet)
		log_err("%s%s", prefix, msg);
	else if (level == LIBDM_LOG_WARN && !quiet)
		log_verbose("%s%s", prefix, msg);
	else
		log_dbg("%s%s", prefix, msg);
}

static void dm_init(void)
{
	if (initialised)
		return;
	initialised = true;
	dm_log_with_errno_init(libdm_log);
	/* Names and UUIDs go to the kernel exactly as given. */
	dm_set_name_mangling_mode(DM_STRING_MANGLING_NONE);
}

static bool control_present(void);

/* Whether udevd listens on its control socket (a listening socket bound
 * there: the kernel's socket diagnostics, else /proc/net/unix; without
 * either, whether the socket file is there). The file alone is not enough:
 * it outlives a udevd killed at shutdown (in the initramfs systemd goes
 * back to, where the shutdown hook closes the mappings), and a udev cookie
 * would then be waited for forever. Nothing is sent to udevd (it warns of
 * an empty message on its control socket). */
static bool udev_listens(void)
{
	int r = sys_unix_listening(UDEV_CONTROL);

	return r < 0 ? access(UDEV_CONTROL, F_OK) == 0 : r;
}

/* Decided once, when device-mapper is known to work (libdevmapper asks the
 * kernel whether it supports cookies). */
static void udev_init(void)
{
	static bool done;

	dm_init();
	if (done)
		return;
	/* libdevmapper remembers a failed look at the kernel: let
	 * dm_check_control() load dm_mod first. */
	quiet++;
	if (!control_present() && dm_check_control()) {
		quiet--;
		return;
	}
	done = true;
	/* Without udev, libdevmapper must make the /dev/mapper nodes itself:
	 * no sync, no DM_UDEV_DISABLE_LIBRARY_FALLBACK. */
	if (!udev_listens())
		dm_udev_set_sync_support(0);
	use_udev = dm_udev_get_sync_support();
	quiet--;
	log_dbg("device-mapper: udev %s", use_udev ? "in use (synchronised)" :
		"not running: the library creates the device nodes");
}

bool dm_udev_in_use(void)
{
	udev_init();
	return use_udev;
}

void dm_release(void)
{
	if (initialised)
		dm_lib_release();
}

static bool name_valid(const char *name)
{
	size_t len;
	const char *p;

	if (!name)
		return false;
	len = strlen(name);
	if (!len || !strcmp(name, ".") || !strcmp(name, ".."))
		return false;
	for (p = name; *p; p++)
		if (*p == '/' || (unsigned char)*p <= ' ' || *p == 0x7f)
			return false;
	return true;
}

static int check_name(const char *name)
{
	if (!name_valid(name)) {
		log_err("invalid device-mapper device name \"%s\"", name ? name : "");
		return -EINVAL;
	}
	if (strlen(name) >= NAME_SIZE) {
		log_err("device name %s is too long (at most %d characters)", name, NAME_SIZE - 1);
		return -ENAMETOOLONG;
	}
	return 0;
}

/* The errno of a failed task; 0 when it failed before the ioctl (memory,
 * an argument libdevmapper refused). */
static int task_errno(struct dm_task *dmt, int fallback)
{
	int e = dm_task_get_errno(dmt);

	return e > 0 ? -e : fallback;
}

/* Run a task; its failure is reported by the caller, so libdevmapper's own
 * messages about it only go to the debug log. 1 ok, 0 failed. */
static int task_run(struct dm_task *dmt)
{
	int ok;

	quiet++;
	ok = dm_task_run(dmt);
	quiet--;
	return ok;
}

static bool misc_has_device_mapper(void)
{
	char line[128];
	bool found = false;
	FILE *f = fopen("/proc/misc", "re");

	if (!f)
		return false;
	while (!found && fgets(line, sizeof(line), f))
		found = strstr(line, " device-mapper\n") != NULL;
	fclose(f);
	return found;
}

/* /proc/misc lists device-mapper once dm_mod is loaded; without /proc,
 * assume it is and let libdevmapper find out. */
static bool control_present(void)
{
	return access("/proc/misc", F_OK) != 0 || misc_has_device_mapper();
}

int dm_check_control(void)
{
	char version[64];
	int fd, r;

	dm_init();
	/* Before libdevmapper's first look: it remembers a failure. */
	if (!control_present())
		(void)sys_modprobe("dm-mod");
	fd = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (fd < 0 && (errno == EACCES || errno == EPERM)) {
		log_err("cannot use device-mapper: permission denied on "
			"/dev/mapper/control (root needed)");
		return -EACCES;
	}
	if (fd >= 0)
		close(fd);
	/* libdevmapper creates the control node when it is missing. */
	quiet++;
	r = dm_driver_version(version, sizeof(version));
	quiet--;
	if (!r) {
		if (!control_present())
			log_err("device-mapper is not available in the kernel (module "
				"dm_mod not loaded, modprobe dm-mod failed)");
		else
			log_err("device-mapper is not available: cannot talk to the "
				"kernel driver through /dev/mapper/control");
		return -ENODEV;
	}
	log_dbg("device-mapper driver %s", version);
	return 0;
}

/* A task; NULL with *r set: -ENODEV/-EACCES (with a message) when
 * libdevmapper cannot talk to the kernel, else -ENOMEM. */
static struct dm_task *task_create(int type, const char *name, int *r)
{
	struct dm_task *dmt;

	dm_init();
	/* dm_task_create() asks the kernel for its version first: without
	 * device-mapper, let dm_check_control() say so clearly. */
	if (!control_present()) {
		*r = dm_check_control();
		if (*r)
			return NULL;
	}
	dmt = dm_task_create(type);
	if (!dmt) {
		*r = dm_check_control();
		if (!*r)
			*r = -ENOMEM;
		return NULL;
	}
	if (name && !dm_task_set_name(dmt, name)) {
		dm_task_destroy(dmt);
		*r = -ENOMEM;
		return NULL;
	}
	*r = 0;
	return dmt;
}

static uint16_t udev_flags(bool hidden)
{
	uint16_t flags = hidden ? UDEV_HIDDEN_FLAGS : 0;

	if (use_udev)
		flags |= DM_UDEV_DISABLE_LIBRARY_FALLBACK;
	return flags;
}

/* Run a task that causes a uevent, with a udev cookie: waits for udev when
 * it runs, else makes libdevmapper process its node operations. ran (may
 * be NULL) is called once the kernel did the task, before that wait. */
static int run_with_cookie_then(struct dm_task *dmt, bool hidden, int fallback, void (*ran)(void *), void *arg)
{
	uint32_t cookie = 0;
	bool with_cookie;
	int r = 0;

	udev_init();
	/* a daemon outlives udevd at shutdown: from then on, no waiting */
	if (use_udev && !udev_listens()) {
		log_dbg("device-mapper: udev stopped: the library creates the device nodes");
		dm_udev_set_sync_support(0);
		use_udev = false;
	}
	with_cookie = dm_task_set_cookie(dmt, &cookie, udev_flags(hidden));
	if (!with_cookie)
		r = -ENOMEM;
	else if (!task_run(dmt))
		r = task_errno(dmt, fallback);
	if (ran)
		ran(arg);
	if (!with_cookie)
		return r;
	/* Always: releases the cookie, creates/removes nodes without udev. */
	(void)dm_udev_wait(cookie);
	return r;
}

static int run_with_cookie(struct dm_task *dmt, bool hidden, int fallback)
{
	return run_with_cookie_then(dmt, hidden, fallback, NULL, NULL);
}

static int table_check(const struct dm_table *table)
{
	if (!table || !table->count || (!table->targets && !table->target_fn)) {
		log_err("device-mapper: empty table");
		return -EINVAL;
	}
	return 0;
}

/* Add the targets of table to dmt; *has_crypt set when one is a crypt
 * target. */
static int add_targets(struct dm_task *dmt, const struct dm_table *table, bool *has_crypt)
{
	struct dm_table_target t;
	char *buf = NULL;
	size_t i;
	int r = 0;

	*has_crypt = false;
	if (!table->targets) {
		buf = malloc(DM_TABLE_PARAMS_SIZE);
		if (!buf)
			return -ENOMEM;
	}
	for (i = 0; i < table->count; i++) {
		if (table->targets) {
			t = table->targets[i];
		} else {
			memset(&t, 0, sizeof(t));
			buf[0] = '\0';
			r = table->target_fn(table->opaque, i, &t, buf, DM_TABLE_PARAMS_SIZE);
			if (r)
				goto out;
		}
		if (!t.type || !t.params || !t.length) {
			log_err("device-mapper: target %zu of the table is incomplete", i);
			r = -EINVAL;
			goto out;
		}
		if (!strcmp(t.type, "crypt"))
			*has_crypt = true;
		if (!dm_task_add_target(dmt, t.start, t.length, t.type, t.params)) {
			r = -ENOMEM;
			goto out;
		}
	}
out:
	if (buf) {
		explicit_bzero(buf, DM_TABLE_PARAMS_SIZE);
		free(buf);
	}
	return r;
}

static void report_table_error(const char *what, const char *name, const char *uuid, int r)
{
	switch (r) {
	case -EEXIST:
		log_err("device %s already exists", name);
		break;
	case -EBUSY:
		if (uuid)
			log_err("cannot create device %s: a device with UUID %s already exists",
				name, uuid);
		else
			log_err("cannot %s device %s: it is busy", what, name);
		break;
	case -ENOKEY:
		log_err("cannot %s device %s: dm-crypt did not find its key in the "
			"keyring", what, name);
		break;
	case -ENODEV:
		log_err("cannot %s device %s: no such device", what, name);
		break;
	case -ENXIO:
		log_err("cannot %s device %s: a device its table refers to does not "
			"exist (see the kernel log)", what, name);
		break;
	case -EACCES:
	case -EPERM:
		log_err("cannot %s device %s: permission denied (root needed)", what, name);
		break;
	case -EINVAL:
		log_err("cannot %s device %s: the kernel refused the table (see the "
			"kernel log)", what, name);
		break;
	default:
		log_err("cannot %s device %s: %s", what, name, strerror(-r));
	}
}

static bool device_exists(const char *name)
{
	struct dm_dev_info info;

	return dm_device_info(name, &info) == 0 && info.exists;
}

/* Load table into the inactive slot of name. */
static int load_table(const char *name, bool read_only, const struct dm_table *table)
{
	struct dm_task *dmt;
	bool has_crypt = false;
	int r;

	dmt = task_create(DM_DEVICE_RELOAD, name, &r);
	if (!dmt)
		return r;
	if (read_only && !dm_task_set_ro(dmt)) {
		r = -ENOMEM;
		goto out;
	}
	r = add_targets(dmt, table, &has_crypt);
	if (r)
		goto out;
	if (has_crypt && !dm_task_secure_data(dmt)) {
		r = -ENOMEM;
		goto out;
	}
	secure += has_crypt;
	if (!task_run(dmt))
		r = task_errno(dmt, -EINVAL);
	secure -= has_crypt;
	if (r == -ENXIO && !device_exists(name))
		r = -ENODEV;
out:
	dm_task_destroy(dmt);
	return r;
}

/* Remove name after a failed creation; errors are only logged. */
static void revert_create(const char *name)
{
	struct dm_task *dmt;
	int r;

	dmt = task_create(DM_DEVICE_REMOVE, name, &r);
	if (dmt) {
		r = dm_task_retry_remove(dmt) ? run_with_cookie(dmt, false, -EIO) : -ENOMEM;
		dm_task_destroy(dmt);
	}
	if (r)
		log_err("device %s was left behind after the failure: remove it with "
			"dmsetup remove %s (%s)", name, name, strerror(-r));
}

/* Three steps as libdevmapper's own create-with-table does (create, load,
 * resume, remove on failure), but here each errno survives: libdevmapper
 * before 1.02.197 (lvm2 2.03.23) reports none from the combined call. */
int dm_create_device(const char *name, const char *uuid, bool read_only, bool hidden,
		     const struct dm_table *table, uint32_t *major, uint32_t *minor)
{
	struct dm_task *dmt;
	struct dm_info info;
	int r;

	r = check_name(name);
	if (r)
		return r;
	if (uuid && strlen(uuid) >= UUID_SIZE) {
		log_err("device UUID %s is too long", uuid);
		return -ENAMETOOLONG;
	}
	r = table_check(table);
	if (r)
		return r;

	dmt = task_create(DM_DEVICE_CREATE, name, &r);
	if (!dmt)
		return r;
	if (uuid && !dm_task_set_uuid(dmt, uuid)) {
		dm_task_destroy(dmt);
		return -ENOMEM;
	}
	if (!task_run(dmt)) {
		r = task_errno(dmt, -EIO);
		dm_task_destroy(dmt);
		/* The kernel says EBUSY for a taken name and a taken UUID. */
		if (r == -EBUSY && (!uuid || device_exists(name)))
			r = -EEXIST;
		report_table_error("create", name, uuid, r);
		return r;
	}
	if (!dm_task_get_info(dmt, &info) || !info.exists) {
		dm_task_destroy(dmt);
		revert_create(name);
		return -EIO;
	}
	dm_task_destroy(dmt);

	r = load_table(name, read_only, table);
	if (r) {
		report_table_error("load the table of", name, NULL, r);
		goto revert;
	}
	r = dm_resume(name, hidden);
	if (r)
		goto revert;
	log_dbg("created %s (%u:%u)%s%s, %zu targets", name, info.major, info.minor,
		read_only ? " read-only" : "", hidden ? " hidden" : "", table->count);
	if (major)
		*major = info.major;
	if (minor)
		*minor = info.minor;
	return 0;
revert:
	revert_create(name);
	return r;
}

int dm_create_stack_device(struct dm_stack *s, size_t i, bool with_uuid, bool *created)
{
	const struct dm_device *dev = &s->devices[i];
	struct dm_stack_table_iter it;
	struct dm_table t;
	uint32_t maj, min;
	char ref[32];
	int r;

	dm_stack_table(s, dev, &it, &t);
	r = dm_create_device(dev->name, with_uuid ? dev->uuid : NULL, dev->read_only, dev->hidden, &t, &maj, &min);
	if (created)
		*created = r == 0;
	if (r) {
		log_err("Cannot create device %s: %s.", dev->name, strerror(-r));
		return r;
	}
	snprintf(ref, sizeof(ref), "%u:%u", maj, min);
	return dm_stack_set_ref(s, i, ref);
}

int dm_load_table(const char *name, bool read_only, const struct dm_table *table)
{
	int r;

	r = check_name(name);
	if (r)
		return r;
	r = table_check(table);
	if (r)
		return r;
	r = load_table(name, read_only, table);
	if (r)
		report_table_error("load a table into", name, NULL, r);
	return r;
}

/* A task without table nor uevent (with a target message: sent to the
 * target at sector 0); ENXIO (no such device) becomes -ENODEV. */
static int message_task(int type, const char *name, const char *what, unsigned int flags, const char *message)
{
	struct dm_task *dmt;
	int r = check_name(name);

	if (r)
		return r;
	dmt = task_create(type, name, &r);
	if (!dmt)
		return r;
	if (((flags & DM_SUSPEND_NOFLUSH) && !dm_task_no_flush(dmt)) ||
	    ((flags & DM_SUSPEND_SKIP_LOCKFS) && !dm_task_skip_lockfs(dmt)) ||
	    (message && (!dm_task_set_sector(dmt, 0) || !dm_task_set_message(dmt, message) ||
			 !dm_task_secure_data(dmt)))) {
		r = -ENOMEM;
		goto out;
	}
	if (!task_run(dmt)) {
		r = task_errno(dmt, -EIO);
		if (r == -ENXIO)
			r = -ENODEV;
		report_table_error(what, name, NULL, r);
	}
out:
	dm_task_destroy(dmt);
	return r;
}

static int simple_task(int type, const char *name, const char *what, unsigned int flags)
{
	return message_task(type, name, what, flags, NULL);
}

int dm_clear_table(const char *name)
{
	return simple_task(DM_DEVICE_CLEAR, name, "clear the inactive table of", 0);
}

int dm_suspend(const char *name, unsigned int flags)
{
	return simple_task(DM_DEVICE_SUSPEND, name, "suspend", flags);
}

int dm_resume(const char *name, bool hidden)
{
	return dm_resume_then(name, hidden, NULL, NULL);
}

int dm_resume_then(const char *name, bool hidden, void (*resumed)(void *), void *arg)
{
	struct dm_task *dmt;
	int r = check_name(name);

	if (r)
		return r;
	dmt = task_create(DM_DEVICE_RESUME, name, &r);
	if (!dmt)
		return r;
	r = run_with_cookie_then(dmt, hidden, -EIO, resumed, arg);
	if (r == -ENXIO)
		r = -ENODEV;
	if (r)
		report_table_error("resume", name, NULL, r);
	dm_task_destroy(dmt);
	return r;
}

int dm_target_message(const char *name, const char *message)
{
	/* "key set" names a keyring key: no secret, but wiped all the same */
	return message_task(DM_DEVICE_TARGET_MSG, name, "send a message to", 0, message);
}

int dm_device_info(const char *name, struct dm_dev_info *out)
{
	struct dm_task *dmt;
	struct dm_info info;
	const char *uuid;
	int r = check_name(name);

	if (r)
		return r;
	if (!out)
		return -EINVAL;
	memset(out, 0, sizeof(*out));
	dmt = task_create(DM_DEVICE_INFO, name, &r);
	if (!dmt)
		return r;
	if (!task_run(dmt)) {
		r = task_errno(dmt, -EIO);
		if (r == -ENXIO) {	/* old kernels: no such device */
			r = 0;
			goto out;
		}
		log_err("cannot get the state of device %s: %s", name, strerror(-r));
		goto out;
	}
	if (!dm_task_get_info(dmt, &info)) {
		r = -EIO;
		goto out;
	}
	if (!info.exists)
		goto out;
	out->exists = true;
	out->suspended = info.suspended;
	out->read_only = info.read_only;
	out->live_table = info.live_table;
	out->inactive_table = info.inactive_table;
	out->deferred_remove = info.deferred_remove;
	out->open_count = info.open_count;
	out->major = info.major;
	out->minor = info.minor;
	out->target_count = info.target_count;
	out->event_nr = info.event_nr;
	uuid = dm_task_get_uuid(dmt);
	if (uuid)
		snprintf(out->uuid, sizeof(out->uuid), "%s", uuid);
out:
	dm_task_destroy(dmt);
	return r;
}

int dm_remove_device(const char *name, bool deferred, bool retry)
{
	struct dm_dev_info info;
	struct dm_task *dmt;
	int i, r;

	r = dm_device_info(name, &info);
	if (r)
		return r;
	if (!info.exists) {
		/* (the caller says so if it matters: gone meanwhile is often fine) */
		log_dbg("cannot remove device %s: no such device", name);
		return -ENODEV;
	}
	/* A real user of the device is refused with a clear message; with
	 * retry, short-lived openers (udev's probes) get 2 seconds first. */
	for (i = 0; retry && !deferred && info.open_count > 0 && i < 20; i++) {
		usleep(100 * 1000);
		r = dm_device_info(name, &info);
		if (r)
			return r;
		if (!info.exists)
			return 0;	/* removed meanwhile (deferred by someone) */
	}
	if (info.open_count > 0 && !deferred) {
		log_err("cannot remove device %s: it is in use (open count %d: "
			"mounted, held by a process or another device)", name, info.open_count);
		return -EBUSY;
	}
	dmt = task_create(DM_DEVICE_REMOVE, name, &r);
	if (!dmt)
		return r;
	if ((retry && !dm_task_retry_remove(dmt)) || (deferred && !dm_task_deferred_remove(dmt))) {
		r = -ENOMEM;
		goto out;
	}
	r = run_with_cookie(dmt, false, -EIO);
	if (r == -ENXIO) {
		r = -ENODEV;
		log_dbg("cannot remove device %s: no such device", name);
	} else if (r == -EBUSY) {
		log_err("cannot remove device %s: it is in use (mounted, held by a "
			"process or another device)", name);
	} else if (r) {
		log_err("cannot remove device %s: %s", name, strerror(-r));
	} else if (deferred && info.open_count > 0) {
		log_verbose("device %s is in use: it will be removed at its last close", name);
	}
out:
	dm_task_destroy(dmt);
	return r;
}

/* DM_DEVICE_RENAME: a new name (new_name) or, for a device that has none,
 * its UUID (new_uuid). */
static int rename_task(const char *name, const char *new_name, const char *new_uuid, bool hidden)
{
	struct dm_task *dmt;
	int r = check_name(name);

	if (!r && new_name)
		r = check_name(new_name);
	if (r)
		return r;
	dmt = task_create(DM_DEVICE_RENAME, name, &r);
	if (!dmt)
		return r;
	if (new_name ? !dm_task_set_newname(dmt, new_name) : !dm_task_set_newuuid(dmt, new_uuid))
		r = -ENOMEM;
	if (!r)
		r = run_with_cookie(dmt, hidden, -EIO);
	if (r == -ENXIO)
		r = -ENODEV;
	if (r)
		log_err("cannot %s device %s%s%s: %s", new_name ? "rename" : "set the UUID of", name,
			new_name ? " to " : "", new_name ? new_name : "", strerror(-r));
	dm_task_destroy(dmt);
	return r;
}

int dm_rename_device(const char *name, const char *new_name, bool hidden)
{
	return rename_task(name, new_name, NULL, hidden);
}

int dm_set_uuid(const char *name, const char *uuid, bool hidden)
{
	return rename_task(name, NULL, uuid, hidden);
}

/* Mask the key of a crypt table line ("cipher key iv_offset dev offset
 * ...") with '0's unless it is a keyring reference (":size:type:desc"). */
static void mask_crypt_key(char *params)
{
	char *key = strchr(params, ' ');
	size_t len;

	if (!key)
		return;
	key++;
	if (*key == ':')
		return;
	len = strcspn(key, " ");
	memset(key, '0', len);
}

static int get_targets(int type, const char *name, dm_target_line_fn fn, void *opaque)
{
	struct dm_task *dmt;
	uint64_t start, length;
	char *ttype, *params;
	void *next = NULL;
	int r = check_name(name);

	if (r)
		return r;
	if (!fn)
		return -EINVAL;
	dmt = task_create(type, name, &r);
	if (!dmt)
		return r;
	/* A hex key may come back in the table: wipe the ioctl buffer. */
	if (!dm_task_secure_data(dmt)) {
		r = -ENOMEM;
		goto out;
	}
	secure++;
	if (!task_run(dmt)) {
		secure--;
		r = task_errno(dmt, -EIO);
		if (r == -ENXIO)
			r = -ENODEV;
		report_table_error("read the table of", name, NULL, r);
		goto out;
	}
	secure--;
	do {
		next = dm_get_next_target(dmt, next, &start, &length, &ttype, &params);
		if (!ttype)
			continue;	/* no table: one empty entry */
		if (!strcmp(ttype, "crypt") && params && type == DM_DEVICE_TABLE)
			mask_crypt_key(params);
		r = fn(opaque, start, length, ttype, params ? params : "");
	} while (next && !r);
out:
	dm_task_destroy(dmt);
	return r;
}

int dm_get_table(const char *name, dm_target_line_fn fn, void *opaque)
{
	return get_targets(DM_DEVICE_TABLE, name, fn, opaque);
}

int dm_get_status(const char *name, dm_target_line_fn fn, void *opaque)
{
	return get_targets(DM_DEVICE_STATUS, name, fn, opaque);
}

#define LIST_BUF_MAX	(16U << 20)

/* The UUID of the entry at off of the list (data: len bytes) into *uuid
 * ("" for none) and the offset of the next entry into *next (0: the last):
 * 0, -ENOTSUP when the kernel said nothing of UUIDs (before Linux 5.14),
 * -EPROTO when the entry does not fit. */
static int list_entry(const char *data, size_t len, size_t off, const char **uuid, size_t *next)
{
	const struct dm_name_list *nl = (const void *)(data + off);
	const char *end;
	uint32_t ev[2];
	size_t at;

	if (len - off < sizeof(*nl) + sizeof(ev) ||
	    !(end = memchr(nl->name, '\0', len - off - offsetof(struct dm_name_list, name))))
		return -EPROTO;
	at = ((size_t)(end + 1 - data) + 7) & ~(size_t)7;	/* event_nr, flags */
	if (at > len || len - at < sizeof(ev))
		return -EPROTO;
	memcpy(ev, data + at, sizeof(ev));
	at += sizeof(ev);
	if (ev[1] & DM_NAME_LIST_FLAG_HAS_UUID) {
		*uuid = data + at;
		if (at >= len || !memchr(*uuid, '\0', len - at))
			return -EPROTO;
	} else if (ev[1] & DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID) {
		*uuid = "";
	} else {
		return -ENOTSUP;
	}
	*next = nl->next ? off + nl->next : 0;
	return *next && (*next >= len || *next <= off) ? -EPROTO : 0;
}

/* The devices with their UUIDs from one DM_LIST_DEVICES ioctl
 * (DM_UUID_FLAG), the list checked whole before fn sees any of it: *done
 * and 0 or fn's error; else (not *done, nothing was called) -errno, to
 * list them the other way. */
static int list_with_uuids(dm_device_fn fn, void *opaque, bool *done)
{
	size_t size = 16384, off, next;
	struct dm_ioctl *io = NULL;
	const char *data, *uuid;
	int fd, r;

	*done = false;
	fd = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	for (;;) {
		free(io);
		io = calloc(1, size);
		if (!io) {
			r = -ENOMEM;
			goto out;
		}
		io->version[0] = DM_VERSION_MAJOR;	/* (minor 0: any kernel of version 4 takes it) */
		io->data_size = (uint32_t)size;
		io->data_start = sizeof(*io);
		io->flags = DM_UUID_FLAG;
		if (ioctl(fd, DM_LIST_DEVICES, io) < 0) {
			r = -errno;
			goto out;
		}
		if (!(io->flags & DM_BUFFER_FULL_FLAG))
			break;
		if (size >= LIST_BUF_MAX) {
			r = -E2BIG;
			goto out;
		}
		size *= 4;
	}
	if (io->data_size > size || io->data_size < io->data_start) {
		r = -EPROTO;
		goto out;
	}
	data = (const char *)io + io->data_start;
	size = io->data_size - io->data_start;
	if (size < sizeof(struct dm_name_list) || !((const struct dm_name_list *)(const void *)data)->dev) {
		*done = true;	/* none */
		r = 0;
		goto out;
	}
	for (off = 0, r = 0; !r; off = next) {
		r = list_entry(data, size, off, &uuid, &next);
		if (!r && !next)
			break;
	}
	*done = r == 0;
	for (off = 0; !r; off = next) {
		const struct dm_name_list *nl = (const void *)(data + off);

		list_entry(data, size, off, &uuid, &next);
		r = fn(opaque, nl->name, uuid, major((dev_t)nl->dev), minor((dev_t)nl->dev));
		if (!next)
			break;
	}
out:
	free(io);
	close(fd);
	return r;
}

int dm_list_devices(dm_device_fn fn, void *opaque)
{
	struct dm_task *dmt;
	struct dm_names *names;
	unsigned int next = 0;
	bool done;
	int r = 0;

	if (!fn)
		return -EINVAL;
	dm_init();
	r = list_with_uuids(fn, opaque, &done);
	if (done)
		return r;
	/* before Linux 5.14: the names, then a status ioctl for each UUID */
	r = 0;
	dmt = task_create(DM_DEVICE_LIST, NULL, &r);
	if (!dmt)
		return r;
	if (!task_run(dmt)) {
		r = task_errno(dmt, -EIO);
		log_err("cannot list device-mapper devices: %s", strerror(-r));
		goto out;
	}
	names = dm_task_get_names(dmt);
	if (!names || !names->dev)
		goto out;	/* none */
	do {
		struct dm_dev_info info;

		names = (struct dm_names *)((char *)names + next);
		/* The device may go away meanwhile: then it is skipped. */
		if (dm_device_info(names->name, &info) == 0 && info.exists)
			r = fn(opaque, names->name, info.uuid, info.major, info.minor);
		next = names->next;
	} while (next && !r);
out:
	dm_task_destroy(dmt);
	return r;
}

/* 1 when the kernel knows target type, 0 when not, -errno. */
static int target_registered(const char *type)
{
	struct dm_task *dmt;
	struct dm_versions *v, *last;
	int r = 0;

	dmt = task_create(DM_DEVICE_LIST_VERSIONS, NULL, &r);
	if (!dmt)
		return r;
	if (!task_run(dmt)) {
		r = task_errno(dmt, -EIO);
		goto out;
	}
	v = dm_task_get_versions(dmt);
	do {
		last = v;
		if (!strcmp(v->name, type)) {
			log_dbg("device-mapper target %s v%u.%u.%u", type,
				v->version[0], v->version[1], v->version[2]);
			r = 1;
			break;
		}
		v = (struct dm_versions *)((char *)v + v->next);
	} while (last != v);
out:
	dm_task_destroy(dmt);
	return r;
}

int dm_check_target(const char *type)
{
	char module[64];
	const char *p;
	int r;

	if (!type || !*type || strlen(type) > 32)
		return -EINVAL;
	for (p = type; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' || *p == '_'))
			return -EINVAL;
	r = dm_check_control();
	if (r)
		return r;
	r = target_registered(type);
	if (r)
		return r < 0 ? r : 0;
	snprintf(module, sizeof(module), "dm-%s", type);
	log_dbg("device-mapper target %s not registered: modprobe %s", type, module);
	(void)sys_modprobe(module);
	r = target_registered(type);
	if (r)
		return r < 0 ? r : 0;
	log_err("kernel module dm_%s not available (device-mapper target \"%s\")", type, type);
	return -ENODEV;
}
