#!/bin/bash
# Device benchmark in the VM test bed (`make bench`; not a test: it prints
# numbers and never fails on them). Issue 3, "Benchmark".
#
#   tests/bench/bench-vm.sh
#
# In ONE boot of the test VM (Debian kernel under QEMU TCG, tests/vm/bed/run-vm.sh),
# on the same virtio disk, fio reads (1M sequential QD8, 4k random QD1, 4k
# random QD32; libaio, direct=1, time-based) from:
#   encrypted:   qcowsetup    /dev/mapper/NAME of `qcowsetup open --readonly` on a
#                             LUKS (aes-xts-plain64, 512-bit key) qcow2
#                qemu-nbd     the same image served read-only by qemu-nbd through
#                             the kernel NBD client (qemu-nbd -c, cache=none, aio=native)
#                raw dm-crypt aes-xts-plain64, same key size, over a loop device
#                             of a raw file of the same size (the limit)
#                plain loop   that loop device itself
#   unencrypted: qcowsetup, qemu-nbd (same way) on a plain qcow2, and the same
#                plain loop (measured once, shown in both groups)
# The qcow2 images are fully allocated, their 64 KiB clusters written by
# qemu-io in shuffled order, so that the host layout is fragmented as a guest
# writing at random leaves it (8191 linear targets for 512 MiB). Controls:
# qcowsetup on the same images written in guest order (contiguous on the host:
# one target), which separates what the layout costs from what the tool costs.
# Every loop device runs with direct I/O, as qcowsetup's does.
#
# Then it prints the table and the ratios next to the targets, and
# the open of the 1 TiB / 1,000,000-cluster image of gen-fragmented.py
# (unencrypted: no PBKDF): wall time, devices and targets of the stack, kernel
# memory (/proc/meminfo deltas after drop_caches), close time.
#
# The images live on ext4 (mkfs.ext4 -d on the host) in a raw disk image
# attached read-only as /dev/vda with run-vm.sh's cache=writeback: the host page
# cache holds it after the guest's warm-up pass, so the host's disk adds no
# noise and every device pays only its own path in the guest (whose page cache
# O_DIRECT bypasses).
#
# Environment:
#   QCOWSETUP        the qcowsetup binary (default: the build's)
#   BENCH_DIR        where images are cached (default /var/tmp/qcowsetup-bench,
#                    shared with bench-table.sh: frag-N.qcow2)
#   BENCH_SIZE_MIB   size of the benchmark images (default 512)
#   BENCH_RUNTIME    seconds per fio job (default 2), BENCH_RAMP ramp (default 0)
#   BENCH_ROUNDS     passes over all jobs and devices (default 6); the table shows
#                    the medians of the values, the ratios the medians of the
#                    per-round ratios (devices compared on one job run back to back)
#   BENCH_CLUSTERS   clusters of the fragmented image (default 1000000);
#                    0 skips the open measurement
#   BENCH_MEM, BENCH_SMP  guest memory (MiB, default 2048) and CPUs (default 1:
#                    under TCG, with 2 vCPUs every I/O that crosses from one
#                    vCPU to the other waits for a host thread to wake up, and
#                    4k random reads run 3-10x slower, erratically, on every
#                    device: measured here, QD1 ~300-1200 IOPS at 2 vCPUs,
#                    ~4000 at 1; one vCPU measures the I/O path, not that)
#   BENCH_REBUILD=1  rebuild the cached images and disk
#   QS_KEEP=1        keep the work directory (share, results)
#   BENCH_REPORT=F   only print the report of a results file F (as kept in
#                    BENCH_DIR/bench-vm-results.txt), without running anything
# and those of tests/vm/bed/run-vm.sh (QS_VM_*).
# Exit: 0 (also when the VM cannot run: it says SKIP), 1 when the run failed.
set -eu
me=bench-vm
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
skip_test() { echo "$me: SKIP: $*"; exit 0; }	# a benchmark, not an automake test
qs=${QCOWSETUP:-$builddir/qcowsetup}
dir=${BENCH_DIR:-/var/tmp/qcowsetup-bench}
size_mib=${BENCH_SIZE_MIB:-512}
runtime=${BENCH_RUNTIME:-2}
ramp=${BENCH_RAMP:-0}
rounds=${BENCH_ROUNDS:-6}
n=${BENCH_CLUSTERS:-1000000}
mem=${BENCH_MEM:-2048}
smp=${BENCH_SMP:-1}
pass=qcowsetup-bench
die() { echo "$me: error: $*" >&2; exit 1; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
case $size_mib$runtime$ramp$rounds$n$mem$smp in *[!0-9]*) die "BENCH_* settings take numbers" ;; esac
[ "$rounds" -ge 1 ] || die "BENCH_ROUNDS must be at least 1"

