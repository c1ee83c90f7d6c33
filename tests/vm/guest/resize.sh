#!/bin/sh
# Runs in the VM (see test-resize.sh): /dev/vda is an ext4 disk with the
# images; `qcowsetup resize` on live mappings.
. /host/lib.sh
export PATH=/usr/local/bin:$PATH
vm_require qemu-img mkfs.ext4 resize2fs e2fsck blockdev
mkdir -p /mnt/fs
vm_images_disk
sec="--object secret,id=s0,file=/mnt/m/pass"
M=1048576

img_opts() {	# qemu-img arguments naming image $1
	case $1 in
	*luks*) echo "$sec --image-opts driver=qcow2,file.filename=$1,encrypt.key-secret=s0" ;;
	*) echo "-f qcow2 $1" ;;
	esac
}
key_opts() { case $1 in *luks*) echo "--key-file /mnt/m/pass" ;; esac; }
size_of() { blockdev --getsize64 "/dev/mapper/$1"; }
vsize() {	# virtual size qemu-img reports
	# shellcheck disable=SC2046
	qemu-img info --output=json $(img_opts "$1") | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' | head -1
}
closed_checks() {	# image size md5: after close, QEMU sees size, content and a clean image
	# shellcheck disable=SC2046
	qemu-img check $(img_opts "$1") >/tmp/check.out 2>&1 || { cat /tmp/check.out; return 1; }
	[ "$(vsize "$1")" = "$2" ] || { echo "qemu-img info: $(vsize "$1"), not $2"; return 1; }
	# shellcheck disable=SC2046
	qemu-img convert $(img_opts "$1") -O raw /mnt/m/conv.raw
	[ "$(md5sum </mnt/m/conv.raw | cut -d' ' -f1)" = "$3" ] || { echo "qemu-img convert differs from the device"; return 1; }
	rm -f /mnt/m/conv.raw
}

# grow while a mounted ext4 is busy on it, then resize2fs and a file of
# fill MiB (unencrypted: past the room reserved at open, so that the file
# and its loop device must have grown; LUKS: inside it)
grow_mounted() {	# image new-size-arg expected-bytes fill
	n=$1 name=rz-$1
	# shellcheck disable=SC2046
	qcowsetup open $(key_opts "$n") "$n.qcow2" "$name"
	old=$(size_of "$name")
	mkfs.ext4 -q -F "/dev/mapper/$name"
	mount "/dev/mapper/$name" /mnt/fs
	dd if=/dev/urandom of=/mnt/fs/before bs=1M count=2 2>/dev/null
	sync
	blocks0=$(df -k /mnt/fs | awk 'NR == 2 { print $2 }')
	qcowsetup resize "$name" "$2"
	[ "$(size_of "$name")" = "$3" ] || { echo "device shows $(size_of "$name"), not $3"; return 1; }
	if [ "$n" = over ]; then
		# the area the backing file reaches past the old end reads zeros
		dd if="/dev/mapper/$name" bs=1M skip=$((old / M)) count=$((24 - old / M)) 2>/dev/null |
			cmp -s - /dev/zero -n $(((24 - old / M) * M)) || { echo "the new area does not read zeros"; return 1; }
	fi
	resize2fs "/dev/mapper/$name" >/tmp/resize2fs.out 2>&1 || { cat /tmp/resize2fs.out; return 1; }
	blocks1=$(df -k /mnt/fs | awk 'NR == 2 { print $2 }')
	[ "$blocks1" -gt "$blocks0" ] || { echo "ext4 did not grow ($blocks0 -> $blocks1 KiB)"; return 1; }
	# fill into the new space
	dd if=/dev/urandom of=/mnt/fs/after bs=1M count="$4" 2>/dev/null
	md5a=$(md5sum </mnt/fs/after)
	umount /mnt/fs
	e2fsck -fn "/dev/mapper/$name" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; return 1; }
	mount "/dev/mapper/$name" /mnt/fs
	[ "$(md5sum </mnt/fs/after)" = "$md5a" ] || { echo "file content changed"; return 1; }
	umount /mnt/fs
	md5=$(md5sum <"/dev/mapper/$name" | cut -d' ' -f1)
	qcowsetup close "$name"
	vm_assert_clean
	closed_checks "$n.qcow2" "$3" "$md5"
	echo "$old -> $3 bytes, ext4 $blocks0 -> $blocks1 KiB"
}

