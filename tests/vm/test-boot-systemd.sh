#!/bin/bash
# Automake test: a read-write root filesystem in a LUKS qcow2 image on an
# ext4 "holding disk", booted from an initramfs run by systemd (Debian's
# dracut with its systemd, systemd-initrd and dracut-systemd modules, as
# Fedora and RHEL build theirs) with the 90qcowsetup module of this tree,
# under QEMU TCG (the machinery is tests/vm/bed/boot-lib.sh, shared with
# test-boot.sh and test-boot-rw.sh).
#
# The root runs systemd too: its tree is the initramfs' own (systemd,
# bash, qcowsetup) without /etc/initrd-release, so systemd's switch-root
# re-executes systemd there with the initramfs' units deserialized, as on
# an installed system. Its default target runs /qs/root.sh, which reports
# QS-ROOT-* lines and powers off with systemctl. Boots:
#   write   the slow-path daemon, in its scope qcowsetup-root.scope,
#           outlived switch_root and the root's systemd starting up; a
#           small file and 4 MiB of new data written after switch_root,
#           read back after the daemon's remaps; the daemon still there
#           when the root powers off (systemd-shutdown: the root read-only,
#           the mapping left open, as test-boot-rw.sh's write)
#   verify  (QS_BOOT_FULL=1) the next boot sees both, writes again, and
#           shuts down through the initramfs (qs.exitrd=1: root.sh copies
#           the tree to /run/initramfs, what dracut-shutdown.service does
#           from /boot on an installed system, once the initramfs asked for
#           it: /run/initramfs/.need_shutdown): systemd-shutdown goes back
#           there and dracut's shutdown runs the module's hook, which closes
#           the mapping and unmounts the holding filesystem
# After each, on the host: `qemu-img check` finds no errors and no leaks,
# and the content `qemu-img convert` gives holds the files on a clean ext4;
# after verify, also: the holding filesystem needs no journal recovery and
# the image file has the size it had at open again (the room reserved then
# given back; as in test-boot-rw.sh, that size holds the room the write
# boot reserved, which left the mapping open: qcowsetup(8), close), which
# holds the image as `qemu-img check` sees it.
#
# Environment: as test-boot.sh (QCOWSETUP, QS_KEEP=1, QEMU, QS_VM_ACCEL);
# QS_BOOT_FULL=1: the verify boot too.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, dracut, systemd...), 99 error.
set -eu
me=test-boot-systemd
# shellcheck source=tests/vm/bed/boot-lib.sh
. "$(cd "$(dirname "$0")" && pwd)/bed/boot-lib.sh"
command -v debugfs >/dev/null && command -v e2fsck >/dev/null || skip_test "debugfs or e2fsck not found (e2fsprogs)"
need cpio

PASS='qcow2 sd secret'
token=sd-$$-$RANDOM
: "${QS_BOOT_TIMEOUT:=600}"

boot_initramfs systemd
echo "$me: initramfs ready in $(( $(date +%s) - t0 ))s"
content=$(lsinitrd "$initrd" 2>/dev/null || true)
if echo "$content" | grep -q 'system-generators/qcowsetup-generator$' &&
   echo "$content" | grep -q 'usr/sbin/qcowsetup-daemon$' &&
   echo "$content" | grep -q 'hooks/shutdown/20-qcowsetup-shutdown\.sh$' &&
   echo "$content" | grep -q 'usr/lib/systemd/systemd$'; then
	pass "initramfs: systemd, qcowsetup-generator, qcowsetup-daemon, the shutdown hook"
else
	fail "initramfs: no systemd, qcowsetup-generator, qcowsetup-daemon or shutdown hook"
fi

