/* key-server: a key server on an AF_UNIX stream socket, as crypttab(5)'s
 * "AF_UNIX key files" describe them, for the tests (tests/admin/test-keysrc.sh
 * on the host, tests/vm/guest/tab.sh in the VM).
 *
 *   key-server SOCKET LOG VOLUME=KEYFILE...
 *
 * Listens on SOCKET (created; removed on SIGTERM/SIGINT). For each
 * connection it reads the client's socket name (getpeername(2)); a name in
 * the abstract namespace of the form "\0RANDOM/cryptsetup/VOLUME" gets the
 * content of the KEYFILE given for VOLUME, anything else nothing (the
 * connection is closed). Each connection is one line in LOG:
 *
 *   peer @RANDOM/cryptsetup/VOLUME: sent N | refused
 *
 * ('@' for the leading NUL). Exit 0 on SIGTERM/SIGINT, 1 on a usage or
 * system error. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

/* The KEYFILE argument for volume, or NULL. */
static const char *key_for(int argc, char **argv, const char *volume)
{
	size_t n = strlen(volume);

	for (int i = 3; i < argc; i++)
		if (!strncmp(argv[i], volume, n) && argv[i][n] == '=')
			return argv[i] + n + 1;
	return NULL;
}

/* Send the file's bytes; their count, or -1. */
static long send_file(int c, const char *path)
{
	char buf[4096];
	long total = 0;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		if (write(c, buf, (size_t)n) != n) {
			total = -1;
			break;
		}
		total += n;
	}
	close(fd);
	return n < 0 ? -1 : total;
}

int main(int argc, char **argv)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct sigaction sig = { .sa_handler = on_signal };
	FILE *log;
	int s;

	if (argc < 4 || strlen(argv[1]) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "usage: key-server SOCKET LOG VOLUME=KEYFILE...\n");
		return 1;
	}
	log = fopen(argv[2], "ae");
	if (!log) {
		perror(argv[2]);
		return 1;
	}
	setvbuf(log, NULL, _IOLBF, 0);
	sigaction(SIGTERM, &sig, NULL);
	sigaction(SIGINT, &sig, NULL);
	memcpy(sa.sun_path, argv[1], strlen(argv[1]));
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(s, 8) < 0) {
		perror(argv[1]);
		return 1;
	}
	while (!stop) {
		struct sockaddr_un peer;
		socklen_t len = sizeof(peer);
		char name[sizeof(peer.sun_path) + 1];
		const char *key = NULL, *vol;
		size_t n;
		long sent = -1;
		int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);

		if (c < 0) {
			if (errno == EINTR)
				continue;
			perror("accept");
			break;
		}
		memset(&peer, 0, sizeof(peer));
		if (getpeername(c, (struct sockaddr *)&peer, &len) == 0 && len > offsetof(struct sockaddr_un, sun_path)) {
			n = len - offsetof(struct sockaddr_un, sun_path);
			memcpy(name, peer.sun_path, n);
			name[n] = '\0';
			if (!name[0] && n > 1) {
				name[0] = '@';
				vol = strstr(name, "/cryptsetup/");
				if (vol)
					key = key_for(argc, argv, vol + strlen("/cryptsetup/"));
			}
		} else {
			snprintf(name, sizeof(name), "(unnamed)");
		}
		if (key)
			sent = send_file(c, key);
		if (sent >= 0)
			fprintf(log, "peer %s: sent %ld\n", name, sent);
		else
			fprintf(log, "peer %s: refused\n", name);
		close(c);
	}
	unlink(argv[1]);
	return 0;
}
