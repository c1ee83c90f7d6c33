#!/bin/bash
# Automake test: boot from an initramfs built by Debian's dracut with the
# 90qcowsetup module of this tree, under QEMU TCG,
# driving the serial console with tests/vm/bed/console.py.
#
# The root filesystem (busybox and an /sbin/init that prints QS-ROOT-* lines
# and powers off) is inside a LUKS qcow2 image on an ext4 filesystem on a
# virtio disk ("the holding disk"); a second LUKS image there shares its
# passphrase; a third is written straight onto a disk that is hot-plugged
# while dracut waits. Boots:
#   keyfile     rd.qcowsetup.* with a key file on the holding disk: no question
#   passphrase  the passphrase typed at the console prompt, after a wrong one
#   wrong       tries=2 wrong passphrases: dracut's emergency shell
#               (with QS_BOOT_FULL=1: the passphrase boot has a wrong one too)
#   same        two same-passphrase images: one question, both mapped
#               (with QS_BOOT_FULL=1; test-hostile asks once for two
#               same-passphrase entries of open --tab in make check)
#   hotplug     a qcowtab entry (x-initrd.attach) for a disk that appears
#               later: recognised by 60-qcowsetup.rules, mapped, booted
# After each, the holding disk (and the hot-plugged one) is byte-identical
# to before: nothing written. The read-write root item is
# tests/vm/test-boot-rw.sh.
#
# The machinery (initramfs cached by input hash, boots, checks) is
# tests/vm/bed/boot-lib.sh.
# Environment: QCOWSETUP (the program), QS_KEEP=1 (keep the work directory),
# QS_BOOT_ONLY="keyfile same" (run only those boots), QEMU, QS_VM_ACCEL.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, dracut...), 99 error.
set -eu
me=test-boot
# shellcheck source=tests/vm/bed/boot-lib.sh
. "$(cd "$(dirname "$0")" && pwd)/bed/boot-lib.sh"

PASS='qcow2 boot secret'
WRONG='not the secret'

# ------------------------------------------------------------ images
make_root() {  # DIR MARKER
	boot_make_root "$1" "$2" <<'EOF'
#!/bin/sh
export PATH=/bin
echo "QS-ROOT-INIT: $(cat /etc/marker) pid $$"
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
echo "QS-ROOT-MOUNT: $(grep ' / ' /proc/mounts | head -n 1)"
for f in /sys/block/dm-*/dm/name; do [ -e "$f" ] && echo "QS-ROOT-DM: $(cat "$f")"; done
sync
echo "QS-ROOT-POWEROFF"
poweroff -f
EOF
}
make_images() {
	make_root root root
	make_root direct direct
	mkdir -p data hold/images hold/keys
	echo data > data/marker
	mkfs.ext4 -q -F -d root root.raw 16M
	mkfs.ext4 -q -F -d direct direct.raw 16M
	mkfs.ext4 -q -F -d data data.raw 8M
	printf '%s' "$PASS" > hold/keys/root.key
	head -c 48 /dev/urandom | base64 -w0 > hold/keys/direct.key  # QEMU secrets are UTF-8
	boot_luks_qcow2 root.raw hold/images/root.qcow2 "data=$PASS"
	boot_luks_qcow2 data.raw hold/images/data.qcow2 "data=$PASS"
	boot_luks_qcow2 direct.raw direct.qcow2 "file=$work/hold/keys/direct.key"
	mkfs.ext4 -q -F -U "$HOLD_UUID" -L qshold -E root_owner=0:0 -d hold hold.img 64M
	# the qcow2 bytes straight onto a disk
	cp direct.qcow2 directdisk.img
	truncate -s 32M directdisk.img
	rm -rf root direct data hold root.raw direct.raw data.raw direct.qcow2
}
make_images >images.log 2>&1 || true
# (a failed command above does not stop the block: check what it made)
if [ ! -s hold.img ] || [ "$(head -c 3 directdisk.img 2>/dev/null)" != QFI ] ||
   [ -n "$(grep -v -e '^Creating regular file' -e 'Unable to get accurate CPU usage' images.log)" ]; then
	cat images.log
	echo "$me: error: cannot make the images" >&2
	exit 99
fi
md5_hold=$(md5sum < hold.img)
md5_direct=$(md5sum < directdisk.img)

boot_initramfs
echo "$me: images and initramfs ready in $(( $(date +%s) - t0 ))s"

tab=$(lsinitrd -f etc/qcowtab "$initrd" 2>/dev/null || true)
if echo "$tab" | grep -q '^direct ' && ! echo "$tab" | grep -q notinrd &&
   lsinitrd "$initrd" 2>/dev/null | grep -aq 'usr/sbin/qcowsetup-ask$'; then
	pass "initramfs: qcowsetup, qcowsetup-ask and the x-initrd.attach entries of qcowtab only"
