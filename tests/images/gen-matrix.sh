#!/bin/bash
# gen-matrix.sh OUTDIR
#
# Generates the image matrix of the engine tests with qemu-img and qemu-io
# (never binary blobs), and beside every image QEMU's own answers for it (the
# oracles). Writes:
#   OUTDIR/manifest.tsv   one line per image: name, path, format, secret, tags
#                         (paths relative to OUTDIR; secret is the key file,
#                         relative to OUTDIR, or -)
#   OUTDIR/pass.key       the passphrase of every encrypted image (no newline)
#   OUTDIR/oracle/NAME.map.json    qemu-img map --output=json
#   OUTDIR/oracle/NAME.map.txt     qemu-img map (human); .map.rc its exit status
#   OUTDIR/oracle/NAME.check.json  qemu-img check --output=json; .check.rc
#   OUTDIR/oracle/NAME.info.json   qemu-img info --output=json --backing-chain
#   OUTDIR/oracle/NAME.md5         md5 of qemu-img convert -O raw (decrypted)
# Every qemu command runs in OUTDIR with the relative path of the manifest, so
# file names printed by qemu-img map are relative too: run the tool under test
# the same way. The map oracles depend on the file system OUTDIR is on (QEMU
# asks it for holes, see README.md): compare only with outputs made there.
set -eu
export LC_ALL=C

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 1
fi
for tool in qemu-img qemu-io md5sum; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "gen-matrix: $tool not found" >&2
		exit 77
	fi
done

mkdir -p "$1"
cd "$1"
OUT=$(pwd)
rm -rf oracle logs
mkdir -p oracle logs
KEY=pass.key
# Longer than 16 bytes on purpose: legacy AES uses only the first 16.
printf '%s' 'qcowsetup-matrix-passphrase' >"$KEY"
SECRET="secret,id=s0,file=$OUT/$KEY"
MANIFEST=manifest.tsv
printf '#name\tpath\tformat\tsecret\ttags\n' >"$MANIFEST"

K=1024
M=$((1024 * 1024))

# retry CMD...: run a qemu command, up to $RETRIES (5) times. qemu-img 7.2
# sometimes fails with "Unable to get accurate CPU usage" while timing the LUKS
# key derivation (it reads the thread's user time, which can stay at 0 ms).
# Its output goes to the file $RETRY_OUT (default: the log of $LOGNAME).
retry() {
	local i out=${RETRY_OUT:-logs/$LOGNAME.log}
	for i in $(seq "${RETRIES:-5}"); do
		if "$@" >"$out.tmp" 2>"logs/$LOGNAME.err"; then
			if [ -n "${RETRY_OUT:-}" ]; then
				mv "$out.tmp" "$out"
			else
				cat "$out.tmp" >>"$out"
				rm -f "$out.tmp"
			fi
			return 0
		fi
		echo "attempt $i failed: $(head -n 1 "logs/$LOGNAME.err")" >>"logs/$LOGNAME.retries"
	done
	echo "gen-matrix: $LOGNAME: failed ${RETRIES:-5} times: $*" >&2
	grep -iE 'fail|error|invalid|cannot|could not' "$out.tmp" | head -n 3 >&2
	tail -n 3 "logs/$LOGNAME.err" >&2
	rm -f "$out.tmp"
	return 1
}

# img_args PATH FORMAT SECRET: sets IMGARGS to name the image on a qemu-img or
# qemu-io command line (with the secret, through --image-opts, if encrypted).
img_args() {
	if [ "$3" = - ]; then
		IMGARGS=(-f "$2" "$1")
	else
		IMGARGS=(--object "$SECRET" --image-opts
			"driver=$2,file.filename=$1,encrypt.key-secret=s0")
	fi
}

# io PATH FORMAT SECRET -c CMD ...: qemu-io commands on an image
io() {
	local path=$1 fmt=$2 sec=$3
	shift 3
	img_args "$path" "$fmt" "$sec"
	retry qemu-io "$@" "${IMGARGS[@]}"
}

# create PATH FORMAT SIZE [-o OPTIONS] [other qemu-img create options]
create() {
	local path=$1 fmt=$2 size=$3
	shift 3
	retry qemu-img create -q -f "$fmt" "$@" "$path" "$size"
}

