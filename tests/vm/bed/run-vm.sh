#!/bin/bash
# Run a script as root inside a throw-away VM (real kernel, QEMU TCG).
#
#   tests/vm/bed/run-vm.sh [OPTIONS] -- SCRIPT [ARGS...]
#   tests/vm/bed/run-vm.sh [OPTIONS] --shell
#
# Boots the newest installed /boot/vmlinuz-* with the test-bed initramfs
# (tests/vm/bed/build-initramfs.sh, rebuilt only when its inputs change), shares DIR
# at /host in the guest (virtio-9p), runs SCRIPT (a file inside DIR) there with
# ARGS, streams the serial console to stdout (escape codes stripped) and exits
# with the status of SCRIPT.
#
# Options:
#   --share DIR      directory shared at /host (default: the repository top)
#   --mem MB         guest memory (default 1024)
#   --smp N          guest CPUs (default 2)
#   --timeout S      kill QEMU after S seconds and exit 124 (default 600)
#   --disk FILE[,O]  attach FILE as a raw virtio disk (/dev/vda, vdb, ... in order);
#                    O: more -drive options (e.g. readonly=on,format=qcow2)
#   --extra FILE[=DEST]  put FILE (e.g. the qcowsetup binary; a libtool wrapper
#                    is followed to .libs/) and its libraries in the initramfs,
#                    at DEST or /usr/local/bin/; $QCOWSETUP is added when set
#   --env NAME=VAL   export NAME=VAL to SCRIPT (repeatable)
#   --qemu-arg ARG   one more QEMU argument (repeatable; e.g. a TPM's -tpmdev)
#   --append ARGS    more kernel command line
#   --verbose        all kernel messages on the console
#   --shell          no script: an interactive shell on the console
# Exit status: SCRIPT's, 124 on timeout, 125 when the VM could not run or ended
# without reporting a status (kernel panic, init failure), 2 on bad usage.
# Environment: QS_VM_CACHE (initramfs directory, default
# $top_builddir/tests/vm/out), QS_VM_KERNEL and QS_VM_KVER (kernel image and the
# version of its modules, default: newest /boot/vmlinuz-*), QS_VM_LOG (keep
# the console log in this file), QEMU (the qemu-system-x86_64 to use),
# QS_VM_ACCEL (default tcg; kvm where it works).
set -eu

me=run-vm
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../../.." && pwd)
die() { echo "$me: error: $*" >&2; exit 125; }
usage() { sed -n '3,4p' "$0" | sed 's/^#  *//' >&2; echo "see the head of $0" >&2; exit 2; }

share=$top mem=1024 smp=2 tmo=600 verbose=0 shell=0 append=
disks=() extras=() envs=() more_args=()
[ -n "${QCOWSETUP:-}" ] && [ -f "$QCOWSETUP" ] && extras+=("$QCOWSETUP")
# the slow-path daemon lives beside it (qcowsetup looks there first)
[ -n "${QCOWSETUP:-}" ] && [ -f "$(dirname "$QCOWSETUP")/qcowsetup-daemon" ] &&
	extras+=("$(dirname "$QCOWSETUP")/qcowsetup-daemon")
while [ $# -gt 0 ]; do
	case $1 in
	--share) [ $# -ge 2 ] || usage; share=$2; shift 2 ;;
	--mem) [ $# -ge 2 ] || usage; mem=$2; shift 2 ;;
	--smp) [ $# -ge 2 ] || usage; smp=$2; shift 2 ;;
	--timeout) [ $# -ge 2 ] || usage; tmo=$2; shift 2 ;;
	--disk) [ $# -ge 2 ] || usage; disks+=("$2"); shift 2 ;;
	--extra) [ $# -ge 2 ] || usage; extras+=("$2"); shift 2 ;;
	--env) [ $# -ge 2 ] || usage; envs+=("$2"); shift 2 ;;
	--qemu-arg) [ $# -ge 2 ] || usage; more_args+=("$2"); shift 2 ;;
	--append) [ $# -ge 2 ] || usage; append="$append $2"; shift 2 ;;
	--verbose) verbose=1; shift ;;
	--shell) shell=1; shift ;;
	--) shift; break ;;
	-h|--help) usage ;;
	*) echo "$me: unknown argument $1" >&2; usage ;;
	esac
done
if [ $shell = 0 ]; then
	[ $# -ge 1 ] || usage
	script=$1; shift
fi
case $mem$smp$tmo in *[!0-9]*) echo "$me: --mem, --smp and --timeout take numbers" >&2; exit 2 ;; esac

qemu=${QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || die "$qemu not found"
[ -d "$share" ] || die "share $share is not a directory"
share=$(cd "$share" && pwd -P)

# The script, as a path inside the share, as the guest sees it.
if [ $shell = 0 ]; then
	if [ -e "$script" ]; then
		s=$(cd "$(dirname "$script")" && pwd -P)/$(basename "$script")
	elif [ -e "$share/$script" ]; then
		s=$share/$script
	else
		die "$script: no such file (relative paths are taken from here, then from $share)"
	fi
	case $s in
	"$share"/*) guest_script=/host/${s#"$share"/} ;;
	*) die "$script is not inside the share $share" ;;
	esac
fi

# Kernel: the newest one that has its modules installed.
if [ -n "${QS_VM_KERNEL:-}" ]; then
	kernel=$QS_VM_KERNEL
	kver=${QS_VM_KVER:-${kernel##*/vmlinuz-}}
