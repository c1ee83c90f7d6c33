#!/bin/bash
# Automake test: the bash completion (completion/qcowsetup) completes
# commands and options from `qcowsetup --help` (its own lists when the
# command cannot be run), qcowtab names after --tab, mapping names (from a
# stand-in dmsetup) after close, status and reattach, option values. Skips
# (77) without bash-completion.
me=test-completion
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
bc=/usr/share/bash-completion/bash_completion
[ -r "$bc" ] || skip_test "no $bc (apt-get install bash-completion)"
# shellcheck disable=SC1090
. "$bc"
# shellcheck disable=SC1091
. "$top/completion/qcowsetup"
make_work
tmp=$work
# dmsetup info -c --noheadings -o name,uuid --separator ' ': a top device,
# its internal device, and a device of someone else
mkdir "$tmp/bin"
printf '#!/bin/sh\nprintf "%%s\\n" "vm1 QCOW2-0123abcd-vm1" "vm1_crypt QCOW2-INT-0123abcd-vm1_crypt" "lv0 LVM-xyz"\n' > "$tmp/bin/dmsetup"
chmod +x "$tmp/bin/dmsetup"
PATH=$tmp/bin:$builddir:$PATH
printf '# x\nalpha /x none\nbeta  UUID=1:/y none readonly\n' > "$tmp/tab"
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
		pass "[${COMP_WORDS[*]}] -> $want"
	else
		fail "[${COMP_WORDS[*]}] -> ${COMPREPLY[*]}, not $want"
	fi
}
t "probe" qcowsetup pro
t "open" qcowsetup --tab op
t "alpha beta" qcowsetup --qcowtab "$tmp/tab" open --tab ''
t "beta" qcowsetup close --qcowtab "$tmp/tab" --tab b
t "--tab" qcowsetup --ta
t "--qcowtab" qcowsetup --qcowt
t "qcow2 qcow raw" qcowsetup --format ''
t "reattach" qcowsetup reat
t "vm1" qcowsetup reattach ''
t "" qcowsetup reattach vm1 ''
t "vm1" qcowsetup status v
t "vm1" qcowsetup close ''
t "--max-targets" qcowsetup --max-t
t "--keyfile-offset --keyfile-size" qcowsetup --keyfile-
t "--allow-discards" qcowsetup open --allow
# the command cannot be run: the completion's own lists
t "reattach" /nonexistent/qcowsetup reat
t "--max-targets" /nonexistent/qcowsetup --max-t
t "--deferred" /nonexistent/qcowsetup close --def
summary
