#!/bin/bash
# Automake test: the command line of the built qcowsetup, without root.
#   - `COMMAND --help` lists exactly the options each command takes (the
#     list below restates options.c's table), and every option it does not
#     list is refused: exit 1, one line on stderr, nothing on stdout;
#   - an unknown option, a bad number and a number out of range: exit 1;
#   - `check` on a clean image and on images made leaky, corrupt or raw
#     (qemu-img, bytes patched with printf and dd) returns qemu-img check's
#     codes: 0, 3, 2, 63, and 4 for a missing image (skipped without qemu-img).
# Exit 0 pass, 1 fail, 99 not built.
me=test-options
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
export LC_ALL=C
need_qcowsetup
make_work
cd "$work" || hard_error "cannot enter $work"

# run ARGS...: $rc, $out, $err (stderr), $errlines
run() {
	"$QCOWSETUP" "$@" >out 2>err </dev/null
	rc=$?
	local o e
	mapfile -t o <out
	mapfile -t e <err
	out=${o[*]} err=${e[*]} errlines=${#e[@]}
}

# a usage error: exit 1, exactly one line on stderr matching PATTERN, no output
usage_error() {  # WHAT PATTERN ARGS...
	local what=$1 pattern=$2
	shift 2
	run "$@"
	if [ "$rc" = 1 ] && [ "$errlines" = 1 ] && [ -z "$out" ] && grep -qE -- "$pattern" err; then
		pass "$what"
	else
		fail "$what: exit $rc, stdout [$out], stderr [$err]"
	fi
}

# ---- the options each command takes ----------------------------------------
G="--verbose --debug --batch-mode --help --version"
KEYFILE="--key-file --keyfile-offset --keyfile-size"
NEWKEY="--new-key-file --new-keyfile-offset --new-keyfile-size"
PBKDF="--iter-time --pbkdf-force-iterations"
NEWHDR="--cipher --key-size --hash $PBKDF --cluster-size"
IMAGE="--snapshot --format --trust-names --backing-file --data-file"
declare -A want=(
	[open]="$G --tab --readonly --allow-discards --max-targets --nbd-connections $KEYFILE --tries --skip-key-check --clevis --token-only --token-timeout $IMAGE --quiet"
	[open --tab]="$G --max-targets --nbd-connections --tab --qcowtab --quiet"
	[close]="$G --tab --deferred"
	[close --tab]="$G --deferred --tab --qcowtab"
	[status]="$G --json"
	[list]="$G --json"
	[reattach]="$G"
	[resize]="$G --shrink $KEYFILE --tries --quiet"
	[suspend]="$G"
	[resume]="$G $KEYFILE --tries --skip-key-check --quiet"
	[refresh]="$G --allow-discards --no-allow-discards $KEYFILE --tries --skip-key-check --quiet"
	[snapshot]="$G $KEYFILE --tries $PBKDF $NEWKEY --quiet"
	[commit]="$G $KEYFILE --tries --progress --quiet"
	[format]="$G $KEYFILE --backing-file $NEWHDR --backing-format --quiet --force"
	[add-key]="$G $KEYFILE --tries $PBKDF $NEWKEY --key-slot --quiet"
	[remove-key]="$G $KEYFILE --tries --key-slot --quiet --force"
	[change-key]="$G $KEYFILE --tries $PBKDF $NEWKEY --quiet"
	[dump-keys]="$G --json"
	[convert]="$G $KEYFILE --tries --skip-key-check --snapshot --format --trust-names $NEWHDR $NEWKEY --progress --quiet --in-place --flatten --force"
	[info]="$G --json $IMAGE"
	[map]="$G --json $IMAGE"
	[table]="$G --allow-discards --max-targets $IMAGE"
	[check]="$G --json --format --trust-names --data-file"
	[probe]="$G --qcowtab --udev"
	[bind]="$G $KEYFILE --tries $PBKDF --key-slot --quiet"
	[unbind]="$G $KEYFILE --tries --quiet --force"
	[test-bindings]="$G --json"
)
# a valid value for each option that takes one
declare -A value=(
	[--max-targets]=4 [--nbd-connections]=2 [--keyfile-offset]=0 [--keyfile-size]=64 [--tries]=3 [--key-size]=256 [--token-timeout]=30
	[--iter-time]=10 [--pbkdf-force-iterations]=1000 [--cluster-size]=64K [--new-keyfile-offset]=0
	[--new-keyfile-size]=64 [--key-slot]=1
)

sorted() { tr ' ' '\n' | grep . | sort -u | tr '\n' ' '; }
# the long options in the Options section of a help text on stdin
help_options() { awk '/^Options/ { o = 1; next } /^$/ { o = 0 } o && /^  (-., |    )--[a-z]/ { sub(/^ *(-., )?/, ""); sub(/[ ,].*/, ""); print }'; }

run --help
all=$(help_options <out | sorted)
# the options that take a value: "--name VALUE" in the help
with_value=" $(awk '/^  (-., |    )--[a-z-]+ [A-Z]/ { sub(/^ *(-., )?/, ""); print $1 }' out | tr '\n' ' ') "
cmds=$(awk '/^Commands:/ { c = 1; next } /^$/ { c = 0 } c && /^  [a-z]/ { print $1 ($2 == "--tab" ? " --tab" : "") }' out)
[ "$rc" = 0 ] && [ "$(echo "$cmds" | wc -l)" = "${#want[@]}" ] && pass "--help: ${#want[@]} commands" ||
	fail "--help: exit $rc, commands [$cmds]"
while read -r cmd; do
	# shellcheck disable=SC2086
	run $cmd --help
	got=$(help_options <out | sorted)
	if [ "$rc" = 0 ] && [ "$got" = "$(echo "${want[$cmd]}" | sorted)" ]; then
		pass "$cmd --help lists its options"
	else
		fail "$cmd --help: exit $rc, lists [$got], not [$(echo "${want[$cmd]}" | sorted)]"
	fi
	# every option of the global list: taken (then --help answers) or refused
	bad=
	for o in $all; do
		v=()
		[[ $with_value == *" $o "* ]] && v=("${value[$o]:-x}")
		# shellcheck disable=SC2086
		run $cmd "$o" "${v[@]}" --help
		if [[ " $got " == *" $o "* ]]; then
			[ "$rc" = 0 ] || bad+=" $o(taken, exit $rc: $err)"
		elif [ "$rc" != 1 ] || [ "$errlines" != 1 ] || [ -n "$out" ] || [[ $err != *"$cmd does not take $o"* ]]; then
			bad+=" $o(exit $rc: $err)"
		fi
	done
	[ -z "$bad" ] && pass "$cmd: the options it does not list are refused in one line" || fail "$cmd:$bad"
done <<<"$cmds"

# ---- usage errors -------------------------------------------------------------
usage_error "an option info does not take" "^qcowsetup: info does not take --udev" info --udev x.qcow2
usage_error "--tab with a command other than open and close" "info does not take --tab" info --tab x.qcow2
usage_error "an option open --tab does not take (the entry sets it)" "open --tab does not take --key-file" \
	open --tab --key-file k
usage_error "an unknown option" "unrecognized option" info --no-such-option x.qcow2
usage_error "an option without its value" "requires an argument" info x.qcow2 --format
usage_error "a bad number: --cluster-size 12x" "invalid size for --cluster-size: 12x" \
	format --cluster-size 12x new.qcow2 1M
usage_error "a bad number: --keyfile-size 12x" "invalid size for --keyfile-size" open --keyfile-size 12x i n
usage_error "a bad number: --tries 0" "--tries takes a number from 1 to 1000" open --tries 0 i n
usage_error "a bad number: --tries -1" "invalid number for --tries" open --tries -1 i n
usage_error "a bad number: --key-size 100 (not a multiple of 8)" "--key-size takes a multiple of 8" \
	format --key-size 100 new.qcow2 1M
usage_error "a bad number: --cluster-size 3K (not a power of two)" "--cluster-size takes a power of two" \
	format --cluster-size 3K new.qcow2 1M
usage_error "a bad size: format IMAGE 12x" "Invalid size for SIZE: 12x" format new.qcow2 12x
[ ! -e new.qcow2 ] && pass "nothing created by the refused formats" || fail "new.qcow2 was created"
usage_error "an unknown command" "Unknown command" frobnicate
usage_error "too many arguments" "Usage: qcowsetup info IMAGE" info a b
run --version
[ "$rc" = 0 ] && [[ $out == "qcowsetup "* ]] && pass "--version" || fail "--version: exit $rc [$out]"

# ---- check's exit codes ---------------------------------------------------------
expect_check() {  # WHAT CODE IMAGE
	run check "$3"
	[ "$rc" = "$2" ] && pass "check $1: exit $2" || fail "check $1: exit $rc, not $2 [$out] [$err]"
}
# the 8-byte big-endian number at byte OFF of FILE
be64() { od -An -tu8 --endian=big -j "$2" -N 8 "$1" | tr -d ' '; }
# write the 16-bit big-endian VALUE at byte OFF of FILE
put16() { printf "\\x$(printf %02x $(($3 >> 8)))\\x$(printf %02x $(($3 & 255)))" |
	dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
if command -v qemu-img >/dev/null 2>&1; then
	qemu-img create -q -f qcow2 -o cluster_size=65536 clean.qcow2 16M
	expect_check "a clean image" 0 clean.qcow2
	run check --json clean.qcow2
	[ "$rc" = 0 ] && grep -q '"check-errors": 0' out && pass "check --json a clean image" || fail "check --json: exit $rc [$out]"
	# 16-bit refcounts in the first refcount block: one for cluster N at 2N
	refblock=$(be64 clean.qcow2 "$(be64 clean.qcow2 48)")
	l1_cluster=$(($(be64 clean.qcow2 40) / 65536))
	cp clean.qcow2 leak.qcow2
	truncate -s $(((l1_cluster + 2) * 65536)) leak.qcow2
	put16 leak.qcow2 $((refblock + 2 * (l1_cluster + 1))) 1	# a cluster nothing uses
	expect_check "a leaked cluster" 3 leak.qcow2
	cp clean.qcow2 corrupt.qcow2
	put16 corrupt.qcow2 $((refblock + 2 * l1_cluster)) 0	# the L1 table, in use, refcount 0
	expect_check "a cluster in use with refcount 0" 2 corrupt.qcow2
	qemu-img create -q -f raw raw.img 1M
	expect_check "a raw image (no refcounts)" 63 raw.img
else
	skipped "check on images (no qemu-img)"
fi
expect_check "a missing image" 4 missing.qcow2

summary
