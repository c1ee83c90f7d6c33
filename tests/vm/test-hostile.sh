#!/bin/bash
# Automake test: an image is untrusted input (qcowsetup(8) SECURITY), in the
# VM test bed (tests/vm/bed/run-vm.sh). On the host, tests/vm/gen-hostile.sh
# makes the hostile images (names of backing and data files leading to
# another folder, a host disk, /proc/kcore, sysfs, a FIFO, a symlink out of
# the folder, another user's file, a block device; a raw disk) and the
# md5 of what qemu-img convert reads from the legitimate chains; they go on
# an ext4 disk that the guest (tests/vm/guest/hostile.sh) mounts at /mnt/h.
# There every refusal is checked for its exit code, its one line on stderr
# (the image and the reason), nothing left behind (devices, loop devices,
# daemons, /run/qcowsetup/*.lock) and every file or device the image named
# unchanged; plus races of two opens of one NAME (QS_HOSTILE_RACE_ROUNDS,
# default 5; 20 with QS_HOSTILE_FULL=1) and of close with open, a symlink
# swapped while open waits for its key, qcowtab's allow-unencrypted, and
# read-write entries asked through the real systemd-ask-password answered by
# tests/vm/prog/ask-agent.
# QS_HOSTILE_CASES="a e l" runs only those cases (letters).
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, qemu-img, python3,
# systemd-ask-password), 99 error.
set -eu
me=test-hostile
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$builddir/qcowsetup-daemon
agent=$builddir/tests/vm/prog/ask-agent
need_vm
need qemu-img qemu-io python3
ask=$(PATH=$PATH:/usr/bin:/bin command -v systemd-ask-password || true)
[ -n "$ask" ] || skip_test "systemd-ask-password not found"
command -v mkfs.ext4 >/dev/null || PATH=$PATH:/usr/sbin:/sbin
for f in "$qs" "$daemon" "$agent"; do need_built "$f"; done

make_work
if ! "$here/gen-hostile.sh" "$work" >"$work/gen.log" 2>&1; then
	cat "$work/gen.log"
	echo "$me: error: cannot make the images" >&2
	exit 99
fi
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/disk" "$work/disk.img" 64M
rm -rf "$work/disk"
guest_script hostile "$work/share"

export QS_VM_CACHE=${QS_VM_CACHE:-$builddir/tests/vm/out/hostile}
rounds=${QS_HOSTILE_RACE_ROUNDS:-${QS_HOSTILE_FULL:+20}}
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1024 \
	--extra "$qs" --extra "$daemon" --extra "$agent" --extra "$ask=/usr/bin/systemd-ask-password" \
	--timeout "${QS_HOSTILE_TIMEOUT:-900}" \
	--env "QS_HOSTILE_RACE_ROUNDS=${rounds:-5}" \
	${QS_HOSTILE_CASES:+--env "QS_HOSTILE_CASES=$QS_HOSTILE_CASES"} \
	${QS_VERBOSE:+--env QS_VERBOSE=1} ${QS_TRACE:+--env QS_TRACE=1} -- hostile.sh
