/* The control channel of a slow-path daemon: how `qcowsetup` asks the
 * daemon of a read-write mapping NAME to do something on the live mapping
 * (suspend, resume, refresh, ...). Both ends are here: the request and
 * reply lines (parsed and formatted here, unit-tested), the client
 * (control_call) and the socket's address; the daemon's side, its table of
 * verbs, is src/daemon/control.c.
 *
 * The socket: AF_UNIX stream, QS_RUN_DIR "/NAME.ctl", mode 0600 (the
 * folder is 0700), made by the daemon once it serves and removed at its
 * exit. The daemon answers only peers whose SO_PEERCRED uid is 0.
 *
 * The protocol: one request per connection. The client connects, writes
 * one request line, reads one reply line, closes. A line is printable ASCII
 * ending in '\n', at most CONTROL_LINE_MAX bytes with the '\n'.
 *
 *   request:  VERB [ARG]...            words separated by one space; a word
 *                                      is 1..CONTROL_WORD_MAX characters of
 *                                      [A-Za-z0-9._:=+-], at most
 *                                      CONTROL_ARGS_MAX arguments
 *   reply:    OK [TEXT]                done (TEXT: the verb's answer)
 *             ERR ERRNO [TEXT]         refused or failed: ERRNO a positive
 *                                      errno number, TEXT says why
 *
 * The daemon serves requests from its main thread (the remap loop, which
 * alone calls libdevmapper) between reload rounds, so a request waits at
 * most one round; a request and its verb's work never overlap a table swap.
 *
 * Verbs (src/daemon/control.c):
 *   ping                 OK PID
 *   state                OK active | OK suspended
 *   suspend              metadata written back and flushed, no more table
 *                        swaps until resume: OK (qcowsetup then suspends the
 *                        devices and wipes the keys)
 *   resume               table swaps again: OK
 *   refresh on|off       discards allowed (on) or not (off), kept in the
 *                        daemon's state file (qcowsetup has switched them
 *                        on the devices below); the top device and its
 *                        segments reloaded with their tables as they are, so
 *                        that they take the new limits of the devices under
 *                        them: OK
 *   resize SIZE [shrink] [fail-step=K]
 *                        SIZE in bytes, +N or -N relative; the image and the
 *                        top device resized (src/daemon/resize.c; smaller
 *                        only with shrink; K > 0: step K fails, tests):
 *                        OK NEW_SIZE; ERR EROFS for a read-only mapping,
 *                        ERR ENOTEMPTY past allocated clusters, ERR ENOKEY
 *                        BYTES when a LUKS image's crypt device must first
 *                        cover BYTES (the file and its loop device have
 *                        grown; qcowsetup reloads the crypt table, which
 *                        takes the key, and sends the request again)
 *   detach               metadata written back and flushed, the NBD socket
 *                        shut down: OK; the daemon then closes the image
 *                        as at a close and exits, leaving the top device
 *                        (qcowsetup snapshot holds it suspended)
 * An unknown verb: ERR EOPNOTSUPP; a bad line or argument count: ERR EINVAL. */
#ifndef QS_CONTROL_H
#define QS_CONTROL_H

#include <stddef.h>

#define CONTROL_LINE_MAX	256	/* bytes, with the '\n' */
#define CONTROL_WORD_MAX	64
#define CONTROL_ARGS_MAX	8
#define CONTROL_TIMEOUT_MS	(120 * 1000)	/* the client's wait for a reply */

struct control_request {
	char verb[CONTROL_WORD_MAX + 1];
	char args[CONTROL_ARGS_MAX][CONTROL_WORD_MAX + 1];
	unsigned int nargs;
};

/* QS_RUN_DIR/NAME.ctl into buf. 0 or -ENAMETOOLONG (also when the path does
 * not fit a sockaddr_un). */
int control_socket_path(char *buf, size_t size, const char *name);

/* Parse a request line (len bytes, the '\n' included or not). 0, or -EINVAL
 * (not a request: empty, a bad character, a word too long, too many words,
 * longer than CONTROL_LINE_MAX). */
int control_parse_request(const char *line, size_t len, struct control_request *req);

/* A reply line into buf: "OK[ TEXT]\n" (err 0) or "ERR ERRNO[ TEXT]\n"
 * (err a negative errno). TEXT may be NULL; characters that are not
 * printable become '?', and it is cut to fit. Returns the line's length. */
size_t control_format_reply(char *buf, size_t size, int err, const char *text);

/* Parse a reply line: 0 (OK) or the negative errno of ERR, with the text
 * (may be "") into text; -EPROTO when the line is neither. */
int control_parse_reply(const char *line, size_t len, char *text, size_t size);

/* Send request (a line without its '\n') to the daemon of NAME and wait for
 * the reply (CONTROL_TIMEOUT_MS): 0 with the reply's text, the reply's
 * -errno (its text logged; -ENOKEY, a key the caller must provide, is no
 * failure: its text is returned as OK's), -ENOENT/-ECONNREFUSED (no daemon
 * listening), -ETIMEDOUT, -EPROTO, or another -errno. */
int control_call(const char *name, const char *request, char *text, size_t size);

#endif
