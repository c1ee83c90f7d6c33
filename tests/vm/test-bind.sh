#!/bin/bash
# Automake test: unlocking by clevis bindings at run time, in the VM test bed
# (tests/vm/bed/run-vm.sh): `qcowsetup open --tab` of an entry with the
# clevis option maps a LUKS qcow2 through its tang binding with no question
# asked (--batch-mode); with the tang server down it falls back to the
# passphrase (a line of standard input), and --batch-mode then fails; plain
# `qcowsetup open --token-only` maps it by the binding alone (exit 2 with
# tang down), `open --clevis` falls back to the passphrase. The
# tang server runs in the guest on its loopback only (tangd behind socat),
# with the keys the host bound the image with (on the host's loopback). The
# guest part is tests/vm/guest/bind.sh.
# TPM2 (with swtpm and tpm2-tools): the VM gets a TPM 2.0 through QEMU's
# tpm-tis device, backed by swtpm, whose state the host first used (as a
# socket TPM) to bind p.qcow2 to it with no policy and m.qcow2 to PCR 0 as
# it was before any boot; in the VM, p unlocks with no question, m (the
# firmware measured itself into PCR 0 since) falls back to the passphrase.
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, kernel, clevis, tang or socat), 99 error.
set -eu
me=test-bind
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
qs=${QCOWSETUP:-$builddir/qcowsetup}
need_vm
need qemu-img clevis jose curl socat python3
[ -x /usr/libexec/tangd ] && [ -x /usr/libexec/tangd-keygen ] || skip_test "tang (tangd) not installed"
command -v mkfs.ext4 >/dev/null || PATH=$PATH:/usr/sbin:/sbin
need_built "$qs"

make_work
cd "$work"
PASS='bind secret'
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p share/tang hold/images
/usr/libexec/tangd-keygen share/tang
socat "TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,fork" EXEC:"/usr/libexec/tangd $work/share/tang" 2>/dev/null &
tang=$!
trap 'kill $tang 2>/dev/null || true; [ ! -f tpm/pid ] || kill "$(cat tpm/pid)" 2>/dev/null || true; work_cleanup' EXIT
# swtpm: first a socket TPM for the host's binds (the swtpm TCTI wants its
# control channel at the next port), later the same state for the VM
have_tpm=0
if command -v swtpm >/dev/null && command -v tpm2_unseal >/dev/null && [ -x /usr/bin/clevis-encrypt-tpm2 ] &&
	[ -e /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 ]; then
	mkdir tpm
	TPORT=$(python3 -c '
import socket
for p in range(21000, 60000, 11):
    try:
        a = socket.socket(); a.bind(("127.0.0.1", p)); b = socket.socket(); b.bind(("127.0.0.1", p + 1))
        print(p); break
    except OSError:
        pass')
	if swtpm socket --tpm2 --tpmstate dir="$work/tpm" --server "type=tcp,port=$TPORT,bindaddr=127.0.0.1" \
		--ctrl "type=tcp,port=$((TPORT + 1)),bindaddr=127.0.0.1" --flags not-need-init,startup-clear \
		--daemon --pid file="$work/tpm/pid" 2>/dev/null; then
		export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$TPORT"
		have_tpm=1
	fi
fi
{
	head -c 4M /dev/urandom > t.raw
	printf '%s' "$PASS" > pass.key
	retry 5 qemu-img convert -q -f raw -O qcow2 --object "secret,id=s0,data=$PASS" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 t.raw hold/images/t.qcow2
	sleep 0.3
	"$qs" bind -q --pbkdf-force-iterations 1000 --key-file pass.key hold/images/t.qcow2 tang \
		"{\"url\":\"http://127.0.0.1:$PORT\"}"
	"$qs" test-bindings hold/images/t.qcow2
	md5sum < t.raw | cut -d' ' -f1 > share/t.md5
	if [ "$have_tpm" = 1 ]; then
		for i in p m; do
			cp hold/images/t.qcow2 hold/images/$i.qcow2
			"$qs" unbind -q --key-file pass.key hold/images/$i.qcow2 1
		done
		"$qs" bind -q --pbkdf-force-iterations 1000 --key-file pass.key hold/images/p.qcow2 tpm2 '{}'
		"$qs" bind -q --pbkdf-force-iterations 1000 --key-file pass.key hold/images/m.qcow2 tpm2 \
			'{"pcr_bank":"sha256","pcr_ids":"0"}'
		"$qs" test-bindings hold/images/m.qcow2
		kill "$(cat tpm/pid)"
		echo yes > share/tpm
	fi
	mkfs.ext4 -q -F -L qsbind -E root_owner=0:0 -d hold hold.img 32M
	rm -rf hold t.raw pass.key
} >images.log 2>&1 || { cat images.log; hard_error "cannot make the bound image"; }
kill $tang
printf '%s\n' "$PASS" > share/pass
echo "$PORT" > share/port
guest_script bind share
extras=()
for f in clevis clevis-decrypt clevis-decrypt-tang clevis-decrypt-sss jose curl socat; do
	extras+=(--extra "$(command -v $f)=/usr/bin/$f")
done
extras+=(--extra /usr/libexec/tangd=/usr/libexec/tangd)
tpm_args=()
if [ "$have_tpm" = 1 ]; then
	sleep 0.5
	rm -f tpm/pid
	swtpm socket --tpm2 --tpmstate dir="$work/tpm" --ctrl "type=unixio,path=$work/tpm/sock" \
		--daemon --pid file="$work/tpm/pid" || hard_error "swtpm for the VM did not start"
	for f in clevis-decrypt-tpm2 tpm2_createprimary tpm2_flushcontext tpm2_load tpm2_unseal; do
		extras+=(--extra "$(command -v $f)=/usr/bin/$f")
	done
	extras+=(--extra /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0=/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0)
	tpm_args=(--qemu-arg -chardev --qemu-arg "socket,id=chrtpm,path=$work/tpm/sock"
		--qemu-arg -tpmdev --qemu-arg emulator,id=tpm0,chardev=chrtpm
		--qemu-arg -device --qemu-arg tpm-tis,tpmdev=tpm0)
fi
export QS_VM_CACHE=${QS_VM_CACHE:-$builddir/tests/vm/out/bind}
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/hold.img" "${extras[@]}" "${tpm_args[@]}" \
	--timeout "${QS_BIND_TIMEOUT:-600}" ${QS_VERBOSE:+--env QS_VERBOSE=1} -- bind.sh
