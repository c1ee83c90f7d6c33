#!/bin/bash
# test-convert.sh: `qcowsetup convert` against QEMU.
#
# Sources, made with qemu-img/qemu-io: legacy AES qcow2 (v3 and v2), qcow v1
# with AES, qcow v1 and qcow2 with compressed clusters (zlib, zstd),
# unencrypted qcow2 with zero clusters, holes and a backing file, extended L2
# with a backing file, raw with holes and an odd size, LUKS qcow2, a legacy
# AES chain. For every conversion:
#   - `qemu-img compare` of the decrypted source and the decrypted result:
#     identical;
#   - `qemu-img info`: LUKS; `qemu-img check` and `qcowsetup check`: clean;
#   - sparseness from `qemu-img map`: unallocated stays unallocated, zero
#     clusters stay zero clusters, no more data than the source (with a
#     backing file: the same map, range for range).
# The same for every image of the engine's matrix (gen-matrix.sh).
# Then --in-place (QEMU writes the result afterwards), and the failures:
# wrong key, a file size limit (ulimit -f: a full disk without mounting),
# a source QEMU holds, an existing destination, a cipher OpenSSL lacks,
# SIGTERM, and kill -9 at random points of in-place conversions (the source
# must be the old image or the fully converted one, every time).
#
# Env: QCOWSETUP (the built binary). Prints PASS:/FAIL: lines and
# "N passed, N failed". Exit 77 when qemu-img, qemu-io or python3 is missing.
# QS_KEEP=1 keeps the work folder; KILLS=N sets the number of kill -9 rounds (6);
# QS_MATRIX_DIR=DIR uses a matrix gen-matrix.sh made there before;
# QS_CONVERT_NO_MATRIX=1 leaves the matrix out.
set -u
export LC_ALL=C
me=test-convert
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
need qemu-img qemu-io python3
need_qcowsetup 1
make_work
WORK=$work
cd "$WORK" || exit 1
ulimit -c 0

# check and refuse log what they run
check_log=log

FAST=(--pbkdf-force-iterations 1000)
Q() { "$QCOWSETUP" "$@"; }
K=1024
M=$((1024 * 1024))

# Longer than 16 bytes: legacy AES uses the first 16 only.
printf '%s' 'legacy-source-passphrase' >old.key
printf '%s' 'new LUKS passphrase' >new.key
printf '%s' 'a wrong passphrase' >wrong.key

# spec IMG FMT KEY: the --image-opts argument naming IMG (KEY - = none)
spec() {
	if [ "$3" = - ]; then
		echo "driver=$2,file.filename=$1"
	else
		echo "driver=$2,file.filename=$1,encrypt.key-secret=$3"
	fi
}
SECRETS=(--object "secret,id=old.key,file=$WORK/old.key" --object "secret,id=new.key,file=$WORK/new.key")
qio() {
	local img=$1 fmt=$2 key=$3
	shift 3
	qemu-io "${SECRETS[@]}" --image-opts "$(spec "$img" "$fmt" "$key")" "$@" >>log 2>&1
}
qmap() {	# qmap IMG FMT KEY > json
	qemu-img map --output=json "${SECRETS[@]}" --image-opts "$(spec "$1" "$2" "$3")" 2>>log
}

# mapcmp.py SRC.json DST.json exact|sparse
cat >mapcmp.py <<'EOF'
import json, sys

def norm(path):
    out = []
    for e in json.load(open(path)):
        # a zero cluster has no offset; a hole of a raw file has one
        k = (e['depth'], e['present'], e['zero'] and 'offset' not in e, e['data'])
        if out and out[-1][0] + out[-1][1] == e['start'] and out[-1][2] == k:
            out[-1][1] += e['length']
        else:
            out.append([e['start'], e['length'], k])
    return out

def at(m, off):
    for s, l, k in m:
        if s <= off < s + l:
            return k
    return None

