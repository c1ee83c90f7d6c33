/* One logging function for the whole program, with levels and a callback.
 * Never pass a key or a passphrase to it. */
#ifndef QS_LOG_H
#define QS_LOG_H

enum qs_log_level {
	QS_LOG_ERR = 0,		/* always shown, on stderr */
	QS_LOG_NORMAL,		/* normal output on stderr (warnings, notes) */
	QS_LOG_VERBOSE,		/* --verbose */
	QS_LOG_DEBUG,		/* --debug */
};

typedef void (*qs_log_fn)(enum qs_log_level level, const char *msg, void *userdata);

void qs_log_set_level(enum qs_log_level max);
enum qs_log_level qs_log_get_level(void);
void qs_log_set_callback(qs_log_fn fn, void *userdata);
void qs_log(enum qs_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_err(...) qs_log(QS_LOG_ERR, __VA_ARGS__)
#define log_std(...) qs_log(QS_LOG_NORMAL, __VA_ARGS__)
#define log_verbose(...) qs_log(QS_LOG_VERBOSE, __VA_ARGS__)
#define log_dbg(...) qs_log(QS_LOG_DEBUG, __VA_ARGS__)

#endif
