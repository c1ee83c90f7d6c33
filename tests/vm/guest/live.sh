#!/bin/sh
# Runs in the VM (see test-live.sh): /dev/vda is an ext4 disk with the images
# (luks.qcow2 with the passphrase in pass, plain.qcow2, chain.qcow2 over
# mid.qcow2 over base.raw). suspend, resume, refresh and snapshot on live
# mappings.
. /host/lib.sh
export PATH=/usr/local/bin:$PATH
vm_images_disk
sec="--object secret,id=s0,file=/mnt/m/pass"
printf 'not the passphrase' >/mnt/m/wrong

img_opts() {	# qemu-img arguments naming image $1
	case $1 in
	*luks*) echo "$sec --image-opts driver=qcow2,file.filename=$1,encrypt.key-secret=s0" ;;
	*) echo "-f qcow2 $1" ;;
	esac
}
key_opts() { case $1 in *luks*) echo "--key-file /mnt/m/pass" ;; esac; }
to_raw() {	# image raw
	# shellcheck disable=SC2046
	qemu-img convert $(img_opts "$1") -O raw "$2"
}
qcompare() {	# image raw: the same guest content
	case $1 in
	*luks*) qemu-img compare $sec --image-opts "driver=qcow2,file.filename=$1,encrypt.key-secret=s0" \
			"driver=raw,file.filename=$2" >/dev/null ;;
	*) qemu-img compare -f qcow2 -F raw "$1" "$2" >/dev/null ;;
	esac
}
qcheck() {	# image: neither errors nor leaks
	# shellcheck disable=SC2046
	qemu-img check $(img_opts "$1") >/tmp/check.out 2>&1 || { cat /tmp/check.out; return 1; }
}

# A copy of image $1 (a chain: its folder's files) in /mnt/m/w, as w/IMG.
copy() {
	rm -rf /mnt/m/w && mkdir /mnt/m/w
	cp "$1" /mnt/m/w/
	case $1 in chain*) cp mid.qcow2 base.raw /mnt/m/w/ ;; esac
}

state_of() {	# NAME: suspended or active, as status --json says
	qcowsetup status --json "$1" | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p'
}

# No volume key while suspended: every crypt table's key is wiped (zeros)
# and no key of ours is in the keyring.
no_keys() {
	dmsetup table --showkeys >/tmp/tables
	if awk '$3 == "crypt" && $5 !~ /^0+$/ { bad = 1; print } END { exit !bad }' /tmp/tables; then
		echo "a crypt table holds a key while suspended"
		return 1
	fi
	if grep -q qcowsetup /proc/keys 2>/dev/null; then
		echo "a key in /proc/keys:"; grep qcowsetup /proc/keys
		return 1
	fi
	[ "$(grep -c ' crypt ' /tmp/tables)" = "${1:-0}" ] || { echo "expected ${1:-0} crypt tables"; cat /tmp/tables; return 1; }
}

keys_back() {	# the crypt tables name keyring keys again
	dmsetup table --showkeys | awk '$3 == "crypt" && $5 !~ /^:[0-9]+:logon:/ { bad = 1; print } END { exit bad }'
}

