/* Device-mapper devices: the one wrapper of libdevmapper (dm.c is the only
 * file including libdevmapper.h). Every function returns 0 or a negative
 * errno, with a message logged for the errors a user can act on;
 * libdevmapper's own messages go to log_err/log_dbg.
 *
 * udev: when udev runs (/run/udev/control) every change waits for it through
 * a udev cookie and udev makes the /dev/mapper nodes; without udev (the
 * initramfs before udevd, the test VM) libdevmapper creates and removes the
 * nodes itself. Hidden devices (internal layers) carry the udev flags
 * DISABLE_SUBSYSTEM_RULES, DISABLE_DISK_RULES and DISABLE_OTHER_RULES in every
 * uevent they cause (create, resume), so nothing probes them; their
 * /dev/mapper node still exists.
 *
 * Not thread-safe (libdevmapper's state is global): one thread does dm work.
 * The names and types here are prefixed dm_ like libdevmapper's and
 * dmtable.h's; none collides with either. */
#ifndef QS_DM_H
#define QS_DM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DM_INFO_UUID_SIZE	129	/* DM_UUID_LEN, with the NUL */
#define DM_TABLE_PARAMS_SIZE	8192	/* buffer handed to dm_table.target_fn */

/* One target of a table to load, in 512-byte sectors, as
 * dm_task_add_target() takes it. */
struct dm_table_target {
	uint64_t start;
	uint64_t length;
	const char *type;	/* "linear", "zero", "crypt" */
	const char *params;
};

/* Produce target index (0 <= index < count) of a table: fill t; t->params may
 * point into buf (size bytes, DM_TABLE_PARAMS_SIZE). 0 or -errno. */
typedef int (*dm_table_target_fn)(void *opaque, size_t index, struct dm_table_target *t,
				  char *buf, size_t size);

/* A table: an array of targets, or (targets NULL) a callback asked for each
 * target in turn, so that a big table never exists as strings in the caller.
 * libdevmapper copies every target anyway: measured in the test VM, creating
 * a table of short linear targets costs about 170 bytes of peak memory per
 * target (its copies plus the ioctl buffer): 17 MB for 100,000 targets, 83 MB
 * for 500,000 (15 s under TCG). Tables holding a crypt target are sent with
 * dm_task_secure_data (libdevmapper wipes its ioctl buffers). */
struct dm_table {
	size_t count;
	const struct dm_table_target *targets;
	dm_table_target_fn target_fn;
	void *opaque;
};

/* Called for each target of a live table (dm_get_table, dm_get_status). A
 * crypt target's key is masked with '0's, as dmsetup shows it (a keyring
 * reference ":32:logon:desc" is no secret and is kept). Returning non-zero
 * stops the walk and is returned. */
typedef int (*dm_target_line_fn)(void *opaque, uint64_t start, uint64_t length,
				 const char *type, const char *params);

/* Called for each device (dm_list_devices); uuid is "" when it has none.
 * Returning non-zero stops the walk and is returned. */
typedef int (*dm_device_fn)(void *opaque, const char *name, const char *uuid,
			    uint32_t major, uint32_t minor);

struct dm_dev_info {
	bool exists;
	bool suspended;
	bool read_only;		/* of the live table */
	bool live_table;
	bool inactive_table;
	bool deferred_remove;	/* removal is pending until the last close */
	int32_t open_count;
	uint32_t major, minor;
	uint32_t target_count;	/* of the live table */
	uint32_t event_nr;
	char uuid[DM_INFO_UUID_SIZE];
};

enum dm_suspend_flags {
	DM_SUSPEND_NOFLUSH	= 1 << 0,	/* keep queued I/O queued, do not flush it */
	DM_SUSPEND_SKIP_LOCKFS	= 1 << 1,	/* do not freeze a filesystem on the device */
};

/* Is device-mapper usable? 0; -ENODEV "device-mapper is not available in
 * the kernel" (no dm_mod: tried modprobe dm-mod); -EACCES (not root). */
int dm_check_control(void);

/* Is the target type ("crypt", "zero", "linear") registered? When it is not,
 * runs /sbin/modprobe -q dm-TYPE and asks again. 0, or -ENODEV with
 * "kernel module dm_TYPE not available", or the errors of dm_check_control. */
int dm_check_target(const char *type);

