#!/bin/bash
# Automake test: unlocking by clevis bindings at run time, in the VM test bed
# (tests/vm/bed/run-vm.sh): `qcowsetup open --tab` of an entry with the
# clevis option maps a LUKS qcow2 through its tang binding with no question
# asked (--batch-mode); with the tang server down it falls back to the
# passphrase (a line of standard input), and --batch-mode then fails. The
# tang server runs in the guest on its loopback only (tangd behind socat),
# with the keys the host bound the image with (on the host's loopback). The
# guest part is tests/vm/guest/bind.sh.
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
trap 'kill $tang 2>/dev/null || true; work_cleanup' EXIT
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
export QS_VM_CACHE=${QS_VM_CACHE:-$builddir/tests/vm/out/bind}
"$here/bed/run-vm.sh" --share "$work/share" --disk "$work/hold.img" "${extras[@]}" \
	--timeout "${QS_BIND_TIMEOUT:-600}" ${QS_VERBOSE:+--env QS_VERBOSE=1} -- bind.sh
