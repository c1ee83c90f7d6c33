#!/bin/bash
# The main job on a generated sample: an encrypted (LUKS) qcow2 holding an
# ext4 filesystem, made by qemu-img; qcowsetup shows what it sees (info, map,
# the dm tables), then maps it read-only as /dev/mapper/demo, mounts it, lists
# and reads a file, and closes it; maps it read-write (the default), writes a
# file, closes it; and QEMU's tools check the image and find the new file. The
# mapping runs in the test VM (Debian's kernel under QEMU) when this machine's
# kernel has no device-mapper.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${QS_NO_SETUP:-}" ] || "$top/tools/setup.sh"
qs="$top/qcowsetup"
work=$(mktemp -d /var/tmp/qcowsetup-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
export PATH=$PATH:/usr/sbin:/sbin

printf 'demo passphrase' > pass
mkdir -p content/docs
echo "Hello from inside an encrypted qcow2, mapped by qcowsetup." > content/docs/hello.txt
seq 1 100000 > content/docs/numbers.txt
mkfs.ext4 -q -F -L demo -d content fs.raw 64M
secret=(--object secret,id=s0,file="$work/pass")
for i in 1 2 3 4 5 6 7 8; do
	# qemu-img 7.2 sometimes fails with "Unable to get accurate CPU usage"
	qemu-img convert "${secret[@]}" -O qcow2 \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 fs.raw vm1.qcow2 2>err && break
	sleep 1
done
[ -f vm1.qcow2 ] || { cat err; exit 1; }
rm -f fs.raw

run() { echo; echo "\$ $*"; "$@"; }
run "$qs" info vm1.qcow2
run "$qs" map vm1.qcow2 --json
run "$qs" table vm1.qcow2 demo

cat > inside.sh <<'EOS'
#!/bin/sh
set -e
cd "$(dirname "$0")"
run() { echo; echo "# $*"; "$@"; }
run qcowsetup open --readonly --key-file pass vm1.qcow2 demo
run qcowsetup status demo
mkdir -p /mnt/demo
run mount -t ext4 -o ro,noload /dev/mapper/demo /mnt/demo
run ls -l /mnt/demo/docs
run cat /mnt/demo/docs/hello.txt
run umount /mnt/demo
run qcowsetup close demo
echo; echo "# read-write (the default): the kernel writes allocated clusters, the daemon allocates new ones"
run qcowsetup open --key-file pass vm1.qcow2 demo
run qcowsetup status demo
run mount -t ext4 /dev/mapper/demo /mnt/demo
date > /mnt/demo/docs/written-through-qcowsetup.txt
echo "Written through /dev/mapper/demo." >> /mnt/demo/docs/written-through-qcowsetup.txt
run ls -l /mnt/demo/docs
run umount /mnt/demo
run qcowsetup close demo
echo; echo "# dmsetup ls; losetup -a   (nothing left)"
dmsetup ls; losetup -a
EOS
chmod +x inside.sh
if grep -qw device-mapper /proc/misc 2>/dev/null && [ "$(id -u)" = 0 ]; then
	PATH=$top:$PATH ./inside.sh
else
	echo
	echo "# this kernel has no device-mapper: mapping inside the test VM (Debian's kernel under QEMU TCG)"
	QCOWSETUP=$qs "$top/tests/vm/bed/run-vm.sh" --share "$work" -- inside.sh 2>&1 |
		grep -v -e "^QS-" -e "^run-vm:" -e SeaBIOS -e "^Booting" -e "^\[ *[0-9.]*\]"
fi

# QEMU's own view of the image qcowsetup wrote to
run qemu-img check "${secret[@]}" --image-opts "driver=qcow2,file.filename=vm1.qcow2,encrypt.key-secret=s0"
qemu-img convert "${secret[@]}" --image-opts "driver=qcow2,file.filename=vm1.qcow2,encrypt.key-secret=s0" -O raw check.raw
run debugfs -R "cat /docs/written-through-qcowsetup.txt" check.raw