# create_enc PATH FORMAT SIZE OPTIONS: encrypted image, key from the secret.
# The CPU usage failure hits about one LUKS create in three here (more under
# load), so these get 20 tries.
create_enc() {
	RETRIES=20 retry qemu-img create -q -f "$2" --object "$SECRET" \
		-o "$4,encrypt.key-secret=s0" "$1" "$3"
}

# oracle NAME PATH FORMAT SECRET: QEMU's answers for one image
oracle() {
	local name=$1 path=$2 fmt=$3 sec=$4 o=oracle/$1 rc i
	img_args "$path" "$fmt" "$sec"
	RETRY_OUT=$o.map.json retry qemu-img map --output=json "${IMGARGS[@]}"
	RETRY_OUT=$o.info.json retry qemu-img info --output=json --backing-chain "${IMGARGS[@]}"
	# human map and check may fail on purpose: keep their exit status
	for i in 1 2 3 4 5; do
		rc=0
		qemu-img map "${IMGARGS[@]}" >"$o.map.txt" 2>"$o.map.err" || rc=$?
		grep -q 'CPU usage' "$o.map.err" || break
	done
	echo "$rc" >"$o.map.rc"
	for i in 1 2 3 4 5; do
		rc=0
		qemu-img check --output=json "${IMGARGS[@]}" >"$o.check.json" 2>"$o.check.err" || rc=$?
		grep -q 'CPU usage' "$o.check.err" || break
	done
	echo "$rc" >"$o.check.rc"
	retry qemu-img convert -O raw "${IMGARGS[@]}" "logs/$name.raw"
	md5sum <"logs/$name.raw" | cut -d' ' -f1 >"$o.md5"
	rm -f "logs/$name.raw"
}

# register NAME PATH FORMAT SECRET TAGS: manifest line and oracles
register() {
	LOGNAME=$1
	printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >"logs/$1.manifest"
	oracle "$1" "$2" "$3" "$4"
}

# std_cmds CLUSTER SIZE [L2SPAN]: sets CMDS to the common content, scaled to
# the cluster size: full, partial and unaligned data clusters, data runs
# contiguous and reversed on the host, zero clusters (plain, over data with
# the allocation kept, over data with unmap), a discarded cluster, the last
# cluster, and, when L2SPAN (guest bytes one L2 table covers) fits, a write
# across an L2 table boundary plus one in a third table.
std_cmds() {
	local cs=$1 size=$2 l2span=${3:-0}
	CMDS=(
		-c "write -P 0x11 0 $cs"
		-c "write -P 0x22 $((2 * cs)) $((cs / 2))"
		-c "write -P 0x23 $((4 * cs + cs / 4)) $((cs / 4))"
		-c "write -P 0x33 $((6 * cs)) $((3 * cs))"
		-c "write -P 0x34 $((11 * cs + cs / 2)) $cs"
		-c "write -P 0x99 $((15 * cs)) $cs"
		-c "write -P 0x9a $((14 * cs)) $cs"
		-c "write -z $((17 * cs)) $((2 * cs))"
		-c "write -P 0x44 $((20 * cs)) $((2 * cs))"
		-c "write -z $((20 * cs)) $cs"
		-c "write -P 0x45 $((23 * cs)) $cs"
		-c "write -z -u $((23 * cs)) $cs"
		-c "write -P 0x46 $((25 * cs)) $cs"
		-c "discard $((25 * cs)) $cs"
		-c "write -P 0x77 $((size - cs)) $cs"
	)
	if [ "$l2span" -gt 0 ] && [ $((3 * l2span)) -lt $((size - cs)) ]; then
		CMDS+=(
			-c "write -P 0x55 $((l2span - cs)) $((2 * cs))"
			-c "write -P 0x56 $((2 * l2span + cs)) $cs"
		)
	fi
}

# --- plain qcow2: cluster sizes x compat -----------------------------------
gen_plain() { # NAME CLUSTER COMPAT SIZE TAGS
	local name=$1 cs=$2 compat=$3 size=$4
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "cluster_size=$cs,compat=$compat"
	std_cmds "$cs" "$size" $((cs * cs / 8))
	io "$name.qcow2" qcow2 - "${CMDS[@]}"
	register "$name" "$name.qcow2" qcow2 - "$5"
}