# ---- held I/O: issued while suspended, done after resume, right data
held_io() {	# image [ro]
	img=$1 mode=${2:-rw}
	copy "$img"
	w=/mnt/m/w/$img
	to_raw "$w" /tmp/ref.raw
	ncrypt=0
	case $img in *luks*) ncrypt=1 ;; esac
	if [ "$mode" = ro ]; then
		# shellcheck disable=SC2046
		qcowsetup open --readonly $(key_opts "$img") "$w" lv
	else
		# shellcheck disable=SC2046
		qcowsetup open $(key_opts "$img") "$w" lv
		rw-workload write --seed 11 --ops 30 --flush-every 5 /dev/mapper/lv /tmp/ref.raw >/dev/null
	fi
	qcowsetup suspend lv
	[ "$(state_of lv)" = suspended ] || { echo "status does not say suspended"; qcowsetup status lv; return 1; }
	qcowsetup status lv | grep -q 'is suspended'
	no_keys $ncrypt
	rc=0
	qcowsetup suspend lv 2>/tmp/err || rc=$?
	[ $rc = 5 ] || { echo "suspend of a suspended mapping: exit $rc"; return 1; }
	# I/O while suspended: held, not failed
	rm -f /tmp/held.rc /tmp/held.out
	echo 3 >/proc/sys/vm/drop_caches
	if [ "$mode" = ro ]; then
		(md5sum </dev/mapper/lv >/tmp/held.out; echo $? >/tmp/held.rc) &
	else
		(rw-workload write --seed 12 --ops 20 --flush-every 4 /dev/mapper/lv /tmp/ref.raw >/tmp/held.out 2>&1
		 echo $? >/tmp/held.rc) &
	fi
	sleep 2
	[ ! -e /tmp/held.rc ] || { echo "I/O went through (or failed) while suspended: rc $(cat /tmp/held.rc)"; cat /tmp/held.out; return 1; }
	if [ $ncrypt != 0 ]; then
		rc=0
		qcowsetup resume --key-file /mnt/m/wrong lv 2>/tmp/err || rc=$?
		[ $rc = 2 ] || { cat /tmp/err; echo "wrong passphrase: exit $rc"; return 1; }
		[ "$(state_of lv)" = suspended ] || { echo "not suspended after a wrong passphrase"; return 1; }
		no_keys $ncrypt
		[ ! -e /tmp/held.rc ] || { echo "I/O went on after a wrong passphrase"; return 1; }
	fi
	# shellcheck disable=SC2046
	qcowsetup resume $(key_opts "$img") lv
	wait
	[ "$(cat /tmp/held.rc)" = 0 ] || { echo "held I/O failed"; cat /tmp/held.out; return 1; }
	[ "$(state_of lv)" = active ]
	keys_back
	if [ "$mode" = ro ]; then
		[ "$(cut -d' ' -f1 /tmp/held.out)" = "$(md5sum </tmp/ref.raw | cut -d' ' -f1)" ] || { echo "read while suspended: wrong data"; return 1; }
	fi
	cmp /dev/mapper/lv /tmp/ref.raw || { echo "content differs after resume"; return 1; }
	rc=0
	qcowsetup resume lv 2>/tmp/err || rc=$?
	[ $rc = 1 ] || { echo "resume of an active mapping: exit $rc"; return 1; }
	qcowsetup close lv
	qcheck "$w"
	qcompare "$w" /tmp/ref.raw
	[ ! -e /run/qcowsetup/lv.suspended ] || { echo "marker left"; return 1; }
	vm_assert_clean
}

