#!/bin/sh
# Runs in the VM (see test-open.sh): /host holds the matrix (m/) and oracles.
. /host/lib.sh
mkdir -p /mnt/m
mount -t ext4 /dev/vda /mnt/m || { echo "cannot mount the image disk"; exit 1; }
cd /mnt/m
export PATH=/usr/local/bin:$PATH
modprobe -q dm-crypt 2>/dev/null; modprobe -q dm-zero 2>/dev/null

keyargs() {	# secret column of the manifest -> qcowsetup key options
	[ "$1" = - ] || echo "--key-file $1"
}

map_md5() {	# name path secret [extra args]: open, md5, close, clean
	name=$1 path=$2 secret=$3
	shift 3
	dev=qs-$(echo "$name" | tr -c 'A-Za-z0-9_.+\n-' '_')
	# shellcheck disable=SC2046
	qcowsetup open --readonly $(keyargs "$secret") "$@" "$path" "$dev"
	got=$(md5sum </dev/mapper/"$dev" | cut -d' ' -f1)
	qcowsetup status "$dev" >/dev/null
	qcowsetup close "$dev"
	want=$(cat oracle/"$name".md5)
	[ "$got" = "$want" ] || { echo "md5 of /dev/mapper/$dev: $got, qemu-img convert: $want"; return 1; }
	vm_assert_clean
}

while IFS='	' read -r name path format secret tags; do
	case $name in '#'*|'') continue ;; esac
	case ",$tags," in
	*,compressed,*) vm_test "$name: compressed clusters through the daemon: md5 equals qemu-img convert" map_md5 "$name" "$path" "$secret" ;;
	*) vm_test "$name: /dev/mapper md5 equals qemu-img convert" map_md5 "$name" "$path" "$secret" ;;
	esac
done <manifest.tsv

name=snap-c64k@snap1
vm_test "snapshot snap1 read-only: md5 equals qemu-img convert -l" map_md5 "$name" snap-c64k.qcow2 - --snapshot snap1

segments() {
	map_md5 c512-v3 c512-v3.qcow2 - --max-targets 3
	map_md5 chain-q1-top chain-q1/top.qcow2 - --max-targets 2
	map_md5 aes-qcow2 aes-qcow2.qcow2 pass.key --max-targets 2
}
vm_test "tables split into segment devices (--max-targets 2..3): md5 unchanged" segments

# ---- wrong keys: exit 2, one clear line, nothing left
wrong_key() {	# path
	printf 'not the passphrase' >wrong.key
	rc=0
	qcowsetup open --readonly --key-file wrong.key "$1" qs-wrong 2>err || rc=$?
	cat err
	rm -f wrong.key
	[ $rc = 2 ] && grep -qi 'passphrase' err
	vm_assert_clean
}
vm_test "LUKS wrong passphrase: exit 2, nothing left" wrong_key luks-aes-xts.qcow2
vm_test "legacy AES wrong passphrase: refused by the key check, exit 2" wrong_key aes-qcow2.qcow2
vm_test "qcow v1 AES wrong passphrase: refused by the key check" wrong_key aes-qcow.qcow

override() {
	printf 'not the passphrase' >wrong.key
	qcowsetup open --readonly --skip-key-check --key-file wrong.key aes-qcow2.qcow2 qs-override
	rm -f wrong.key
	got=$(md5sum </dev/mapper/qs-override | cut -d' ' -f1)
	qcowsetup close qs-override
	[ "$got" != "$(cat oracle/aes-qcow2.md5)" ]
	vm_assert_clean
}
vm_test "legacy AES --skip-key-check maps a wrong key (garbage, by request)" override

