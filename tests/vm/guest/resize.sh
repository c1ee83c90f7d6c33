#!/bin/sh
# Runs in the VM (see test-resize.sh): /dev/vda is an ext4 disk with the
# images; `qcowsetup resize` on live mappings.
. /host/lib.sh
export PATH=/usr/local/bin:$PATH
vm_require qemu-img qemu-io mkfs.ext4 resize2fs e2fsck blockdev
mkdir -p /mnt/fs
vm_images_disk
sec="--object secret,id=s0,file=/mnt/m/pass"
printf 'not the passphrase' >/mnt/m/wrong
M=1048576
full=${QS_LIVE_FULL:-0}

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
qcheck_size() {	# image size: qemu-img check clean, qemu-img info the size
	# shellcheck disable=SC2046
	qemu-img check $(img_opts "$1") >/tmp/check.out 2>&1 || { cat /tmp/check.out; return 1; }
	[ "$(vsize "$1")" = "$2" ] || { echo "qemu-img info: $(vsize "$1"), not $2"; return 1; }
}
closed_checks() {	# image size md5: after close, QEMU sees size, content and a clean image
	qcheck_size "$1" "$2"
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
	case $n in luks*)
		# past the room the crypt device covers: the passphrase, a wrong one refused
		crypt0=$(dmsetup table "${name}_crypt" | cut -d' ' -f2)
		rc=0
		qcowsetup resize --key-file /mnt/m/wrong "$name" "$2" 2>/tmp/err || rc=$?
		[ $rc = 2 ] || { cat /tmp/err; echo "wrong passphrase: exit $rc, not 2"; return 1; }
		[ "$(size_of "$name")" = "$old" ] || { echo "the device changed size after a wrong passphrase"; return 1; }
		[ "$(dmsetup table "${name}_crypt" | cut -d' ' -f2)" = "$crypt0" ] || { echo "the crypt device changed"; return 1; }
		! grep -q qcowsetup /proc/keys 2>/dev/null || { echo "a key left in /proc/keys"; return 1; }
		# a failure at the crypt table's reload (step 2) is undone
		rc=0
		qcowsetup resize --debug-fail-step 2 --key-file /mnt/m/pass "$name" "$2" 2>/tmp/err || rc=$?
		[ $rc != 0 ] && grep -q 'Injected failure at step 2' /tmp/err || { cat /tmp/err; echo "step 2: exit $rc"; return 1; }
		[ "$(size_of "$name")" = "$old" ] || { echo "the device changed size after a failed step 2"; return 1; }
		[ "$(dmsetup table "${name}_crypt" | cut -d' ' -f2)" = "$crypt0" ] || { echo "the crypt device changed"; return 1; }
		! grep -q qcowsetup /proc/keys 2>/dev/null || { echo "a key left in /proc/keys"; return 1; }
	esac
	# shellcheck disable=SC2046
	qcowsetup resize $(key_opts "$n") "$name" "$2"
	case $n in luks*)
		crypt1=$(dmsetup table "${name}_crypt" | cut -d' ' -f2)
		[ "$crypt1" -gt "$crypt0" ] || { echo "the crypt device did not grow ($crypt0 sectors)"; return 1; }
		dmsetup table --showkeys "${name}_crypt" | grep -q ' :[0-9]*:logon:' || { echo "no keyring key in the crypt table"; return 1; }
		! grep -q qcowsetup /proc/keys 2>/dev/null || { echo "a key left in /proc/keys"; return 1; }
		echo "crypt device: $((crypt0 * 512)) -> $((crypt1 * 512)) bytes"
	esac
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
	case $n in luks*)
		# what the image holds now lies past what the crypt device covered at open
		[ "$(stat -c %s "$n.qcow2")" -gt $((crypt0 * 512)) ] || { echo "not filled past the room at open"; return 1; }
	esac
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
works_at() {	# name offset: a block written there reads back
	dd if=/dev/urandom of=/tmp/blk bs=64k count=1 2>/dev/null
	dd if=/tmp/blk of="/dev/mapper/$1" bs=64k seek=$(($2 / 65536)) oflag=direct 2>/dev/null
	dd if="/dev/mapper/$1" bs=64k skip=$(($2 / 65536)) count=1 iflag=direct 2>/dev/null | cmp -s - /tmp/blk
}
# fail each step of `resize ARGS` in turn until it succeeds: after each
# failure the device keeps its size, works at offset at, holds no key in
# the keyring and has no device more than before
fail_each_step() {	# name at resize-args...
	name=$1 k=1 at=$2
	shift 2
	size=$(size_of "$name")
	ndev=$(vm_dm_devices | wc -l)
	while :; do
		rc=0
		qcowsetup resize --debug-fail-step $k "$@" 2>/tmp/err || rc=$?
		[ $rc = 0 ] && break
		[ "$(size_of "$name")" = "$size" ] || { echo "step $k: the device changed size"; return 1; }
		works_at "$name" "$at" || { echo "step $k: the mapping does not work"; return 1; }
		! grep -q qcowsetup /proc/keys 2>/dev/null || { echo "step $k: a key left in /proc/keys"; return 1; }
		[ "$(vm_dm_devices | wc -l)" = "$ndev" ] || { echo "step $k: devices left"; dmsetup ls; return 1; }
			k=$((k + 1))
		[ $k -le 12 ] || { echo "no success after 12 failure points"; return 1; }
	done
	echo "$name: $((k - 1)) failure points, then resized to $(size_of "$name") bytes"
}
fault_injection() {	# image resize-arg [shrink]
	n=$1 name=rz-fault
	# shellcheck disable=SC2046
	qcowsetup open $(key_opts "$n") "$n.qcow2" "$name"
	size=$(size_of "$name")
	shrink='' at=$((size - 65536))
	[ "${3:-}" = shrink ] && shrink=--shrink at=0
	# shellcheck disable=SC2046,SC2086
	fail_each_step "$name" "$at" $shrink $(key_opts "$n") "$name" -- "$2"
	new=$(size_of "$name")
	[ "$new" != "$size" ] || { echo "not resized after the failures"; return 1; }
	works_at "$name" $((new - 65536))
	md5=$(md5sum </dev/mapper/$name | cut -d' ' -f1)
	qcowsetup close "$name"
	vm_assert_clean
	closed_checks "$n.qcow2" "$new" "$md5"
}

