/* The number parser of every command line, qcowtab field and daemon
 * argument (util.h). Pure. */
#include <errno.h>
#include <string.h>

#include "log.h"
#include "util.h"

int parse_u64(const char *s, unsigned int flags, uint64_t *v)
{
	static const struct {
		char unit;
		unsigned int shift;
	} units[] = { { 'K', 10 }, { 'M', 20 }, { 'G', 30 }, { 'T', 40 } };
	uint64_t r = 0;
	const char *p = s;
	unsigned int shift = 0;

	if (!s || *p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++)
		if (umul64_overflow(r, 10, &r) || uadd64_overflow(r, (uint64_t)(*p - '0'), &r))
			return -ERANGE;
	if (*p && (flags & PARSE_SIZE)) {
		size_t i;

		for (i = 0; i < ARRAY_SIZE(units); i++)
			if ((*p & ~0x20) == units[i].unit)
				break;
		if (i == ARRAY_SIZE(units))
			return -EINVAL;
		shift = units[i].shift;
		p++;
		if (*p && strcmp(p, "iB") && strcmp(p, "B"))
			return -EINVAL;
		p += strlen(p);
	}
	if (*p)
		return -EINVAL;
	if (shift && r > (UINT64_MAX >> shift))
		return -ERANGE;
	*v = r << shift;
	return 0;
}

int fault_step(int *step, int fail_at, const char *verb, const char *what)
{
	++*step;
	log_dbg("%s step %d: %s", verb, *step, what);
	if (fail_at && *step == fail_at) {
		log_err("Injected failure at step %d (%s).", *step, what);
		return -EIO;
	}
	return 0;
}
