#!/bin/sh
# The guest part of tests/vm/test-bind.sh (see there). Disk: vda ext4
# "qsbind" with images/t.qcow2, bound to tang at 127.0.0.1:$(cat port). The
# share holds tang's keys (tang/), the md5 of the image's guest data and the
# passphrase; tpm (present when the VM has a TPM) says p.qcow2 is bound to
# it with no policy and m.qcow2 to PCR 0 before the boot.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
T=/tmp/qcowtab
PORT=$(cat "$here/port")
qs() { qcowsetup --qcowtab $T "$@"; }
md5_of() { md5sum < "/dev/mapper/$1" | cut -d' ' -f1; }

# clevis's scripts start with #!/bin/bash
[ -e /bin/bash ] || ln -s "$(command -v bash)" /bin/bash
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
cat > $T <<EOT
t  LABEL=qsbind:/images/t.qcow2  none  readonly,clevis,tries=1
EOT

tang_up() {
	socat "TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,fork" EXEC:"/usr/libexec/tangd $here/tang" 2>/dev/null &
	echo $! > /tmp/tang.pid
	i=0
	while ! curl -sf "http://127.0.0.1:$PORT/adv" >/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
}
tang_down() { kill "$(cat /tmp/tang.pid)"; }

t_tang_no_question() {
	tang_up
	qs --batch-mode -v open --tab t </dev/null
	[ "$(md5_of t)" = "$(cat "$here/t.md5")" ]
	qs close --tab t
	vm_assert_clean
}
t_bind_refuses_rw_mapping() {
	# tang is up (the test before); the image mapped read-write
	sed "s|readonly,||" $T > /tmp/qcowtab.w
	qcowsetup --qcowtab /tmp/qcowtab.w --batch-mode open --tab t </dev/null
	img=$(awk '$1 == "/dev/vda" { print $2; exit }' /proc/mounts)/images/t.qcow2
	head -c 65536 "$img" | md5sum > /tmp/hdr.md5
	for c in "bind $img tang {\"url\":\"http://127.0.0.1:$PORT\"}" "unbind $img 1"; do
		rc=0
		# shellcheck disable=SC2086
		qcowsetup --batch-mode --key-file "$here/pass" $c 2>/tmp/err || rc=$?
		cat /tmp/err
		[ "$rc" = 5 ] && grep -q 'open for writing' /tmp/err
	done
	head -c 65536 "$img" | md5sum | cmp - /tmp/hdr.md5
	# every cluster of t is allocated: no slow-path device in its table,
	# close finds the daemon by its state file
	qcowsetup --qcowtab /tmp/qcowtab.w close --tab t
	vm_assert_clean
}
# plain open (no qcowtab): --token-only, --clevis, on the image's path
# the image disk's filesystem where it is mounted (open --tab may have left
# it), else mounted read-only on /tmp/hold
hold_open() {
	hold=$(awk '$1 == "/dev/vda" { print $2; exit }' /proc/mounts)
	[ -n "$hold" ] && return 0
	mkdir -p /tmp/hold && mount -o ro /dev/vda /tmp/hold && hold=/tmp/hold
}
hold_close() { [ "$hold" != /tmp/hold ] || umount /tmp/hold; }
t_open_token_only() {
	hold_open
	qcowsetup --batch-mode open --readonly --token-only "$hold/images/t.qcow2" t </dev/null
	[ "$(md5_of t)" = "$(cat "$here/t.md5")" ]
	qcowsetup close t
	hold_close
	vm_assert_clean
}
t_open_token_only_down() {
	hold_open
	rc=0
	qcowsetup open --readonly --token-only "$hold/images/t.qcow2" t < "$here/pass" 2>/tmp/err || rc=$?
	cat /tmp/err
	[ "$rc" = 2 ] && [ ! -e /dev/mapper/t ] && grep -q 'no binding unlocked it\.$' /tmp/err
	qcowsetup open --readonly --clevis --token-timeout 10 "$hold/images/t.qcow2" t < "$here/pass" 2>&1 | tee /tmp/out
	grep -q 'asking for a passphrase' /tmp/out
	[ "$(md5_of t)" = "$(cat "$here/t.md5")" ]
	qcowsetup close t
	hold_close
	vm_assert_clean
}
t_tang_down_asks() {
	tang_down
	qs open --tab t < "$here/pass" 2>&1 | tee /tmp/out
	grep -q 'asking for a passphrase' /tmp/out
	[ "$(md5_of t)" = "$(cat "$here/t.md5")" ]
	qs close --tab t
	vm_assert_clean
}
t_tang_down_batch_fails() {
	rc=0
	qs --batch-mode open --tab t </dev/null || rc=$?
	[ "$rc" = 2 ] && [ ! -e /dev/mapper/t ]
	vm_assert_clean
}

t_tpm2_no_question() {
	ls -l /dev/tpm*
	sed "s|/images/t.qcow2|/images/p.qcow2|" $T > /tmp/qcowtab.p
	qcowsetup --qcowtab /tmp/qcowtab.p --batch-mode -v open --tab t </dev/null
	[ "$(md5_of t)" = "$(cat "$here/t.md5")" ]
	qs close --tab t
	vm_assert_clean
}
t_tpm2_pcr_mismatch_asks() {
	sed "s|/images/t.qcow2|/images/m.qcow2|" $T > /tmp/qcowtab.m
	rc=0
	qcowsetup --qcowtab /tmp/qcowtab.m --batch-mode open --tab t </dev/null || rc=$?
	[ "$rc" = 2 ] && [ ! -e /dev/mapper/t ]
	qcowsetup --qcowtab /tmp/qcowtab.m open --tab t < "$here/pass" 2>&1 | tee /tmp/out
	grep -q 'asking for a passphrase' /tmp/out
	[ "$(md5_of t)" = "$(cat "$here/t.md5")" ]
	qs close --tab t
	vm_assert_clean
}

vm_require curl socat jose clevis
vm_test "clevis: open --tab unlocks by the tang binding, no question" t_tang_no_question
vm_test "bind and unbind refuse an image mapped read-write (exit 5, header unchanged)" t_bind_refuses_rw_mapping
vm_test "open --token-only: the tang binding maps the image, no question" t_open_token_only
vm_test "clevis: tang down: falls back to the passphrase (stdin)" t_tang_down_asks
vm_test "clevis: tang down and --batch-mode: exit 2, nothing mapped" t_tang_down_batch_fails
vm_test "open: tang down: --token-only exit 2, nothing mapped; --clevis then the passphrase" t_open_token_only_down
if [ -f "$here/tpm" ]; then
	vm_test "clevis: open --tab unlocks by the tpm2 binding (QEMU's tpm-tis, swtpm), no question" t_tpm2_no_question
	vm_test "clevis: a PCR 0 policy that no longer matches: --batch-mode fails, then the passphrase" \
		t_tpm2_pcr_mismatch_asks
fi
vm_cleanup
vm_summary
