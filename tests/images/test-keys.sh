#!/bin/bash
# test-keys.sh: `qcowsetup format`, `add-key`, `remove-key`, `change-key` and
# `dump-keys` against QEMU.
#
# Every image qcowsetup creates or edits must open in qemu-io with exactly
# the passphrases that should work (and with no other), read and write, and
# pass `qemu-img check`. Also: options of format (cipher, key size, hash,
# cluster size, backing file), key slots of an image QEMU made, refusals
# (wrong passphrase, last key slot, image held by QEMU, existing image), and
# the order in which a key slot change reaches the disk (key material, sync,
# header, sync: with strace when it is installed).
#
# Env: QCOWSETUP (the built binary). Prints PASS:/FAIL: lines and
# "N passed, N failed". Exit 77 when qemu-img or qemu-io is missing.
# QS_KEEP=1 keeps the work folder.
set -u
export LC_ALL=C
me=test-keys
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
need qemu-img qemu-io
need_qcowsetup 1
make_work
WORK=$work
cd "$WORK" || exit 1
ulimit -c 0

# check and refuse log what they run
check_log=log

# Fast key slots: the tests care about formats, not PBKDF cost.
FAST=(--pbkdf-force-iterations 1000)
Q() { "$QCOWSETUP" "$@"; }

printf '%s' 'first passphrase' >k1
printf '%s' 'second passphrase' >k2
printf '%s' 'third passphrase' >k3
printf '%s' 'not the passphrase' >kw

# opens IMG KEY [FMT]: qemu-io opens IMG with KEY and reads its first sector
opens() {
	qemu-io --object "secret,id=s0,file=$WORK/$2" --image-opts \
		"driver=${3:-qcow2},file.filename=$1,encrypt.key-secret=s0" -c 'read 0 512' >>log 2>&1
}
# refuses IMG KEY: QEMU does not open IMG with KEY
refuses() { ! opens "$@"; }
# qio IMG KEY CMD...: qemu-io commands
qio() {
	local img=$1 key=$2
	shift 2
	qemu-io --object "secret,id=s0,file=$WORK/$key" --image-opts \
		"driver=qcow2,file.filename=$img,encrypt.key-secret=s0" "$@"
}
# qcheck IMG KEY: qemu-img check, clean
qcheck() {
	qemu-img check --object "secret,id=s0,file=$WORK/$2" --image-opts \
		"driver=qcow2,file.filename=$1,encrypt.key-secret=s0" >>log 2>&1
}
# qinfo IMG KEY FIELD: a field of qemu-img info --output=json's encrypt data
qinfo() {
	qemu-img info --output=json "$1" 2>>log | python3 -c '
import json, sys
d = json.load(sys.stdin)
e = d["format-specific"]["data"]["encrypt"]
print(e.get(sys.argv[1]))' "$3"
}
# slots IMG: active key slots as dump-keys --json lists them, "0 3"
slots() {
	Q dump-keys --json "$1" 2>>log | python3 -c '
import json, sys
print(" ".join(str(s["slot"]) for s in json.load(sys.stdin)["slots"] if s["active"]))'
}
# writes IMG KEY: QEMU writes a pattern and reads it back, then check is clean
writes() {
	qio "$1" "$2" -c 'write -P 0x5c 1M 192k' -c 'write -P 0x3a 100k 4k' \
		-c 'read -P 0x5c 1M 192k' -c 'read -P 0x3a 100k 4k' >>log 2>&1 &&
		qcheck "$1" "$2"
}

# ---------------------------------------------------------------------------
# format

check "format: default image" Q format --key-file k1 "${FAST[@]}" a.qcow2 64M
check "format: QEMU opens it with the passphrase" opens a.qcow2 k1
check "format: QEMU refuses another passphrase" refuses a.qcow2 kw
check "format: QEMU writes and reads, check clean" writes a.qcow2 k1
check "format: qcowsetup check clean" Q check a.qcow2
check "format: aes-xts-plain64, 512-bit key, sha256" \
	test "$(qinfo a.qcow2 k1 cipher-alg)/$(qinfo a.qcow2 k1 cipher-mode)/$(qinfo a.qcow2 k1 ivgen-alg)/$(qinfo a.qcow2 k1 hash-alg)" = aes-256/xts/plain64/sha256
