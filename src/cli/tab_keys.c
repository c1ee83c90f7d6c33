/* Where the passphrases of a qcowtab entry come from, in turn: its systemd
 * credential (read from $CREDENTIALS_DIRECTORY, where systemd puts what the
 * unit's LoadCredential=/LoadCredentialEncrypted= load), its key file (a
 * file, a device, or an AF_UNIX socket a key server listens on), the
 * passphrase that opened an earlier same-passphrase entry, then the
 * questions: on the terminal, through systemd's password agents
 * (systemd-ask-password) when there is no terminal and systemd runs, or one
 * line of standard input when it is a pipe; never with headless= (tab.h). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "log.h"
#include "passphrase.h"
#include "qcowsetup.h"
#include "secure.h"
#include "tab.h"

static const char *find_program(const char *name, char *buf, size_t size)
{
	const char *path = getenv("PATH");
	char dirs[4096];
	char *save = NULL;

	snprintf(dirs, sizeof(dirs), "%s:/usr/bin:/bin:/usr/sbin:/sbin", path ? path : "");
	for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
		if (!*d)
			continue;
		if ((size_t)snprintf(buf, size, "%s/%s", d, name) < size && access(buf, X_OK) == 0)
			return buf;
	}
	return NULL;
}

static enum ask_how ask_method(const struct qcowtab_entry *e)
{
	char prog[PATH_MAX];
	struct stat st;

	if (opt.batch_mode || e->headless)
		return ASK_NOWHERE;	/* no questions: key files only */
	if (isatty(STDIN_FILENO))
		return ASK_TTY;
	if (fstat(STDIN_FILENO, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISREG(st.st_mode) || S_ISSOCK(st.st_mode)))
		return ASK_STDIN;
	if (access("/run/systemd/system", F_OK) == 0 && find_program("systemd-ask-password", prog, sizeof(prog)))
		return ASK_AGENT;
	return ASK_NOWHERE;
}

/* One line from systemd-ask-password, into secure memory. */
static int ask_agent(const char *names, const char *id, unsigned int timeout, bool accept_cached,
		     enum qcowtab_echo echo, struct passphrase **out)
{
	static const char *const echo_arg[] = {
		[QCOWTAB_ECHO_NO] = "--echo=no", [QCOWTAB_ECHO_YES] = "--echo=yes",
		[QCOWTAB_ECHO_MASKED] = "--echo=masked",
	};
	char prog[PATH_MAX], prompt[512], idarg[256], tmo[64];
	const char *argv[11];
	int pfd[2], status, argc = 0, r;
	char *buf = NULL;
	size_t len = 0;
	pid_t pid;

