#!/bin/bash
# The kernel-facing wrappers for real: src/lib/dm.c, loop.c, keyring.c, lock.c,
# through tests/vm/test-sys.
#
#   tests/vm/sys.sh            on the host (make check): `test-sys host` here
#                              (QEMU locks against qemu-io, keyring, arguments),
#                              then one VM boot running `test-sys vm` without
#                              udev, then again with udevd started
#   tests/vm/sys.sh --guest    inside the VM (run by the above)
#
# Environment: TEST_SYS (the test-sys binary, default
# $top_builddir/tests/vm/test-sys), QS_SYS_TARGETS (targets of the big-table
# test, default 100000; 0 skips it), QS_VM_CACHE (default
# $top_builddir/tests/vm/out/sys: the extra files make this initramfs differ
# from the other VM tests'), and those of run-vm.sh.
# Exit 0 pass, 1 fail, 77 skip, 99 the VM did not run or timed out.
set -u

if [ "${1:-}" = --guest ]; then
	# ------------------------------------------------------------ in the VM
	PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin
	# init.sh exports it for dmsetup; dm.c must find out by itself that
	# udev is not running, as in a real initramfs.
	unset DM_DISABLE_UDEV
	targets=${2:-100000}
	here=$(cd "$(dirname "$0")" && pwd)    # the share, on 9p
	rc=0
	mkfs.ext4 -q -F /dev/vda || { echo "FAIL: mkfs.ext4 /dev/vda"; exit 1; }
	mkdir -p /mnt/ext4 && mount -t ext4 /dev/vda /mnt/ext4 || { echo "FAIL: mount"; exit 1; }
	mkdir -p /mnt/ext4/t "$here/9p" /tmp/tmpfs
	echo "== without udev"
	test-sys vm --targets "$targets" /mnt/ext4/t "$here/9p" /tmp/tmpfs || rc=1

	if command -v udevadm >/dev/null && [ -d /usr/lib/udev/rules.d ]; then
		echo "== with udev"
		mkdir -p /run/qs-udev /run/udev
		ln -sf "$(command -v udevadm)" /run/qs-udev/systemd-udevd
		/run/qs-udev/systemd-udevd --daemon --resolve-names=never 2>/dev/null
		for i in $(seq 50); do [ -e /run/udev/control ] && break; sleep 0.1; done
		if [ -e /run/udev/control ]; then
			udevadm trigger --action=add --subsystem-match=block >/dev/null 2>&1
			udevadm settle --timeout=30
			test-sys vm --udev /mnt/ext4/t || rc=1
			udevadm control --exit 2>/dev/null
		else
			echo "FAIL: udevd did not start"
			rc=1
		fi
	else
		echo "SKIP: udev tests: no udevadm or dm rules in the initramfs"
	fi
	umount /mnt/ext4
	rm -rf "${here:?}/9p"
	exit $rc
fi

# ---------------------------------------------------------------- on the host
here=$(cd "$(dirname "$0")" && pwd)
top_builddir=${top_builddir:-$(cd "$here/../.." && pwd)}
test_sys=${TEST_SYS:-$top_builddir/tests/vm/test-sys}
[ -x "$test_sys" ] || { echo "SKIP: $test_sys not built"; exit 77; }
# A libtool wrapper (shared libqcowsetup): build-initramfs.sh takes .libs/.

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qs-sys.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
rc=0

echo "== on the host"
mkdir "$tmp/host"
"$test_sys" host "$tmp/host"
case $? in 0|77) ;; *) rc=1 ;; esac

qemu=${QEMU:-qemu-system-x86_64}
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r | head -1)
if ! command -v "$qemu" >/dev/null || [ -z "$kernel" ] || [ ! -r "$kernel" ]; then
	echo "SKIP: no $qemu or no readable kernel in /boot: VM part skipped"
	[ $rc = 0 ] && exit 77
	exit $rc
fi

# The share is a scratch directory (9p files of the loop tests go there).
cp "$here/sys.sh" "$tmp/sys.sh"
truncate -s 512M "$tmp/disk.img"
extras=(--extra "$test_sys")
udevadm=$(command -v udevadm || true)
if [ -n "$udevadm" ]; then
	extras+=(--extra "$udevadm=/usr/bin/udevadm")
	for r in /usr/lib/udev/rules.d/*dm*.rules /lib/udev/rules.d/*dm*.rules; do
		[ -f "$r" ] || continue
		case " ${extras[*]} " in *"/$(basename "$r") "*) continue ;; esac
		extras+=(--extra "$r=/usr/lib/udev/rules.d/$(basename "$r")")
	done
fi
export QS_VM_CACHE=${QS_VM_CACHE:-$top_builddir/tests/vm/out/sys}
"$here/run-vm.sh" --share "$tmp" --disk "$tmp/disk.img" --mem 1536 --timeout 900 \
	"${extras[@]}" -- "$tmp/sys.sh" --guest "${QS_SYS_TARGETS:-100000}"
vrc=$?
case $vrc in
0) ;;
124|125) echo "sys.sh: the VM did not run to the end (run-vm.sh exit $vrc)"; exit 99 ;;
*) rc=1 ;;
esac
exit $rc