# a mapping split into segment devices: grown and shrunk live
segmented() {
	qcowsetup open --max-targets 16 seg.qcow2 rz-seg
	nseg=$(vm_dm_devices | grep -c '^rz-seg_s')
	[ "$nseg" -gt 1 ] || { echo "no segment devices"; dmsetup ls; return 1; }
	md5a=$(dd if=/dev/mapper/rz-seg bs=1M count=16 2>/dev/null | md5sum)
	qcowsetup resize rz-seg 24M
	[ "$(size_of rz-seg)" = $((24 * M)) ] || { echo "device shows $(size_of rz-seg)"; return 1; }
	[ "$(dd if=/dev/mapper/rz-seg bs=1M count=16 2>/dev/null | md5sum)" = "$md5a" ] || { echo "the old area changed"; return 1; }
	dd if=/dev/mapper/rz-seg bs=1M skip=16 2>/dev/null | cmp -s - /dev/zero -n $((8 * M)) || { echo "the new area does not read zeros"; return 1; }
	works_at rz-seg $((64 * 1024))
	works_at rz-seg $((18 * M))
	echo "$nseg segments, then $(vm_dm_devices | grep -c '^rz-seg_s') at 24M"
	qcowsetup resize --shrink rz-seg 20M
	[ "$(size_of rz-seg)" = $((20 * M)) ] || { echo "device shows $(size_of rz-seg)"; return 1; }
	works_at rz-seg $((20 * M - 65536))
	md5=$(md5sum </dev/mapper/rz-seg | cut -d' ' -f1)
	qcowsetup close rz-seg
	vm_assert_clean
	closed_checks seg.qcow2 $((20 * M)) "$md5"
}