src, dst, mode = norm(sys.argv[1]), norm(sys.argv[2]), sys.argv[3]
if mode == 'exact':
    if [(s, l, k) for s, l, k in src] != [(s, l, k) for s, l, k in dst]:
        sys.exit('maps differ:\n%s\n%s' % (src, dst))
    sys.exit(0)
# sparse, at the result's cluster size (argv[4]): each data cluster of the
# result holds data of the source; a cluster the source leaves unallocated
# (or makes a zero cluster) entirely is not data in the result
cs = int(sys.argv[4])
def covers(m, start, end, pred):
    """pred holds on all of [start, end) (True) or on some of it (False)"""
    all_, some = True, False
    for s, l, k in m:
        if s + l <= start or s >= end:
            continue
        if pred(k):
            some = True
        else:
            all_ = False
    return all_, some
data = lambda k: k[3]
absent = lambda k: not k[1]
zerocl = lambda k: k[1] and k[2] and not k[3]
size = max(s + l for s, l, k in src)
for c in range(0, size, cs):
    e = min(c + cs, size)
    _, dst_data = covers(dst, c, e, data)
    _, src_data = covers(src, c, e, data)
    all_absent, _ = covers(src, c, e, absent)
    all_zero, _ = covers(src, c, e, zerocl)
    if dst_data and not src_data:
        sys.exit('cluster at %d: data in the result, none in the source' % c)
    if all_absent and dst_data:
        sys.exit('cluster at %d: unallocated in the source, data in the result' % c)
    if all_zero and not covers(dst, c, e, zerocl)[0]:
        sys.exit('cluster at %d: a zero cluster in the source, not in the result' % c)
EOF

