# Shared part of the dracut boot tests (tests/vm/test-boot.sh,
# tests/vm/test-boot-rw.sh): bash, sourced after `me` is set; it sources
# tests/lib.sh. Boots from an initramfs built by Debian's dracut with the
# 90qcowsetup module of this tree (tests/vm/bed/build-dracut.sh, cached by
# input hash in $QS_VM_CACHE/dracut, default
# $top_builddir/tests/vm/out/dracut), under QEMU TCG, driving the serial
# console with tests/vm/bed/console.py. Both tests give dracut the same
# qcowtab (boot_qcowtab), so that they share one cached initramfs.
#
# Sourcing it checks what the boots need (skips with 77, 99 when qcowsetup
# is not built), finds the kernel and makes the work directory ($work, the
# current directory; QS_KEEP=1 keeps it). Then:
#   boot_make_root DIR MARKER < INIT    a root tree: static busybox, the
#                                       /etc/marker MARKER, INIT as /sbin/init
#   boot_luks_qcow2 RAW QCOW2 SECRET    qemu-img convert to a LUKS qcow2
#   boot_make_images FUNCTION           runs FUNCTION (which makes hold.img),
#                                       its output in images.log: exit 99
#                                       unless it made hold.img and said
#                                       nothing unexpected
#   boot_initramfs                      builds (or finds) the initramfs: $initrd
#   boot NAME APPEND [--hotplug] -- STEP...
#                                       one boot, console.py STEPs; the disk is
#                                       $work/hold.img (--hotplug: and
#                                       $work/directdisk.img, plugged by QMP)
#   boot_check NAME RC DESCRIPTION      PASS/FAIL of a boot (the console's end
#                                       on failure)
#   want NAME                           whether boot NAME is to run
#                                       (QS_BOOT_ONLY="NAME...": only those)
#   boot_host_files NAME IMAGE DESCRIPTION PATH=MD5...
#                                       after boot NAME, the LUKS qcow2 IMAGE
#                                       of the holding disk (passphrase $PASS):
#                                       `qemu-img check` clean, its content a
#                                       clean ext4 holding each PATH with MD5
#   md5_of STRING                       the md5 of STRING and a newline
#   pass/fail/skipped DESCRIPTION (tests/lib.sh), boot_summary (the closing
#   line and exit)
# boot_qemu_extra (an array): more QEMU arguments for the boots (a TPM).
# Environment: QCOWSETUP (the program), QEMU, QS_VM_ACCEL, QS_BOOT_TIMEOUT,
# QS_BOOT_ONLY.

