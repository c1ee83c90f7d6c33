#!/bin/bash
# Automake test: the boot scripts that put qcowtab fields, kernel command
# line values and image data into udev rules and shell scripts quote them.
#
# udev: the shell of 11-dm-qcowsetup.rules prints an image id only when it
# is hex digits and dashes (a LUKS UUID from an image can hold "\n" for sh's
# echo); the link patterns of both rules files take a UUID (and a path hash)
# and nothing else.
#
# Exit 0 pass, 1 fail, 99 error.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qs-hooks.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT
failed=0 passed=0
ok() { echo "PASS: $*"; passed=$((passed + 1)); }
ko() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else ko "$what"; fi; }

# ---- udev -----------------------------------------------------------------

# a value of a rules file, udev's substitutions done ($$ is $, %% is %)
rule_value() { # FILE KEY: the value of the first KEY"..." (no '"' in it)
	local line v
	line=$(grep -F "$2\"" "$1" | head -n 1)
	v=${line#*"$2\""}
	v=${v%%\"*}
	v=${v//\$\$/\$}
	printf '%s\n' "${v//%%/%}"
}
import=$(rule_value "$top/udev/11-dm-qcowsetup.rules" 'IMPORT{program}=')
script=${import#/bin/sh -c \'}
script=${script%\'}
image_id() { DM_UUID=$1 DM_NAME=$2 sh -c "$script"; }
uuid=0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6b
check "11-dm: a LUKS UUID is the image id" test "$(image_id "QCOW2-$uuid-vm1" vm1)" = "QCOWSETUP_IMAGE_ID=$uuid"
check "11-dm: a path hash is the image id" test "$(image_id QCOW2-0123456789abcdef-a-b a-b)" = "QCOWSETUP_IMAGE_ID=0123456789abcdef"
check "11-dm: an id with a backslash (echo's \\n) prints nothing" \
	test -z "$(image_id 'QCOW2-a\nSYSTEMD_WANTS=x.service-vm1' vm1)"
check "11-dm: an id with '/' or '..' prints nothing" test -z "$(image_id 'QCOW2-../../etc-vm1' vm1)"
check "11-dm: an id with blanks or globs prints nothing" test -z "$(image_id 'QCOW2-a b*-vm1' vm1)"

# udev matches with fnmatch(3) and '|' alternatives: bash's [[ == ]] does
# the same for these patterns
udev_match() { # PATTERN VALUE
	local p
	IFS='|' read -ra alts <<< "$1"
	for p in "${alts[@]}"; do
		# shellcheck disable=SC2053 # a pattern
		[[ $2 == $p ]] && return 0
	done
	return 1
}
for f in "$top/udev/11-dm-qcowsetup.rules:ENV{QCOWSETUP_IMAGE_ID}==" "$top/udev/60-qcowsetup.rules.in:ENV{ID_QCOW2_LUKS_UUID}=="; do
	pat=$(rule_value "${f%%:*}" "${f#*:}")
	what="$(basename "${f%%:*}") ${f#*:}"
	check "$what: a UUID makes a link" udev_match "$pat" "$uuid"
	check "$what: an upper case UUID too" udev_match "$pat" "${uuid^^}"
	for bad in "../../../../../../../../../etc/passw" "$uuid/../x" "${uuid%?}/" "${uuid%?}" "$uuid " \
		"0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6g" "0b1f22c45a6e-4b7d-9e2f-1c2d3e4f5a6b-" ""; do
		check "$what: no link for \"$bad\"" eval '! udev_match "$pat" "$bad"'
	done
done
check "11-dm: a path hash makes a link" udev_match "$(rule_value "$top/udev/11-dm-qcowsetup.rules" 'ENV{QCOWSETUP_IMAGE_ID}==')" 0123456789abcdef

echo "$passed passed, $failed failed"
[ $failed = 0 ]
