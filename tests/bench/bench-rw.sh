#!/bin/bash
# Write benchmark of read-write mappings, in one VM run (TCG: the ratios
# matter, not the absolute numbers), on 512 MiB LUKS images on ext4 on virtio:
#   - first writes into an empty image (LUKS, and LUKS with extended L2
#     entries, where only the touched subclusters pass the cipher), 1 MiB
#     sequential (QD4) and 4 KiB random (QD16), fio direct I/O, one pass
#     over 400 MiB at most (first writes, not rewrites): qcowsetup
#     (allocation by the daemon, then the fast path once the clusters are
#     remapped) against qemu-nbd
#     (QEMU's qcow2 driver behind the kernel NBD client, cache=none,
#     aio=native); target >= 1x;
#   - writes to allocated clusters (time-based: rewrites): qcowsetup's fast path against raw
#     dm-crypt over a loop device (the limit); target >= 0.95x;
#   - the same on an unencrypted image, and copy-on-write (first writes into
#     an overlay over a raw and over a qcow2 backing file of random data),
#     against qemu-nbd; the plain loop device over a raw file is their limit
#     (and, for comparison, its own first writes into a sparse file);
#   - the daemon's table swaps during the first writes: how long I/O was
#     held (p99, max) and how long a reload took;
#   - the issue's targets, each with its ratio and MET / not met.
# Ratios are medians of the per-round ratios (rounds alternate the order).
#   tests/bench/bench-rw.sh
# With BENCH_BEFORE=DIR (a build tree of another version, e.g. the main
# branch: its qcowsetup and qcowsetup-daemon; BENCH_BASE is the same), a
# before and after in one run: first the slow path alone, that build against
# this one: random 4 KiB QD16 first writes into an empty image,
# copy-on-write into an overlay, reads of backing clusters (BENCH_SLOW_ONLY=1:
# only that; BENCH_SMP: guest CPUs, default 1; BENCH_CONNECTIONS=N: this
# build opens with --nbd-connections N); then its first writes beside this
# build's, as qcowsetup-base.
# Environment: BENCH_RUNTIME (seconds per fio job, default 15), BENCH_ROUNDS
# (default 3), BENCH_PLAIN=0 (only the LUKS image: without the unencrypted
# image, the copy-on-write into overlays over a raw and over a qcow2 backing
# file, and the plain loop device as their limit),
# QS_KEEP=1 (keep the work directory), QS_VM_* (run-vm.sh).
# Exit: 0 (also when the VM cannot run: it says SKIP), 1 when the run failed.
set -eu
me=bench-rw
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
skip_test() { echo "$me: SKIP: $*"; exit 0; }	# a benchmark, not an automake test
qs=${QCOWSETUP:-$builddir/qcowsetup}
daemon=$(dirname "$qs")/qcowsetup-daemon
need_vm
need qemu-img fio
[ -x "$qs" ] && [ -x "$daemon" ] || { echo "$me: error: build first ($qs, $daemon)" >&2; exit 1; }