# shellcheck source=tests/lib.sh
. "$(cd "${BASH_SOURCE[0]%/*}/../.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
qemu=${QEMU:-qemu-system-x86_64}

need "$qemu" qemu-img
command -v dracut >/dev/null || skip_test "dracut not found (apt-get install dracut-core)"
need python3
command -v mkfs.ext4 >/dev/null || PATH=$PATH:/usr/sbin:/sbin
need mkfs.ext4
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
	skip_test "no static busybox (apt-get install busybox-static)"
need_built "$qs"
kernel='' kver=''
# shellcheck disable=SC2012
for k in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
	v=${k#/boot/vmlinuz-}
	if [ -f "/usr/lib/modules/$v/modules.dep" ] || [ -f "/lib/modules/$v/modules.dep" ]; then
		kernel=$k kver=$v
		break
	fi
done
[ -n "$kernel" ] && [ -r "$kernel" ] || skip_test "no readable kernel with modules in /boot"

make_work
cd "$work"

HOLD_UUID=5d1c0a52-7c6e-4b1e-9f4a-2b8e6c0fd001  # fixed: the initramfs cache depends on it
t0=$(date +%s)

boot_make_root() {  # DIR MARKER < INIT
	mkdir -p "$1"/bin "$1"/sbin "$1"/proc "$1"/sys "$1"/dev "$1"/run "$1"/tmp "$1"/etc
	cp "$busybox" "$1/bin/busybox"
	for a in sh mount umount cat grep ls head poweroff echo sync md5sum dd sleep; do ln -s busybox "$1/bin/$a"; done
	echo "$2" > "$1/etc/marker"
	cat > "$1/sbin/init"
	chmod 755 "$1/sbin/init"
}

boot_luks_qcow2() {  # RAW QCOW2 SECRET-OBJECT-OPTS
	retry 5 qemu-img convert -q -f raw -O qcow2 --object "secret,id=s0,$3" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=65536 "$1" "$2"
}

boot_make_images() {  # FUNCTION
	"$1" >images.log 2>&1 || true
	# (a failed command does not stop FUNCTION: check what it made)
	if [ ! -s hold.img ] ||
	   [ -n "$(grep -v -e '^Creating regular file' -e 'Unable to get accurate CPU usage' images.log)" ]; then
		cat images.log
		echo "$me: error: cannot make the images" >&2
		exit 99
	fi
}

# The qcowtab given to dracut: the hot-plugged disk of test-boot.sh
# (x-initrd.attach, nofail: the other boots do without it), and an entry
# that must stay out.
boot_qcowtab() {
	cat <<EOF
# name   image                              key-file                          options
direct   /dev/disk/by-id/virtio-qcowdirect  /keys/direct.key:UUID=$HOLD_UUID  readonly,nofail,x-initrd.attach
notinrd  UUID=$HOLD_UUID:/images/data.qcow2 none                              readonly
EOF
}

boot_initramfs() {
	local cache=${QS_VM_CACHE:-$builddir/tests/vm/out}/dracut rc=0
	boot_qcowtab > "$work/qcowtab"
	"$here/bed/build-dracut.sh" "$cache" "$qs" "$kver" "$work/qcowtab" || rc=$?
	if [ $rc != 0 ]; then
		[ $rc = 77 ] && skip_test "dracut cannot build here"
		echo "$me: error: dracut failed" >&2
		exit 99
	fi
	initrd=$cache/dracut.img
}

boot_qemu_extra=()

want() {
	[ -z "${QS_BOOT_ONLY:-}" ] && return 0
	case " $QS_BOOT_ONLY " in *" $1 "*) return 0 ;; esac
	return 1
}

# quiet and rd.info: dracut's info messages on the console, the kernel's not
base_append="console=ttyS0 panic=-1 quiet rd.info rd.retry=40 rd.udev.log_level=err"

# boot NAME APPEND [--hotplug] -- STEP...
boot() {
	local name=$1 append=$2 hot=no rc t
	shift 2
	local args=(-machine "q35,accel=${QS_VM_ACCEL:-tcg}" -cpu max -smp 2 -m 768
		-nographic -nodefaults -no-reboot -serial stdio
		-kernel "$kernel" -initrd "$initrd" -append "$base_append $append"
		-device virtio-rng-pci
		-drive "file=$work/hold.img,if=virtio,format=raw,cache=writeback"
		"${boot_qemu_extra[@]}")
	if [ "$1" = --hotplug ]; then hot=yes; shift; fi
	shift
	if [ $hot = yes ]; then
		args+=(-device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1
			-drive "file=$work/directdisk.img,if=none,id=qd,format=raw,cache=writeback"
			-qmp "unix:$work/qmp.sock,server=on,wait=off")
	fi
	t=$(date +%s)
	rc=0
	python3 "$here/bed/console.py" --log "$work/$name.log" --timeout "${QS_BOOT_TIMEOUT:-240}" \
		--qmp "$work/qmp.sock" "$@" -- "$qemu" "${args[@]}" >"$work/$name.out" 2>&1 || rc=$?
	echo "$me: boot $name: $(( $(date +%s) - t ))s (console.py exit $rc)"
	return $rc
}

# boot_check NAME RC DESCRIPTION: after a boot, PASS/FAIL with the console on failure
boot_check() {
	local name=$1 rc=$2
	shift 2
	if [ "$rc" = 0 ]; then
		pass "$*"
	else
		fail "$* (console.py exit $rc; the end of its output follows)"
		tail -n 40 "$work/$name.out" | sed 's/^/    | /'
	fi
}

# The image IMAGE as the holding disk has it now (journal replayed on a
# copy), `qemu-img check`, its content as raw ext4 (root.img).
boot_host_image() {  # NAME IMAGE
	local e=0
	rm -f copy.img root.qcow2 root.img
	cp hold.img copy.img
	e2fsck -fy copy.img >"$1.e2fsck" 2>&1 || e=$?
	if [ $e -ge 4 ]; then
		fail "$1: the holding filesystem is damaged (e2fsck exit $e)"
		sed 's/^/    | /' "$1.e2fsck"
		return 1
	fi
	debugfs -R "dump $2 root.qcow2" copy.img >/dev/null 2>&1
	if qemu-img check --object "secret,id=s0,data=$PASS" \
		--image-opts "driver=qcow2,file.filename=root.qcow2,encrypt.key-secret=s0" >"$1.check" 2>&1 &&
	   grep -q 'No errors were found' "$1.check" && ! grep -qi 'leak' "$1.check"; then
		pass "$1: qemu-img check: no errors, no leaks"
	else
		fail "$1: qemu-img check"
		sed 's/^/    | /' "$1.check"
	fi
	qemu-img convert --object "secret,id=s0,data=$PASS" \
		--image-opts "driver=qcow2,file.filename=root.qcow2,encrypt.key-secret=s0" -O raw root.img
}

# after boot NAME, IMAGE's check, then its content: a clean ext4 holding
# each PATH with that md5
boot_host_files() {  # NAME IMAGE DESCRIPTION PATH=MD5...
	local name=$1 image=$2 desc=$3 e=0 ok=1 f
	shift 3
	boot_host_image "$name" "$image" || return 0
	e2fsck -fn root.img >"$name.fsck" 2>&1 || e=$?
	for f in "$@"; do
		[ "$(debugfs -R "cat ${f%%=*}" root.img 2>/dev/null | md5sum | cut -d' ' -f1)" = "${f#*=}" ] ||
			{ ok=0; echo "$me: $name: ${f%%=*} is not as written" >>"$name.fsck"; }
	done
	if [ $e = 0 ] && [ $ok = 1 ]; then
		pass "$name: $desc"
	else
		fail "$name: $desc (e2fsck -n exit $e)"
		sed 's/^/    | /' "$name.fsck"
	fi
}
md5_of() { printf '%s\n' "$1" | md5sum | cut -d' ' -f1; }

boot_summary() {
	echo "$passed passed, $failed failed, $skipped skipped ($(( $(date +%s) - t0 ))s)"
	[ $failed = 0 ] || exit 1
	[ $passed = 0 ] && exit 77
	exit 0
}
