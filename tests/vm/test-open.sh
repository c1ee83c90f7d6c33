#!/bin/bash
# Automake test: `qcowsetup open --readonly` through the real kernel (the VM
# test bed). On the host: the engine's image matrix with its qemu-img
# oracles (md5 of `qemu-img convert -O raw`); in the VM: guest/open.sh maps
# every image and compares, then checks wrong keys, atomicity under fault
# injection at every step, busy devices and QEMU-compatible locks.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU system emulator or kernel), 99 error.
set -eu
me=test-open
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
need_vm
need qemu-img
need_built "$qs"
make_work
matrix_images "$work/m" >"$work/gen.log" 2>&1 || { tail -20 "$work/gen.log"; exit 99; }
cd "$work/m"
# (hard links to the shared matrix: the manifest grows below, so a copy)
cp manifest.tsv manifest.new && mv manifest.new manifest.tsv
# snapshot oracle: the first snapshot of the snapshot image
qemu-img convert -l snapshot.name=snap1 -O raw snap-c64k.qcow2 snap1.raw
md5sum <snap1.raw | cut -d' ' -f1 >oracle/snap-c64k@snap1.md5
rm -f snap1.raw
# Issue 6's acceptance: legacy and unencrypted images converted to LUKS by
# `qcowsetup convert` map to the same bytes as their sources.
for src in aes-qcow2:aes-qcow2.qcow2:pass.key aes-qcow:aes-qcow.qcow:pass.key \
	c64k-v3:c64k-v3.qcow2:- chain-q1-top:chain-q1/top.qcow2:-; do
	IFS=: read -r name path secret <<<"$src"
	keyopt=()
	[ "$secret" = - ] || keyopt=(--key-file "$secret")
	# the chain: its data copied in (the VM sees the files under another path)
	[ "$name" != chain-q1-top ] || keyopt+=(--flatten)
	"$qs" convert "${keyopt[@]}" --new-key-file pass.key --pbkdf-force-iterations 1000 --quiet \
		"$path" "conv-$name.qcow2" || { echo "$me: convert of $path failed" >&2; exit 1; }
	cp "oracle/$name.md5" "oracle/conv-$name.md5"
	printf 'conv-%s\tconv-%s.qcow2\tqcow2\tpass.key\tqcow2,v3,encrypted,luks,converted\n' "$name" "$name" >>manifest.tsv
done

# The images live on ext4 on a virtio disk in the VM, as they would on a
# host (9p has no O_DIRECT and no OFD locks worth testing).
mkdir "$work/share"
guest_script open "$work/share"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 1G
rm -rf "$work/m"
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --extra "$qs" \
	--timeout "${QS_OPEN_TIMEOUT:-1500}" ${QS_VERBOSE:+--env QS_VERBOSE=1} -- open.sh
