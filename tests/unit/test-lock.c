/* QEMU's image locks upgraded for commit (lock.c's lock_image_upgrade), on
 * a file of our own with OFD locks, no root: a new descriptor of a file
 * that one read-only description holds gets QEMU's read-write set; a third
 * description holding the read-only set (another mapping, a read-only
 * QEMU) or the write permission (a writer) makes it fail with -EBUSY and
 * nothing left locked; after the read-only holder goes, only the
 * read-write set is left. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "lock.h"
#include "log.h"
#include "tap.h"

static char path[] = "/tmp/qs-test-lock.XXXXXX";

static int reopen(void)
{
	return open(path, O_RDWR | O_CLOEXEC);
}

static void quiet(enum qs_log_level level, const char *msg, void *ud)
{
	(void)level;
	(void)msg;
	(void)ud;
}

int main(void)
{
	unsigned int used, unshared;
	int ro, rw, third, tmp = mkstemp(path);

	if (tmp < 0)
		return 77;
	close(tmp);
	qs_log_set_callback(quiet, NULL);
	ro = reopen();
	if (lock_image(ro, false, path) == -EINVAL || lock_image_release(ro)) {
		printf("no OFD locks here\n");
		unlink(path);
		return 77;
	}
	CHECK(lock_image(ro, false, path) == 0, "the mapping's read-only description");

	rw = reopen();
	CHECK(lock_image(rw, true, path) == -EBUSY, "a plain read-write lock conflicts with it");
	CHECK(lock_image_upgrade(rw, path) == 0, "upgraded beside it");
	third = reopen();
	CHECK(lock_image_query(third, &used, &unshared) == 0 && used == (LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE | LOCK_PERM_RESIZE) &&
	      unshared == (LOCK_PERM_WRITE | LOCK_PERM_RESIZE), "others see QEMU's read-write set (used %#x, unshared %#x)",
	      used, unshared);
	lock_image_release(rw);

	CHECK(lock_image(third, false, path) == 0, "another read-only holder (a second mapping)");
	CHECK(lock_image_upgrade(rw, path) == -EBUSY, "refused while it holds the file");
	CHECK(lock_image_query(third, &used, NULL) == 0 && used == LOCK_PERM_CONSISTENT_READ,
	      "nothing left locked by the refused upgrade");
	lock_image_release(third);

	/* a writer (QEMU read-write sharing everything: bytes 100, 101) */
	{
		struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = LOCK_PERM_BASE + 1, .l_len = 1 };

		CHECK(fcntl(third, F_OFD_SETLK, &fl) == 0, "a writer's byte 101");
		CHECK(lock_image_upgrade(rw, path) == -EBUSY, "refused while someone writes");
		lock_image_release(third);
	}

	CHECK(lock_image_upgrade(rw, path) == 0, "upgraded again");
	close(ro);
	CHECK(lock_image_query(third, &used, &unshared) == 0 && used == (LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE | LOCK_PERM_RESIZE),
	      "the read-only description gone: the read-write set stays");
	close(rw);
	close(third);
	unlink(path);
	return tap_done();
}
