#!/bin/bash
# Automake test: a read-write root in a LUKS qcow2 on an ext4 holding disk,
# booted from an initramfs built by Debian's dracut (no systemd in it) with
# the 90qcowsetup module of this tree, unlocked with no one at the console
# (the machinery is tests/vm/bed/boot-lib.sh). Nothing leaves the machine:
# the TPM is swtpm on the host, given to the VM through QEMU's tpm-tis; the
# tang server and the key server run in the initramfs itself, on its
# loopback, started by the test-only dracut module tests/vm/bed/99qsunlock
# (the stand-ins for a tang server on the network and a key agent).
#
# The initramfs gets a qcowtab whose one entry (noauto) has the clevis
# option, so that the module installs clevis and its pins (tang, tpm2,
# sss), tpm2-tools and the TPM drivers; each boot names its root with
# rd.qcowsetup.* options. Boots:
#   tpm        a tpm2 binding (no PCR policy): no question
# with QS_BOOT_FULL=1 also:
#   tangdown   a tang binding, no tang server: the passphrase is asked,
#              typed, and the root boots
#   tang       the same tang binding, tangd in the initramfs: no question
#   pcr        a tpm2 binding to PCR 0 as it was before the firmware
#              measured itself into it: the passphrase is asked, typed
#   credential load-credential=ID:PATH (a file in the initramfs), without
#              systemd: qcowsetup-ask loads it as LoadCredential= would
#   socket     the key file is an AF_UNIX socket (tests/vm/prog/key-server,
#              answering for the volume "root"): no question
#   sdtpm      tpm's binding, from an initramfs run by systemd (dracut's
#              systemd modules, the module's qcowsetup-generator units; the
#              same qcowtab and test module): no question, and the
#              slow-path daemon serves the read-write root after switch_root
#   sdtang     tang's binding, tangd in that initramfs: the same
# Each boot's root (busybox; init=/sbin/init for systemd's switch-root)
# writes a token to /written, remounts itself read-only and powers off;
# then, on the host: `qemu-img check` of its image is clean and its content
# is a clean ext4 holding the token.
#
# The tang server's keys, the passphrase and the key server go into the
# initramfs (cached by input hash in $QS_VM_CACHE/unlock): the keys
# are made once and kept there, the images are bound to them at each run.
# Environment: as test-boot.sh (QCOWSETUP, QS_KEEP=1, QS_BOOT_ONLY, QEMU,
# QS_VM_ACCEL, QS_BOOT_TIMEOUT: default 600 s here); QS_BOOT_FULL=1: all the
# boots.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, dracut, clevis, tang,
# socat...), 99 error.
set -eu
me=test-boot-unlock
# shellcheck source=tests/vm/bed/boot-lib.sh
. "$(cd "$(dirname "$0")" && pwd)/bed/boot-lib.sh"
command -v debugfs >/dev/null && command -v e2fsck >/dev/null || skip_test "debugfs or e2fsck not found (e2fsprogs)"
need clevis jose curl socat
[ -x /usr/libexec/tangd ] && [ -x /usr/libexec/tangd-keygen ] || skip_test "tang (tangd) not installed"
keyserver=$builddir/tests/vm/prog/key-server
need_built "$keyserver"
have_tpm=0
command -v swtpm >/dev/null && command -v tpm2_unseal >/dev/null && [ -x /usr/bin/clevis-encrypt-tpm2 ] &&
	[ -e /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 ] && have_tpm=1

PASS='qcow2 unlock secret'
# a boot takes 3-4 minutes under TCG on a busy machine (the initramfs with
# clevis and its tools is large, the TPM's operations are emulated)
QS_BOOT_TIMEOUT=${QS_BOOT_TIMEOUT:-600}
token=unlock-$$-$RANDOM
if [ -n "${QS_BOOT_FULL:-}" ]; then
	boots='tpm tangdown tang pcr credential socket sdtpm sdtang'
else
	boots='tpm'
