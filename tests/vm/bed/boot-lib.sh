# Shared part of the dracut boot tests (tests/vm/test-boot.sh,
# tests/vm/test-boot-rw.sh, tests/vm/test-boot-systemd.sh): bash, sourced
# after `me` is set; it sources
# tests/lib.sh. Boots from an initramfs built by Debian's dracut with the
# 90qcowsetup module of this tree (tests/vm/bed/build-dracut.sh, cached by
# input hash in $QS_VM_CACHE/dracut, default
# $top_builddir/tests/vm/out/dracut), under QEMU TCG, driving the serial
# console with tests/vm/bed/console.py. The tests give dracut the same
# qcowtab (boot_qcowtab), so that they share one cached initramfs (one of
# each flavour: test-boot-systemd.sh's is run by systemd).
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
#   boot_initramfs [systemd]            builds (or finds) the initramfs: $initrd
#                                       (systemd: run by systemd, its own cache)
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
#   guest_md5 NAME                      the md5 QS-ROOT-BIG printed in NAME
#   boot_root_steps                     the write and verify steps of a root's init
#   boot_rw_images ROOT_SIZE HOLD_SIZE  hold.img with root/ in a LUKS qcow2
#   boot_write_checks                   the checks after the write step's boot
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
	boot_images_made
}

# exit 99 unless hold.img was made and images.log says nothing unexpected
boot_images_made() {
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

boot_initramfs() {  # [systemd]
	local cache=${QS_VM_CACHE:-$builddir/tests/vm/out}/dracut${1:+-$1} rc=0
	# (not test-boot.sh's disk in the systemd one: its unit would wait
	# for it, 90 s, at every boot)
	boot_qcowtab | if [ "${1:-}" = systemd ]; then grep -v '^direct '; else cat; fi > "$work/qcowtab"
	"$here/bed/build-dracut.sh" "$cache" "$qs" "$kver" "$work/qcowtab" ${1:+"$1"} || rc=$?
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

# The steps of a read-write root's init, for its /etc/qs-steps.sh (the
# init sources it with $step and $token from the kernel command line):
#   write   a small file ($token) and 4 MiB of new data, read back after
#           the daemon's remaps (QS-ROOT-BIG, QS-ROOT-BIG-AGAIN)
#   verify  what write wrote (QS-ROOT-WRITTEN, QS-ROOT-BIG), and one more
#           file (/written2)
boot_root_steps() {
	cat <<'EOF'
case $step in
write)
	echo "$token" > /written
	dd if=/dev/urandom of=/big bs=64k count=64 2>/dev/null
	sync
	echo "QS-ROOT-BIG: $(md5sum < /big)"
	# the daemon moves the new clusters to the fast path: read them there
	sleep 3
	echo 3 > /proc/sys/vm/drop_caches
	echo "QS-ROOT-BIG-AGAIN: $(md5sum < /big)"
	;;
verify)
	echo "QS-ROOT-WRITTEN: $(cat /written)"
	echo "QS-ROOT-BIG: $(md5sum < /big)"
	echo "$token" > /written2
	;;
esac
EOF
}

# boot_rw_images ROOT_SIZE HOLD_SIZE: the holding disk $work/hold.img of a
# read-write root: the tree root/ as ext4 in /images/root.qcow2 (LUKS,
# passphrase $PASS), its key file /keys/root.key (UUID $HOLD_UUID). Adds to
# images.log; exits 99 when an image is missing or a tool complained there.
boot_rw_images() {
	{
		mkdir -p hold/images hold/keys
		mkfs.ext4 -q -F -d root root.raw "$1"
		printf '%s' "$PASS" > hold/keys/root.key
		boot_luks_qcow2 root.raw hold/images/root.qcow2 "data=$PASS"
		mkfs.ext4 -q -F -U "$HOLD_UUID" -L qshold -E root_owner=0:0 -d hold hold.img "$2"
		rm -rf root hold root.raw
	} >>images.log 2>&1 || true
	boot_images_made
}

# ---- host checks of a root in a LUKS qcow2 on the holding disk
# (passphrase $PASS; test-boot-rw.sh, test-boot-systemd.sh, test-boot-unlock.sh)
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
# the md5 QS-ROOT-BIG printed in boot NAME's console
guest_md5() {
	sed -n 's/^QS-ROOT-BIG: \([0-9a-f]*\).*/\1/p' "$work/$1.out" | head -n 1
}

# boot_write_checks: after the boot called write (boot_root_steps' write
# step, token $token): the new data read back the same after the daemon's
# remaps, and on the host the files are in the image (boot_host_files). Sets
# md5_write, the md5 of /big.
boot_write_checks() {
	local again
	md5_write=$(guest_md5 write)
	again=$(sed -n 's/^QS-ROOT-BIG-AGAIN: \([0-9a-f]*\).*/\1/p' "$work/write.out" | head -n 1)
	if [ -n "$md5_write" ] && [ "$again" = "$md5_write" ]; then
		pass "write: the new data reads back the same after the daemon's remaps"
	else
		fail "write: the new data read back differs ($md5_write, then $again)"
	fi
	boot_host_files write /images/root.qcow2 "qemu-img convert gives the files written, on a clean ext4" \
		"/written=$(md5_of "$token")" "/big=$md5_write"
}

boot_summary() {
	echo "$passed passed, $failed failed, $skipped skipped ($(( $(date +%s) - t0 ))s)"
	[ $failed = 0 ] || exit 1
	[ $passed = 0 ] && exit 77
	exit 0
}