shrink_refused() {	# data at 15M: a shrink to 12M is refused in one line, nothing changes
	qcowsetup open small.qcow2 rz-small
	md5=$(md5sum </dev/mapper/rz-small | cut -d' ' -f1)
	rc=0
	qcowsetup resize --shrink rz-small 12M 2>/tmp/err || rc=$?
	[ $rc = 1 ] || { echo "exit $rc, not 1"; cat /tmp/err; return 1; }
	[ "$(wc -l </tmp/err)" = 1 ] || { echo "not one line:"; cat /tmp/err; return 1; }
	cat /tmp/err
	rc=0
	qcowsetup resize rz-small 8M 2>/tmp/err || rc=$?
	[ $rc = 1 ] || { echo "without --shrink: exit $rc, not 1"; return 1; }
	[ "$(size_of rz-small)" = $((16 * M)) ] || { echo "the device changed size"; return 1; }
	[ "$(md5sum </dev/mapper/rz-small | cut -d' ' -f1)" = "$md5" ] || { echo "content changed"; return 1; }
	qcowsetup close rz-small
	closed_checks small.qcow2 $((16 * M)) "$md5"
}

shrink_allowed() {	# data in the first 1M only: shrink to 8M, then -- -4M
	qcowsetup open small2.qcow2 rz-small2
	qcowsetup resize --shrink rz-small2 8M
	[ "$(size_of rz-small2)" = $((8 * M)) ] || { echo "device shows $(size_of rz-small2)"; return 1; }
	qcowsetup resize --shrink rz-small2 -- -4M
	[ "$(size_of rz-small2)" = $((4 * M)) ] || { echo "device shows $(size_of rz-small2)"; return 1; }
	dd if=/dev/urandom of=/dev/mapper/rz-small2 bs=64k seek=60 count=4 oflag=direct 2>/dev/null
	md5=$(md5sum </dev/mapper/rz-small2 | cut -d' ' -f1)
	qcowsetup close rz-small2
	closed_checks small2.qcow2 $((4 * M)) "$md5"
}

read_only_refused() {
	qcowsetup open --readonly small2.qcow2 rz-ro
	rc=0
	qcowsetup resize rz-ro 32M 2>/tmp/err || rc=$?
	qcowsetup close rz-ro
	[ $rc = 1 ] && grep -q 'read-only' /tmp/err || { echo "exit $rc:"; cat /tmp/err; return 1; }
	cat /tmp/err
}

# a failure at each step of the daemon's resize: the mapping keeps its
# size and works; the image stays clean
fault_injection() {
	qcowsetup open plain.qcow2 rz-fault
	size=$(size_of rz-fault)
	k=1
	while :; do
		rc=0
		qcowsetup resize --debug-fail-step $k rz-fault +8M 2>/tmp/err || rc=$?
		[ $rc = 0 ] && break
		[ "$(size_of rz-fault)" = "$size" ] || { echo "step $k: the device changed size"; return 1; }
		dd if=/dev/urandom of=/tmp/blk bs=64k count=1 2>/dev/null
		dd if=/tmp/blk of=/dev/mapper/rz-fault bs=64k seek=$((size / 65536 - 1)) oflag=direct 2>/dev/null
		dd if=/dev/mapper/rz-fault bs=64k skip=$((size / 65536 - 1)) count=1 iflag=direct 2>/dev/null |
			cmp -s - /tmp/blk || { echo "step $k: the mapping does not work"; return 1; }
		k=$((k + 1))
		[ $k -le 8 ] || { echo "no success after 8 failure points"; return 1; }
	done
	[ "$(size_of rz-fault)" = $((size + 8 * M)) ] || { echo "not grown after the failures"; return 1; }
	md5=$(md5sum </dev/mapper/rz-fault | cut -d' ' -f1)
	qcowsetup close rz-fault
	vm_assert_clean
	closed_checks plain.qcow2 $((size + 8 * M)) "$md5"
	echo "$((k - 1)) failure points, then grown"
}

vm_test "unencrypted: grown to 40M while mounted, resize2fs" grow_mounted plain 40M $((40 * M)) 24
vm_test "LUKS: grown by +24M while mounted, resize2fs" grow_mounted luks +24M $((40 * M)) 6
vm_test "overlay over a larger backing file: grown to 32M, the new area reads zeros" grow_mounted over 32M $((32 * M)) 16
vm_test "shrink past allocated clusters refused (exit 1, one line)" shrink_refused
vm_test "shrink past unallocated space" shrink_allowed
vm_test "a read-only mapping is refused" read_only_refused
vm_test "a failure at each step leaves the mapping working and the image clean" fault_injection
vm_test "nothing left" vm_assert_clean
vm_summary
