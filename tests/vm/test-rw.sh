#!/bin/bash
# Automake test: read-write mappings through the real kernel (the VM test
# bed): random writes checked against QEMU. On the host: images made by qemu-img and
# qemu-io (data, zero clusters, compressed clusters, snapshots, subclusters,
# backing chains, external data files, LUKS, 512 B and 2 MiB clusters) on an
# ext4 disk. In the VM (tests/vm/guest/rw.sh):
#   matrix   seeded random writes (512 B .. 4 MiB, aligned and not) to
#            /dev/mapper/NAME and to a raw reference; after close
#            `qemu-img compare` identical and `qemu-img check` clean;
#            3 NBD connections under fio (2 jobs, QD16, verified);
#            compressed clusters read-only; interop with qemu-io both ways;
#            QEMU-compatible locks both ways; corrupt bit, full filesystem
#            (ENOSPC) and read-only file; the daemon killed (SIGKILL) once
#            and reattached;
#   kill     QS_RW_KILL_RUNS (default 0) more daemon kills (SIGKILL under load)
#   crash    QS_RW_CRASH_RUNS runs (default 1; QS_RW_SKIP_MATRIX=1 for crash
#            runs only): a writer logs what it saw
#            flushed, the VM dies at a random moment (sysrq b); the next boot
#            checks the image (`qemu-img check`: no corruption) and that every
#            flushed write reads back.
# QS_RW_FULL=1 adds what repeats the cases above with other random numbers:
# a second seed of the plain and the LUKS workloads, 3 daemon kills in the
# matrix instead of 1, 3 crash runs instead of 1 (each a VM boot); and the
# 2 MiB-cluster workload (c2m; test-matrix reads such images in make check).
# Exit: 0 pass, 1 fail, 77 skip (no QEMU system emulator, kernel, qemu-img).
set -eu
me=test-rw
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon
workload=$builddir/tests/vm/prog/rw-workload
runs=${QS_RW_CRASH_RUNS:-${QS_RW_FULL:+3}}
runs=${runs:-1}

need_vm
need qemu-img qemu-io
for f in "$qs" "$daemon" "$workload"; do need_built "$f"; done

make_work
mkdir "$work/m" "$work/share"
guest_script rw "$work/share"

# ---- images (NAME FORMAT-NOTE), made with QEMU's tools
cd "$work/m"
printf 'correct horse' >pass
sec=(--object secret,id=s0,file=pass)
qio() { qemu-io -f qcow2 "$@" >/dev/null; }
mixed() {	# image: data, zero (plain, preallocated), discarded, snapshot-shared
	qio -c 'write -P 0x11 0 6M' -c 'write -P 0x12 9M 3M' -c 'write -z 12M 2M' \
		-c 'write -z -u 20M 1M' -c 'discard 2M 512k' "$1"
	qemu-img snapshot -c s1 "$1"
	qio -c 'write -P 0x13 4M 1M' "$1"
}
# compressed: compressible data converted with -c, then written to
qemu-img create -q -f raw c.src 64M
qemu-io -f raw -c 'write -P 0x21 0 8M' -c 'write -P 0x22 16M 8M' c.src >/dev/null
qemu-img convert -q -c -O qcow2 c.src compressed.qcow2
rm c.src
# (the snapshot ends the unaligned file: a table without trailing padding)
qemu-img snapshot -c s1 compressed.qcow2
qio -c 'write -P 0x23 1M 1M' -c 'write -z 30M 1M' compressed.qcow2
qemu-img create -q -f qcow2 plain.qcow2 64M
mixed plain.qcow2
# (PBKDF timing fails now and then on a loaded machine: "Unable to get accurate CPU usage")
for try in 1 2 3 4 5 6; do
	qemu-img create -q -f qcow2 "${sec[@]}" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
		luks.qcow2 64M 2>/dev/null && break
	[ $try = 6 ] && { echo "$me: error: cannot create a LUKS image" >&2; exit 99; }
done
qemu-io "${sec[@]}" --image-opts -c 'write -P 0x31 0 6M' -c 'write -z 10M 1M' \
	driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0 >/dev/null
qemu-img create -q -f raw base.raw 48M
qemu-io -f raw -c 'write -P 0x41 0 48M' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 56M
qio -c 'write -P 0x42 4M 4M' -c 'write -z 20M 2M' mid.qcow2
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain.qcow2 64M
qio -c 'write -P 0x43 6M 1M' chain.qcow2
qemu-img create -q -f qcow2 -b base.raw -F raw -o extended_l2=on,cluster_size=128k extl2.qcow2 64M
qio -c 'write -P 0x51 8k 4k' -c 'write -z 200k 8k' -c 'write -P 0x52 1M 300k' extl2.qcow2
qemu-img create -q -f qcow2 -o data_file=datafile.data datafile.qcow2 64M
qio -c 'write -P 0x61 0 2M' -c 'write -z 8M 1M' datafile.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 32M
qio -c 'write -P 0x71 0 1M' c512.qcow2
qemu-img create -q -f qcow2 -o cluster_size=2M -b base.raw -F raw c2m.qcow2 64M
qio -c 'write -P 0x81 3M 1M' c2m.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 64M
qio -c 'write -P 0x91 0 2M' lazy.qcow2
cp plain.qcow2 crash.qcow2
cat >manifest <<'EOF'
plain	-
compressed	-
luks	pass
chain	-
extl2	-
datafile	-
c512	-
lazy	-
EOF
[ -z "${QS_RW_FULL:-}" ] || printf 'c2m\t-\n' >>manifest
cd "$work"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 2G
rm -rf "$work/m"

vm() {	# timeout, guest args...
	local t=$1
	shift
	"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1536 \
		--extra "$qs" --extra "$daemon" --extra "$workload" \
		--timeout "$t" ${QS_VERBOSE:+--env QS_VERBOSE=1} ${QS_RW_FULL:+--env QS_RW_FULL=1} \
		-- rw.sh "$@"
}

rc=0
if [ -z "${QS_RW_SKIP_MATRIX:-}" ]; then
	vm "${QS_RW_TIMEOUT:-3000}" matrix || rc=1
fi

# crash runs: each boot verifies the previous run, then starts the next one
# and dies at a random moment
if [ "$runs" -gt 0 ]; then
	for i in $(seq 1 "$runs"); do
		delay=$(( (RANDOM % 200) + 10 ))	# tenths of a second into the workload
		out=$(vm 900 crash "$i" "$delay" 2>&1) || true
		echo "$out" | grep -E '^(PASS|FAIL|SKIP|crash|QS-CRASHING)' || true
		echo "$out" | grep -q '^FAIL' && rc=1
		echo "$out" | grep -q 'QS-CRASHING' || { echo "FAIL: crash run $i: the VM did not reach the crash"; echo "$out" | tail -20; rc=1; }
		echo "$out" | grep -q 'QS-EXIT=' && { echo "FAIL: crash run $i: the VM did not die"; rc=1; }
	done
	out=$(vm 900 crash-verify 2>&1) || true
	echo "$out" | grep -E '^(PASS|FAIL|SKIP|crash run)' || true
	echo "$out" | grep -q '^FAIL' && rc=1
fi
# the daemon killed (SIGKILL) under load, QS_RW_KILL_RUNS times (default 0:
# the matrix kills it 3 times already)
if [ "${QS_RW_KILL_RUNS:-0}" -gt 0 ]; then
	vm $((QS_RW_KILL_RUNS * 60 + 300)) daemon-kill "$QS_RW_KILL_RUNS" || rc=1
fi
exit $rc
