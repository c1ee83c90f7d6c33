#!/bin/bash
# Automake test: many read-write mappings per host (a hypervisor). In the VM
# (tests/vm/guest/scale.sh) 5 mappings (LUKS and unencrypted, small empty
# images) are opened, written and closed one by one; the qcowsetup-daemon
# processes (guardians included) must hold at most 4 MiB locked memory and
# 8 MiB RSS per mapping (/proc/PID/status VmLck and VmRSS, summed), in at
# most 2 processes per mapping, and the images stay clean. The 100-mapping
# curve of open and close times is tests/bench/bench-scale.sh.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU system emulator, kernel, qemu-img).
set -eu
me=test-scale
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon
n=${QS_SCALE_N:-5}

need_vm
need qemu-img
for f in "$qs" "$daemon"; do need_built "$f"; done

make_work
mkdir "$work/m" "$work/share"
guest_script scale "$work/share"
"$top/tests/vm/gen-scale.sh" "$work/m" || hard_error "cannot create the images"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 1G
rm -rf "$work/m"
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1024 \
	--extra "$qs" --extra "$daemon" --timeout 600 ${QS_VERBOSE:+--env QS_VERBOSE=1} \
	-- scale.sh "$n" --check 4096 8192
