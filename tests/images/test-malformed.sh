#!/bin/bash
# test-malformed.sh: runs qcowsetup on the malformed-image corpus of
# gen-malformed.py and checks, for every line of its manifest, the exit code
# and that stderr is exactly one line matching the expected message (or empty
# where the image is fine; `check` finding corruptions or leaks, exit 2 or 3,
# prints several, one of which must match). A crash (exit >= 128, sanitizer
# report, valgrind error) or a hang (60 s, 600 s under valgrind; or the
# case's own time limit, the manifest's optional 7th column) fails it.
#
# `write` lines run the metadata writer's driver (tests/images/qcow2-write:
# read-write open, a few random writes, close) on a copy of the image beside
# it: exit 0, or 1 with the writer's one message when it refuses the image.
#
# Environment:
#   QCOWSETUP      the binary under test (default: ./qcowsetup)
#   QCOW2_WRITE    the writer's driver (default: $top_builddir/tests/images/qcow2-write)
#   QS_VALGRIND=1  run every case under valgrind --error-exitcode=99 --leak-check=full -q
#   QS_CORPUS=DIR  use (or keep) the corpus in DIR instead of a temporary one
#   QS_KEEP=1      keep the work folder (the corpus and the last outputs)
#   QS_FILTER=ERE  run only the tests whose name matches
# Exit: 0 all passed, 1 some failed, 77 skipped (no qemu-img, python3 or binary).
set -u
export LC_ALL=C

me=test-malformed
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
GEN=$here/gen-malformed.py
QCOWSETUP=${QCOWSETUP:-./qcowsetup}
case $QCOWSETUP in
/*) ;;
*) QCOWSETUP=$(pwd)/$QCOWSETUP ;;
esac
# the `write` cases: the metadata writer's test driver (read-write open,
# random writes, close) on a copy of the image
QCOW2_WRITE=${QCOW2_WRITE:-${top_builddir:-$(dirname "$QCOWSETUP")}/tests/images/qcow2-write}
case $QCOW2_WRITE in
/*) ;;
*) QCOW2_WRITE=$(pwd)/$QCOW2_WRITE ;;
esac

need qemu-img qemu-io python3
[ -x "$QCOWSETUP" ] || skip_test "$QCOWSETUP not built"

RUNNER=()
TIMEOUT=60
if [ "${QS_VALGRIND:-0}" = 1 ]; then
	need valgrind
	RUNNER=(valgrind --error-exitcode=99 --leak-check=full -q)
	TIMEOUT=600
fi

make_work
TMP=$work
CORPUS=${QS_CORPUS:-$work/corpus}
mkdir -p "$CORPUS" || exit 99

if [ ! -f "$CORPUS/manifest.tsv" ]; then
	python3 "$GEN" "$CORPUS" >"$TMP/gen.log" 2>&1
	rc=$?
	if [ $rc -ne 0 ]; then
		cat "$TMP/gen.log"
		[ $rc -eq 77 ] && exit 77
		fail "gen-malformed.py exited with $rc"
		exit 1
	fi
fi
cd "$CORPUS" || exit 99

# Commands the binary does not know (yet) are skipped, not failed.
declare -A HAVE
for c in info map table check; do
	args=("$c" base-plain.qcow2)
	[ "$c" = table ] && args+=(qs-malformed)
	HAVE[$c]=1
	if "$QCOWSETUP" "${args[@]}" 2>&1 >/dev/null | grep -q 'Unknown command'; then
		HAVE[$c]=0
		echo "NOTE: no '$c' command: its tests are skipped"
	fi
done
HAVE[write]=1
if [ ! -x "$QCOW2_WRITE" ]; then
	HAVE[write]=0
	echo "NOTE: no $QCOW2_WRITE: the write tests are skipped"
fi

while IFS=$'\t' read -r name cmd want regex desc image limit; do
	case $name in '#'* | '') continue ;; esac
	if [ -n "${QS_FILTER:-}" ] && ! [[ $name =~ $QS_FILTER ]]; then
		continue
	fi
	read -r -a words <<<"$cmd"
	if [ "${HAVE[${words[0]}]:-0}" != 1 ]; then
		skipped "$name (no ${words[0]})"
		continue
	fi
	args=("${words[@]}" "$image")
	[ "${words[0]}" = table ] && args+=(qs-malformed)
	# stdout matters only for check's findings (a map can be huge)
	out=/dev/null
	[ "${words[0]}" = check ] && out=$TMP/out
	# a case may bound the time a command takes (10 times more under valgrind)
	limit=${limit:-$TIMEOUT}
	[ "$limit" != "$TIMEOUT" ] && [ "${QS_VALGRIND:-0}" = 1 ] && limit=$((limit * 10))
	if [ "${words[0]}" = write ]; then
		# a copy beside the image (its backing file names stay valid)
		copy=.rw-copy.${image##*.}
		cp "$image" "$copy" || exit 99
		timeout -s KILL "$limit" "${RUNNER[@]}" "$QCOW2_WRITE" --seed 1 --ops 12 --max-write 300000 \
			"$copy" /dev/null >"$out" 2>"$TMP/err.all" </dev/null
		rc=$?
		rm -f "$copy"
		# the driver's own last words (": writer: Structure needs cleaning")
		grep -v ': writer: ' "$TMP/err.all" >"$TMP/err"
	else
		timeout -s KILL "$limit" "${RUNNER[@]}" "$QCOWSETUP" "${args[@]}" \
			>"$out" 2>"$TMP/err" </dev/null
		rc=$?
	fi
	nlines=$(wc -l <"$TMP/err")
	line=$(head -n 1 "$TMP/err")
	why=
	if [ $rc -eq 137 ]; then
		why="killed after ${limit}s (hang or too slow?)"
	elif [ $rc -ge 128 ]; then
		why="crashed (exit $rc): $line"
	elif [ $rc -eq 99 ] && [ "$want" != 99 ]; then
		why="valgrind errors: $(head -c 2000 "$TMP/err")"
	elif grep -qE 'Sanitizer|runtime error:|==[0-9]+==' "$TMP/err"; then
		why="sanitizer report: $(head -c 2000 "$TMP/err")"
	elif [ "$rc" != "$want" ]; then
		why="exit $rc, expected $want; stderr: $(head -c 500 "$TMP/err")"
	elif [ "$regex" = - ]; then
		[ -s "$TMP/err" ] && why="expected no message, got: $(head -c 500 "$TMP/err")"
	elif [ "${words[0]}" = check ] && { [ "$want" = 2 ] || [ "$want" = 3 ]; }; then
		# check reports its findings as qemu-img check does: several lines
		cat "$TMP/out" "$TMP/err" | grep -qE -- "$regex" ||
			why="no finding matches /$regex/: $(head -c 500 "$TMP/err")"
	elif [ "$nlines" -ne 1 ]; then
		why="expected one line on stderr, got $nlines: $(head -c 500 "$TMP/err")"
	elif ! grep -qE -- "$regex" "$TMP/err"; then
		why="message does not match /$regex/: $line"
	fi
	if [ -z "$why" ]; then
		pass "$name"
	else
		fail "$name: $why"
		echo "      ($desc; qcowsetup ${args[*]})"
	fi
done <manifest.tsv

[ -z "${QS_CORPUS:-}" ] || echo "corpus kept in $CORPUS"
summary