# 2M clusters: partial writes, one full cluster, zero cluster, two L1 entries
gen_c2m() {
	local name=c2m-v3 cs=$((2 * M)) size=$((64 * M))
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "cluster_size=$cs"
	io "$name.qcow2" qcow2 - \
		-c "write -P 0x11 0 $((64 * K))" \
		-c "write -P 0x12 $((cs + 512 * K)) $((4 * K))" \
		-c "write -P 0x13 $((4 * cs - 8 * K)) $((16 * K))" \
		-c "write -z $((8 * cs)) $cs" \
		-c "write -P 0x14 $((10 * cs)) $cs" \
		-c "write -z $((10 * cs)) $cs" \
		-c "write -P 0x15 $((size - 4 * K)) $((4 * K))"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,c2m,zero,partial"
}

# --- extended L2 entries: subcluster-sized writes and zeroes --------------
gen_xl2() { # NAME CLUSTER
	local name=$1 cs=$2 size=$((32 * M)) sc=$(($2 / 32))
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "cluster_size=$cs,extended_l2=on"
	io "$name.qcow2" qcow2 - \
		-c "write -P 0x11 0 $sc" \
		-c "write -P 0x12 $((3 * sc)) $((2 * sc))" \
		-c "write -P 0x13 $((6 * sc + sc / 2)) $((sc / 4))" \
		-c "write -z $((8 * sc)) $((2 * sc))" \
		-c "write -P 0x14 $cs $cs" \
		-c "write -z $((cs + 4 * sc)) $((4 * sc))" \
		-c "write -z -u $((cs + 12 * sc)) $((2 * sc))" \
		-c "write -z $((3 * cs + 2 * sc)) $((2 * sc))" \
		-c "write -z $((4 * cs)) $cs" \
		-c "write -P 0x15 $((6 * cs - sc)) $((2 * sc))" \
		-c "write -P 0x16 $((8 * cs)) $cs" \
		-c "discard $((8 * cs + 16 * sc)) $((8 * sc))" \
		-c "write -P 0x17 $((10 * cs)) $((2 * cs))" \
		-c "write -P 0x77 $((size - sc)) $sc"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,xl2,subclusters,zero"
}

# extended L2 over a qcow2 backing file: unallocated subclusters of an
# allocated cluster read from the backing file
gen_xl2_backing() {
	local d=xl2-backing cs=$((64 * K)) sc=$((2 * K)) size=$((32 * M))
	LOGNAME=$d
	mkdir -p "$d"
	create "$d/base.qcow2" qcow2 "$size"
	io "$d/base.qcow2" qcow2 - \
		-c "write -P 0xa1 0 $M" \
		-c "write -P 0xa2 $((4 * M)) $cs" \
		-c "write -c -P 0xa3 $((5 * M)) $cs"
	create "$d/top.qcow2" qcow2 "$size" -b base.qcow2 -F qcow2 -o "extended_l2=on"
	io "$d/top.qcow2" qcow2 - \
		-c "write -P 0xc1 $sc $sc" \
		-c "write -z $((4 * sc)) $((2 * sc))" \
		-c "write -P 0xc2 $((4 * M + 2 * sc + 512)) 1024" \
		-c "write -z $((2 * M)) $cs" \
		-c "write -P 0xc3 $((5 * M + 8 * sc)) $sc" \
		-c "discard $((8 * M)) $cs"
	register xl2-backing-top "$d/top.qcow2" qcow2 - "qcow2,v3,xl2,subclusters,backing,zero,compressed"
}

# --- preallocation: metadata (clusters allocated, file sparse: QEMU's
# --- metadata-preallocation heuristic asks the file for holes) and falloc
gen_prealloc() { # NAME MODE SIZE
	local name=$1 cs=$((64 * K)) size=$3
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "preallocation=$2"
	io "$name.qcow2" qcow2 - \
		-c "write -P 0x11 0 $cs" \
		-c "write -P 0x12 $((4 * cs + 4 * K)) $((4 * K))" \
		-c "write -z $((8 * cs)) $cs" \
		-c "write -z -u $((10 * cs)) $cs" \
		-c "discard $((12 * cs)) $cs" \
		-c "write -P 0x13 $((size - cs)) $cs"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,prealloc-$2,zero,file-hole"
}

