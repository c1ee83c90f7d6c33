#!/bin/bash
# Automake test: `qcowsetup resize` on live read-write mappings through the
# real kernel (the VM test bed). On the host: images made by qemu-img (an
# unencrypted one, a LUKS one, an overlay smaller than its backing file, a
# small one for the shrinks) on an ext4 disk. In the VM
# (tests/vm/guest/resize.sh): each is mapped with a mounted ext4 on it,
# resized while mounted and the filesystem grown with resize2fs; the new
# area over a backing file reads zeros; shrinks are refused past allocated
# clusters (exit 1, one line) and done past unallocated space; a read-only
# mapping is refused; a failure injected at each step of the daemon's resize
# leaves the mapping working at its old size; after close `qemu-img info`
# shows the new size, `qemu-img check` is clean and `qemu-img convert` reads
# what the device showed.
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
cd "$work"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 256M
rm -rf "$work/m"

"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1024 \
	--extra "$qs" --extra "$daemon" \
	--timeout "${QS_RESIZE_TIMEOUT:-900}" ${QS_VERBOSE:+--env QS_VERBOSE=1} -- resize.sh
