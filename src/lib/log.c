#include <stdarg.h>
#include <stdio.h>

#include "log.h"

static enum qs_log_level max_level = QS_LOG_NORMAL;
static qs_log_fn log_fn;
static void *log_userdata;

void qs_log_set_level(enum qs_log_level max)
{
	max_level = max;
}

enum qs_log_level qs_log_get_level(void)
{
	return max_level;
}

void qs_log_set_callback(qs_log_fn fn, void *userdata)
{
	log_fn = fn;
	log_userdata = userdata;
}

void qs_log(enum qs_log_level level, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	if (level > max_level)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (log_fn) {
		log_fn(level, msg, log_userdata);
		return;
	}
	if (level == QS_LOG_DEBUG)
		fprintf(stderr, "# %s\n", msg);
	else
		fprintf(stderr, "%s\n", msg);
}