fi
# a boot of $boots that QS_BOOT_ONLY does not leave out
wanted() { case " $boots " in *" $1 "*) want "$1" ;; *) return 1 ;; esac; }

# ------------------------------------------------------------ the test module
cache=${QS_VM_CACHE:-$builddir/tests/vm/out}/unlock
testmod=$cache/99qsunlock
mkdir -p "$testmod/data/tang"
cp "$here/bed/99qsunlock/"*.sh "$testmod/"
[ -n "$(ls "$testmod/data/tang/" 2>/dev/null)" ] || /usr/libexec/tangd-keygen "$testmod/data/tang"
printf '%s' "$PASS" > "$testmod/data/pass"
cmp -s "$keyserver" "$testmod/data/key-server" || cp "$keyserver" "$testmod/data/key-server"

# ------------------------------------------------------------ images
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tang_pid='' tpm_pid=''
stop_daemons() {
	[ -z "$tang_pid" ] || kill "$tang_pid" 2>/dev/null || true
	[ -z "$tpm_pid" ] || kill "$tpm_pid" 2>/dev/null || true
	tang_pid='' tpm_pid=''
}
trap 'stop_daemons; work_cleanup' EXIT
# a free port and the one after it (the swtpm TCTI's control channel)
port_pair() {
	python3 -c '
import socket
for p in range(21000, 60000, 11):
    try:
        a = socket.socket(); a.bind(("127.0.0.1", p)); b = socket.socket(); b.bind(("127.0.0.1", p + 1))
        print(p); break
    except OSError:
        pass'
}

make_images() {
	boot_make_root root root-unlock <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
token=''
for w in $(cat /proc/cmdline); do
	case $w in qs.token=*) token=${w#qs.token=} ;; esac
done
echo "QS-ROOT-INIT: $(cat /etc/marker)"
echo "QS-ROOT-MOUNT: $(grep ' / ' /proc/mounts | head -n 1)"
for p in /proc/[0-9]*; do
	a=''
	read -r a 2>/dev/null < "$p/cmdline"
	case $a in @qcowsetup-daemon*) echo "QS-ROOT-DAEMON: ${p#/proc/}" ;; esac
done
echo "$token" > /written
sync
mount -o remount,ro / && echo "QS-ROOT-RO: $(grep ' / ' /proc/mounts | head -n 1)"
echo "QS-ROOT-POWEROFF"
poweroff -f
EOF
	# (systemd's switch-root wants an OS tree)
	printf 'NAME=qcowsetup-test\nID=qcowsetup-test\n' > root/etc/os-release
	mkdir -p hold/images
	mkfs.ext4 -q -F -d root root.raw 16M
	(umask 077 && printf '%s' "$PASS" > pass.key)
	boot_luks_qcow2 root.raw plain.qcow2 "data=$PASS"
	for i in tang credential socket; do cp plain.qcow2 "hold/images/$i.qcow2"; done
	# tangd on the host's loopback for the binding, with the keys the
	# initramfs has
	socat "TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,fork" EXEC:"/usr/libexec/tangd $testmod/data/tang" 2>/dev/null &
	tang_pid=$!
	sleep 0.3
	"$qs" bind -q --pbkdf-force-iterations 1000 --key-file pass.key hold/images/tang.qcow2 tang \
		"{\"url\":\"http://127.0.0.1:$PORT\"}"
	"$qs" test-bindings hold/images/tang.qcow2 >/dev/null || echo "error: the tang binding does not unlock"
	kill "$tang_pid"
	tang_pid=''
	if [ $have_tpm = 1 ]; then
		# a socket TPM for the binds; the VM gets the same state
		mkdir tpm
		local tport
		tport=$(port_pair)
		swtpm socket --tpm2 --tpmstate dir="$work/tpm" --server "type=tcp,port=$tport,bindaddr=127.0.0.1" \
			--ctrl "type=tcp,port=$((tport + 1)),bindaddr=127.0.0.1" --flags not-need-init,startup-clear \
			--daemon --pid file="$work/tpm/pid"
		tpm_pid=$(cat tpm/pid)
		for i in tpm pcr; do cp plain.qcow2 "hold/images/$i.qcow2"; done
		TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$tport" \
			"$qs" bind -q --pbkdf-force-iterations 1000 --key-file pass.key hold/images/tpm.qcow2 tpm2 '{}'
		TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$tport" \
			"$qs" bind -q --pbkdf-force-iterations 1000 --key-file pass.key hold/images/pcr.qcow2 tpm2 \
			'{"pcr_bank":"sha256","pcr_ids":"0"}'
		kill "$tpm_pid"
		tpm_pid=''
		rm -f tpm/pid
	fi
	mkfs.ext4 -q -F -U "$HOLD_UUID" -L qshold -E root_owner=0:0 -d hold hold.img 64M
	rm -rf root hold root.raw plain.qcow2 pass.key
}
boot_make_images make_images

