#!/bin/sh
# Runs in the VM (see test-faults.sh): I/O errors and full file systems
# under a read-write mapping.
#   faults.sh
# /dev/vda: the disk of the file system that holds the images, seen through
# /dev/mapper/fl (dm); /host: the images (made on the host). A fault swaps
# in a table that fails the blocks of the image file alone (ext4's journal
# and metadata stay healthy, as on a disk with bad sectors under one file):
# the error target (every read and write fails) or flakey (up 1 s, down 1 s).
# The image file is filled with zeros past its end first, so that new
# clusters land in blocks the file already has (filefrag finds them).
# After each fault is lifted, the file system is mounted again (what is on
# the disk, not in the page cache), `qemu-img check` finds no corruption and
# every write acknowledged by a completed flush reads back (rw-workload
# verify).
. /host/lib.sh
export PATH=/usr/local/bin:$PATH
sectors=$(blockdev --getsz /dev/vda)
mnt=/mnt/f

# A new file system on fl (each test has its own: a failed test's cleanup
# removes every dm device, fl included)
setup_fs() {
	umount $mnt 2>/dev/null || :
	dmsetup remove fl 2>/dev/null || :
	dmsetup create fl --table "0 $sectors linear /dev/vda 0"
	mkfs.ext4 -q -F -b 4096 -E nodiscard /dev/mapper/fl
	mkdir -p $mnt
	mount -t ext4 /dev/mapper/fl $mnt
}

# A fresh copy of /host/$1 as $mnt/$2, zero-filled to 24 MiB
fresh() {
	setup_fs
	cp "/host/$1" "$mnt/$2"
	dd if=/dev/zero of="$mnt/$2" bs=1M seek=2 count=22 conv=notrunc 2>/dev/null
	qemu-img convert -f qcow2 -O raw "$mnt/$2" "/tmp/$2.orig"
	sync
}

# fault_on FILE error|flakey: the blocks of FILE fail; fault_off: they work
fault_on() {
	filefrag -e "$1" >/tmp/frag
	awk -v total="$sectors" -v kind="$2" '
		/blocks of [0-9]+ bytes/ { for (i = 1; i < NF; i++) if ($i == "of") bs = $(i + 1) }
		/^ *[0-9]+:/ {
			gsub(/\.\./, " "); gsub(/:/, " ")
			n++; start[n] = $4 * bs / 512; len[n] = ($5 - $4 + 1) * bs / 512
		}
		function piece(s, l, k) {
			if (l <= 0) return
			if (k == "linear") print s, l, "linear /dev/vda", s
			else if (k == "error") print s, l, "error"
			else print s, l, "flakey /dev/vda", s, 1, 1
		}
		END {
			if (!n) exit 1
			# extents in disk order
			for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
				if (start[j] < start[i]) { t = start[i]; start[i] = start[j]; start[j] = t; t = len[i]; len[i] = len[j]; len[j] = t }
			pos = 0
			for (i = 1; i <= n; i++) { piece(pos, start[i] - pos, "linear"); piece(start[i], len[i], kind); pos = start[i] + len[i] }
			piece(pos, total - pos, "linear")
		}' /tmp/frag >/tmp/fault.table || { echo "no extents for $1"; cat /tmp/frag; return 1; }
	swap_table /tmp/fault.table
}

fault_off() {
	echo "0 $sectors linear /dev/vda 0" >/tmp/fault.table
	swap_table /tmp/fault.table
}

swap_table() {
	dmsetup load fl /tmp/fault.table
	dmsetup suspend --nolockfs --noflush fl
	dmsetup resume fl
}

# After the fault: what the disk holds. check IMAGE LOG: no corruption, the
# flushed writes of LOG intact.
check_image() {
	umount $mnt
	mount -t ext4 /dev/mapper/fl $mnt
	rc=0
	qemu-img check "$mnt/$1" >/tmp/check.out 2>&1 || rc=$?
	case $rc in
	0) ;;
	3) echo "$1: $(grep -c 'Leaked cluster' /tmp/check.out) leaked clusters" ;;
	*) cat /tmp/check.out; echo "qemu-img check exit $rc"; return 1 ;;
	esac
	qemu-img convert -f qcow2 -O raw "$mnt/$1" /tmp/now.raw
	rw-workload verify "$2" "/tmp/$1.orig" /tmp/now.raw
	rm -f /tmp/now.raw "/tmp/$1.orig" "$mnt/$1"
}