/* Whether changes are synchronised with udev (udev runs, sync supported). */
bool dm_udev_in_use(void);

/* Create device name with uuid (may be NULL) and its table, live at once:
 * create, load, resume, and remove again when the load or the resume fails
 * (what libdevmapper's create-with-table does, done step by step so that the
 * kernel's errno survives on every libdevmapper version). Major and minor may
 * be NULL. Returns 0, or with a message logged:
 *   -EEXIST  a device of that name exists,
 *   -EBUSY   a device with that UUID exists,
 *   -ENOKEY  a crypt target's keyring key is not reachable,
 *   -ENXIO   a device the table refers to does not exist,
 *   -EINVAL  the kernel refused the table (details in the kernel log) or
 *            the arguments,
 *   -ENAMETOOLONG, -ENOMEM, -EACCES, -ENODEV (no device-mapper). */
int dm_create_device(const char *name, const char *uuid, bool read_only, bool hidden,
		     const struct dm_table *table, uint32_t *major, uint32_t *minor);

/* Create device i of stack s (dmtable.h) with its table and udev flags,
 * with its UUID or none (with_uuid false: a device that takes the UUID of
 * one still present later), and tell s how later tables refer to it.
 * *created (may be NULL) says whether the device exists now. Errors as
 * dm_create_device, logged. */
struct dm_stack;
int dm_create_stack_device(struct dm_stack *s, size_t i, bool with_uuid, bool *created);

/* Load table into the inactive slot of an existing device (the live table
 * goes on serving I/O); dm_suspend + dm_resume swap it in, dm_clear_table
 * drops it. Errors as dm_create_device, and -ENODEV when there is no such
 * device. */
int dm_load_table(const char *name, bool read_only, const struct dm_table *table);
int dm_clear_table(const char *name);

/* Suspend (I/O is queued until resume) and resume (the inactive table, if
 * loaded, becomes live). hidden: the device is internal (the udev flags of
 * the change event, see above). 0, -ENODEV or -errno. */
int dm_suspend(const char *name, unsigned int flags);
int dm_resume(const char *name, bool hidden);
/* The same, calling resumed(arg) as soon as the kernel resumed the device
 * (its I/O goes on), before waiting for udev's processing of the change
 * event; called also when the resume failed. */
int dm_resume_then(const char *name, bool hidden, void (*resumed)(void *), void *arg);

/* Send message to the first target of a live table (dm-crypt's "key wipe"
 * and "key set :LEN:logon:DESC", which it takes only while suspended).
 * 0, -ENODEV, -EINVAL (the target refused it), or -errno. */
int dm_target_message(const char *name, const char *message);

/* Remove a device. Open (mounted, used by another table, held by a process)
 * it is refused with -EBUSY and a message, unless deferred: then the kernel
 * removes it at the last close (0; without udev its /dev/mapper node goes at
 * once). retry: give short-lived openers (udev's probes) 2 seconds and let
 * libdevmapper retry the removal (use it whenever udev may run). 0, -ENODEV
 * (no such device: not logged, the caller knows whether that matters),
 * -EBUSY, or -errno (logged). */
int dm_remove_device(const char *name, bool deferred, bool retry);

/* Rename device name to new_name; give a device created without a UUID
 * its uuid (the kernel never changes a UUID once set). hidden: as
 * dm_resume. 0, -ENODEV, -EBUSY (the name or UUID is taken), -EINVAL
 * (a UUID already set) or -errno. */
int dm_rename_device(const char *name, const char *new_name, bool hidden);
int dm_set_uuid(const char *name, const char *uuid, bool hidden);

/* State of a device: info->exists is false (and 0 returned) when there is
 * no such device. 0 or -errno. */
int dm_device_info(const char *name, struct dm_dev_info *info);

/* The live table / the status of each target. 0, -ENODEV, the callback's
 * non-zero return, or -errno. */
int dm_get_table(const char *name, dm_target_line_fn fn, void *opaque);
int dm_get_status(const char *name, dm_target_line_fn fn, void *opaque);

/* Every device-mapper device. 0, the callback's non-zero return, or -errno. */
int dm_list_devices(dm_device_fn fn, void *opaque);

/* Release libdevmapper's resources (the control descriptor, pending node
 * operations); call once at exit. */
void dm_release(void);

#endif
