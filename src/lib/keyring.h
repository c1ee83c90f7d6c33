/* Volume keys for dm-crypt through the kernel keyring (logon keys), with
 * add_key(2)/keyctl(2) called through syscall(2): no libkeyutils.
 *
 * dm-crypt takes a key reference ":<size>:logon:<description>" in its table
 * and, while the table is being loaded, looks the key up with request_key()
 * in the keyrings of the process doing the load (thread, process, session,
 * user). It copies the key into the target, so the key can (and should) go
 * right after the load: add it, load the table IN THE SAME THREAD, remove it
 * (cryptsetup does the same with its thread keyring). Logon keys cannot be
 * read back from userspace at all.
 *
 * Keys go to the thread keyring: invisible to other threads and processes
 * (children do not inherit it), destroyed with the thread. Key bytes are
 * never logged. */
#ifndef QS_KEYRING_H
#define QS_KEYRING_H

#include <stddef.h>
#include <stdint.h>

#define KEYRING_DESC_MAX	4095	/* the kernel's limit on descriptions */
#define KEYRING_LOGON_MAX	32767	/* payload limit of user/logon keys */

/* Add a logon key (description "service:rest", as the logon type requires:
 * e.g. "qcowsetup:vm:L0") to the calling thread's keyring. An existing key
 * of that description in that keyring is replaced. Returns 0 and the key's
 * serial, or with a message logged:
 *   -EINVAL   bad description (no "prefix:" part) or length,
 *   -ENOSYS   the kernel has no key retention service (CONFIG_KEYS),
 *   -EDQUOT   the user's key quota is exhausted,
 *   -ENOMEM. */
int keyring_add_logon(const char *desc, const void *key, size_t len, int32_t *serial);

/* Revoke the key (its payload is freed and wiped by the kernel at once) and
 * unlink it from the thread keyring. Already revoked: 0. Returns 0,
 * -ENOKEY (no such key), or another -errno. */
int keyring_remove(int32_t serial);

/* The serial of the key of that type and description reachable from the
 * caller's keyrings (what request_key would find), or -ENOKEY. For tests and
 * checks; no key material is read. */
int keyring_search(const char *type, const char *desc, int32_t *serial);

#endif