# ------------------------------------------------------------ images
# The root: the initramfs' tree (its kernel modules left out) as a system.
make_root() {
	mkdir root
	(cd root && cpio -id --quiet < "$initrd")
	rm -rf root/usr/lib/modules/* root/etc/initrd-release root/usr/lib/initrd-release \
		root/etc/os-release root/usr/lib/os-release root/etc/qcowtab root/etc/cmdline.d
	printf 'NAME=qcowsetup-test\nID=qcowsetup-test\n' > root/usr/lib/os-release
	echo root-sd > root/etc/marker
	mkdir -p root/qs/bin
	cp "$busybox" root/qs/bin/busybox
	for a in md5sum dd sleep sync tr head grep cat ls cp; do ln -s busybox "root/qs/bin/$a"; done
	cat > root/etc/systemd/system/qs-root.target <<'EOF'
[Unit]
Description=qcowsetup test root
Requires=qs-root.service
After=qs-root.service
AllowIsolate=yes
EOF
	cat > root/etc/systemd/system/qs-root.service <<'EOF'
[Unit]
Description=qcowsetup test root: /qs/root.sh
After=sysinit.target

[Service]
Type=oneshot
ExecStart=/qs/root.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
EOF
	ln -sf qs-root.target root/etc/systemd/system/default.target
	cat > root/qs/root.sh <<'EOF'
#!/bin/bash
export PATH=/qs/bin:/usr/sbin:/usr/bin
step='' token='' exitrd=''
for w in $(cat /proc/cmdline); do
	case $w in
	qs.step=*) step=${w#qs.step=} ;;
	qs.token=*) token=${w#qs.token=} ;;
	qs.exitrd=1) exitrd=1 ;;
	esac
done
daemons() {  # LABEL: the slow-path daemons, their cgroups
	local p
	for p in /proc/[0-9]*; do
		case $(tr '\0' ' ' 2>/dev/null < "$p/cmdline") in
		@qcowsetup-daemon\ --name*) echo "$1: ${p#/proc/} $(cat "$p/cgroup" 2>/dev/null)" ;;
		esac
	done
}
echo "QS-ROOT-INIT: $(cat /etc/marker) $step pid1 $(cat /proc/1/comm)"
echo "QS-ROOT-MOUNT: $(grep ' / ' /proc/mounts | head -n 1)"
daemons QS-ROOT-DAEMON
echo "QS-ROOT-UNITS: $(systemctl list-units --all --no-legend --plain 'qcowsetup*' 2>&1 | tr '\n' ';')"
. /etc/qs-steps.sh
# qs.exitrd=1: back to the initramfs at shutdown, where the module's hook
# closes the mapping; else systemd-shutdown powers off with the root
# read-only and the mapping open
if [ -n "$exitrd" ]; then
	# where systemd-shutdown goes back to: the tree as the initramfs has it
	# (dracut-shutdown.service unpacks it from /boot when the initramfs asked
	# for it)
	ask=$(ls /run/initramfs/.need_shutdown 2>&1)
	mkdir -p /run/initramfs
	for d in /*; do
		case $d in
		/dev | /proc | /sys | /run | /tmp | /written* | /big | /lost+found) ;;
		*) cp -a "$d" /run/initramfs/ ;;
		esac
	done
	# and what it sees before the module's shutdown hook (20) and after it
	hooks=/run/initramfs/usr/lib/dracut/hooks/shutdown
	cat > "$hooks/10-qs-before.sh" <<'EOS'
(
PATH=/qs/bin:$PATH
echo "QS-EXITRD-BEFORE: mapped: $(qcowsetup list 2>&1 | tr '\n' ' ')"
echo "QS-EXITRD-BEFORE: mounts: $(grep -e qcowsetup -e oldroot /proc/mounts | tr '\n' ';')"
) > /dev/console 2>&1
EOS
	cat > "$hooks/21-qs-after.sh" <<'EOS'
(
PATH=/qs/bin:$PATH
echo "QS-EXITRD-AFTER: mapped: $(qcowsetup list 2>&1 | tr '\n' ' ')"
echo "QS-EXITRD-AFTER: mounts: $(grep -e qcowsetup /proc/mounts | tr '\n' ';')"
ls -l /oldsys/run/qcowsetup/mnt/*/images/root.qcow2 /run/qcowsetup/mnt/*/images/root.qcow2 2>/dev/null
) > /dev/console 2>&1
true  # (a hook that fails is run again, 40 times)
EOS
	[ -x /run/initramfs/shutdown ] && echo "QS-ROOT-EXITRD: ready, asked for: $ask"
fi
sync
daemons QS-ROOT-DAEMON-END
echo "QS-ROOT-POWEROFF"
systemctl --no-block --job-mode=replace-irreversibly start poweroff.target
EOF
	chmod 755 root/qs/root.sh
	boot_root_steps > root/etc/qs-steps.sh
}
make_root >images.log 2>&1 || true
boot_rw_images 64M 160M
echo "$me: images ready in $(( $(date +%s) - t0 ))s"

# closed: after boot NAME, the holding filesystem was unmounted cleanly
# and the image file has its size at open (SIZE_OPEN) again, at or past
# where the image ends
host_closed() {  # NAME SIZE_OPEN
	local e=0 size end
	e2fsck -fn hold.img >"$1.hold" 2>&1 || e=$?
	debugfs -R "dump /images/root.qcow2 root.qcow2" hold.img >/dev/null 2>&1
	qemu-img check --object "secret,id=s0,data=$PASS" \
		--image-opts "driver=qcow2,file.filename=root.qcow2,encrypt.key-secret=s0" >"$1.endcheck" 2>&1 || true
	size=$(stat -c %s root.qcow2)
	end=$(sed -n 's/^Image end offset: //p' "$1.endcheck")
	if [ $e = 0 ] && ! grep -q recover "$1.hold" && [ "$size" = "$2" ] && [ -n "$end" ] && [ "$end" -le "$size" ]; then
		pass "$1: closed at shutdown: the holding filesystem is clean, the image file has its size at open again ($size bytes, the image ends at $end)"
	else
		fail "$1: closed at shutdown: holding filesystem (e2fsck -n exit $e) or image file size ($size, $2 at open, image end ${end:-?})"
		sed 's/^/    | /' "$1.hold"
	fi
}

# ------------------------------------------------------------ boots
img="rd.qcowsetup.image=UUID=$HOLD_UUID:/images/root.qcow2 rd.qcowsetup.name=root"
img="$img rd.qcowsetup.key=/keys/root.key:UUID=$HOLD_UUID"

rc=0
boot write "root=/dev/mapper/root rw $img qs.step=write qs.token=$token" -- \
	'expect:QS-ROOT-INIT: root-sd write pid1 systemd' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 rw' \
	'expect:QS-ROOT-DAEMON: [0-9]+ 0::/system.slice/qcowsetup-root.scope' \
	'expect:QS-ROOT-UNITS: qcowsetup-root.scope loaded active running' \
	'expect:QS-ROOT-BIG: [0-9a-f]{32}' 'expect:QS-ROOT-BIG-AGAIN: [0-9a-f]{32}' \
	'expect:QS-ROOT-DAEMON-END: [0-9]+' 'expect:QS-ROOT-POWEROFF' end \
	'absent:Enter passphrase' 'absent:I/O error' 'absent:EXT4-fs error' || rc=$?
boot_check write $rc "write: systemd in the initramfs and the root: the daemon, in its scope, outlives switch_root and the root's start; files written after it; powered off"
boot_write_checks

if [ -n "${QS_BOOT_FULL:-}" ]; then
	size_open=$(stat -c %s root.qcow2)
	rc=0
	boot verify "root=/dev/mapper/root rw $img qs.step=verify qs.token=$token-2 qs.exitrd=1" -- \
		'expect:QS-ROOT-INIT: root-sd verify' 'expect:QS-ROOT-MOUNT: /dev/mapper/root / ext4 rw' \
		"expect:QS-ROOT-WRITTEN: $token\\n" "expect:QS-ROOT-BIG: $md5_write" \
		'expect:QS-ROOT-EXITRD: ready, asked for: /run/initramfs/.need_shutdown' \
		'expect:QS-ROOT-DAEMON-END: [0-9]+' 'expect:QS-ROOT-POWEROFF' 'expect:QS-EXITRD-BEFORE: mapped: root' \
		'expect:QS-EXITRD-AFTER: mapped: \n' 'expect:QS-EXITRD-AFTER: mounts: \n' end \
		'absent:I/O error' 'absent:EXT4-fs error' || rc=$?
	boot_check verify $rc "verify: the next boot sees what the first wrote; at shutdown, back in the initramfs, the module's hook closes the mapping"
	host_closed verify "$size_open"
	boot_host_files verify /images/root.qcow2 "qemu-img convert gives the files of both boots, on a clean ext4" \
		"/written=$(md5_of "$token")" "/big=$md5_write" "/written2=$(md5_of "$token-2")"
else
	skipped "verify: a second boot, and the close at shutdown back in the initramfs (QS_BOOT_FULL=1)"
fi

boot_summary