# --- lazy refcounts: clean, dirty with a refcount error, dirty with a hole
gen_lazy() {
	local cs=$((64 * K)) size=$((32 * M)) name rc
	name=lazy-c64k
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "lazy_refcounts=on"
	std_cmds "$cs" "$size"
	io "$name.qcow2" qcow2 - "${CMDS[@]}"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,lazy,zero"

	# Killed after a writethrough write: the L2 entry is on disk, the
	# refcount (lazy) is not; the dirty bit stays set. qemu-img check: one
	# corruption (refcount=0 reference=1).
	lazy_killed lazy-dirty $((2 * cs)) "write -P 0x5a $((4 * cs)) $cs" "qcow2,v3,lazy,dirty,corrupt" || return 1

	# Killed after a writethrough discard: the host cluster is already
	# punched (a file hole) but the L2 entry still points at it; the
	# metadata preallocation heuristic then fires (see README.md).
	lazy_killed lazy-hole $((4 * cs)) "discard $cs $cs" "qcow2,v3,lazy,dirty,file-hole"
}

# lazy_killed NAME BYTES COMMAND FEATURES (in gen_lazy): a lazy-refcounts
# image with BYTES of data, then qemu-io (writethrough) killed by SIGKILL
# right after COMMAND
lazy_killed() {
	local name=$1 rc=0
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "lazy_refcounts=on"
	io "$name.qcow2" qcow2 - -c "write -P 0x11 0 $2"
	(qemu-io -t writethrough -c "$3" -c "sigraise 9" \
		-f qcow2 "$name.qcow2" >>"logs/$name.log" 2>&1; exit $?) 2>/dev/null || rc=$?
	[ "$rc" -eq 137 ] || { echo "gen-matrix: $name: qemu-io not killed ($rc)" >&2; return 1; }
	register "$name" "$name.qcow2" qcow2 - "$4"
}

# --- leaked cluster: an L2 update that fails (blkdebug) after the refcount
# --- was taken, as in QEMU's iotest 026. qemu-img check: 1 leaked cluster.
gen_leak() {
	local name=leak-c64k cs=$((64 * K)) size=$((32 * M)) rc
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size"
	std_cmds "$cs" "$size"
	io "$name.qcow2" qcow2 - "${CMDS[@]}"
	printf '[inject-error]\nevent = "l2_update"\nerrno = "5"\nonce = "off"\n' >"logs/$name.blkdebug"
	rc=0
	qemu-io -c "write -P 0x5a $((40 * cs)) $cs" \
		"blkdebug:logs/$name.blkdebug:$name.qcow2" >>"logs/$name.log" 2>&1 || rc=$?
	[ "$rc" -eq 1 ] || { echo "gen-matrix: $name: injected error did not happen ($rc)" >&2; return 1; }
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,leaks,zero"
}

# --- compressed clusters, mixed with normal ones ---------------------------
gen_comp() { # NAME TYPE CLUSTER
	local name=$1 ctype=$2 cs=$3 size=$((32 * M))
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "cluster_size=$cs,compression_type=$ctype"
	io "$name.qcow2" qcow2 - \
		-c "write -c -P 0x11 0 $cs" \
		-c "write -P 0x12 $cs $cs" \
		-c "write -c -P 0x13 $((2 * cs)) $cs" \
		-c "write -c -P 0x14 $((3 * cs)) $cs" \
		-c "write -c -P 0x15 $((5 * cs)) $cs" \
		-c "write -P 0x16 $((5 * cs + cs / 4)) $((cs / 4))" \
		-c "write -z $((7 * cs)) $cs" \
		-c "write -c -P 0x00 $((9 * cs)) $cs" \
		-c "write -c -s $RANDOM_FILE $((11 * cs)) $cs" \
		-c "write -c -P 0x17 $((12 * cs)) $cs" \
		-c "write -z $((12 * cs)) $cs" \
		-c "write -c -P 0x18 $((14 * cs)) $cs" \
		-c "discard $((14 * cs)) $cs" \
		-c "write -c -P 0x77 $((size - cs)) $cs"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,compressed,$ctype,zero"
}

