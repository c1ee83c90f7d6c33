#!/bin/bash
# In the VM (run by tests/vm/test-sys.sh): the kernel-facing wrappers
# (src/lib/dm.c, loop.c, keyring.c, lock.c) through sys-wrappers, without
# udev, then with udevd started.
#
#   sys.sh [TARGETS]    TARGETS: of the big-table test (default 100000)
#
# Exit 0 pass, 1 fail.
set -u
PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin
# init.sh exports it for dmsetup; dm.c must find out by itself that
# udev is not running, as in a real initramfs.
unset DM_DISABLE_UDEV
targets=${1:-100000}
here=$(cd "$(dirname "$0")" && pwd)    # the share, on 9p
rc=0
mkfs.ext4 -q -F /dev/vda || { echo "FAIL: mkfs.ext4 /dev/vda"; exit 1; }
mkdir -p /mnt/ext4 && mount -t ext4 /dev/vda /mnt/ext4 || { echo "FAIL: mount"; exit 1; }
mkdir -p /mnt/ext4/t "$here/9p" /tmp/tmpfs
echo "== without udev"
sys-wrappers vm --targets "$targets" /mnt/ext4/t "$here/9p" /tmp/tmpfs || rc=1

if command -v udevadm >/dev/null && [ -d /usr/lib/udev/rules.d ]; then
	echo "== with udev"
	mkdir -p /run/qs-udev /run/udev
	ln -sf "$(command -v udevadm)" /run/qs-udev/systemd-udevd
	/run/qs-udev/systemd-udevd --daemon --resolve-names=never 2>/dev/null
	for i in $(seq 50); do [ -e /run/udev/control ] && break; sleep 0.1; done
	if [ -e /run/udev/control ]; then
		udevadm trigger --action=add --subsystem-match=block >/dev/null 2>&1
		udevadm settle --timeout=30
		sys-wrappers vm --udev /mnt/ext4/t || rc=1
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
