#!/bin/sh
# Runs in the VM (see test-rw.sh): /dev/vda is an ext4 disk with the images.
#   rw.sh matrix              (QS_RW_FULL=1: the second seeds, 3 daemon kills)
#   rw.sh crash RUN DELAY     verify the previous crash run (if any),
#                             then write and die after DELAY/10 s
#   rw.sh crash-verify        verify the last crash run
#   rw.sh connections         the case of several NBD connections alone
. /host/lib.sh
export PATH=/usr/local/bin:$PATH
vm_images_disk
sec="--object secret,id=s0,file=/mnt/m/pass"

# qemu-img arguments naming image $1 (LUKS images need the secret)
img_opts() {
	case $1 in
	*luks*) echo "$sec --image-opts driver=qcow2,file.filename=$1,encrypt.key-secret=s0" ;;
	*) echo "-f qcow2 $1" ;;
	esac
}
key_opts() { case $1 in *luks*) echo "--key-file /mnt/m/pass" ;; esac; }

qcheck() {	# image: qemu-img check must find neither errors nor leaks
	# shellcheck disable=SC2046
	qemu-img check $(img_opts "$1") >/tmp/check.out 2>&1 || { cat /tmp/check.out; return 1; }
}

to_raw() {	# image raw
	# shellcheck disable=SC2046
	qemu-img convert $(img_opts "$1") -O raw "$2"
}

# ---- the random workload matrix
workload() {	# name seed
	n=$1 seed=$2
	if [ "$n" = datafile ]; then
		qemu-img create -q -f qcow2 -o data_file=w-datafile.data w-datafile.qcow2 64M
		qemu-io -f qcow2 -c 'write -P 0x61 0 2M' -c 'write -z 8M 1M' w-datafile.qcow2 >/dev/null
	else
		cp "$n.qcow2" "w-$n.qcow2"
	fi
	to_raw "w-$n.qcow2" "/mnt/m/w-$n.raw"
	# shellcheck disable=SC2046
	qcowsetup open $(key_opts "$n") "w-$n.qcow2" "rw-$n"
	cmp "/dev/mapper/rw-$n" "w-$n.raw" || { echo "mapped content differs from qemu-img convert before writing"; return 1; }
	rw-workload write --seed "$seed" --ops 60 --flush-every 7 "/dev/mapper/rw-$n" "w-$n.raw"
	cmp "/dev/mapper/rw-$n" "w-$n.raw" || { echo "content differs while mapped"; return 1; }
	qcowsetup status "rw-$n" | grep -q 'daemon pid' || { echo "status shows no daemon"; return 1; }
	qcowsetup close "rw-$n"
	vm_assert_clean
	qcheck "w-$n.qcow2"
	case $n in *luks*) set -- --object secret,id=s0,file=/mnt/m/pass --image-opts \
			"driver=qcow2,file.filename=w-$n.qcow2,encrypt.key-secret=s0" \
			"driver=raw,file.filename=w-$n.raw" ;;
		*) set -- -f qcow2 -F raw "w-$n.qcow2" "w-$n.raw" ;;
	esac
	qemu-img compare "$@" || return 1
	# the dirty bit (lazy refcounts) is cleared on close
	dirty=$(od -An -tu1 -j 79 -N 1 "w-$n.qcow2" | tr -d ' ')
	[ $((dirty % 2)) = 0 ] || { echo "dirty bit left set"; return 1; }
	if qemu-img snapshot -l "w-$n.qcow2" 2>/dev/null | grep -q s1; then
		qemu-img convert -l snapshot.name=s1 -O raw "$n.qcow2" /mnt/m/s1-before.raw
		qemu-img convert -l snapshot.name=s1 -O raw "w-$n.qcow2" /mnt/m/s1-after.raw
		cmp /mnt/m/s1-before.raw /mnt/m/s1-after.raw || { echo "snapshot s1 changed"; return 1; }
		rm -f /mnt/m/s1-before.raw /mnt/m/s1-after.raw
	fi
	rm -f "w-$n.qcow2" "w-$n.raw" w-datafile.data
}

