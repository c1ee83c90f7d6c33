#!/bin/bash
# Automake test: live verbs on mapped images through the real kernel (the VM
# test bed): suspend, resume and refresh. On the host: a LUKS image, an
# unencrypted one and a backing chain, made by qemu-img and qemu-io, on an
# ext4 disk. In the VM (tests/vm/guest/live.sh), for LUKS read-write, LUKS
# read-only, unencrypted and chain mappings: I/O issued while suspended is
# held and completes after resume with the right data; no key in
# `dmsetup table --showkeys` or /proc/keys while suspended; a wrong
# passphrase leaves it suspended; the daemon killed while suspended leaves it
# suspended and resume starts a new one; refresh switches discards; a
# failure injected at each step of suspend, resume and refresh
# (--debug-fail-step) is undone; after close `qemu-img check` is clean and
# the content equals the reference. snapshot of a LUKS mapping under a
# mounted ext4 with fio writing and verifying across it: one failure
# injected after the old daemon left is undone (tables as before, no
# overlay); then the overlay is LUKS, the stack is what open builds, the
# old image is clean, read-only to QEMU and holds the filesystem as it was;
# after close both images check clean with the right files. commit: a LUKS
# overlay over a raw base committed while an ext4 on it is written (first
# a commit failed halfway through the copy: undone, the mapping on the
# overlay), an unencrypted overlay into a LUKS qcow2 base; the base alone
# converts to what the guest saw, `qemu-img check` clean, the overlay
# unlocked and clean; a base mapped elsewhere refuses the commit (exit 5).
# QS_LIVE_FULL=1 adds snapshots of unencrypted and chain mappings and a
# failure at each step of snapshot (LUKS, chain), the other commit pairs
# (LUKS and unencrypted overlays over an unencrypted qcow2 base) and a
# failure at every step of commit for each pair, and the chain's fault
# injection, refresh of a read-only LUKS mapping, and suspend/resume and
# refresh of an unencrypted mapping (the chain's cases cover that path).
# Exit: 0 pass, 1 fail, 77 skip (no QEMU system emulator, kernel, qemu-img).
set -eu
me=test-live
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon
workload=$builddir/tests/vm/prog/rw-workload

need_vm
need qemu-img qemu-io
for f in "$qs" "$daemon" "$workload"; do need_built "$f"; done

make_work
mkdir "$work/m" "$work/share"
guest_script live "$work/share"

cd "$work/m"
printf 'correct horse' >pass
sec=(--object secret,id=s0,file=pass)
retry 6 qemu-img create -q -f qcow2 "${sec[@]}" \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 luks.qcow2 32M
qemu-io "${sec[@]}" --image-opts -c 'write -P 0x31 0 4M' -c 'write -z 10M 1M' \
	driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0 >/dev/null
qemu-img create -q -f qcow2 plain.qcow2 32M
qemu-img create -q -f qcow2 empty.qcow2 32M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -z 8M 1M' plain.qcow2 >/dev/null
qemu-img create -q -f raw base.raw 24M
qemu-io -f raw -c 'write -P 0x41 0 24M' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 28M
qemu-io -f qcow2 -c 'write -P 0x42 4M 4M' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain.qcow2 32M
qemu-io -f qcow2 -c 'write -P 0x43 6M 1M' chain.qcow2 >/dev/null
# commit: overlays over a raw, a LUKS qcow2 and an unencrypted qcow2 base
qemu-img create -q -f raw cbase.raw 16M
qemu-io -f raw -c 'write -P 0x51 0 16M' cbase.raw >/dev/null
retry 6 qemu-img create -q -f qcow2 "${sec[@]}" \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 cbase-luks.qcow2 16M
qemu-io "${sec[@]}" --image-opts -c 'write -P 0x52 0 8M' -c 'write -z 12M 1M' \
	driver=qcow2,file.filename=cbase-luks.qcow2,encrypt.key-secret=s0 >/dev/null
qemu-img create -q -f qcow2 cbase-plain.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x53 0 8M' cbase-plain.qcow2 >/dev/null
for pair in cluks-over-raw:cbase.raw:raw cluks-over-plain:cbase-plain.qcow2:qcow2 \
	cluks-over-luks:cbase-luks.qcow2:qcow2; do
	IFS=: read -r ov base fmt <<<"$pair"
	retry 6 qemu-img create -q -f qcow2 "${sec[@]}" -b "$base" -F "$fmt" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$ov.qcow2" 16M 2>/dev/null
	bsec=
	case $base in *luks*) bsec=,backing.encrypt.key-secret=s0 ;; esac
	qemu-io "${sec[@]}" --image-opts -c 'write -P 0x61 2M 2M' -c 'write -z 6M 1M' \
		"driver=qcow2,file.filename=$ov.qcow2,encrypt.key-secret=s0$bsec" >/dev/null
done
qemu-img create -q -f qcow2 -b cbase-luks.qcow2 -F qcow2 cplain-over-luks.qcow2 16M 2>/dev/null
qemu-img create -q -f qcow2 -b cbase-plain.qcow2 -F qcow2 cplain-over-plain.qcow2 16M
qemu-io "${sec[@]}" --image-opts -c 'write -P 0x62 2M 2M' -c 'write -z 6M 1M' \
	driver=qcow2,file.filename=cplain-over-luks.qcow2,backing.encrypt.key-secret=s0 >/dev/null
qemu-io -f qcow2 -c 'write -P 0x62 2M 2M' -c 'write -z 6M 1M' cplain-over-plain.qcow2 >/dev/null
cd "$work"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 512M
rm -rf "$work/m"

"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1024 \
	--extra "$qs" --extra "$daemon" --extra "$workload" \
	--timeout "${QS_LIVE_TIMEOUT:-600}" ${QS_VERBOSE:+--env QS_VERBOSE=1} \
	${QS_LIVE_FULL:+--env QS_LIVE_FULL=$QS_LIVE_FULL} -- live.sh