# ---- the daemon killed while suspended
daemon_dies() {	# image
	img=$1
	copy "$img"
	w=/mnt/m/w/$img
	to_raw "$w" /tmp/ref.raw
	# shellcheck disable=SC2046
	qcowsetup open $(key_opts "$img") "$w" lv
	rw-workload write --seed 21 --ops 20 --flush-every 4 /dev/mapper/lv /tmp/ref.raw >/dev/null
	pid=$(qcowsetup status lv | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p')
	qcowsetup suspend lv
	rm -f /tmp/held.rc /tmp/held.out
	(rw-workload write --seed 22 --ops 10 --flush-every 3 /dev/mapper/lv /tmp/ref.raw >/tmp/held.out 2>&1
	 echo $? >/tmp/held.rc) &
	sleep 1
	kill -9 "$pid"
	sleep 2
	# the guardian leaves a suspended mapping suspended; reattach and close refuse
	[ "$(state_of lv)" = suspended ] || { echo "no longer suspended after the daemon died"; return 1; }
	dmsetup info lv | grep -q SUSPENDED || { echo "the guardian resumed the top device"; return 1; }
	no_keys "$(case $img in *luks*) echo 1 ;; *) echo 0 ;; esac)"
	[ ! -e /tmp/held.rc ] || { echo "held I/O ended: rc $(cat /tmp/held.rc)"; return 1; }
	rc=0
	qcowsetup reattach lv 2>/tmp/err || rc=$?
	[ $rc = 5 ] || { cat /tmp/err; echo "reattach of a suspended mapping: exit $rc"; return 1; }
	rc=0
	qcowsetup close lv 2>/tmp/err || rc=$?
	[ $rc = 5 ] || { cat /tmp/err; echo "close of a suspended mapping: exit $rc"; return 1; }
	# resume starts a new daemon
	# shellcheck disable=SC2046
	qcowsetup resume $(key_opts "$img") lv
	wait
	[ "$(cat /tmp/held.rc)" = 0 ] || { echo "held I/O failed"; cat /tmp/held.out; return 1; }
	qcowsetup status lv | grep -q 'daemon pid.*running' || { echo "no daemon after resume"; return 1; }
	cmp /dev/mapper/lv /tmp/ref.raw || { echo "content differs"; return 1; }
	qcowsetup close lv
	qcheck "$w"
	qcompare "$w" /tmp/ref.raw
	vm_assert_clean
}

# ---- refresh: discards on and off, live
discard_max() {
	cat "/sys/block/dm-$(dmsetup info -c --noheadings -o minor lv | tr -d ' ')/queue/discard_max_bytes"
}
nbd_discard_max() {	# of the mapping's slow path (the NBD device)
	cat "/sys/block/$(qcowsetup status lv | sed -n 's|.*slow path: /dev/\(nbd[0-9]*\).*|\1|p')/queue/discard_max_bytes"
}
loop_discard_max() {	# file: discard_max_bytes of the read-write loop device over it
	for l in /sys/block/loop*; do
		[ "$(cat "$l/loop/backing_file" 2>/dev/null)" = "$1" ] && [ "$(cat "$l/ro")" = 0 ] &&
			cat "$l/queue/discard_max_bytes" && return
	done
	echo none
}
# An empty image: its top table maps nothing to its loop device (all of it
# on the slow path) when refresh runs; the clusters written later are.
refresh_empty() {
	copy empty.qcow2
	w=/mnt/m/w/empty.qcow2
	to_raw "$w" /tmp/ref.raw
	qcowsetup open "$w" lv
	[ "$(loop_discard_max "$w")" = 0 ] || { echo "the loop device passes discards after open"; return 1; }
	[ "$(discard_max)" = 0 ] || { echo "the top device (all on the slow path) passes discards after open"; return 1; }
	qcowsetup refresh --allow-discards lv
	[ "$(discard_max)" != 0 ] || { echo "the top device passes no discards after refresh"; return 1; }
	[ "$(loop_discard_max "$w")" != 0 ] || { echo "the loop device passes no discards after refresh"; return 1; }
	rw-workload write --seed 32 --ops 10 --flush-every 3 /dev/mapper/lv /tmp/ref.raw >/dev/null
	qcowsetup refresh --no-allow-discards lv
	[ "$(loop_discard_max "$w")" = 0 ] || { echo "the loop device passes discards still"; return 1; }
	cmp /dev/mapper/lv /tmp/ref.raw
	qcowsetup close lv
	qcheck "$w"
	vm_assert_clean
}
crypt_flag() {	# whether the crypt table has allow_discards
	dmsetup table lv_crypt | grep -q allow_discards
}
refresh() {	# image [ro]
	img=$1 mode=${2:-rw}
	copy "$img"
	w=/mnt/m/w/$img
	to_raw "$w" /tmp/ref.raw
	ro=
	[ "$mode" = rw ] || ro=--readonly
	# shellcheck disable=SC2046
	qcowsetup open $ro $(key_opts "$img") "$w" lv
	[ "$mode" = ro ] || [ "$(discard_max)" = 0 ] || { echo "discards without --allow-discards"; return 1; }
	[ "$mode" = ro ] || [ "$(nbd_discard_max)" = 0 ] || { echo "the NBD device offers discards without --allow-discards"; return 1; }
	case $img in *luks*) ! crypt_flag ;; esac
	# shellcheck disable=SC2046
	qcowsetup refresh --allow-discards $(key_opts "$img") lv
	case $img in *luks*) crypt_flag || { echo "no allow_discards in the crypt table"; dmsetup table lv_crypt; return 1; } ;; esac
	if [ "$mode" = rw ]; then
		[ "$(discard_max)" != 0 ] || { echo "no discards after refresh --allow-discards"; return 1; }
		[ "$(nbd_discard_max)" != 0 ] || { echo "the NBD device offers no discards after refresh"; return 1; }
		blkdiscard -o 0 -l 1048576 /dev/mapper/lv
		dd if=/dev/zero of=/tmp/ref.raw bs=1M count=1 conv=notrunc 2>/dev/null
		# (a discarded range may read back as before or as zeros: compare the rest)
		cmp /dev/mapper/lv /tmp/ref.raw 1048576 1048576
		rw-workload write --seed 31 --ops 10 --flush-every 3 /dev/mapper/lv /tmp/ref.raw >/dev/null
		# (also when the top table mapped nothing to it at the refresh)
		[ "$(loop_discard_max "$w")" != 0 ] || { echo "the image's loop device passes no discards"; return 1; }
	fi
	# shellcheck disable=SC2046
	qcowsetup refresh --no-allow-discards $(key_opts "$img") lv
	case $img in *luks*) ! crypt_flag ;; esac
	[ "$mode" = ro ] || [ "$(discard_max)" = 0 ] || { echo "discards after refresh --no-allow-discards"; return 1; }
	[ "$mode" = ro ] || [ "$(nbd_discard_max)" = 0 ] || { echo "the NBD device offers discards still"; return 1; }
	[ "$mode" = ro ] || [ "$(loop_discard_max "$w")" = 0 ] || { echo "the loop device passes discards still"; return 1; }
	cmp /dev/mapper/lv /tmp/ref.raw 1048576 1048576
	qcowsetup close lv
	qcheck "$w"
	vm_assert_clean
}