# the qcowtab given to dracut: one entry with the clevis option
boot_qcowtab() {
	echo "clevis  UUID=$HOLD_UUID:/images/tpm.qcow2  none  clevis,noauto,x-initrd.attach"
}
export QS_VM_CACHE=$cache QS_DRACUT_TEST_MODULE=$testmod
# the initramfs $initrd holds what the clevis entry and the test module put
# in, and each FILE (a pattern); DESCRIPTION: its flavour, for the case name
check_initramfs() {  # DESCRIPTION FILE...
	local desc=$1 content missing='' f
	shift
	content=$(lsinitrd "$initrd" 2>/dev/null || true)
	for f in usr/bin/clevis-decrypt-tang usr/bin/clevis-decrypt-tpm2 usr/bin/tpm2_unseal usr/bin/curl \
		'libtss2-tcti-device\.so' usr/libexec/tangd hooks/cmdline/20-qsunlock-start.sh "$@"; do
		echo "$content" | grep -q "$f" || missing="$missing $f"
	done
	if [ -z "$missing" ]; then
		pass "initramfs$desc: clevis with its tang and tpm2 pins, tpm2-tools and its device TCTI; the test's tangd"
	else
		fail "initramfs$desc: missing$missing"
	fi
}
sd_initrd=''
if wanted sdtpm || wanted sdtang; then
	boot_initramfs systemd
	sd_initrd=$initrd
	check_initramfs " run by systemd" 'system-generators/qcowsetup-generator$' 'usr/bin/systemd-run$'
fi
boot_initramfs
echo "$me: images and initramfs ready in $(( $(date +%s) - t0 ))s"
check_initramfs ''
rd_initrd=$initrd

# ------------------------------------------------------------ boots
# the VM's TPM: swtpm over the state the binds used, for one boot
tpm_for_boot() {
	rm -f tpm/sock tpm/pid
	swtpm socket --tpm2 --tpmstate dir="$work/tpm" --ctrl "type=unixio,path=$work/tpm/sock" \
		--daemon --pid file="$work/tpm/pid" || hard_error "swtpm for the VM did not start"
	tpm_pid=$(cat tpm/pid)
	# shellcheck disable=SC2054 # QEMU option values hold commas
	boot_qemu_extra=(-chardev "socket,id=chrtpm,path=$work/tpm/sock"
		-tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0)
}

root_of() {  # IMAGE [KEY [OPTIONS]]
	printf 'root=/dev/mapper/root rw rd.qcowsetup.image=UUID=%s:/images/%s rd.qcowsetup.name=root' "$HOLD_UUID" "$1"
	printf ' rd.qcowsetup.key=%s rd.qcowsetup.options=%s' "${2:-none}" "${3:-clevis,token-timeout=60}"
}
up=('expect:QS-ROOT-INIT: root-unlock' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 rw'
	'expect:QS-ROOT-RO: /dev/mapper/root / ext4 ro' 'expect:QS-ROOT-POWEROFF' end
	'absent:I/O error' 'absent:EXT4-fs error')
