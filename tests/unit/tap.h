/* Minimal test harness: automake's plain protocol (exit 0 pass, 77 skip,
 * anything else fail) with one line per check on stdout. */
#ifndef QS_TAP_H
#define QS_TAP_H

#include <stdio.h>
#include <stdlib.h>

static int tap_failures;
static int tap_count;

#define CHECK(cond, ...) do { \
	tap_count++; \
	if (cond) { \
		printf("ok %d - ", tap_count); \
	} else { \
		tap_failures++; \
		printf("not ok %d - %s:%d: ", tap_count, __FILE__, __LINE__); \
	} \
	printf(__VA_ARGS__); \
	putchar('\n'); \
} while (0)

#define CHECK_EQ_U64(a, b, what) do { \
	unsigned long long _a = (a), _b = (b); \
	CHECK(_a == _b, "%s: %llu == %llu", what, _a, _b); \
} while (0)

static inline int tap_done(void)
{
	printf("%d checks, %d failed\n", tap_count, tap_failures);
	return tap_failures ? 1 : 0;
}

#endif
