#!/bin/sh
# Runs inside the test VM (started by tests/vm/test-smoke.sh): proves the bed
# works, and maps qcow2 images by hand the way the design does (loop with direct
# I/O, one crypt target over the whole host device keyed by a logon key, a top
# linear/zero table), comparing every byte with qemu-img convert's output.
#
# Expects beside itself (written on the host by test-smoke.sh): lib.sh,
# plain.qcow2 plain.table plain.md5, luks.qcow2 luks.table luks.md5 luks.env
# luks.pass and luks.key (the volume key, when cryptsetup worked on the host);
# a scratch virtio disk as /dev/vda.
set -u
dir=$(cd "$(dirname "$0")" && pwd)
. "$dir/lib.sh"
echo "smoke: kernel $(uname -r), guest uptime $(vm_uptime)s"

dm_is_crypt_key_ref() {   # the crypt table carries a key reference, not a hex key
	dmsetup table "$1" | awk '$3 == "crypt" && $5 ~ /^:[0-9]+:logon:/ { ok = 1 } END { exit !ok }'
}

check_md5() {   # DEVICE EXPECTED_MD5_FILE
	got=$(md5sum < "$1" | cut -d' ' -f1)
	want=$(cat "$2")
	echo "$1: md5 $got, expected $want"
	[ "$got" = "$want" ]
}