# ---- atomic: a failure at each step of suspend, then of resume
mapping_works() {	# still active, readable, keys in place, no marker
	[ "$(state_of lv)" = active ] || { echo "not active"; return 1; }
	dd if=/dev/mapper/lv of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null
	keys_back
	[ ! -e /run/qcowsetup/lv.suspended ] || { echo "marker left"; return 1; }
	dmsetup info | grep -q SUSPENDED && { echo "a device left suspended"; dmsetup info; return 1; }
	return 0
}
still_suspended() {
	[ "$(state_of lv)" = suspended ] || { echo "not suspended"; return 1; }
	no_keys "$1"
	[ -e /run/qcowsetup/lv.suspended ] || { echo "marker gone"; return 1; }
}
fault_steps() {	# image
	img=$1
	copy "$img"
	w=/mnt/m/w/$img
	to_raw "$w" /tmp/ref.raw
	ncrypt=0
	case $img in *luks*) ncrypt=1 ;; esac
	# shellcheck disable=SC2046
	qcowsetup open $(key_opts "$img") "$w" lv
	rw-workload write --seed 41 --ops 10 --flush-every 3 /dev/mapper/lv /tmp/ref.raw >/dev/null
	k=1
	while :; do
		rc=0
		qcowsetup suspend --debug-fail-step $k lv 2>/tmp/err || rc=$?
		[ $rc != 0 ] || break
		grep -q "Injected failure at step $k" /tmp/err || { cat /tmp/err; return 1; }
		if grep -q 'stays suspended' /tmp/err; then
			# a key wipe failed after another: suspended, resume brings it back
			still_suspended $ncrypt || { echo "after failing suspend step $k"; return 1; }
			# shellcheck disable=SC2046
			qcowsetup resume $(key_opts "$img") lv
		fi
		mapping_works || { echo "after failing suspend step $k"; return 1; }
		k=$((k + 1))
		[ $k -lt 40 ] || return 1
	done
	echo "suspend: $((k - 1)) steps failed in turn, each undone"
	still_suspended $ncrypt
	k=1
	while :; do
		rc=0
		# shellcheck disable=SC2046
		qcowsetup resume --debug-fail-step $k $(key_opts "$img") lv 2>/tmp/err || rc=$?
		[ $rc != 0 ] || break
		grep -q "Injected failure at step $k" /tmp/err || { cat /tmp/err; return 1; }
		still_suspended $ncrypt || { echo "after failing resume step $k"; return 1; }
		k=$((k + 1))
		[ $k -lt 40 ] || return 1
	done
	echo "resume: $((k - 1)) steps failed in turn, each undone"
	mapping_works
	# refresh too: each failure leaves the tables as they were
	k=1
	while :; do
		rc=0
		# shellcheck disable=SC2046
		qcowsetup refresh --allow-discards --debug-fail-step $k $(key_opts "$img") lv 2>/tmp/err || rc=$?
		[ $rc != 0 ] || break
		grep -q "Injected failure at step $k" /tmp/err || { cat /tmp/err; return 1; }
		mapping_works || { echo "after failing refresh step $k"; return 1; }
		[ "$(discard_max)" = 0 ] || { echo "discards on after failing refresh step $k"; return 1; }
		k=$((k + 1))
		[ $k -lt 40 ] || return 1
	done
	echo "refresh: $((k - 1)) steps failed in turn, each undone"
	rw-workload write --seed 42 --ops 10 --flush-every 3 /dev/mapper/lv /tmp/ref.raw >/dev/null
	cmp /dev/mapper/lv /tmp/ref.raw
	qcowsetup close lv
	qcheck "$w"
	qcompare "$w" /tmp/ref.raw
	ls /run/qcowsetup/ | grep -q '^lv\.' && { echo "files left:"; ls /run/qcowsetup; return 1; }
	vm_assert_clean
}