make_work --keep-on-failure	# the VM's whole output stays for a failed run
mkdir "$work/m" "$work/share"
cp "$here/bench-rw-guest.sh" "$work/share/"
chmod +x "$work/share/bench-rw-guest.sh"
cd "$work/m"
printf 'bench passphrase' >key
sec=(--object secret,id=s0,file=key)
luks() {	# name [options]: qemu-img's PBKDF timing fails now and then on a loaded host
	for _ in 1 2 3 4 5 6; do
		qemu-img create -q -f qcow2 "${sec[@]}" \
			-o "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100${2:+,$2}" "$1" 512M 2>/dev/null && return 0
	done
	echo "$me: error: cannot create $1" >&2
	exit 1
}
luks empty.qcow2
luks full.qcow2 preallocation=falloc
luks empty-xl2.qcow2 extended_l2=on	# 2 KiB subclusters: only the touched ones pass the cipher
if [ "${BENCH_PLAIN:-1}" = 1 ]; then
	qemu-img create -q -f qcow2 empty-plain.qcow2 512M
	# copy-on-write: overlays over a raw and a qcow2 backing file holding
	# data (random, so that nothing is skipped as zeros)
	head -c 512M /dev/urandom >base.raw
	qemu-img convert -q -f raw -O qcow2 base.raw base.qcow2
	qemu-img create -q -f qcow2 -b base.raw -F raw ov-raw.qcow2 512M
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov-qcow2.qcow2 512M
fi
BENCH_BEFORE=${BENCH_BEFORE:-${BENCH_BASE:-}}
fallocate -l 512M full.raw
cd "$work"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/m" "$work/disk.img" 5G
rm -rf "$work/m"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
rc=0
before=()
if [ -n "${BENCH_BEFORE:-}" ]; then
	[ -x "$BENCH_BEFORE/qcowsetup" ] && [ -x "$BENCH_BEFORE/qcowsetup-daemon" ] ||
		{ echo "$me: error: no qcowsetup and qcowsetup-daemon in $BENCH_BEFORE" >&2; exit 1; }
	before=(--extra "$BENCH_BEFORE/qcowsetup=/usr/local/before/qcowsetup"
		--extra "$BENCH_BEFORE/qcowsetup-daemon=/usr/local/before/qcowsetup-daemon")
fi
"$top/tests/vm/bed/run-vm.sh" --share "$work/share" --disk "$work/disk.img" --mem 1536 --smp "${BENCH_SMP:-1}" \
	--extra "$qs" --extra "$daemon" ${before[@]+"${before[@]}"} --timeout 3000 \
	--env "BENCH_RUNTIME=${BENCH_RUNTIME:-15}" --env "BENCH_ROUNDS=${BENCH_ROUNDS:-3}" \
	--env "BENCH_SLOW_ONLY=${BENCH_SLOW_ONLY:-0}" --env "BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-}" \
	-- bench-rw-guest.sh >"$work/out" 2>&1 || rc=$?
tr -d '\r' <"$work/out" | grep -E '^(R|S|RELOAD|STATS|PATHS|SIZE|TARGETS|KERNEL|ERROR) ' >"$work/res" || :
[ $rc = 0 ] && ! grep -q '^ERROR' "$work/res" ||
	{ failed=1; tail -30 "$work/out"; grep '^ERROR' "$work/res"; echo "$me: the VM run failed (exit $rc)"; exit 1; }
if grep -q '^S ' "$work/res"; then
	echo
	echo "== the slow path, $BENCH_BEFORE (before) against this build (after): $(sed -n 's/^KERNEL //p' "$work/res")"
	echo "   unencrypted 512 MiB images, fio 4k QD16 libaio direct=1, ${BENCH_RUNTIME:-15}s per job, median of ${BENCH_ROUNDS:-3} rounds (IOPS)"
	awk '
		function median(n, a,   i, j, t) {
			for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
			return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
		}
		$1 == "S" { n[$3, $4]++; v[$3, $4, n[$3, $4]] = $6 }
		END {
			printf "  %-44s %10s %10s %8s\n", "", "before", "after", "ratio"
			split("first cow backing-read", t, " ")
			split("random first writes into an empty image|copy-on-write into an overlay (random writes)|reads of backing clusters (random)", label, "|")
			for (i = 1; i <= 3; i++) {
				for (w = 0; w < 2; w++) {
					which = w ? "after" : "before"; k = 0; delete a
					for (j = 1; j <= n[which, t[i]]; j++) a[++k] = v[which, t[i], j]
					m[w] = k ? median(k, a) : 0
				}
				printf "  %-44s %10.0f %10.0f %7.2fx\n", label[i], m[0], m[1], m[0] ? m[1] / m[0] : 0
			}
		}' "$work/res"
fi
[ "${BENCH_SLOW_ONLY:-0}" = 1 ] && exit 0