check "format: virtual size" test "$(qemu-img info --output=json a.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = 67108864
check "format: one key slot" test "$(slots a.qcow2)" = 0

check "format: aes-cbc-essiv:sha256, 256-bit key, sha512, 4K clusters" \
	Q format --key-file k1 "${FAST[@]}" --cipher aes-cbc-essiv:sha256 --key-size 256 --hash sha512 \
	--cluster-size 4K b.qcow2 10M
check "format (cbc-essiv): QEMU writes and reads, check clean" writes b.qcow2 k1
check "format (cbc-essiv): cipher as asked" \
	test "$(qinfo b.qcow2 k1 cipher-alg)/$(qinfo b.qcow2 k1 cipher-mode)/$(qinfo b.qcow2 k1 ivgen-alg)/$(qinfo b.qcow2 k1 hash-alg)" = aes-256/cbc/essiv/sha512
check "format: --iter-time" Q format --key-file k1 --iter-time 100 c.qcow2 1M
check "format (--iter-time): QEMU opens it" opens c.qcow2 k1

# serpent needs the kernel crypto API for libcryptsetup's key slot; QEMU
# then opens it if it has serpent itself
rc=0
Q format --key-file k1 "${FAST[@]}" --cipher serpent-xts-plain64 s.qcow2 1M >>log 2>&1 || rc=$?
if [ $rc = 0 ]; then
	check "format: serpent-xts-plain64 opens in QEMU" opens s.qcow2 k1
else
	skipped "format serpent-xts-plain64 (exit $rc: no serpent for key slots here)"
fi
refuse "format: a cipher QEMU cannot open is refused" 1 \
	Q format --key-file k1 "${FAST[@]}" --cipher aes-cbc-benbi x.qcow2 1M

qemu-img create -q -f qcow2 base.qcow2 8M >>log 2>&1
qemu-io -f qcow2 base.qcow2 -c 'write -P 0x77 0 1M' >>log 2>&1
check "format: --backing-file (size from it)" Q format --key-file k1 "${FAST[@]}" --backing-file base.qcow2 ov.qcow2
check "format (backing): QEMU reads the backing data through it" \
	qio ov.qcow2 k1 -c 'read -P 0x77 0 1M'
check "format (backing): backing file and format recorded" \
	test "$(qemu-img info --output=json ov.qcow2 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["backing-filename"], d["backing-filename-format"], d["virtual-size"])')" = "base.qcow2 qcow2 8388608"
check "format (backing): QEMU writes, check clean" writes ov.qcow2 k1

cp a.qcow2 a.keep
refuse "format: an existing image is refused" 5 Q format --key-file k2 "${FAST[@]}" a.qcow2 1M
check "format: ...and left as it was" cmp a.qcow2 a.keep
check "format --force replaces it" Q format --force --key-file k2 "${FAST[@]}" a.qcow2 2M
check "format --force: the new passphrase opens it" opens a.qcow2 k2
check "format: no temporary file left" test ! -e a.qcow2.qcowsetup-tmp
refuse "format: size not a multiple of 512" 1 Q format --key-file k1 "${FAST[@]}" odd.qcow2 1000
check "format: passphrase from stdin" sh -c "printf 'line pass\n' | '$QCOWSETUP' format ${FAST[*]} stdin.qcow2 1M"
printf '%s' 'line pass' >kline
check "format (stdin): QEMU opens it with the line" opens stdin.qcow2 kline

# ---------------------------------------------------------------------------
# key slots on a qcowsetup image

