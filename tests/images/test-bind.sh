#!/bin/bash
# test-bind.sh: `qcowsetup bind`, `unbind`, `test-bindings` and the listing
# of bindings by `info` and `dump-keys`, with clevis's tang and tpm2 pins
# (and sss over both) against servers on this machine only: tangd behind
# socat on 127.0.0.1, swtpm as a socket TPM that clevis reaches through
# TPM2TOOLS_TCTI.
#
# A binding lives in a qcow2 header extension: it must survive QEMU using
# the image (qemu-io writes, qemu-img amend adding a key slot and changing
# lazy_refcounts, resize, snapshot -c; qemu-img check stays clean) and
# still unlock. Unbinding removes key slot and binding; a pin that fails,
# a wrong passphrase or a header cluster too small leave the image as it
# was. Tang down and a PCR policy that no longer matches: no unlock.
#
# Env: QCOWSETUP. Exit 77 without qemu-img/qemu-io, clevis, tangd, socat
# (the tpm2 cases are skipped without swtpm and tpm2-tools). QS_KEEP=1
# keeps the work folder.
set -u
export LC_ALL=C
me=test-bind
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
need qemu-img qemu-io clevis socat python3 jq
[ -x /usr/libexec/tangd ] && [ -x /usr/libexec/tangd-keygen ] || skip_test "tang (tangd) not installed"
need_qcowsetup 1
make_work
cd "$work" || exit 1
WORK=$work check_log=log
FAST=(--pbkdf-force-iterations 1000)
Q() { "$QCOWSETUP" "$@"; }
not() { ! "$@"; }

pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	[ -f tpm/pid ] && kill "$(cat tpm/pid)" 2>/dev/null
	work_cleanup
}
trap cleanup EXIT

