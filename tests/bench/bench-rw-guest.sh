#!/bin/bash
# Guest side of tests/bench/bench-rw.sh (runs in the VM test bed; /dev/vda is
# an ext4 disk with key, empty.qcow2 (LUKS, nothing allocated), full.qcow2
# (LUKS, every cluster allocated), full.raw, and with BENCH_PLAIN=1
# empty-plain.qcow2 (unencrypted, nothing allocated), base.raw (random data)
# with ov-raw.qcow2 over it and base.qcow2 (the same data) with ov-qcow2.qcow2
# over it (unencrypted overlays, nothing allocated)). A second build of
# qcowsetup in /usr/local/before/ (BENCH_BEFORE on the host) runs the first
# writes too, as qcowsetup-base. Prints one line per fio job:
#   R ROUND KIND DEVICE seq|rand KIB_S IOPS   KIND: first-write (LUKS;
#     first-write-xl2: LUKS with extended L2 entries, empty-xl2.qcow2),
#     first-write-plain, cow-raw, cow-qcow2 (first writes into an overlay:
#     copy-on-write), allocated (LUKS) or allocated-plain (the limits)
#   RELOAD ROUND seq|rand STATUS-LINE      (the daemon's table swaps)
#   STATS ROUND seq|rand KIND DEVICE KEY=VALUE...  (its stats file)
#   PATHS ROUND seq|rand KIND DEVICE TOP SLOW CRYPT_KIB  (writes the top device
#     completed, those of them the slow path served (its NBD device), KiB
#     written through the crypt device of a LUKS image: the cipher's work)
#   TARGETS N SLOW                         (the allocated image's top table)
#   S ROUND before|after first|cow|backing-read KIB_S IOPS  (BENCH_BEFORE)
# Environment: BENCH_RUNTIME (seconds per job, default 15), BENCH_ROUNDS
# (default 3; even rounds run the devices in reverse order), BENCH_SLOW_ONLY=1
# (the slow path's comparison only).
set -u
rt=${BENCH_RUNTIME:-15}
rounds=${BENCH_ROUNDS:-3}
mnt=/mnt/b
mkdir -p $mnt && mount -t ext4 /dev/vda $mnt || exit 1
cd $mnt || exit 1
export PATH=/usr/local/bin:$PATH
modprobe -q nbd; modprobe -q dm-crypt
echo 1 >/proc/sys/kernel/sysrq; echo 60 >/proc/sys/kernel/hung_task_timeout_secs
sec="--object secret,id=s0,file=$mnt/key"

# dev rw bs iodepth [once] -> "KiB/s IOPS"; a job that hangs ends the run.
# once: first writes, not rewrites: one pass over the 400 MiB at most (a
# sequential writer on an unencrypted image finishes it in a second or two;
# the rest of a time-based job would rewrite what it allocated)
fio_job() {
	local pid i tb=--time_based
	[ "${5:-}" = once ] && tb=
	fio --name=j --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --direct=1 --ioengine=libaio \
		$tb --runtime="$rt" --size=400M --randrepeat=0 --norandommap \
		--output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{ print $7 + $48, $8 + $49 }' >/tmp/fio.out &
	pid=$!
	for ((i = 0; i < rt + 120; i++)); do
		kill -0 $pid 2>/dev/null || { wait $pid; cat /tmp/fio.out; return 0; }
		sleep 1
	done
	hang_dump "fio on $1 ($2 $3 QD$4) still running $((rt + 120)) s after its start"
}
hang_dump() {	# what: the blocked tasks' stacks on the console, then the run ends
	echo "ERROR hang: $1" >&2
	grep -l "^State:.*D" /proc/[0-9]*/status 2>/dev/null | while read -r f; do d=${f%/status}; echo "D: ${d#/proc/} $(tr "\\0" " " <$d/cmdline)"; cat $d/stack 2>/dev/null; done >&2
	echo w >/proc/sysrq-trigger
	sleep 2
	dmesg | tail -n 600 >&2
	echo b >/proc/sysrq-trigger	# called in $(...): only the VM's end stops the run
}
job_args() {	# seq|rand -> "rw bs qd"
	case $1 in seq) echo "write 1M 4" ;; rand) echo "randwrite 4k 16" ;; esac
}
base=/usr/local/before/qcowsetup
[ -x $base ] || base=
kind=first-write	# or first-write-plain: the image and its options
kind_image() {	# the empty image of $kind
	case $kind in
	first-write) echo empty.qcow2 ;;
	first-write-xl2) echo empty-xl2.qcow2 ;;
	first-write-plain) echo empty-plain.qcow2 ;;
	cow-raw) echo ov-raw.qcow2 ;;
	cow-qcow2) echo ov-qcow2.qcow2 ;;
	esac
}
luks_kind() { [ $kind = first-write ] || [ $kind = first-write-xl2 ]; }
fresh() {
	cp "$(kind_image)" t.qcow2
	sync; echo 3 >/proc/sys/vm/drop_caches
}
image_opts() {	# the image for qemu-img and qemu-nbd
	if luks_kind; then
		echo "driver=qcow2,file.filename=$mnt/t.qcow2,encrypt.key-secret=s0"
	else
		echo "driver=qcow2,file.filename=$mnt/t.qcow2"
	fi
}

