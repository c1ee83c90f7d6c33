#!/bin/bash
# test-matrix.sh: the image matrix of gen-matrix.sh against QEMU's answers.
#
# For every image of the manifest:
#   info        `qcowsetup info IMAGE` succeeds
#   info-json   `qcowsetup info IMAGE --json` succeeds, parses, and has the
#               virtual-size of qemu-img info
#   map-json    `qcowsetup map IMAGE --json` equals `qemu-img map --output=json`
#               record for record (encrypted and compressed images: our
#               records may add "offset" and "compressed", see compare_map.py)
#   map-human   `qcowsetup map IMAGE` equals `qemu-img map` byte for byte when
#               qemu-img succeeds; when qemu-img refuses (encrypted, compressed
#               clusters) ours must fail too
#   check       `qcowsetup check IMAGE --json` finds as many leaks and
#               corruptions as `qemu-img check`
#   table       `qcowsetup table IMAGE NAME` succeeds (content checked elsewhere)
# map, check and table read no key; in the self-test, qemu-img gets the
# encrypted images' secret (it refuses to map them without one).
#
# Environment: QCOWSETUP (the binary; default $top_builddir/qcowsetup),
# top_srcdir, top_builddir (set by make check), PYTHON (default python3),
# QS_KEEP=1 keeps the work directory (kept also when a case fails),
# QS_ONLY=REGEX runs the matching images,
# QS_MAP_IGNORE_FILE_HOLES=1 passes --ignore-file-holes to the map comparer,
# QS_SELFTEST=1 tests qemu-img against itself through a wrapper that speaks
# the qcowsetup command line (to prove the generator and the comparer).
# Exit: 0 all passed, 1 some failed, 77 skipped (no qemu-img), 99 hard error.
set -u
export LC_ALL=C

me=test-matrix
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
PYTHON=${PYTHON:-python3}
COMPARE="$here/compare_map.py"

need qemu-img qemu-io "$PYTHON"

# The qcowsetup command line, answered by qemu-img (QS_SELFTEST=1).
selftest_qcowsetup() {
	local cmd=$1 img=$2 json='' key='' fmt a
	shift 2
	while [ $# -gt 0 ]; do
		case $1 in
		--json) json=--output=json ;;
		--key-file) key=$2; shift ;;
		esac
		shift
	done
	fmt=$(qemu-img info --output=json "$img" |
		"$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["format"])') || return 1
	if [ -n "$key" ]; then
		a=(--object "secret,id=s0,file=$key" --image-opts
			"driver=$fmt,file.filename=$img,encrypt.key-secret=s0")
	else
		a=("$img")
	fi
	case $cmd in
	info) qemu-img info $json "$img" ;;
	map) qemu-img map $json "${a[@]}" ;;
	check) qemu-img check $json "${a[@]}" ;;
	table) qemu-img map --output=json "${a[@]}" >/dev/null ;;
	*) echo "selftest: unknown command $cmd" >&2; return 1 ;;
	esac
}

if [ "${QS_SELFTEST:-0}" = 1 ]; then
	QS=selftest_qcowsetup
else
	QCOWSETUP=${QCOWSETUP:-$builddir/qcowsetup}
	need_built "$QCOWSETUP"
	QS=$QCOWSETUP
fi
TIMEOUT=
command -v timeout >/dev/null 2>&1 && TIMEOUT="timeout 120"

make_work --keep-on-failure

if ! matrix_images "$work/m" >"$work/gen.log" 2>&1; then
	sed 's/^/# /' "$work/gen.log"
	echo "ERROR: gen-matrix.sh failed"
	failed=1
	exit 99
fi
sed 's/^/# /' "$work/gen.log"
cd "$work/m" || exit 99
mkdir -p out