# ---- commit: the overlay merged into its backing image while mapped
base_of() {	# overlay: its backing image (the host made them in pairs)
	case $1 in
	cluks-over-raw.qcow2) echo cbase.raw ;;
	cplain-over-luks.qcow2) echo cbase-luks.qcow2 ;;
	cluks-over-plain.qcow2) echo cbase-plain.qcow2 ;;
	cplain-over-plain.qcow2) echo cbase-plain.qcow2 ;;
	cluks-over-luks.qcow2) echo cbase-luks.qcow2 ;;
	esac
}
base_to_raw() {	# base raw: what the base alone holds
	case $1 in
	*.raw) cp "$1" "$2" ;;
	*) to_raw "$1" "$2" ;;
	esac
}
held_files() {	# the image files NAME lv maps, one a line
	qcowsetup status --json lv | tr ',' '\n' | sed -n 's|.*"\(/mnt/m/w/[^"]*\)".*|\1|p' | sort -u
}
locked() {	# file: whether an OFD lock is on it
	ino=$(stat -c %i "$1")
	grep -q ":$ino " /proc/locks
}
# A failing commit leaves NAME lv on the overlay, working, with the same
# content (/tmp/ref.raw), the same devices ($ndev), the base clean.
commit_undone() {	# step
	grep -q "Injected failure at step $1" /tmp/err || { cat /tmp/err; return 1; }
	mapping_works || { echo "after failing commit step $1"; return 1; }
	held_files | grep -qx "$w" || { echo "not on the overlay after failing step $1"; held_files; return 1; }
	[ "$(vm_dm_devices | wc -l)" = "$ndev" ] || { echo "devices left after step $1:"; dmsetup ls; return 1; }
	cmp /dev/mapper/lv /tmp/ref.raw || { echo "content changed after failing step $1"; return 1; }
	case $b in *.qcow2) qcheck "$b" || { echo "base not clean after failing step $1"; return 1; } ;; esac
}
commit_case() {	# overlay [fail-at-step|all]
	ov=$1 faults=${2:-}
	base=$(base_of "$ov")
	! grep -q ' /mnt/c ' /proc/mounts || umount -l /mnt/c	# (of a failed case)
	rm -rf /mnt/m/w && mkdir /mnt/m/w
	cp "$ov" "$base" /mnt/m/w/
	w=/mnt/m/w/$ov b=/mnt/m/w/$base
	qcowsetup open --key-file /mnt/m/pass "$w" lv
	mkfs.ext4 -q /dev/mapper/lv
	mkdir -p /mnt/c
	mount /dev/mapper/lv /mnt/c
	dd if=/dev/urandom of=/mnt/c/before bs=64k count=8 2>/dev/null
	umount /mnt/c	# (a mounted ext4 writes on its own)
	ndev=$(vm_dm_devices | wc -l)
	dd if=/dev/mapper/lv of=/tmp/ref.raw bs=1M iflag=direct 2>/dev/null
	case $faults in
	all)
		k=1
		while :; do
			rc=0
			qcowsetup commit --key-file /mnt/m/pass --debug-fail-step $k lv 2>/tmp/err || rc=$?
			[ $rc != 0 ] || break
			commit_undone $k
			! grep -q 'copy (half' /tmp/err || half=$k
			k=$((k + 1))
			[ $k -lt 40 ] || return 1
		done
		echo "commit: $((k - 1)) steps failed in turn, each undone (the copy cut halfway at step ${half:-?})"
		[ -n "${half:-}" ]
		mount /dev/mapper/lv /mnt/c
		;;
	*)
		if [ -n "$faults" ]; then
			# the copy cut halfway
			rc=0
			qcowsetup commit --key-file /mnt/m/pass --debug-fail-step "$faults" lv 2>/tmp/err || rc=$?
			[ $rc != 0 ] && grep -q "copy (half" /tmp/err || { cat /tmp/err; echo "exit $rc"; return 1; }
			commit_undone "$faults"
		fi
		# someone else holding the base (another mapping, read-only): refused, exit 5
		qcowsetup open --readonly --key-file /mnt/m/pass "$b" lv2
		rc=0
		qcowsetup commit --key-file /mnt/m/pass lv 2>/tmp/err || rc=$?
		qcowsetup close lv2
		[ $rc = 5 ] || { cat /tmp/err; echo "commit with the base open elsewhere: exit $rc"; return 1; }
		grep -q 'lock byte 20[13]' /tmp/err || { cat /tmp/err; return 1; }
		mapping_works
		# written while committed
		mount /dev/mapper/lv /mnt/c
		(i=0; while [ ! -e /tmp/stop ]; do
			dd if=/dev/urandom of=/mnt/c/during$((i % 16)) bs=64k count=2 conv=fsync 2>/dev/null; i=$((i + 1)); done) &
		sleep 1
		qcowsetup commit --verbose --key-file /mnt/m/pass lv
		sleep 1
		touch /tmp/stop
		wait
		rm -f /tmp/stop
		;;
	esac
	dd if=/dev/urandom of=/mnt/c/after bs=64k count=8 2>/dev/null
	sync
	umount /mnt/c
	[ "$(held_files)" = "$b" ] || { echo "the mapping is not on the base alone:"; held_files; return 1; }
	! locked "$w" || { echo "the overlay is still locked"; return 1; }
	dd if=/dev/mapper/lv of=/tmp/guest.raw bs=1M iflag=direct 2>/dev/null
	qcowsetup close lv
	base_to_raw "$b" /tmp/base.raw
	cmp /tmp/guest.raw /tmp/base.raw || { echo "the base alone differs from what the guest saw"; return 1; }
	case $b in *.qcow2) qcheck "$b" ;; esac
	# the overlay is left as it is: clean
	enc=
	case $ov in cluks-*) enc=', "encrypt": {"key-secret": "s0"}' ;; esac
	# shellcheck disable=SC2086
	qemu-img check $sec "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"$w\"}, \"backing\": null$enc}" >/dev/null
	e2fsck -fn /tmp/base.raw >/dev/null
	vm_assert_clean
}