else
	fail "initramfs content: etc/qcowtab is [$tab]"
fi

# ------------------------------------------------------------ boots
img_root="rd.qcowsetup.image=UUID=$HOLD_UUID:/images/root.qcow2 rd.qcowsetup.name=root"
img_data="rd.qcowsetup.image=UUID=$HOLD_UUID:/images/data.qcow2 rd.qcowsetup.name=data"

unchanged() {
	if [ "$(md5sum < hold.img)" = "$md5_hold" ] && [ "$(md5sum < directdisk.img)" = "$md5_direct" ]; then
		pass "$1: nothing written to the disks"
	else
		fail "$1: the disks changed"
		md5_hold=$(md5sum < hold.img) md5_direct=$(md5sum < directdisk.img)
	fi
}

if want keyfile; then
	rc=0
	boot keyfile "root=/dev/mapper/root ro $img_root rd.qcowsetup.key=/keys/root.key:UUID=$HOLD_UUID rd.qcowsetup.options=readonly" -- \
		'expect:QS-ROOT-INIT: root' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 ro' 'expect:QS-ROOT-DM: root\n' \
		'expect:QS-ROOT-POWEROFF' end 'absent:Enter passphrase' || rc=$?
	boot_check keyfile $rc "keyfile: root in a LUKS qcow2 on ext4, key file on the holding disk: its /sbin/init runs, no question"
	unchanged keyfile
fi

# the console steps of typing a passphrase at root's prompt
typed() { printf '%s\n' 'expect:Enter passphrase for root: ' sleep:0.5 "send:$1\\n"; }
mapfile -t type_wrong < <(typed "$WRONG")
mapfile -t type_right < <(typed "$PASS")

if want passphrase; then
	rc=0
	boot passphrase "root=/dev/mapper/root ro $img_root rd.qcowsetup.options=readonly,tries=3" -- \
		"${type_wrong[@]}" 'expect:No key available with this passphrase' "${type_right[@]}" \
		'expect:QS-ROOT-INIT: root' 'expect:QS-ROOT-POWEROFF' end 'count:2:Enter passphrase' || rc=$?
	boot_check passphrase $rc "passphrase: typed at the console prompt (a wrong one first, retried): /sbin/init runs"
	unchanged passphrase
fi

if [ -n "${QS_BOOT_FULL:-}" ] && want wrong; then
	rc=0
	boot wrong "root=/dev/mapper/root ro $img_root rd.qcowsetup.options=readonly,tries=2" -- \
		"${type_wrong[@]}" "${type_wrong[@]}" 'expect:no passphrase opened it after 2 attempts' 'expect:could not map root' \
		'expect:Dropping to debug shell' sleep:2 \
		'send:ls /dev/mapper; echo QS-EMERGENCY-SHELL\n' 'expect:QS-EMERGENCY-SHELL\n' \
		'send:echo o > /proc/sysrq-trigger\n' end 'count:2:Enter passphrase' 'absent:QS-ROOT-INIT' || rc=$?
	boot_check wrong $rc "wrong: tries=2 wrong passphrases, then dracut's emergency shell, no root"
	unchanged wrong
fi

if [ -n "${QS_BOOT_FULL:-}" ] && want same; then
	rc=0
	boot same "root=/dev/mapper/root ro $img_root rd.qcowsetup.options=readonly,same-passphrase $img_data rd.qcowsetup.options=readonly,same-passphrase" -- \
		'expect:Enter passphrase for (root, data|data, root): ' sleep:0.5 "send:$PASS\\n" \
		'expect:QS-ROOT-INIT: root' 'expect:QS-ROOT-DM: (data|root)\n' 'expect:QS-ROOT-POWEROFF' end \
		'count:1:Enter passphrase' 'count:1:QS-ROOT-DM: data\n' 'count:1:QS-ROOT-DM: root\n' || rc=$?
	boot_check same $rc "same: two images sharing one passphrase, one prompt, both mapped"
	unchanged same
fi

if want hotplug; then
	rc=0
	boot hotplug "root=/dev/mapper/direct ro" --hotplug -- \
		'expect:qcowsetup: direct: waiting for its devices' sleep:1 \
		'qmp:{"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "qd", "serial": "qcowdirect", "id": "qdd", "bus": "rp1"}}' \
		'expect:QS-ROOT-INIT: direct' 'expect:QS-ROOT-MOUNT: /dev/mapper/direct / ext4 ro' 'expect:QS-ROOT-POWEROFF' end \
		'absent:Enter passphrase' || rc=$?
	boot_check hotplug $rc "hotplug: a qcow2 written onto a disk that appears later: recognised by udev, mapped from qcowtab, booted"
	unchanged hotplug
fi

boot_summary