# failed_with WHAT REASON [DETAIL-FILE]: FAIL: WHAT: REASON, then the detail
failed_with() {
	fail "$1: $2"
	if [ $# -ge 3 ] && [ -s "$3" ]; then
		if [ "$(head -n 1 "$3")" = "$2" ]; then
			tail -n +2 "$3"
		else
			cat "$3"
		fi | head -n 40 | sed 's/^/    /'
	fi
}
# qs OUT ERR ARGS...: run qcowsetup (or the wrapper), never interactive
qs() {
	local out=$1 err=$2
	shift 2
	if [ "$QS" = selftest_qcowsetup ]; then
		selftest_qcowsetup "$@" >"$out" 2>"$err" </dev/null
	else
		$TIMEOUT "$QS" "$@" >"$out" 2>"$err" </dev/null
	fi
}

if "$PYTHON" "$COMPARE" --selftest >out/compare-selftest.txt 2>&1; then
	pass "compare_map/selftest"
else
	failed_with "compare_map/selftest" "the comparer fails its own cases" out/compare-selftest.txt
fi

while IFS=$'\t' read -r name path fmt secret tags; do
	case $name in '#'* | '') continue ;; esac
	if [ -n "${QS_ONLY:-}" ] && ! [[ $name =~ $QS_ONLY ]]; then
		continue
	fi
	o=oracle/$name
	w=out/$name
	key=()
	[ "$secret" != - ] && [ "$QS" = selftest_qcowsetup ] && key=(--key-file "$secret")

	# info
	rc=0
	qs "$w.info.txt" "$w.info.err" info "$path" || rc=$?
	if [ "$rc" -eq 0 ]; then
		pass "$name/info"
	else
		failed_with "$name/info" "exit status $rc" "$w.info.err"
	fi

	# info --json
	rc=0
	qs "$w.info.json" "$w.info-json.err" info "$path" --json || rc=$?
	if [ "$rc" -ne 0 ]; then
		failed_with "$name/info-json" "exit status $rc" "$w.info-json.err"
	elif "$PYTHON" "$COMPARE" info "$o.info.json" "$w.info.json" >"$w.info.diff" 2>&1; then
		pass "$name/info-json"
	else
		failed_with "$name/info-json" "$(head -n 1 "$w.info.diff")"
	fi

	# map --json
	opts=()
	case ,$tags, in *,encrypted,* | *,compressed,*) opts+=(--allow-extra) ;; esac
	[ "${QS_MAP_IGNORE_FILE_HOLES:-0}" = 1 ] && opts+=(--ignore-file-holes)
	rc=0
	qs "$w.map.json" "$w.map-json.err" map "$path" --json "${key[@]}" || rc=$?
	if [ "$rc" -ne 0 ]; then
		failed_with "$name/map-json" "exit status $rc" "$w.map-json.err"
	elif "$PYTHON" "$COMPARE" map "${opts[@]}" "$o.map.json" "$w.map.json" >"$w.map.diff" 2>&1; then
		pass "$name/map-json"
	else
		failed_with "$name/map-json" "$(head -n 1 "$w.map.diff")" "$w.map.diff"
	fi

	# map (human)
	rc=0
	qs "$w.map.txt" "$w.map.err" map "$path" "${key[@]}" || rc=$?
	qrc=$(cat "$o.map.rc")
	if [ "$qrc" -ne 0 ]; then
		if [ "$rc" -ne 0 ]; then
			pass "$name/map-human"
		else
			failed_with "$name/map-human" "qemu-img map refuses this image ($(head -n 1 "$o.map.err")), ours exited 0"
		fi
	elif [ "$rc" -ne 0 ]; then
		failed_with "$name/map-human" "exit status $rc" "$w.map.err"
	elif cmp -s "$o.map.txt" "$w.map.txt"; then
		pass "$name/map-human"
	else
		diff -u "$o.map.txt" "$w.map.txt" >"$w.map-human.diff"
		failed_with "$name/map-human" "output differs from qemu-img map (diff -u qemu ours)" "$w.map-human.diff"
	fi

	# check --json
	rc=0
	qs "$w.check.json" "$w.check.err" check "$path" --json "${key[@]}" || rc=$?
	if "$PYTHON" "$COMPARE" check "$o.check.json" "$(cat "$o.check.rc")" \
		"$w.check.json" "$rc" >"$w.check.diff" 2>&1; then
		pass "$name/check"
	else
		cat "$w.check.err" >>"$w.check.diff"
		failed_with "$name/check" "$(head -n 1 "$w.check.diff")" "$w.check.diff"
	fi

	# table
	rc=0
	qs "$w.table" "$w.table.err" table "$path" "qsm-$name" "${key[@]}" || rc=$?
	if grep -q '"compressed": true' "$w.map.json" 2>/dev/null; then
		# compressed clusters are served by the slow-path daemon, not by
		# tables: refused, with their count, until then
		if [ "$rc" -eq 4 ] && grep -Eq '[0-9]+ compressed clusters' "$w.table.err" &&
			[ "$(wc -l <"$w.table.err")" -eq 1 ]; then
			pass "$name/table-refuses-compressed"
		else
			failed_with "$name/table-refuses-compressed" "exit status $rc" "$w.table.err"
		fi
	elif [ "$rc" -eq 0 ]; then
		pass "$name/table"
	else
		failed_with "$name/table" "exit status $rc" "$w.table.err"
	fi
done <manifest.tsv

summary