# systemd in the initramfs: the daemon there in the root too; no question
# (systemd-ask-password's "Please enter passphrase for" neither)
sd_up=('expect:QS-ROOT-INIT: root-unlock' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 rw'
	'expect:QS-ROOT-DAEMON: [0-9]+' "${up[@]:2}" 'absent:nter passphrase for')
typed=('expect:Enter passphrase for root: ' sleep:0.5 "send:$PASS\\n")

# one_boot NAME IMAGE DESCRIPTION APPEND -- STEP...
one_boot() {
	local name=$1 image=$2 desc=$3 append=$4 rc=0
	shift 5
	case $name in sd*) initrd=$sd_initrd ;; *) initrd=$rd_initrd ;; esac
	boot "$name" "$append qs.token=$token-$name" -- "$@" || rc=$?
	stop_daemons
	boot_qemu_extra=()
	boot_check "$name" $rc "$name: $desc"
	boot_host_files "$name" "/images/$image" "qemu-img check clean, the token written after switch_root on a clean ext4" \
		"/written=$(md5_of "$token-$name")"
}

for b in $boots; do
	wanted "$b" || continue
	case $b in
	tpm | pcr | sdtpm)
		if [ $have_tpm = 0 ]; then
			skipped "$b: no swtpm, tpm2-tools or clevis' tpm2 pin"
			continue
		fi
		tpm_for_boot
		;;
	esac
	case $b in
	tpm)
		one_boot tpm tpm.qcow2 "a tpm2 binding (swtpm through tpm-tis) unlocks the root, no question" \
			"$(root_of tpm.qcow2)" -- "${up[@]}" 'absent:Enter passphrase' ;;
	pcr)
		one_boot pcr pcr.qcow2 "a tpm2 binding to PCR 0 the firmware changed: the passphrase is asked, typed, the root boots" \
			"$(root_of pcr.qcow2)" -- "${typed[@]}" "${up[@]}" 'count:1:Enter passphrase' ;;
	tang)
		one_boot tang tang.qcow2 "a tang binding, tangd in the initramfs on its loopback: no question" \
			"$(root_of tang.qcow2) qstest.tang=1 qstest.tang.port=$PORT" -- "${up[@]}" 'absent:Enter passphrase' ;;
	tangdown)
		one_boot tangdown tang.qcow2 "a tang binding, no tang server: the passphrase is asked, typed, the root boots" \
			"$(root_of tang.qcow2 none clevis,token-timeout=20) qstest.tang.port=$PORT" -- \
			"${typed[@]}" "${up[@]}" 'count:1:Enter passphrase' ;;
	credential)
		one_boot credential credential.qcow2 "load-credential=ID:PATH without systemd in the initramfs: no question" \
			"$(root_of credential.qcow2 none load-credential=qsroot:/etc/qstest/pass)" -- \
			"${up[@]}" 'absent:Enter passphrase' ;;
	sdtpm)
		one_boot sdtpm tpm.qcow2 "systemd in the initramfs: a tpm2 binding unlocks the read-write root, no question; its daemon serves it after switch_root" \
			"$(root_of tpm.qcow2) init=/sbin/init" -- "${sd_up[@]}" ;;
	sdtang)
		one_boot sdtang tang.qcow2 "systemd in the initramfs: a tang binding, tangd on its loopback, unlocks the read-write root, no question; its daemon serves it after switch_root" \
			"$(root_of tang.qcow2) init=/sbin/init qstest.tang=1 qstest.tang.port=$PORT" -- "${sd_up[@]}" ;;
	socket)
		one_boot socket socket.qcow2 "the key file an AF_UNIX socket (a key server in the initramfs): no question" \
			"$(root_of socket.qcow2 /run/qstest/key.sock tries=3) qstest.keyserver=1 qstest.keyserver.name=root" -- \
			"${up[@]}" 'absent:Enter passphrase' ;;
	esac
done

boot_summary
