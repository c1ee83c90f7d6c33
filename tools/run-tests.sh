#!/bin/bash
# The test command: install, build, run `make check`, print the totals.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
"$top/tools/setup.sh" || exit 1
make -j"$(nproc)" check
rc=$?
log=test-suite.log
if [ ! -f "$log" ]; then
	echo "make check did not run the tests (build failure?)"
	echo "0 passed, 1 failed"
	exit 1
fi
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