# whether status shows the writer of mapping $1 broken (the daemon writes
# it within its 200 ms tick)
# Nothing of a closed mapping left: no dm device but fl, no NBD device
# connected, no daemon
mapping_gone() {
	case $(vm_dm_devices) in '' | fl) ;; *) echo "dm devices left:"; dmsetup ls; return 1 ;; esac
	for b in /sys/block/nbd*; do
		[ ! -e "$b/pid" ] || { echo "${b##*/} still connected"; return 1; }
	done
	! ps -o args | grep -v grep | grep -q '@qcowsetup-daemon' || sleep 1
	! ps -o args | grep -v grep | grep '@qcowsetup-daemon'
}

# the table swaps of the last `qcowsetup status` (remap rounds meanwhile)
swaps() {
	sed -n 's/.*, \([0-9]*\) table swaps.*/\1 table swaps/p' /tmp/status
}

# Close mapping $1 (the daemon's error at the close is expected).
close_mapping() {
	qcowsetup close "$1" && return 0
	dev=$(dmsetup info -c --noheadings -o blkdevname "$1")
	echo "$1 ($dev): open count $(dmsetup info -c --noheadings -o open "$1"), held by:"
	for f in /proc/[0-9]*/fd/*; do
		case $(readlink "$f") in "/dev/$dev" | "/dev/mapper/$1") ;; *) continue ;; esac
		echo "  $f: $(tr '\0' ' ' <"${f%/fd/*}/cmdline")"
	done
	ls /sys/block/"$dev"/holders
	sleep 2
	qcowsetup close "$1" || :
}

broken() {
	for t in 1 2 3 4 5; do
		qcowsetup status "$1" >/tmp/status
		! grep -q 'writer: *broken' /tmp/status || return 0
		[ "${2:-}" != now ] || return 1
		sleep 0.5
	done
	return 1
}

# The workload turns the fault on after the flush that covered its 8th write:
# the writes after it are in the page cache of the mapped device, and the
# next fsync meets the fault, on the fast path (the loop device), the slow
# path (the daemon's data and metadata), or both.
write_fault() {
	fresh plain.qcow2 w1.qcow2
	qcowsetup open $mnt/w1.qcow2 w1
	printf '#!/bin/sh\n[ "$3" -lt "$1" ] || exec /host/faults.sh fault-on %s "$2"\n' "$mnt/w1.qcow2" >/tmp/hook
	chmod +x /tmp/hook
	rc=0
	rw-workload write --seed 11 --ops 16 --max 262144 --flush-every 4 --log /tmp/w1.log \
		--after-flush "/tmp/hook 8 error" --region 2097152:12582912 /dev/mapper/w1 2>/tmp/err || rc=$?
	cat /tmp/err
	[ $rc = 1 ] && grep -q 'fsync' /tmp/err || { echo "the fsync after the fault did not fail (exit $rc)"; return 1; }
	echo "$(grep -c '^flushed' /tmp/w1.log) flushes acknowledged before the fault; broken: $(broken w1 now && echo yes || echo no)"
	# a write to a new cluster and its flush fail while the fault lasts
	if dd if=/dev/urandom of=/dev/mapper/w1 bs=65536 seek=240 count=1 oflag=direct conv=fsync 2>/dev/null; then
		echo "a write and its flush succeeded under the fault"; return 1
	fi
	broken w1 || { cat /tmp/status; echo "status does not show the broken writer"; return 1; }
	fault_off
	# broken for good: new clusters and flushes fail, reads go on
	if dd if=/dev/urandom of=/dev/mapper/w1 bs=65536 seek=241 count=1 oflag=direct conv=fsync 2>/dev/null; then
		echo "a write and its flush succeeded after the writer broke"; return 1
	fi
	dd if=/dev/mapper/w1 of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null
	# what the close cannot do (clear the dirty bit, truncate) it says
	close_mapping w1
	mapping_gone
	check_image w1.qcow2 /tmp/w1.log
}

# A write acknowledged, not flushed; the fault comes before the daemon's
# timed metadata writeback (every 200 ms). The writeback fails, the writer
# breaks, the next flush fails.
writeback_fault() {
	fresh plain.qcow2 w2.qcow2
	qcowsetup open $mnt/w2.qcow2 w2
	fault_on $mnt/w2.qcow2 error
	# (one request: a timed writeback between two would fail the second;
	# 4 KiB: the daemon writes it buffered, acknowledged before the fault
	# reaches the disk, while a whole cluster would go direct and fail now)
	dd if=/dev/zero of=/dev/mapper/w2 bs=4096 seek=3200 count=1 oflag=direct 2>/dev/null || {
		echo "a slow-path write failed before its writeback"; return 1; }
	sleep 1
	broken w2 || { cat /tmp/status; grep qcowsetup /tmp/messages | tail -5; echo "the writeback did not fail"; return 1; }
	if dd if=/dev/zero of=/dev/mapper/w2 bs=65536 seek=210 count=1 oflag=direct conv=fsync 2>/dev/null; then
		echo "a flush succeeded after the writeback failed"; return 1
	fi
	fault_off
	close_mapping w2
	mapping_gone
	printf 'seed 1\nwrite 1 13107200 4096\nwrite 2 13762560 65536\n' >/tmp/w2.log
	check_image w2.qcow2 /tmp/w2.log
}

# Reads fail while the fault lasts (the fast path, and compressed clusters
# through the daemon); the mapping goes on once it is lifted.
read_fault() {
	fresh compressed.qcow2 r.qcow2
	qcowsetup open $mnt/r.qcow2 r
	dd if=/dev/zero of=/dev/mapper/r bs=65536 seek=100 count=2 oflag=direct conv=fsync 2>/dev/null
	sleep 1	# remapped to the fast path
	echo 3 >/proc/sys/vm/drop_caches
	fault_on $mnt/r.qcow2 error
	if dd if=/dev/mapper/r of=/dev/null bs=65536 skip=100 count=1 iflag=direct 2>/dev/null; then
		echo "a fast-path read succeeded under the fault"; return 1
	fi
	if dd if=/dev/mapper/r of=/dev/null bs=65536 skip=2 count=1 iflag=direct 2>/dev/null; then
		echo "a compressed-cluster read succeeded under the fault"; return 1
	fi
	fault_off
	dd if=/dev/mapper/r of=/tmp/r.raw bs=1M iflag=direct 2>/dev/null
	! broken r now || { echo "read errors broke the writer"; return 1; }
	dd if=/dev/urandom of=/dev/mapper/r bs=65536 seek=150 count=1 oflag=direct conv=fsync 2>/dev/null ||
		{ echo "writes fail after the fault was lifted"; return 1; }
	qcowsetup close r
	mapping_gone
	# (rw-workload verify knows the data of its own writes only: these
	# count as unflushed, their bytes may hold anything)
	printf 'seed 1\nwrite 1 6553600 131072\nwrite 2 9830400 65536\n' >/tmp/r.log
	check_image r.qcow2 /tmp/r.log
}

# Faults that come and go (flakey, 1 s up, 1 s down) under a workload with
# a flush every 2 writes: errors land on data writes, metadata writebacks
# and reads, with table reloads (remap rounds) in flight.
flakey_fault() {
	for seed in 21 22; do
		fresh plain.qcow2 f$seed.qcow2
		qcowsetup open $mnt/f$seed.qcow2 f
		fault_on $mnt/f$seed.qcow2 flakey
		rc=0
		rw-workload write --seed $seed --ops 200 --max 131072 --flush-every 2 --log /tmp/f.log \
			--region 2097152:14680064 /dev/mapper/f 2>/tmp/err || rc=$?
		fault_off
		echo "seed $seed: $(grep -c '^write' /tmp/f.log) writes, $(grep -c '^flushed' /tmp/f.log) flushes acknowledged, exit $rc: $(tail -n 1 /tmp/err); broken: $(broken f now && echo yes || echo no); $(swaps)"
		close_mapping f
		mapping_gone
		check_image f$seed.qcow2 /tmp/f.log
	done
}

# No room while the refcount table grows. Images of 512-byte clusters and
# 64-bit refcounts: one refcount table cluster covers the first 2 MiB of
# the file, the table must grow past that. Sequential writes, each flushed
# (fsync), fill the image until a write fails; every completed write must be
# there afterwards, and nothing past the failed one changed.

# fill_up DEV: 1.75 MiB at once, then 256 KiB at a time (n: the writes of
# 256 KiB completed)
fill_up() {
	dd if=/dev/urandom of=/tmp/src bs=1M count=4 2>/dev/null
	dd if=/tmp/src of="$1" bs=262144 count=7 oflag=direct conv=notrunc,fsync 2>/dev/null
	n=7
	while [ $n -lt 16 ] && dd if=/tmp/src of="$1" bs=262144 skip=$n seek=$n count=1 \
		oflag=direct conv=notrunc,fsync 2>/tmp/err; do
		n=$((n + 1))
	done
	echo "$n writes of 256 KiB done, then: $(head -n 1 /tmp/err); $(qcowsetup status g >/tmp/status; swaps)"
	[ $n -lt 16 ] || { echo "the image did not fill up"; return 1; }
}

# check_filled IMAGE: consistent, the n writes there, zeros past the next
check_filled() {
	rc=0
	qemu-img check -f qcow2 "$1" >/tmp/check.out 2>&1 || rc=$?
	[ $rc = 0 ] || [ $rc = 3 ] || { cat /tmp/check.out; return 1; }
	qemu-img convert -f qcow2 -O raw "$1" /tmp/g.raw
	cmp -n $((n * 262144)) /tmp/src /tmp/g.raw || { echo "completed writes lost"; return 1; }
	[ "$(tail -c +$(((n + 1) * 262144 + 1)) /tmp/g.raw | tr -d '\000' | wc -c)" = 0 ] ||
		{ echo "bytes past the failed write changed"; return 1; }
	rm -f /tmp/src /tmp/g.raw
}

# On a block device that ends 2 clusters past 2 MiB: the larger table does
# not fit, the write fails before anything is written (no space), the
# writer goes on, the close is clean.
enospc_reftable_device() {
	qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 /tmp/g.qcow2 64M
	truncate -s $((2 * 1048576 + 1024)) /tmp/bd.img
	dd if=/tmp/g.qcow2 of=/tmp/bd.img conv=notrunc 2>/dev/null
	rm /tmp/g.qcow2
	bd=$(losetup -f --show /tmp/bd.img)
	qcowsetup open "$bd" g
	fill_up /dev/mapper/g
	grep -q 'no room for a larger refcount table' /tmp/messages ||
		{ grep qcowsetup /tmp/messages | tail -5; echo "the write did not fail at the refcount table's growth"; return 1; }
	! broken g now || { echo "no room broke the writer"; return 1; }
	dd if=/dev/mapper/g of=/dev/null bs=1M iflag=direct 2>/dev/null
	qcowsetup close g
	check_filled "$bd"
	losetup -d "$bd"
	rm -f /tmp/bd.img
	mapping_gone
}

# On a full file system: the image file has its blocks up to 2 MiB (zeros
# past the image), the rest of the file system is taken; the larger table
# is the first write past 2 MiB, and it fails (ENOSPC from ext4): the writer
# breaks. Room made again, the image is consistent.
enospc_reftable_fs() {
	truncate -s 16M /tmp/small.img
	mkfs.ext4 -q -F -b 1024 /tmp/small.img
	mkdir -p /mnt/s
	mount -o loop /tmp/small.img /mnt/s
	qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 /mnt/s/g.qcow2 64M
	dd if=/dev/zero of=/mnt/s/g.qcow2 bs=512 seek=$(($(stat -c %s /mnt/s/g.qcow2) / 512)) \
		count=$((4096 - $(stat -c %s /mnt/s/g.qcow2) / 512)) conv=notrunc 2>/dev/null
	dd if=/dev/zero of=/mnt/s/filler bs=65536 2>/dev/null || :
	dd if=/dev/zero of=/mnt/s/filler2 bs=1024 2>/dev/null || :
	sync
	qcowsetup open /mnt/s/g.qcow2 g
	fill_up /dev/mapper/g
	grep -q 'cannot write metadata at offset 0x200[0-9a-f]*: No space left' /tmp/messages ||
		{ grep qcowsetup /tmp/messages | tail -5; echo "the refcount table's growth did not meet the full file system"; return 1; }
	broken g || { cat /tmp/status; echo "status does not show the broken writer"; return 1; }
	rm /mnt/s/filler /mnt/s/filler2
	if dd if=/dev/zero of=/dev/mapper/g bs=65536 seek=100 count=1 oflag=direct conv=fsync 2>/dev/null; then
		echo "a write and its flush succeeded after the writer broke"; return 1
	fi
	close_mapping g
	umount /mnt/s
	mount -o loop /tmp/small.img /mnt/s
	check_filled /mnt/s/g.qcow2
	umount /mnt/s
	rm -f /tmp/small.img
	mapping_gone
}

# the workload's hook (before syslogd: a daemon started here would inherit
# the workload's descriptors)
if [ "${1:-}" = fault-on ]; then
	fault_on "$2" "$3"
	exit
fi
syslogd -O /tmp/messages 2>/dev/null || :
modprobe -q nbd 2>/dev/null
modprobe -q dm-flakey 2>/dev/null
vm_require filefrag rw-workload
vm_test "EIO under a workload: the fsync fails, the writer stays broken, the image is consistent" write_fault
vm_test "EIO during the timed metadata writeback: the next flush fails, the image is consistent" writeback_fault
vm_test "EIO on reads: the reads fail, the mapping goes on once the fault is lifted" read_fault
vm_test "EIO that comes and goes under load: consistent, flushed writes intact" flakey_fault
vm_test "no room for the larger refcount table on a block device: the write fails cleanly, the mapping goes on" enospc_reftable_device
vm_test "no room for the larger refcount table on a full file system: the writer breaks, the image is consistent" enospc_reftable_fs
umount $mnt 2>/dev/null
dmsetup remove fl 2>/dev/null
vm_assert_clean >/dev/null || vm_test "no device left" vm_assert_clean
vm_summary