# verify NAME SRC SRCFMT SRCKEY DST [exact]: the acceptance checks
verify() {
	local name=$1 src=$2 fmt=$3 key=$4 dst=$5 mode=${6:-sparse} out
	if qemu-img compare "${SECRETS[@]}" --image-opts "$(spec "$src" "$fmt" "$key")" \
		"$(spec "$dst" qcow2 new.key)" >>log 2>&1; then
		pass "$name: qemu-img compare: identical"
	else
		fail "$name: qemu-img compare"
	fi
	out=$(qemu-img info --output=json "$dst" 2>>log | python3 -c '
import json, sys
print(json.load(sys.stdin)["format-specific"]["data"]["encrypt"]["format"])' 2>>log)
	if [ "$out" = luks ]; then pass "$name: qemu-img info: LUKS"; else fail "$name: qemu-img info ($out)"; fi
	check "$name: qemu-img check clean" qemu-img check "${SECRETS[@]}" --image-opts "$(spec "$dst" qcow2 new.key)"
	check "$name: qcowsetup check clean" Q check "$dst"
	qmap "$src" "$fmt" "$key" >"$name.src.map"
	qmap "$dst" qcow2 new.key >"$name.dst.map"
	cs=$(qemu-img info --output=json "$dst" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
	check "$name: sparseness ($mode)" python3 mapcmp.py "$name.src.map" "$name.dst.map" "$mode" "$cs"
	check "$name: no temporary file left" test ! -e "$dst.qcowsetup-tmp"
}

# convert_ok NAME SRC SRCFMT SRCKEY DST [exact] [convert options...]
convert_ok() {
	local name=$1 src=$2 fmt=$3 key=$4 dst=$5 mode=$6
	shift 6
	local kf=()
	[ "$key" != - ] && kf=(--key-file "$key")
	if Q convert "${kf[@]}" --new-key-file new.key "${FAST[@]}" "$@" "$src" "$dst" >>log 2>&1; then
		pass "$name: convert"
		verify "$name" "$src" "$fmt" "$key" "$dst" "$mode"
	else
		fail "$name: convert"
	fi
}

# common content for a cluster size: full, partial and unaligned data,
# zero clusters (plain, over data, with discard), a data cluster of zeros,
# a hole, the last cluster
content() {
	local cs=$1 size=$2
	CMDS=(-c "write -P 0x11 0 $cs" -c "write -P 0x22 $((2 * cs)) $((cs / 2))"
		-c "write -P 0x23 $((4 * cs + cs / 4)) $((cs / 4))" -c "write -P 0x33 $((6 * cs)) $((3 * cs))"
		-c "write -P 0x44 $((12 * cs)) $cs" -c "write -z $((12 * cs)) $cs"
		-c "write -z $((14 * cs)) $((2 * cs))" -c "write -P 0 $((20 * cs)) $cs"
		-c "write -P 0x55 $((size - cs)) $cs")
}

# ---------------------------------------------------------------------------
# sources

content 65536 $((32 * M))
qemu-img create -q -f qcow2 --object "secret,id=s0,file=$WORK/old.key" \
	-o encrypt.format=aes,encrypt.key-secret=s0 aes2.qcow2 32M >>log 2>&1
qio aes2.qcow2 qcow2 old.key "${CMDS[@]}" -c "discard $((13 * 65536)) 65536"
convert_ok aes-qcow2 aes2.qcow2 qcow2 old.key aes2.out.qcow2 sparse

content 4096 $((8 * M))
qemu-img create -q -f qcow2 --object "secret,id=s0,file=$WORK/old.key" \
	-o compat=0.10,cluster_size=4096,encrypt.format=aes,encrypt.key-secret=s0 aes2v2.qcow2 8M >>log 2>&1
qio aes2v2.qcow2 qcow2 old.key "${CMDS[@]}"
convert_ok aes-qcow2-v2-4k aes2v2.qcow2 qcow2 old.key aes2v2.out.qcow2 sparse

qemu-img create -q -f qcow --object "secret,id=s0,file=$WORK/old.key" \
	-o encrypt.format=aes,encrypt.key-secret=s0 aes1.qcow 8M >>log 2>&1
qio aes1.qcow qcow old.key -c 'write -P 0x61 0 300k' -c 'write -P 0x62 7M 5k' -c 'write -P 0x63 3M 1M'
convert_ok aes-qcow1 aes1.qcow qcow old.key aes1.out.qcow2 sparse

# compressed clusters: qcow v1, qcow2 zlib and zstd (plus plain writes after)
python3 -c '
import os, random
random.seed(7)
with open("pattern.raw", "wb") as f:
    for i in range(48):
        f.write((bytes([i]) * 1000 + os.urandom(24)) * 64 if i % 5 else bytes(65536))
    f.truncate(4 << 20)'
qemu-img convert -c -O qcow pattern.raw comp1.qcow >>log 2>&1
qio comp1.qcow qcow - -c 'write -P 0x71 1M 64k'
convert_ok compressed-qcow1 comp1.qcow qcow - comp1.out.qcow2 sparse
qemu-img convert -c -O qcow2 pattern.raw compz.qcow2 >>log 2>&1
qio compz.qcow2 qcow2 - -c 'write -P 0x72 2M 64k' -c 'write -z 64k 64k'
convert_ok compressed-zlib compz.qcow2 qcow2 - compz.out.qcow2 sparse
if qemu-img convert -c -O qcow2 -o compression_type=zstd pattern.raw compzs.qcow2 >>log 2>&1; then
	convert_ok compressed-zstd compzs.qcow2 qcow2 - compzs.out.qcow2 sparse
else
	skipped "zstd compression (qemu-img without zstd)"
fi

# unencrypted qcow2 over a backing file: the map must be the same
qemu-img create -q -f qcow2 base.qcow2 16M >>log 2>&1
qio base.qcow2 qcow2 - -c 'write -P 0x41 0 4M' -c 'write -P 0x42 8M 2M'
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2 >>log 2>&1
qio ov.qcow2 qcow2 - -c 'write -P 0x51 1M 64k' -c 'write -z 2M 128k' -c 'write -P 0x52 9M 4k' \
	-c 'discard 3M 64k' -c 'write -P 0x53 12M 1M'
convert_ok backing ov.qcow2 qcow2 - ov.out.qcow2 exact
out=$(qemu-img info --output=json ov.out.qcow2 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("backing-filename"), d.get("backing-filename-format"))')
check "backing: backing file and format kept ($out)" test "$out" = "base.qcow2 qcow2"
convert_ok backing-flatten ov.qcow2 qcow2 - ov.flat.qcow2 sparse --flatten
out=$(qemu-img info --output=json ov.flat.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename"))')
check "backing --flatten: no backing file" test "$out" = None
mkdir -p elsewhere
convert_ok backing-other-folder ov.qcow2 qcow2 - elsewhere/ov.qcow2 exact
out=$(qemu-img info --output=json elsewhere/ov.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin).get("backing-filename"))')
check "backing in another folder: recorded as an absolute name" test "$out" = "$WORK/base.qcow2"

# extended L2 (subclusters) over a backing file: clusters mix own data,
# zeros and backing data
qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 xl2.qcow2 >>log 2>&1
qio xl2.qcow2 qcow2 - -c 'write -P 0x81 4k 4k' -c 'write -z 20k 2k' -c 'write -P 0x82 9M 2k'
convert_ok extended-l2-backing xl2.qcow2 qcow2 - xl2.out.qcow2 sparse

# raw: holes, data of zeros, an odd size
python3 -c '
with open("raw.img", "wb") as f:
    f.write(b"\xaa" * 300000)
    f.seek(5 << 20); f.write(bytes(65536) + b"\xbb" * 70000)
    f.truncate(9999999); f.seek(0, 2); f.write(b"end")'
convert_ok raw raw.img raw - raw.out.qcow2 sparse

# LUKS to LUKS: a new volume key
Q format --key-file old.key "${FAST[@]}" luks.qcow2 8M >>log 2>&1
qio luks.qcow2 qcow2 old.key -c 'write -P 0x91 0 1M' -c 'write -z 2M 64k' -c 'write -P 0x92 5M 100k'
convert_ok luks-rekey luks.qcow2 qcow2 old.key luks.out.qcow2 sparse

# a legacy AES chain (same passphrase): kept, and flattened
qemu-img create -q -f qcow2 --object "secret,id=s0,file=$WORK/old.key" \
	-o encrypt.format=aes,encrypt.key-secret=s0 abase.qcow2 8M >>log 2>&1
qio abase.qcow2 qcow2 old.key -c 'write -P 0xa1 0 2M'
qemu-img create -q -f qcow2 --object "secret,id=s0,file=$WORK/old.key" \
	-o encrypt.format=aes,encrypt.key-secret=s0 -b abase.qcow2 -F qcow2 aov.qcow2 >>log 2>&1
qio aov.qcow2 qcow2 old.key -c 'write -P 0xa2 1M 64k' -c 'write -z 64k 64k'
# the backing layer needs its secret too on QEMU's side
spec_chain() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=$2,backing.encrypt.key-secret=old.key"; }
if Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" --flatten aov.qcow2 aov.flat.qcow2 >>log 2>&1 &&
	qemu-img compare "${SECRETS[@]}" --image-opts "$(spec_chain aov.qcow2 old.key)" \
		"$(spec aov.flat.qcow2 qcow2 new.key)" >>log 2>&1; then
	pass "legacy AES chain --flatten: identical"
else
	fail "legacy AES chain --flatten"
fi
if Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" aov.qcow2 aov.out.qcow2 >>log 2>&1 &&
	qemu-img compare "${SECRETS[@]}" --image-opts "$(spec_chain aov.qcow2 old.key)" \
		"$(spec_chain aov.out.qcow2 new.key)" >>log 2>&1; then
	pass "legacy AES chain, backing kept: identical"
else
	fail "legacy AES chain, backing kept"
fi

# other output ciphers
convert_ok cbc-essiv aes1.qcow qcow old.key aes1.cbc.qcow2 sparse --cipher aes-cbc-essiv:sha256 --key-size 256
refuse "a cipher OpenSSL lacks is refused (serpent)" 4 \
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" --cipher serpent-xts-plain64 aes1.qcow serpent.qcow2
check "serpent: nothing written" test ! -e serpent.qcow2 -a ! -e serpent.qcow2.qcowsetup-tmp
check "serpent: the message names OpenSSL" grep -q 'OpenSSL offers aes only' log

# the same passphrase when no new one is given (not a terminal)
check "no --new-key-file: the source passphrase" \
	Q convert --key-file old.key "${FAST[@]}" aes1.qcow same.qcow2
check "no --new-key-file: QEMU opens it with the source passphrase" \
	qemu-io "${SECRETS[@]}" --image-opts "$(spec same.qcow2 qcow2 old.key)" -c 'read -P 0x61 0 300k'

# ---------------------------------------------------------------------------
# every image of the engine's matrix (gen-matrix.sh): legacy AES, unencrypted
# (all cluster sizes, v2/v3, chains, compressed, data files, subclusters,
# snapshots, lazy refcounts) and LUKS; serpent and twofish sources are
# refused (OpenSSL has neither). QS_MATRIX_DIR reuses a generated matrix,
# QS_CONVERT_NO_MATRIX=1 skips this part.

mx=${QS_MATRIX_DIR:-$WORK/matrix}
if [ -n "${QS_CONVERT_NO_MATRIX:-}" ]; then
	skipped "the engine's matrix (QS_CONVERT_NO_MATRIX)"
elif [ -z "${QS_MATRIX_DIR:-}" ] && ! matrix_images "$mx" >>log 2>&1; then
	fail "gen-matrix.sh"
else
	mkdir -p mconv
	while IFS=$'\t' read -r name path fmt sec tags; do
		case $name in '#'*) continue ;; esac
		kf=()
		# relative, from the matrix folder: QEMU resolves external data
		# file names against the current directory
		src="driver=$fmt,file.filename=$path"
		if [ "$sec" != - ]; then
			kf=(--key-file "$mx/$sec")
			src="$src,encrypt.key-secret=mx"
		fi
		rc=0
		Q convert "${kf[@]}" --new-key-file new.key "${FAST[@]}" "$mx/$path" "mconv/$name.qcow2" \
			>"mconv/$name.log" 2>&1 || rc=$?
		case $tags in
		*serpent*|*twofish*)
			if [ $rc = 4 ] && grep -q -e 'OpenSSL offers aes only' -e 'AF_ALG' "mconv/$name.log"; then
				pass "matrix $name: refused (no serpent/twofish in OpenSSL)"
			else
				fail "matrix $name: exit $rc"
			fi
			continue ;;
		esac
		if [ $rc != 0 ]; then
			fail "matrix $name: convert (exit $rc)"
			continue
		fi
		if (cd "$mx" && qemu-img compare --object "secret,id=mx,file=$mx/pass.key" "${SECRETS[@]}" \
			--image-opts "$src" "$(spec "$WORK/mconv/$name.qcow2" qcow2 new.key)") >>log 2>&1 &&
			qemu-img check "${SECRETS[@]}" --image-opts "$(spec "mconv/$name.qcow2" qcow2 new.key)" >>log 2>&1 &&
			qemu-img info "mconv/$name.qcow2" | grep -q 'format: luks'; then
			pass "matrix $name: identical, LUKS, check clean"
		else
			fail "matrix $name"
		fi
	done <"$mx/manifest.tsv"
