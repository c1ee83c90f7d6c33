# tests/lib.sh: what the shell tests on the host share. Bash; sourced after
# `me` (the test's name) is set:
#
#   me=test-write
#   . "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
#
# Paths: here (the test's folder), top (the source tree), builddir
# ($top_builddir, else the source tree).
#
# Cases, one line each (tools/run-tests.sh counts "^PASS: " and "^FAIL: "
# in the logs of make check):
#   pass NAME                 "PASS: NAME"
#   fail NAME                 "FAIL: NAME"
#   skipped NAME              "SKIP: NAME" (one case, not the whole test)
#   check NAME CMD...         pass NAME when CMD succeeds, else fail NAME
#   refuse NAME CODE CMD...   pass NAME when CMD exits with CODE
#                             (check and refuse: CMD's output is appended to
#                             $check_log when it is set)
#   summary [PREFIX]          "[PREFIX: ]N passed, N failed[, N skipped]";
#                             returns 1 when a case failed
# The whole test, with automake's exit codes (0 pass, 1 fail, 77 skip,
# 99 hard error):
#   skip_test REASON          "SKIP: REASON", exit 77
#   hard_error REASON         "ME: error: REASON" on stderr, exit 99
#   need TOOL...              skip_test unless every TOOL is on PATH
#   need_vm                   skip_test without QEMU ($QEMU, default
#                             qemu-system-x86_64) or a kernel in /boot
#   need_built FILE [CODE]    exit CODE (99) unless FILE is an executable
#   need_qcowsetup [CODE]     QCOWSETUP (default $builddir/qcowsetup), made an
#                             absolute path; exit CODE (99) when not built
# Helpers:
#   make_work [--keep-on-failure]
#                             work=a new folder $TMPDIR/qs-ME.XXXXXX, removed
#                             at exit unless QS_KEEP=1 (or a case failed,
#                             with --keep-on-failure). TMPDIR defaults to
#                             /var/tmp: the images of the image and VM tests
#                             are large and /tmp is often a small tmpfs.
#   retry N CMD...            CMD up to N times, a second apart: qemu-img 7.2
#                             sometimes fails timing the LUKS key derivation
#                             ("Unable to get accurate CPU usage")
#   guest_script NAME DIR     the VM tests: tests/vm/guest/NAME.sh (what
#                             tests/vm/test-NAME.sh runs in the VM) and
#                             guest/lib.sh into DIR, the VM's share
#   matrix_images DIR         the image matrix of tests/images/gen-matrix.sh
#                             in DIR (a new folder), hard links to one made
#                             once per build tree in $TMPDIR/qs-matrix-HASH
#                             (the map oracles hold on that file system
#                             only) and made again when gen-matrix.sh or
#                             qemu-img changes: add files to DIR, replace
#                             the others, never write into them. Prints what
#                             gen-matrix.sh printed; its exit status.

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
builddir=${top_builddir:-$top}

passed=0 failed=0 skipped=0

pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
skipped() { echo "SKIP: $*"; skipped=$((skipped + 1)); }

# run_logged CMD...: CMD, its output appended to $check_log when set
run_logged() {
	if [ -n "${check_log:-}" ]; then "$@" >>"$check_log" 2>&1; else "$@"; fi
}

check() {
	local name=$1
	shift
	if run_logged "$@"; then pass "$name"; else fail "$name"; fi
}

refuse() {
	local name=$1 code=$2 rc=0
	shift 2
	run_logged "$@" || rc=$?
	if [ "$rc" = "$code" ]; then pass "$name"; else fail "$name (exit $rc, expected $code)"; fi
}

summary() {
	local line="$passed passed, $failed failed"
	[ "$skipped" = 0 ] || line="$line, $skipped skipped"
	echo "${1:+$1: }$line"
	[ "$failed" = 0 ]
}

skip_test() { echo "SKIP: $*"; exit 77; }
hard_error() { echo "$me: error: $*" >&2; exit 99; }

need() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || skip_test "$t not found"
	done
}

need_vm() {
	need "${QEMU:-qemu-system-x86_64}"
	ls /boot/vmlinuz-* >/dev/null 2>&1 || skip_test "no kernel in /boot"
}

need_built() {
	[ -x "$1" ] || { echo "$me: error: $1 not built" >&2; exit "${2:-99}"; }
}

need_qcowsetup() {
	QCOWSETUP=${QCOWSETUP:-$builddir/qcowsetup}
	need_built "$QCOWSETUP" "${1:-99}"
	QCOWSETUP=$(realpath "$QCOWSETUP")
}

keep_work_on_failure=0
work_cleanup() {
	if [ -n "${QS_KEEP:-}" ] && [ "$QS_KEEP" != 0 ] ||
		{ [ "$keep_work_on_failure" = 1 ] && [ "$failed" != 0 ]; }; then
		echo "$me: work folder kept: $work"
	else
		rm -rf "$work"
	fi
}

make_work() {
	[ "${1:-}" != --keep-on-failure ] || keep_work_on_failure=1
	work=$(mktemp -d "${TMPDIR:-/var/tmp}/qs-$me.XXXXXX") || hard_error "cannot make a work folder"
	trap work_cleanup EXIT
}

retry() {
	local n=$1 i
	shift
	for ((i = 1; i <= n; i++)); do
		"$@" && return 0
		[ "$i" = "$n" ] || sleep 1
	done
	return 1
}

guest_script() {
	cp "$top/tests/vm/guest/lib.sh" "$top/tests/vm/guest/$1.sh" "$2/" && chmod +x "$2/$1.sh"
}

matrix_images() {
	local cache key lock rc=0
	cache=${TMPDIR:-/var/tmp}/qs-matrix-$(printf '%s' "$builddir" | sha256sum | cut -c1-12)
	key=$({ cat "$top/tests/images/gen-matrix.sh"; qemu-img --version; } | sha256sum | cut -d' ' -f1)
	exec {lock}>"$cache.lock"
	flock "$lock"	# make check -j: one makes it, the others wait and link
	if [ "$(cat "$cache/.key" 2>/dev/null)" != "$key" ]; then
		rm -rf "$cache" "$cache.new"
		"$top/tests/images/gen-matrix.sh" "$cache.new" || rc=$?
		[ "$rc" != 0 ] || { echo "$key" >"$cache.new/.key" && mv "$cache.new" "$cache"; } || rc=99
	else
		echo "gen-matrix: the matrix of $cache (made $(date -r "$cache/.key" '+%F %T'))"
	fi
	[ "$rc" != 0 ] || cp -al "$cache" "$1" || rc=99
	exec {lock}>&-
	rm -f "$1/.key"
	return "$rc"
}
