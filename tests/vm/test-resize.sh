#!/bin/bash
# Automake test: `qcowsetup resize` on live read-write mappings through the
# real kernel (the VM test bed). On the host: images made by qemu-img (an
# unencrypted one, LUKS ones, an overlay smaller than its backing file, small
# ones for the shrinks, a fragmented one) on an ext4 disk. In the VM
# (tests/vm/guest/resize.sh): each is mapped with a mounted ext4 on it,
# resized while mounted and the filesystem grown with resize2fs (LUKS: to
# three times its size and filled past the room its crypt device covered,
# which takes the passphrase; a wrong one is refused with exit 2, a failed
# crypt table reload is undone); the new area over a backing file reads zeros; shrinks are
# refused past allocated clusters (exit 1, one line) and done past
# unallocated space; a read-only mapping is refused; the overlay's daemon
# killed while suspended: its backing file's loop device and lock stay,
# resume and reattach bring daemons back; fio --verify runs on a LUKS
# mapping across suspend/resume, refresh --allow-discards and resize, and
# verifies the image's content after close; a failure injected at each
# step of the daemon's resize leaves the mapping working at its old size.
# After each close `qemu-img info` shows the new size, `qemu-img check` is
# clean and `qemu-img convert` reads what the device showed.
# QS_LIVE_FULL=1: a failure at each step of a LUKS grow past its room and
# of a shrink, a mapping split into segment devices (--max-targets 16)
# grown and shrunk, four rounds of the verbs under fio.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU system emulator, kernel, qemu-img).
set -eu
me=test-resize
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon

need_vm
need qemu-img qemu-io
for f in "$qs" "$daemon"; do need_built "$f"; done

make_work
mkdir "$work/m" "$work/share"
guest_script resize "$work/share"

cd "$work/m"
printf 'correct horse' >pass
sec=(--object secret,id=s0,file=pass)
qemu-img create -q -f qcow2 plain.qcow2 16M
# (PBKDF timing fails now and then on a loaded machine)
for try in 1 2 3 4 5 6; do
	qemu-img create -q -f qcow2 "${sec[@]}" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
		luks.qcow2 16M 2>/dev/null && break
	[ $try = 6 ] && { echo "$me: error: cannot create a LUKS image" >&2; exit 99; }
done
qemu-img create -q -f raw base.raw 24M
qemu-io -f raw -c 'write -P 0x41 0 24M' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw over.qcow2 8M
qemu-img create -q -f qcow2 small.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x51 0 1M' -c 'write -P 0x52 15M 64k' small.qcow2 >/dev/null
qemu-img create -q -f qcow2 small2.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x53 0 1M' small2.qcow2 >/dev/null
cp small2.qcow2 small3.qcow2
cp luks.qcow2 luks-fio.qcow2
cp luks.qcow2 luks-fault.qcow2
# every other cluster of the first 4M: ~64 targets, segments at 16
qemu-img create -q -f qcow2 seg.qcow2 16M
args=()
for ((i = 0; i < 64; i += 2)); do args+=(-c "write -P $((0x60 + i)) $((i * 64))k 64k"); done
qemu-io -f qcow2 "${args[@]}" seg.qcow2 >/dev/null
cd "$work"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 512M
rm -rf "$work/m"

"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1024 \
	--extra "$qs" --extra "$daemon" \
	--timeout "${QS_RESIZE_TIMEOUT:-900}" ${QS_VERBOSE:+--env QS_VERBOSE=1} \
	${QS_LIVE_FULL:+--env QS_LIVE_FULL=$QS_LIVE_FULL} -- resize.sh
