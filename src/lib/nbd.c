/* The kernel NBD driver through generic netlink (see nbd.h). Messages are
 * built by hand: a request is one netlink header, one generic netlink
 * header and a few attributes. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <linux/netlink.h>

#include "log.h"
#include "nbd.h"
#include "util.h"

#define NL_BUF 8192

struct nlmsg {
	uint8_t buf[NL_BUF] __attribute__((aligned(8)));
	size_t len;
};

static void msg_init(struct nlmsg *m, uint16_t family, uint8_t cmd, uint8_t version)
{
	struct nlmsghdr *h = (struct nlmsghdr *)m->buf;
	struct genlmsghdr *g = (struct genlmsghdr *)(m->buf + NLMSG_HDRLEN);

	memset(m->buf, 0, NLMSG_HDRLEN + GENL_HDRLEN);
	h->nlmsg_type = family;
	h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	h->nlmsg_seq = 1;
	g->cmd = cmd;
	g->version = version;
	m->len = NLMSG_HDRLEN + GENL_HDRLEN;
}

static int put_attr(struct nlmsg *m, uint16_t type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)(m->buf + m->len);
	size_t total = NLA_ALIGN(NLA_HDRLEN + len);

	if (m->len + total > sizeof(m->buf))
		return -EMSGSIZE;
	memset(a, 0, total);
	a->nla_len = (uint16_t)(NLA_HDRLEN + len);
	a->nla_type = type;
	if (len)
		memcpy((uint8_t *)a + NLA_HDRLEN, data, len);
	m->len += total;
	return 0;
}

static int put_u32(struct nlmsg *m, uint16_t type, uint32_t v)
{
	return put_attr(m, type, &v, sizeof(v));
}

static int put_u64(struct nlmsg *m, uint16_t type, uint64_t v)
{
	return put_attr(m, type, &v, sizeof(v));
}

static int put_str(struct nlmsg *m, uint16_t type, const char *s)
{
	return put_attr(m, type, s, strlen(s) + 1);
}

/* Nested attributes: start returns where the header is, end fixes its length. */
static size_t nest_start(struct nlmsg *m, uint16_t type)
{
	size_t at = m->len;

	put_attr(m, type, NULL, 0);
	return at;
}

static void nest_end(struct nlmsg *m, size_t at)
{
	((struct nlattr *)(m->buf + at))->nla_len = (uint16_t)(m->len - at);
}

/* Find attribute type among the attributes of a generic netlink reply. */
static const struct nlattr *find_attr(const struct nlmsghdr *h, uint16_t type)
{
	const uint8_t *p = (const uint8_t *)h + NLMSG_HDRLEN + GENL_HDRLEN, *end = (const uint8_t *)h + h->nlmsg_len;

	while (p + NLA_HDRLEN <= end) {
		const struct nlattr *a = (const struct nlattr *)p;

		if (a->nla_len < NLA_HDRLEN || p + a->nla_len > end)
			break;
		if ((a->nla_type & NLA_TYPE_MASK) == type)
			return a;
		p += NLA_ALIGN(a->nla_len);
	}
	return NULL;
}

static int nl_open(void)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);

	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	return fd;
}

/* Send m, then read until the acknowledgement; reply (may be NULL) gets a
 * copy of the first data message. 0 or the kernel's -errno. */
static int transact(int fd, struct nlmsg *m, struct nlmsg *reply)
{
	struct sockaddr_nl to = { .nl_family = AF_NETLINK };
	uint8_t buf[NL_BUF] __attribute__((aligned(8)));
	bool got = false;

	((struct nlmsghdr *)m->buf)->nlmsg_len = (uint32_t)m->len;
	if (sendto(fd, m->buf, m->len, 0, (struct sockaddr *)&to, sizeof(to)) < 0)
		return -errno;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		size_t left;
		const struct nlmsghdr *h;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		left = (size_t)n;
		for (h = (const struct nlmsghdr *)buf; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *e = NLMSG_DATA(h);

				return e->error;	/* 0: the acknowledgement */
			}
			if (h->nlmsg_type == NLMSG_DONE)
				return 0;
			if (reply && !got && h->nlmsg_len <= sizeof(reply->buf)) {
				memcpy(reply->buf, h, h->nlmsg_len);
				reply->len = h->nlmsg_len;
				got = true;
			}
		}
	}
}