fi

# ---------------------------------------------------------------------------
# in place

cp aes2.qcow2 inplace.qcow2
check "in place: convert" Q convert --in-place --key-file old.key --new-key-file new.key "${FAST[@]}" inplace.qcow2
verify in-place aes2.qcow2 qcow2 old.key inplace.qcow2 sparse
qemu_writes() {
	qio "$1" qcow2 new.key -c 'write -P 0xee 3M 200k' -c 'read -P 0xee 3M 200k' -c 'read -P 0x11 0 64k' &&
		qemu-img check "${SECRETS[@]}" --image-opts "$(spec "$1" qcow2 new.key)"
}
check "in place: QEMU writes the result, check clean" qemu_writes inplace.qcow2
cp ov.qcow2 ov.inplace.qcow2
check "in place with a backing file" Q convert --in-place --new-key-file new.key "${FAST[@]}" ov.inplace.qcow2
verify in-place-backing ov.qcow2 qcow2 - ov.inplace.qcow2 exact
mkdir -p real
cp aes1.qcow real/linked.qcow
ln -s real/linked.qcow link.qcow
Q convert --in-place --key-file old.key --new-key-file new.key "${FAST[@]}" link.qcow >>log 2>&1
check "in place through a symbolic link: the link stays, the image is converted" \
	test -L link.qcow -a "$(qemu-img info --output=json real/linked.qcow | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')" = qcow2
