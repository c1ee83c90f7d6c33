#!/bin/bash
# Automake test: qcow2_rw_resize (src/lib/qcow2_rw.c) on images made by
# qemu-img, with `qemu-img resize` as the oracle. For each case the same
# image is resized by tests/images/qcow2-write --resize and, in a copy, by
# qemu-img; then
#   - `qemu-img check` must find no error and no leak,
#   - `qemu-img info` must show the new virtual size,
#   - `qemu-img compare` must find the two identical (the grown area reads
#     zeros, also where a backing file reaches past the old size), and the
#     image identical to its raw reference after writes at the new size;
#   - a refused resize (shrink past allocated clusters, a version 2 image
#     grown over its backing file) exits 3 and leaves the image as it was,
#     where qemu-img's answer is the same refusal or a discard.
# Exit: 0 pass, 1 fail, 77 skip (no qemu-img), 99 error.
set -u
me=test-resize
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
drv=${QCOW2_WRITE:-$builddir/tests/images/qcow2-write}

need qemu-img qemu-io
need_built "$drv"
make_work
cd "$work" || exit 99

qio() { qemu-io -f qcow2 "$@" >/dev/null 2>&1; }
M=$((1 << 20))

# NAME: the commands that make NAME.qcow2 (and its backing files)
make_image() {
	local n=$1
	rm -f "$n".* "$n"-*
	case $n in
	plain)
		qemu-img create -q -f qcow2 "$n.qcow2" 64M
		qio -c 'write -P 0x11 0 1M' -c 'write -P 0x12 63M 1M' "$n.qcow2" ;;
	unaligned)
		qemu-img create -q -f qcow2 "$n.qcow2" $((10 * M + 1536))
		qio -c "write -P 0x21 $((10 * M - 64 * 1024)) $((64 * 1024 + 1536))" "$n.qcow2" ;;
	c512)
		qemu-img create -q -f qcow2 -o cluster_size=512 "$n.qcow2" 24M
		qio -c 'write -P 0xa1 0 1M' -c 'write -P 0xa2 23M 1M' "$n.qcow2" ;;
	overbacking)
		qemu-img create -q -f raw "$n-base.raw" 64M
		qemu-io -f raw -c 'write -P 0x81 0 64M' "$n-base.raw" >/dev/null
		qemu-img create -q -f qcow2 -b "$n-base.raw" -F raw "$n.qcow2" $((32 * M + 1536))
		qio -c 'write -P 0x82 4M 1M' "$n.qcow2" ;;
	extl2)
		qemu-img create -q -f qcow2 "$n-base.qcow2" 64M
		qio -c 'write -P 0x77 0 64M' "$n-base.qcow2"
		qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k -b "$n-base.qcow2" -F qcow2 \
			"$n.qcow2" $((40 * M + 2560))
		qio -c 'write -P 0x78 8k 4k' -c "write -P 0x79 $((40 * M)) 2560" "$n.qcow2" ;;
	snapshot)
		qemu-img create -q -f qcow2 "$n.qcow2" 48M
		qio -c 'write -P 0x55 0 16M' "$n.qcow2"
		qemu-img snapshot -c s1 "$n.qcow2"
		qio -c 'write -P 0x66 4M 2M' "$n.qcow2" ;;
	lazy)
		qemu-img create -q -f qcow2 -o lazy_refcounts=on "$n.qcow2" 64M
		qio -c 'write -P 0xc1 0 1M' "$n.qcow2" ;;
	filled)
		qemu-img create -q -f qcow2 "$n.qcow2" 64M
		qio -c 'write -P 0x11 0 4M' -c 'write -P 0x22 10M 3M' -c 'write -z 30M 1M' "$n.qcow2" ;;
	v2back)
		qemu-img create -q -f raw "$n-base.raw" 64M
		qemu-io -f raw -c 'write -P 0x91 0 64M' "$n-base.raw" >/dev/null
		qemu-img create -q -f qcow2 -o compat=0.10 -b "$n-base.raw" -F raw "$n.qcow2" 32M ;;
	*) echo "unknown image $n"; return 1 ;;
	esac
}

