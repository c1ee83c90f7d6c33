#!/bin/bash
# Automake test: boot from an initramfs built by Debian's dracut with the
# 90qcowsetup module of this tree (issue 5, acceptance), under QEMU TCG,
# driving the serial console with tests/vm/console.py.
#
# The root filesystem (busybox and an /sbin/init that prints QS-ROOT-* lines
# and powers off) is inside a LUKS qcow2 image on an ext4 filesystem on a
# virtio disk ("the holding disk"); a second LUKS image there shares its
# passphrase; a third is written straight onto a disk that is hot-plugged
# while dracut waits. Boots:
#   keyfile     rd.qcowsetup.* with a key file on the holding disk: no question
#   passphrase  the passphrase typed at the console prompt, after a wrong one
#   wrong       tries=2 wrong passphrases: dracut's emergency shell
#   same        two same-passphrase images: one question, both mapped
#   hotplug     a qcowtab entry (x-initrd.attach) for a disk that appears
#               later: recognised by 60-qcowsetup.rules, mapped, booted
# After each, the holding disk (and the hot-plugged one) is byte-identical
# to before: nothing written. The read-write root item is
# tests/vm/test-boot-rw.sh (it skips until `qcowsetup open` maps read-write).
#
# The initramfs is cached by input hash (tests/vm/build-dracut.sh) in
# $QS_VM_CACHE/dracut (default $top_builddir/tests/vm/out/dracut).
# Environment: QCOWSETUP (the program), QS_KEEP=1 (keep the work directory),
# QS_BOOT_ONLY="keyfile same" (run only those boots), QEMU, QS_VM_ACCEL.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, dracut...), 99 error.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
builddir=${top_builddir:-$top}
me=test-boot
qs=${QCOWSETUP:-$builddir/qcowsetup}
qemu=${QEMU:-qemu-system-x86_64}

skip() { echo "$me: SKIP: $*"; exit 77; }
command -v "$qemu" >/dev/null || skip "$qemu not found"
command -v qemu-img >/dev/null || skip "qemu-img not found"
command -v dracut >/dev/null || skip "dracut not found (apt-get install dracut-core)"
command -v python3 >/dev/null || skip "python3 not found"
command -v mkfs.ext4 >/dev/null || PATH=$PATH:/usr/sbin:/sbin
command -v mkfs.ext4 >/dev/null || skip "mkfs.ext4 not found"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
	skip "no static busybox (apt-get install busybox-static)"
