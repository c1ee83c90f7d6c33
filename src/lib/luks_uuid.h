/* The UUID of a LUKS header, as a name: it comes from the image (untrusted)
 * and ends up in udev links (ID_QCOW2_LUKS_UUID -> /dev/disk/by-qcow2-uuid/)
 * and device-mapper UUIDs, where '/', "..", blanks or control characters
 * must never reach. Pure, no outside library. */
#ifndef QS_LUKS_UUID_H
#define QS_LUKS_UUID_H

#include <stdbool.h>

#define LUKS_UUID_LEN 36	/* 8-4-4-4-12 hex digits */

/* Whether s is a UUID as cryptsetup accepts one (libuuid's uuid_parse, which
 * `cryptsetup luksUUID --uuid` and crypt_set_uuid use): exactly 36
 * characters, '-' at offsets 8, 13, 18 and 23, hex digits (either case)
 * everywhere else. NULL is not valid. */
bool luks_uuid_valid(const char *s);

#endif
