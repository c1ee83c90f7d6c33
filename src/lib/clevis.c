/* clevis as a subprocess (clevis.h): posix_spawnp with both ends on pipes,
 * a poll loop that feeds standard input and collects standard output. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "binding.h"
#include "clevis.h"
#include "log.h"
#include "secure.h"

extern char **environ;

#define JWE_OUT_MAX	(BINDING_JWE_MAX + 1)

struct child_io {
	const void *in;		/* fed to standard input, then closed */
	size_t in_len;
	char *out;		/* standard output, up to out_max bytes */
	size_t out_max;
	size_t out_len;
	bool own_group;		/* a process group of its own, killed on timeout */
	unsigned int timeout;	/* seconds, 0: none */
};

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Feed and drain the child until its standard output closes (*in_fdp is
 * closed and set to -1 once all is fed). Returns 0,
 * -ETIMEDOUT, -EMSGSIZE (more output than out_max) or -errno. */
static int pump(int *in_fdp, int out_fd, struct child_io *c)
{
	int in_fd = *in_fdp;
	int64_t deadline = c->timeout ? now_ms() + (int64_t)c->timeout * 1000 : 0;
	size_t fed = 0;

	while (out_fd >= 0) {
		struct pollfd p[2] = { { .fd = out_fd, .events = POLLIN }, { .fd = in_fd, .events = POLLOUT } };
		int wait = -1, n;

		if (deadline) {
			int64_t left = deadline - now_ms();

			if (left <= 0)
				return -ETIMEDOUT;
			wait = (int)left;
		}
		n = poll(p, in_fd >= 0 ? 2 : 1, wait);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (in_fd >= 0 && p[1].revents) {
			ssize_t w = fed < c->in_len ? write(in_fd, (const char *)c->in + fed, c->in_len - fed) : 0;

			if (w > 0)
				fed += (size_t)w;
			if (w < 0 && errno != EAGAIN && errno != EINTR)
				fed = c->in_len;	/* the child stopped reading */
			if (fed >= c->in_len) {
				close(in_fd);
				in_fd = *in_fdp = -1;
			}
		}
		if (p[0].revents) {
			ssize_t rd;

			if (c->out_len == c->out_max)
				return -EMSGSIZE;
			rd = read(out_fd, c->out + c->out_len, c->out_max - c->out_len);
			if (rd < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (rd < 0)
				return -errno;
			if (rd == 0)
				break;
			c->out_len += (size_t)rd;
		}
	}
	return 0;
}

/* Run argv (clevis ...) with c; the exit status in *status. */
static int run_child(char *const argv[], struct child_io *c, int *status)
{
	int in[2] = { -1, -1 }, out[2] = { -1, -1 }, r;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	struct sigaction ign = { .sa_handler = SIG_IGN }, old;
	pid_t pid;

	if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0) {
		r = -errno;
		goto close_pipes;
	}
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
	posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
	posix_spawnattr_init(&at);
	if (c->own_group) {
		posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP);
		posix_spawnattr_setpgroup(&at, 0);
	}
	r = -posix_spawnp(&pid, argv[0], &fa, &at, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	close(in[0]);
	close(out[1]);
	in[0] = out[1] = -1;
	if (r < 0) {
		if (r == -ENOENT)
			log_err("clevis is not installed (no %s in PATH).", argv[0]);
		goto close_pipes;
	}
	fcntl(in[1], F_SETFL, O_NONBLOCK);
	sigaction(SIGPIPE, &ign, &old);
	r = pump(&in[1], out[0], c);
	sigaction(SIGPIPE, &old, NULL);
	if (r < 0 && c->own_group)
		kill(-pid, SIGKILL);
	else if (r < 0)
		kill(pid, SIGKILL);
	while (waitpid(pid, status, 0) < 0 && errno == EINTR)
		;
close_pipes:
	for (int i = 0; i < 2; i++) {
		if (in[i] >= 0)
			close(in[i]);
		if (out[i] >= 0)
			close(out[i]);
	}
	return r;
}

static bool exited_ok(int status)
{
	return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int clevis_encrypt(const char *pin, const char *config, bool trust, const struct passphrase *secret,
		   char **jwe)
{
	char *argv[] = { "clevis", "encrypt", (char *)pin, (char *)config, trust ? "-y" : NULL, NULL };
	struct child_io c = { .in = secret->data, .in_len = secret->len, .out_max = JWE_OUT_MAX };
	int status = 0, r;

	*jwe = NULL;
	c.out = malloc(c.out_max + 1);
	if (!c.out)
		return -ENOMEM;
	r = run_child(argv, &c, &status);
	if (r == 0 && !exited_ok(status)) {
		log_err("clevis encrypt %s failed.", pin);
		r = -EINVAL;
	}
	while (r == 0 && c.out_len && (c.out[c.out_len - 1] == '\n' || c.out[c.out_len - 1] == '\r'))
		c.out_len--;
	if (r == 0 && !binding_valid_jwe(c.out, c.out_len)) {
		log_err("clevis encrypt %s gave no compact JWE.", pin);
		r = -EINVAL;
	}
	if (r < 0) {
		free(c.out);
		return r;
	}
	c.out[c.out_len] = '\0';
	*jwe = c.out;
	return 0;
}

int clevis_decrypt(const char *jwe, unsigned int timeout, struct passphrase **secret)
{
	char *argv[] = { "clevis", "decrypt", NULL };
	struct child_io c = {
		.in = jwe, .in_len = strlen(jwe), .out_max = CLEVIS_SECRET_MAX, .own_group = true,
		.timeout = timeout ? timeout : CLEVIS_TIMEOUT_DEFAULT,
	};
	int status = 0, r;

	*secret = NULL;
	c.out = secure_alloc(c.out_max);
	if (!c.out)
		return -ENOMEM;
	r = run_child(argv, &c, &status);
	if (r == -ETIMEDOUT)
		log_std("clevis decrypt did not finish in %u seconds.", c.timeout);
	else if (r == 0 && !exited_ok(status))
		r = -EPERM;
	if (r == 0)
		r = passphrase_from_buffer(c.out, c.out_len, secret);
	secure_free(c.out);
	return r;
}

int clevis_unlock(const struct image *img, unsigned int timeout, struct volume_key **vk, int *slot)
{
	int r = -ENOENT;

	if (!img->bindings || !img->bindings->count)
		return -ENOENT;
	for (unsigned int i = 0; i < img->bindings->count; i++) {
		const struct binding *b = &img->bindings->b[i];
		struct passphrase *pp = NULL;

		r = clevis_decrypt(b->jwe, timeout, &pp);
		if (r == 0) {
			r = luks_unlock(&img->io, img->crypt_header_offset, img->crypt_header_length, pp, vk, slot);
			passphrase_free(pp);
		}
		if (r == 0) {
			log_verbose("%s: unlocked by the %s binding of key slot %u.", img->path, b->pin, b->slot);
			return 0;
		}
		if (r == -ENOMEM)
			return r;
		log_std("%s: the %s binding of key slot %u did not unlock it.", img->path, b->pin, b->slot);
	}
	return -EPERM;
}