# the overlay's daemon killed while suspended: the loop devices (the
# backing file's too) and the image locks stay; resume starts a new daemon,
# and after another death reattach does
base_locked() {	# a writer of base.raw is refused
	! qemu-io -f raw -c 'write -P 0x41 0 512' base.raw >/tmp/qio.out 2>&1 || { echo "base.raw is not locked"; return 1; }
	grep -q 'lock' /tmp/qio.out || { cat /tmp/qio.out; return 1; }
}
daemon_pid() { qcowsetup status "$1" | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p'; }
chain_daemon_dies() {
	qcowsetup open over.qcow2 rz-chain
	nloop=$(vm_loop_devices | wc -l)
	[ "$nloop" = 2 ] || { echo "$nloop loop devices, not 2"; losetup -a; return 1; }
	base_locked
	dd if=/dev/urandom of=/tmp/ref bs=64k count=16 2>/dev/null
	dd if=/tmp/ref of=/dev/mapper/rz-chain bs=64k seek=16 oflag=direct 2>/dev/null
	pid=$(daemon_pid rz-chain)
	qcowsetup suspend rz-chain
	rm -f /tmp/held.rc
	(dd if=/tmp/ref of=/dev/mapper/rz-chain bs=64k seek=64 oflag=direct 2>/dev/null; echo $? >/tmp/held.rc) &
	sleep 1
	kill -9 "$pid"
	sleep 2
	[ ! -e /tmp/held.rc ] || { echo "held I/O ended: rc $(cat /tmp/held.rc)"; return 1; }
	[ "$(vm_loop_devices | wc -l)" = 2 ] || { echo "loop devices went with the daemon"; losetup -a; return 1; }
	base_locked
	qcowsetup resume rz-chain
	wait
	[ "$(cat /tmp/held.rc)" = 0 ] || { echo "held I/O failed"; return 1; }
	pid2=$(daemon_pid rz-chain)
	[ -n "$pid2" ] && [ "$pid2" != "$pid" ] || { echo "no new daemon after resume"; qcowsetup status rz-chain; return 1; }
	for off in 16 64; do
		dd if=/dev/mapper/rz-chain bs=64k skip=$off count=16 iflag=direct 2>/dev/null | cmp -s - /tmp/ref ||
			{ echo "data at $((off * 64))k differs"; return 1; }
	done
	# another death, not suspended: reattach
	kill -9 "$pid2"
	sleep 2
	[ "$(vm_loop_devices | wc -l)" = 2 ] || { echo "loop devices went with the second daemon"; losetup -a; return 1; }
	base_locked
	qcowsetup reattach rz-chain
	works_at rz-chain $((12 * M))
	size=$(size_of rz-chain)
	md5=$(md5sum </dev/mapper/rz-chain | cut -d' ' -f1)
	qcowsetup close rz-chain
	vm_assert_clean
	qemu-io -f raw -c 'write -P 0x41 0 512' base.raw >/dev/null || { echo "base.raw still locked after close"; return 1; }
	closed_checks over.qcow2 "$size" "$md5"
}

# fio --verify on a LUKS mapping while suspend/resume, refresh
# --allow-discards, resize, a live snapshot and its commit back (a LUKS
# overlay into the LUKS image) run under it; then fio verifies again, and
# the image after close (qemu-img convert) is what fio wrote
fio_job() {	# file offset size [more fio args]: sequential 64k writes with crc32c headers
	f=$1 o=$2 z=$3
	shift 3
	fio --name=v --filename="$f" --offset="$o" --size="$z" --rw=write --bs=64k --ioengine=psync --direct=1 \
		--verify=crc32c --verify_fatal=1 --do_verify=1 --eta=never --output=/tmp/fio.out "$@" ||
		{ cat /tmp/fio.out; return 1; }
}
# fio writes and verifies the first 8M again and again (seed 1, 2, ...)
# until /tmp/fio.stop exists; the last seed in /tmp/fio.last
fio_loop() {	# device
	i=0
	while [ ! -e /tmp/fio.stop ]; do
		i=$((i + 1))
		fio_job "$1" 0 8M --randseed=$i || { echo "$i" >/tmp/fio.fail; return 1; }
		echo "$i" >/tmp/fio.last
	done
}
fio_verbs() {
	rounds=1
	[ "$full" = 0 ] || rounds=4
	name=rz-fio img=luks-fio.qcow2 key="--key-file /mnt/m/pass"
	# shellcheck disable=SC2086
	qcowsetup open $key $img $name
	size=$(size_of $name)
	rm -f /tmp/fio.stop /tmp/fio.fail /tmp/fio.last
	fio_loop /dev/mapper/$name &
	sleep 2
	t0=$(vm_uptime)
	i=0 on=--allow-discards
	while [ $i -lt $rounds ]; do
		# shellcheck disable=SC2086
		{
			qcowsetup suspend $name
			sleep 1
			qcowsetup resume $key $name
			qcowsetup refresh $on $key $name
			qcowsetup resize $key $name +4M
		}
		[ $on = --allow-discards ] && on=--no-allow-discards || on=--allow-discards
		i=$((i + 1))
	done
	rm -f fio-snap.qcow2
	# shellcheck disable=SC2086
	qcowsetup snapshot --iter-time 10 $key $name fio-snap.qcow2
	sleep 1
	# shellcheck disable=SC2086
	qcowsetup commit $key $name
	t1=$(vm_uptime)
	touch /tmp/fio.stop
	wait
	[ ! -e /tmp/fio.fail ] || { echo "fio run $(cat /tmp/fio.fail) failed across the verbs"; return 1; }
	last=$(cat /tmp/fio.last)
	new=$(size_of $name)
	[ "$new" = $((size + rounds * 4 * M)) ] || { echo "device shows $new bytes"; return 1; }
	# the new area too, then the last run verified again
	fio_job /dev/mapper/$name "$size" $((rounds * 4))M
	fio_job /dev/mapper/$name 0 8M --randseed="$last" --verify_only
	md5=$(md5sum </dev/mapper/$name | cut -d' ' -f1)
	qcowsetup close $name
	vm_assert_clean
	# the image: clean, the new size, the device's content, what fio wrote
	qcheck_size "$img" "$new"
	# shellcheck disable=SC2046
	qemu-img convert $(img_opts $img) -O raw /mnt/m/conv.raw
	[ "$(md5sum </mnt/m/conv.raw | cut -d' ' -f1)" = "$md5" ] || { echo "qemu-img convert differs from the device"; return 1; }
	fio_job /mnt/m/conv.raw 0 8M --randseed="$last" --verify_only
	fio_job /mnt/m/conv.raw "$size" $((rounds * 4))M --verify_only
	rm -f /mnt/m/conv.raw
	qemu-img info fio-snap.qcow2 | grep -q '^encrypted: yes' || { echo "the snapshot's overlay is not encrypted"; return 1; }
	rm -f fio-snap.qcow2
	echo "$rounds round(s) of suspend/resume, refresh, resize, then snapshot and commit in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s under $last fio runs; $size -> $new bytes"
}

vm_test "unencrypted: grown to 40M while mounted, resize2fs" grow_mounted plain 40M $((40 * M)) 24
vm_test "LUKS: grown by +32M while mounted (the passphrase; a wrong one refused, a failed reload undone), resize2fs, filled past the room at open" grow_mounted luks +32M $((48 * M)) 20
vm_test "overlay over a larger backing file: grown to 32M, the new area reads zeros" grow_mounted over 32M $((32 * M)) 16
vm_test "shrink past allocated clusters refused (exit 1, one line)" shrink_refused
vm_test "shrink past unallocated space" shrink_allowed
vm_test "a read-only mapping is refused" read_only_refused
vm_test "a failure at each step of a grow leaves the mapping working and the image clean" fault_injection plain +8M
if [ "$full" != 0 ]; then
	vm_test "LUKS grown past its room: a failure at each step (the crypt table's reload too) is undone" fault_injection luks-fault +32M
	vm_test "shrink: a failure at each step is undone" fault_injection small3 8M shrink
	vm_test "segment devices (--max-targets 16): grown and shrunk live" segmented
fi
vm_test "the overlay's daemon killed while suspended: loop devices and locks stay, resume and reattach bring daemons back" chain_daemon_dies
if command -v fio >/dev/null 2>&1; then
	vm_test "fio --verify across suspend/resume, refresh, resize, snapshot and commit (LUKS over LUKS); the image is what fio wrote" fio_verbs
fi
vm_test "nothing left" vm_assert_clean
vm_summary