# ---- atomic open: fail each step in turn, nothing may be left
fault_steps() {	# path secret [rw]: read-only, or read-write on a copy
	k=1 img=$1 mode=--readonly
	if [ "${3:-}" = rw ]; then
		# a copy of the image's folder (a chain's backing files with it)
		rm -rf /tmp/fault && mkdir /tmp/fault
		if [ "$(dirname "$1")" = . ]; then cp "$1" /tmp/fault/; else cp -r "$(dirname "$1")"/. /tmp/fault/; fi
		mode='' img=/tmp/fault/$(basename "$1")
		before=$(md5sum <"$img")
	fi
	while [ $k -lt 60 ]; do
		rc=0
		# shellcheck disable=SC2046,SC2086
		qcowsetup open $mode $(keyargs "$2") --debug-fail-step $k "$img" qs-fault 2>err || rc=$?
		if [ $rc = 0 ]; then
			qcowsetup close qs-fault
			echo "open succeeds past its $((k - 1)) steps"
			[ $k -gt 3 ]
			vm_assert_clean
			return
		fi
		grep -q "Injected failure at step $k" err || { cat err; return 1; }
		vm_assert_clean || { echo "after failing step $k"; return 1; }
		keyctl show @u 2>/dev/null | grep -q qcowsetup && { echo "key left after step $k"; return 1; }
		if [ -z "$mode" ] && [ "$(md5sum <"$img")" != "$before" ]; then
			echo "the image changed (size $(stat -c %s "$img")) after failing step $k"
			return 1
		fi
		k=$((k + 1))
	done
	return 1
}
vm_test "atomic open (LUKS): a failure at any step leaves nothing" fault_steps luks-aes-xts.qcow2 pass.key
vm_test "atomic open (3-layer chain): a failure at any step leaves nothing" fault_steps chain-q1/top.qcow2 -
vm_test "atomic open (legacy AES): a failure at any step leaves nothing" fault_steps aes-qcow2.qcow2 pass.key
vm_test "atomic read-write open (LUKS): a failure at any step leaves nothing, the image unchanged" fault_steps luks-aes-xts.qcow2 pass.key rw
vm_test "atomic read-write open (3-layer chain): a failure at any step leaves nothing, the image unchanged" fault_steps chain-q1/top.qcow2 - rw

# ---- names, busy devices
# status_of CMD...: CMD's exit status in rc, its stderr shown
status_of() {
	rc=0
	"$@" 2>err || rc=$?
	cat err
}

name_taken() {
	qcowsetup open --readonly c64k-v3.qcow2 qs-a
	status_of qcowsetup open --readonly c4k-v3.qcow2 qs-a
	qcowsetup close qs-a
	[ $rc = 5 ]
	vm_assert_clean
}
vm_test "name taken: exit 5" name_taken

busy_close() {
	qcowsetup open --readonly c64k-v3.qcow2 qs-busy
	exec 3</dev/mapper/qs-busy
	status_of qcowsetup close qs-busy
	exec 3<&-
	qcowsetup close qs-busy
	[ $rc = 5 ]
	vm_assert_clean
}
vm_test "close of a device in use: exit 5, then closes" busy_close

twice() {
	qcowsetup open --readonly c64k-v3.qcow2 qs-one
	qcowsetup open --readonly c64k-v3.qcow2 qs-two
	a=$(md5sum </dev/mapper/qs-one) b=$(md5sum </dev/mapper/qs-two)
	qcowsetup close qs-one
	qcowsetup close qs-two
	[ "$a" = "$b" ]
	vm_assert_clean
}
vm_test "one image mapped read-only under two names" twice

no_key_in_table() {
	qcowsetup open --readonly --key-file pass.key luks-aes-xts.qcow2 qs-keys
	dmsetup table --showkeys | grep crypt
	dmsetup table --showkeys | grep crypt | grep -q ':64:logon:'
	left=$(keyctl show @u 2>/dev/null | grep -c qcowsetup || true)
	qcowsetup close qs-keys
	[ "$left" = 0 ]
	vm_assert_clean
}
vm_test "keys: keyring references in tables, no key left in the keyring" no_key_in_table

# ---- QEMU-compatible locks
locks_vs_qemu() {
	qcowsetup open --readonly c64k-v3.qcow2 qs-lock
	qemu-img info c64k-v3.qcow2 >/dev/null
	rc=0
	qemu-io -c 'write 0 512' c64k-v3.qcow2 >out 2>&1 || rc=$?
	cat out
	grep -q 'Failed to get "write" lock' out
	qcowsetup close qs-lock
	cp c64k-v3.qcow2 /tmp/w.qcow2
	qemu-io -c 'write -P 7 0 512' /tmp/w.qcow2 >/dev/null
	rm -f /tmp/w.qcow2
	vm_assert_clean
}
vm_test "while mapped: qemu-img info works, a qemu-io write fails on the lock" locks_vs_qemu

qemu_holds() {
	cp c64k-v3.qcow2 /tmp/held.qcow2
	qemu-nbd --fork --persistent -k /tmp/nbd.sock -f qcow2 /tmp/held.qcow2 --pid-file /tmp/nbd.pid
	rc=0
	qcowsetup open --readonly /tmp/held.qcow2 qs-held 2>err || rc=$?
	cat err
	kill "$(cat /tmp/nbd.pid)"
	sleep 1
	qcowsetup open --readonly /tmp/held.qcow2 qs-held
	qcowsetup close qs-held
	rm -f /tmp/held.qcow2
	[ $rc = 5 ]
	vm_assert_clean
}
vm_test "an image QEMU holds for writing (qemu-nbd) is refused, exit 5" qemu_holds

vm_summary
