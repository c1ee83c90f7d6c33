/* Logon keys for dm-crypt (see keyring.h). */
#include <errno.h>
#include <linux/keyctl.h>
#include <stdbool.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "keyring.h"
#include "log.h"

static long sys_add_key(const char *type, const char *desc, const void *payload,
			size_t len, int32_t keyring)
{
	return syscall(__NR_add_key, type, desc, payload, len, keyring);
}

static long sys_keyctl(int cmd, unsigned long a2, unsigned long a3)
{
	return syscall(__NR_keyctl, cmd, a2, a3, 0UL, 0UL);
}

/* The logon type wants "service:description" with a non-empty service. */
static bool logon_desc_valid(const char *desc)
{
	const char *colon;
	size_t len;

	if (!desc)
		return false;
	len = strnlen(desc, KEYRING_DESC_MAX + 1);
	colon = strchr(desc, ':');
	return len > 0 && len <= KEYRING_DESC_MAX && colon && colon != desc;
}

int keyring_add_logon(const char *desc, const void *key, size_t len, int32_t *serial)
{
	long id;
	int r;

	if (!logon_desc_valid(desc)) {
		log_err("invalid keyring key description \"%s\": it must read "
			"\"service:name\"", desc ? desc : "");
		return -EINVAL;
	}
	if (!key || !len || len > KEYRING_LOGON_MAX) {
		log_err("invalid key for keyring key %s: %s, %zu bytes", desc,
			key ? "given" : "none", len);
		return -EINVAL;
	}
	id = sys_add_key("logon", desc, key, len, KEY_SPEC_THREAD_KEYRING);
	if (id < 0) {
		r = -errno;
		if (r == -ENOSYS || r == -EOPNOTSUPP) {
			log_err("the kernel has no key retention service (CONFIG_KEYS): "
				"dm-crypt cannot receive keys through the keyring");
			return -ENOSYS;
		}
		if (r == -EDQUOT)
			log_err("cannot add key %s to the keyring: key quota exhausted "
				"(/proc/sys/kernel/keys/maxkeys, maxbytes)", desc);
		else
			log_err("cannot add key %s to the keyring: %s", desc, strerror(-r));
		return r;
	}
	log_dbg("key %s added to the thread keyring (serial %ld, %zu bytes)", desc, id, len);
	if (serial)
		*serial = (int32_t)id;
	return 0;
}

int keyring_remove(int32_t serial)
{
	int r = 0;

	if (serial <= 0)
		return -EINVAL;
	/* Revoking frees the payload (kfree_sensitive) right away; the key
	 * itself is garbage-collected once unlinked. */
	if (sys_keyctl(KEYCTL_REVOKE, (unsigned long)serial, 0) < 0 && errno != EKEYREVOKED) {
		r = -errno;
		if (r != -ENOKEY)
			log_err("cannot revoke keyring key %d: %s", serial, strerror(-r));
		return r;
	}
	if (sys_keyctl(KEYCTL_UNLINK, (unsigned long)serial,
		       (unsigned long)KEY_SPEC_THREAD_KEYRING) < 0 &&
	    errno != ENOENT && errno != ENOKEY && errno != EKEYREVOKED)
		log_dbg("keyring key %d: unlink: %s", serial, strerror(errno));
	log_dbg("keyring key %d revoked and unlinked", serial);
	return r;
}

int keyring_search(const char *type, const char *desc, int32_t *serial)
{
	static const int32_t rings[] = {
		KEY_SPEC_THREAD_KEYRING, KEY_SPEC_PROCESS_KEYRING,
		KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING,
	};
	size_t i;

	if (!type || !desc)
		return -EINVAL;
	for (i = 0; i < sizeof(rings) / sizeof(rings[0]); i++) {
		long id = syscall(__NR_keyctl, KEYCTL_SEARCH, (unsigned long)rings[i],
				  type, desc, 0UL);

		if (id >= 0) {
			if (serial)
				*serial = (int32_t)id;
			return 0;
		}
		if (errno == ENOSYS)
			return -ENOSYS;
	}
	return -ENOKEY;
}