connections() {	# 3 NBD connections; fio from 2 jobs at QD16, verified: copy-on-write
	# from a backing chain, in-place writes and reads in parallel
	cp chain.qcow2 mc.qcow2
	to_raw mc.qcow2 /tmp/mc.raw
	qcowsetup open --nbd-connections 3 mc.qcow2 mc
	nbd=$(qcowsetup status mc | sed -n 's|.*slow path: /dev/\(nbd[0-9]*\).*|\1|p')
	# (blk-mq gives it a hardware queue per connection, at most one per CPU)
	want=$(nproc) && [ "$want" -le 3 ] || want=3
	q=$(find "/sys/block/$nbd/mq/" -mindepth 1 -maxdepth 1 | wc -l)
	[ "$q" = "$want" ] || { echo "${nbd:-no NBD device} has $q hardware queues, not $want"; qcowsetup close mc; return 1; }
	fio --name=mc --filename=/dev/mapper/mc --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
		--size=2M --numjobs=2 --offset_increment=24M --verify=crc32c --verify_fatal=1 >/tmp/fio.out 2>&1 ||
		{ cat /tmp/fio.out; qcowsetup close mc; return 1; }
	part() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum; }
	[ "$(part /dev/mapper/mc 2 22)" = "$(part /tmp/mc.raw 2 22)" ] &&
		[ "$(part /dev/mapper/mc 26 38)" = "$(part /tmp/mc.raw 26 38)" ] ||
		{ echo "data outside fio's ranges changed"; return 1; }
	qcowsetup close mc
	qcheck mc.qcow2
	rm -f mc.qcow2 /tmp/mc.raw
	vm_assert_clean
}

# sectors of mapping $1 on the slow path (NBD, major 43): its fast device's
# (the table under the top's switch) and its segments' targets (one dmsetup
# call: there may be a hundred)
slow_sectors() {
	dmsetup table 2>/dev/null | awk -v n="$1" '(index($1, n "_fast:") == 1 || index($1, n "_s") == 1) &&
		$4 == "linear" && $5 ~ /^43:/ {s += $3} END {print s + 0}'
}
reloads() { sed -n 's/^reloads=//p' "/run/qcowsetup/$1.stats" 2>/dev/null | grep . || echo 0; }

# remapping goes on: within 30 s, fewer sectors of mapping $1 on the slow
# path than $2 and more reloads than $3
remapped_since() {
	t=0
	while [ $t -lt 60 ]; do
		[ "$(slow_sectors "$1")" -lt "$2" ] && [ "$(reloads "$1")" -gt "$3" ] && return 0
		sleep 0.5
		t=$((t + 1))
	done
	echo "no remapping: $(slow_sectors "$1") sectors on the slow path (were $2), $(reloads "$1") reloads (were $3)"
	cat "/run/qcowsetup/$1.stats"
	return 1
}

