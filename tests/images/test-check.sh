#!/bin/bash
# test-check.sh: `qcowsetup check` against `qemu-img check`.
#
# Builds clean images with qemu-img/qemu-io and deliberately broken ones (bytes
# patched by the qcow2 editor below: leaked and missing refcounts, shared
# clusters, OFLAG_COPIED errors, misaligned tables, references past the end of
# the file, reserved bits, ...), then compares for each image
#   - the JSON of `qcowsetup check --json` with `qemu-img check --output=json`
#     (every key: leaks, corruptions, check-errors, image-end-offset,
#     total-clusters, allocated-, fragmented-, compressed-clusters),
#   - the human output on stdout, and the exit status.
# Prints a table of the counts. Env: QCOWSETUP (the built binary). Exit 77
# when qemu-img, qemu-io or python3 is missing. Set QS_KEEP=1 to keep the images.
set -u
export LC_ALL=C
me=test-check
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
need qemu-img qemu-io python3
need_qcowsetup 1
make_work
WORK=$work
cd "$WORK" || exit 1
ulimit -c 0

K=1024
M=$((1024 * 1024))
KEY=pass.key
printf '%s' 'qcowsetup-check-passphrase' >"$KEY"
SECRET="secret,id=s0,file=$WORK/$KEY"

# ---------------------------------------------------------------------------
# qc.py: a small qcow2 editor for making broken images.
#   qc.py FILE info                      header fields as NAME=VALUE lines
#   qc.py FILE l1 I [EXPR]               L1 entry I (active table)
#   qc.py FILE l2 I J [EXPR]             entry J of the L2 table of L1 entry I
#   qc.py FILE reft I [EXPR]             refcount table entry I
#   qc.py FILE rc CLUSTER [EXPR]         refcount of host cluster CLUSTER
#   qc.py FILE host GUEST                host cluster index of guest offset
#   qc.py FILE l2host I                  host cluster index of L1 entry I's table
#   qc.py FILE hdr64 OFF [EXPR]          64-bit header field at byte OFF
#   qc.py FILE ext TYPE OFF              64-bit field at byte OFF of the data of
#                                        header extension TYPE (0x0537be77 LUKS)
# Reading prints the value (decimal); EXPR is a Python expression of v, the
# current value, e.g. 'v | 1 << 63', 'v + 512', '0'.
cat >qc.py <<'EOF'
import struct, sys

f = open(sys.argv[1], 'r+b')
op, args = sys.argv[2], sys.argv[3:]

def rd(off, n):
    f.seek(off)
    b = f.read(n)
    return b + bytes(n - len(b))

def u32(off): return struct.unpack('>I', rd(off, 4))[0]
def u64(off): return struct.unpack('>Q', rd(off, 8))[0]
def w64(off, v):
    f.seek(off)
    f.write(struct.pack('>Q', v & (2**64 - 1)))

cb = u32(20)
cs = 1 << cb
version = u32(4)
order = u32(96) if version >= 3 else 4
incompat = u64(72) if version >= 3 else 0
esz = 16 if incompat & 16 else 8
l1_off, reft_off = u64(40), u64(48)
OFF = 0x00fffffffffffe00

def access(off, get, put, expr):
    v = get(off)
    if expr is None:
        print(v)
    else:
        put(off, eval(expr, {}, {'v': v}))

def l2_offset(i): return u64(l1_off + 8 * i) & OFF

