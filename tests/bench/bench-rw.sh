#!/bin/bash
# Write benchmark of read-write mappings (issue 4), in one VM run (TCG:
# ratios matter, not absolute numbers):
#   - first writes into an empty LUKS image, 1 MiB sequential and 4 KiB
#     random (fio, direct I/O): qcowsetup (allocation through the daemon,
#     then the fast path) vs qemu-nbd (QEMU's qcow2 driver, kernel NBD);
#   - writes to allocated clusters: qcowsetup's fast path vs a raw dm-crypt
#     over a loop device;
#   - the daemon's table swaps: how long I/O was held (p99, max).
#   tests/bench/bench-rw.sh [SECONDS-PER-JOB]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
bld=${top_builddir:-$top}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/qs-bench-rw.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/m" "$work/share"
cp "$here/bench-rw-guest.sh" "$work/share/"
chmod +x "$work/share/bench-rw-guest.sh"
cd "$work/m"
printf 'bench passphrase' >key
sec=(--object secret,id=s0,file=key)
for i in 1 2 3 4 5 6; do
	qemu-img create -q -f qcow2 "${sec[@]}" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 empty.qcow2 512M 2>/dev/null && break
done
for i in 1 2 3 4 5 6; do
	qemu-img create -q -f qcow2 "${sec[@]}" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100,preallocation=falloc full.qcow2 512M 2>/dev/null && break
done
truncate -s 512M full.raw
fallocate -l 512M full.raw
cd "$work"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 3G
"$here/../vm/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1536 \
	--extra "$bld/qcowsetup" --extra "$bld/qcowsetup-daemon" --timeout 3000 \
	--env "BENCH_RUNTIME=${1:-15}" -- bench-rw-guest.sh | grep '^BENCH'
