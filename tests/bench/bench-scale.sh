#!/bin/bash
# Many read-write mappings per host (a hypervisor), in one VM run (TCG):
# QS_SCALE_N mappings (default 100; odd ones LUKS, even ones unencrypted,
# 64 MiB empty images) opened one by one, 1 MiB written into each, then
# closed one by one (tests/vm/guest/scale.sh). Prints the time of every open
# and close (the curve: targets flat from 1 to N), and the memory of all the
# qcowsetup-daemon processes (guardians included: VmLck and VmRSS from
# /proc/PID/status, summed) per mapping after 1, 5, 10, 20, 50, 100
# mappings (targets: locked <= 4 MiB, RSS <= 8 MiB per mapping).
#   tests/bench/bench-scale.sh
# Environment: QS_SCALE_N (default 100), QS_SCALE_MEM (guest MiB, default
# 3072), QS_KEEP=1 (keep the work directory), QS_VM_* (run-vm.sh).
# Exit: 0 (also when the VM cannot run: it says SKIP), 1 when the run failed.
set -eu
me=bench-scale
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
skip_test() { echo "$me: SKIP: $*"; exit 0; }	# a benchmark, not an automake test
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$(dirname "$qs")/qcowsetup-daemon
n=${QS_SCALE_N:-100}
need_vm
need qemu-img
[ -x "$qs" ] && [ -x "$daemon" ] || { echo "$me: error: build first ($qs, $daemon)" >&2; exit 1; }

make_work
mkdir "$work/m" "$work/share"
guest_script scale "$work/share"
"$top/tests/vm/gen-scale.sh" "$work/m"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" $((n * 8 + 512))M
rm -rf "$work/m"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
rc=0
"$top/tests/vm/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem "${QS_SCALE_MEM:-3072}" \
	--smp 1 --extra "$qs" --extra "$daemon" --timeout $((n * 30 + 300)) \
	-- scale.sh "$n" >"$work/out" 2>&1 || rc=$?
tr -d '\r' <"$work/out" | grep -E '^(OPEN|CLOSE|MEM|PROC|SMAPS|KERNEL|ERROR) ' >"$work/res" || :
[ $rc = 0 ] && ! grep -q '^ERROR' "$work/res" || { tail -30 "$work/out"; echo "$me: the VM run failed (exit $rc)"; exit 1; }

echo
echo "== qcowsetup at scale: $n read-write mappings in one VM run (TCG, 1 vCPU), $(sed -n 's/^KERNEL //p' "$work/res")"
echo "   64 MiB images (odd: LUKS, even: unencrypted), 1 MiB written into each; host load before: $load0"
awk -v n="$n" '
	function median(k, a,   i, j, t) {
		for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
		return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
	}
	function med(arr, lo, hi,   i, k, a) {
		k = 0
		for (i = lo; i <= hi; i++) if (i in arr) a[++k] = arr[i]
		return k ? median(k, a) : -1
	}
	$1 == "OPEN" { op[$2] = $4; kind[$2] = $3 }
	$1 == "CLOSE" { cl[$2] = $3 }
	$1 == "MEM" { mem[++nm] = $0 }
	$1 == "PROC" { pl[$2] += $3; pr[$2] += $4; pn[$2]++ }
	$1 == "SMAPS" { sm[++ns] = sprintf("    %8d %8d  %s", $2, $3, $4) }
	END {
		print "\n  memory of the qcowsetup-daemon processes (VmLck, VmRSS from /proc/PID/status)"
		printf "  %9s %10s %14s %14s %16s %16s\n", "mappings", "processes", "locked KiB", "RSS KiB", "locked/mapping", "RSS/mapping"
		for (i = 1; i <= nm; i++) {
			split(mem[i], f, " ")
			printf "  %9d %10d %14d %14d %12.0f KiB %12.0f KiB\n", f[2], f[3], f[4], f[5], f[4] / f[2], f[5] / f[2]
		}
		for (r in pn) printf "  %s processes: %d, each %.0f KiB locked, %.0f KiB RSS (mean)\n", r, pn[r], pl[r] / pn[r], pr[r] / pn[r]
		print "  one daemon: locked KiB, RSS KiB, mapping"
		for (i = 1; i <= ns; i++) print sm[i]
		split(mem[nm], f, " ")
		printf "  targets: locked <= 4096 KiB per mapping: %s; RSS <= 8192 KiB per mapping: %s\n",
			f[4] / f[2] <= 4096 ? "MET" : "not met", f[5] / f[2] <= 8192 ? "MET" : "not met"
		print "\n  open and close time per mapping (ms): medians of groups of 10, then every mapping"
		printf "  (mapping i opens with i - 1 others open, and closes with %d - i others still open)\n", n
		printf "  %9s %12s %12s %12s\n", "mappings", "open LUKS", "open plain", "close"
		for (lo = 1; lo <= n; lo += 10) {
			hi = lo + 9 > n ? n : lo + 9
			delete lk; delete pk
			for (i = lo; i <= hi; i++) if (i in op) { if (kind[i] == "luks") lk[i] = op[i]; else pk[i] = op[i] }
			printf "  %4d-%-4d %12.0f %12.0f %12.0f\n", lo, hi, med(lk, lo, hi), med(pk, lo, hi), med(cl, lo, hi)
		}
		k = (n >= 20) ? 10 : 1
		printf "  flat? open: first %d %.0f ms, last %d %.0f ms (median); close: first %.0f ms, last %.0f ms\n",
			k, med(op, 1, k), k, med(op, n - k + 1, n), med(cl, 1, k), med(cl, n - k + 1, n)
		printf "\n  %5s %6s %8s %8s\n", "#", "kind", "open ms", "close ms"
		for (i = 1; i <= n; i++) printf "  %5d %6s %8d %8d\n", i, kind[i], op[i], cl[i]
	}' "$work/res"