chmod 640 aes1.qcow
cp -p aes1.qcow perm.qcow
Q convert --in-place --key-file old.key --new-key-file new.key "${FAST[@]}" perm.qcow >>log 2>&1
check "in place: the permissions are kept" test "$(stat -c %a perm.qcow)" = 640

# ---------------------------------------------------------------------------
# failures leave the source untouched

cp aes2.qcow2 victim.qcow2
cp aes2.qcow2 victim.orig
refuse "wrong passphrase (in place)" 2 \
	Q convert --in-place --key-file wrong.key --new-key-file new.key "${FAST[@]}" victim.qcow2
untouched() { cmp "$1" "$2" && test ! -e "$1.qcowsetup-tmp"; }
check "wrong passphrase: source untouched, no temporary file" untouched victim.qcow2 victim.orig
refuse "wrong passphrase (new file)" 2 \
	Q convert --key-file wrong.key --new-key-file new.key "${FAST[@]}" victim.qcow2 wrong.out.qcow2
check "wrong passphrase: no destination" test ! -e wrong.out.qcow2
for lim in 1000 2100 2600; do
	rc=0
	(ulimit -f $lim; Q convert --in-place --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2) >>log 2>&1 || rc=$?
	if [ $rc = 4 ] && cmp -s victim.qcow2 victim.orig && [ ! -e victim.qcow2.qcowsetup-tmp ]; then
		pass "file size limit $((lim))K: error, source untouched, no temporary file"
	else
		fail "file size limit $((lim))K (exit $rc)"
	fi
