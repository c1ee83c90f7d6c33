#!/bin/bash
# Build the initramfs of tests/vm/test-boot.sh with Debian's dracut and the
# 90qcowsetup module of this tree (no installation: a private dracut base
# directory holds symlinks to the system's dracut plus this module and the
# udev rules).
#
#   tests/vm/bed/build-dracut.sh OUTDIR QCOWSETUP KVER QCOWTAB [systemd]
#
# The slow-path daemon qcowsetup-daemon beside QCOWSETUP goes in too (the
# module's QCOWSETUP_DAEMON_BINARY), when it is there. QS_DRACUT_TEST_MODULE=DIR:
# a test-only dracut module (a directory NNname) added beside 90qcowsetup.
# With "systemd": an initramfs run by systemd (dracut's systemd, systemd-initrd and
# dracut-systemd modules, as Fedora's and RHEL's), with qcowsetup-generator
# beside QCOWSETUP (the module's QCOWSETUP_GENERATOR_BINARY) and dracut's
# shutdown module (the initramfs unpacked to /run/initramfs, where systemd
# goes back to at shutdown).
#
# Writes OUTDIR/dracut.img. Cached: OUTDIR/dracut.stamp holds the sha256 of
# every input (the programs and their libraries' names, the module, the rules,
# the qcowtab, the kernel version, dracut's version, this script); nothing is
# rebuilt while it matches. QS_VM_FORCE=1 rebuilds anyway. A build takes 1-2
# minutes. Safe to run concurrently (flock).
set -eu
me=build-dracut
[ $# = 4 ] || [ $# = 5 ] && [ "${5:-systemd}" = systemd ] || { sed -n '7p' "$0" | sed 's/^#  *//' >&2; exit 2; }
outdir=$1 qs=$2 kver=$3 qcowtab=$4 flavour=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
testmod=${QS_DRACUT_TEST_MODULE:-}
top=$(cd "$here/../../.." && pwd)
sysbase=/usr/lib/dracut
command -v dracut >/dev/null || { echo "$me: dracut not found (apt-get install dracut-core)" >&2; exit 77; }
[ -d "$sysbase/modules.d" ] || { echo "$me: no $sysbase/modules.d" >&2; exit 77; }
# a libtool wrapper: the real program
if ! head -c 4 "$qs" | grep -q ELF && [ -f "$(dirname "$qs")/.libs/$(basename "$qs")" ]; then
	qs=$(dirname "$qs")/.libs/$(basename "$qs")
fi
daemon=$(dirname "$qs")/qcowsetup-daemon
[ -f "$daemon" ] || daemon=$(dirname "$2")/qcowsetup-daemon
if [ -f "$daemon" ] && ! head -c 4 "$daemon" | grep -q ELF && [ -f "$(dirname "$daemon")/.libs/qcowsetup-daemon" ]; then
	daemon=$(dirname "$daemon")/.libs/qcowsetup-daemon
fi
[ -f "$daemon" ] || daemon=''
generator='' modules="bash base udev-rules dm rootfs-block fs-lib qcowsetup"
if [ "$flavour" = systemd ]; then
	[ -x /usr/lib/systemd/systemd ] || { echo "$me: no systemd here" >&2; exit 77; }
	generator=$(dirname "$qs")/qcowsetup-generator
	[ -f "$generator" ] || generator=$(dirname "$2")/qcowsetup-generator
	[ -f "$generator" ] || { echo "$me: no qcowsetup-generator beside $2" >&2; exit 1; }
	modules="$modules systemd systemd-initrd dracut-systemd systemd-ask-password shutdown"
fi
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
exec 9>"$outdir/.dracut.lock"
flock 9

inputs() {
	echo "kver=$kver $(dracut --version 2>&1 | head -1) $flavour"
	ldd "$qs" ${daemon:+"$daemon"} 2>/dev/null | awk '{ print $1, $3 }'
	for f in "$qs" ${daemon:+"$daemon"} ${generator:+"$generator"} "$0" "$qcowtab" "$top"/dracut/90qcowsetup/* "$top"/udev/60-qcowsetup.rules.in \
		"$top"/udev/11-dm-qcowsetup.rules $([ -z "$testmod" ] || find "$testmod" -type f | sort); do
		echo "$(basename "$f") $(sha256sum < "$f")"
	done
}
sum=$(inputs | sha256sum | cut -d' ' -f1)
if [ -z "${QS_VM_FORCE:-}" ] && [ -f "$outdir/dracut.img" ] && [ "$(cat "$outdir/dracut.stamp" 2>/dev/null)" = "$sum" ]; then
	exit 0
fi

base=$outdir/dracut-base
rm -rf "$base"
mkdir -p "$base/modules.d" "$base/rules.d"
for f in "$sysbase"/*; do
	[ "$(basename "$f")" = modules.d ] || ln -s "$f" "$base/"
done
for m in "$sysbase"/modules.d/*; do ln -s "$m" "$base/modules.d/"; done
cp -r "$top/dracut/90qcowsetup" "$base/modules.d/"
extra_mod=''
if [ -n "$testmod" ]; then
	cp -r "$testmod" "$base/modules.d/"
	extra_mod=" $(basename "$testmod" | sed 's/^[0-9]*//')"
fi
sed 's|@SBINDIR@|/usr/sbin|g' "$top/udev/60-qcowsetup.rules.in" > "$base/rules.d/60-qcowsetup.rules"
# Debian's device-mapper rules are 55-dm.rules: ours run right after them
cp "$top/udev/11-dm-qcowsetup.rules" "$base/rules.d/56-dm-qcowsetup.rules"
# the generator's units run qcowsetup where this build installs it (its
# sbindir): there a link to the one the module installed
include=()
if [ -n "$generator" ]; then
	rm -rf "$outdir/include"
	sbin=$(tr '\0' '\n' < "$generator" | grep -m 1 '^/[A-Za-z0-9_./-]*/qcowsetup$' || true)
	if [ -n "$sbin" ] && [ "$sbin" != /usr/sbin/qcowsetup ]; then
		mkdir -p "$outdir/include${sbin%/*}"
		ln -s /usr/sbin/qcowsetup "$outdir/include$sbin"
		include=(--include "$outdir/include" /)
	fi
fi

echo "$me: building $outdir/dracut.img for kernel $kver (dracut, 1-2 minutes)" >&2
t0=$(date +%s)
rm -rf "$outdir/tmp"
mkdir -p "$outdir/tmp"
dracutbasedir=$base QCOWSETUP_BINARY=$qs QCOWSETUP_DAEMON_BINARY=$daemon QCOWSETUP_QCOWTAB=$qcowtab \
QCOWSETUP_GENERATOR_BINARY=$generator \
dracut --force --quiet --no-hostonly --no-hostonly-cmdline --no-early-microcode \
	--kver "$kver" --tmpdir "$outdir/tmp" \
	--modules "$modules$extra_mod" \
	--drivers "virtio_pci virtio_blk virtio_rng ext4 dm_mod dm_crypt dm_zero dm_switch loop nbd" \
	--no-compress "${include[@]}" \
	"$outdir/dracut.img.new" >"$outdir/dracut.log" 2>&1 || {
	echo "$me: dracut failed:" >&2; tail -30 "$outdir/dracut.log" >&2; exit 1; }
mv -f "$outdir/dracut.img.new" "$outdir/dracut.img"
rm -rf "$outdir/tmp"
echo "$sum" > "$outdir/dracut.stamp"
echo "$me: $(du -h "$outdir/dracut.img" | cut -f1) in $(( $(date +%s) - t0 ))s" >&2
