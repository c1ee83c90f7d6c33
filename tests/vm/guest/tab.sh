#!/bin/sh
# The guest part of tests/vm/test-tab.sh (see there). Disks: vda ext4
# "qshold" (UUID 6a0e3c5e-...) with images/{a,b,plain,rw}.qcow2, vdb ext4
# "qskeys" with k/{a,d,wrong}.key, vdc a LUKS qcow2 written onto the disk.
# The share holds the md5 of each image's guest data, the passphrase, d's
# LUKS UUID and the udev rules of this tree.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
U=6a0e3c5e-1d2f-4c3b-8a7e-0f1e2d3c4b5a
M=/run/qcowsetup/mnt/uuid-$U
T=/tmp/qcowtab
qs() { qcowsetup --qcowtab $T "$@"; }
md5_of() { md5sum < "/dev/mapper/$1" | cut -d' ' -f1; }
expect_md5() { [ "$(md5_of "$1")" = "$(cat "$here/$2.md5")" ] || { echo "$1: wrong data"; return 1; }; }
mounted() { grep -q " $1 " /proc/mounts; }

t_open_uuid_key_label() {
	cat > $T <<EOT
# test
a  UUID=$U:/images/a.qcow2  /k/a.key:LABEL=qskeys  readonly
EOT
	qs -v open --tab a </dev/null
	expect_md5 a a
	grep " $M ext4 ro," /proc/mounts
	! grep -q /run/qcowsetup/key /proc/mounts
}
t_idempotent() {
	qs -v open --tab a </dev/null 2>&1 | grep 'already active'
	dmsetup info -c --noheadings -o name | grep -qx a
}
t_close_unmounts() {
	qs close --tab a
	[ ! -e /dev/mapper/a ]
	! mounted "$M"
	vm_assert_clean
}
t_same_passphrase_pipe() {
	cat > $T <<EOT
a  UUID=$U:/images/a.qcow2  none  readonly,same-passphrase
b  UUID=$U:/images/b.qcow2  -     ro,same-passphrase
EOT
	# one line on stdin: read once, opens both
	qs open --tab < "$here/pass"
	expect_md5 a a
	expect_md5 b b
	qs close --tab
	vm_assert_clean
}
t_nofail() {
	cat > $T <<EOT
bad   UUID=$U:/images/a.qcow2  /k/wrong.key:LABEL=qskeys  readonly,nofail
plain UUID=$U:/images/plain.qcow2  none  readonly,allow-unencrypted
EOT
	qs --batch-mode open --tab </dev/null
	[ -e /dev/mapper/plain ] && [ ! -e /dev/mapper/bad ]
	expect_md5 plain plain
	qs close --tab
	vm_assert_clean
}
t_failure_status() {
	cat > $T <<EOT
bad   UUID=$U:/images/a.qcow2  /k/wrong.key:LABEL=qskeys  readonly
EOT
	rc=0
	qs --batch-mode open --tab </dev/null 2>/tmp/err || rc=$?
	cat /tmp/err
	[ $rc = 2 ] && grep -q 'asks no questions' /tmp/err
	! mounted "$M"
	vm_assert_clean
}
t_noauto() {
	cat > $T <<EOT
plain UUID=$U:/images/plain.qcow2  none  readonly,noauto,allow-unencrypted
EOT
	qs open --tab </dev/null
	[ ! -e /dev/mapper/plain ]
	qs open --tab plain </dev/null
	[ -e /dev/mapper/plain ]
	qs close --tab plain
	vm_assert_clean
}
t_read_write() {
	vm_require qemu-img
	cat > $T <<EOT
rw  UUID=$U:/images/rw.qcow2  none  allow-unencrypted
EOT
	qs open --tab rw </dev/null
	# the holding filesystem read-write, the mapping too
	grep " $M ext4 rw," /proc/mounts
	dmsetup info rw | grep -q 'State: *ACTIVE$'
	# 256 KiB at 1 MiB into an empty image: new clusters
	dd if=/dev/urandom of=/tmp/w bs=64k count=4 2>/dev/null
	dd if=/tmp/w of=/dev/mapper/rw bs=64k seek=16 conv=fsync 2>/dev/null
	want=$(md5_of rw)
	qs close --tab rw
	[ ! -e /dev/mapper/rw ]
	! mounted "$M"
	vm_assert_clean
	# what QEMU makes of the image
	mkdir -p /tmp/h
	mount -o ro /dev/vda /tmp/h
	rc=0
	qemu-img check /tmp/h/images/rw.qcow2 >/tmp/check 2>&1 || rc=$?
	qemu-img convert -O raw /tmp/h/images/rw.qcow2 /tmp/rw.raw || rc=1
	umount /tmp/h
	cat /tmp/check
	[ $rc = 0 ] && grep -q 'No errors were found' /tmp/check && ! grep -qi leak /tmp/check
	[ "$(md5sum < /tmp/rw.raw | cut -d' ' -f1)" = "$want" ]
	[ "$(dd if=/tmp/rw.raw bs=64k skip=16 count=4 2>/dev/null | md5sum)" = "$(md5sum < /tmp/w)" ]
	rm -f /tmp/rw.raw /tmp/w
}
# Key sources: a socket key server (tests/vm/prog/key-server), a systemd
# credential directory, keyfile-timeout=, headless=.
t_socket_key() {
	printf '%s' "$(cat "$here/pass")" > /tmp/a.pass
	: > /tmp/peers
	key-server /run/qs-key.sock /tmp/peers a=/tmp/a.pass &
	ks=$!
	i=0; while [ ! -S /run/qs-key.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	cat > $T <<EOT
a  UUID=$U:/images/a.qcow2  /run/qs-key.sock  readonly,headless
EOT
	rc=0
	qs open --tab a </dev/null || rc=$?
	kill $ks; wait $ks 2>/dev/null
	cat /tmp/peers
	[ $rc = 0 ]
	expect_md5 a a
	grep -Eqx 'peer @[0-9a-f]{16}/cryptsetup/a: sent [0-9]+' /tmp/peers
	qs close --tab a
	vm_assert_clean
}
t_credential() {
	mkdir -p /tmp/creds
	printf '%s' "$(cat "$here/pass")" > /tmp/creds/qcow-a.key
	cat > $T <<EOT
a  UUID=$U:/images/a.qcow2  /k/wrong.key:LABEL=qskeys  readonly,headless,load-credential-encrypted=qcow-a.key
EOT
	# the credential comes first (the wrong key file is never needed)
	CREDENTIALS_DIRECTORY=/tmp/creds qs open --tab a </dev/null
	expect_md5 a a
	qs close --tab a
	vm_assert_clean
}
t_keyfile_timeout() {
	cat > $T <<EOT
a  UUID=$U:/images/a.qcow2  /run/no-such.key  readonly,keyfile-timeout=1s
EOT
	qs open --tab a < "$here/pass" 2>/tmp/err
	cat /tmp/err
	grep -q 'keyfile-timeout' /tmp/err
	expect_md5 a a
	qs close --tab a
	vm_assert_clean
}
t_headless_fails() {
	cat > $T <<EOT
a  UUID=$U:/images/a.qcow2  none  readonly,headless
EOT
	# a passphrase on stdin is there, and not read
	rc=0
	qs open --tab a < "$here/pass" 2>/tmp/err || rc=$?
	cat /tmp/err
	[ $rc = 2 ] && grep -q headless /tmp/err
	[ ! -e /dev/mapper/a ]
	! mounted "$M"
	vm_assert_clean
}
t_unknown_name() {
	: > $T
	rc=0
	qs open --tab nosuch 2>/tmp/err || rc=$?
	[ $rc = 1 ] && grep -q 'No entry nosuch' /tmp/err
}
t_probe() {
	qcowsetup probe --udev /dev/vdc > /tmp/p
	cat /tmp/p
	grep -qx 'ID_QCOW2_FORMAT=qcow2' /tmp/p
	grep -qx 'ID_QCOW2_ENCRYPTION=luks' /tmp/p
	grep -qx "ID_QCOW2_LUKS_UUID=$(cat "$here/d.uuid")" /tmp/p
	grep -qx 'ID_QCOW2_VIRTUAL_SIZE=4194304' /tmp/p
	rc=0
	out=$(qcowsetup probe --udev /dev/vda 2>&1) || rc=$?
	[ $rc = 4 ] && [ -z "$out" ]
}
t_udev_disk_appears() {
	vm_require udevadm
	printf 'direct /dev/vdc /k/d.key:LABEL=qskeys readonly\n' > /etc/qcowtab
	mkdir -p /usr/lib/udev/rules.d /etc/udev/rules.d /run/udev /run/qs-udev
	cp "$here/60-qcowsetup.rules" "$here/56-dm-qcowsetup.rules" /etc/udev/rules.d/
	# the disk goes away before udevd starts, and comes back
	pci=$(readlink -f /sys/block/vdc/device/..)
	echo 1 > "$pci/remove"
	[ ! -e /sys/block/vdc ]
	unset DM_DISABLE_UDEV
	ln -sf "$(command -v udevadm)" /run/qs-udev/systemd-udevd
	/run/qs-udev/systemd-udevd --daemon --resolve-names=never
	i=0; while [ ! -e /run/udev/control ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	udevadm trigger --action=add --subsystem-match=block
	udevadm settle --timeout=60
	echo 1 > /sys/bus/pci/rescan
	udevadm settle --timeout=120
	i=0; while [ ! -e /dev/mapper/direct ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
	udevadm info /dev/vdc | grep ID_QCOW2
	expect_md5 direct d
	id=$(cat "$here/d.uuid")
	ls -l /dev/disk/by-id/ /dev/disk/by-qcow2-uuid/ 2>&1
	[ "$(readlink -f "/dev/disk/by-id/qcow2-$id")" = "$(readlink -f /dev/mapper/direct)" ]
	[ "$(readlink -f "/dev/disk/by-qcow2-uuid/$id")" = /dev/vdc ]
	# the internal layer is hidden: no by-id link of its own
	! ls /dev/disk/by-id/ | grep -q direct_crypt
	qcowsetup close direct
	udevadm settle --timeout=30
	udevadm control --exit
	vm_assert_clean
}

vm_test "open --tab: image on a filesystem by UUID (mounted read-only), key file on a device by LABEL" t_open_uuid_key_label
vm_test "open --tab: a mapped entry is left alone (idempotent)" t_idempotent
vm_test "close --tab: unmaps and unmounts the holding filesystem" t_close_unmounts
vm_test "same-passphrase: one line on stdin opens both entries" t_same_passphrase_pipe
vm_test "nofail: a failing entry does not fail the others nor the exit status" t_nofail
vm_test "a failing entry: exit 2, --batch-mode asks nothing, nothing left mounted" t_failure_status
vm_test "noauto: only when named" t_noauto
vm_test "an entry without readonly: mapped read-write (holding filesystem mounted read-write), written, closed: qemu-img check clean, the data there" t_read_write
vm_test "a key file that is an AF_UNIX socket: the server sees @RANDOM/cryptsetup/NAME and sends its key" t_socket_key
vm_test "a systemd credential (\$CREDENTIALS_DIRECTORY) comes before the key file" t_credential
vm_test "keyfile-timeout=: no key file after 1 s, the passphrase on stdin" t_keyfile_timeout
vm_test "headless with no key: exit 2, nothing asked, nothing left" t_headless_fails
vm_test "an unknown name: exit 1" t_unknown_name
vm_test "probe --udev: ID_QCOW2_* for a qcow2 on a disk, exit 4 and silence for ext4" t_probe
vm_test "udev: a disk holding a qcow2 appears: 60-qcowsetup.rules maps its qcowtab entry; links by image id" t_udev_disk_appears
vm_cleanup
vm_summary
