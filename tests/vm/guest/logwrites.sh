#!/bin/sh
# Runs in the VM (see test-logwrites.sh): every power cut of one workload.
#   logwrites.sh WORKLOAD SEED [full]
# Disks: /dev/vda the data disk, /dev/vdb the write log, /dev/vdc the
# scratch disk (all zeros); /host holds the images (made on the host) and
# the passphrase.
#   record   /dev/mapper/lw (dm-log-writes: vda, its log on vdb) gets an ext4
#            filesystem and the workload's image (blockdev: no filesystem,
#            the image written straight on an 'LV', a dm-linear device 1 MiB
#            into lw); the log is marked "start",
#            then rw-workload writes through qcowsetup and marks
#            "flushed-N" after each fsync of the mapped device that
#            acknowledged writes 1..N; close, mark "closed", unmount.
#   replay   the log onto vdc, entry by entry, up to each point: every mark
#            and (full) every flush/FUA entry and a sampled entry between
#            two of them. At each point ext4 recovers its journal on a
#            snapshot of vdc, `qemu-img check` finds no corruption (leaks
#            allowed; an image left dirty by lazy refcounts is repaired
#            first, `qemu-img check -r all`, as QEMU's open does), and the image read by qemu-img convert and through a
#            read-only qcowsetup mapping holds every write acknowledged by
#            the last "flushed-N" mark before the point (rw-workload verify).
# Prints "logwrites WORKLOAD: ..." with the counts.
. /host/lib.sh
export PATH=/usr/local/bin:$PATH
w=$1 seed=$2 full=${3:-}
syslogd -O /tmp/messages 2>/dev/null || :
modprobe -q dm-crypt 2>/dev/null; modprobe -q nbd 2>/dev/null
sec="--object secret,id=s0,file=/host/pass"
ops=24 flush_every=4 regions='' dev='' open_opts=''
# (16 MiB images: reading them back through dm-crypt under TCG is what costs)
case $w in
luks)	img=luks.qcow2 key="--key-file /host/pass"
	regions="--region 0:4194304 --region 8388608:4194304" ;;
overlay)	img=overlay.qcow2 key=''	# base.raw beside it
	regions="--region 1048576:4194304 --region 10485760:4194304" ;;
lazy)	img=lazy.qcow2 key=''
	regions="--region 0:4194304 --region 8388608:8388608" ;;
compressed)	img=compressed.qcow2 key=''	# compressed clusters rewritten
	regions="--region 0:6291456" ;;
blockdev)	img=luks.qcow2 key="--key-file /host/pass" dev=1
	regions="--region 0:4194304 --region 8388608:4194304" ;;
segmented)	img=segmented.qcow2 key=''	# 129 runs, at most 16 targets a table
	open_opts="--max-targets 16"
	regions="--region 0:8388608 --region 8388608:4194304" ;;
*)	echo "unknown workload $w"; exit 2 ;;
esac
[ -z "$full" ] || ops=48

