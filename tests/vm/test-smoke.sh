#!/bin/bash
# Automake test: prove the VM test bed works, with the mapping of the design done
# by hand (no qcowsetup involved).
#
# On the host: generate a plain and a LUKS-encrypted qcow2 image with qemu-img /
# qemu-io into a temporary directory, compute the expected guest content with
# `qemu-img convert -O raw`, derive the dm tables (host offsets read from the L2
# tables) and the LUKS volume key (cryptsetup on the header region, if it works
# here); then boot the VM with that directory as the share and run guest/smoke.sh in it.
#
# Exit: 0 pass, 1 fail, 77 skip (no QEMU, no kernel, no qemu-img/python3),
# 99 hard error (the VM did not boot or timed out).
# Environment: QS_SMOKE_TIMEOUT (seconds, default 240), QS_KEEP=1 (keep the
# temporary directory), QS_VERBOSE=1 / QS_TRACE=1 (passed to guest/lib.sh in
# the VM), and those of bed/run-vm.sh.
set -eu

me=test-smoke
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
t_start=$(now)

# ---------------------------------------------------------------- requirements
need "${QEMU:-qemu-system-x86_64}"
kernel=
# shellcheck disable=SC2012 # kernel file names have no white space
for k in ${QS_VM_KERNEL:-$(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r)}; do
	[ -r "$k" ] && kernel=$k && break
done
[ -n "$kernel" ] || skip_test "no readable kernel in /boot (apt-get install linux-image-amd64)"
PATH=$PATH:/usr/sbin:/sbin need qemu-img qemu-io python3 busybox

make_work
guest_script smoke "$work"
cd "$work"

# ---------------------------------------------------------------- images
secret="secret,id=s0,data=PASS"
luks_opts="driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0"
writes=(-c 'write -P 0x5a 0 1M' -c 'write -P 0x33 8M 64k' -c 'write -z 128k 64k'
	-c 'write -P 0xc3 40M 192k' -c 'write -P 0x77 63M 1M')

t_img=$(now)
retry 5 qemu-img create -q -f qcow2 plain.qcow2 64M || hard_error "qemu-img create (plain) failed"
qemu-io -f qcow2 plain.qcow2 "${writes[@]}" > /dev/null || hard_error "qemu-io (plain) failed"
qemu-img convert -f qcow2 -O raw plain.qcow2 plain.raw
md5sum < plain.raw | cut -d' ' -f1 > plain.md5
rm -f plain.raw

retry 5 qemu-img create -q -f qcow2 --object "$secret" \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 luks.qcow2 64M ||
	hard_error "qemu-img create (LUKS) failed"
qemu-io --object "$secret" --image-opts "$luks_opts" "${writes[@]}" > /dev/null ||
	hard_error "qemu-io (LUKS) failed"
qemu-img convert --object "$secret" --image-opts "$luks_opts" -O raw luks.raw
md5sum < luks.raw | cut -d' ' -f1 > luks.md5
rm -f luks.raw
printf PASS > luks.pass

# Top tables: guest space in sectors, data runs onto @DATA@ (the host device, or
# the crypt device over it) at the host offset from the L2 tables, zero elsewhere.
# qemu-img map gives no host offsets for encrypted images, hence this reader.
python3 - plain.qcow2 luks.qcow2 <<'EOF'
import struct, sys

OFFSET_MASK = 0x00fffffffffffe00
COMPRESSED = 1 << 62

def die(msg):
    sys.exit("qcow2 reader: " + msg)