else
	kernel='' kver=''
	# shellcheck disable=SC2012 # kernel file names have no white space
	for k in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
		v=${k#/boot/vmlinuz-}
		if [ -f "/usr/lib/modules/$v/modules.dep" ] || [ -f "/lib/modules/$v/modules.dep" ]; then
			kernel=$k kver=$v; break
		fi
	done
	[ -n "$kernel" ] || die "no kernel in /boot with modules in /usr/lib/modules (apt-get install linux-image-amd64)"
fi
[ -r "$kernel" ] || die "$kernel is not readable (run as root, or chmod a+r it)"

cache=${QS_VM_CACHE:-${top_builddir:-$top}/tests/vm/out}
"$here/build-initramfs.sh" "$cache" --kver "$kver" ${extras[@]+--extra "${extras[@]}"} || die "cannot build the initramfs"
initrd=$cache/initramfs.cpio

# Kernel command line. Arguments travel base64-encoded (any byte survives).
cmdline="console=ttyS0 panic=-1 mitigations=off"
if [ $verbose = 1 ]; then cmdline="$cmdline loglevel=7"; else cmdline="$cmdline quiet loglevel=4"; fi
if [ $shell = 0 ]; then
	cmdline="$cmdline qs.run=$guest_script"
	enc=
	for a in "$@"; do enc="$enc${enc:+,}$(printf '%s' "$a" | base64 -w0)"; done
	[ -z "$enc" ] || cmdline="$cmdline qs.args=$enc"
	case $guest_script in *[[:space:]]*) die "the script path must not contain white space" ;; esac
	enc=
	for a in "${envs[@]+"${envs[@]}"}"; do enc="$enc${enc:+,}$(printf '%s' "$a" | base64 -w0)"; done
	[ -z "$enc" ] || cmdline="$cmdline qs.env=$enc"
fi
cmdline="$cmdline$append"
# x86 COMMAND_LINE_SIZE is 2048: pass big arguments in a file of the share.
[ ${#cmdline} -lt 2000 ] || die "kernel command line too long (${#cmdline} bytes): put the arguments in a file"

qemu_args=(-machine "q35,accel=${QS_VM_ACCEL:-tcg}" -cpu max -smp "$smp" -m "$mem"
	-nographic -nodefaults -no-reboot -serial stdio
	-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
	-device virtio-rng-pci
	-fsdev "local,id=fs0,path=${share//,/,,},security_model=none,multidevs=remap"
	-device "virtio-9p-pci,fsdev=fs0,mount_tag=host")
for d in "${disks[@]+"${disks[@]}"}"; do
	f=${d%%,*} o=
	[ "$f" = "$d" ] || o=,${d#*,}
	[ -e "$f" ] || die "disk $f does not exist"
	qemu_args+=(-drive "file=${f//,/,,},if=virtio,format=raw,cache=writeback$o")
done
qemu_args+=("${more_args[@]+"${more_args[@]}"}")

if [ $shell = 1 ]; then
	exec "$qemu" "${qemu_args[@]/#stdio/mon:stdio}"
fi

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/qs-run-vm.XXXXXX")	# as tests/lib.sh
tpid=
# shellcheck disable=SC2317 # called by the trap
cleanup() {
	[ -z "$tpid" ] || kill -TERM "$tpid" 2>/dev/null || :
	wait 2>/dev/null || :
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "$me: interrupted: stopping QEMU" >&2; exit 130' INT HUP
trap 'echo "$me: terminated: stopping QEMU" >&2; exit 143' TERM
log=${QS_VM_LOG:-$tmp/console.log}
: > "$log"

# QEMU runs under timeout(1) (exit 124 when it had to kill it) in a background
# pipeline, so that the traps above can stop it: a foreground pipeline would hold
# them back until QEMU ends. The console is filtered (escape sequences, CRs and
# other control characters removed), copied to stdout and to the log; the time
# at which init starts is noted for the timing line.
t0=$EPOCHREALTIME
{
	timeout -k 5 "$tmo" "$qemu" "${qemu_args[@]}" </dev/null 2>&1 &
	echo $! > "$tmp/timeout.pid"
	rc=0
	wait $! || rc=$?
	echo $rc > "$tmp/qemu.rc"
} |
	sed -u -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1b[()][A-Za-z0-9]//g' \
		-e 's/\x1b[cDEHM78=>]//g' -e 's/[\x00-\x08\x0b-\x1f\x7f]//g' |
	while IFS= read -r line; do
		printf '%s\n' "$line"
		printf '%s\n' "$line" >> "$log"
		case $line in
		"QS-BOOT: init started at "*) echo "$EPOCHREALTIME ${line#QS-BOOT: init started at }" > "$tmp/init.time" ;;
		esac
	done &
while [ ! -s "$tmp/timeout.pid" ] && kill -0 $! 2>/dev/null; do sleep 0.05; done
tpid=$(cat "$tmp/timeout.pid" 2>/dev/null || :)
wait $! || :
t1=$EPOCHREALTIME
tpid=
qrc=$(cat "$tmp/qemu.rc" 2>/dev/null || echo 125)
status=$(sed -n 's/^QS-EXIT=\([0-9][0-9]*\)$/\1/p' "$log" | tail -n 1)

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
timing="total $(elapsed "$t0" "$t1")s"
if [ -s "$tmp/init.time" ]; then
	read -r t_init guest_init < "$tmp/init.time"
	timing="init reached after $(elapsed "$t0" "$t_init")s (guest uptime ${guest_init%%s*}s), $timing"
fi
echo "$me: $timing" >&2

if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
	echo "$me: timeout after ${tmo}s: QEMU killed" >&2
	exit 124
fi
if [ -z "$status" ]; then
	echo "$me: the VM ended without reporting a status (QEMU exit $qrc)" >&2
	exit 125
fi
[ "$qrc" = 0 ] || echo "$me: warning: QEMU exited with status $qrc" >&2
exit "$status"