vsize() { qemu-img info --output=json "$1" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' | head -1; }

# name image new-size [--shrink] expect (ok | refused)
cases="
grow plain $((128 * M)) - ok
grow-unaligned unaligned $((20 * M)) - ok
grow-l1 c512 $((64 * M)) - ok
grow-over-backing overbacking $((80 * M)) - ok
grow-extl2-over-backing extl2 $((96 * M + 512)) - ok
grow-snapshot snapshot $((64 * M)) - ok
grow-lazy lazy $((65 * M)) - ok
shrink filled $((16 * M)) --shrink ok
shrink-refused filled $((8 * M)) --shrink refused
shrink-no-flag plain $((32 * M)) - refused
grow-v2-over-backing v2back $((48 * M)) - refused
"
while read -r name n size flag expect; do
	[ -n "$name" ] || continue
	[ "$flag" = - ] && flag=
	if ! make_image "$n" >"$name.gen.log" 2>&1; then
		fail "$name: cannot make the image: $(tail -3 "$name.gen.log")"; continue
	fi
	qemu-img convert -O raw "$n.qcow2" "$name.before"
	cp "$name.before" "$name.ref"
	cp "$n.qcow2" "$name.qemu.qcow2"
	qemu-img resize -q -f qcow2 $flag "$name.qemu.qcow2" "$size" >"$name.qemu.log" 2>&1
	qrc=$?
	"$drv" --ops 0 --resize "$size" $flag "$n.qcow2" "$name.ref" >"$name.drv.log" 2>&1
	rc=$?
	if ! qemu-img check "$n.qcow2" >"$name.check.log" 2>&1; then
		fail "$name: qemu-img check: $(grep -v '^$' "$name.check.log" | tail -3 | tr '\n' ' ')"; continue
	fi
	if [ "$expect" = refused ]; then
		if [ $rc != 3 ]; then fail "$name: exit $rc, not refused: $(tail -2 "$name.drv.log")"; continue; fi
		if ! out=$(qemu-img compare -f qcow2 -F raw "$n.qcow2" "$name.before" 2>&1) ||
		   [ "$(vsize "$n.qcow2")" != "$(stat -c %s "$name.before")" ]; then
			fail "$name: the refused resize changed the image: $out"; continue
		fi
		pass "$name: refused ($(tail -1 "$name.drv.log")), image unchanged, check clean; qemu-img resize exit $qrc"
		continue
	fi
	if [ $rc != 0 ]; then fail "$name: the driver failed: $(tail -2 "$name.drv.log")"; continue; fi
	if [ $qrc != 0 ]; then fail "$name: qemu-img resize failed: $(tail -2 "$name.qemu.log")"; continue; fi
	if [ "$(vsize "$n.qcow2")" != "$size" ]; then
		fail "$name: qemu-img info shows $(vsize "$n.qcow2"), not $size"; continue
	fi
	if ! out=$(qemu-img compare "$n.qcow2" "$name.qemu.qcow2" 2>&1); then
		fail "$name: differs from qemu-img resize: $out"; continue
	fi
	# writes at the new size, then the reference
	if ! "$drv" --seed 3 --ops 40 --max-write 1048576 "$n.qcow2" "$name.ref" >"$name.drv2.log" 2>&1 ||
	   ! qemu-img check "$n.qcow2" >"$name.check2.log" 2>&1 ||
	   ! out=$(qemu-img compare -f qcow2 -F raw "$n.qcow2" "$name.ref" 2>&1); then
		fail "$name: after writes at the new size: $(tail -2 "$name.drv2.log") $out"; continue
	fi
	pass "$name: $(stat -c %s "$name.before") -> $size bytes: check clean, same as qemu-img resize, writes at the new size"
done <<<"$cases"

summary "$me"