[ -x "$qs" ] || { echo "$me: error: $qs not built" >&2; exit 99; }
kernel='' kver=''
# shellcheck disable=SC2012
for k in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
	v=${k#/boot/vmlinuz-}
	if [ -f "/usr/lib/modules/$v/modules.dep" ] || [ -f "/lib/modules/$v/modules.dep" ]; then
		kernel=$k kver=$v
		break
	fi
done
[ -n "$kernel" ] && [ -r "$kernel" ] || skip "no readable kernel with modules in /boot"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/qs-boot.XXXXXX")
if [ -n "${QS_KEEP:-}" ]; then echo "$me: keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
cd "$work"

PASS='qcow2 boot secret'
WRONG='not the secret'
HOLD_UUID=5d1c0a52-7c6e-4b1e-9f4a-2b8e6c0fd001  # fixed: the initramfs cache depends on it
passed=0 failed=0 skipped=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
skipped() { echo "SKIP: $*"; skipped=$((skipped + 1)); }

# ------------------------------------------------------------ images
t0=$(date +%s)
make_root() {  # DIR MARKER
	mkdir -p "$1"/bin "$1"/sbin "$1"/proc "$1"/sys "$1"/dev "$1"/run "$1"/tmp "$1"/etc
	cp "$busybox" "$1/bin/busybox"
	for a in sh mount cat grep ls head poweroff echo sync; do ln -s busybox "$1/bin/$a"; done
	echo "$2" > "$1/etc/marker"
	cat > "$1/sbin/init" <<'EOF'
#!/bin/sh
export PATH=/bin
echo "QS-ROOT-INIT: $(cat /etc/marker) pid $$"
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
echo "QS-ROOT-MOUNT: $(grep ' / ' /proc/mounts | head -n 1)"
for f in /sys/block/dm-*/dm/name; do [ -e "$f" ] && echo "QS-ROOT-DM: $(cat "$f")"; done
sync
echo "QS-ROOT-POWEROFF"
poweroff -f
EOF
	chmod 755 "$1/sbin/init"
}
luks_qcow2() {  # RAW QCOW2 SECRET-OBJECT-OPTS
	# qemu-img times PBKDF2 with getrusage, which a loaded machine can fail
	# ("Unable to get accurate CPU usage"): a few attempts
	for _ in 1 2 3 4 5; do
		qemu-img convert -q -f raw -O qcow2 --object "secret,id=s0,$3" \
			-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=65536 "$1" "$2" &&
			return 0
		sleep 1
	done
	return 1
}
make_images() {
	make_root root root
	make_root direct direct
	mkdir -p data hold/images hold/keys
	echo data > data/marker
	mkfs.ext4 -q -F -d root root.raw 16M
	mkfs.ext4 -q -F -d direct direct.raw 16M
	mkfs.ext4 -q -F -d data data.raw 8M
	printf '%s' "$PASS" > hold/keys/root.key
	head -c 48 /dev/urandom | base64 -w0 > hold/keys/direct.key  # QEMU secrets are UTF-8
	luks_qcow2 root.raw hold/images/root.qcow2 "data=$PASS"
	luks_qcow2 data.raw hold/images/data.qcow2 "data=$PASS"
	luks_qcow2 direct.raw direct.qcow2 "file=$work/hold/keys/direct.key"
	mkfs.ext4 -q -F -U "$HOLD_UUID" -L qshold -E root_owner=0:0 -d hold hold.img 64M
	# the qcow2 bytes straight onto a disk
	cp direct.qcow2 directdisk.img
	truncate -s 32M directdisk.img
	rm -rf root direct data hold root.raw direct.raw data.raw direct.qcow2
}
make_images >images.log 2>&1 || true
# (a failed command above does not stop the block: check what it made)
if [ ! -s hold.img ] || [ "$(head -c 3 directdisk.img 2>/dev/null)" != QFI ] ||
   [ -n "$(grep -v -e '^Creating regular file' -e 'Unable to get accurate CPU usage' images.log)" ]; then
	cat images.log
	echo "$me: error: cannot make the images" >&2
	exit 99
fi
md5_hold=$(md5sum < hold.img)
md5_direct=$(md5sum < directdisk.img)

# The qcowtab given to dracut: the hot-plugged disk (x-initrd.attach, nofail:
# the other boots do without it), and an entry that must stay out.
cat > qcowtab <<EOF
# name   image                              key-file                          options
direct   /dev/disk/by-id/virtio-qcowdirect  /keys/direct.key:UUID=$HOLD_UUID  readonly,nofail,x-initrd.attach
notinrd  UUID=$HOLD_UUID:/images/data.qcow2 none                              readonly
EOF
cache=${QS_VM_CACHE:-$builddir/tests/vm/out}/dracut
"$here/build-dracut.sh" "$cache" "$qs" "$kver" "$work/qcowtab" || {
	rc=$?
	[ $rc = 77 ] && skip "dracut cannot build here"
	echo "$me: error: dracut failed" >&2
	exit 99
}
initrd=$cache/dracut.img
echo "$me: images and initramfs ready in $(( $(date +%s) - t0 ))s"

tab=$(lsinitrd -f etc/qcowtab "$initrd" 2>/dev/null || true)
if echo "$tab" | grep -q '^direct ' && ! echo "$tab" | grep -q notinrd &&
   lsinitrd "$initrd" 2>/dev/null | grep -aq 'usr/sbin/qcowsetup-ask$'; then
	pass "initramfs: qcowsetup, qcowsetup-ask and the x-initrd.attach entries of qcowtab only"
else
	fail "initramfs content: etc/qcowtab is [$tab]"
fi

# ------------------------------------------------------------ boots
# quiet and rd.info: dracut's info messages on the console, the kernel's not
base_append="console=ttyS0 panic=-1 quiet rd.info rd.retry=40 rd.udev.log_level=err"
img_root="rd.qcowsetup.image=UUID=$HOLD_UUID:/images/root.qcow2 rd.qcowsetup.name=root"
img_data="rd.qcowsetup.image=UUID=$HOLD_UUID:/images/data.qcow2 rd.qcowsetup.name=data"

want() {
	[ -z "${QS_BOOT_ONLY:-}" ] && return 0
	case " $QS_BOOT_ONLY " in *" $1 "*) return 0 ;; esac
	return 1
}

# boot NAME APPEND [--hotplug] -- STEP...
boot() {
	local name=$1 append=$2 hot=no rc t
	shift 2
	if [ "$1" = --hotplug ]; then hot=yes; shift; fi
	shift
	local args=(-machine "q35,accel=${QS_VM_ACCEL:-tcg}" -cpu max -smp 2 -m 768
		-nographic -nodefaults -no-reboot -serial stdio
		-kernel "$kernel" -initrd "$initrd" -append "$base_append $append"
		-device virtio-rng-pci
		-drive "file=$work/hold.img,if=virtio,format=raw,cache=writeback")
	if [ $hot = yes ]; then
		args+=(-device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1
			-drive "file=$work/directdisk.img,if=none,id=qd,format=raw,cache=writeback"
			-qmp "unix:$work/qmp.sock,server=on,wait=off")
	fi
	t=$(date +%s)
	rc=0
	python3 "$here/console.py" --log "$work/$name.log" --timeout "${QS_BOOT_TIMEOUT:-240}" \
		--qmp "$work/qmp.sock" "$@" -- "$qemu" "${args[@]}" >"$work/$name.out" 2>&1 || rc=$?
	echo "$me: boot $name: $(( $(date +%s) - t ))s (console.py exit $rc)"
	return $rc
}