done
check "file size limit: the message says so" grep -q 'File too large' log

qemu-io "${SECRETS[@]}" --image-opts "$(spec victim.qcow2 qcow2 old.key)" -c 'sleep 2500' >>log 2>&1 &
qpid=$!
sleep 0.7
refuse "source open for writing by QEMU (new file)" 5 \
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 held.qcow2
refuse "source open for writing by QEMU (in place)" 5 \
	Q convert --in-place --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2
wait $qpid
qemu-io -r "${SECRETS[@]}" --image-opts "$(spec victim.qcow2 qcow2 old.key)" -c 'sleep 2500' >>log 2>&1 &
qpid=$!
sleep 0.7
check "source open read-only by QEMU: convert to a new file" \
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 held.qcow2
refuse "source open read-only by QEMU: no in-place replacement" 5 \
	Q convert --in-place --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2
wait $qpid
check "QEMU holding the source: source untouched" cmp victim.qcow2 victim.orig
refuse "existing destination refused" 5 \
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 held.qcow2
check "existing destination replaced with --force" \
	Q convert --force --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 held.qcow2
refuse "destination = source refused" 1 \
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 ./victim.qcow2

# progress: lines with --progress off a terminal, nothing with --quiet
Q convert --progress --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 p1.qcow2 2>p1.err >>log
check "--progress: progress lines on stderr" grep -q '^Converting: 100.0%' p1.err
Q convert --quiet --progress --key-file old.key --new-key-file new.key "${FAST[@]}" victim.qcow2 p2.qcow2 2>p2.err >>log
check "--quiet: nothing on stderr" test ! -s p2.err
if command -v script >/dev/null 2>&1; then
	script -qec "'$QCOWSETUP' convert --key-file old.key --new-key-file new.key ${FAST[*]} victim.qcow2 p3.qcow2" /dev/null >p3.out 2>&1 </dev/null
	check "terminal: a progress bar" grep -q 'Converting \[#*\]' p3.out
