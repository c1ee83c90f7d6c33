#!/bin/bash
# Guest side of tests/bench/bench-rw.sh (runs in the VM test bed, /dev/vda:
# an ext4 disk with key, empty.qcow2 (LUKS, empty), full.qcow2 (LUKS, every
# cluster allocated) and full.raw). Prints "BENCH ..." lines:
#   BENCH first-write DEV seq1M KiB/s  rand4k IOPS   (empty image: allocation)
#   BENCH allocated DEV seq1M KiB/s  rand4k IOPS     (every cluster allocated)
#   BENCH reload ...                                  (the daemon's table swaps)
set -u
rt=${BENCH_RUNTIME:-15}
mnt=/mnt/b
mkdir -p $mnt && mount -t ext4 /dev/vda $mnt || exit 1
cd $mnt
export PATH=/usr/local/bin:$PATH
modprobe -q nbd; modprobe -q dm-crypt
sec="--object secret,id=s0,file=$mnt/key"

fio_job() {	# dev rw bs iodepth -> "KiB/s IOPS"
	fio --name=j --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --direct=1 --ioengine=libaio \
		--time_based --runtime="$rt" --size=400M --randrepeat=0 --norandommap \
		--output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{ print $48, $49 }'
}

fresh() { cp --sparse=always empty.qcow2 "$1"; sync; }

# ---- first writes into an empty image: qcowsetup vs qemu-nbd
for test in seq rand; do
	case $test in seq) rw=write bs=1M qd=4 ;; rand) rw=randwrite bs=4k qd=16 ;; esac
	fresh t.qcow2
	qcowsetup open --key-file key t.qcow2 bq
	read -r bw iops <<< "$(fio_job /dev/mapper/bq $rw $bs $qd)"
	echo "BENCH first-write qcowsetup $test $bs: $bw KiB/s $iops IOPS"
	qcowsetup status bq | grep remapped | sed 's/^ */BENCH reload after first-write '"$test"': /'
	qcowsetup close bq
	qemu-img check $sec --image-opts "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s0" >/dev/null ||
		echo "BENCH error: check after the qcowsetup run"
	fresh t.qcow2
	qemu-nbd $sec --image-opts "driver=qcow2,file.filename=$mnt/t.qcow2,encrypt.key-secret=s0" -c /dev/nbd15
	sleep 1
	read -r bw iops <<< "$(fio_job /dev/nbd15 $rw $bs $qd)"
	echo "BENCH first-write qemu-nbd $test $bs: $bw KiB/s $iops IOPS"
	qemu-nbd -d /dev/nbd15 >/dev/null
done

# ---- writes to allocated clusters: qcowsetup's fast path vs raw dm-crypt
qcowsetup open --key-file key full.qcow2 bf
hexkey=$(od -An -tx1 -N 64 /dev/urandom | tr -d ' \n')
loop=$(losetup --direct-io=on -f --show full.raw)
dmsetup create braw --table "0 $(blockdev --getsz "$loop") crypt aes-xts-plain64 $hexkey 0 $loop 0"
for test in seq rand; do
	case $test in seq) rw=write bs=1M qd=4 ;; rand) rw=randwrite bs=4k qd=16 ;; esac
	for dev in /dev/mapper/bf /dev/mapper/braw; do
		read -r bw iops <<< "$(fio_job $dev $rw $bs $qd)"
		echo "BENCH allocated $(basename $dev) $test $bs: $bw KiB/s $iops IOPS"
	done
done
echo "BENCH targets of bf: $(dmsetup table bf | wc -l) (slow-path targets: $(dmsetup table bf | grep -c ' 43:'))"
qcowsetup close bf
dmsetup remove braw
losetup -d "$loop"