# check NAME DESCRIPTION: after a boot, PASS/FAIL with the console on failure
check() {
	local name=$1 rc=$2
	shift 2
	if [ "$rc" = 0 ]; then
		pass "$*"
	else
		fail "$* (console.py exit $rc; the end of its output follows)"
		tail -n 40 "$work/$name.out" | sed 's/^/    | /'
	fi
}

unchanged() {
	if [ "$(md5sum < hold.img)" = "$md5_hold" ] && [ "$(md5sum < directdisk.img)" = "$md5_direct" ]; then
		pass "$1: nothing written to the disks"
	else
		fail "$1: the disks changed"
		md5_hold=$(md5sum < hold.img) md5_direct=$(md5sum < directdisk.img)
	fi
}

if want keyfile; then
	rc=0
	boot keyfile "root=/dev/mapper/root ro $img_root rd.qcowsetup.key=/keys/root.key:UUID=$HOLD_UUID rd.qcowsetup.options=readonly" -- \
		'expect:QS-ROOT-INIT: root' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 ro' 'expect:QS-ROOT-DM: root\n' \
		'expect:QS-ROOT-POWEROFF' end 'absent:Enter passphrase' || rc=$?
	check keyfile $rc "keyfile: root in a LUKS qcow2 on ext4, key file on the holding disk: its /sbin/init runs, no question"
	unchanged keyfile
fi

if want passphrase; then
	rc=0
	boot passphrase "root=/dev/mapper/root ro $img_root rd.qcowsetup.options=readonly,tries=3" -- \
		'expect:Enter passphrase for root: ' sleep:0.5 "send:$WRONG\\n" \
		'expect:No key available with this passphrase' \
		'expect:Enter passphrase for root: ' sleep:0.5 "send:$PASS\\n" \
		'expect:QS-ROOT-INIT: root' 'expect:QS-ROOT-POWEROFF' end 'count:2:Enter passphrase' || rc=$?
	check passphrase $rc "passphrase: typed at the console prompt (a wrong one first, retried): /sbin/init runs"
	unchanged passphrase
fi

if want wrong; then
	rc=0
	boot wrong "root=/dev/mapper/root ro $img_root rd.qcowsetup.options=readonly,tries=2" -- \
		'expect:Enter passphrase for root: ' sleep:0.5 "send:$WRONG\\n" \
		'expect:Enter passphrase for root: ' sleep:0.5 "send:$WRONG\\n" \
		'expect:no passphrase opened it after 2 attempts' 'expect:could not map root' \
		'expect:Dropping to debug shell' sleep:2 \
		'send:ls /dev/mapper; echo QS-EMERGENCY-SHELL\n' 'expect:QS-EMERGENCY-SHELL\n' \
		'send:echo o > /proc/sysrq-trigger\n' end 'count:2:Enter passphrase' 'absent:QS-ROOT-INIT' || rc=$?
	check wrong $rc "wrong: tries=2 wrong passphrases, then dracut's emergency shell, no root"
	unchanged wrong
fi

if want same; then
	rc=0
	boot same "root=/dev/mapper/root ro $img_root rd.qcowsetup.options=readonly,same-passphrase $img_data rd.qcowsetup.options=readonly,same-passphrase" -- \
		'expect:Enter passphrase for (root, data|data, root): ' sleep:0.5 "send:$PASS\\n" \
		'expect:QS-ROOT-INIT: root' 'expect:QS-ROOT-DM: (data|root)\n' 'expect:QS-ROOT-POWEROFF' end \
		'count:1:Enter passphrase' 'count:1:QS-ROOT-DM: data\n' 'count:1:QS-ROOT-DM: root\n' || rc=$?
	check same $rc "same: two images sharing one passphrase, one prompt, both mapped"
	unchanged same
fi

if want hotplug; then
	rc=0
	boot hotplug "root=/dev/mapper/direct ro" --hotplug -- \
		'expect:qcowsetup: direct: waiting for its devices' sleep:1 \
		'qmp:{"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "qd", "serial": "qcowdirect", "id": "qdd", "bus": "rp1"}}' \
		'expect:QS-ROOT-INIT: direct' 'expect:QS-ROOT-MOUNT: /dev/mapper/direct / ext4 ro' 'expect:QS-ROOT-POWEROFF' end \
		'absent:Enter passphrase' || rc=$?
	check hotplug $rc "hotplug: a qcow2 written onto a disk that appears later: recognised by udev, mapped from qcowtab, booted"
	unchanged hotplug
fi

echo "$passed passed, $failed failed, $skipped skipped ($(( $(date +%s) - t0 ))s)"
[ $failed = 0 ] || exit 1
[ $passed = 0 ] && exit 77
exit 0