fi

# ---------------------------------------------------------------------------
# interruptions: SIGTERM, then kill -9 at random points of in-place runs

qemu-img create -q -f qcow2 --object "secret,id=s0,file=$WORK/old.key" \
	-o encrypt.format=aes,encrypt.key-secret=s0 big.qcow2 160M >>log 2>&1
qio big.qcow2 qcow2 old.key -c 'write -P 0x17 0 60M' -c 'write -P 0x18 80M 60M' -c 'write -z 70M 2M'
cp big.qcow2 big.orig
# how long an in-place run takes (the second of two: warm caches)
for i in 1 2; do
	cp big.orig big.qcow2
	start=$(date +%s%N)
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" --in-place big.qcow2 >>log 2>&1
	took=$((($(date +%s%N) - start) / 1000000))
done
cp big.orig big.qcow2
# state: "old" (byte-identical), "new" (LUKS, identical plaintext) or "broken"
state() {
	if cmp -s big.qcow2 big.orig; then
		echo old
	elif qemu-img compare "${SECRETS[@]}" --image-opts "$(spec big.orig qcow2 old.key)" \
		"$(spec big.qcow2 qcow2 new.key)" >>log 2>&1 &&
		qemu-img check "${SECRETS[@]}" --image-opts "$(spec big.qcow2 qcow2 new.key)" >>log 2>&1; then
		echo new
	else
		echo broken
	fi
}
# delays computed before the start; the binary itself in the background
# ($! must be its pid)
delay=$(awk -v t="$took" 'BEGIN { printf "%.3f", t / 4000 }')
"$QCOWSETUP" convert --key-file old.key --new-key-file new.key "${FAST[@]}" --in-place big.qcow2 >>log 2>&1 &
pid=$!
sleep "$delay"
kill -TERM $pid 2>/dev/null
wait $pid
st=$(state)
if [ "$st" != broken ] && [ ! -e big.qcow2.qcowsetup-tmp ]; then
	pass "SIGTERM: source $st, temporary file removed"
else
	fail "SIGTERM: source $st"
fi
[ "$st" = old ] || cp big.orig big.qcow2
olds=0
news=0
midway=0
for i in $(seq "${KILLS:-6}"); do
	delay=$(awk -v t="$took" -v seed="$RANDOM" 'BEGIN { srand(seed); printf "%.3f", rand() * t * 1.1 / 1000 }')
	"$QCOWSETUP" convert --key-file old.key --new-key-file new.key "${FAST[@]}" --in-place big.qcow2 >>log 2>&1 &
	pid=$!
	sleep "$delay"
	kill -9 $pid 2>/dev/null
	wait $pid 2>/dev/null
	[ -e big.qcow2.qcowsetup-tmp ] && midway=$((midway + 1))
	st=$(state)
	case $st in
	old) olds=$((olds + 1)) ;;
	new) news=$((news + 1)); cp big.orig big.qcow2 ;;
	*) fail "kill -9 after ${delay}s: the source is broken"; cp big.orig big.qcow2 ;;
	esac
done
pass "kill -9 at random points: $olds times the old image ($midway while writing the new one), $news times the new one, never broken (a run takes ${took} ms)"
check "after the interruptions: an in-place run completes" \
	Q convert --key-file old.key --new-key-file new.key "${FAST[@]}" --in-place big.qcow2
final_state() { test ! -e big.qcow2.qcowsetup-tmp && test "$(state)" = new; }
check "after the interruptions: the result is right, no temporary file" final_state

summary