# A compressed image (qemu-img convert -c: its file ends unaligned) with a
# snapshot taken afterwards: the snapshot table ends the file, with no
# padding after its last entry.
gen_comp_snap() {
	local name=comp-snap size=$((16 * M))
	LOGNAME=$name
	create "$name.src" raw "$size"
	io "$name.src" raw - -c "write -P 0x21 0 $((2 * M))" -c "write -P 0x22 $((8 * M)) $M"
	retry qemu-img convert -q -c -O qcow2 "$name.src" "$name.qcow2"
	rm -f "$name.src"
	retry qemu-img snapshot -c s1 "$name.qcow2"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,compressed,zlib,snapshot"
}

# --- external data file ----------------------------------------------------
gen_datafile() { # NAME RAW(on|off)
	local name=$1 raw=$2 cs=$((64 * K)) size=$((32 * M))
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "data_file=$name.data,data_file_raw=$raw"
	std_cmds "$cs" "$size"
	io "$name.qcow2" qcow2 - "${CMDS[@]}"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,datafile,datafile-raw-$raw,zero"
}

# --- internal snapshots ----------------------------------------------------
gen_snap() {
	local name=snap-c64k cs=$((64 * K)) size=$((32 * M))
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size"
	io "$name.qcow2" qcow2 - \
		-c "write -P 0x11 0 $((4 * cs))" \
		-c "write -P 0x12 $((16 * cs)) $cs" \
		-c "write -z $((32 * cs)) $((2 * cs))"
	retry qemu-img snapshot -c snap1 "$name.qcow2"
	io "$name.qcow2" qcow2 - \
		-c "write -P 0x21 $cs $cs" \
		-c "write -P 0x22 $((2 * cs + cs / 2)) $((cs / 4))" \
		-c "write -P 0x23 $((64 * cs)) $cs" \
		-c "discard $((16 * cs)) $cs"
	retry qemu-img snapshot -c snap2 "$name.qcow2"
	io "$name.qcow2" qcow2 - \
		-c "write -P 0x31 $((3 * cs + 4 * K)) $((4 * K))" \
		-c "write -z 0 $cs" \
		-c "write -P 0x32 $((100 * cs)) $cs"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,snapshots,zero"
}

# --- backing chains: raw base <- qcow v1 or qcow2 middle <- qcow2 top -----
gen_chain_q1() { # same sizes; qcow v1 in the middle
	local d=chain-q1 name=chain-q1
	LOGNAME=$name
	mkdir -p "$d"
	create "$d/base.raw" raw $((32 * M))
	io "$d/base.raw" raw - \
		-c "write -P 0xa1 0 $M" \
		-c "write -P 0xa2 $((8 * M)) $((64 * K))" \
		-c "write -P 0xa3 $((20 * M)) $((4 * K))" \
		-c "write -P 0xa4 $((32 * M - 4 * K)) $((4 * K))"
	create "$d/mid.qcow" qcow $((32 * M)) -b base.raw -F raw
	io "$d/mid.qcow" qcow - \
		-c "write -P 0xb1 $((512 * K)) $M" \
		-c "write -P 0xb2 $((12 * M)) $((8 * K))" \
		-c "write -P 0xb3 $((20 * M + 1 * K)) $((1 * K))"
	create "$d/top.qcow2" qcow2 $((32 * M)) -b mid.qcow -F qcow
	io "$d/top.qcow2" qcow2 - \
		-c "write -P 0xc1 0 $((64 * K))" \
		-c "write -z $((8 * M)) $((64 * K))" \
		-c "write -P 0xc2 $((12 * M + 4 * K)) $((4 * K))" \
		-c "discard $((20 * M)) $((64 * K))" \
		-c "write -P 0xc3 $((24 * M)) $((64 * K))"
	register chain-q1-mid "$d/mid.qcow" qcow - "qcow,backing,backing-raw"
	register chain-q1-top "$d/top.qcow2" qcow2 - "qcow2,v3,backing,backing-qcow,chain3,zero"
}

