#!/bin/bash
# Automake test: qcowtab at run time, in the VM test bed (tests/vm/bed/run-vm.sh):
# `qcowsetup open --tab` / `close --tab` (images on filesystems found by UUID
# and mounted under /run/qcowsetup, read-only unless an entry maps
# read-write, key files on another device,
# same-passphrase, nofail, noauto, idempotence, --batch-mode; key sources:
# a key file that is an AF_UNIX socket (tests/vm/prog/key-server), a systemd
# credential directory, keyfile-timeout=, headless=), `qcowsetup
# probe --udev`, and the udev rules with systemd-udevd: a disk holding a qcow2
# image appears (PCI rescan) and 60-qcowsetup.rules maps its qcowtab entry;
# 11-dm-qcowsetup.rules links the top device by image id and hides the
# internal one. The guest part is tests/vm/guest/tab.sh.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel or udevadm), 99 error.
set -eu
me=test-tab
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
need_vm
need qemu-img
udevadm=$(command -v udevadm || PATH=$PATH:/usr/bin:/bin command -v udevadm || true)
[ -n "$udevadm" ] || skip_test "udevadm not found"
command -v mkfs.ext4 >/dev/null || PATH=$PATH:/usr/sbin:/sbin
need_built "$qs"
need_built "$builddir/tests/vm/prog/key-server"

make_work
cd "$work"
PASS='tab secret'
luks() {  # RAW QCOW2 SECRET-OPTS
	retry 5 qemu-img convert -q -f raw -O qcow2 --object "secret,id=s0,$3" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$1" "$2"
}
mkdir -p share hold/images keys/k
{
	head -c 4M /dev/urandom > a.raw
	head -c 4M /dev/urandom > b.raw
	head -c 4M /dev/urandom > plain.raw
	head -c 4M /dev/urandom > d.raw
	head -c 32 /dev/urandom | base64 -w0 > keys/k/d.key
	printf '%s' "$PASS" > keys/k/a.key
	printf 'wrong' > keys/k/wrong.key
	luks a.raw hold/images/a.qcow2 "data=$PASS"
	luks b.raw hold/images/b.qcow2 "data=$PASS"
	qemu-img convert -q -f raw -O qcow2 plain.raw hold/images/plain.qcow2
	qemu-img create -q -f qcow2 hold/images/rw.qcow2 4M
	luks d.raw direct.qcow2 "file=$work/keys/k/d.key"
	for i in a b plain d; do md5sum < $i.raw | cut -d' ' -f1 > share/$i.md5; done
	qemu-img info direct.qcow2 | sed -n 's/.*uuid: //p' | head -n 1 > share/d.uuid
	mkfs.ext4 -q -F -U 6a0e3c5e-1d2f-4c3b-8a7e-0f1e2d3c4b5a -L qshold -E root_owner=0:0 -d hold hold.img 64M
	mkfs.ext4 -q -F -L qskeys -E root_owner=0:0 -d keys keys.img 8M
	cp direct.qcow2 direct.img
	truncate -s 16M direct.img
	rm -rf hold keys ./*.raw direct.qcow2
} >images.log 2>&1 || true
if [ ! -s hold.img ] || [ ! -s keys.img ] || [ "$(head -c 3 direct.img 2>/dev/null)" != QFI ] || [ ! -s share/d.uuid ]; then
	cat images.log
	echo "$me: error: cannot make the images" >&2
	exit 99
fi
guest_script tab share
printf '%s\n' "$PASS" > share/pass
sed 's|@SBINDIR@|/usr/local/bin|g' "$top/udev/60-qcowsetup.rules.in" > share/60-qcowsetup.rules
cp "$top/udev/11-dm-qcowsetup.rules" share/56-dm-qcowsetup.rules
extras=(--extra "$udevadm=/usr/bin/udevadm" --extra "$builddir/tests/vm/prog/key-server")
for r in 50-udev-default.rules 55-dm.rules 10-dm.rules 13-dm-disk.rules 60-persistent-storage.rules \
	60-persistent-storage-dm.rules 95-dm-notify.rules; do
	for d in /usr/lib/udev/rules.d /lib/udev/rules.d; do
		if [ -f "$d/$r" ]; then extras+=(--extra "$d/$r=/usr/lib/udev/rules.d/$r"); break; fi
	done
done
export QS_VM_CACHE=${QS_VM_CACHE:-$builddir/tests/vm/out/tab}
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/hold.img" --disk "$work/keys.img" \
	--disk "$work/direct.img" "${extras[@]}" --timeout "${QS_TAB_TIMEOUT:-600}" \
	${QS_VERBOSE:+--env QS_VERBOSE=1} -- tab.sh
