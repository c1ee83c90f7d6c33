#!/bin/bash
# Automake test: the kernel-facing wrappers for real (src/lib/dm.c, loop.c,
# keyring.c, lock.c) through tests/vm/prog/sys-wrappers: `sys-wrappers host`
# here (QEMU locks against qemu-io, keyring, arguments), then one VM boot
# running tests/vm/guest/sys.sh (`sys-wrappers vm` without udev, then again
# with udevd started).
#
# Environment: SYS_WRAPPERS (the sys-wrappers binary, default
# $top_builddir/tests/vm/prog/sys-wrappers), QS_SYS_TARGETS (targets of the
# big-table test, default 100000; 0 skips it), QS_VM_CACHE (default
# $top_builddir/tests/vm/out/sys: the extra files make this initramfs differ
# from the other VM tests'), and those of run-vm.sh.
# Exit 0 pass, 1 fail, 77 skip, 99 the VM did not run or timed out.
set -u
me=test-sys
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
sys_wrappers=${SYS_WRAPPERS:-$builddir/tests/vm/prog/sys-wrappers}
[ -x "$sys_wrappers" ] || skip_test "$sys_wrappers not built"
# A libtool wrapper (shared libqcowsetup): build-initramfs.sh takes .libs/.

make_work
rc=0

echo "== on the host"
mkdir "$work/host"
"$sys_wrappers" host "$work/host"
case $? in 0|77) ;; *) rc=1 ;; esac

qemu=${QEMU:-qemu-system-x86_64}
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r | head -1)
if ! command -v "$qemu" >/dev/null || [ -z "$kernel" ] || [ ! -r "$kernel" ]; then
	echo "SKIP: no $qemu or no readable kernel in /boot: VM part skipped"
	[ $rc = 0 ] && exit 77
	exit $rc
fi

# The share is a scratch directory (9p files of the loop tests go there).
mkdir "$work/share"
cp "$here/guest/sys.sh" "$work/share/"
truncate -s 512M "$work/disk.img"
extras=(--extra "$sys_wrappers")
udevadm=$(command -v udevadm || true)
if [ -n "$udevadm" ]; then
	extras+=(--extra "$udevadm=/usr/bin/udevadm")
	for r in /usr/lib/udev/rules.d/*dm*.rules /lib/udev/rules.d/*dm*.rules; do
		[ -f "$r" ] || continue
		case " ${extras[*]} " in *"/$(basename "$r") "*) continue ;; esac
		extras+=(--extra "$r=/usr/lib/udev/rules.d/$(basename "$r")")
	done
fi
export QS_VM_CACHE=${QS_VM_CACHE:-$builddir/tests/vm/out/sys}
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1536 --timeout 900 \
	"${extras[@]}" -- "$work/share/sys.sh" "${QS_SYS_TARGETS:-100000}"
vrc=$?
case $vrc in
0) ;;
124|125) echo "$me: the VM did not run to the end (run-vm.sh exit $vrc)"; exit 99 ;;
*) rc=1 ;;
esac
exit $rc