gen_chain_longer() { # top longer than middle longer than base; base in a subdirectory
	local d=chain-longer name=chain-longer
	LOGNAME=$name
	mkdir -p "$d/base"
	create "$d/base/base.raw" raw $((16 * M))
	io "$d/base/base.raw" raw - \
		-c "write -P 0xa1 0 $((128 * K))" \
		-c "write -P 0xa2 $((16 * M - 64 * K)) $((64 * K))"
	create "$d/mid.qcow2" qcow2 $((24 * M)) -b base/base.raw -F raw -o cluster_size=4096
	io "$d/mid.qcow2" qcow2 - \
		-c "write -P 0xb1 $((64 * K)) $((128 * K))" \
		-c "write -P 0xb2 $((20 * M)) $((64 * K))"
	create "$d/top.qcow2" qcow2 $((32 * M)) -b mid.qcow2 -F qcow2
	io "$d/top.qcow2" qcow2 - \
		-c "write -P 0xc1 $((16 * M - 32 * K)) $((64 * K))" \
		-c "write -P 0xc2 $((28 * M)) $((64 * K))"
	register chain-longer-mid "$d/mid.qcow2" qcow2 - "qcow2,v3,backing,backing-raw,backing-shorter"
	register chain-longer-top "$d/top.qcow2" qcow2 - "qcow2,v3,backing,chain3,backing-shorter"
}

gen_chain_shorter() { # top shorter than its backing chain
	local d=chain-shorter name=chain-shorter
	LOGNAME=$name
	mkdir -p "$d"
	create "$d/base.raw" raw $((32 * M))
	io "$d/base.raw" raw - \
		-c "write -P 0xa1 0 $((64 * K))" \
		-c "write -P 0xa2 $((16 * M - 4 * K)) $((64 * K))" \
		-c "write -P 0xa3 $((31 * M)) $((64 * K))"
	create "$d/mid.qcow2" qcow2 $((32 * M)) -b base.raw -F raw
	io "$d/mid.qcow2" qcow2 - -c "write -P 0xb1 $((8 * M)) $((64 * K))"
	create "$d/top.qcow2" qcow2 $((16 * M)) -b mid.qcow2 -F qcow2
	io "$d/top.qcow2" qcow2 - -c "write -P 0xc1 $((4 * M)) $((64 * K))"
	register chain-shorter-top "$d/top.qcow2" qcow2 - "qcow2,v3,backing,chain3,backing-longer"
}

