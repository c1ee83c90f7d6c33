#!/bin/sh
# Runs in the VM (see tests/admin/test-deb.sh): /host holds the packages
# (*.deb) and the expected file list of qcowsetup (qcowsetup.files); the
# disk /dev/vda (ext4) holds a LUKS qcow2 image (luks.qcow2, its passphrase
# in pass.key). dpkg is in the initramfs, with an empty database; the
# packages' libraries are there too, unknown to that database (hence
# --force-depends). Nothing of qcowsetup is in the initramfs but the packages.
. /host/lib.sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
modprobe -q dm-crypt 2>/dev/null
modprobe -q nbd 2>/dev/null

# dpkg's database and log, which dpkg keeps: left out of the file lists
mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates /var/lib/dpkg/triggers /var/log /mnt/d
: >/var/lib/dpkg/available

# every file, folder and link of the guest's root but the pseudo and scratch
# file systems (/proc /sys /dev /tmp, the share, the image disk's mount)
# and dpkg's own records; /etc, /run, /usr, /var included
root_files() {
	find / \( -path /proc -o -path /sys -o -path /dev -o -path /tmp -o -path /host \
		-o -path /mnt/d -o -path /var/lib/dpkg -o -path /var/log/dpkg.log \) -prune \
		-o -print | LC_ALL=C sort
}
root_files >/tmp/before

# On a real system other packages own the system's folders (base-files,
# libc6, udev ...): dpkg removes only the folders no other package lists.
# Here one package stands for them all, owning every folder the guest has
# (and the merged-/usr links /lib, /sbin ..., which dpkg treats as folders;
# owned by nobody, they would go with the last package that has files
# below them).
printf '%s\n' 'Package: qs-guest-base' 'Status: install ok installed' 'Priority: optional' \
	'Maintainer: the qcowsetup test bed <root@localhost>' 'Architecture: all' 'Version: 1' \
	'Description: the folders of the test VM' '' >/var/lib/dpkg/status
while read -r f; do
	[ ! -d "$f" ] || echo "$f"
done </tmp/before | sed 's|^/$|/.|' >/var/lib/dpkg/info/qs-guest-base.list

install() {
	dpkg --force-depends -i /host/qcowsetup_*.deb /host/qcowsetup-dracut_*.deb
	dpkg-query -W -f='${Package} ${Status}\n' qcowsetup qcowsetup-dracut >/tmp/st
	cat /tmp/st
	[ "$(grep -c ' install ok installed$' /tmp/st)" = 2 ]
	# every file of the package's list is there
	while read -r f; do
		[ -e "$f" ] || { echo "missing after install: $f"; exit 1; }
	done </host/qcowsetup.files
	[ -x /usr/lib/dracut/modules.d/90qcowsetup/module-setup.sh ]
}
vm_test "dpkg -i qcowsetup qcowsetup-dracut: installed, every file in place" install

# the daemon this mapping runs: the package's (/usr/libexec/qcowsetup)
daemon_exe() {
	for p in /proc/[0-9]*; do
		case $(readlink "$p/exe" 2>/dev/null) in
		*qcowsetup-daemon) readlink "$p/exe" ;;
		esac
	done
}

map_rw() {
	mount -t ext4 /dev/vda /mnt/d
	command -v qcowsetup
	[ "$(command -v qcowsetup)" = /usr/sbin/qcowsetup ]
	qcowsetup open --key-file /mnt/d/pass.key /mnt/d/luks.qcow2 qs-deb
	dd if=/dev/urandom of=/tmp/data bs=64k count=16 2>/dev/null
	dd if=/tmp/data of=/dev/mapper/qs-deb bs=64k seek=7 conv=fsync 2>/dev/null
	# (the daemon and its guardian)
	d=$(daemon_exe | sort -u)
	echo "daemon: $d"
	[ "$d" = /usr/libexec/qcowsetup/qcowsetup-daemon ]
	qcowsetup status qs-deb
	qcowsetup close qs-deb
	qcowsetup check /mnt/d/luks.qcow2
	qcowsetup open --readonly --key-file /mnt/d/pass.key /mnt/d/luks.qcow2 qs-deb
	dd if=/dev/mapper/qs-deb bs=64k skip=7 count=16 2>/dev/null | cmp - /tmp/data
	qcowsetup close qs-deb
	rm -f /tmp/data
	umount /mnt/d
	vm_assert_clean
}
vm_test "the installed qcowsetup maps read-write through the installed daemon, writes land" map_rw

purge() {
	dpkg --purge qcowsetup-dracut qcowsetup
	for f in /var/lib/dpkg/info/qcowsetup*; do
		[ ! -e "$f" ] || { echo "dpkg's records of the packages left: $f"; exit 1; }
	done
	dpkg-query -W -f='${Package} ${Status}\n' qcowsetup qcowsetup-dracut 2>&1 |
		grep ' installed$' && exit 1
	root_files >/tmp/after
	# what install and use left behind (+), or took away (-)
	diff -u /tmp/before /tmp/after
}
vm_test "dpkg --purge: no file, folder or link left behind (/etc, /run, /usr, /var ...)" purge

vm_summary
