/* clevis (tang, tpm2, sss pins) as a subprocess: the one file that runs it
 * (clevis.c). Secrets go through pipes, never argv or the environment,
 * and are read into secure memory. The environment is inherited, so
 * TPM2TOOLS_TCTI chooses the TPM the tpm2 pin talks to. */
#ifndef QS_CLEVIS_H
#define QS_CLEVIS_H

#include <stdbool.h>

#include "image.h"
#include "keys.h"

#define CLEVIS_SECRET_MAX	8192	/* bytes `clevis decrypt` may give */
#define CLEVIS_TIMEOUT_DEFAULT	30	/* seconds for one `clevis decrypt` */

/* `clevis encrypt PIN CONFIG` (with -y when trust: accept a tang server's
 * keys without asking) of secret: the compact JWE in *jwe (malloc'ed).
 * Returns 0, -ENOENT (no clevis), -EINVAL (clevis failed: the pin or its
 * configuration, logged by clevis) or -errno. */
int clevis_encrypt(const char *pin, const char *config, bool trust, const struct passphrase *secret,
		   char **jwe);

/* `clevis decrypt` of jwe into *secret, in a process group of its own that
 * is killed after timeout seconds (0: CLEVIS_TIMEOUT_DEFAULT). Returns 0,
 * -ENOENT (no clevis), -ETIMEDOUT, -EPERM (clevis failed: the TPM policy
 * does not match, the tang server cannot be reached) or -errno. */
int clevis_decrypt(const char *jwe, unsigned int timeout, struct passphrase **secret);

/* Try the bindings of img (a LUKS qcow2 layer) in slot order: each JWE
 * through clevis decrypt, the passphrase against the header. Returns 0
 * with *vk (and *slot, may be NULL), -ENOENT (no bindings), -EPERM (none
 * unlocked it) or another -errno. */
int clevis_unlock(const struct image *img, unsigned int timeout, struct volume_key **vk, int *slot);

#endif
