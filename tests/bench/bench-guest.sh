#!/bin/bash
# Guest side of tests/bench/bench-vm.sh: runs as root in the VM test bed, with
# the benchmark disk (ext4, read-only) as /dev/vda and the share at /host.
# Writes its measurements to /host/results.txt, one a line:
#   kernel VERSION ...
#   xts DRIVER                              the kernel's xts(aes) (aesni? generic?)
#   frag TEXT...                            the 1 TiB open (shown as is)
#   targets DEV N                           targets of a qcowsetup top table
#   fio ROUND JOB DEV BW_KIB IOPS LAT_US KIB   one fio job on one device (KIB: read
#                                           in all, ramp excluded)
# and prints "QS-MARK ROUND JOB DEV start|end" on the console around each fio
# job, for the host to note QEMU's CPU time.
# Environment (from bench-vm.sh): BENCH_RUNTIME, BENCH_RAMP, BENCH_ROUNDS,
# BENCH_SIZE_MIB, BENCH_FRAG (non-empty: measure the open of frag.qcow2).
set -eu
runtime=${BENCH_RUNTIME:-2}
ramp=${BENCH_RAMP:-0}
rounds=${BENCH_ROUNDS:-6}
size_mib=${BENCH_SIZE_MIB:-512}
out=/host/results.txt
mnt=/mnt/bench
key=$mnt/key
: > "$out"
say() { echo "bench-guest: $*"; }
rec() { echo "$*" >> "$out"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# "MemFree Slab SUnreclaim VmallocUsed" in KiB
meminfo() { awk '/^(MemFree|Slab|SUnreclaim|VmallocUsed):/ { printf "%s ", $2 } END { print "" }' /proc/meminfo; }

loop='' watchdog_pid=''
cleanup() {
	[ -z "$watchdog_pid" ] || kill "$watchdog_pid" 2>/dev/null || :
	for d in /dev/nbd0 /dev/nbd1; do qemu-nbd -d "$d" >/dev/null 2>&1 || :; done
	for m in bench_enc bench_enc-seq bench_plain bench_plain-seq bench_frag; do qcowsetup close "$m" >/dev/null 2>&1 || :; done
	dmsetup remove bench_rawcrypt >/dev/null 2>&1 || :
	[ -z "$loop" ] || losetup -d "$loop" 2>/dev/null || :
}
trap cleanup EXIT

rec "kernel $(uname -r), $(nproc) vCPUs, $(awk '/^MemTotal/ { printf "%d MiB", $2 / 1024 }' /proc/meminfo), $(grep -m1 '^model name' /proc/cpuinfo | sed 's/.*: //')"
mkdir -p "$mnt"
mount -t ext4 -o ro,noload /dev/vda "$mnt"
modprobe nbd 2>/dev/null || :
[ -b /dev/nbd1 ] || { say "no /dev/nbd1: is the nbd module in the initramfs?"; exit 1; }

# ---------------------------------------------------------------- 1 TiB open
if [ -n "${BENCH_FRAG:-}" ] && [ -f "$mnt/frag.qcow2" ]; then
	say "opening the 1 TiB fragmented image..."
	drop_caches
	read -r f0 s0 u0 v0 <<< "$(meminfo)"
	t=$EPOCHREALTIME
	qcowsetup open --readonly "$mnt/frag.qcow2" bench_frag
	t_open=$(since "$t")
	drop_caches
	read -r f1 s1 u1 v1 <<< "$(meminfo)"
	devs=0 targets=0
	for d in $(dmsetup ls | awk '$1 ~ /^bench_frag/ { print $1 }'); do
		c=$(dmsetup info "$d" | awk '/Number of targets/ { print $4 }')
		devs=$((devs + 1)) targets=$((targets + c))
	done
	top=$(dmsetup info bench_frag | awk '/Number of targets/ { print $4 }')
	size=$(blockdev --getsize64 /dev/mapper/bench_frag)
	# one read through the whole stack, as a check that it maps
	dd if=/dev/mapper/bench_frag of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null ||
		dd if=/dev/mapper/bench_frag of=/dev/null bs=64k count=16 2>/dev/null
	t=$EPOCHREALTIME
	qcowsetup close bench_frag
	t_close=$(since "$t")
	rec "frag open --readonly: ${t_open} s   close: ${t_close} s   (size $((size >> 30)) GiB)"
	rec "frag table: $targets targets in $devs dm devices (top table: $top targets)"
	rec "frag kernel memory while open: MemFree -$(( (f0 - f1) / 1024 )) MiB, Slab +$(( (s1 - s0) / 1024 )) MiB (unreclaimable +$(( (u1 - u0) / 1024 )) MiB), VmallocUsed +$(( (v1 - v0) / 1024 )) MiB"
	say "$(grep '^frag' "$out" | tr '\n' ';')"
fi

# ---------------------------------------------------------------- devices
say "setting up the devices..."
qcowsetup open --readonly --key-file "$key" "$mnt/enc.qcow2" bench_enc
qcowsetup open --readonly --key-file "$key" "$mnt/enc-seq.qcow2" bench_enc-seq
qcowsetup open --readonly "$mnt/plain.qcow2" bench_plain
qcowsetup open --readonly "$mnt/plain-seq.qcow2" bench_plain-seq
for m in bench_enc bench_enc-seq bench_plain bench_plain-seq; do
	rec "targets ${m/bench_/qs-} $(dmsetup info "$m" | awk '/Number of targets/ { print $4 }')"
done
# qemu-nbd as one would use it for a block device: read-only, O_DIRECT, native AIO.
qemu-nbd --fork -r -c /dev/nbd0 --object "secret,id=s0,file=$key" --image-opts \
	"driver=qcow2,file.driver=file,file.filename=$mnt/enc.qcow2,file.aio=native,cache.direct=on,encrypt.key-secret=s0"
qemu-nbd --fork -r -c /dev/nbd1 --image-opts \
	"driver=qcow2,file.driver=file,file.filename=$mnt/plain.qcow2,file.aio=native,cache.direct=on"
for d in nbd0 nbd1; do
	i=0
	while [ "$(cat /sys/block/$d/size)" = 0 ]; do
		i=$((i + 1)); [ $i -lt 100 ] || { say "/dev/$d never connected"; exit 1; }
		sleep 0.1
	done
done
loop=$(losetup -r --direct-io=on -f --show "$mnt/raw.img")
sectors=$((size_mib * 2048))
hexkey=$(od -An -tx1 -N64 /dev/urandom | tr -d ' \n')
dmsetup create bench_rawcrypt --readonly --table "0 $sectors crypt aes-xts-plain64 $hexkey 0 $loop 0"
unset hexkey
# the AES-XTS implementation the kernel picked (highest priority)
rec "xts $(awk '/^name/ { n = $3 } /^driver/ { d = $3 } /^priority/ && n == "xts(aes)" { print $3, d }' /proc/crypto |
	sort -n | tail -n 1 | cut -d' ' -f2)"