img_opts() {	# image path: qemu-img arguments
	proto=''
	case $1 in /dev/*) proto=,file.driver=host_device ;; esac
	case $img in
	*luks*) echo "$sec --image-opts driver=qcow2$proto,file.filename=$1,encrypt.key-secret=s0" ;;
	*) echo "-f qcow2 $1" ;;
	esac
}

lv_table() {	# the 'LV' on device $1: 32 MiB from 1 MiB on
	echo "0 65536 linear $1 2048"
}

record() {
	modprobe dm-log-writes && modprobe dm-snapshot || { echo "no dm-log-writes or dm-snapshot"; exit 77; }
	dmsetup create lw --table "0 $(blockdev --getsz /dev/vda) log-writes /dev/vda /dev/vdb"
	if [ -n "$dev" ]; then
		dmsetup create lv --table "$(lv_table /dev/mapper/lw)"
		dd if="/host/$img" of=/dev/mapper/lv bs=1M conv=fsync 2>/dev/null
		path=/dev/mapper/lv
	else
		mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/lw
		mkdir -p /mnt/lw
		mount -t ext4 /dev/mapper/lw /mnt/lw
		cp "/host/$img" /mnt/lw/
		[ "$w" != overlay ] || cp /host/base.raw /mnt/lw/
		sync
		path=/mnt/lw/$img
	fi
	# shellcheck disable=SC2046
	qemu-img convert $(img_opts "$path") -O raw /tmp/orig.raw
	printf '#!/bin/sh\nexec dmsetup message lw 0 mark "flushed-$1"\n' >/tmp/mark.sh
	chmod +x /tmp/mark.sh
	dmsetup message lw 0 mark start
	# shellcheck disable=SC2086
	qcowsetup open $key $open_opts "$path" wl
	if [ -n "$open_opts" ]; then
		segs=$(vm_dm_devices | grep -c '^wl_s') || :
		[ "${segs:-0}" -gt 0 ] || { dmsetup ls; echo "the table is not split into segment devices"; return 1; }
		echo "logwrites $w: the table split into $segs segment devices"
	fi
	# shellcheck disable=SC2086
	rw-workload write --seed "$seed" --ops $ops --max 1048576 --flush-every $flush_every \
		--log /tmp/w.log --after-flush /tmp/mark.sh $regions /dev/mapper/wl
	qcowsetup close wl
	dmsetup message lw 0 mark closed
	if [ -n "$dev" ]; then dmsetup remove lv; else umount /mnt/lw; fi
	dmsetup remove lw
	log-replay list /dev/vdb >/tmp/entries
	grep -q ' M .* start$' /tmp/entries || { echo "no start mark in the log"; return 1; }
	grep -q ' M .* closed$' /tmp/entries || { echo "no closed mark in the log"; return 1; }
	echo "logwrites $w: recorded $(wc -l </tmp/entries) log entries, $(grep -c ' [^ ]*[FU][^ ]* ' /tmp/entries) flush/FUA, $(grep -c ' M .* flushed-' /tmp/entries) flush marks" | tee /tmp/summary
}

# The points, "INDEX KIND PROMISED" ascending: KIND mark (start, flushed-N,
# closed; not the mark the device adds when removed), flush (a flush or
# FUA entry) or between (a sampled entry between two of those); PROMISED the
# last write acknowledged by a flush before the point.
points() {
	awk -v full="${full:-0}" -v seed="$seed" '
		$2 ~ /M/ && $5 == "start" { start = $1 }
		{ idx[NR] = $1; flags[NR] = $2; mark[NR] = $5 }
		END {
			srand(seed); promised = 0; prev = -1
			for (i = 1; i <= NR; i++) {
				n = idx[i]
				if (n < start) continue
				if (flags[i] ~ /M/ && mark[i] ~ /^flushed-/) promised = substr(mark[i], 9) + 0
				kind = ""
				if (flags[i] ~ /M/ && mark[i] != "dm-log-writes-end") kind = "mark"
				else if (full && flags[i] ~ /[FU]/) kind = "flush"
				if (kind == "") continue
				if (full && prev >= 0 && n - prev > 1) {
					b = prev + 1 + int(rand() * (n - prev - 1))
					print b, "between", last_promised
				}
				print n, kind, promised
				prev = n; last_promised = promised
			}
		}' /tmp/entries
}

since() { awk -v a="$1" -v b="$(vm_uptime)" 'BEGIN { printf "%.1f", b - a }'; }

check_point() {	# index kind promised: 0, or 1 with the reason printed
	p=$1 n=$3
	t0=$(vm_uptime)
	dmsetup create snap --table "0 $(blockdev --getsz /dev/vdc) snapshot /dev/vdc $cow N 8"
	mkdir -p /mnt/chk
	if [ -n "$dev" ]; then
		dmsetup create chklv --table "$(lv_table /dev/mapper/snap)"
		path=/dev/mapper/chklv
	elif ! mount -t ext4 /dev/mapper/snap /mnt/chk 2>/tmp/mount.err; then
		echo "point $p ($2): the filesystem does not mount: $(cat /tmp/mount.err)"
		dmsetup remove snap
		corrupt=$((corrupt + 1))
		return 1
	else
		path=/mnt/chk/$img
	fi
	bad=0
	rc=0
	times="mount $(since "$t0")s"
	t0=$(vm_uptime)
	# a lazy-refcounts image left dirty: its refcounts are rebuilt first,
	# as QEMU does when it opens it read-write
	dirty=$(od -An -tu1 -j 79 -N 1 "$path" | tr -d ' ')
	if [ $((dirty % 2)) = 1 ]; then
		dirties=$((dirties + 1))
		# shellcheck disable=SC2046
		qemu-img check -r all $(img_opts "$path") >/tmp/check.out 2>&1 ||
			{ echo "point $p ($2): qemu-img check -r all of the dirty image failed"; cat /tmp/check.out; }
	fi
	# shellcheck disable=SC2046
	qemu-img check $(img_opts "$path") >/tmp/check.out 2>&1 || rc=$?
	case $rc in
	0) ;;
	3) leaky=$((leaky + 1)) ;;
	*) echo "point $p ($2): qemu-img check exit $rc"; cat /tmp/check.out; corrupt=$((corrupt + 1)); bad=1 ;;
	esac
	times="$times, qemu-img check $(since "$t0")s"
	t0=$(vm_uptime)
	# the workload's log as it stood when write n was the last acknowledged
	awk -v n="$n" '!/^flushed / || $2 <= n' /tmp/w.log >/tmp/p.log
	# shellcheck disable=SC2046
	if ! qemu-img convert $(img_opts "$path") -O raw /tmp/p.raw 2>/tmp/convert.err; then
		echo "point $p ($2): QEMU cannot read the image: $(cat /tmp/convert.err)"
		corrupt=$((corrupt + 1)); bad=1
	elif ! rw-workload verify /tmp/p.log /tmp/orig.raw /tmp/p.raw >/tmp/verify.out 2>&1; then
		echo "point $p ($2, $n writes acknowledged), read by qemu-img convert:"; cat /tmp/verify.out
		l=$(sed -n 's/^lost: \([0-9]*\) flushed.*/\1/p' /tmp/verify.out)
		lost=$((lost + ${l:-1})); bad=1
	fi
	rm -f /tmp/p.raw
	times="$times, convert and verify $(since "$t0")s"
	t0=$(vm_uptime)
	# shellcheck disable=SC2086
	if ! qcowsetup open --readonly $key $open_opts "$path" chk 2>/tmp/open.err; then
		echo "point $p ($2): qcowsetup cannot open the image read-only: $(cat /tmp/open.err)"
		unopened=$((unopened + 1)); bad=1
	else
		times="$times, qcowsetup open $(since "$t0")s"
		t0=$(vm_uptime)
		if ! rw-workload verify /tmp/p.log /tmp/orig.raw /dev/mapper/chk >/tmp/verify.out 2>&1; then
			echo "point $p ($2, $n writes acknowledged), read through qcowsetup:"; cat /tmp/verify.out
			bad=1
		fi
		times="$times, verify $(since "$t0")s"
		t0=$(vm_uptime)
		qcowsetup close chk
	fi
	if [ -n "$dev" ]; then dmsetup remove chklv; else umount /mnt/chk; fi
	dmsetup remove snap
	echo "point $p ($2, $n writes acknowledged): $times, close $(since "$t0")s"
	return $bad
}