# --- encryption --------------------------------------------------------------
gen_luks() { # NAME CIPHER MODE IVGEN [IVHASH]
	local name=$1 cs=$((64 * K)) size=$((32 * M)) opts
	LOGNAME=$name
	opts="encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=$2,encrypt.cipher-mode=$3,encrypt.ivgen-alg=$4"
	[ $# -ge 5 ] && opts="$opts,encrypt.ivgen-hash-alg=$5"
	create_enc "$name.qcow2" qcow2 "$size" "$opts"
	std_cmds "$cs" "$size"
	io "$name.qcow2" qcow2 "$KEY" "${CMDS[@]}"
	register "$name" "$name.qcow2" qcow2 "$KEY" "qcow2,v3,encrypted,luks,$2-$3-$4,zero"
}

gen_aes() {
	local name cs size=$((32 * M))
	# qemu 7.2 still creates legacy AES images (qemu-img create warns
	# nothing; only system emulators refuse to open them).
	name=aes-qcow2
	LOGNAME=$name
	cs=$((64 * K))
	create_enc "$name.qcow2" qcow2 "$size" "encrypt.format=aes"
	std_cmds "$cs" "$size"
	io "$name.qcow2" qcow2 "$KEY" "${CMDS[@]}"
	register "$name" "$name.qcow2" qcow2 "$KEY" "qcow2,v3,encrypted,aes,zero"

	name=aes-qcow
	LOGNAME=$name
	cs=$((4 * K))
	create_enc "$name.qcow" qcow "$size" "encrypt.format=aes"
	std_cmds "$cs" "$size" $((cs * cs / 8))
	io "$name.qcow" qcow "$KEY" "${CMDS[@]}"
	register "$name" "$name.qcow" qcow "$KEY" "qcow,encrypted,aes"
}

# --- refcount widths -----------------------------------------------------------
gen_refcount() { # NAME BITS CLUSTER
	local name=$1 cs=$3 size=$((32 * M))
	LOGNAME=$name
	create "$name.qcow2" qcow2 "$size" -o "refcount_bits=$2,cluster_size=$cs"
	std_cmds "$cs" "$size" $((cs * cs / 8))
	io "$name.qcow2" qcow2 - "${CMDS[@]}"
	register "$name" "$name.qcow2" qcow2 - "qcow2,v3,refcount$2,zero"
}

# --- qcow v1 -----------------------------------------------------------------
gen_qcow1() {
	local name=qcow1 cs=$((4 * K)) size=$((32 * M))
	LOGNAME=$name
	create "$name.qcow" qcow "$size"
	std_cmds "$cs" "$size" $((cs * cs / 8))
	CMDS+=(
		-c "write -c -P 0x81 $((40 * cs)) $cs"
		-c "write -c -P 0x82 $((41 * cs)) $cs"
		-c "write -c -s $RANDOM_FILE $((43 * cs)) $cs"
	)
	io "$name.qcow" qcow - "${CMDS[@]}"
	register "$name" "$name.qcow" qcow - "qcow,compressed,zlib"
}

start=$(date +%s%N)
LOGNAME=setup
# Incompressible, but reproducible, content for compressed writes that qemu
# has to store uncompressed.
RANDOM_FILE=$OUT/random.bin
if command -v python3 >/dev/null 2>&1; then
	python3 -c 'import hashlib,sys
b=b"".join(hashlib.sha256(b"qcowsetup%d" % i).digest() for i in range(2048))
sys.stdout.buffer.write(b)' >"$RANDOM_FILE"
else
	head -c $((64 * K)) /dev/urandom >"$RANDOM_FILE"
fi

# Each job below is independent; run them two at a time per CPU, the slow
# ones (LUKS key derivation timing, the qcow v1 chain) first.
jobs_max=$(($(nproc 2>/dev/null || echo 2) * 2))
rm -f logs/failed logs/times
job() {
	while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
		wait -n || true
	done
	(
		# shellcheck disable=SC2034 # t0 and what are used by the trap
		t0=$(date +%s%N) what="$*"
		# set -e ends the job at its first failure; the trap records it
		trap 'rc=$?; [ $rc -eq 0 ] || echo "$what (exit $rc)" >>logs/failed
			echo "$((($(date +%s%N) - t0) / 1000000)) ms $what" >>logs/times' EXIT
		"$@"
	) &
}

job gen_luks luks-aes-xts aes-256 xts plain64
job gen_luks luks-aes-cbc-essiv aes-256 cbc essiv sha256
job gen_luks luks-serpent-xts serpent-256 xts plain64
job gen_luks luks-twofish-xts twofish-256 xts plain64
job gen_chain_q1
job gen_plain c512-v3 512 1.1 $((16 * M)) "qcow2,v3,c512,zero,multi-l2"
job gen_plain c4k-v3 4096 1.1 $((32 * M)) "qcow2,v3,c4k,zero,multi-l2"
job gen_plain c64k-v3 65536 1.1 $((32 * M)) "qcow2,v3,c64k,zero"
job gen_c2m
job gen_plain c512-v2 512 0.10 $((16 * M)) "qcow2,v2,c512,multi-l2"
job gen_plain c4k-v2 4096 0.10 $((32 * M)) "qcow2,v2,c4k,multi-l2"
job gen_plain c64k-v2 65536 0.10 $((32 * M)) "qcow2,v2,c64k"
job gen_xl2 xl2-c64k 65536
job gen_xl2 xl2-c32k 32768
job gen_xl2_backing
job gen_prealloc prealloc-metadata metadata $((32 * M))
job gen_prealloc prealloc-falloc falloc $((16 * M))
job gen_lazy
job gen_leak
job gen_comp comp-zlib-c64k zlib 65536
job gen_comp comp-zstd-c64k zstd 65536
job gen_comp comp-zlib-c4k zlib 4096
job gen_comp comp-zstd-c4k zstd 4096
job gen_comp_snap
job gen_datafile df-raw on
job gen_datafile df-noraw off
job gen_snap
job gen_chain_longer
job gen_chain_shorter
job gen_aes
job gen_refcount rc1-c64k 1 65536
job gen_refcount rc64-c4k 64 4096
job gen_qcow1

wait
if [ -s logs/failed ]; then
	echo "gen-matrix: failed jobs (logs in $OUT/logs):" >&2
	cat logs/failed >&2
	exit 1
fi
# manifest sorted by name, whatever order the jobs finished in
sort -t "$(printf '\t')" -k1,1 logs/*.manifest >>"$MANIFEST"
rm -f logs/*.manifest
ms=$((($(date +%s%N) - start) / 1000000))
echo "gen-matrix: $(grep -vc '^#' "$MANIFEST") images in $OUT in $((ms / 1000)).$((ms % 1000 / 100)) s"
