/* Run lists: merging rules. */
#include "runs.h"
#include "tap.h"

int main(void)
{
	struct run_list l;
	struct run a = { .guest = 0, .len = 4096, .host = 65536, .kind = RUN_DATA };
	struct run b = { .guest = 4096, .len = 4096, .host = 69632, .kind = RUN_DATA };
	struct run c = { .guest = 8192, .len = 4096, .host = 0, .kind = RUN_DATA };
	struct run z1 = { .guest = 12288, .len = 512, .kind = RUN_ZERO };
	struct run z2 = { .guest = 12800, .len = 512, .kind = RUN_ZERO };
	struct run c1 = { .guest = 13312, .len = 4096, .host = 100, .clen = 300, .kind = RUN_COMPRESSED };
	struct run c2 = { .guest = 17408, .len = 4096, .host = 400, .clen = 300, .kind = RUN_COMPRESSED };
	struct run d1 = { .guest = 21504, .len = 512, .kind = RUN_UNALLOC, .depth = 1 };
	struct run d2 = { .guest = 22016, .len = 512, .kind = RUN_UNALLOC, .depth = 2 };

	run_list_init(&l);
	run_list_add(&l, &a);
	run_list_add(&l, &b);
	CHECK(l.count == 1 && l.runs[0].len == 8192, "host-contiguous data merges");
	run_list_add(&l, &c);
	CHECK(l.count == 2, "data not contiguous on the host does not merge");
	run_list_add(&l, &z1);
	run_list_add(&l, &z2);
	CHECK(l.count == 3 && l.runs[2].len == 1024, "zero runs merge");
	run_list_add(&l, &c1);
	run_list_add(&l, &c2);
	CHECK(l.count == 5, "compressed clusters never merge");
	run_list_add(&l, &d1);
	run_list_add(&l, &d2);
	CHECK(l.count == 7, "runs of different depth do not merge");
	run_list_free(&l);
	return tap_done();
}