replay() {
	points >/tmp/points
	truncate -s 512M /tmp/cow
	cow=$(losetup -f --show /tmp/cow)
	corrupt=0 lost=0 leaky=0 unopened=0 dirties=0 failed=0 checked=0 next=0
	while read -r p kind n; do
		log-replay replay /dev/vdb /dev/vdc "$next" $((p + 1))
		next=$((p + 1))
		checked=$((checked + 1))
		check_point "$p" "$kind" "$n" || failed=$((failed + 1))
	done </tmp/points
	losetup -d "$cow"
	rm -f /tmp/cow
	echo "logwrites $w: $(grep -vc between /tmp/points) flush points replayed ($(grep -c ' mark ' /tmp/points) marks), $checked points checked ($(grep -c between /tmp/points) between flushes), $corrupt corruptions, $lost flushed writes lost, $unopened not opened by qcowsetup, $leaky with leaked clusters, $dirties dirty (lazy refcounts, repaired first)" |
		tee -a /tmp/summary
	[ "$failed" = 0 ]
}

vm_test "$w: the workload recorded on a dm-log-writes device" record
if [ -s /tmp/entries ]; then
	vm_test "$w: the log replayed to every flush mark${full:+, flush and sampled point}: image consistent, flushed writes intact" replay
fi
[ ! -f /tmp/summary ] || cat /tmp/summary
vm_assert_clean >/dev/null || vm_test "no device left" vm_assert_clean
vm_summary