segments() {	# a table split into segment devices at open, then written to
	# every other 64 KiB cluster of the first 4 MiB allocated: the fast path
	# alternates with the slow path, 128 targets. 256 MiB: random writes
	# get the 2 MiB around them mapped (holes), so each batch still finds
	# windows of the slow path to move
	qemu-img create -q -f qcow2 seg.qcow2 256M
	i=0 cmds=''
	while [ $i -lt 64 ]; do cmds="$cmds -c 'write -P 0x5$((i % 10)) $((i * 131072)) 64k'"; i=$((i + 1)); done
	eval "qemu-io -f qcow2 $cmds seg.qcow2" >/dev/null
	to_raw seg.qcow2 /mnt/m/seg.raw
	qcowsetup open --max-targets 4 seg.qcow2 seg
	n0=$(dmsetup ls | grep -c '^seg_s' || true)
	slow0=$(slow_sectors seg) reloads0=$(reloads seg)
	rw-workload write --seed 31 --ops 80 --max 65536 --flush-every 5 /dev/mapper/seg /mnt/m/seg.raw >/dev/null
	# the new clusters reach the fast path: segments change, and go on changing
	remapped_since seg "$slow0" "$reloads0" || { qcowsetup close seg; return 1; }
	sleep 1
	slow1=$(slow_sectors seg) reloads1=$(reloads seg)
	# rounds load no kernel module: a load runs modprobe, which reads the
	# root filesystem, maybe through the device a round has suspended
	# (unix_diag: the kernel loads it on the first socket diagnostics
	# request, which the check for a listening udevd may make)
	rmmod unix_diag 2>/dev/null || true
	cut -d' ' -f1 /proc/modules >/tmp/seg.mods
	rw-workload write --seed 32 --ops 40 --max 65536 --flush-every 5 /dev/mapper/seg /mnt/m/seg.raw >/dev/null
	remapped_since seg "$slow1" "$reloads1" || { qcowsetup close seg; return 1; }
	loaded=$(cut -d' ' -f1 /proc/modules | grep -vxFf /tmp/seg.mods || true)
	[ -z "$loaded" ] || { echo "modules loaded while remapping: $loaded"; qcowsetup close seg; return 1; }
	sleep 1
	# a new daemon takes the live mapping over (reattach): every segment
	# made anew beside the old ones, which go; then remapping goes on
	dmsetup ls | awk '/^seg_s/ {print $1}' | sort >/tmp/seg.before
	pid=$(qcowsetup status seg | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p')
	kill -9 "$pid"
	sleep 1
	qcowsetup reattach seg
	dmsetup ls | awk '/^seg_s/ {print $1}' | sort >/tmp/seg.after
	kept=$(grep -Fxf /tmp/seg.before /tmp/seg.after || true)
	[ -s /tmp/seg.after ] && [ -z "$kept" ] ||
		{ echo "segments after reattach: $(cat /tmp/seg.after); kept: $kept"; qcowsetup close seg; return 1; }
	slow2=$(slow_sectors seg)
	rw-workload write --seed 33 --ops 20 --max 65536 --flush-every 5 /dev/mapper/seg /mnt/m/seg.raw >/dev/null
	# (the stats file may still hold the old daemon's count)
	remapped_since seg "$slow2" -1 || { qcowsetup close seg; return 1; }
	sleep 1
	n=$(dmsetup ls | grep -c '^seg_s' || true)
	# the segments replaced are gone: every one left is in use
	unused=$(dmsetup info -c --noheadings -o name,open | awk -F: '$1 ~ /^seg_s/ && $2 == 0 {print $1}')
	cmp /dev/mapper/seg /mnt/m/seg.raw || { echo "content differs while mapped"; return 1; }
	qcowsetup close seg
	[ "$n0" -gt 0 ] && [ "$n" -gt 0 ] || { echo "segment devices: $n0 after open, $n after the writes"; return 1; }
	[ -z "$unused" ] || { echo "segments left unused: $unused"; return 1; }
	qcheck seg.qcow2
	qemu-img compare -f qcow2 -F raw seg.qcow2 /mnt/m/seg.raw
	rm -f seg.qcow2 /mnt/m/seg.raw
	vm_assert_clean
}

compressed_ro() {
	qcowsetup open --readonly compressed.qcow2 ro-c
	dmsetup table ro-c | grep -q ' 43:' || { echo "no slow-path target for the compressed clusters"; return 1; }
	to_raw compressed.qcow2 /mnt/m/c.raw
	cmp /dev/mapper/ro-c /mnt/m/c.raw
	qcowsetup close ro-c
	rm -f /mnt/m/c.raw
	vm_assert_clean
}

interop() {
	cp plain.qcow2 io.qcow2
	# qemu-io writes, qcowsetup reads
	qemu-io -f qcow2 -c 'write -P 0xa1 33M 3M' -c 'write -P 0xa2 100k 7k' io.qcow2 >/dev/null
	to_raw io.qcow2 /mnt/m/io.raw
	qcowsetup open io.qcow2 io
	cmp /dev/mapper/io /mnt/m/io.raw || { echo "qcowsetup does not read what qemu-io wrote"; return 1; }
	# qcowsetup writes, qemu-io reads
	head -c 5000 /dev/zero | tr '\0' 'Z' | dd of=/dev/mapper/io bs=1000 seek=40000 conv=notrunc,fsync 2>/dev/null
	rc=0
	qemu-io -f qcow2 -c 'write 0 512' io.qcow2 >/tmp/out 2>&1 || rc=$?
	grep -q 'Failed to get "write" lock' /tmp/out || { cat /tmp/out; echo "QEMU could write a mapped image"; return 1; }
	qemu-img info -U io.qcow2 >/dev/null
	qcowsetup close io
	qemu-io -f qcow2 -c 'read -P 0x5a 40000000 5000' io.qcow2 >/tmp/out 2>&1
	grep -q 'read 5000/5000' /tmp/out && ! grep -q 'Pattern verification failed' /tmp/out ||
		{ cat /tmp/out; echo "qemu-io does not read what qcowsetup wrote"; return 1; }
	# QEMU holds it for writing: qcowsetup refuses (exit 5)
	qemu-nbd --fork --persistent -k /tmp/nbd.sock -f qcow2 io.qcow2 --pid-file /tmp/nbd.pid
	rc=0
	qcowsetup open io.qcow2 io 2>/tmp/err || rc=$?
	kill "$(cat /tmp/nbd.pid)"
	sleep 1
	[ $rc = 5 ] || { cat /tmp/err; echo "open of an image QEMU writes: exit $rc"; return 1; }
	qcheck io.qcow2
	rm -f io.qcow2 /mnt/m/io.raw
	vm_assert_clean
}

corrupt_bit() {
	cp plain.qcow2 bad.qcow2
	b=$(od -An -tu1 -j 79 -N 1 bad.qcow2 | tr -d ' ')
	printf "\\$(printf %o $((b | 2)))" | dd of=bad.qcow2 bs=1 seek=79 conv=notrunc 2>/dev/null
	rc=0
	qcowsetup open bad.qcow2 bad 2>/tmp/err || rc=$?
	cat /tmp/err
	[ $rc = 4 ] && grep -q 'marked corrupt' /tmp/err || { echo "exit $rc"; return 1; }
	qcowsetup open --readonly bad.qcow2 bad
	qcowsetup close bad
	rm -f bad.qcow2
	vm_assert_clean
}

read_only_file() {
	mkdir -p /mnt/ro
	mount -o bind /mnt/m /mnt/ro
	mount -o remount,ro,bind /mnt/ro
	rc=0
	qcowsetup open /mnt/ro/plain.qcow2 rof 2>/tmp/err || rc=$?
	cat /tmp/err
	qcowsetup open --readonly /mnt/ro/plain.qcow2 rof
	qcowsetup close rof
	umount /mnt/ro
	[ $rc = 2 ] && grep -q 'for writing' /tmp/err || { echo "exit $rc"; return 1; }
	vm_assert_clean
}

enospc() {
	# a 40 MiB filesystem for a 64 MiB image: allocation runs out of room
	dd if=/dev/zero of=/tmp/small.img bs=1M count=40 2>/dev/null
	mkfs.ext4 -q -F /tmp/small.img
	mkdir -p /mnt/small
	mount -o loop /tmp/small.img /mnt/small
	qemu-img create -q -f qcow2 /mnt/small/full.qcow2 64M
	qcowsetup open /mnt/small/full.qcow2 full
	rc=0
	rw-workload write --seed 7 --ops 80 --max 4194304 --flush-every 1 --log /tmp/full.log /dev/mapper/full 2>/tmp/err || rc=$?
	cat /tmp/err
	qcowsetup close full
	[ $rc -ge 1 ] || { echo "the filesystem did not fill up"; return 1; }
	qemu-img check /mnt/small/full.qcow2 >/tmp/check.out 2>&1 || { r=$?; cat /tmp/check.out; [ $r = 3 ] || return 1; }
	qemu-img create -q -f raw /tmp/zero.raw 64M
	qemu-img convert -O raw /mnt/small/full.qcow2 /tmp/full.raw
	rw-workload verify /tmp/full.log /tmp/zero.raw /tmp/full.raw
	umount /mnt/small
	rm -f /tmp/small.img /tmp/zero.raw /tmp/full.raw
	vm_assert_clean
}

daemon_kill() {	# SIGKILL the daemon under load; flushed data survives; reattach
	runs=${1:-3}
	i=0
	while [ $i -lt "$runs" ]; do
		i=$((i + 1))
		cp plain.qcow2 k.qcow2
		to_raw k.qcow2 /tmp/k-orig.raw
		qcowsetup open k.qcow2 kd
		pid=$(qcowsetup status kd | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p')
		rw-workload write --seed $((100 + i)) --ops 400 --flush-every 3 --log /tmp/k.log /dev/mapper/kd >/dev/null 2>&1 &
		wpid=$!
		usleep $(( (i * 7919 % 30) * 100000 + 200000 )) 2>/dev/null || sleep 1
		kill -9 "$pid"
		# slow-path requests in flight fail after the NBD timeout (30 s)
		t=0
		while [ -d /proc/$wpid ] && [ $t -lt 120 ]; do sleep 1; t=$((t + 1)); done
		if [ -d /proc/$wpid ]; then
			echo "the writer still waits ${t}s after the daemon died:"
			dmsetup info -c -o name,attr,open
			cat /proc/$wpid/stack
			for b in /sys/block/nbd*; do [ "$(cat $b/size)" = 0 ] || echo "$b: size $(cat $b/size) inflight $(cat $b/inflight)"; done
			dmesg | tail -20
			return 1
		fi
		wait $wpid || true
		qcowsetup status kd | grep -q 'not running' || { echo "status does not show the dead daemon"; return 1; }
		qcowsetup close kd
		qemu-img check k.qcow2 >/tmp/check.out 2>&1 || { r=$?; cat /tmp/check.out; [ $r = 3 ] || return 1; }
		to_raw k.qcow2 /tmp/k.raw
		rw-workload verify /tmp/k.log /tmp/k-orig.raw /tmp/k.raw >/tmp/k.verify || { cat /tmp/k.verify; return 1; }
		leaks=$(grep -c 'Leaked cluster' /tmp/check.out || true)
		total_leaks=$((${total_leaks:-0} + leaks))
		flushed=$((${flushed:-0} + $(sed -n 's/^verified: \([0-9]*\).*/\1/p' /tmp/k.verify)))
		vm_assert_clean
	done
	echo "daemon killed $runs times: $flushed flushed writes intact, $total_leaks leaked clusters in all, no corruption" >/tmp/kill.summary
	# reattach: a new daemon takes over the NBD device, writes go on (also
	# on a lazy-refcounts image, whose dirty bit the dead daemon left set)
	reattach_one plain && reattach_one lazy
}

reattach_one() {	# image
	cp "$1.qcow2" k.qcow2
	to_raw k.qcow2 /tmp/k.raw
	qcowsetup open k.qcow2 kd
	pid=$(qcowsetup status kd | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p')
	rw-workload write --seed 201 --ops 20 --flush-every 4 /dev/mapper/kd /tmp/k.raw >/dev/null
	kill -9 "$pid"
	sleep 1
	qcowsetup reattach kd
	qcowsetup status kd | grep -q 'daemon pid.*running' || { echo "no daemon after reattach"; return 1; }
	rw-workload write --seed 202 --ops 20 --flush-every 4 /dev/mapper/kd /tmp/k.raw >/dev/null
	cmp /dev/mapper/kd /tmp/k.raw || { echo "content differs after reattach"; return 1; }
	qcowsetup close kd
	dirty=$(od -An -tu1 -j 79 -N 1 k.qcow2 | tr -d ' ')
	[ $((dirty % 2)) = 0 ] || { echo "dirty bit left set"; return 1; }
	[ ! -e /run/qcowsetup/kd.daemon ] || { echo "state file left"; return 1; }
	qemu-img check k.qcow2 >/tmp/check.out 2>&1 || { r=$?; cat /tmp/check.out; [ $r = 3 ] || return 1; }
	qemu-img compare -f qcow2 -F raw k.qcow2 /tmp/k.raw
	rm -f k.qcow2 /tmp/k*.raw /tmp/k.log
	vm_assert_clean
}

discards() {	# only with --allow-discards; the image stays consistent
	cp plain.qcow2 d.qcow2
	to_raw d.qcow2 /tmp/d.raw
	qcowsetup open d.qcow2 dsc
	mx=$(cat "/sys/block/dm-$(dmsetup info -c --noheadings -o minor dsc | tr -d ' ')/queue/discard_max_bytes")
	[ "$mx" = 0 ] || { echo "discards offered without --allow-discards (discard_max_bytes $mx)"; return 1; }
	if blkdiscard -o 0 -l 1048576 /dev/mapper/dsc 2>/dev/null; then echo "blkdiscard worked without --allow-discards"; return 1; fi
	qcowsetup close dsc
	cmp d.qcow2 plain.qcow2 || { echo "the image changed without writes"; return 1; }
	qcowsetup open --allow-discards d.qcow2 dsc
	mx=$(cat "/sys/block/dm-$(dmsetup info -c --noheadings -o minor dsc | tr -d ' ')/queue/discard_max_bytes")
	[ "$mx" != 0 ] || { echo "no discards with --allow-discards"; return 1; }
	blkdiscard -o 0 -l 1048576 /dev/mapper/dsc || { echo "blkdiscard failed with --allow-discards"; return 1; }
	blkdiscard -o 16777216 -l 4194304 /dev/mapper/dsc || { echo "blkdiscard of an unallocated area failed"; return 1; }
	qcowsetup close dsc
	qcheck d.qcow2
	to_raw d.qcow2 /tmp/d2.raw
	# outside the discarded ranges nothing changed
	part() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum; }
	[ "$(part /tmp/d.raw 1 15)" = "$(part /tmp/d2.raw 1 15)" ] && [ "$(part /tmp/d.raw 20 44)" = "$(part /tmp/d2.raw 20 44)" ] ||
		{ echo "data outside the discarded ranges changed"; return 1; }
	rm -f d.qcow2 /tmp/d.raw /tmp/d2.raw
	vm_assert_clean
}

# ---- crash runs across boots
crash_verify() {
	[ -f crash.state ] || return 0
	. ./crash.state
	qemu-img check crash-run.qcow2 >/tmp/check.out 2>&1 || {
		r=$?
		if [ $r != 3 ]; then cat /tmp/check.out; echo "crash run $run: qemu-img check exit $r"; return 1; fi
	}
	qemu-img convert -O raw crash-run.qcow2 /tmp/crash.raw
	rw-workload verify crash.log crash-orig.raw /tmp/crash.raw || { echo "crash run $run: flushed data lost"; return 1; }
	leaks=$(grep -c 'Leaked cluster' /tmp/check.out || true)
	written=$(grep -c '^write' crash.log || true)
	flushed=$(sed -n 's/^flushed //p' crash.log | tail -n 1)
	echo "crash run $run (VM killed $((delay / 10)).$((delay % 10))s into the writes, $written writes issued, ${flushed:-0} acknowledged by a flush): qemu-img check: no corruption, $leaks leaked clusters; flushed writes intact" >/tmp/crash.summary
	rm -f crash.state crash.log crash-orig.raw crash-run.qcow2 /tmp/crash.raw
}

crash_start() {	# run delay
	cp crash.qcow2 crash-run.qcow2
	qemu-img convert -O raw crash-run.qcow2 crash-orig.raw
	printf 'run=%s\ndelay=%s\n' "$1" "$2" >crash.state
	sync
	qcowsetup open crash-run.qcow2 cr
	# even runs: a writer in order (clusters mapped ahead of it)
	seq=
	[ $(($1 % 2)) = 1 ] || seq=--sequential
	rw-workload write --seed "$1" --ops 100000 --max 1048576 --flush-every 5 --log /mnt/m/crash.log $seq \
		/dev/mapper/cr >/dev/null 2>&1 &
	d=$2
	# (the console loses what is printed right before the reboot)
	echo "QS-CRASHING in $((d / 10)).$((d % 10))s"
	while [ "$d" -gt 0 ]; do usleep 100000 2>/dev/null || sleep 1; d=$((d - 1)); done
	echo b >/proc/sysrq-trigger
	sleep 10
	echo "the VM did not die"
	return 1
}

case ${1:-matrix} in
matrix)
	while IFS='	' read -r name secret; do
		vm_test "$name: random writes, then qemu-img compare identical and check clean" workload "$name" 1
	done <manifest
	if [ -n "${QS_RW_FULL:-}" ]; then
		vm_test "plain: a second seed" workload plain 2
		vm_test "luks: a second seed" workload luks 2
	fi
	vm_test "chain: 3 NBD connections, fio from 2 jobs verified, the rest unchanged, check clean" connections
	vm_test "segments (--max-targets 4): writes through a split table remapped round after round, and after a reattach, then consistent" segments
	vm_test "compressed clusters mapped read-only through the daemon" compressed_ro
	vm_test "interop with QEMU both ways, locks both ways" interop
	vm_test "corrupt bit: read-write refused (exit 4), read-only works" corrupt_bit
	vm_test "read-only file: read-write refused (exit 2), read-only works" read_only_file
	vm_test "discards: refused without --allow-discards, image consistent with it" discards
	vm_test "full filesystem: writes fail, the image stays consistent, flushed data intact" enospc
	kills=1
	[ -z "${QS_RW_FULL:-}" ] || kills=3
	vm_test "daemon killed (SIGKILL) under load: image consistent, flushed data intact; reattach" daemon_kill $kills
	vm_summary
	;;
crash)
	vm_test "crash run before $2: image consistent, flushed data intact" crash_verify
	[ ! -f /tmp/crash.summary ] || cat /tmp/crash.summary
	crash_start "$2" "$3"
	;;
daemon-kill)
	vm_test "daemon killed (SIGKILL) ${2:-30} times under load: image consistent, flushed data intact; reattach" daemon_kill "${2:-30}"
	[ ! -f /tmp/kill.summary ] || cat /tmp/kill.summary
	vm_summary
	;;
connections)	# that case alone
	vm_test "chain: 3 NBD connections, fio from 2 jobs verified, the rest unchanged, check clean" connections
	vm_summary
	;;
crash-verify)
	vm_test "last crash run: image consistent, flushed data intact" crash_verify
	[ ! -f /tmp/crash.summary ] || cat /tmp/crash.summary
	vm_summary
	;;
esac
