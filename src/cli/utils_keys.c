/* Passphrases and LUKS parameters as the options give them, for format,
 * the key slot commands and convert (cmd_keys.h). */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "cmd_keys.h"
#include "log.h"
#include "passphrase.h"
#include "qcowsetup.h"

int keys_read_passphrase(const char *image, struct passphrase **pp)
{
	struct passphrase_opts po = {
		.key_file = opt.key_file,
		.keyfile_offset = opt.keyfile_offset,
		.keyfile_size = opt.keyfile_size,
		.image_name = image,
	};

	return tools_read_passphrase(&po, pp);
}

int keys_read_new_passphrase(const char *file, const char *image, struct passphrase **pp)
{
	struct passphrase *again = NULL;
	char name[512];
	struct passphrase_opts po = {
		.key_file = file,
		.keyfile_offset = opt.new_keyfile_offset,
		.keyfile_size = opt.new_keyfile_size,
		.image_name = name,
	};
	int r;

	*pp = NULL;
	snprintf(name, sizeof(name), "the new key of %s", image);
	r = tools_read_passphrase(&po, pp);
	if (r < 0 || !tools_passphrase_interactive(&po))
		return r;
	snprintf(name, sizeof(name), "the new key of %s (again)", image);
	r = tools_read_passphrase(&po, &again);
	if (r < 0)
		goto fail;
	if (again->len != (*pp)->len || memcmp(again->data, (*pp)->data, again->len)) {
		log_err("Passphrases do not match.");
		r = -EPERM;
		goto fail;
	}
	passphrase_free(again);
	return 0;
fail:
	passphrase_free(again);
	passphrase_free(*pp);
	*pp = NULL;
	return r;
}

void keys_pbkdf(struct luks_pbkdf *p)
{
	p->iterations = opt.pbkdf_iterations;
	p->iter_time_ms = opt.iter_time;
}

int keys_format_params(struct luks_format_params *p, char *name, char *mode, size_t *key_bytes)
{
	const char *spec = opt.cipher ? opt.cipher : "aes-xts-plain64";
	const char *dash = strchr(spec, '-');
	size_t n;

	memset(p, 0, sizeof(*p));
	/* cryptsetup's "cipher-mode" split: the mode keeps its own dashes */
	if (!dash || dash == spec || !dash[1] || (size_t)(dash - spec) > 32 || strlen(dash + 1) > 32) {
		log_err("Invalid --cipher %s (expected CIPHER-MODE-IV, e.g. aes-xts-plain64).", spec);
		return -EINVAL;
	}
	n = (size_t)(dash - spec);
	memcpy(name, spec, n);
	name[n] = '\0';
	strcpy(mode, dash + 1);
	if (opt.key_size)
		*key_bytes = opt.key_size / 8;
	else
		*key_bytes = !strncmp(mode, "xts", 3) ? 64 : 32;
	p->cipher = name;
	p->cipher_mode = mode;
	p->hash = opt.hash ? opt.hash : "sha256";
	keys_pbkdf(&p->pbkdf);
	return 0;
}