	*out = NULL;
	if (!find_program("systemd-ask-password", prog, sizeof(prog)))
		return -ENOENT;
	snprintf(prompt, sizeof(prompt), "Please enter passphrase for %s:", names);
	snprintf(idarg, sizeof(idarg), "--id=qcowsetup:%s", id);
	snprintf(tmo, sizeof(tmo), "--timeout=%us", timeout);
	argv[argc++] = prog;
	argv[argc++] = "--icon=drive-harddisk";
	argv[argc++] = idarg;
	argv[argc++] = "--keyname=qcowsetup";
	argv[argc++] = tmo;
	if (accept_cached)
		argv[argc++] = "--accept-cached";
	if (echo != QCOWTAB_ECHO_DEFAULT)
		argv[argc++] = echo_arg[echo];
	argv[argc++] = prompt;
	argv[argc] = NULL;
	if (pipe2(pfd, O_CLOEXEC) < 0)
		return -errno;
	pid = fork();
	if (pid < 0) {
		r = -errno;
		close(pfd[0]);
		close(pfd[1]);
		return r;
	}
	if (pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		execv(prog, (char *const *)argv);
		_exit(127);
	}
	close(pfd[1]);
	buf = secure_alloc(PASSPHRASE_MAX_SIZE + 1);
	r = buf ? 0 : -ENOMEM;
	for (;;) {
		ssize_t n;

		if (!buf)
			break;
		n = read(pfd[0], buf + len, PASSPHRASE_MAX_SIZE - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
		if (len == PASSPHRASE_MAX_SIZE)
			break;
	}
	close(pfd[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (r == 0 && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
		log_err("systemd-ask-password got no passphrase for %s.", names);
		r = -EPIPE;
	}
	if (r == 0) {
		char *nl = memchr(buf, '\n', len);

		if (nl)
			len = (size_t)(nl - buf);
		r = passphrase_from_buffer(buf, len, out);
	}
	secure_free(buf);
	return r;
}

static int question(struct entry_keys *k, struct passphrase **pp)
{
	const struct qcowtab_entry *e = k->e;
	const char *names = e->same_passphrase && k->t->group_names ? k->t->group_names : e->name;
	static const enum passphrase_echo tty_echo[] = {
		[QCOWTAB_ECHO_DEFAULT] = PASSPHRASE_ECHO_OFF, [QCOWTAB_ECHO_NO] = PASSPHRASE_ECHO_OFF,
		[QCOWTAB_ECHO_YES] = PASSPHRASE_ECHO_ON, [QCOWTAB_ECHO_MASKED] = PASSPHRASE_ECHO_MASKED,
	};
	struct passphrase_opts po = { .image_name = names, .timeout = e->timeout, .echo = tty_echo[e->password_echo] };
	int r;

	if (k->asked && (k->how == ASK_STDIN || (e->tries && k->asked >= e->tries))) {
		if (k->how != ASK_STDIN)
			log_err("%s: no passphrase opened it after %u attempts.", e->name, k->asked);
		return -EPERM;
	}
	k->asked++;
	switch (k->how) {
	case ASK_AGENT:
		r = ask_agent(names, e->name, e->timeout, e->same_passphrase && k->asked == 1, e->password_echo, pp);
		break;
	case ASK_TTY:
	case ASK_STDIN:
		/* no key file: the terminal (prompt, no echo), or a line of stdin */
		r = tools_read_passphrase(&po, pp);
		break;
	default:
		log_err("%s: %s.", e->name, opt.batch_mode ? "a passphrase is needed and --batch-mode asks no questions"
			: e->headless ? "a passphrase is needed and the entry is headless (no questions)"
			: "no terminal and no password agent to ask for a passphrase");
		return -EPERM;
	}
	/* no answer (end of input, timeout, the agent gave up): no permission */
	return r == -EPIPE || r == -ETIMEDOUT ? -EPERM : r;
}

/* The file of the entry's credential: $CREDENTIALS_DIRECTORY/ID, where
 * systemd puts the unit's credentials. false (logged) when there is none. */
static bool credential_file(const struct qcowtab_entry *e, char *path, size_t size)
{
	const char *dir = getenv("CREDENTIALS_DIRECTORY");

	if (!dir || dir[0] != '/') {
		log_std("%s: no credential %s: not run by a unit that loads it ($CREDENTIALS_DIRECTORY is not set).",
			e->name, e->credential);
		return false;
	}
	if ((size_t)snprintf(path, size, "%s/%s", dir, e->credential) >= size)
		return false;
	if (access(path, F_OK) < 0) {
		log_std("%s: no credential %s in %s.", e->name, e->credential, dir);
		return false;
	}
	return true;
}

/* The credential, then the key file: the first that can be read. 0 with
 * *pp, 1 when none is left, -ENOMEM. */
static int next_key_source(struct entry_keys *k, const char *image, struct passphrase **pp)
{
	const struct qcowtab_entry *e = k->e;
	char cred[PATH_MAX];
	int r;

	while (k->step < KEY_SHARED) {
		bool is_cred = k->step == KEY_CREDENTIAL;
		const char *file = is_cred ? (e->credential && credential_file(e, cred, sizeof(cred)) ? cred : NULL)
					   : k->key_file;
		struct passphrase_opts po = {
			.key_file = file,
			.keyfile_offset = e->keyfile_offset,
			.keyfile_size = e->keyfile_size,
			.image_name = image,
			.volume = e->name,	/* what a key socket is told */
		};

		k->step++;
		if (!file)
			continue;
		r = tools_read_passphrase(&po, pp);
		if (r == 0) {
			k->served = is_cred ? "the credential" : "the key file";
			return 0;
		}
		if (r == -ENOMEM)
			return r;
		log_std("%s: the %s %s cannot be read.", e->name, is_cred ? "credential" : "key file",
			is_cred ? e->credential : file);
	}
	return 1;
}

int tab_entry_passphrase(void *opaque, const char *image, unsigned int attempt, struct passphrase **pp)
{
	struct entry_keys *k = opaque;
	const struct qcowtab_entry *e = k->e;
	int r;

	(void)attempt;
	k->asked_last = false;
	if (k->served)
		log_std("%s: %s did not unlock %s.", e->name, k->served, image);
	k->served = NULL;
	r = next_key_source(k, image, pp);
	if (r <= 0)
		return r;
	if (k->step == KEY_SHARED) {
		k->step = KEY_ASK;
		if (e->same_passphrase && k->t->shared)
			return passphrase_from_buffer(k->t->shared->data, k->t->shared->len, pp);
	} else if (e->same_passphrase && k->t->shared && !k->asked) {
		log_std("%s: the shared passphrase does not open it; asking again.", e->name);
	}
	if (!k->asked)
		k->how = ask_method(e);
	r = question(k, pp);
	if (r == 0 && e->same_passphrase) {
		passphrase_free(k->last);
		k->last = NULL;
		r = passphrase_from_buffer((*pp)->data, (*pp)->len, &k->last);
		if (r) {
			passphrase_free(*pp);
			*pp = NULL;
		}
		k->asked_last = r == 0;
	}
	return r;
}