static int family_id(int fd, uint16_t *id)
{
	struct nlmsg m, reply;
	const struct nlattr *a;
	int r;

	msg_init(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
	r = put_str(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
	if (r)
		return r;
	reply.len = 0;
	r = transact(fd, &m, &reply);
	if (r)
		return r;
	if (!reply.len || !(a = find_attr((const struct nlmsghdr *)reply.buf, CTRL_ATTR_FAMILY_ID)))
		return -ENOENT;
	memcpy(id, (const uint8_t *)a + NLA_HDRLEN, sizeof(*id));
	return 0;
}

static int modprobe_nbd(void)
{
	const char *paths[] = { "/sbin/modprobe", "/usr/sbin/modprobe", "/bin/modprobe", "/usr/bin/modprobe" };
	int status;
	pid_t pid;

	for (size_t i = 0; i < ARRAY_SIZE(paths); i++) {
		if (access(paths[i], X_OK))
			continue;
		pid = fork();
		if (pid < 0)
			return -errno;
		if (pid == 0) {
			execl(paths[i], "modprobe", "-q", "nbd", (char *)NULL);
			_exit(127);
		}
		while (waitpid(pid, &status, 0) < 0)
			if (errno != EINTR)
				return -errno;
		return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -ENODEV;
	}
	return -ENODEV;
}

/* A netlink socket and the family, loading the module when needed. */
static int nbd_nl(int *fd, uint16_t *family)
{
	int r;

	*fd = nl_open();
	if (*fd < 0) {
		log_err("Cannot open a generic netlink socket: %s.", strerror(-*fd));
		return *fd;
	}
	r = family_id(*fd, family);
	if (r == -ENOENT && modprobe_nbd() == 0)
		r = family_id(*fd, family);
	if (r) {
		log_err("The kernel's nbd driver is not available (kernel module nbd): %s.", strerror(-r));
		close(*fd);
		*fd = -1;
		return -ENODEV;
	}
	return 0;
}

int nbd_check(void)
{
	uint16_t family;
	int fd, r;

	r = nbd_nl(&fd, &family);
	if (r == 0)
		close(fd);
	return r;
}

static int put_sockets(struct nlmsg *m, const int *socks, unsigned int n)
{
	size_t list = nest_start(m, NBD_ATTR_SOCKETS);
	int r = 0;

	for (unsigned int i = 0; i < n && !r; i++) {
		size_t item = nest_start(m, NBD_SOCK_ITEM);

		r = put_u32(m, NBD_SOCK_FD, (uint32_t)socks[i]);
		nest_end(m, item);
	}
	nest_end(m, list);
	return r;
}

int nbd_connect(const int *socks, unsigned int nsocks, const struct nbd_params *p, int *index)
{
	struct nlmsg m, reply;
	const struct nlattr *a;
	uint64_t flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
	uint16_t family;
	int fd, r;

	r = nbd_nl(&fd, &family);
	if (r)
		return r;
	if (p->read_only)
		flags |= NBD_FLAG_READ_ONLY;
	if (p->trim)
		flags |= NBD_FLAG_SEND_TRIM;
	/* a flush on one connection covers the writes completed on all (the
	 * kernel refuses several connections without it) */
	if (nsocks > 1)
		flags |= NBD_FLAG_CAN_MULTI_CONN;
	msg_init(&m, family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
	r = put_u64(&m, NBD_ATTR_SIZE_BYTES, p->size);
	if (!r)
		r = put_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, p->block_size ? p->block_size : 512);
	if (!r)
		r = put_u64(&m, NBD_ATTR_SERVER_FLAGS, flags);
	if (!r)
		r = put_u64(&m, NBD_ATTR_CLIENT_FLAGS, 0);
	if (!r && p->timeout)
		r = put_u64(&m, NBD_ATTR_TIMEOUT, p->timeout);
	if (!r)
		r = put_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, p->dead_conn_timeout);
	if (!r && p->backend)
		r = put_str(&m, NBD_ATTR_BACKEND_IDENTIFIER, p->backend);
	if (!r)
		r = put_sockets(&m, socks, nsocks);
	if (r) {
		close(fd);
		return r;
	}
	reply.len = 0;
	r = transact(fd, &m, &reply);
	close(fd);
	if (r) {
		log_err("Cannot connect an NBD device: %s.", strerror(-r));
		return r;
	}
	if (!reply.len || !(a = find_attr((const struct nlmsghdr *)reply.buf, NBD_ATTR_INDEX))) {
		log_err("The kernel did not say which NBD device it connected.");
		return -EIO;
	}
	{
		uint32_t v;

		memcpy(&v, (const uint8_t *)a + NLA_HDRLEN, sizeof(v));
		*index = (int)v;
	}
	log_dbg("nbd%d connected (%" PRIu64 " bytes%s, %u connection%s)", *index, p->size,
		p->read_only ? ", read-only" : "", nsocks, nsocks == 1 ? "" : "s");
	return 0;
}

/* A command to device index, with new server sockets when nsocks > 0 (and a
 * backend name, if any), a new size when size > 0; on failure "Cannot
 * <what>: <error>." */
static int device_command(int index, uint8_t cmd, const int *socks, unsigned int nsocks, const char *backend,
			  uint64_t size, const char *what)
{
	struct nlmsg m;
	uint16_t family;
	int fd, r;

	r = nbd_nl(&fd, &family);
	if (r)
		return r;
	msg_init(&m, family, cmd, NBD_GENL_VERSION);
	r = put_u32(&m, NBD_ATTR_INDEX, (uint32_t)index);
	if (!r && backend)
		r = put_str(&m, NBD_ATTR_BACKEND_IDENTIFIER, backend);
	if (!r && nsocks)
		r = put_sockets(&m, socks, nsocks);
	if (!r && size)
		r = put_u64(&m, NBD_ATTR_SIZE_BYTES, size);
	if (!r)
		r = transact(fd, &m, NULL);
	close(fd);
	if (r)
		log_err("Cannot %s: %s.", what, strerror(-r));
	return r;
}

int nbd_reconnect(int index, const int *socks, unsigned int nsocks, const char *backend)
{
	char what[64];

	snprintf(what, sizeof(what), "give nbd%d a new server", index);
	return device_command(index, NBD_CMD_RECONFIGURE, socks, nsocks, backend, 0, what);
}

int nbd_set_size(int index, uint64_t size, const char *backend)
{
	char what[80];

	snprintf(what, sizeof(what), "give nbd%d a size of %" PRIu64 " bytes", index, size);
	return device_command(index, NBD_CMD_RECONFIGURE, NULL, 0, backend, size, what);
}

int nbd_disconnect(int index)
{
	char what[32];

	snprintf(what, sizeof(what), "disconnect nbd%d", index);
	return device_command(index, NBD_CMD_DISCONNECT, NULL, 0, NULL, 0, what);
}

static int read_sysfs(const char *path, char *buf, size_t size)
{
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -errno;
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = '\0';
	return 0;
}

int nbd_device_number(int index, uint32_t *major, uint32_t *minor)
{
	char path[64], buf[32];
	int r;

	snprintf(path, sizeof(path), "/sys/block/nbd%d/dev", index);
	r = read_sysfs(path, buf, sizeof(buf));
	if (r)
		return r;
	if (sscanf(buf, "%u:%u", major, minor) != 2)
		return -EINVAL;
	return 0;
}

int nbd_device_pid(int index, pid_t *pid)
{
	char path[64], buf[32];
	int r;

	*pid = 0;
	snprintf(path, sizeof(path), "/sys/block/nbd%d/pid", index);
	r = read_sysfs(path, buf, sizeof(buf));
	if (r == -ENOENT)
		return 0;
	if (r)
		return r;
	*pid = (pid_t)strtol(buf, NULL, 10);
	return 0;
}

int nbd_index_of(uint32_t major, uint32_t minor)
{
	char path[96], buf[512], *p;
	int r;

	if (major != NBD_DEV_MAJOR)
		return -ENODEV;
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/uevent", major, minor);
	r = read_sysfs(path, buf, sizeof(buf));
	if (r)
		return r;
	p = strstr(buf, "DEVNAME=nbd");
	if (!p)
		return -ENODEV;
	return (int)strtol(p + strlen("DEVNAME=nbd"), NULL, 10);
}

int nbd_parse_request(const uint8_t hdr[NBD_REQUEST_SIZE], struct nbd_req *req)
{
	uint32_t type;

	if (get_be32(hdr) != NBD_REQUEST_MAGIC)
		return -EBADMSG;
	type = get_be32(hdr + 4);
	req->command = (uint16_t)(type & 0xffff);
	req->fua = type & NBD_CMD_FLAG_FUA;
	memcpy(req->handle, hdr + 8, 8);
	req->from = get_be64(hdr + 16);
	req->len = get_be32(hdr + 24);
	return 0;
}

void nbd_format_reply(uint8_t out[NBD_REPLY_SIZE], const struct nbd_req *req, int error)
{
	put_be32(out, NBD_REPLY_MAGIC);
	put_be32(out + 4, (uint32_t)error);
	memcpy(out + 8, req->handle, 8);
}