Q format --key-file k1 "${FAST[@]}" img.qcow2 16M >>log 2>&1
qio img.qcow2 k1 -c 'write -P 0x42 0 1M' >>log 2>&1
check "add-key" Q add-key --key-file k1 "${FAST[@]}" img.qcow2 k2
check "add-key: QEMU opens it with the new passphrase" opens img.qcow2 k2
check "add-key: and still with the old one" opens img.qcow2 k1
check "add-key: the data is unchanged" qio img.qcow2 k2 -c 'read -P 0x42 0 1M'
check "add-key: slots 0 1" test "$(slots img.qcow2)" = "0 1"
check "add-key --key-slot 5 (new key from --new-key-file)" \
	Q add-key --key-file k1 --new-key-file k3 --key-slot 5 "${FAST[@]}" img.qcow2
check "add-key --key-slot 5: slots 0 1 5" test "$(slots img.qcow2)" = "0 1 5"
check "add-key --key-slot 5: QEMU opens it" opens img.qcow2 k3
cp img.qcow2 img.keep
refuse "add-key: wrong passphrase" 2 Q add-key --key-file kw "${FAST[@]}" img.qcow2 k2
check "add-key (wrong passphrase): image unchanged" cmp img.qcow2 img.keep
refuse "add-key: slot in use" 5 Q add-key --key-file k1 --key-slot 5 "${FAST[@]}" img.qcow2 k2
check "qemu-img check clean after add-key" qcheck img.qcow2 k1

check "remove-key" Q remove-key --key-file k2 img.qcow2
check "remove-key: QEMU refuses the removed passphrase" refuses img.qcow2 k2
check "remove-key: the others still open it" sh -c "$(declare -f opens); WORK='$WORK'; opens img.qcow2 k1 && opens img.qcow2 k3"
check "remove-key: slots 0 5" test "$(slots img.qcow2)" = "0 5"
check "remove-key --key-slot 5 (as luksKillSlot)" Q remove-key --key-file k1 --key-slot 5 img.qcow2
check "remove-key --key-slot 5: QEMU refuses its passphrase" refuses img.qcow2 k3
cp img.qcow2 img.keep
refuse "remove-key: the last key slot is refused" 2 Q remove-key --key-file k1 img.qcow2
check "remove-key (last): image unchanged, QEMU opens it" sh -c "cmp img.qcow2 img.keep && $(declare -f opens); WORK='$WORK'; opens img.qcow2 k1"
refuse "remove-key: wrong passphrase" 2 Q remove-key --key-file kw img.qcow2

check "change-key" Q change-key --key-file k1 "${FAST[@]}" img.qcow2 k2
check "change-key: QEMU opens it with the new passphrase" opens img.qcow2 k2
check "change-key: QEMU refuses the old one" refuses img.qcow2 k1
check "change-key: the data is unchanged" qio img.qcow2 k2 -c 'read -P 0x42 0 1M'
check "change-key: one key slot" test "$(slots img.qcow2 | wc -w)" = 1
check "qemu-img check clean after change-key" qcheck img.qcow2 k2
check "passphrases from stdin lines (old, then new)" \
	sh -c "printf 'second passphrase\nfourth passphrase\n' | '$QCOWSETUP' add-key ${FAST[*]} img.qcow2"
printf '%s' 'fourth passphrase' >k4
check "add-key (stdin): QEMU opens it with the new one" opens img.qcow2 k4
check "remove-key --force removes the last key" sh -c \
	"'$QCOWSETUP' remove-key --key-file k4 img.qcow2 && '$QCOWSETUP' remove-key --force --key-file k2 img.qcow2"
check "remove-key --force: QEMU opens it with no passphrase" sh -c "$(declare -f opens refuses); WORK='$WORK'; refuses img.qcow2 k2 && refuses img.qcow2 k4"
check "remove-key --force: no slot left" test -z "$(slots img.qcow2)"

# ---------------------------------------------------------------------------
# key slots on an image QEMU made