devs="qs-enc=/dev/mapper/bench_enc nbd-enc=/dev/nbd0 crypt-raw=/dev/mapper/bench_rawcrypt loop-raw=$loop
	qs-enc-seq=/dev/mapper/bench_enc-seq qs-plain=/dev/mapper/bench_plain nbd-plain=/dev/nbd1
	qs-plain-seq=/dev/mapper/bench_plain-seq"
for e in $devs; do
	s=$(blockdev --getsize64 "${e#*=}")
	[ "$s" = $((size_mib << 20)) ] || { say "${e%%=*}: size $s, expected $((size_mib << 20))"; exit 1; }
done
# Sanity: qcowsetup and qemu-nbd serve the same bytes (first 32 MiB).
for p in "bench_enc nbd0" "bench_plain nbd1"; do
	read -r m d <<< "$p"
	a=$(dd if="/dev/mapper/$m" bs=1M count=32 2>/dev/null | md5sum | cut -d' ' -f1)
	b=$(dd if="/dev/$d" bs=1M count=32 2>/dev/null | md5sum | cut -d' ' -f1)
	[ "$a" = "$b" ] || { say "$m and $d differ ($a vs $b)"; exit 1; }
done
say "$(dmsetup ls | wc -l) dm devices, loop $loop; warming the host cache..."
# One direct pass over every file, so that all devices find the disk image in
# the host page cache (cache=writeback), whichever runs first.
for f in enc.qcow2 enc-seq.qcow2 plain.qcow2 plain-seq.qcow2 raw.img; do
	fio --name=warm --filename="$mnt/$f" --readonly --rw=read --bs=1M --direct=1 \
		--ioengine=libaio --iodepth=8 --eta=never --output=/dev/null
