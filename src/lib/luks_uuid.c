/* LUKS UUIDs as names (see luks_uuid.h). */
#include <stddef.h>

#include "luks_uuid.h"

static bool is_hex_digit(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

bool luks_uuid_valid(const char *s)
{
	size_t i;

	if (!s)
		return false;
	for (i = 0; i < LUKS_UUID_LEN; i++) {
		bool dash = i == 8 || i == 13 || i == 18 || i == 23;

		if (dash ? s[i] != '-' : !is_hex_digit(s[i]))
			return false;	/* also stops at a NUL: s[i] is never read past it */
	}
	return s[i] == '\0';
}