echo
echo "== qcowsetup write benchmark: one VM run (TCG, 1 vCPU), $(sed -n 's/^KERNEL //p' "$work/res")"
echo "   512 MiB images (LUKS aes-xts-plain64; unencrypted and overlays unless BENCH_PLAIN=0) on ext4 on virtio; fio libaio direct=1,"
echo "   ${BENCH_RUNTIME:-15}s per job, ${BENCH_ROUNDS:-3} rounds; host load before: $load0"
awk '
	function median(n, a,   i, j, t) {
		for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
		return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
	}
	# R ROUND KIND DEV TEST KIB_S IOPS: MiB/s for seq, IOPS for rand
	$1 == "R" { v[$2, $3, $4, $5] = ($5 == "seq") ? $6 / 1024 : $7; if ($2 > nr) nr = $2 }
	$1 == "RELOAD" { rl[++nrl] = $0 }
	$1 == "STATS" {
		st[++nst] = $0
		for (j = 6; j <= NF; j++)
			if ($5 == "qcowsetup" && $j ~ /^held_ms_p99=/) { split($j, kv, "="); hp[++nhp] = kv[2] + 0 }
	}
	$1 == "SIZE" { sz[$4, $5, $3] = $6 }
	$1 == "PATHS" { pa[++npa] = $0 }
	$1 == "TARGETS" { targets = $2; slow = $3 }
	function val(kind, dev, test,   r, n, a) {
		n = 0
		for (r = 1; r <= nr; r++) if ((r, kind, dev, test) in v) a[++n] = v[r, kind, dev, test]
		return n ? median(n, a) : -1
	}
	function rat(kind, d1, d2, test,   r, n, a) {
		n = 0
		for (r = 1; r <= nr; r++)
			if ((r, kind, d1, test) in v && (r, kind, d2, test) in v && v[r, kind, d2, test] > 0)
				a[++n] = v[r, kind, d1, test] / v[r, kind, d2, test]
		return n ? median(n, a) : -1
	}
	# per-round ratio of kind/dev/test over kind2/dev2/test2 times scale
	# (v holds MiB/s for seq, IOPS for rand)
	function xrat(kind, dev, test, kind2, dev2, test2, scale,   r, n, a, lim) {
		n = 0
		for (r = 1; r <= nr; r++) {
			if (!((r, kind, dev, test) in v) || !((r, kind2, dev2, test2) in v)) continue
			lim = v[r, kind2, dev2, test2] * scale
			if (lim > 0) a[++n] = v[r, kind, dev, test] / lim
		}
		return n ? median(n, a) : -1
	}
	# unencrypted first writes against the loop device writing into holes
	function vs_sparse(test) {
		if (val("sparse-plain", "loop", test) >= 0)
			printf("    %-46s %7.2fx   (the limit writing into holes, for comparison)\n",
				"  ... / plain loop over a sparse file", xrat("first-write-plain", "qcowsetup", test, "sparse-plain", "loop", test, 1))
	}
	function goal(label, x, t) {
		if (x < 0) printf("    %-46s %8s   >= %-5s %s\n", label, "-", t, "not run")
		else printf("    %-46s %7.2fx   >= %-5s %s\n", label, x, t, (x >= t) ? "MET" : "not met")
	}
	function row(label, kind, dev) {
		printf "  %-34s %12.1f MiB/s %10.0f IOPS\n", label, val(kind, dev, "seq"), val(kind, dev, "rand")
	}
	function ratio(label, kind, d1, d2, target,   s, r, ok) {
		s = rat(kind, d1, d2, "seq"); r = rat(kind, d1, d2, "rand")
		ok = (s >= target && r >= target) ? "MET" : "not met"
		ms = (s >= target) ? "ok" : "MISS"; mr = (r >= target) ? "ok" : "MISS"
		printf("  %-34s %9.2fx %-4s %9.2fx %-4s   target >= %s: %s\n", label, s, ms, r, mr, target, ok)
	}
	END {
		printf "\n  %-34s %18s %15s\n", "device", "seq 1M QD4", "rand 4k QD16"
		print "  first writes into an empty image (allocation)"
		row("qcowsetup", "first-write", "qcowsetup")
		if (val("first-write", "qcowsetup-base", "seq") >= 0) row("qcowsetup-base (before)", "first-write", "qcowsetup-base")
		row("qemu-nbd", "first-write", "qemu-nbd")
		if (val("first-write-xl2", "qemu-nbd", "seq") >= 0) {
			print "  the same, LUKS with extended L2 entries (subclusters)"
			row("qcowsetup", "first-write-xl2", "qcowsetup")
			row("qemu-nbd", "first-write-xl2", "qemu-nbd")
		}
		if (val("first-write-plain", "qemu-nbd", "seq") >= 0) {
			print "  the same, unencrypted image"
			row("qcowsetup", "first-write-plain", "qcowsetup")
			if (val("first-write-plain", "qcowsetup-base", "seq") >= 0)
				row("qcowsetup-base (before)", "first-write-plain", "qcowsetup-base")
			row("qemu-nbd", "first-write-plain", "qemu-nbd")
		}
		split("cow-raw|cow-qcow2", ck, "|")
		split("copy-on-write into an overlay over a raw file|copy-on-write into an overlay over a qcow2 file", cl, "|")
		for (i = 1; i <= 2; i++)
			if (val(ck[i], "qemu-nbd", "seq") >= 0) {
				print "  " cl[i]
				row("qcowsetup", ck[i], "qcowsetup")
				if (val(ck[i], "qcowsetup-base", "seq") >= 0) row("qcowsetup-base (before)", ck[i], "qcowsetup-base")
				row("qemu-nbd", ck[i], "qemu-nbd")
			}
		print "  writes to allocated clusters"
		row("qcowsetup (fast path)", "allocated", "bf")
		row("raw dm-crypt over loop (the limit)", "allocated", "braw")
		if (val("allocated-plain", "loop", "seq") >= 0) row("plain loop (the unencrypted limit)", "allocated-plain", "loop")
		if (val("sparse-plain", "loop", "seq") >= 0) row("plain loop, first writes (sparse)", "sparse-plain", "loop")
		printf "\n  %-34s %15s %15s\n", "ratio", "seq", "rand"
		ratio("first writes: qcowsetup / qemu-nbd", "first-write", "qcowsetup", "qemu-nbd", 1)
		if (val("first-write", "qcowsetup-base", "seq") >= 0) {
			ratio("  before: qcowsetup-base / qemu-nbd", "first-write", "qcowsetup-base", "qemu-nbd", 1)
			ratio("  qcowsetup / qcowsetup-base", "first-write", "qcowsetup", "qcowsetup-base", 1)
		}
		if (val("first-write-plain", "qemu-nbd", "seq") >= 0) {
			ratio("unencrypted: qcowsetup / qemu-nbd", "first-write-plain", "qcowsetup", "qemu-nbd", 1)
			if (val("first-write-plain", "qcowsetup-base", "seq") >= 0) {
				ratio("  before: qcowsetup-base / qemu-nbd", "first-write-plain", "qcowsetup-base", "qemu-nbd", 1)
				ratio("  qcowsetup / qcowsetup-base", "first-write-plain", "qcowsetup", "qcowsetup-base", 1)
			}
		}
		for (i = 1; i <= 2; i++)
			if (val(ck[i], "qemu-nbd", "seq") >= 0) {
				ratio(ck[i] ": qcowsetup / qemu-nbd", ck[i], "qcowsetup", "qemu-nbd", 1)
				if (val(ck[i], "qcowsetup-base", "seq") >= 0)
					ratio("  qcowsetup / qcowsetup-base", ck[i], "qcowsetup", "qcowsetup-base", 1)
			}
		ratio("allocated: qcowsetup / dm-crypt", "allocated", "bf", "braw", 0.95)
		# the targets: medians of the per-round ratios, against the limit
		# (another kind of run) or another device (qemu-nbd)
		print "\n  targets (ratio, target, verdict):"
		goal("random first writes, unencrypted / plain loop", xrat("first-write-plain", "qcowsetup", "rand", "allocated-plain", "loop", "rand", 1), 0.5)
		vs_sparse("rand")
		goal("random first writes, unencrypted / qemu-nbd", rat("first-write-plain", "qcowsetup", "qemu-nbd", "rand"), 4)
		# every new 64 KiB cluster of a LUKS image goes whole through the
		# cipher: the ceiling is the sequential KiB/s of the limit / 64 writes/s
		goal("random first writes, LUKS / cipher ceiling", xrat("first-write", "qcowsetup", "rand", "allocated", "braw", "seq", 1024 / 64), 0.8)
		goal("random first writes, LUKS / qemu-nbd", rat("first-write", "qcowsetup", "qemu-nbd", "rand"), 2)
		if (val("first-write-xl2", "qcowsetup", "rand") >= 0) {
			# only the touched subclusters pass the cipher: against the limit itself
			goal("random first writes, LUKS extended L2 / dm-crypt", xrat("first-write-xl2", "qcowsetup", "rand", "allocated", "braw", "rand", 1), 0.5)
			printf("    %-46s %7.2fx\n", "  ... / qemu-nbd", rat("first-write-xl2", "qcowsetup", "qemu-nbd", "rand"))
		}
		goal("copy-on-write over raw / qemu-nbd (rand)", rat("cow-raw", "qcowsetup", "qemu-nbd", "rand"), 2)
		goal("sequential first writes, LUKS / dm-crypt", xrat("first-write", "qcowsetup", "seq", "allocated", "braw", "seq", 1), 0.9)
		goal("sequential first writes, unencrypted / loop", xrat("first-write-plain", "qcowsetup", "seq", "allocated-plain", "loop", "seq", 1), 0.9)
		vs_sparse("seq")
		goal("allocated clusters, LUKS / dm-crypt (seq)", rat("allocated", "bf", "braw", "seq"), 0.95)
		goal("allocated clusters, LUKS / dm-crypt (rand)", rat("allocated", "bf", "braw", "rand"), 0.95)
		if (nhp) {
			for (i = 1; i <= nhp; i++) { hs[i] = hp[i]; if (hp[i] > hmax) hmax = hp[i] }
			hmed = median(nhp, hs)
			printf("    %-46s %5.1f ms   <= 25 ms %s (median of %d jobs; worst %.1f ms)\n",
				"I/O held by a table swap, p99", hmed, (hmed <= 25) ? "MET" : "not met", nhp, hmax)
		}
		printf "\n  allocated image: %d target(s) in the top table, %d on the slow path\n", targets, slow
		print "  table swaps while the empty image filled (from `qcowsetup status`):"
		for (i = 1; i <= nrl; i++) {
			$0 = rl[i]; printf "    round %s %-4s %-17s %-14s ", $2, $3, $4, $5
			$1 = $2 = $3 = $4 = $5 = ""; sub(/^ +/, ""); print
		}
		print "  the daemon stats file (held: suspend to resume; suspend: the drain; at suspend: requests in service, KiB queued):"
		for (i = 1; i <= nst; i++) {
			$0 = st[i]; printf "    round %s %-4s %-17s %-14s\n     ", $2, $3, $4, $5
			for (j = 6; j <= NF; j++) printf " %s", $j
			print ""
		}
		print "  writes the top device completed, of them served by the slow path (the rest: the fast path), and the"
		print "  KiB written through the crypt device (LUKS: the cipher'"'"'s work; 64 per new cluster of a random writer):"
		for (i = 1; i <= npa; i++) {
			$0 = pa[i]
			printf "    round %s %-4s %-17s %-14s %8d writes %8d slow (%3.0f%%) %9d KiB crypt\n", $2, $3, $4, $5, $6, $7,
				$6 ? 100 * $7 / $6 : 0, $8
		}
		print "  image file after the job of the last round (KiB used; each ran for the same time):"
		for (k in sz) { split(k, p, SUBSEP); printf "    %-4s %-17s %-14s %8d\n", p[3], p[1], p[2], sz[k] }
	}' "$work/res"