done
drop_caches

# ---------------------------------------------------------------- fio
# JOB=rw:bs:iodepth. One fio process per round runs every job on every device,
# one after the other (stonewall), job-major: the devices compared on one job
# run back to back, seconds apart, so that they share the load of the host
# (which, under TCG on a shared machine, swings the figures by tens of per
# cent from one minute to the next); many short rounds, their per-round ratios
# and medians do the rest. Odd rounds take the devices in order, even rounds
# in reverse. One fio start-up per round: it costs seconds under TCG.
jobs="seq1m=read:1M:8 rand4k1=randread:4k:1 rand4k32=randread:4k:32"
fwd=$(for e in $devs; do echo "$e"; done)
rev=$(echo "$fwd" | sed -n '1!G;h;$p')
ndev=$(echo "$fwd" | wc -l)
# A hang (I/O that never completes) must not pass for a slow device: when no
# read completes anywhere for a minute, dump what the kernel is waiting on and
# power off (the host reports the results so far and the VM's failure).
watchdog() {
	local prev='' cur idle=0 p
	while sleep 5; do
		cur=$(awk '{ s += $4 } END { print s }' /proc/diskstats)
		if [ "$cur" = "$prev" ]; then idle=$((idle + 5)); else idle=0 prev=$cur; fi
		[ $idle -ge 60 ] || continue
		say "HANG: no read completed for ${idle}s; in flight:"
		for p in /sys/block/*; do
			read -r r w < "$p/inflight" 2>/dev/null || continue
			[ "$r$w" = 00 ] || echo "  ${p##*/} $(cat "$p/dm/name" 2>/dev/null): $r reads, $w writes in flight"
		done
		for p in /proc/[0-9]*; do
			case $(sed 's/.*) //' "$p/stat" 2>/dev/null | cut -d' ' -f1) in
			D) echo "  D state: ${p#/proc/} $(tr '\0' ' ' < "$p/cmdline")"; sed 's/^/      /' "$p/stack" 2>/dev/null ;;
			esac
		done
		dmsetup status 2>/dev/null | grep -v 'linear\|zero' | head -20
		echo w > /proc/sysrq-trigger 2>/dev/null && dmesg | grep -A 30 'blocked state' | head -150
		rec "hang after ${idle}s without I/O"
		sync
		echo o > /proc/sysrq-trigger
	done
}
cd /tmp     # fio writes the output of exec_prerun/postrun here
round=1
watchdog &
watchdog_pid=$!
while [ "$round" -le "$rounds" ]; do
	if [ $((round % 2)) = 1 ]; then order=$fwd; else order=$rev; fi
	args=()
	for j in $jobs; do
		IFS=: read -r rw bs qd <<< "${j#*=}"
		for e in $order; do
			m="QS-MARK $round ${j%%=*} ${e%%=*}"
			args+=(--name="${j%%=*}.${e%%=*}" --filename="${e#*=}" --rw="$rw" --bs="$bs"
				--iodepth="$qd" --stonewall
				--exec_prerun="sh -c 'echo $m start > /dev/console'"
				--exec_postrun="sh -c 'echo $m end > /dev/console'")
		done
	done
	fio --readonly --direct=1 --ioengine=libaio --time_based --runtime="$runtime" \
		--ramp_time="$ramp" --randrepeat=0 --norandommap \
		--eta=never --output-format=terse --terse-version=3 "${args[@]}" > /tmp/fio.out
	while IFS= read -r r; do
		rec "$r"
		say "$r"
	done < <(awk -F';' -v p="fio $round" '$1 == 3 { split($3, n, "."); printf "%s %s %s %d %d %.1f %d\n", p, n[1], n[2], $7, $8, $40, $6 }' /tmp/fio.out)
	[ "$(grep -c "^fio $round " "$out")" = $((ndev * 3)) ] ||
		{ say "fio did not report every job:"; cat /tmp/fio.out; exit 1; }
	round=$((round + 1))
done

kill "$watchdog_pid" 2>/dev/null || :
cleanup
trap - EXIT
if dmsetup ls 2>/dev/null | grep -qv "No devices"; then say "devices left:"; dmsetup ls; fi
umount "$mnt"
say "done"