# "WRITES KIB" a block device (/dev/nbdN, /dev/mapper/NAME) completed
disk_writes() {
	local b n
	b=/sys/block/${1#/dev/}/stat
	for n in /sys/block/dm-*/dm/name; do
		[ "$(cat "$n" 2>/dev/null)" = "${1#/dev/mapper/}" ] && b=${n%/dm/name}/stat
	done
	[ -f "$b" ] && awk '{ print $5, int($7 / 2) }' "$b" || echo "0 0"
}
# the top device, its slow path and its crypt device (none: /dev/null)
path_devs() {	# binary
	echo /dev/mapper/bq "$($1 status bq | sed -n 's/^ *slow path: *\(\/dev\/nbd[0-9]*\).*/\1/p')" \
		"$([ -b /dev/mapper/bq_crypt ] && echo /dev/mapper/bq_crypt || echo /dev/null)"
}
first_write_qcowsetup() {	# round test [binary label]
	local rw bs qd bw iops qs=${3:-qcowsetup} label=${4:-qcowsetup} top slow crypt t0 s0 c0 t1 s1 c1 x
	read -r rw bs qd <<< "$(job_args "$2")"
	fresh
	if luks_kind; then
		$qs open --key-file key t.qcow2 bq || { echo "ERROR open"; return 1; }
	else
		$qs open t.qcow2 bq || { echo "ERROR open"; return 1; }
	fi
	read -r top slow crypt <<< "$(path_devs $qs)"
	read -r t0 x <<< "$(disk_writes $top)"; read -r s0 x <<< "$(disk_writes "$slow")"; read -r x c0 <<< "$(disk_writes $crypt)"
	read -r bw iops <<< "$(fio_job /dev/mapper/bq "$rw" "$bs" "$qd" once)"
	read -r t1 x <<< "$(disk_writes $top)"; read -r s1 x <<< "$(disk_writes "$slow")"; read -r x c1 <<< "$(disk_writes $crypt)"
	echo "R $1 $kind $label $2 $bw $iops"
	echo "PATHS $1 $2 $kind $label $((t1 - t0)) $((s1 - s0)) $((c1 - c0))"
	echo "RELOAD $1 $2 $kind $label $($qs status bq | sed -n 's/^ *remapped: *//p')"
	echo "STATS $1 $2 $kind $label $(grep -v '^\(remapped_bytes\|broken\)=' /run/qcowsetup/bq.stats 2>/dev/null | tr '\n' ' ')"
	$qs close bq
	qemu-img check $sec --image-opts "$(image_opts)" >/dev/null ||
		echo "ERROR qemu-img check after the $label run"
	echo "SIZE $1 $2 $kind $label $(du -k t.qcow2 | cut -f1)"
}
nbd_connect() {	# qemu-nbd on /dev/nbd15; a device just let go can still be busy
	local i
	for i in 1 2 3 4 5; do
		qemu-nbd $sec --image-opts "$(image_opts)" --cache=none --aio=native -c /dev/nbd15 && sleep 1 && return 0
		echo "qemu-nbd: connect attempt $i failed" >&2
		qemu-nbd -d /dev/nbd15 >/dev/null 2>&1
		sleep 2
	done
	return 1
}
first_write_nbd() {	# round test
	local rw bs qd bw iops
	read -r rw bs qd <<< "$(job_args "$2")"
	fresh
	nbd_connect || { echo "ERROR qemu-nbd ($kind $2): cannot connect /dev/nbd15"; return 1; }
	read -r bw iops <<< "$(fio_job /dev/nbd15 "$rw" "$bs" "$qd" once)"
	echo "R $1 $kind qemu-nbd $2 $bw $iops"
	qemu-nbd -d /dev/nbd15 >/dev/null
	echo "SIZE $1 $2 $kind qemu-nbd $(du -k t.qcow2 | cut -f1)"
}
first_write_all() {	# round test: every device, in reverse order on even rounds
	local devs="qcowsetup ${base:+base} nbd" dev
	[ $(($1 % 2)) = 1 ] || devs="nbd ${base:+base} qcowsetup"
	for dev in $devs; do
		case $dev in
		qcowsetup) first_write_qcowsetup "$1" "$2" ;;
		base) first_write_qcowsetup "$1" "$2" $base qcowsetup-base ;;
		nbd) first_write_nbd "$1" "$2" ;;
		esac
	done
}

