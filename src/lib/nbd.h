/* Kernel NBD devices: the one wrapper of the nbd driver's interfaces (nbd.c
 * is the only file with its netlink family and ioctls). The slow path of a
 * mapping is an NBD device whose server is the daemon, at the other end of a
 * socketpair: no network, no TCP, guest offsets 1:1.
 *
 * Netlink (generic family "nbd", Linux >= 4.12) rather than NBD_DO_IT: no
 * thread has to sit in an ioctl, the device stays configured when its server
 * dies (I/O to it fails: at once for new requests, after the request timeout
 * for those in flight), and NBD_CMD_RECONFIGURE gives it a new server socket
 * (daemon restart). Every function returns 0 or a negative errno, with a
 * message logged for what a user can act on. */
#ifndef QS_NBD_H
#define QS_NBD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define NBD_DEV_MAJOR		43
#define NBD_BACKEND_MAX		64

struct nbd_params {
	uint64_t size;			/* bytes, a multiple of block_size */
	uint32_t block_size;		/* 512 */
	bool read_only;
	bool trim;			/* advertise discard */
	/* Seconds before a request without a reply is retried on a reset
	 * connection (the server reconnects) or failed (the server is dead).
	 * 0: the kernel default (never fail). */
	unsigned int timeout;
	/* Seconds new requests wait for a dead server to be replaced; 0:
	 * they fail at once. */
	unsigned int dead_conn_timeout;
	/* Identifier shown in /sys/block/nbdN/backend and required by
	 * nbd_reconnect(); NULL: none. */
	const char *backend;
};

/* Is the nbd driver usable (loads the module when needed)? 0 or -ENODEV
 * with a message. */
int nbd_check(void);

/* Connect the kernel ends of nsocks socketpairs (socks, which the kernel
 * takes references to: the caller closes its copies afterwards) to a free
 * NBD device; *index is the device (nbdN). Several sockets are several
 * connections: the kernel gives the device as many hardware queues and
 * sends each request on the connection of the queue of the CPU that
 * submitted it (a dead connection's requests go to a live one). The request
 * works in the calling process's name: /sys/block/nbdN/pid shows it. */
int nbd_connect(const int *socks, unsigned int nsocks, const struct nbd_params *p, int *index);

/* Give device index new server sockets for dead connections (each socket
 * replaces one; the backend identifier must match the one of nbd_connect):
 * after a restart of its server, or one connection shut down by a timeout.
 * The number of connections was fixed by nbd_connect. */
int nbd_reconnect(int index, const int *socks, unsigned int nsocks, const char *backend);

/* A new size for a connected device (NBD_CMD_RECONFIGURE with a size,
 * Linux >= 5.3), backend as given to nbd_connect. */
int nbd_set_size(int index, uint64_t size, const char *backend);

/* Disconnect: the server gets NBD_CMD_DISC, then its socket closes. */
int nbd_disconnect(int index);

/* Major and minor of nbdN (from sysfs). */
int nbd_device_number(int index, uint32_t *major, uint32_t *minor);

/* The server process of nbdN as the kernel knows it (sysfs "pid"), 0 when
 * the device is not connected. */
int nbd_device_pid(int index, pid_t *pid);

/* The NBD index of a device number, or -ENODEV when it is not NBD. */
int nbd_index_of(uint32_t major, uint32_t minor);

/* The wire protocol the kernel speaks on the socket (simple replies). */
#define NBD_REQUEST_SIZE	28
#define NBD_REPLY_SIZE		16

enum nbd_command {
	NBD_REQ_READ = 0,
	NBD_REQ_WRITE = 1,
	NBD_REQ_DISC = 2,
	NBD_REQ_FLUSH = 3,
	NBD_REQ_TRIM = 4,
};

struct nbd_req {
	uint16_t command;	/* enum nbd_command */
	bool fua;
	uint8_t handle[8];
	uint64_t from;
	uint32_t len;
};

/* Decode a request header; -EBADMSG for a wrong magic. */
int nbd_parse_request(const uint8_t hdr[NBD_REQUEST_SIZE], struct nbd_req *req);
/* Encode the reply to req: error is a positive errno, 0 for success. */
void nbd_format_reply(uint8_t out[NBD_REPLY_SIZE], const struct nbd_req *req, int error);

#endif
