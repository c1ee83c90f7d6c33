#!/bin/bash
# Automake test: I/O errors under a read-write mapping. In the VM
# (tests/vm/guest/faults.sh) the ext4 file system holding the image sits on
# a dm device whose table is swapped, at chosen moments, for one that fails
# the image file's blocks (the error target; flakey for faults that come and
# go): under a workload (the next fsync fails), before the daemon's timed
# metadata writeback (the writer breaks: new clusters and flushes fail for
# good, status says so), on reads (they fail; the mapping goes on once the
# fault is lifted), and intermittently under load with table reloads in
# flight. Then no room while the refcount table grows (512-byte clusters):
# at the end of a block device (the write fails, the mapping goes on) and on
# a full file system (the writer breaks). After each: the file system
# mounted again, `qemu-img check` finds no corruption and every write
# acknowledged by a completed flush reads back. (No room at a plain
# allocation: test-rw.sh, guest/rw.sh enospc.) Exit: 0 pass, 1 fail, 77 skip.
set -eu
me=test-faults
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon
workload=$builddir/tests/vm/prog/rw-workload

need_vm
need qemu-img qemu-io truncate
filefrag=$(PATH=$PATH:/usr/sbin:/sbin command -v filefrag) || skip_test "filefrag (e2fsprogs) not found"
for f in "$qs" "$daemon" "$workload"; do need_built "$f"; done

make_work
mkdir "$work/share"
guest_script faults "$work/share"
cd "$work/share"
# 16 MiB images: data in the first 2 MiB; compressed clusters at 0-6 MiB
# and 10-14 MiB
qemu-img create -q -f qcow2 plain.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x5a 0 2M' plain.qcow2 >/dev/null
qemu-img create -q -f raw c.src 16M
qemu-io -f raw -c 'write -P 0x21 0 6M' -c 'write -P 0x22 10M 4M' c.src >/dev/null
qemu-img convert -q -c -O qcow2 c.src compressed.qcow2
rm c.src
cd "$work"
truncate -s 256M disk.img
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" \
	--extra "$qs" --extra "$daemon" --extra "$workload" --extra "$filefrag" \
	--timeout "${QS_FAULTS_TIMEOUT:-900}" ${QS_VERBOSE:+--env QS_VERBOSE=1} -- faults.sh