# ---------------------------------------------------------------- report
# report RESULTS: the tables, ratios and open figures of a results file (its
# "params" line gives the settings it was measured with).
report() {
	local res=$1 runtime=$runtime ramp=$ramp rounds=$rounds smp=$smp size_mib=$size_mib n=$n
	eval "$(sed -n 's/^params //p' "$res" | tr ' ' '\n' | grep -E '^(runtime|ramp|rounds|smp|size_mib|n)=[0-9]+$')"
	echo
	echo "== qcowsetup device benchmark: one VM run, $(grep '^kernel ' "$res" | cut -d' ' -f2-)"
	echo "   fio libaio direct=1, ${runtime}s per job (+${ramp}s ramp), $rounds round(s): medians of the"
	echo "   values and of the per-round ratios; ${size_mib} MiB images on ext4 on virtio (host"
	echo "   cache=writeback, warmed), every loop device with direct I/O; AES-XTS in the guest:"
	echo "   $(sed -n 's/^xts //p' "$res"); host load (1/5/15 min) before / after: $(sed -n 's/^load //p' "$res")"
	awk -v runtime="$runtime" -v ramp="$ramp" -v smp="$smp" '
		function median(n, a,   i, j, t) {
			for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
			return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
		}
		# The figure of one job: MiB/s for the sequential one, IOPS for the others;
		# m = "w" (wall clock, from fio) or "c" (per host CPU-second of QEMU).
		$1 == "fio" {       # fio ROUND JOB DEV BW_KIB IOPS LAT_US KIB
			x["w", $2, $3, $4] = ($3 == "seq1m") ? $5 / 1024 : $6
			work[$2, $3, $4] = (($3 == "seq1m") ? $8 / 1024 : $8 / 4) * (runtime + ramp) / runtime
			has[$3, $4] = 1
			if ($2 > nr) nr = $2
		}
		$1 == "mark" {      # mark ROUND JOB DEV start|end HOST_TIME QEMU_TICKS
			k = $2 SUBSEP $3 SUBSEP $4
			if ($5 == "start") { t0[k] = $6; c0[k] = $7 } else { t1[k] = $6; c1[k] = $7 }
		}
		$1 == "clk" { clk = $2 }
		$1 == "targets" { targets[$2] = $3 }
		function val(m, job, dev,   r, n, a) {
			n = 0
			for (r = 1; r <= nr; r++) if ((m, r, job, dev) in x) a[++n] = x[m, r, job, dev]
			return n ? median(n, a) : -1
		}
		function rat(m, job, d1, d2,   r, n, a) {     # median of the per-round ratios
			n = 0
			for (r = 1; r <= nr; r++)
				if ((m, r, job, d1) in x && (m, r, job, d2) in x && x[m, r, job, d2] > 0)
					a[++n] = x[m, r, job, d1] / x[m, r, job, d2]
			return n ? median(n, a) : -1
		}
		function cell(m, job, dev,   v) {
			v = val(m, job, dev)
			if (v < 0) return sprintf("%14s", "-")
			return sprintf("%14s", sprintf(job == "seq1m" ? (m == "w" ? "%.1f MiB/s" : "%.1f MiB") : (m == "w" ? "%.0f IOPS" : "%.0f I/Os"), v))
		}
		function row(m, label, dev, note) {
			if (m == "w" && dev in targets) note = note (note ? " " : "") "(" targets[dev] " target" (targets[dev] == 1 ? "" : "s") ")"
			printf "  %-22s %s %s %s   %s\n", label, cell(m, "seq1m", dev), cell(m, "rand4k1", dev), cell(m, "rand4k32", dev), note
		}
		function table(m) {
			printf "  %-22s %14s %14s %14s\n", "device", "seq 1M QD8", "rand 4k QD1", "rand 4k QD32"
			print "  encrypted (LUKS aes-xts-plain64, 512-bit key)"
			row(m, "qcowsetup", "qs-enc", "")
			row(m, "qemu-nbd", "nbd-enc", "")
			row(m, "raw dm-crypt", "crypt-raw", "(the limit)")
			row(m, "plain loop", "loop-raw", "")
			row(m, "control: qcowsetup,", "qs-enc-seq", "contiguous image")
			print "  unencrypted"
			row(m, "qcowsetup", "qs-plain", "")
			row(m, "qemu-nbd", "nbd-plain", "")
			row(m, "plain loop", "loop-raw", "(the same device as above)")
			row(m, "control: qcowsetup,", "qs-plain-seq", "contiguous image")
		}
		function ratio(m, label, a, b, tseq, trand,   j, r, t, line, all) {
			line = sprintf("  %-38s", label); all = 1
			for (j = 1; j <= 3; j++) {
				t = (j == 1) ? tseq : trand
				r = rat(m, J[j], a, b)
				if (r < 0) { line = line sprintf(" %7s     ", "-"); all = 0; continue }
				if (t) { line = line sprintf(" %6.2fx %-4s", r, r >= t ? "ok" : "MISS"); if (r < t) all = 0 }
				else line = line sprintf(" %6.2fx     ", r)
			}
			if (tseq) line = line sprintf("  >= %s seq, >= %s rand: %s", tseq, trand, all ? "MET" : "not met")
			print line
		}
		function ratios(m) {
			printf "  %-38s %12s %12s %12s   %s\n", "ratio (targets)", "seq 1M", "rand QD1", "rand QD32", "target"
			ratio(m, "enc   qcowsetup / raw dm-crypt", "qs-enc", "crypt-raw", 0.95, 0.95)
			ratio(m, "enc   qcowsetup / qemu-nbd", "qs-enc", "nbd-enc", 1.5, 3)
			ratio(m, "plain qcowsetup / plain loop", "qs-plain", "loop-raw", 0.95, 0.95)
			ratio(m, "plain qcowsetup / qemu-nbd", "qs-plain", "nbd-plain", 10, 8)
			print "  controls (contiguous images: the layout taken out)"
			ratio(m, "enc   qcowsetup-contig / raw dm-crypt", "qs-enc-seq", "crypt-raw", 0.95, 0.95)
			ratio(m, "plain qcowsetup-contig / plain loop", "qs-plain-seq", "loop-raw", 0.95, 0.95)
			ratio(m, "enc   fragmented / contiguous", "qs-enc", "qs-enc-seq", 0, 0)
			ratio(m, "plain fragmented / contiguous", "qs-plain", "qs-plain-seq", 0, 0)
			ratio(m, "raw dm-crypt / plain loop", "crypt-raw", "loop-raw", 0, 0)
		}
		END {
			split("seq1m rand4k1 rand4k32", J, " ")
			# CPU view: work per CPU-second of the QEMU process over each job
			ncpu = 0
			for (k in work) {
				if (!(k in c1) || !(k in c0) || c0[k] < 0 || c1[k] <= c0[k] || !clk) continue
				cpu = (c1[k] - c0[k]) / clk
				split(k, f, SUBSEP)
				x["c", f[1], f[2], f[3]] = work[k] / cpu
				share[++ncpu] = cpu / (t1[k] - t0[k])
			}
			print "\nwall clock (what the targets are about):"
			table("w"); print ""; ratios("w")
			if (ncpu) {
				printf "\nper host CPU-second of QEMU (the guest and all of its I/O; robust to the other\n"
				printf "loads of the host, but blind to parallelism: a device that spreads over both\n"
				med = median(ncpu, share)     # sorts share
				printf "vCPUs scores lower here than in wall time). QEMU got %.2f / %.2f / %.2f CPUs\n", \
					med, share[1], share[ncpu]
				printf "(median / min / max over the jobs; an idle host gives up to %d):\n", smp
				table("c"); print ""; ratios("c")
			}
		}' "$res"

	if grep -q '^hang ' "$res"; then
		echo
		echo "!! the VM HUNG: $(sed -n 's/^hang //p' "$res"), during the fio job(s) started and never ended:"
		awk '$1 == "mark" { k = $2 " " $3 " " $4; if ($5 == "start") s[k] = 1; else delete s[k] }
			END { for (k in s) print "   round/job/device: " k }' "$res"
		echo "   (the guest's dump of the blocked tasks is in the console output above)"
	fi
	if grep -q '^frag ' "$res"; then
		echo
		echo "== open of the 1 TiB image, $n shuffled 64 KiB clusters (unencrypted: no PBKDF)"
		sed -n 's/^frag /  /p' "$res"
	fi
}
if [ -n "${BENCH_REPORT:-}" ]; then
	[ -f "$BENCH_REPORT" ] || die "$BENCH_REPORT: no such file"
	report "$BENCH_REPORT"
	exit 0
