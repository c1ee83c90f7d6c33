/* Small helpers shared by every layer: overflow-checked arithmetic,
 * big-endian field access, the number parser (util.c). Secrets in memory: secure.h. */
#ifndef QS_UTIL_H
#define QS_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Fault injection for the atomicity tests (--debug-fail-step K): count
 * step *step of verb (logged at debug level) and fail it (-EIO, logged)
 * when it is the K-th (fail_at; 0: never). */
int fault_step(int *step, int fail_at, const char *verb, const char *what);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* true when the result overflowed */
static inline bool uadd64_overflow(uint64_t a, uint64_t b, uint64_t *res)
{
	return __builtin_add_overflow(a, b, res);
}

static inline bool umul64_overflow(uint64_t a, uint64_t b, uint64_t *res)
{
	return __builtin_mul_overflow(a, b, res);
}

static inline bool is_aligned(uint64_t v, uint64_t align)
{
	return (v & (align - 1)) == 0;
}

static inline uint64_t round_up_pow2(uint64_t v, uint64_t align)
{
	return (v + align - 1) & ~(align - 1);
}

/* [a, a+alen) and [b, b+blen) intersect; lengths must not overflow */
static inline bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return alen && blen && a < b + blen && b < a + alen;
}

static inline uint16_t get_be16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] << 8 | b[1]);
}

static inline uint32_t get_be32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static inline uint64_t get_be64(const void *p)
{
	return (uint64_t)get_be32(p) << 32 | get_be32((const uint8_t *)p + 4);
}

static inline void put_be16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = v >> 8;
	b[1] = v;
}

static inline void put_be32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = v >> 24;
	b[1] = v >> 16;
	b[2] = v >> 8;
	b[3] = v;
}

static inline void put_be64(void *p, uint64_t v)
{
	put_be32(p, v >> 32);
	put_be32((uint8_t *)p + 4, (uint32_t)v);
}

/* The one number parser: decimal digits only (no sign, no blanks, no
 * 0x), with PARSE_SIZE a unit K, M, G or T (either case, optionally
 * followed by "iB" or "B": powers of 1024). 0, -EINVAL (not a number),
 * -ERANGE (over 2^64 - 1). Ranges are the caller's to check. */
#define PARSE_SIZE	(1U << 0)
int parse_u64(const char *s, unsigned int flags, uint64_t *v);

#endif
