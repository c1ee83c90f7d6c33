#!/bin/bash
# Automake test: every power cut of a workload, not a sample of moments. In
# the VM (tests/vm/guest/logwrites.sh) the ext4 filesystem holding the image
# sits on a dm-log-writes device that records every write, flush and FUA
# reaching the disk; rw-workload writes through qcowsetup (first writes that
# allocate, overwrites, an fsync of the mapped device every 4 writes) and the
# log is marked after each fsync with what it acknowledged. The log is then
# replayed onto a scratch disk up to each point; at each one ext4 recovers
# its journal, `qemu-img check` finds no corruption (leaks are allowed) and
# the image, read by QEMU and through a read-only qcowsetup mapping, holds
# every write acknowledged by a completed flush, while nothing outside the
# written areas changed.
#   make check          one workload (a fresh LUKS image), all its flush marks
#   QS_LOGWRITES_FULL=1 the campaign: also an overlay over a backing file, a
#                       lazy-refcounts image, compressed clusters rewritten, a
#                       LUKS image written straight on a block device (no
#                       filesystem between) and a table split into segment
#                       devices (--max-targets 16) while clusters are
#                       remapped; twice the writes; every flush/FUA entry of
#                       the log and a sampled point between each two
# One VM boot per workload (fresh disks). QS_LOGWRITES_WORKLOADS: the
# workloads to run (of luks overlay lazy compressed blockdev segmented; the
# default above);
# QS_LOGWRITES_SEED: the workload's seed (default 1). Exit: 0 pass, 1 fail,
# 77 skip.
set -eu
me=test-logwrites
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon
workload=$builddir/tests/vm/prog/rw-workload
replay=$builddir/tests/vm/prog/log-replay
full=${QS_LOGWRITES_FULL:-}
[ "$full" != 0 ] || full=

need_vm
need qemu-img qemu-io truncate
for f in "$qs" "$daemon" "$workload" "$replay"; do need_built "$f"; done

make_work
mkdir "$work/share"
guest_script logwrites "$work/share"

# ---- images (16 MiB), made with QEMU's tools
cd "$work/share"
printf 'correct horse' >pass
qio() { qemu-io -f qcow2 "$@" >/dev/null; }
# (PBKDF timing fails now and then on a loaded machine: "Unable to get accurate CPU usage")
# iter-time 1 ms: every point unlocks the image three times (qemu-img check,
# convert, qcowsetup), and the iterations QEMU counts in 100 ms on the host
# (~330,000) take 10-25 s in the VM through libcryptsetup's OpenSSL backend
retry 6 qemu-img create -q -f qcow2 --object secret,id=s0,file=pass \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1 luks.qcow2 16M ||
	hard_error "cannot create a LUKS image"
workloads=luks
if [ -n "$full" ] || [ -n "${QS_LOGWRITES_WORKLOADS:-}" ]; then
	[ -z "$full" ] || workloads="luks overlay lazy compressed blockdev segmented"
	qemu-img create -q -f raw base.raw 16M
	qemu-io -f raw -c 'write -P 0x41 0 16M' base.raw >/dev/null
	qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2 16M
	qio -c 'write -P 0x42 2M 1M' overlay.qcow2
	qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 16M
	qio -c 'write -P 0x91 0 2M' lazy.qcow2
	qemu-img create -q -f raw c.src 16M
	qemu-io -f raw -c 'write -P 0x21 0 6M' -c 'write -P 0x22 10M 4M' c.src >/dev/null
	qemu-img convert -q -c -O qcow2 c.src compressed.qcow2
	rm c.src
	# every other cluster of the first 8 MiB allocated: 129 runs
	qemu-img create -q -f qcow2 segmented.qcow2 16M
	cmds=()
	for ((i = 0; i < 64; i++)); do cmds+=(-c "write -P 0x$((i % 9 + 1))3 $((i * 131072)) 4k"); done
	qio "${cmds[@]}" segmented.qcow2
fi
cd "$work"

workloads=${QS_LOGWRITES_WORKLOADS:-$workloads}
rc=0 skips=0 n=0
for w in $workloads; do
	n=$((n + 1)) r=0
	rm -f data.img log.img scratch.img
	truncate -s 160M data.img scratch.img
	truncate -s 2G log.img
	out=$("$here/bed/run-vm.sh" --share "$work/share" --mem 1536 \
		--disk "$work/data.img" --disk "$work/log.img" --disk "$work/scratch.img" \
		--extra "$qs" --extra "$daemon" --extra "$workload" --extra "$replay" \
		--timeout "${QS_LOGWRITES_TIMEOUT:-1500}" ${QS_VERBOSE:+--env QS_VERBOSE=1} \
		-- logwrites.sh "$w" "${QS_LOGWRITES_SEED:-1}" ${full:+full} 2>&1) || r=$?
	echo "$out" | grep -E '^(PASS|FAIL|SKIP|logwrites|    \||[0-9]+ passed|run-vm)' || echo "$out" | tail -30
	case $r in
	0) ;;
	77) skips=$((skips + 1)); continue ;;
	*) rc=1 ;;
	esac
	echo "$out" | grep -q '^logwrites .* flush points replayed' || { echo "FAIL: $w: no replay summary"; rc=1; }
done
[ "$rc" != 0 ] || [ "$skips" != "$n" ] || exit 77
exit $rc