# (step 8 of a LUKS overlay over a raw base: half the copy)
vm_test "commit a LUKS overlay into a raw base while an ext4 on it is written (a copy cut halfway undone first): the base alone holds what the guest saw" commit_case cluks-over-raw.qcow2 8
vm_test "commit an unencrypted overlay into a LUKS qcow2 base: re-encrypted, the base alone holds what the guest saw" commit_case cplain-over-luks.qcow2
if [ "${QS_LIVE_FULL:-0}" != 0 ]; then
	vm_test "commit a LUKS overlay into an unencrypted qcow2 base" commit_case cluks-over-plain.qcow2
	vm_test "commit an unencrypted overlay into an unencrypted qcow2 base" commit_case cplain-over-plain.qcow2
	vm_test "commit a LUKS overlay into a LUKS qcow2 base" commit_case cluks-over-luks.qcow2
	for ov in cluks-over-raw.qcow2 cplain-over-luks.qcow2 cluks-over-plain.qcow2 cplain-over-plain.qcow2 \
		cluks-over-luks.qcow2; do
		vm_test "atomic commit ($ov): a failure at each step is undone" commit_case $ov all
	done
fi

# ---- snapshot: a live external snapshot under a mounted filesystem
over_opts() {	# overlay over an image named by $2: qemu-img arguments
	case $2 in
	*luks*) echo "$sec --image-opts driver=qcow2,file.filename=$1,encrypt.key-secret=s0,backing.encrypt.key-secret=s0" ;;
	*) echo "-f qcow2 $1" ;;
	esac
}
lv_loops() {	# the files of the loop devices, "FILE:ro|rw" a line, sorted
	for l in /sys/block/loop*; do
		[ -s "$l/loop/backing_file" ] || continue
		echo "$(cat "$l/loop/backing_file"):$(case $(cat "$l/ro") in 1) echo ro ;; *) echo rw ;; esac)"
	done | sort | tr '\n' ' '
}
fs_open() {	# image: mapped as lv, ext4 mounted on /mnt/lv with a file "before"
	copy "$1"
	w=/mnt/m/w/$1
	# shellcheck disable=SC2046,SC2086
	qcowsetup open $(key_opts "$1") ${open_opts:-} "$w" lv
	# (no lazy init: its background writes would move the top table)
	mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/lv
	mkdir -p /mnt/lv /mnt/old
	mount /dev/mapper/lv /mnt/lv
	head -c 3000000 /dev/urandom >/mnt/lv/before
	sync
	sum_before=$(md5sum </mnt/lv/before)
}
fs_has() {	# raw file...: a clean ext4 whose "before" (and "after") are right
	raw=$1
	e2fsck -fn "$raw" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; return 1; }
	mount -o ro,loop "$raw" /mnt/old
	rc=0
	[ "$(md5sum </mnt/old/before)" = "$sum_before" ] || { echo "$raw: before differs"; rc=1; }
	[ -z "${sum_after:-}" ] || [ "$(md5sum </mnt/old/after)" = "$sum_after" ] || { echo "$raw: after differs"; rc=1; }
	umount /mnt/old
	return $rc
}
daemons_of_lv() { ps -o pid,args | grep -c '[@]qcowsetup-daemon --name lv '; }
snap_fails() {	# image overlay k: snapshot step k fails; everything as it was
	sleep 1	# (the daemon's last remap round)
	dmsetup table | sort >/tmp/tables.before
	rc=0
	# shellcheck disable=SC2046
	qcowsetup snapshot --iter-time 10 --debug-fail-step "$3" $(key_opts "$1") lv "$2" 2>/tmp/err || rc=$?
	[ $rc != 0 ] || return 2
	grep -q "Injected failure at step $3" /tmp/err || { cat /tmp/err; return 1; }
	# the mapping goes on, on the old image, as it was; nothing left
	dmsetup table | sort | cmp -s - /tmp/tables.before || { echo "tables differ after step $3:"; dmsetup table; return 1; }
	[ ! -e "$2" ] || { echo "overlay left after step $3"; return 1; }
	qcowsetup status lv | grep -q 'daemon pid.*running' || { echo "no daemon after step $3"; return 1; }
	# (a daemon and its guardian; an old guardian is allowed a moment)
	[ "$(daemons_of_lv)" = 2 ] || { sleep 1; [ "$(daemons_of_lv)" = 2 ]; } ||
		{ echo "daemons after step $3:"; ps -o pid,args | grep '[q]cowsetup'; return 1; }
	mapping_works || { echo "after failing snapshot step $3"; return 1; }
	head -c 500000 /dev/urandom >/mnt/lv/during
	sync
}
snapshot_live() {	# image: one failure undone, then fio with verify running across the snapshot
	fs_open "$1"
	ov=/mnt/m/w/over-$1
	sum_after=
	# the new daemon's start (LUKS), the overlay held (else): after the old daemon left
	case $1 in *luks*) k=12 ;; *) k=5 ;; esac
	snap_fails "$1" "$ov" $k
	# fio writes and verifies, again and again, until the snapshot is done
	rm -f /tmp/fio.stop /tmp/fio.rc
	(n=0; while [ ! -e /tmp/fio.stop ]; do
		fio --name=v$n --directory=/mnt/lv --size=1M --rw=randwrite --bs=4k --ioengine=psync --fsync=16 \
			--verify=crc32c --verify_fatal=1 >/tmp/fio.out 2>&1 || { echo $n >/tmp/fio.rc; exit; }
		n=$((n + 1))
	done; echo 0 >/tmp/fio.rc; echo "$n fio runs" >/tmp/fio.runs) &
	sleep 2
	t0=$(vm_uptime)
	# shellcheck disable=SC2046
	qcowsetup snapshot -v --iter-time 10 $(key_opts "$1") lv "$ov"
	echo "snapshot took $(awk -v a="$t0" -v b="$(vm_uptime)" 'BEGIN { printf "%.2f", b - a }') s$([ -e /tmp/fio.rc ] && echo ', fio had stopped')"
	[ ! -e /tmp/fio.rc ] || { echo "fio failed in run $(cat /tmp/fio.rc):"; cat /tmp/fio.out; return 1; }
	sleep 2
	touch /tmp/fio.stop
	wait
	[ "$(cat /tmp/fio.rc)" = 0 ] || { echo "fio failed in run $(cat /tmp/fio.rc):"; cat /tmp/fio.out; return 1; }
	cat /tmp/fio.runs
	# the stack open builds for the overlay: its crypt device NAME_crypt, the
	# old image's NAME_L1_crypt, every internal device with a UUID
	case $1 in
	chain*) want="/mnt/m/w/base.raw:ro /mnt/m/w/chain.qcow2:ro /mnt/m/w/mid.qcow2:ro $ov:rw " ;;
	*) want="$w:ro $ov:rw " ;;
	esac
	want=$(echo "$want" | tr ' ' '\n' | grep . | sort | tr '\n' ' ')
	[ "$(lv_loops)" = "$want" ] || { echo "loop devices: $(lv_loops), not $want"; return 1; }
	dmsetup info -c --noheadings -o name,uuid | sort >/tmp/devs
	if grep -q '\.old' /tmp/devs || awk -F: '$2 == "" { bad = 1 } END { exit !bad }' /tmp/devs; then
		echo "old or UUID-less devices:"; cat /tmp/devs; return 1
	fi
	case $1 in *luks*)
		grep -q '^lv_crypt:QCOW2-INT-.*-lv_crypt$' /tmp/devs && grep -q '^lv_L1_crypt:QCOW2-INT-.*-lv_L1_crypt$' /tmp/devs ||
			{ echo "crypt devices:"; cat /tmp/devs; return 1; }
		qemu-img info -U "$ov" | grep -q 'encrypted: yes' || { echo "the overlay is not encrypted"; qemu-img info -U "$ov"; return 1; } ;;
	esac
	keys_back
	[ "$(daemons_of_lv)" = 2 ] || { sleep 1; [ "$(daemons_of_lv)" = 2 ]; } || { echo "daemons:"; ps -o pid,args | grep '[q]cowsetup'; return 1; }
	# the old image while mapped: read-only locks (QEMU reads it, cannot write it)
	qcheck "$w"
	# shellcheck disable=SC2046
	if qemu-io $(img_opts "$w") -c 'write 0 512' >/tmp/io.out 2>&1; then
		echo "QEMU could write the old image"; return 1
	fi
	grep -q 'lock' /tmp/io.out || { cat /tmp/io.out; return 1; }
	to_raw "$w" /tmp/old.raw
	fs_has /tmp/old.raw
	rm -f /tmp/old.raw
	head -c 1000000 /dev/urandom >/mnt/lv/after
	sync
	sum_after=$(md5sum </mnt/lv/after)
	umount /mnt/lv
	qcowsetup close lv
	# shellcheck disable=SC2046
	qemu-img check $(over_opts "$ov" "$1") >/tmp/check.out 2>&1 || { cat /tmp/check.out; return 1; }
	qcheck "$w"
	# shellcheck disable=SC2046
	qemu-img convert $(over_opts "$ov" "$1") -O raw /tmp/new.raw
	fs_has /tmp/new.raw
	rm -f /tmp/new.raw
	vm_assert_clean
}
snapshot_faults() {	# image: a failure at each step in turn, each undone, then the snapshot
	fs_open "$1"
	ov=/mnt/m/w/over-$1
	k=1
	while :; do
		st=0
		snap_fails "$1" "$ov" $k || st=$?
		[ $st != 2 ] || break
		[ $st = 0 ] || return 1
		k=$((k + 1))
		[ $k -lt 60 ] || return 1
	done
	echo "snapshot: $((k - 1)) steps failed in turn, each undone"
	[ -e "$ov" ] || { echo "no overlay after the last step"; return 1; }
	umount /mnt/lv
	qcowsetup close lv
	qcheck "$w"
	vm_assert_clean
}