# free_port [N]: the first of N (1) free TCP ports in a row on the loopback
free_port() {
	python3 - "${1:-1}" <<'PY'
import socket, sys
n = int(sys.argv[1])
for base in range(20000, 60000, 7):
    try:
        socks = []
        for p in range(base, base + n):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            socks.append(s)
        print(base)
        break
    except OSError:
        pass
PY
}
# wait_port PORT: until something listens there (5 s)
wait_port() {
	local i
	for ((i = 0; i < 50; i++)); do
		python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

# ---- tang on 127.0.0.1 ----
mkdir tang
/usr/libexec/tangd-keygen tang >>log 2>&1 || hard_error "tangd-keygen failed"
TANG_PORT=$(free_port)
tang_up() {
	socat "TCP-LISTEN:$TANG_PORT,bind=127.0.0.1,reuseaddr,fork" EXEC:"/usr/libexec/tangd $WORK/tang" 2>>tang.log &
	tang_pid=$!
	pids+=("$tang_pid")
	wait_port "$TANG_PORT" || hard_error "tang does not listen"
}
tang_down() { kill "$tang_pid"; wait "$tang_pid" 2>/dev/null; }
TANG="{\"url\":\"http://127.0.0.1:$TANG_PORT\"}"
tang_up

# ---- swtpm ----
have_tpm=0
if command -v swtpm >/dev/null && command -v tpm2_pcrextend >/dev/null && [ -x /usr/bin/clevis-encrypt-tpm2 ]; then
	mkdir tpm
	# the swtpm TCTI finds the control channel at the next port
	TPM_PORT=$(free_port 2)
	TPM_CTRL=$((TPM_PORT + 1))
	if swtpm socket --tpm2 --tpmstate dir="$WORK/tpm" --server "type=tcp,port=$TPM_PORT,bindaddr=127.0.0.1" \
		--ctrl "type=tcp,port=$TPM_CTRL,bindaddr=127.0.0.1" --flags not-need-init,startup-clear \
		--daemon --pid file="$WORK/tpm/pid" >>log 2>&1 && wait_port "$TPM_PORT"; then
		export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$TPM_PORT"
		have_tpm=1
	fi
fi

printf '%s' 'first passphrase' >k1
printf '%s' 'second passphrase' >k2
printf '%s' 'not the passphrase' >kw
chmod 600 k1 k2 kw

# qimg ARGS...: qemu-img/qemu-io with k1 as the image's secret
SECRET=(--object "secret,id=s0,file=$WORK/k1")
opts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=s0"; }
qcheck() { qemu-img check "${SECRET[@]}" --image-opts "$(opts "$1")" >>log 2>&1; }
qio() {
	local img=$1
	shift
	qemu-io "${SECRET[@]}" --image-opts "$(opts "$img")" "$@" >>log 2>&1
}
# slots IMG: the active key slots, "0 1 ..."
slots() { Q dump-keys --json "$1" | jq -r '[.slots[] | select(.active) | .slot] | map(tostring) | join(" ")'; }
# bound IMG: the bound slots and pins, "1:tang 2:tpm2"
bound() { Q info --json "$1" | jq -r '[.["backing-chain"][0].encrypt.bindings[] | "\(.slot):\(.pin)"] | join(" ")'; }
# unlocks IMG: some binding unlocks IMG
unlocks() { Q test-bindings "$1" >>log 2>&1; }
# unlocks_slot IMG SLOT: that binding unlocks it
unlocks_slot() { Q test-bindings --json "$1" 2>>log | jq -e ".[] | select(.slot == $2) | .unlocks" >/dev/null; }

img=a.qcow2
retry 3 qemu-img create -q -f qcow2 "${SECRET[@]}" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
	$img 64M >>log 2>&1 || hard_error "qemu-img create failed"
qio $img -c 'write -P 0x11 0 1M' || hard_error "qemu-io write failed"

# ---- bind tang ----
check "bind tang" Q bind -q "${FAST[@]}" --key-file k1 $img tang "$TANG"
check "the binding's key slot is 1" test "$(slots $img)" = "0 1"
check "info --json lists the binding" test "$(bound $img)" = "1:tang"
check "info lists the binding with its configuration" sh -c "'$QCOWSETUP' info $img | grep -qF 'Key slot 1: tang $TANG'"
check "dump-keys lists the binding" sh -c "'$QCOWSETUP' dump-keys $img | grep -qF 'Key slot 1: tang'"
check "dump-keys --json lists the binding" sh -c "'$QCOWSETUP' dump-keys --json $img | jq -e '.bindings[0].pin == \"tang\" and .bindings[0][\"slot-active\"]'"
check "the tang binding unlocks" unlocks $img
check "qemu-img check clean after bind" qcheck $img
check "QEMU still opens it with the passphrase" qio $img -c 'read -P 0x11 0 1M'

# ---- what QEMU does to the image keeps the binding ----
check "qemu-io writes" qio $img -c 'write -P 0x22 8M 2M' -c 'write -z 0 64k'
check "qemu-img amend adds a key slot" retry 3 qemu-img amend "${SECRET[@]}" --object "secret,id=s1,file=$WORK/k2" \
	--image-opts "$(opts $img)" -o encrypt.new-secret=s1,encrypt.state=active,encrypt.iter-time=10
check "qemu-img amend lazy_refcounts=on" qemu-img amend "${SECRET[@]}" --image-opts "$(opts $img)" -o lazy_refcounts=on
check "qemu-img resize" qemu-img resize -q "${SECRET[@]}" --image-opts "$(opts $img)" 128M
check "qemu-img snapshot -c" qemu-img snapshot "${SECRET[@]}" --image-opts "$(opts $img)" -c snap1
check "qemu-img amend lazy_refcounts=off" qemu-img amend "${SECRET[@]}" --image-opts "$(opts $img)" -o lazy_refcounts=off
check "the binding is still listed" test "$(bound $img)" = "1:tang"
check "QEMU's new key slot went to a free slot" test "$(slots $img)" = "0 1 2"
check "the binding still unlocks after QEMU" unlocks $img
check "qemu-img check clean after QEMU" qcheck $img
check "the data QEMU wrote reads back" qio $img -c 'read -P 0x22 8M 2M' -c 'read -P 0 0 64k'

# ---- tang down ----
tang_down
refuse "tang down: test-bindings says no" 2 Q test-bindings $img
cp $img before.qcow2
refuse "bind with tang down fails" 1 Q bind -q "${FAST[@]}" --key-file k1 $img tang "$TANG"
check "... and leaves the image as it was" cmp $img before.qcow2
tang_up
refuse "bind with a wrong passphrase" 2 Q bind -q "${FAST[@]}" --key-file kw $img tang "$TANG"
refuse "bind with an unknown pin" 1 Q bind -q "${FAST[@]}" --key-file k1 $img nosuchpin '{}'
check "... neither touched the image" cmp $img before.qcow2

# ---- tpm2 and sss ----
# tested(SLOT): what the last `test-bindings --json` said of SLOT's binding
tested() { jq -e ".[] | select(.slot == $1) | .unlocks" tb.json >/dev/null; }
if [ "$have_tpm" = 1 ]; then
	check "bind tpm2 (swtpm) with a PCR policy" Q bind -q "${FAST[@]}" --key-file k1 $img tpm2 \
		'{"pcr_bank":"sha256","pcr_ids":"7"}'
	check "bind sss: tang or tpm2" Q bind -q "${FAST[@]}" --key-file k1 $img sss \
		"{\"t\":1,\"pins\":{\"tang\":[$TANG],\"tpm2\":{}}}"
	check "three bindings listed" test "$(bound $img)" = "1:tang 3:tpm2 4:sss"
	Q test-bindings --json $img >tb.json 2>>log
	check "the tang binding unlocks" tested 1
	check "the tpm2 binding unlocks" tested 3
	check "the sss binding unlocks" tested 4
	tpm2_pcrextend "7:sha256=$(printf '%064d' 1)" >>log 2>&1
	tang_down
	Q test-bindings --json $img >tb.json 2>>log
	check "PCR 7 changed: the tpm2 binding does not unlock" not tested 3
	check "tang down: the tang binding does not unlock" not tested 1
	check "tang down, PCR 7 changed: sss unlocks through tpm2" tested 4
	tang_up
	check "qemu-img check clean after the tpm2 bindings" qcheck $img
else
	skipped "tpm2 bindings (no swtpm or tpm2-tools)"
fi

# ---- dracut: clevis and the pins, only for clevis entries ----
# pins_for OPTIONS: the pins 90qcowsetup would install for an entry of $img
pins_for() {
	printf 'root %s none %s\n' "$WORK/$img" "$1" >tab
	QCOWSETUP_QCOWTAB=$WORK/tab QCOWSETUP_BINARY=$QCOWSETUP bash -c \
		". '$top/dracut/90qcowsetup/module-setup.sh'; _qcowsetup_clevis_pins | tr '\n' ' '; depends | grep -c network"
}
# dracut's network module for tang, when this dracut has one (Debian's
# dracut-core has none: then the module warns and leaves it out)
net=0
! compgen -G "/usr/lib/dracut/modules.d/[0-9][0-9]network" >/dev/null || net=1
want_pins="tang $net"
[ "$have_tpm" = 1 ] && want_pins="sss tang tpm2 $net"
check "dracut: the pins of the bindings (and the network for tang)" test "$(pins_for clevis,x-initrd.attach)" = "$want_pins"
check "dracut: nothing of clevis without the option" test "$(pins_for x-initrd.attach)" = 0

# ---- unbind ----
refuse "unbind a slot without a binding" 1 Q unbind --key-file k1 $img 0
check "unbind the tang binding" Q unbind -q --key-file k1 $img 1
check "its key slot is gone" sh -c "! echo ' $(slots $img) ' | grep -q ' 1 '"
check "its binding is gone" sh -c "! echo ' $(bound $img) ' | grep -q ' 1:tang '"
if [ "$have_tpm" = 1 ]; then
	for s in 3 4; do Q unbind -q --key-file k1 $img $s >>log 2>&1 || fail "unbind $s"; done
fi
check "no bindings left, no extension" sh -c "'$QCOWSETUP' info --json $img | jq -e '.[\"backing-chain\"][0].encrypt.bindings == []' && \
	! '$QCOWSETUP' info --json $img | jq -e '.[\"backing-chain\"][0][\"unknown-header-extensions\"]'"
check "qemu-img check clean after unbind" qcheck $img
check "QEMU opens it with the passphrase it added" qemu-io --object "secret,id=s0,file=$WORK/k2" \
	--image-opts "$(opts $img)" -c 'read -P 0x22 8M 2M'

# ---- a backing file name moves behind the extension and stays ----
qemu-img create -q -f qcow2 base.raw.qcow2 128M
retry 3 qemu-img create -q -f qcow2 "${SECRET[@]}" -b base.raw.qcow2 -F qcow2 \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 b.qcow2 >>log 2>&1
check "bind an image with a backing file" Q bind -q "${FAST[@]}" --key-file k1 b.qcow2 tang "$TANG"
check "the backing file name is intact" sh -c "qemu-img info --output=json b.qcow2 | jq -e '.[\"backing-filename\"] == \"base.raw.qcow2\"'"
check "it unlocks" unlocks b.qcow2
check "qemu-img check clean (backing file)" qcheck b.qcow2

# ---- a header cluster too small for a JWE ----
retry 3 qemu-img create -q -f qcow2 "${SECRET[@]}" -o cluster_size=512,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
	c.qcow2 16M >>log 2>&1
cp c.qcow2 c0.qcow2
refuse "512-byte clusters: no room for a binding" 4 Q bind -q "${FAST[@]}" --key-file k1 c.qcow2 tang "$TANG"
check "... the image is as it was" cmp c.qcow2 c0.qcow2

summary
