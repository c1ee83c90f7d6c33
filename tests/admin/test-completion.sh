#!/bin/bash
# Automake test: the bash completion (completion/qcowsetup) completes
# commands and options from `qcowsetup --help`, qcowtab names after --tab,
# option values. Skips (77) without bash-completion.
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
builddir=${top_builddir:-$top}
bc=/usr/share/bash-completion/bash_completion
[ -r "$bc" ] || { echo "SKIP: no $bc (apt-get install bash-completion)"; exit 77; }
# shellcheck disable=SC1090
. "$bc"
# shellcheck disable=SC1091
. "$top/completion/qcowsetup"
PATH=$builddir:$PATH
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qs-compl.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
printf '# x\nalpha /x none\nbeta  UUID=1:/y none readonly\n' > "$tmp/tab"
rc=0
t() {  # EXPECTED WORDS...
	local want=$1
	shift
	COMP_WORDS=("$@")
	COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
	COMP_LINE="${COMP_WORDS[*]}"
	COMP_POINT=${#COMP_LINE}
	COMPREPLY=()
	_qcowsetup
	if [ "${COMPREPLY[*]}" = "$want" ]; then
		echo "PASS: [${COMP_WORDS[*]}] -> $want"
	else
		echo "FAIL: [${COMP_WORDS[*]}] -> ${COMPREPLY[*]}, not $want"
		rc=1
	fi
}
t "probe" qcowsetup pro
t "open" qcowsetup --tab op
t "alpha beta" qcowsetup --qcowtab "$tmp/tab" open --tab ''
t "beta" qcowsetup close --qcowtab "$tmp/tab" --tab b
t "--tab" qcowsetup --ta
t "--qcowtab" qcowsetup --qcowt
t "qcow2 qcow raw" qcowsetup --format ''
exit $rc
