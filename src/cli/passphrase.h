/* Reading one passphrase or key file, as cryptsetup does. The caller loops
 * for --tries (only when tools_passphrase_interactive() is true, as
 * cryptsetup retries only on a terminal). */
#ifndef QS_CLI_PASSPHRASE_H
#define QS_CLI_PASSPHRASE_H

#include <stdbool.h>
#include <stdint.h>

#include "keys.h"

/* What a terminal shows while a passphrase is typed (crypttab's
 * password-echo=). */
enum passphrase_echo {
	PASSPHRASE_ECHO_OFF = 0,
	PASSPHRASE_ECHO_ON,
	PASSPHRASE_ECHO_MASKED,	/* one '*' per character */
};

struct passphrase_opts {
	/* NULL: the terminal if stdin is one (prompt, no echo, ends at a
	 * newline), else stdin up to the first newline.
	 * "-": the terminal as above if stdin is one, else all of stdin as a
	 * binary key. Anything else: the file, as a binary key; a file that
	 * is an AF_UNIX stream socket is connected to and the key read from
	 * the connection, as systemd-cryptsetup does for crypttab(5): the
	 * client socket is bound to the abstract name
	 * "\0RANDOM/cryptsetup/VOLUME", so that one key server can tell which
	 * volume asks (getpeername(2)). */
	const char *key_file;
	uint64_t keyfile_offset;	/* bytes skipped first (not on a terminal) */
	uint64_t keyfile_size;		/* bytes to read exactly; 0 = up to the end,
					 * at most PASSPHRASE_MAX_SIZE */
	const char *image_name;		/* "Enter passphrase for IMAGE_NAME: " */
	const char *volume;		/* VOLUME a key socket is told; NULL: image_name's base name */
	enum passphrase_echo echo;	/* on a terminal */
	unsigned int timeout;		/* seconds to wait on a terminal, 0 = forever */
};

/* Whether opts would prompt on a terminal. */
bool tools_passphrase_interactive(const struct passphrase_opts *opts);

/* Read one passphrase into secure memory (free with passphrase_free).
 * Returns 0 or:
 *   -EINVAL    bad options (offset on a terminal), key file over the
 *              maximum size,
 *   -EIO       the key file is shorter than --keyfile-size + offset, or a
 *              read error,
 *   -EPERM     no passphrase: nothing to read (EOF before any byte, an
 *              empty key file) or none typed within the timeout (exit
 *              status 2, as a wrong passphrase),
 *   -ENOENT/-EACCES... opening the key file (or connecting to it),
 *   -ENOMEM.
 * The terminal's settings are restored on every path, including signals. */
int tools_read_passphrase(const struct passphrase_opts *opts, struct passphrase **out);

#endif
