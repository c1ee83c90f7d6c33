/* ask-agent: a systemd password agent for the VM tests (tests/vm/guest/hostile.sh).
 *
 *   ask-agent [-l LOG] [-d DIR] [PASSPHRASE...]
 *
 * Watches DIR (default /run/systemd/ask-password) for the ask.* files that
 * systemd-ask-password writes (polling every 20 ms), and answers each new
 * question with the next PASSPHRASE: "+PASSPHRASE" as one datagram to the
 * AF_UNIX socket named by its Socket= line, as systemd's agents do
 * (systemd.io/PASSWORD_AGENTS). Questions past their NotAfter= are ignored;
 * once the passphrases run out (or with none), questions stay unanswered.
 * Each question is logged as one line to LOG (default standard output):
 *
 *   question ID MESSAGE: answered N | unanswered
 *
 * Runs until SIGTERM or SIGINT; exit 0, 1 on a usage or system error. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_SEEN 256

struct question {
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char id[256];
	char message[512];
	uint64_t not_after;	/* CLOCK_MONOTONIC, microseconds; 0: none */
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static uint64_t now_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void copy_value(char *dst, size_t size, const char *src)
{
	size_t n = strcspn(src, "\n");

	if (n >= size)
		n = size - 1;
	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* Parse an ask file; 0 when it names a socket. */
static int parse_question(const char *path, struct question *q)
{
	char line[1024];
	FILE *f = fopen(path, "re");

	memset(q, 0, sizeof(*q));
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, "Socket=", 7))
			copy_value(q->socket, sizeof(q->socket), line + 7);
		else if (!strncmp(line, "Id=", 3))
			copy_value(q->id, sizeof(q->id), line + 3);
		else if (!strncmp(line, "Message=", 8))
			copy_value(q->message, sizeof(q->message), line + 8);
		else if (!strncmp(line, "NotAfter=", 9))
			q->not_after = strtoull(line + 9, NULL, 10);
	}
	fclose(f);
	return q->socket[0] ? 0 : -EINVAL;
}

static int answer(const struct question *q, const char *passphrase)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t len = strlen(passphrase);
	char *msg = malloc(len + 1);
	ssize_t n;
	int fd, r = 0;

	if (!msg)
		return -ENOMEM;
	msg[0] = '+';
	memcpy(msg + 1, passphrase, len);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", q->socket);
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		r = -errno;
	} else {
		n = sendto(fd, msg, len + 1, MSG_NOSIGNAL, (struct sockaddr *)&sa, sizeof(sa));
		if (n < 0)
			r = -errno;
		close(fd);
	}
	memset(msg, 0, len + 1);
	free(msg);
	return r;
}

int main(int argc, char **argv)
{
	const char *dir = "/run/systemd/ask-password";
	char seen[MAX_SEEN][NAME_MAX + 1];
	size_t nseen = 0, next = 0;
	FILE *log = stdout;
	int opt, npass;
	char **pass;

	while ((opt = getopt(argc, argv, "l:d:")) != -1) {
		switch (opt) {
		case 'l':
			log = fopen(optarg, "ae");
			if (!log) {
				perror(optarg);
				return 1;
			}
			break;
		case 'd':
			dir = optarg;
			break;
		default:
			fprintf(stderr, "usage: ask-agent [-l LOG] [-d DIR] [PASSPHRASE...]\n");
			return 1;
		}
	}
	pass = argv + optind;
	npass = argc - optind;
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	setvbuf(log, NULL, _IOLBF, 0);

	while (!stop) {
		DIR *d = opendir(dir);
		struct dirent *de;

		while (d && (de = readdir(d))) {
			char path[PATH_MAX];
			struct question q;
			size_t i;
			int r;

			if (strncmp(de->d_name, "ask.", 4))
				continue;
			for (i = 0; i < nseen; i++)
				if (!strcmp(seen[i], de->d_name))
					break;
			if (i < nseen)
				continue;
			snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
			if (parse_question(path, &q) < 0)
				continue;	/* (not complete yet: the next round) */
			snprintf(seen[nseen % MAX_SEEN], sizeof(seen[0]), "%s", de->d_name);
			if (nseen < MAX_SEEN)
				nseen++;
			if (q.not_after && now_usec() > q.not_after) {
				fprintf(log, "question %s %s: expired\n", q.id, q.message);
				continue;
			}
			if ((int)next >= npass) {
				fprintf(log, "question %s %s: unanswered\n", q.id, q.message);
				continue;
			}
			r = answer(&q, pass[next]);
			fprintf(log, "question %s %s: answered %zu%s%s\n", q.id, q.message, next + 1,
				r ? ", but " : "", r ? strerror(-r) : "");
			next++;
		}
		if (d)
			closedir(d);
		usleep(20 * 1000);
	}
	return 0;
}
