#!/bin/bash
# Automake test: a read-write root filesystem in a LUKS
# qcow2 image on an ext4 "holding disk", booted from an initramfs built by
# Debian's dracut with the 90qcowsetup module of this tree, under QEMU TCG
# (the machinery is tests/vm/bed/boot-lib.sh, shared with test-boot.sh).
#
# The root's /sbin/init (busybox) reads its step from the kernel command
# line (qs.step=), reports QS-ROOT-* lines, then shuts down as a system
# does: sync, root remounted read-only, poweroff. Boots:
#   write   the root is mounted read-write (its mapping without readonly,
#           key file on the holding disk); the slow-path daemon outlived
#           switch_root (and its process ids are in /run/sendsigs.omit.d);
#           a small file and 4 MiB of new data are written after
#           switch_root, read back after the daemon's remaps
#   verify  the next boot sees both, and writes again
# After each, on the host (the holding disk's journal replayed on a copy):
# `qemu-img check` finds no errors and no leaks, and the content that
# `qemu-img convert` gives holds the files (ext4 clean: the remount
# read-only reached the image).
#   close   dracut's shutdown hook of the module, run by hand in the
#           emergency shell (rd.break=pre-pivot) after unmounting the root:
#           the mapping is closed, the holding filesystem unmounted; on the
#           host it needs no journal recovery, the image file has the size
#           it had at open (the room reserved then given back), `qemu-img
#           check` is clean.
#
# Environment: as test-boot.sh (QCOWSETUP, QS_KEEP=1, QEMU, QS_VM_ACCEL);
# QS_RW_DEBUG=1: the blocked tasks on the console 40 s into the root's init.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, dracut...), 99 error.
set -eu
me=test-boot-rw
# shellcheck source=tests/vm/bed/boot-lib.sh
. "$(cd "$(dirname "$0")" && pwd)/bed/boot-lib.sh"
command -v debugfs >/dev/null && command -v e2fsck >/dev/null || skip_test "debugfs or e2fsck not found (e2fsprogs)"

PASS='qcow2 rw secret'
token=rw-$$-$RANDOM

# ------------------------------------------------------------ images
make_images() {
	boot_make_root root root-rw <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
step='' token=''
for w in $(cat /proc/cmdline); do
	case $w in
	qs.step=*) step=${w#qs.step=} ;;
	qs.token=*) token=${w#qs.token=} ;;
	qs.debug=1) (sleep 40; echo 8 > /proc/sys/kernel/printk; echo t > /proc/sysrq-trigger) & ;;
	esac
done
echo "QS-ROOT-INIT: $(cat /etc/marker) $step"
echo "QS-ROOT-MOUNT: $(grep ' / ' /proc/mounts | head -n 1)"
for p in /proc/[0-9]*; do
	case $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) in
	@qcowsetup-daemon\ --name*) echo "QS-ROOT-DAEMON: ${p#/proc/}" ;;
	@qcowsetup-daemon*) echo "QS-ROOT-DAEMON-OTHER: ${p#/proc/} $(tr '\0' ' ' < "$p/cmdline")" ;;
	esac
done
echo "QS-ROOT-OMIT: $(ls /run/sendsigs.omit.d 2>/dev/null | tr '\n' ' ')"
. /etc/qs-steps.sh
# a system's shutdown: the root read-only (its journal and the image's
# metadata reach the disk), then off
sync
mount -o remount,ro / && echo "QS-ROOT-RO: $(grep ' / ' /proc/mounts | head -n 1)"
echo "QS-ROOT-POWEROFF"
poweroff -f
EOF
	ln -s busybox root/bin/tr
	boot_root_steps > root/etc/qs-steps.sh
}
make_images >images.log 2>&1 || true
boot_rw_images 16M 64M

boot_initramfs
echo "$me: images and initramfs ready in $(( $(date +%s) - t0 ))s"
content=$(lsinitrd "$initrd" 2>/dev/null || true)
if echo "$content" | grep -q 'usr/sbin/qcowsetup-daemon$' && echo "$content" | grep -q '/nbd\.ko' &&
   echo "$content" | grep -q 'hooks/pre-pivot/90-qcowsetup-pivot\.sh$' &&
   echo "$content" | grep -q 'hooks/shutdown/20-qcowsetup-shutdown\.sh$'; then
	pass "initramfs: qcowsetup-daemon beside qcowsetup, the nbd module, the pre-pivot and shutdown hooks"