def rc_get_put(cluster):
    bits = 1 << order
    per_block = cs * 8 // bits
    rb = u64(reft_off + 8 * (cluster // per_block)) & ~0x1ff
    if not rb:
        sys.exit('qc.py: cluster %d has no refcount block' % cluster)
    bit = (cluster % per_block) * bits
    def get(_):
        if bits >= 8:
            return int.from_bytes(rd(rb + bit // 8, bits // 8), 'big')
        return (rd(rb + bit // 8, 1)[0] >> (bit % 8)) & ((1 << bits) - 1)
    def put(_, v):
        if bits >= 8:
            f.seek(rb + bit // 8)
            f.write(v.to_bytes(bits // 8, 'big'))
        else:
            b = rd(rb + bit // 8, 1)[0]
            m = ((1 << bits) - 1) << (bit % 8)
            f.seek(rb + bit // 8)
            f.write(bytes([(b & ~m) | ((v << (bit % 8)) & m)]))
    return get, put

def expr(n): return args[n] if len(args) > n else None

if op == 'info':
    print('cluster_bits=%d\ncluster_size=%d\nl1_offset=%d\nl1_size=%d\nreftable_offset=%d\n'
          'refcount_order=%d\nl2_entry_size=%d\nsnapshots_offset=%d' %
          (cb, cs, l1_off, u32(36), reft_off, order, esz, u64(64)))
elif op == 'l1':
    access(l1_off + 8 * int(args[0]), u64, w64, expr(1))
elif op == 'l2':
    access(l2_offset(int(args[0])) + esz * int(args[1]), u64, w64, expr(2))
elif op == 'reft':
    access(reft_off + 8 * int(args[0]), u64, w64, expr(1))
elif op == 'rc':
    get, put = rc_get_put(int(args[0]))
    access(0, get, put, expr(1))
elif op == 'host':
    g = int(args[0], 0)
    per_l2 = cs // esz
    e = u64(l2_offset(g // cs // per_l2) + esz * (g // cs % per_l2))
    print((e & OFF) >> cb)
elif op == 'l2host':
    print(l2_offset(int(args[0])) >> cb)
elif op == 'ext':
    off = u32(100) if version >= 3 else 72
    while off + 8 <= cs:
        t, n = u32(off), u32(off + 4)
        if t == 0:
            sys.exit('qc.py: no header extension ' + args[0])
        if t == int(args[0], 0):
            print(u64(off + 8 + int(args[1], 0)))
            break
        off += 8 + (n + 7) // 8 * 8
elif op == 'hdr64':
    access(int(args[0], 0), u64, w64, expr(1))
else:
    sys.exit('qc.py: unknown operation ' + op)
EOF
qc() { python3 qc.py "$@"; }

# quiet_retry CMD...: CMD up to 5 times (tests/lib.sh's retry), its errors
# shown when every attempt failed
quiet_retry() {
	retry 5 "$@" >/dev/null 2>"$WORK/retry.err" || { cat "$WORK/retry.err" >&2; return 1; }
}

create() {	# create NAME SIZE [qemu-img create options]
	local name=$1 size=$2
	shift 2
	qemu-img create -q -f qcow2 "$@" "$name" "$size"
}

io() {		# io NAME qemu-io commands (each after -c)
	local name=$1
	shift
	qemu-io -f qcow2 "$@" "$name" >/dev/null
}

write_some() {	# a few data clusters at different places
	io "$1" -c "write -P 0x11 0 $((3 * $2))" -c "write -P 0x22 $((10 * $2)) $2" \
		-c "write -P 0x33 $((40 * $2)) $((2 * $2))"
}

# ---------------------------------------------------------------------------
# Clean images
IMAGES=()
add() { IMAGES+=("$1"); }

create c64k.qcow2 64M && write_some c64k.qcow2 $((64 * K)) && add c64k.qcow2
create c512.qcow2 4M -o cluster_size=512 && write_some c512.qcow2 512 && add c512.qcow2
create c2m.qcow2 256M -o cluster_size=2M && write_some c2m.qcow2 $((2 * M)) && add c2m.qcow2
create v2.qcow2 64M -o compat=0.10 && write_some v2.qcow2 $((64 * K)) && add v2.qcow2
for bits in 1 2 4 8 16 32 64; do
	create rc$bits.qcow2 16M -o refcount_bits=$bits,cluster_size=4096 &&
		write_some rc$bits.qcow2 4096 && add rc$bits.qcow2
done
create empty.qcow2 1G && add empty.qcow2
create extl2.qcow2 64M -o extended_l2=on && io extl2.qcow2 -c "write -P 1 0 4k" \
	-c "write -P 2 $((200 * K)) 8k" -c "write -z $((1 * M)) 64k" && add extl2.qcow2
create zeroes.qcow2 16M && io zeroes.qcow2 -c "write -P 1 0 1M" -c "write -z 0 256k" \
	-c "write -z -u $((512 * K)) 128k" && add zeroes.qcow2
create prealloc.qcow2 8M -o preallocation=metadata && add prealloc.qcow2
create falloc.qcow2 8M -o preallocation=falloc && add falloc.qcow2

create snap.qcow2 32M && write_some snap.qcow2 $((64 * K)) &&
	qemu-img snapshot -c s1 snap.qcow2 && io snap.qcow2 -c "write -P 0x44 0 64k" &&
	qemu-img snapshot -c s2 snap.qcow2 && io snap.qcow2 -c "write -P 0x55 $((10 * 64 * K)) 128k" &&
	add snap.qcow2
create snapdel.qcow2 32M && write_some snapdel.qcow2 $((64 * K)) &&
	qemu-img snapshot -c s1 snapdel.qcow2 && io snapdel.qcow2 -c "write -P 0x44 0 64k" &&
	qemu-img snapshot -d s1 snapdel.qcow2 && add snapdel.qcow2
create snap512.qcow2 2M -o cluster_size=512 && write_some snap512.qcow2 512 &&
	qemu-img snapshot -c s1 snap512.qcow2 && io snap512.qcow2 -c "write -P 9 0 4k" && add snap512.qcow2

create src.qcow2 16M && io src.qcow2 -c "write -P 0x61 0 4M" -c "write -P 0x62 $((8 * M)) 1M"
qemu-img convert -c -O qcow2 src.qcow2 comp.qcow2 && add comp.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4096 src.qcow2 comp4k.qcow2 && add comp4k.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd src.qcow2 zstd.qcow2 && add zstd.qcow2
cp comp.qcow2 compmix.qcow2 && io compmix.qcow2 -c "write -P 0x70 $((64 * K)) 64k" && add compmix.qcow2

if quiet_retry qemu-img create -f qcow2 --object "$SECRET" \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 luks.qcow2 16M; then
	quiet_retry qemu-io --object "$SECRET" --image-opts \
		"driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0" -c "write -P 3 0 1M" &&
		add luks.qcow2
fi

create bitmap.qcow2 64M && write_some bitmap.qcow2 $((64 * K)) &&
	qemu-img bitmap --add bitmap.qcow2 b0 && qemu-img bitmap --add -g 128k bitmap.qcow2 b1 &&
	add bitmap.qcow2
create datafile.qcow2 16M -o data_file=datafile.data && io datafile.qcow2 -c "write -P 1 0 1M" &&
	add datafile.qcow2
create backing.qcow2 16M && io backing.qcow2 -c "write -P 1 0 4M"
create overlay.qcow2 16M -b backing.qcow2 -F qcow2 && io overlay.qcow2 -c "write -P 2 $((1 * M)) 64k" &&
	add overlay.qcow2

# lazy refcounts, killed before it could write the refcounts back: dirty
create dirty.qcow2 16M -o lazy_refcounts=on && io dirty.qcow2 -c "write -P 1 0 64k"
{ qemu-io -f qcow2 -t writethrough -c "write -P 0x5a $((4 * 64 * K)) 128k" -c "sigraise 9" dirty.qcow2 \
	>/dev/null 2>&1; } 2>/dev/null
add dirty.qcow2

# ---------------------------------------------------------------------------
# Broken images: each starts from a clean copy and patches bytes.
broken() {	# broken NAME BASE: copy BASE to NAME and add it
	cp "$2" "$1" && add "$1"
}
C64=$((64 * K))

# a leaked cluster: the file grows by a cluster whose refcount is 1
broken leak-tail.qcow2 c64k.qcow2
n=$(( $(stat -c %s leak-tail.qcow2) / C64 ))
truncate -s $(( (n + 1) * C64 )) leak-tail.qcow2
qc leak-tail.qcow2 rc "$n" 1

# a used cluster's refcount bumped to 2: leak, and OFLAG_COPIED set on refcount 2
broken leak-bump.qcow2 c64k.qcow2
qc leak-bump.qcow2 rc "$(qc leak-bump.qcow2 host 0)" 'v + 1'

# a used cluster's refcount dropped to 0: corruption, and OFLAG_COPIED
broken rc-drop.qcow2 c64k.qcow2
qc rc-drop.qcow2 rc "$(qc rc-drop.qcow2 host $C64)" 0

# the L2 table's refcount dropped: corruption, OFLAG_COPIED on the L1 entry
broken rc-drop-l2.qcow2 c64k.qcow2
qc rc-drop-l2.qcow2 rc "$(qc rc-drop-l2.qcow2 l2host 0)" 0

# two L2 entries on the same cluster: reference 2 > refcount 1, and a leak
broken shared.qcow2 c64k.qcow2
qc shared.qcow2 l2 0 1 "$(qc shared.qcow2 l2 0 2)"

# OFLAG_COPIED cleared on a data cluster with refcount 1, and on an L1 entry
broken copied-l2.qcow2 c64k.qcow2
qc copied-l2.qcow2 l2 0 0 'v & ~(1 << 63)'
broken copied-l1.qcow2 c64k.qcow2
qc copied-l1.qcow2 l1 0 'v & ~(1 << 63)'
# ... and set on a shared snapshot cluster (refcount 2)
broken copied-snap.qcow2 snap.qcow2
qc copied-snap.qcow2 l2 0 40 'v | 1 << 63'

# a refcount block gone from the refcount table: every cluster it counted
broken no-refblock.qcow2 c512.qcow2
qc no-refblock.qcow2 reft 0 0

# an unaligned L2 table (half a cluster further)
broken l2-unaligned.qcow2 c64k.qcow2
qc l2-unaligned.qcow2 l1 0 'v + 32768'

# an unaligned data cluster, and one past the end of the file
broken data-unaligned.qcow2 c64k.qcow2
qc data-unaligned.qcow2 l2 0 2 'v + 4096'
broken data-eof.qcow2 c64k.qcow2
qc data-eof.qcow2 l2 0 10 "(v & 0xff00000000000000) | $(( 4096 * C64 ))"

# reserved bits in an L2 and an L1 entry
broken reserved-l2.qcow2 c64k.qcow2
qc reserved-l2.qcow2 l2 0 0 'v | 1 << 56'
broken reserved-l1.qcow2 c64k.qcow2
qc reserved-l1.qcow2 l1 0 'v | 1 << 57'

# the file cut short: the last data clusters are beyond its end
broken truncated.qcow2 c64k.qcow2
truncate -s $(( $(stat -c %s truncated.qcow2) - 2 * C64 )) truncated.qcow2

# a refcount block counted twice by the refcount table
broken refblock-twice.qcow2 c512.qcow2
qc refblock-twice.qcow2 reft 1 "$(qc refblock-twice.qcow2 reft 0)"

# refcount table entries: unaligned (refcounts unreadable: check errors),
# past the end of the file, with reserved bits
broken reft-unaligned.qcow2 c64k.qcow2
qc reft-unaligned.qcow2 reft 0 'v + 4096'
broken reft-eof.qcow2 c512.qcow2
qc reft-eof.qcow2 reft 3 "$(( 1000 * 512 ))"
broken reft-reserved.qcow2 c64k.qcow2
qc reft-reserved.qcow2 reft 0 'v | 1'

# a compressed cluster with OFLAG_COPIED
broken comp-copied.qcow2 comp.qcow2
qc comp-copied.qcow2 l2 0 3 'v | 1 << 63'

# a snapshot's shared cluster counted once only
broken snap-rc.qcow2 snap.qcow2
qc snap-rc.qcow2 rc "$(qc snap-rc.qcow2 host $((40 * C64)))" 1

# refcount overflow: refcount_bits=1 and a cluster mapped twice
broken rc1-shared.qcow2 rc1.qcow2
qc rc1-shared.qcow2 l2 0 1 "$(qc rc1-shared.qcow2 l2 0 2)"

# extended L2: allocated and zero bits both set; alloc bits without a cluster
broken extl2-bitmap.qcow2 extl2.qcow2
python3 - extl2-bitmap.qcow2 <<'EOF'
import struct, sys
f = open(sys.argv[1], 'r+b')
f.seek(40); l1 = struct.unpack('>Q', f.read(8))[0]
f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2 + 8); bm = struct.unpack('>Q', f.read(8))[0]
f.seek(l2 + 8); f.write(struct.pack('>Q', bm | (bm << 32)))
f.seek(l2 + 16 * 100 + 8); f.write(struct.pack('>Q', 3))
EOF

# an L1 entry whose L2 table lies past the end of the file
broken l2-eof.qcow2 c64k.qcow2
qc l2-eof.qcow2 l1 0 "1 << 63 | $(( 8000 * C64 ))"

# a compressed cluster past the end of the file
broken comp-eof.qcow2 comp.qcow2
# (64 KiB clusters: the host offset is bits 0-53 of the entry)
qc comp-eof.qcow2 l2 0 5 "v >> 54 << 54 | $(( 5000 * C64 + 700 ))"

# the header cluster counted twice (leak); the refcount table uncounted
broken hdr-rc.qcow2 c64k.qcow2
qc hdr-rc.qcow2 rc 0 2
broken reft-rc.qcow2 c64k.qcow2
qc reft-rc.qcow2 rc $(( $(qc reft-rc.qcow2 hdr64 48) / C64 )) 0

# the snapshot table and a snapshot L1 table uncounted
broken snaptable-rc.qcow2 snap.qcow2
qc snaptable-rc.qcow2 rc $(( $(qc snaptable-rc.qcow2 hdr64 64) / C64 )) 0

# the LUKS header and the bitmap directory uncounted
if [ -f luks.qcow2 ]; then
	broken luks-rc.qcow2 luks.qcow2
	qc luks-rc.qcow2 rc $(( $(qc luks-rc.qcow2 ext 0x0537be77 0) / C64 )) 0
fi
broken bitmap-rc.qcow2 bitmap.qcow2
qc bitmap-rc.qcow2 rc $(( $(qc bitmap-rc.qcow2 ext 0x23852875 16) / C64 )) 0

# a dirty lazy-refcounts image whose leftover refcount got lost twice
broken dirty-leak.qcow2 dirty.qcow2
n=$(( $(stat -c %s dirty-leak.qcow2) / C64 ))
truncate -s $(( (n + 2) * C64 )) dirty-leak.qcow2
qc dirty-leak.qcow2 rc "$n" 1
qc dirty-leak.qcow2 rc "$((n + 1))" 3

# ---------------------------------------------------------------------------
# Compare
FAIL=0
NTEST=0
printf '%-22s %-28s %-28s %s\n' IMAGE "ours (L/C/E exit)" "qemu-img (L/C/E exit)" ""
for img in "${IMAGES[@]}"; do
	NTEST=$((NTEST + 1))
	case $img in
	luks*)
		# qemu-img opens LUKS images only with the key; its JSON then names
		# the options string instead of the file
		set -- --object "$SECRET" --image-opts "driver=qcow2,file.filename=$img,encrypt.key-secret=s0"
		;;
	*)
		set -- "$img"
		;;
	esac
	qemu-img check --output=json "$@" >"$img.qemu.json" 2>"$img.qemu.err"
	qrc=$?
	sed -i "s|\"filename\": \"driver=.*\"|\"filename\": \"$img\"|" "$img.qemu.json"
	"$QCOWSETUP" check --json "$img" >"$img.ours.json" 2>"$img.ours.err"
	orc=$?
	qemu-img check "$@" >"$img.qemu.txt" 2>/dev/null
	"$QCOWSETUP" check "$img" >"$img.ours.txt" 2>/dev/null
	verdict=$(python3 - "$img" "$qrc" "$orc" <<'EOF'
import json, sys
img, qrc, orc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def load(p):
    try:
        return json.load(open(p))
    except ValueError:
        return {}
q, o = load(img + '.qemu.json'), load(img + '.ours.json')
def counts(d, rc):
    return '%d/%d/%d exit %d' % (d.get('leaks', 0), d.get('corruptions', 0), d.get('check-errors', 0), rc)
same = q == o and qrc == orc
if same:
    human_q = open(img + '.qemu.txt').read()
    human_o = open(img + '.ours.txt').read()
    same = human_q == human_o
    why = '' if same else 'human output differs'
else:
    diff = sorted(k for k in set(q) | set(o) if q.get(k) != o.get(k))
    why = 'differs: ' + ', '.join(diff) + ('' if qrc == orc else ' exit')
print('%-28s %-28s %s' % (counts(o, orc), counts(q, qrc), 'ok' if same else 'FAIL ' + why))
EOF
)
	printf '%-22s %s\n' "$img" "$verdict"
	case $verdict in
	*FAIL*)
		FAIL=$((FAIL + 1))
		diff -u "$img.qemu.json" "$img.ours.json" | sed 's/^/    /'
		diff -u "$img.qemu.txt" "$img.ours.txt" | sed 's/^/    /'
		sed 's/^/    ours: /' "$img.ours.err" | head -5
		;;
	esac
done
echo "test-check: $((NTEST - FAIL))/$NTEST images agree with qemu-img check"
[ "$FAIL" -eq 0 ]
