/* What mapping.c and live.c lend snapshot.c (not a front end's API:
 * mapping.h is):
 * the open of a chain under a top device that exists, and the pieces of
 * open and reattach that a live snapshot repeats.
 *
 * mapping_open_swap builds for p->image exactly the stack that
 * mapping_open would (loop devices, crypt devices, the daemon), except
 * that: the caller holds NAME's lock; the keys are given; the identifier
 * of the UUIDs is the top device's (a UUID never changes); the devices
 * under the top are created without UUIDs (the old mapping's devices,
 * renamed aside, still have them) and get them once switched() removed
 * those; the read-only locks of layer 1 (the image the mapping wrote,
 * still held read-write by the old loop device) are taken without the
 * conflict test; and the daemon takes the existing top device over
 * (--take-over: its table loaded, the device resumed). Up to the
 * daemon's READY a failure undoes everything it made (the top untouched,
 * still suspended); after it, nothing fails. */
#ifndef QS_MAPPING_SWAP_H
#define QS_MAPPING_SWAP_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "daemon_state.h"
#include "dm.h"
#include "keys.h"
#include "mapping.h"

/* The suffix of a device renamed aside while its replacement is built */
#define MAPPING_OLD_SUFFIX	".old"

struct mapping_swap {
	const char *id;			/* the top device's image identifier */
	struct volume_key *vk[IMG_MAX_CHAIN_DEPTH];	/* by depth; taken (set NULL) */
	int step;			/* fault injection: steps counted so far (in, out) */
	/* the top runs on the new stack: remove what the old one left */
	void (*switched)(void *opaque);
	void *opaque;
};

int mapping_open_swap(const struct mapping_params *p, struct mapping_swap *s);

/* What the image chain p->image (parsed read-only, as open parses it)
 * needs for a snapshot: its size and cluster size, layer 0's LUKS header
 * and the volume key of each encrypted layer by depth, unlocked as open
 * unlocks them (p->ask), and the passphrase that opened layer 0 (NULL
 * when unencrypted or unlocked by a binding). 0, -EPERM, -errno. */
struct mapping_chain_keys {
	uint64_t size;
	uint32_t cluster_bits;
	bool luks;			/* layer 0 is LUKS-encrypted */
	bool legacy_aes;		/* some layer is (no new device names for it) */
	struct luks_info luks0;
	struct volume_key *vk[IMG_MAX_CHAIN_DEPTH];
	struct passphrase *pp;
};
int mapping_read_chain_keys(const struct mapping_params *p, struct mapping_chain_keys *k);
void mapping_chain_keys_free(struct mapping_chain_keys *k);

/* live.c: NAME locked (into *lock, -1 when not; lock NULL: the caller holds it) and its top device found into
 * *top. 0, -ENODEV (no such qcowsetup mapping, logged), -errno. */
int mapping_lock_existing(const char *name, int *lock, struct dm_dev_info *top);

/* Start the daemon of a as a reattach to nbd (the old daemon back after a
 * failed snapshot): it reloads the top device and resumes it. 0 or -errno. */
int mapping_restart_daemon(struct daemon_args *a, int nbd);

/* Wait until daemon pid has exited (or its pid belongs to another
 * program). 0 or -ETIMEDOUT. */
int mapping_wait_daemon_exit(pid_t pid);

#endif
