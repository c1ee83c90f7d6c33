#!/bin/sh
# /init of the qcowsetup VM test bed (copied in by tests/vm/bed/build-initramfs.sh).
#
# Mounts the pseudo file systems, loads the modules listed in /etc/qs-modules
# (busybox modprobe, dependencies from modules.dep), mounts the host share
# (9p tag "host") at /host, runs the program named on the kernel command line
# and powers off. Kernel command line:
#   qs.run=PATH      program to run (a path inside the guest, usually /host/...)
#   qs.args=B64,...  its arguments, each base64-encoded, comma-separated
#   qs.cwd=DIR       directory to run it in (default /host, else /)
#   qs.env=B64,...   NAME=VALUE settings to export, each base64-encoded
# The exit status is printed as a last line "QS-EXIT=<n>" on the console; without
# qs.run an interactive shell is started instead.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin
export HOME=/root TERM=dumb QS_VM=1 LANG=C
# No udev here: libdevmapper must create the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

[ -c /dev/null ] || mount -t devtmpfs -o mode=0755 devtmpfs /dev 2>/dev/null

# Run everything in one session keyring: without one, each `keyctl add ... @s`
# creates a private session keyring that dies with keyctl, and dm-crypt
# (request_key in the dmsetup process) never sees the key. PID 1 cannot use
# `keyctl new_session` (EPERM: it sets the parent's keyring), so init re-executes
# itself under `keyctl session` (still PID 1; its "Joined" message discarded).
if [ $$ = 1 ] && [ -z "${QS_INIT_KEYRING:-}" ] && command -v keyctl >/dev/null; then
	export QS_INIT_KEYRING=qs-vm
	exec keyctl session qs-vm /init >/dev/null 2>&1
fi
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/cryptsetup /run/lock
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
# shellcheck disable=SC3045 # dash and busybox ash have ulimit -c
ulimit -c 0 2>/dev/null
echo "QS-BOOT: init started at $(cut -d' ' -f1 /proc/uptime)s (kernel $(uname -r))"

for m in $(cat /etc/qs-modules); do
	modprobe "$m" || echo "init: modprobe $m failed"
done

# device-mapper: devtmpfs normally creates mapper/control when dm-mod loads.
if [ ! -c /dev/mapper/control ] && [ -r /sys/class/misc/device-mapper/dev ]; then
	mkdir -p /dev/mapper
	IFS=: read -r maj min < /sys/class/misc/device-mapper/dev
	mknod /dev/mapper/control c "$maj" "$min"
fi

share=no
if grep -qs host /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; then
	if mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none host /host; then
		share=yes
	else
		echo "init: cannot mount the host share"
	fi
fi
echo "QS-BOOT: ready at $(cut -d' ' -f1 /proc/uptime)s (share: $share)"

set -f   # no globbing of the command line words
run='' args='' cwd='' env=''
for w in $(cat /proc/cmdline); do
	case $w in
	qs.run=*) run=${w#qs.run=} ;;
	qs.args=*) args=${w#qs.args=} ;;
	qs.cwd=*) cwd=${w#qs.cwd=} ;;
	qs.env=*) env=${w#qs.env=} ;;
	esac
done
IFS_save=$IFS; IFS=,
for e in $env; do
	e=$(echo "$e" | base64 -d)
	case ${e%%=*} in
	''|*[!A-Za-z0-9_]*) echo "init: ignoring qs.env entry $e" ;;
	*) export "${e?}" ;;   # NAME=VALUE
	esac
done
IFS=$IFS_save

# Decode the arguments into the positional parameters.
set --
if [ -n "$args" ]; then
	IFS_save=$IFS; IFS=,
	for a in $args; do
		IFS=$IFS_save
		set -- "$@" "$(echo "$a" | base64 -d)"
		IFS=,
	done
	IFS=$IFS_save
fi

if [ -z "$run" ]; then
	echo "init: no qs.run= on the kernel command line: starting a shell (exit to power off)"
	setsid cttyhack sh -l
	rc=$?
else
	if [ -z "$cwd" ]; then
		if [ $share = yes ]; then cwd=/host; else cwd=/; fi
	fi
	if [ ! -e "$run" ]; then
		echo "init: $run does not exist in the guest"
		rc=127
	else
		cd "$cwd" || cd /
		if [ -x "$run" ]; then
			"$run" "$@" </dev/null
		else
			sh "$run" "$@" </dev/null
		fi
		rc=$?
		cd /
	fi
fi
echo "QS-EXIT=$rc"
sync
[ $share = yes ] && umount /host 2>/dev/null
poweroff -f