loop_attach_ro() {   # FILE -> prints the loop device (read-only, direct I/O asked)
	lo=$(losetup -f --show -r --direct-io=on "$1")
	echo "$lo"
	echo "$lo: direct I/O $(cat "/sys/block/${lo#/dev/}/loop/dio")" >&2
}

t_dm_present() {
	dmsetup version
	dmsetup targets
	dmsetup targets | grep -q '^crypt'
	dmsetup targets | grep -q '^zero'
	[ -c /dev/mapper/control ]
}

t_tools_run() {
	for t in qemu-img qemu-io qemu-nbd fio keyctl cryptsetup losetup blkid; do
		command -v "$t" >/dev/null || { echo "$t missing"; exit 1; }
		"$t" --version 2>&1 | head -n 1
	done
	mkfs.ext4 -V 2>&1 | head -n 1
	qemu-img info "$dir/plain.qcow2" | head -n 3
}

# Test functions run in a subshell with set -e: their EXIT traps must not fail
# (a failing command would stop the trap and become the exit status).
t_dm_zero() {
	trap 'dmsetup remove qs_zero 2>/dev/null || :' EXIT
	dmsetup create qs_zero --table "0 2048 zero"
	[ "$(blockdev --getsz /dev/mapper/qs_zero)" = 2048 ]
	got=$(md5sum < /dev/mapper/qs_zero | cut -d' ' -f1)
	want=$(head -c 1048576 /dev/zero | md5sum | cut -d' ' -f1)
	[ "$got" = "$want" ]
	dmsetup remove qs_zero
}

t_plain_qcow2() {
	lo=''
	trap 'dmsetup remove qs_plain 2>/dev/null || :; [ -z "$lo" ] || losetup -d "$lo" || :' EXIT
	lo=$(loop_attach_ro "$dir/plain.qcow2")
	sed "s|@DATA@|$lo|" "$dir/plain.table" | dmsetup create qs_plain --readonly
	dmsetup table qs_plain
	check_md5 /dev/mapper/qs_plain "$dir/plain.md5"
}

luks_header() {   # the LUKS header region of luks.qcow2, to /tmp/luks.hdr
	luks_offset='' luks_length=''
	# shellcheck source=/dev/null # luks_offset= luks_length=, from test-smoke.sh
	. "$dir/luks.env"
	[ -s /tmp/luks.hdr ] ||
		dd if="$dir/luks.qcow2" of=/tmp/luks.hdr bs=512 skip=$((luks_offset / 512)) \
			count=$((luks_length / 512)) 2>/dev/null
}

# The volume key of luks.qcow2 with the guest's own libcryptsetup, from the
# header region that the header extension 0x0537be77 points at; compared with
# the host's when there is one.
t_luks_key_in_guest() {
	luks_header
	cryptsetup luksDump /tmp/luks.hdr | grep -E '^(Version|Cipher name|Cipher mode|MK bits)'
	rm -f /tmp/luks.key
	cryptsetup luksDump --dump-volume-key --volume-key-file /tmp/luks.key --batch-mode \
		--key-file "$dir/luks.pass" /tmp/luks.hdr > /dev/null
	if [ -f "$dir/luks.key" ]; then
		cmp "$dir/luks.key" /tmp/luks.key
		echo "same volume key as on the host"
	fi
}

t_luks_qcow2() {
	key=$dir/luks.key
	[ -f "$key" ] || key=/tmp/luks.key
	[ -f "$key" ] || { echo "no volume key (neither host nor guest cryptsetup could read it)"; exit 1; }
	luks_header
	cryptsetup luksDump /tmp/luks.hdr > /tmp/luks.dump 2>/dev/null || true
	cipher=$(awk -F': *' '/^Cipher name/ { n = $2 } /^Cipher mode/ { m = $2 } END { if (n != "") print n "-" m }' /tmp/luks.dump | tr -d '\t ')
	[ -n "$cipher" ] || cipher=aes-xts-plain64     # what qemu-img creates by default
	key_bytes=$(wc -c < "$key" | tr -d ' ')
	lo='' kid=''
	trap 'dmsetup remove qs_luks 2>/dev/null || :; dmsetup remove qs_luks_crypt 2>/dev/null || :
		[ -z "$lo" ] || losetup -d "$lo" || :; [ -z "$kid" ] || keyctl unlink "$kid" @s >/dev/null || :' EXIT
	lo=$(loop_attach_ro "$dir/luks.qcow2")
	kid=$(keyctl padd logon qs:test @s < "$key")
	sectors=$(blockdev --getsz "$lo")
	echo "crypt: $sectors sectors, $cipher, $key_bytes-byte key as logon key qs:test ($kid)"
	dmsetup create qs_luks_crypt --readonly \
		--table "0 $sectors crypt $cipher :$key_bytes:logon:qs:test 0 $lo 0"
	dm_is_crypt_key_ref qs_luks_crypt
	dmsetup table qs_luks_crypt
	sed "s|@DATA@|/dev/mapper/qs_luks_crypt|" "$dir/luks.table" | dmsetup create qs_luks --readonly
	check_md5 /dev/mapper/qs_luks "$dir/luks.md5"
}

t_nbd() {
	[ -b /dev/nbd0 ] || { echo "no /dev/nbd0"; exit 1; }
	trap 'qemu-nbd -d /dev/nbd0 >/dev/null 2>&1 || :' EXIT
	qemu-nbd -r -f qcow2 -c /dev/nbd0 "$dir/plain.qcow2"
	n=0
	while [ "$(blockdev --getsz /dev/nbd0)" = 0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
	check_md5 /dev/nbd0 "$dir/plain.md5"
}

# ext4 on the scratch virtio disk test-smoke.sh attaches (/dev/vda), else on a
# loop device over a tmpfs file (the kernel then logs harmless WRITE_ZEROES
# "operation not supported" errors: loop offers it, tmpfs cannot zero ranges).
t_ext4() {
	dev=/dev/vda lo=''
	trap 'umount /mnt 2>/dev/null || :; [ -z "$lo" ] || losetup -d "$lo" || :; rm -f /tmp/fs.img' EXIT
	if [ ! -b "$dev" ]; then
		dd if=/dev/zero of=/tmp/fs.img bs=1M count=0 seek=32 2>/dev/null
		lo=$(losetup -f --show /tmp/fs.img)
		dev=$lo
	fi
	echo "ext4 on $dev ($(blockdev --getsz "$dev") sectors)"
	mkfs.ext4 -q -F "$dev"
	blkid "$dev"
	mount -t ext4 "$dev" /mnt
	echo hello > /mnt/hello
	umount /mnt
	mount -r -t ext4 "$dev" /mnt
	[ "$(cat /mnt/hello)" = hello ]
}

vm_test "device-mapper present (dmsetup version, targets)" t_dm_present
vm_test "tools and their libraries run in the guest" t_tools_run
vm_test "dm-zero device created and read" t_dm_zero
vm_test "plain qcow2: loop + linear/zero table == qemu-img convert" t_plain_qcow2
vm_test "LUKS qcow2: guest libcryptsetup reads the volume key" t_luks_key_in_guest
vm_test "LUKS qcow2: loop + crypt (logon key) + linear/zero == qemu-img convert" t_luks_qcow2
vm_test "nbd: qemu-nbd -c serves the plain qcow2" t_nbd
vm_test "ext4 on the scratch virtio disk" t_ext4
vm_test "no dm or loop device left" vm_assert_clean
vm_cleanup
vm_summary