fi

# ---------------------------------------------------------------- requirements
need_vm
# (the VM takes these from the host)
PATH=$PATH:/usr/sbin:/sbin need qemu-img qemu-io python3 mkfs.ext4 fio
[ -x "$qs" ] || die "$qs not built"
export PATH=$PATH:/usr/sbin:/sbin
t_start=$(now)
# An initramfs cache of its own: other runs of the test bed with another
# qcowsetup binary would make each other rebuild it.
export QS_VM_CACHE=${QS_VM_CACHE:-$dir/vm-initramfs}

# ---------------------------------------------------------------- images (cached)
mkdir -p "$dir"
stage=$dir/vm-$size_mib
disk=$dir/vm-disk-$size_mib-$n.img
# What the images and the disk depend on; a change rebuilds them.
stamp_want="size=$size_mib pass=$pass v=2"
disk_stamp_want="$stamp_want n=$n $(sha256sum "$here/gen-fragmented.py" | cut -d' ' -f1)"
if [ -n "${BENCH_REBUILD:-}" ] || [ ! -f "$stage/stamp" ] || [ "$(cat "$stage/stamp")" != "$stamp_want" ]; then
	rm -rf "$stage" "$disk"
	mkdir -p "$stage.tmp"
	t=$(now)
	echo "$me: generating $size_mib MiB images in $stage (64 KiB clusters written in shuffled order)..."
	printf %s "$pass" > "$stage.tmp/key"
	# qemu-io commands: every 64 KiB chunk once, in a fixed pseudo-random order,
	# with a non-zero pattern (mkfs.ext4 -d would leave zero blocks as holes).
	# The controls (-seq) get the same writes in guest order: contiguous on the host.
	python3 - "$size_mib" "$stage.tmp/writes" <<-'EOF'
		import random, sys
		chunks = int(sys.argv[1]) * 16
		order = list(range(chunks))
		random.Random(3).shuffle(order)
		cmds = [(c, "write -P %d %d 64k\n" % (1 + c % 255, c * 65536)) for c in order]
		with open(sys.argv[2] + ".txt", "w") as f:
		    f.writelines(w for _, w in cmds)
		with open(sys.argv[2] + "-seq.txt", "w") as f:
		    f.writelines(w for _, w in sorted(cmds))
	EOF
	for v in "" -seq; do
		qemu-img create -q -f qcow2 "$stage.tmp/plain$v.qcow2" "${size_mib}M"
		qemu-io "$stage.tmp/plain$v.qcow2" < "$stage.tmp/writes$v.txt" >/dev/null
		# LUKS: aes-256-xts-plain64 (qemu-img's default); a short PBKDF, it is
		# not measured (qemu-img fails to calibrate very short ones at times).
		for it in 50 100 200 400; do
			qemu-img create -q -f qcow2 --object "secret,id=s0,file=$stage.tmp/key" \
				-o "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=$it" \
				"$stage.tmp/enc$v.qcow2" "${size_mib}M" 2>/dev/null && break
		done
		[ -f "$stage.tmp/enc$v.qcow2" ] || die "qemu-img cannot create the LUKS image"
		qemu-io --object "secret,id=s0,file=$stage.tmp/key" --image-opts \
			"driver=qcow2,file.filename=$stage.tmp/enc$v.qcow2,encrypt.key-secret=s0" \
			< "$stage.tmp/writes$v.txt" >/dev/null
	done
	rm -f "$stage.tmp"/writes*.txt
	# The same-size raw file under dm-crypt and the plain loop (random bytes: allocated).
	head -c "$((size_mib << 20))" /dev/urandom > "$stage.tmp/raw.img"
	for f in plain enc plain-seq enc-seq; do
		qemu-img check -q "$stage.tmp/$f.qcow2" >/dev/null 2>&1 ||
			qemu-img check -q --object "secret,id=s0,file=$stage.tmp/key" --image-opts \
				"driver=qcow2,file.filename=$stage.tmp/$f.qcow2,encrypt.key-secret=s0" ||
			die "$f.qcow2 is not clean"
	done
	echo "$stamp_want" > "$stage.tmp/stamp"
	mv "$stage.tmp" "$stage"
	echo "$me: images ready ($(since "$t")s)"
