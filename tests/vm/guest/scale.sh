#!/bin/bash
# Runs in the VM (see test-scale.sh and tests/bench/bench-scale.sh): /dev/vda
# is an ext4 disk with key, luks.qcow2 and plain.qcow2 (small empty images).
# Opens N read-write mappings one by one (odd ones LUKS, even ones
# unencrypted), writes 1 MiB into each (the daemon allocates and remaps), then
# measures every qcowsetup-daemon process (guardians included) and closes
# the mappings one by one. Prints
#   OPEN I luks|plain MS          per mapping, in order
#   MEM N PROCS VMLCK_KIB VMRSS_KIB   summed over the processes, after N
#                                 mappings (N = 1, 5, 10, 20, 50, 100, ... and
#                                 the last)
#   PROC ROLE VMLCK_KIB VMRSS_KIB one line per process, at the last MEM
#   SMAPS KIB_LOCKED KIB_RSS NAME where the first daemon's memory is (same)
#   CLOSE I MS                    per mapping, in order
# Usage: scale.sh N [--check LOCK_KIB RSS_KIB]: with --check, PASS/FAIL lines
# (vm_test) for every mapping opened and closed and the per-mapping budgets.
. /host/lib.sh
n=${1:-5}
max_lck='' max_rss=''
[ "${2:-}" != --check ] || { max_lck=$3; max_rss=$4; }
mkdir -p /mnt/s
mount -t ext4 /dev/vda /mnt/s || { echo "cannot mount the image disk"; exit 1; }
cd /mnt/s || exit 1
export PATH=/usr/local/bin:$PATH
modprobe -q nbd 2>/dev/null; modprobe -q dm-crypt 2>/dev/null

ms_since() {	# EPOCHREALTIME at the start -> milliseconds since
	awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 1000 }'
}

# Every qcowsetup-daemon process: "PID ROLE" (guard: a guardian).
daemons() {
	local c
	for p in /proc/[0-9]*; do
		c=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
		case $c in
		*qcowsetup-daemon*--guard*) echo "${p#/proc/} guard" ;;
		*qcowsetup-daemon*) echo "${p#/proc/} daemon" ;;
		esac
	done
}

kib() {	# pid field -> its value in KiB (0 when gone)
	awk -v f="$2:" '$1 == f { print $2; found = 1 } END { if (!found) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0
}

# Where one process's memory is: "SMAPS KIB_LOCKED KIB_RSS NAME", the
# largest first (locked: the sizes of its locked areas, as VmLck counts)
smaps() {	# pid
	awk '/^[0-9a-f]+-[0-9a-f]+ / { n = $6 == "" ? "(anon)" : $6 }
		/^Size:/ { sz = $2 } /^Rss:/ { rss[n] += $2 }
		/^VmFlags:/ { if ($0 ~ / lo/) lck[n] += sz }
		END { for (k in rss) if (rss[k] || lck[k]) printf "SMAPS %d %d %s\n", lck[k], rss[k], k }' \
		"/proc/$1/smaps" | sort -k2,2nr | head -n 12
}

# MEM N PROCS LCK RSS, and (last) one PROC line per process
mem() {	# n [procs]
	local procs=0 lck=0 rss=0 l r
	while read -r pid role; do
		l=$(kib "$pid" VmLck) r=$(kib "$pid" VmRSS)
		procs=$((procs + 1)) lck=$((lck + l)) rss=$((rss + r))
		[ -z "${2:-}" ] || echo "PROC $role $l $r"
	done < <(daemons)
	echo "MEM $1 $procs $lck $rss"
	[ -z "${2:-}" ] || smaps "$(daemons | awk '$2 == "daemon" { print $1; exit }')"
}

open_all() {
	local t kind
	for i in $(seq 1 "$n"); do
		if [ $((i % 2)) = 1 ]; then kind=luks; else kind=plain; fi
		cp $kind.qcow2 s$i.qcow2
		t=$EPOCHREALTIME
		if [ $kind = luks ]; then
			qcowsetup open --key-file key s$i.qcow2 s$i || { echo "ERROR open s$i"; return 1; }
		else
			qcowsetup open s$i.qcow2 s$i || { echo "ERROR open s$i"; return 1; }
		fi
		echo "OPEN $i $kind $(ms_since "$t")"
		# 1 MiB of first writes: the daemon allocates, the remap thread swaps
		dd if=/dev/urandom of=/dev/mapper/s$i bs=64k count=16 seek=$((i % 64)) oflag=direct status=none ||
			{ echo "ERROR write s$i"; return 1; }
		case $i in 1|5|10|20|50|100|200|500) [ "$i" = "$n" ] || mem "$i" ;; esac
	done
	sleep 1	# the last remap round
	mem "$n" all
}

close_all() {
	local t
	for i in $(seq 1 "$n"); do
		t=$EPOCHREALTIME
		qcowsetup close s$i || { echo "ERROR close s$i"; return 1; }
		echo "CLOSE $i $(ms_since "$t")"
	done
}

# (vm_test runs each test in a subshell: the open's output is kept in a file)
opened() {
	cat /tmp/scale.out
	! grep -q '^ERROR' /tmp/scale.out
}

budgets() {
	read -r _ _ last_procs last_lck last_rss < <(grep '^MEM' /tmp/scale.out | tail -n 1)
	grep -E '^(PROC|SMAPS)' /tmp/scale.out
	echo "$n mappings: $last_procs processes, $((last_lck / n)) KiB locked and $((last_rss / n)) KiB RSS per mapping"
	[ "$last_procs" -le $((2 * n)) ] || { echo "more than 2 processes per mapping"; return 1; }
	[ $((last_lck / n)) -le "$max_lck" ] || { echo "locked: over $max_lck KiB per mapping"; return 1; }
	[ $((last_rss / n)) -le "$max_rss" ] || { echo "RSS: over $max_rss KiB per mapping"; return 1; }
}

images_clean() {
	for i in $(seq 1 "$n"); do
		if [ $((i % 2)) = 1 ]; then
			qemu-img check -q --object secret,id=s0,file=key \
				--image-opts "driver=qcow2,file.filename=s$i.qcow2,encrypt.key-secret=s0"
		else
			qemu-img check -q s$i.qcow2
		fi
	done
}

echo "KERNEL $(uname -r) MEMTOTAL $(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo)"
if [ -z "$max_lck" ]; then
	open_all && close_all
	exit
fi
open_all >/tmp/scale.out 2>&1
vm_test "$n read-write mappings opened (LUKS and unencrypted) and written" opened
vm_test "per mapping: locked <= $max_lck KiB, RSS <= $max_rss KiB, at most 2 processes" budgets
vm_test "$n mappings closed" close_all
vm_test "the images are clean (qemu-img check)" images_clean
vm_test "nothing left" vm_assert_clean
vm_summary