if retry 20 run_logged qemu-img create -q -f qcow2 --object "secret,id=s0,file=$WORK/k1" \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 q.qcow2 8M; then
	qio q.qcow2 k1 -c 'write -P 0x24 64k 64k' >>log 2>&1
	check "QEMU image: add-key" Q add-key --key-file k1 "${FAST[@]}" q.qcow2 k2
	check "QEMU image: QEMU opens it with both" sh -c "$(declare -f opens); WORK='$WORK'; opens q.qcow2 k1 && opens q.qcow2 k2"
	check "QEMU image: change-key" Q change-key --key-file k1 "${FAST[@]}" q.qcow2 k3
	check "QEMU image: QEMU refuses the changed passphrase" refuses q.qcow2 k1
	check "QEMU image: remove-key" Q remove-key --key-file k2 q.qcow2
	check "QEMU image: QEMU refuses the removed passphrase" refuses q.qcow2 k2
	check "QEMU image: data intact, check clean" sh -c "$(declare -f qio qcheck); WORK='$WORK'; qio q.qcow2 k3 -c 'read -P 0x24 64k 64k' && qcheck q.qcow2 k3"
else
	fail "qemu-img create of a LUKS image"
fi

# ---------------------------------------------------------------------------
# refusals while QEMU holds the image

Q format --key-file k1 "${FAST[@]}" held.qcow2 4M >>log 2>&1
cp held.qcow2 held.keep
for mode in rw ro; do
	ro=
	[ $mode = ro ] && ro=-r
	qemu-io $ro --object "secret,id=s0,file=$WORK/k1" --image-opts \
		"driver=qcow2,file.filename=held.qcow2,encrypt.key-secret=s0" -c 'sleep 2500' >>log 2>&1 &
	qpid=$!
	sleep 0.7
	refuse "add-key while QEMU ($mode) holds the image" 5 Q add-key --key-file k1 "${FAST[@]}" held.qcow2 k2
	refuse "change-key while QEMU ($mode) holds the image" 5 Q change-key --key-file k1 "${FAST[@]}" held.qcow2 k2
	refuse "format --force while QEMU ($mode) holds the image" 5 Q format --force --key-file k2 "${FAST[@]}" held.qcow2 1M
	check "dump-keys while QEMU ($mode) holds the image" Q dump-keys held.qcow2
	wait $qpid
	check "held image ($mode) unchanged" cmp held.qcow2 held.keep
done
refuse "add-key on an unencrypted image" 4 Q add-key --key-file k1 "${FAST[@]}" base.qcow2 k2

# ---------------------------------------------------------------------------
# write order: key material, sync, header, sync (strace)