def read_qcow2(path):
    f = open(path, 'rb')
    h = f.read(104)
    magic, version, backing_off, _, cluster_bits, size, crypt_method, l1_size, l1_off = \
        struct.unpack('>IIQIIQIIQ', h[:48])
    if magic != 0x514649fb:
        die(path + ": not a qcow2 image")
    if backing_off:
        die(path + ": backing files are not handled here")
    incompat = struct.unpack('>Q', h[72:80])[0] if version >= 3 else 0
    if incompat & ((1 << 2) | (1 << 4)):
        die(path + ": external data file / extended L2 are not handled here")
    header_len = struct.unpack('>I', h[100:104])[0] if version >= 3 else 72
    csize = 1 << cluster_bits
    f.seek(0)
    h = f.read(csize)
    luks = None
    p = header_len
    while p + 8 <= len(h):
        ext_type, ext_len = struct.unpack('>II', h[p:p + 8])
        if ext_type == 0:
            break
        if ext_type == 0x0537be77:
            luks = struct.unpack('>QQ', h[p + 8:p + 24])
        p += 8 + ((ext_len + 7) & ~7)
    f.seek(l1_off)
    l1 = struct.unpack('>%dQ' % l1_size, f.read(8 * l1_size))
    per_l2 = csize // 8
    runs = []           # [guest_start, length, host_offset or None]
    l2_cache = {}
    for c in range((size + csize - 1) // csize):
        i, j = divmod(c, per_l2)
        host = None
        l2_off = l1[i] & OFFSET_MASK if i < len(l1) else 0
        if l2_off:
            if i not in l2_cache:
                f.seek(l2_off)
                l2_cache[i] = struct.unpack('>%dQ' % per_l2, f.read(csize))
            e = l2_cache[i][j]
            if e & COMPRESSED:
                die(path + ": compressed clusters are not handled here")
            if (e & OFFSET_MASK) and not (version >= 3 and e & 1):
                host = e & OFFSET_MASK
        length = min(csize, size - c * csize)
        last = runs[-1] if runs else None
        if last and last[2] is None and host is None:
            last[1] += length
        elif last and last[2] is not None and host is not None and last[2] + last[1] == host:
            last[1] += length
        else:
            runs.append([c * csize, length, host])
    return crypt_method, luks, runs

for path in sys.argv[1:]:
    crypt_method, luks, runs = read_qcow2(path)
    name = path.rsplit('.', 1)[0]
    with open(name + '.table', 'w') as t:
        for start, length, host in runs:
            if host is None:
                t.write('%d %d zero\n' % (start // 512, length // 512))
            else:
                t.write('%d %d linear @DATA@ %d\n' % (start // 512, length // 512, host // 512))
    if luks:
        with open(name + '.env', 'w') as e:
            e.write('luks_offset=%d\nluks_length=%d\n' % luks)
EOF
[ -f luks.env ] || hard_error "no LUKS header extension found in luks.qcow2"
luks_offset='' luks_length=''
# shellcheck source=/dev/null # written just above
. ./luks.env

# The volume key, on the host when cryptsetup works here (the guest checks it
# again with its own cryptsetup, and uses its own when this one is missing).
if PATH=$PATH:/usr/sbin:/sbin command -v cryptsetup >/dev/null; then
	dd if=luks.qcow2 of=luks.hdr bs=512 skip=$((luks_offset / 512)) \
		count=$((luks_length / 512)) status=none
	if PATH=$PATH:/usr/sbin:/sbin cryptsetup luksDump --dump-volume-key \
		--volume-key-file luks.key --batch-mode --key-file luks.pass luks.hdr > luks.dump 2>&1; then
		echo "$me: volume key read on the host"
	else
		echo "$me: cryptsetup cannot read the key on the host ($(tail -n 1 luks.dump)): the guest will" >&2
		rm -f luks.key
	fi
	rm -f luks.hdr luks.dump
fi
echo "$me: images generated in $(since "$t_img")s"
for f in plain luks; do echo "$me: $f.table:"; sed 's/^/    /' "$f.table"; done

# ---------------------------------------------------------------- the VM
set +e
truncate -s 64M scratch.raw
"$here/bed/run-vm.sh" --share "$work" --timeout "${QS_SMOKE_TIMEOUT:-240}" --disk "$work/scratch.raw" \
	--env "QS_VERBOSE=${QS_VERBOSE:-0}" --env "QS_TRACE=${QS_TRACE:-0}" -- "$work/smoke.sh"
rc=$?
set -e
echo "$me: whole smoke test took $(since "$t_start")s"
case $rc in
0|1|77) exit $rc ;;
124) hard_error "the VM timed out" ;;
125) hard_error "the VM did not run or did not report a status" ;;
*) exit 1 ;;
esac
