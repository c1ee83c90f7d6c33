#!/bin/bash
# Engine benchmark: a 1 TiB qcow2 with 1,000,000 allocated 64 KiB clusters in
# shuffled guest order; `qcowsetup table` and `qcowsetup map` against
# `qemu-img map` on the same image: wall time and peak memory, as ratios.
# Not a test: it prints numbers.
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
qs=${QCOWSETUP:-$top/qcowsetup}
n=${BENCH_CLUSTERS:-1000000}
dir=${BENCH_DIR:-/var/tmp/qcowsetup-bench}
img=$dir/frag-$n.qcow2
mkdir -p "$dir"
if [ ! -f "$img" ]; then
	echo "generating $img ($n clusters, 1 TiB virtual)..."
	python3 "$top/tests/bench/gen-fragmented.py" "$img.tmp" "$n" $((1 << 40)) 1
	mv "$img.tmp" "$img"
fi

measure() {	# label command... -> "label seconds peak_kib"
	local label=$1 out
	shift
	out=$( { /usr/bin/time -f '%e %M' "$@" >/dev/null; } 2>&1 | tail -1)
	echo "$label $out"
}

printf '%-28s %10s %12s\n' "command" "seconds" "peak KiB"
results=$(
	measure qemu-img-map qemu-img map --output=json "$img"
	measure qcowsetup-map "$qs" map --json "$img"
	measure qcowsetup-table "$qs" table "$img" bench
)
echo "$results" | while read -r l s m; do printf '%-28s %10s %12s\n' "$l" "$s" "$m"; done
echo "$results" | awk '
	$1 == "qemu-img-map" { qs = $2; qm = $3 }
	$1 == "qcowsetup-map" { ms = $2; mm = $3 }
	$1 == "qcowsetup-table" { ts = $2; tm = $3 }
	END {
		printf "table vs qemu-img map: %.2fx faster, %.2fx the memory\n", qs / (ts ? ts : 0.01), tm / qm
		printf "map   vs qemu-img map: %.2fx faster, %.2fx the memory\n", qs / (ms ? ms : 0.01), mm / qm
	}'
echo "targets in the top table: $("$qs" table "$img" bench | grep -vc '^#')"