if command -v strace >/dev/null 2>&1; then
	Q format --key-file k1 "${FAST[@]}" order.qcow2 1M >>log 2>&1
	off=$(qemu-img info --output=json order.qcow2 >/dev/null 2>&1; python3 -c '
import struct
f = open("order.qcow2", "rb").read(65536)
p = struct.unpack(">I", f[100:104])[0]
while True:
    t, l = struct.unpack(">II", f[p:p + 8])
    if t == 0x0537be77:
        print(struct.unpack(">Q", f[p + 8:p + 16])[0]); break
    if t == 0: break
    p += 8 + (l + 7) // 8 * 8')
	strace -f -e trace=pwrite64,fsync,fdatasync -o trace "$QCOWSETUP" change-key --key-file k1 "${FAST[@]}" order.qcow2 k2 >>log 2>&1
	# the writes to the image file (fd >= 3, not the memfd at offsets < region)
	seq=$(python3 - "$off" <<'EOF'
import re, sys
hdr = int(sys.argv[1])
out = []
fds = set()
for line in open('trace'):
    m = re.search(r'pwrite64\((\d+), .*, (\d+), (\d+)\) = ', line)
    if m:
        fd, off = int(m.group(1)), int(m.group(3))
        if off >= hdr and off < hdr + (4 << 20):
            fds.add(fd)
            out.append((fd, 'H' if off < hdr + 4096 else 'M'))
        continue
    m = re.search(r'f(data)?sync\((\d+)\)', line)
    if m:
        out.append((int(m.group(2)), 'S'))
print(''.join(k for fd, k in out if fd in fds))
EOF
)
	# material of the new slot, sync, header, sync, wiping of the old slot, sync
	if [[ "$seq" =~ ^MSHSMS$ ]]; then pass "change-key writes material, sync, header, sync, wipe, sync ($seq)";
	else fail "change-key write order: $seq"; fi
	check "change-key (traced): QEMU opens it with the new passphrase" opens order.qcow2 k2
else
	skipped "write order (no strace)"
fi

# ---------------------------------------------------------------------------
# no passphrase at all: exit 2, as a wrong one (cryptsetup's "no permission
# or bad passphrase"), not 4 (a wrong image)

Q format --key-file k1 "${FAST[@]}" np.qcow2 1M >>log 2>&1
refuse "no passphrase: no terminal, standard input at its end (a line)" 2 Q add-key "${FAST[@]}" np.qcow2 k2 </dev/null
refuse "no passphrase: --key-file - at its end" 2 Q add-key --key-file - "${FAST[@]}" np.qcow2 k2 </dev/null
: >kempty
refuse "no passphrase: an empty key file" 2 Q add-key --key-file kempty "${FAST[@]}" np.qcow2 k2
refuse "no new passphrase: format with standard input at its end" 2 Q format "${FAST[@]}" np2.qcow2 1M </dev/null
check "no new passphrase: no image left" test ! -e np2.qcow2
if command -v script >/dev/null 2>&1 && command -v timeout >/dev/null 2>&1; then
	# a terminal that ends (^D) before the first byte
	(sleep 1; printf '\004'; sleep 2) | timeout 30 script -qec "'$QCOWSETUP' add-key ${FAST[*]} np.qcow2 k2; echo EXIT=\$?" /dev/null \
		>tty.out 2>&1
	check "no passphrase: a terminal that ends before a byte (^D)" grep -q 'EXIT=2' tty.out
else
	skipped "no passphrase on a terminal (no script or timeout)"
fi
check "no passphrase: the image unchanged (one key slot)" test "$(slots np.qcow2)" = 0

# ---------------------------------------------------------------------------
# key files other users can read: one warning line naming the file and its
# mode (regular files only; not stdin, not with --quiet); the key still works

printf '%s' 'first passphrase' >kperm
printf '%s' 'third passphrase' >kthird
chmod 0600 kthird
warned() { # MODE: change-key reads kperm of that mode twice (old and new key)
	chmod "$1" kperm
	Q change-key --key-file kperm "${FAST[@]}" np.qcow2 kperm >/dev/null 2>perm.err
}
warned 0644
check "a key file readable by all: one warning line, file and mode" \
	grep -qx 'Warning: key file kperm is readable by other users (mode 0644).' perm.err
check "a key file readable by all: warned once per read (old key, new key)" test "$(grep -c 'Warning: key file' perm.err)" = 2
warned 0640
check "a key file readable by its group: warned" grep -qx 'Warning: key file kperm is readable by other users (mode 0640).' perm.err
warned 0600
check "a key file only its owner reads: no warning" eval '! grep -q "Warning: key file" perm.err'
warned 0400
check "a read-only key file of its owner: no warning" eval '! grep -q "Warning: key file" perm.err'
chmod 0644 kperm
check "a key file read from standard input (--key-file -): no warning" \
	sh -c "'$QCOWSETUP' change-key --key-file - ${FAST[*]} np.qcow2 kthird <kperm 2>perm.err && ! grep -q 'Warning: key file' perm.err"
check "--quiet: no warning" \
	sh -c "'$QCOWSETUP' change-key --quiet --key-file kthird ${FAST[*]} np.qcow2 kperm 2>perm.err && ! grep -q 'Warning: key file' perm.err"
check "the key of a warned key file opens the image" opens np.qcow2 kperm
chmod 0600 kperm

summary