vm_test "LUKS read-write: I/O held while suspended, keys wiped, wrong passphrase refused, right data after resume" held_io luks.qcow2
vm_test "LUKS read-only: reads held while suspended, keys wiped, right data after resume" held_io luks.qcow2 ro
vm_test "backing chain read-write: I/O held while suspended, right data after resume" held_io chain.qcow2
vm_test "LUKS: daemon killed while suspended stays suspended; resume starts a new daemon" daemon_dies luks.qcow2
vm_test "refresh LUKS read-write: discards on and off in the crypt table and the top device" refresh luks.qcow2
vm_test "atomic suspend/resume/refresh (LUKS): a failure at each step is undone" fault_steps luks.qcow2
vm_test "snapshot LUKS under mounted ext4 and fio: a failure undone; overlay encrypted, old image clean and read-only" snapshot_live luks.qcow2
if [ "${QS_LIVE_FULL:-0}" != 0 ]; then
	vm_test "unencrypted read-write: I/O held while suspended, right data after resume" held_io plain.qcow2
	vm_test "refresh unencrypted read-write: discards on and off" refresh plain.qcow2
	vm_test "refresh of an empty image (nothing on its loop device yet): the loop device follows" refresh_empty
	vm_test "refresh LUKS read-only: allow_discards in the crypt table" refresh luks.qcow2 ro
	vm_test "atomic suspend/resume/refresh (chain): a failure at each step is undone" fault_steps chain.qcow2
	vm_test "snapshot unencrypted under mounted ext4 and fio" snapshot_live plain.qcow2
	vm_test "snapshot of a backing chain under mounted ext4 and fio" snapshot_live chain.qcow2
	open_opts="--nbd-connections 2" vm_test "snapshot of a LUKS mapping over 2 NBD connections" snapshot_live luks.qcow2
	vm_test "atomic snapshot (LUKS): a failure at each step is undone" snapshot_faults luks.qcow2
	vm_test "atomic snapshot (chain): a failure at each step is undone" snapshot_faults chain.qcow2
fi
vm_summary
