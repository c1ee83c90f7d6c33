#!/bin/bash
# The test command: install, build, run `make check`, print the totals and
# each test's duration, slowest first.
#
# make -j runs the tests in the order of TESTS, so the tests known to be slow
# (the list below, slowest first) go ahead of the rest: the longest starts
# first and short ones fill the cores at the end. The durations at the end
# (also in tests/durations.txt) are where to look when the list is out of date.
set -u

# tools/run-tests.sh --time TEST [ARGS...]: make check's LOG_COMPILER; runs
# TEST and appends "SECONDS TEST" to $QS_TEST_TIMES
if [ "${1:-}" = --time ]; then
	shift
	t0=$EPOCHREALTIME
	rc=0
	"$@" || rc=$?
	awk -v a="$t0" -v b="$EPOCHREALTIME" -v t="$1" 'BEGIN { printf "%6.1f %s\n", b - a, t }' \
		>>"$QS_TEST_TIMES"
	exit $rc
fi

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
"$top/tools/setup.sh" || exit 1
# config.status leaves an unchanged config.h alone but renews stamp-h1, so
# make "remakes" config.h (a no-op) on every run; under make -j that puts the
# test programs (all built from config.h) behind every test script
[ ! stamp-h1 -nt config.h ] || touch -r config.h stamp-h1

# the slowest tests, slowest first, from tests/durations.txt (the VM tests
# ~120-350 s each on 2 quiet cores; the image tests spawn thousands of
# qemu-img and suffer most on a loaded machine: matrix, malformed, check,
# write ~800-1,400 s there). test-matrix makes the image matrix that
# test-open and test-convert link (tests/lib.sh matrix_images): they come
# later, not to wait for it.
slow_first="
	tests/vm/test-rw.sh
	tests/vm/test-boot.sh
	tests/images/test-matrix.sh
	tests/vm/test-live.sh
	tests/vm/test-hostile.sh
	tests/images/test-malformed.sh
	tests/images/test-check.sh
	tests/vm/test-resize.sh
	tests/vm/test-boot-unlock.sh
	tests/vm/test-boot-systemd.sh
	tests/vm/test-logwrites.sh
	tests/images/test-write.sh
	tests/vm/test-open.sh
	tests/vm/test-faults.sh
	tests/images/test-convert.sh
	tests/unit/test-alloc
	tests/vm/test-tab.sh
	tests/vm/test-boot-rw.sh
	tests/vm/test-smoke.sh
	tests/vm/test-sys.sh
	tests/vm/test-scale.sh
	tests/vm/test-bind.sh
	tests/images/test-bind.sh
	tests/admin/test-options.sh
	tests/images/test-keys.sh
	tests/unit/test-keys
	tests/images/test-resize.sh
"
all=$(make -s --no-print-directory -f Makefile -f - qs-print-tests <<'MK' | tail -n 1
qs-print-tests:
	@echo $(TESTS)
MK
)
ordered=
for t in $slow_first; do
	case " $all " in *" $t "*) ordered="$ordered $t" ;; esac
done
# then the other VM tests (a new one is likely slower than a script on the
# host), then the rest, each in make's order
for t in $(printf '%s\n' $all | grep '^tests/vm/') $all; do
	case " $ordered " in *" $t "*) ;; *) ordered="$ordered $t" ;; esac
done

export QS_TEST_TIMES=$top/tests/durations.txt
: >"$QS_TEST_TIMES"
make -j"$(nproc)" check TESTS="${ordered# }" LOG_COMPILER="$top/tools/run-tests.sh --time"
rc=$?
log=test-suite.log
if [ ! -f "$log" ]; then
	echo "make check did not run the tests (build failure?)"
	echo "0 passed, 1 failed"
	exit 1
fi
echo "test durations (seconds, slowest first; the order they start in: slow_first in $0):"
sort -rn "$QS_TEST_TIMES" | sed -e 's/^/  /' -e 's| \./| |'
pass=$(sed -n 's/^# PASS: *//p' "$log" | head -1)
fail=$(sed -n 's/^# FAIL: *//p' "$log" | head -1)
error=$(sed -n 's/^# ERROR: *//p' "$log" | head -1)
skip=$(sed -n 's/^# SKIP: *//p' "$log" | head -1)
# Each test script also reports its own cases: count them too.
cases_pass=$(cat tests/*/*.log 2>/dev/null | grep -c '^PASS: ' || true)
cases_fail=$(cat tests/*/*.log 2>/dev/null | grep -c '^FAIL: ' || true)
echo "test programs: ${pass:-0} passed, $(( ${fail:-0} + ${error:-0} )) failed, ${skip:-0} skipped; cases inside them: $cases_pass passed, $cases_fail failed"
echo "${pass:-0} passed, $(( ${fail:-0} + ${error:-0} )) failed, ${skip:-0} skipped"
exit $rc
