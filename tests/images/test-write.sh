#!/bin/bash
# Automake test: the metadata writer (src/lib/qcow2_rw.c) on images made
# by qemu-img, judged by qemu-img. For each image: qemu-img convert gives the
# raw reference, tests/images/qcow2-write applies the same seeded random
# writes (1 byte to 4 MiB, aligned and not) to the image and to the
# reference, then
#   - `qemu-img check` must find no error and no leak,
#   - `qemu-img compare` must find the image identical to the reference,
#   - internal snapshots must still read as before,
#   - crash runs (--crash-after: the driver dies without flush or close)
#     must leave an image `qemu-img check` finds without corruption
#     (leaks allowed) and identical to the reference outside the sectors
#     written since the last flush.
# Exit: 0 pass, 1 fail, 77 skip (no qemu-img), 99 error.
set -u
me=test-write
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
drv=${QCOW2_WRITE:-$builddir/tests/images/qcow2-write}
seeds=${QS_WRITE_SEEDS:-2}

need qemu-img qemu-io
need_built "$drv"
make_work
cd "$work" || exit 99

qio() { qemu-io -f qcow2 "$@" >/dev/null 2>&1; }

# Images: NAME then the commands that make NAME.qcow2 (and its backing
# files). Content is written by qemu-io so that the writer meets QEMU's own
# layouts: data, zero clusters (preallocated or not), compressed clusters,
# snapshots, subclusters.
make_image() {
	local n=$1
	rm -f "$n".* "$n"-*
	case $n in
	plain)
		qemu-img create -q -f qcow2 "$n.qcow2" 64M ;;
	filled)
		qemu-img create -q -f qcow2 "$n.qcow2" 64M
		qio -c 'write -P 0x11 0 4M' -c 'write -P 0x22 10M 3M' -c 'write -z 2M 1M' \
			-c 'write -z -u 11M 512k' -c 'discard 3M 256k' "$n.qcow2" ;;
	compressed)
		qemu-img create -q -f raw "$n.src" 32M
		qemu-io -f raw -c 'write -P 0x33 0 8M' -c 'write -P 0x44 12M 4M' "$n.src" >/dev/null
		head -c 4M /dev/urandom | dd of="$n.src" bs=1M seek=20 conv=notrunc status=none
		qemu-img convert -q -c -O qcow2 "$n.src" "$n.qcow2"; rm -f "$n.src" ;;
	zstd)
		qemu-img create -q -f raw "$n.src" 32M
		qemu-io -f raw -c 'write -P 0x35 0 8M' "$n.src" >/dev/null
		qemu-img convert -q -c -O qcow2 -o compression_type=zstd "$n.src" "$n.qcow2"; rm -f "$n.src" ;;
	snapshot)
		qemu-img create -q -f qcow2 "$n.qcow2" 48M
		qio -c 'write -P 0x55 0 16M' -c 'write -z 20M 1M' "$n.qcow2"
		qemu-img snapshot -c s1 "$n.qcow2"
		qio -c 'write -P 0x66 4M 2M' "$n.qcow2"
		qemu-img snapshot -c s2 "$n.qcow2" ;;
	extl2)
		qemu-img create -q -f qcow2 "$n-base.qcow2" 64M
		qio -c 'write -P 0x77 0 64M' "$n-base.qcow2"
		qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k -b "$n-base.qcow2" -F qcow2 "$n.qcow2"
		qio -c 'write -P 0x78 8k 4k' -c 'write -z 200k 8k' -c 'write -P 0x79 1M 300k' "$n.qcow2" ;;
	chain)
		qemu-img create -q -f raw "$n-base.raw" 40M
		qemu-io -f raw -c 'write -P 0x81 0 40M' "$n-base.raw" >/dev/null
		qemu-img create -q -f qcow2 -b "$n-base.raw" -F raw "$n-mid.qcow2" 56M
		qio -c 'write -P 0x82 4M 4M' -c 'write -z 20M 2M' "$n-mid.qcow2"
		qemu-img create -q -f qcow2 -b "$n-mid.qcow2" -F qcow2 "$n.qcow2" 64M
		qio -c 'write -P 0x83 6M 1M' "$n.qcow2" ;;
	datafile)
		qemu-img create -q -f qcow2 -o data_file="$n.data" "$n.qcow2" 64M
		qio -c 'write -P 0x91 0 2M' -c 'write -z 8M 1M' "$n.qcow2" ;;
	datafile-raw)
		qemu-img create -q -f qcow2 -o data_file="$n.data",data_file_raw=on "$n.qcow2" 64M
		qio -c 'write -P 0x92 0 2M' "$n.qcow2" ;;
	c512)
		qemu-img create -q -f qcow2 -o cluster_size=512 "$n.qcow2" 24M
		qio -c 'write -P 0xa1 0 1M' "$n.qcow2" ;;
	c512-rc64)
		qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$n.qcow2" 16M ;;
	c512-rc1)
		qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 "$n.qcow2" 16M ;;
	c2m)
		qemu-img create -q -f qcow2 -o cluster_size=2M -b "$n-base.raw" -F raw "$n.qcow2" 96M 2>/dev/null ||
		{ qemu-img create -q -f raw "$n-base.raw" 64M; qemu-io -f raw -c 'write -P 0xb1 0 64M' "$n-base.raw" >/dev/null
		  qemu-img create -q -f qcow2 -o cluster_size=2M -b "$n-base.raw" -F raw "$n.qcow2" 96M; }
		qio -c 'write -P 0xb2 3M 1M' "$n.qcow2" ;;
	lazy)
		qemu-img create -q -f qcow2 -o lazy_refcounts=on "$n.qcow2" 64M
		qio -c 'write -P 0xc1 0 1M' "$n.qcow2" ;;
	v2)
		qemu-img create -q -f qcow2 -o compat=0.10 "$n.qcow2" 64M
		qio -c 'write -P 0xd1 0 3M' "$n.qcow2"
		qemu-img snapshot -c s1 "$n.qcow2" ;;
	*) echo "unknown image $n"; return 1 ;;
	esac
}