else
	fail "initramfs: no qcowsetup-daemon, nbd module, pre-pivot or shutdown hook"
fi

# ------------------------------------------------------------ boots
img="rd.qcowsetup.image=UUID=$HOLD_UUID:/images/root.qcow2 rd.qcowsetup.name=root"
img="$img rd.qcowsetup.key=/keys/root.key:UUID=$HOLD_UUID${QS_RW_DEBUG:+ qs.debug=1}"

rc=0
boot write "root=/dev/mapper/root rw $img qs.step=write qs.token=$token" -- \
	'expect:QS-ROOT-INIT: root-rw write' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 rw' \
	'expect:QS-ROOT-DAEMON: [0-9]+' 'expect:QS-ROOT-OMIT: qcowsetup-daemon\.[0-9]+' \
	'expect:QS-ROOT-BIG: [0-9a-f]{32}' 'expect:QS-ROOT-BIG-AGAIN: [0-9a-f]{32}' \
	'expect:QS-ROOT-RO: /dev/mapper/root / ext4 ro' 'expect:QS-ROOT-POWEROFF' end \
	'absent:Enter passphrase' 'absent:I/O error' 'absent:EXT4-fs error' || rc=$?
boot_check write $rc "write: read-write root in a LUKS qcow2 on ext4: the daemon outlives switch_root, files written after it, clean read-only remount"
boot_write_checks

rc=0
boot verify "root=/dev/mapper/root rw $img qs.step=verify qs.token=$token-2" -- \
	'expect:QS-ROOT-INIT: root-rw verify' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 rw' \
	"expect:QS-ROOT-WRITTEN: $token\\n" "expect:QS-ROOT-BIG: $md5_write" \
	'expect:QS-ROOT-RO: /dev/mapper/root / ext4 ro' 'expect:QS-ROOT-POWEROFF' end \
	'absent:I/O error' 'absent:EXT4-fs error' || rc=$?
boot_check verify $rc "verify: the next boot sees what the first wrote"
boot_host_files verify /images/root.qcow2 "qemu-img convert gives the files of both boots, on a clean ext4" \
	"/written=$(md5_of "$token")" "/big=$md5_write" "/written2=$(md5_of "$token-2")"

size_open=$(stat -c %s root.qcow2)
rc=0
boot close "root=/dev/mapper/root rw $img rd.break=pre-pivot" -- \
	'expect:Break before pre-pivot' 'expect:pre-pivot:/# ' sleep:1 \
	'send:umount /sysroot && (. /lib/dracut/hooks/shutdown/20-qcowsetup-shutdown.sh); echo "QS-HOOK-EXIT=$?"\n' \
	'expect:QS-HOOK-EXIT=0' \
	'send:echo QS-MAPPER: $(ls /dev/mapper); echo QS-MOUNTS: $(while read -r d m r; do echo $m; done < /proc/mounts)\n' \
	'expect:QS-MAPPER: control\n' 'expect:QS-MOUNTS: [^$]*\n' 'send:echo o > /proc/sysrq-trigger\n' end \
	'absent:I/O error' 'absent:QS-MOUNTS: .*/run/qcowsetup/mnt' || rc=$?
boot_check close $rc "close: the shutdown hook closes the mapping and unmounts the holding filesystem"
e=0
e2fsck -fn hold.img >close.e2fsck 2>&1 || e=$?
debugfs -R "dump /images/root.qcow2 root.qcow2" hold.img >/dev/null 2>&1
size=$(stat -c %s root.qcow2)
if [ $e = 0 ] && ! grep -q recover close.e2fsck && [ "$size" = "$size_open" ]; then
	pass "close: the holding filesystem is clean, the image file has its size at open again ($size bytes)"
else
	fail "close: holding filesystem (e2fsck -n exit $e) or image file size ($size, $size_open at open)"
	sed 's/^/    | /' close.e2fsck
fi
boot_host_files close /images/root.qcow2 "after the close, qemu-img check and convert as before" \
	"/written=$(md5_of "$token")" "/big=$md5_write" "/written2=$(md5_of "$token-2")"

boot_summary