# ---- the slow path alone, the build before (BENCH_BEFORE: its qcowsetup in
# /usr/local/before/) against this one: fio on unencrypted images
#   S ROUND before|after first|cow|backing-read KIB_S IOPS
slow_job() {	# round which test
	local qs=qcowsetup rw=randwrite img=slow-empty.qcow2 bw iops conn=()
	[ "$2" = before ] && qs=/usr/local/before/qcowsetup
	[ "$2" = before ] || [ -z "${BENCH_CONNECTIONS:-}" ] || conn=(--nbd-connections "$BENCH_CONNECTIONS")
	case $3 in cow) img=ov.qcow2 ;; backing-read) img=ov.qcow2 rw=randread ;; esac
	cp "$img" t-slow.qcow2; sync; echo 3 >/proc/sys/vm/drop_caches
	$qs open ${conn[@]+"${conn[@]}"} t-slow.qcow2 bs || { echo "ERROR open ($2 $3)"; return 1; }
	read -r bw iops <<< "$(fio_job /dev/mapper/bs $rw 4k 16)"
	echo "S $1 $2 $3 $bw $iops"
	$qs close bs
}
slow_path() {
	local round which test
	[ -x /usr/local/before/qcowsetup ] || return 0
	qemu-img create -q -f qcow2 slow-empty.qcow2 512M
	[ -f base.qcow2 ] || qemu-img create -q -f qcow2 -o preallocation=falloc base.qcow2 512M
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2 512M
	for round in $(seq 1 "$rounds"); do
		for test in first cow backing-read; do
			for which in before after; do
				[ $((round % 2)) = 1 ] || which=$([ $which = before ] && echo after || echo before)
				slow_job "$round" $which $test
			done
		done
	done
	rm -f t-slow.qcow2 slow-empty.qcow2
}

echo "KERNEL $(uname -r) CPUS $(nproc)"
slow_path
[ "${BENCH_SLOW_ONLY:-0}" = 1 ] && exit 0
# ---- first writes into an empty image: qcowsetup (and its base) vs qemu-nbd
kinds=first-write
[ -f empty-xl2.qcow2 ] && kinds="$kinds first-write-xl2"
[ -f empty-plain.qcow2 ] && kinds="$kinds first-write-plain"
[ -f ov-raw.qcow2 ] && kinds="$kinds cow-raw cow-qcow2"
for round in $(seq 1 "$rounds"); do
	for kind in $kinds; do
		for test in seq rand; do
			first_write_all "$round" $test
		done
	done
done

# ---- writes to allocated clusters: qcowsetup's fast path vs raw dm-crypt
qcowsetup open --key-file key full.qcow2 bf || exit 1
hexkey=$(od -An -tx1 -N 64 /dev/urandom | tr -d ' \n')
loop=$(losetup --direct-io=on -f --show full.raw)
dmsetup create braw --table "0 $(blockdev --getsz "$loop") crypt aes-xts-plain64 $hexkey 0 $loop 0"
echo "TARGETS $(dmsetup table bf_fast | wc -l) $(dmsetup table bf_fast | grep -c ' 43:')"
for round in $(seq 1 "$rounds"); do
	devs="bf braw"
	[ $((round % 2)) = 1 ] || devs="braw bf"
	for test in seq rand; do
		read -r rw bs qd <<< "$(job_args $test)"
		for dev in $devs; do
			read -r bw iops <<< "$(fio_job /dev/mapper/$dev "$rw" "$bs" "$qd")"
			echo "R $round allocated $dev $test $bw $iops"
		done
	done
done
qcowsetup close bf
dmsetup remove braw
# the limit of unencrypted images: the plain loop device over the same file
if [ -f empty-plain.qcow2 ]; then
	for round in $(seq 1 "$rounds"); do
		for test in seq rand; do
			read -r rw bs qd <<< "$(job_args $test)"
			read -r bw iops <<< "$(fio_job "$loop" "$rw" "$bs" "$qd")"
			echo "R $round allocated-plain loop $test $bw $iops"
			# first writes into a sparse file (one pass, as the first
			# writes above): what the filesystem's block allocation
			# costs the limit (the fast path's windows are holes until
			# written)
			rm -f sparse.raw; truncate -s 512M sparse.raw
			sloop=$(losetup --direct-io=on -f --show sparse.raw)
			read -r bw iops <<< "$(fio_job "$sloop" "$rw" "$bs" "$qd" once)"
			echo "R $round sparse-plain loop $test $bw $iops"
			losetup -d "$sloop"
			rm -f sparse.raw
		done
	done
fi
losetup -d "$loop"