images="plain filled compressed zstd snapshot extl2 chain datafile datafile-raw c512 c512-rc64 c512-rc1 c2m lazy v2"

dirty_bit() { od -An -tx1 -j 79 -N 1 "$1" | tr -d ' '; }

for n in $images; do
	for seed in $(seq 1 "$seeds"); do
		args=(--seed "$seed" --ops 120)
		case $n in c512*) args+=(--max-write 1048576 --cache 65536) ;; esac
		[ $((seed % 2)) = 0 ] && args+=(--write-through)
		if ! make_image "$n" >"$n.gen.log" 2>&1; then
			fail "$n: cannot make the image: $(tail -3 "$n.gen.log")"; continue
		fi
		qemu-img convert -O raw "$n.qcow2" "$n.ref"
		for s in s1 s2; do
			qemu-img snapshot -l "$n.qcow2" 2>/dev/null | grep -qw "$s" &&
				qemu-img convert -l "snapshot.name=$s" -O raw "$n.qcow2" "$n.$s.raw"
		done
		if ! "$drv" "${args[@]}" "$n.qcow2" "$n.ref" >"$n.drv.log" 2>&1; then
			fail "$n seed $seed: the driver failed: $(tail -3 "$n.drv.log")"; continue
		fi
		if ! qemu-img check "$n.qcow2" >"$n.check.log" 2>&1; then
			fail "$n seed $seed: qemu-img check: $(grep -v '^$' "$n.check.log" | tail -4 | tr '\n' ' ')"; continue
		fi
		if ! out=$(qemu-img compare -f qcow2 -F raw "$n.qcow2" "$n.ref" 2>&1); then
			fail "$n seed $seed: qemu-img compare: $out"; continue
		fi
		snaps=ok
		for s in s1 s2; do
			[ -f "$n.$s.raw" ] || continue
			qemu-img convert -l "snapshot.name=$s" -O raw "$n.qcow2" "$n.$s.after" &&
				cmp -s "$n.$s.raw" "$n.$s.after" || snaps="snapshot $s changed"
		done
		[ "$snaps" = ok ] || { fail "$n seed $seed: $snaps"; continue; }
		if [ "$(dirty_bit "$n.qcow2")" != 00 ] && [ "$(( 0x$(dirty_bit "$n.qcow2") & 1 ))" = 1 ]; then
			fail "$n seed $seed: the dirty bit is still set"; continue
		fi
		pass "$n seed $seed: check clean, identical to the reference$( [ -f "$n.s1.raw" ] && echo ', snapshots unchanged')"
	done
done

# Crash runs: the driver dies after a random number of writes, without a
# flush or a close. Sectors written since the last flush may hold anything;
# the rest must match the reference as it was before those writes.
crash_images="filled snapshot extl2 chain c512 lazy"
for n in $crash_images; do
	runs=0 bad=
	for seed in $(seq 11 $((10 + seeds * 2))); do
		make_image "$n" >"$n.gen.log" 2>&1 || { bad="cannot make the image"; break; }
		qemu-img convert -O raw "$n.qcow2" "$n.ref"
		cp "$n.ref" "$n.before"
		after=$((1 + seed % 60))
		if ! "$drv" --seed "$seed" --ops 200 --crash-after "$after" "$n.qcow2" "$n.ref" >"$n.unflushed" 2>"$n.drv.log"; then
			bad="driver: $(tail -2 "$n.drv.log")"; break
		fi
		# the reference without the unflushed writes: take those sectors
		# from the image, whatever they hold
		qemu-img check "$n.qcow2" >"$n.check.log" 2>&1
		rc=$?
		if [ $rc != 0 ] && [ $rc != 3 ]; then
			bad="seed $seed: qemu-img check exit $rc: $(grep -i error "$n.check.log" | head -3 | tr '\n' ' ')"; break
		fi
		qemu-img convert -O raw "$n.qcow2" "$n.crashed"
		while read -r off len; do
			s=$((off / 512)) e=$(((off + len + 511) / 512))
			dd if="$n.crashed" of="$n.ref" bs=512 skip=$s seek=$s count=$((e - s)) conv=notrunc status=none
		done <"$n.unflushed"
		if ! cmp -s "$n.ref" "$n.crashed"; then
			bad="seed $seed: flushed data lost ($(cmp "$n.ref" "$n.crashed" 2>&1 | head -1))"; break
		fi
		runs=$((runs + 1))
	done
	if [ -z "$bad" ]; then pass "$n: $runs crash runs: qemu-img check finds no corruption, flushed data intact"
	else fail "$n crash run: $bad"; fi
done

summary "$me"