fi
frag=
if [ "$n" -gt 0 ]; then
	frag=$dir/frag-$n.qcow2
	if [ ! -f "$frag" ]; then
		t=$(now)
		echo "$me: generating $frag ($n clusters, 1 TiB virtual)..."
		python3 "$here/gen-fragmented.py" "$frag.tmp" "$n" $((1 << 40)) 1
		mv "$frag.tmp" "$frag"
		echo "$me: fragmented image ready ($(since "$t")s)"
	fi
fi
if [ ! -f "$disk" ] || [ ! -f "$disk.stamp" ] || [ "$(cat "$disk.stamp")" != "$disk_stamp_want" ] ||
   [ "$stage/stamp" -nt "$disk" ] || { [ -n "$frag" ] && [ "$frag" -nt "$disk" ]; }; then
	t=$(now)
	echo "$me: building the ext4 disk image $disk..."
	rm -f "$disk" "$disk.stamp"
	root=$(mktemp -d "$dir/.disk.XXXXXX")
	# hard links: nothing is copied twice
	for f in "$stage/key" "$stage"/*.qcow2 "$stage/raw.img" ${frag:+"$frag"}; do
		g=$root/$(basename "$f")
		[ "$f" != "$frag" ] || g=$root/frag.qcow2
		ln "$f" "$g" 2>/dev/null || cp --sparse=always "$f" "$g"
	done
	used_kib=$(du -sk "$root" | cut -f1)
	mkfs.ext4 -q -F -E root_owner=0:0 -L qsbench -d "$root" "$disk.tmp" \
		"$(( used_kib * 5 / 4096 + 512 ))M" || { rm -rf "$root" "$disk.tmp"; die "mkfs.ext4 -d failed"; }
	rm -rf "$root"
	mv "$disk.tmp" "$disk"
	echo "$disk_stamp_want" > "$disk.stamp"
	echo "$me: disk ready ($(since "$t")s, $(du -h "$disk" | cut -f1) used)"
fi

# ---------------------------------------------------------------- the VM run
make_work
mkdir "$work/share"
cp "$here/bench-guest.sh" "$work/share/"
chmod +x "$work/share/bench-guest.sh"
# Generous: boot, the 1 TiB open, the warm-up, then the fio passes.
tmo=$(( 900 + rounds * (30 + 8 * 3 * (runtime + ramp + 3)) ))
echo "$me: booting the VM (TCG, $smp CPUs, $mem MiB; $rounds round(s) of 3 jobs x 8 devices, ${runtime}s each)..."
# The guest prints "QS-MARK ROUND JOB DEV start|end" on its console right around
# each fio job. On each, note the host time and the CPU time QEMU has used so
# far (utime + stime of the qemu-system process, found by the share path on
# its command line): the CPU each job cost, which the other loads of a shared
# host do not change the way they change the wall-clock figures.
marks=$work/marks.txt
: > "$marks"
clk=$(getconf CLK_TCK)
find_qemu() {
	local p c
	for p in /proc/[0-9]*; do
		c=$(cat "$p/comm" 2>/dev/null) || continue
		case $c in qemu-system*) ;; *) continue ;; esac
		if tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qF "path=$work/share"; then
			echo "${p#/proc/}"; return 0
		fi
	done
	return 1
}
load0=$(cut -d' ' -f1-3 /proc/loadavg)
rc=0
set -o pipefail
"$top/tests/vm/bed/run-vm.sh" --share "$work/share" --disk "$disk,readonly=on" --extra "$qs" \
	--mem "$mem" --smp "$smp" --timeout "$tmo" \
	--env "BENCH_RUNTIME=$runtime" --env "BENCH_RAMP=$ramp" --env "BENCH_ROUNDS=$rounds" \
	--env "BENCH_SIZE_MIB=$size_mib" --env "BENCH_FRAG=${frag:+1}" \
	-- bench-guest.sh 2>&1 |
	{
		qpid=
		while IFS= read -r line; do
			case $line in
			*"QS-MARK "*)
				t=$EPOCHREALTIME
				[ -n "$qpid" ] && [ -e "/proc/$qpid" ] || qpid=$(find_qemu) || qpid=
				ticks=-1
				if [ -n "$qpid" ]; then
					# fields after "(comm)": state is 3, utime 14, stime 15
					ticks=$(sed 's/.*) //' "/proc/$qpid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || ticks=-1
				fi
				echo "mark ${line#*QS-MARK } $t $ticks" >> "$marks"
				;;
			*) printf '%s\n' "$line" ;;
			esac
		done
	} || rc=$?
set +o pipefail
load1=$(cut -d' ' -f1-3 /proc/loadavg)
res=$work/share/results.txt
[ -s "$res" ] || die "the VM run left no results (run-vm.sh exit $rc)"
{
	echo "params runtime=$runtime ramp=$ramp rounds=$rounds smp=$smp size_mib=$size_mib n=$n"
	cat "$res" "$marks"
	echo "clk $clk"
	echo "load $load0 / $load1"
} > "$dir/bench-vm-results.txt"
res=$dir/bench-vm-results.txt
[ "$rc" = 0 ] || echo "$me: warning: the VM run exited $rc: the results may be partial" >&2

report "$res"
echo
echo "$me: done in $(since "$t_start")s; raw results in $dir/bench-vm-results.txt"
exit 0
