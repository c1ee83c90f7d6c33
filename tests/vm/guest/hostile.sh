#!/bin/sh
# The guest part of tests/vm/test-hostile.sh (see there and
# tests/vm/gen-hostile.sh). /dev/vda: ext4 with the images, mounted at
# /mnt/h (images in /mnt/h/img, so ../../../dev/loop0 from there is
# /dev/loop0). The share holds NAME.md5 (qemu-img convert's md5 of each
# legitimate image or chain, made on the host), f-hdr.qcow2 and pass.
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
export PATH=/usr/local/bin:$PATH
H=/mnt/h
I=$H/img
PASS=$(cat "$here/pass")
ROUNDS=${QS_HOSTILE_RACE_ROUNDS:-5}
mkdir -p $H
mount -t ext4 /dev/vda $H || { echo "cannot mount the image disk"; exit 1; }
modprobe -q dm-crypt 2>/dev/null; modprobe -q nbd 2>/dev/null
syslogd -O /tmp/messages 2>/dev/null || :
sec="--object secret,id=s0,file=$H/keys/pass"

# ---- helpers

want_md5() {	# DEVICE NAME: DEVICE reads as share/NAME.md5 says
	got=$(md5sum < "$1" | cut -d' ' -f1)
	[ "$got" = "$(cat "$here/$2.md5")" ] || { echo "$1: md5 $got, not $2's"; return 1; }
	md5_checks=$((md5_checks + 1))
	echo "$1 reads as $2 (md5 $got)"
}

# size and md5 of each file or device, one line each
fp() {
	for f; do
		if [ -e "$f" ]; then
			printf '%s %s %s\n' "$f" "$(wc -c < "$f")" "$(md5sum < "$f" | cut -d' ' -f1)"
		else
			echo "$f missing"
		fi
	done
}
same() {	# BEFORE AFTER
	[ "$1" = "$2" ] || { printf 'changed:\n%s\nnow:\n%s\n' "$1" "$2"; return 1; }
}

# loop0_attach MIB: /dev/loop0 on a new scratch file of MIB MiB of random
# bytes; before= their fingerprints. loop0_detach: detached, the same.
loop0_attach() {
	dd if=/dev/urandom of=/tmp/scratch bs=1M count="$1" 2>/dev/null
	losetup /dev/loop0 /tmp/scratch
	before=$(fp /tmp/scratch /dev/loop0)
}
loop0_detach() {
	after=$(fp /tmp/scratch /dev/loop0)
	losetup -d /dev/loop0
	same "$before" "$after"
}

# refused RC 'WORD|WORD...' CMD...: CMD exits RC within $TMO seconds (60)
# with exactly one line on stderr, containing every WORD
refused() {
	r_want=$1 r_words=$2
	shift 2
	r_rc=0
	timeout "${TMO:-60}" "$@" >/tmp/out 2>/tmp/err </dev/null || r_rc=$?
	echo "\$ $* -> exit $r_rc"
	sed 's/^/  stderr: /' /tmp/err
	[ "$r_rc" = "$r_want" ] || { echo "exit $r_rc, not $r_want"; return 1; }
	if [ "$(wc -l < /tmp/err)" != 1 ]; then
		echo "not exactly one line on stderr"
		# (LATE=1: checked on, the case fails at its end: late_check)
		[ "${LATE:-0}" = 1 ] || return 1
		late="$late
$*: not exactly one line on stderr"
	fi
	r_ifs=$IFS
	IFS='|'
	set -f
	for w in $r_words; do
		grep -qF -- "$w" /tmp/err || { IFS=$r_ifs; set +f; echo "stderr does not say \"$w\""; return 1; }
	done
	IFS=$r_ifs
	set +f
	refusals=$((refusals + 1))
}

late=''
late_check() {
	[ -z "$late" ] || { echo "failed on:$late"; return 1; }
}

# Nothing left by a refused or closed mapping: no dm device, loop device
# (but the ones named: the test's own), daemon, connected NBD device,
# qcowsetup process or name lock.
nothing_left() {
	if [ $# = 0 ]; then
		vm_assert_clean
	else
		[ -z "$(vm_dm_devices)" ] || { echo "dm devices left:"; dmsetup ls; return 1; }
		n_loops=$(losetup -a)
		for n_keep; do n_loops=$(echo "$n_loops" | grep -v "^$n_keep:" || true); done
		[ -z "$n_loops" ] || { echo "loop devices left:"; echo "$n_loops"; return 1; }
		for n_nbd in /sys/block/nbd*; do
			[ ! -e "$n_nbd/pid" ] || { echo "${n_nbd##*/} still connected"; return 1; }
		done
	fi
	if ps -o pid,args | grep -v grep | grep -q qcowsetup; then
		sleep 1
		! ps -o pid,args | grep -v grep | grep qcowsetup || { echo "qcowsetup processes left"; return 1; }
	fi
	! ls /run/qcowsetup/*.lock 2>/dev/null || { echo "name locks left"; return 1; }
}

qcheck() {	# IMAGE [LUKS]: qemu-img check finds neither errors nor leaks
	if [ -n "${2:-}" ]; then
		# shellcheck disable=SC2086
		qemu-img check $sec --image-opts "driver=qcow2,file.filename=$1,encrypt.key-secret=s0" >/tmp/check 2>&1 ||
			{ cat /tmp/check; return 1; }
	else
		qemu-img check -f qcow2 "$1" >/tmp/check 2>&1 || { cat /tmp/check; return 1; }
	fi
	qchecks=$((qchecks + 1))
}

wait_gone() {	# PID SECONDS: PID has ended within SECONDS (else killed, 1)
	i=0
	while kill -0 "$1" 2>/dev/null; do
		[ $i -lt $(($2 * 10)) ] || { kill -9 "$1"; echo "process $1 still running after $2 s"; return 1; }
		sleep 0.1
		i=$((i + 1))
	done
}

# counters, printed by each case
refusals=0 md5_checks=0 qchecks=0
counts() {
	echo "counts: $refusals refusals, $md5_checks md5 checks, $qchecks qemu-img checks"
	echo "$refusals $md5_checks $qchecks ${vm_name%%:*}" >> /tmp/hostile-counts
}

# ---- a. an external data file elsewhere (absolute, climbing), read-write
t_a_data_file_elsewhere() {
	v=$H/victim/victim.bin
	before=$(fp $v)
	refused 2 "$I/a-data-abs.qcow2|external data file $v|outside the folder" qcowsetup open $I/a-data-abs.qcow2 ha
	nothing_left
	refused 2 "$I/a-data-climb.qcow2|external data file|../victim/victim.bin|it is $v, outside the folder" \
		qcowsetup open $I/a-data-climb.qcow2 ha
	nothing_left
	refused 2 "$I/a-data-abs.qcow2|$v|outside the folder" qcowsetup open --readonly $I/a-data-abs.qcow2 ha
	nothing_left
	same "$before" "$(fp $v)"
	counts
}

# ---- b. the data file a host disk: /dev/loop0 and ../../../dev/loop0
t_b_data_file_loop0() {
	loop0_attach 2
	refused 2 "$I/b-data-loop0.qcow2|external data file /dev/loop0|block device" \
		qcowsetup open $I/b-data-loop0.qcow2 hb
	nothing_left /dev/loop0
	refused 2 "$I/b-data-climb.qcow2|external data file|../../../dev/loop0|block device" \
		qcowsetup open $I/b-data-climb.qcow2 hb
	nothing_left /dev/loop0
	refused 2 "$I/b-data-climb.qcow2|../../../dev/loop0|block device" \
		qcowsetup open --readonly $I/b-data-climb.qcow2 hb
	nothing_left /dev/loop0
	loop0_detach
	same "$(echo "$before" | head -n 1)" "$(fp /tmp/scratch)"
	rm -f /tmp/scratch
	nothing_left
	counts
}

# ---- c. backing files on kernel interfaces: /proc/kcore, sysfs (even
# with --trust-names), read-only
t_c_backing_kernel_interfaces() {
	[ -f /proc/kcore ] && [ -f /sys/kernel/notes ] || { echo "no /proc/kcore or /sys/kernel/notes"; return 1; }
	kcore=$(stat -L -c '%s %i' /proc/kcore)
	notes=$(fp /sys/kernel/notes)
	refused 2 "$I/c-back-kcore.qcow2|backing file /proc/kcore|on proc, a kernel interface" \
		qcowsetup open --readonly $I/c-back-kcore.qcow2 hc
	nothing_left
	refused 2 "$I/c-back-kcore-climb.qcow2|backing file|../../../proc/kcore|on proc" \
		qcowsetup open --readonly $I/c-back-kcore-climb.qcow2 hc
	nothing_left
	refused 2 "$I/c-back-kcore.qcow2|/proc/kcore|on proc" \
		qcowsetup open --readonly --trust-names $I/c-back-kcore.qcow2 hc
	nothing_left
	refused 2 "$I/c-back-sysfs.qcow2|backing file /sys/kernel/notes|on sysfs, a kernel interface" \
		qcowsetup open --readonly $I/c-back-sysfs.qcow2 hc
	nothing_left
	refused 2 "$I/c-back-sysfs.qcow2|/sys/kernel/notes|on sysfs" \
		qcowsetup open --readonly --trust-names $I/c-back-sysfs.qcow2 hc
	nothing_left
	same "$kcore" "$(stat -L -c '%s %i' /proc/kcore)"
	same "$notes" "$(fp /sys/kernel/notes)"
	counts
}

# ---- d. the backing file a host disk: ../../../dev/loop0, read-only
t_d_backing_loop0() {
	loop0_attach 4
	refused 2 "$I/d-back-loop0.qcow2|backing file|../../../dev/loop0|block device" \
		qcowsetup open --readonly $I/d-back-loop0.qcow2 hd
	nothing_left /dev/loop0
	refused 2 "$I/d-back-loop0.qcow2|../../../dev/loop0|block device" qcowsetup open $I/d-back-loop0.qcow2 hd
	nothing_left /dev/loop0
	loop0_detach
	rm -f /tmp/scratch
	nothing_left
	counts
}

# ---- e. the data file a FIFO: probe opens no named file; open, info,
# map, check refuse it at once
t_e_data_file_fifo() {
	rm -f $I/e-fifo.data
	mkfifo $I/e-fifo.data
	img=$I/e-data-fifo.qcow2
	for target in file loop; do
		if [ $target = loop ]; then dev=$(losetup -f --show -r $img); else dev=$img; fi
		rc=0
		timeout 10 qcowsetup probe --udev "$dev" >/tmp/out 2>/tmp/err || rc=$?
		echo "\$ qcowsetup probe --udev $dev -> exit $rc"
		cat /tmp/out /tmp/err
		[ $rc = 0 ] && [ ! -s /tmp/err ] || { echo "probe --udev: exit $rc, or stderr"; return 1; }
		grep -qx ID_QCOW2_FORMAT=qcow2 /tmp/out && grep -qx ID_QCOW2_VIRTUAL_SIZE=4194304 /tmp/out
		rc=0
		timeout 10 qcowsetup probe "$dev" >/tmp/out 2>/tmp/err || rc=$?
		[ $rc = 0 ] && [ ! -s /tmp/err ] || { cat /tmp/out /tmp/err; echo "probe: exit $rc, or stderr"; return 1; }
		[ $target = file ] || losetup -d "$dev"
	done
	# nor any other name: probe reads the header alone
	for n in a-data-abs b-data-loop0 c-back-kcore d-back-loop0; do
		rc=0
		timeout 10 qcowsetup probe --udev $I/$n.qcow2 >/tmp/out 2>/tmp/err || rc=$?
		[ $rc = 0 ] && [ ! -s /tmp/err ] && grep -qx ID_QCOW2_FORMAT=qcow2 /tmp/out ||
			{ cat /tmp/out /tmp/err; echo "probe --udev $n.qcow2: exit $rc"; return 1; }
	done
	TMO=10
	refused 4 "$img|external data file|e-fifo.data|FIFO" qcowsetup open $img he
	nothing_left
	refused 4 "$img|e-fifo.data|FIFO" qcowsetup open --readonly $img he
	nothing_left
	refused 4 "$img|e-fifo.data|FIFO" qcowsetup info $img
	refused 4 "$img|e-fifo.data|FIFO" qcowsetup map $img
	refused 4 "$img|e-fifo.data|FIFO" qcowsetup check $img
	refused 4 "$img|e-fifo.data|FIFO" qcowsetup table $img he
	TMO=60
	[ -p $I/e-fifo.data ] || { echo "the FIFO is no longer a FIFO"; return 1; }
	rm -f $I/e-fifo.data
	nothing_left
	counts
}

# ---- f. a raw disk: read-write only with --format raw; a qcow2 header a
# guest writes into it is not followed
t_f_raw_disk() {
	raw=$I/raw.img
	v=$H/victim/victim.bin
	before=$(fp $v)
	refused 2 "$raw|no qcow2 or qcow header|--format raw" qcowsetup open $raw n1
	nothing_left
	qcowsetup open --format raw $raw n1
	# the guest writes a qcow2 header naming a host file as its data file
	dd if="$here/f-hdr.qcow2" of=/dev/mapper/n1 bs=64k conv=notrunc,fsync 2>/dev/null
	written=$(md5sum < /dev/mapper/n1 | cut -d' ' -f1)
	qcowsetup close n1
	nothing_left
	[ "$(head -c 3 $raw)" = QFI ] || { echo "the header did not reach the file"; return 1; }
	refused 2 "$raw|external data file $v|outside the folder" qcowsetup open $raw n2
	nothing_left
	refused 2 "$raw|$v|outside the folder" qcowsetup open --readonly $raw n2
	nothing_left
	same "$before" "$(fp $v)"
	qcowsetup open --format raw $raw n3
	[ "$(md5sum < /dev/mapper/n3 | cut -d' ' -f1)" = "$written" ] || { echo "n3 is not the raw disk"; return 1; }
	[ "$(md5sum < $raw | cut -d' ' -f1)" = "$written" ] || { echo "the file is not what was written"; return 1; }
	md5_checks=$((md5_checks + 2))
	qcowsetup close n3
	nothing_left
	same "$before" "$(fp $v)"
	counts
}

# ---- g. backing files outside the folder (a symlink in it, an absolute
# name) and of another user: refused; with --trust-names or --backing-file
# they map and read as qemu-img convert read them on the host
t_g_backing_outside() {
	chown 1000:1000 $I/g-base-1000.qcow2
	[ "$(stat -c %u $I/g-owner.qcow2)" = 0 ] || { echo "g-owner.qcow2 is not root's"; return 1; }
	before=$(fp $H/outside/base.qcow2 $I/g-base-1000.qcow2)
	for rw in --readonly ''; do
		refused 2 "$I/g-link.qcow2|backing file|g-base-link.qcow2|it is $H/outside/base.qcow2, outside the folder" \
			qcowsetup open $rw $I/g-link.qcow2 hg
		nothing_left
		refused 2 "$I/g-abs.qcow2|backing file $H/outside/base.qcow2|outside the folder" \
			qcowsetup open $rw $I/g-abs.qcow2 hg
		nothing_left
		refused 2 "$I/g-owner.qcow2|backing file|g-base-1000.qcow2|belongs to user 1000" \
			qcowsetup open $rw $I/g-owner.qcow2 hg
		nothing_left
	done
	same "$before" "$(fp $H/outside/base.qcow2 $I/g-base-1000.qcow2)"
	for n in g-link g-abs g-owner; do
		qcowsetup open --readonly --trust-names $I/$n.qcow2 hg
		want_md5 /dev/mapper/hg $n
		qcowsetup close hg
	done
	qcowsetup open --readonly --backing-file $H/outside/base.qcow2 $I/g-link.qcow2 hg
	want_md5 /dev/mapper/hg g-link
	qcowsetup close hg
	qcowsetup open --readonly --backing-file $H/outside/base.qcow2 $I/g-abs.qcow2 hg
	want_md5 /dev/mapper/hg g-abs
	qcowsetup close hg
	qcowsetup open --readonly --backing-file $I/g-base-1000.qcow2 $I/g-owner.qcow2 hg
	want_md5 /dev/mapper/hg g-owner
	qcowsetup close hg
	nothing_left
	# read-write: the daemon follows the same names under the same options
	qcowsetup open --trust-names $I/g-link.qcow2 hg
	want_md5 /dev/mapper/hg g-link
	qcowsetup close hg
	qcowsetup open --backing-file $I/g-base-1000.qcow2 $I/g-owner.qcow2 hg
	want_md5 /dev/mapper/hg g-owner
	qcowsetup close hg
	nothing_left
	qcheck $I/g-link.qcow2
	qcheck $I/g-owner.qcow2
	same "$before" "$(fp $H/outside/base.qcow2 $I/g-base-1000.qcow2)"
	counts
}

# ---- h. a qcow2 chain on block devices (loop6 the base, loop7 the top,
# naming /dev/loop6 or a symlink to it): --trust-names only
t_h_chain_on_block_devices() {
	losetup -r /dev/loop6 $H/blk/base.qcow2
	ln -sfn /dev/loop6 $H/blk/base-dev
	for t in dev link; do
		losetup -r /dev/loop7 $H/blk/top-$t.qcow2
		before=$(fp /dev/loop6 /dev/loop7)
		case $t in
		dev) name=/dev/loop6 ;;
		link) name=$H/blk/base-dev ;;
		esac
		refused 2 "/dev/loop7|backing file $name|block device" qcowsetup open --readonly /dev/loop7 hh
		nothing_left /dev/loop6 /dev/loop7
		qcowsetup open --readonly --trust-names /dev/loop7 hh
		want_md5 /dev/mapper/hh "h-$t"
		qcowsetup close hh
		nothing_left /dev/loop6 /dev/loop7
		same "$before" "$(fp /dev/loop6 /dev/loop7)"
		losetup -d /dev/loop7
	done
	losetup -d /dev/loop6
	rm -f $H/blk/base-dev
	nothing_left
	counts
}

# ---- i. races: two opens of one NAME on two images; close with open
t_i_race_open_open() {
	wins_a=0 wins_b=0 r=1
	while [ $r -le "$ROUNDS" ]; do
		qcowsetup open $I/i-a.qcow2 race >/dev/null 2>/tmp/ea &
		pa=$!
		qcowsetup open $I/i-b.qcow2 race >/dev/null 2>/tmp/eb &
		pb=$!
		ra=0 rb=0
		wait $pa || ra=$?
		wait $pb || rb=$?
		case $ra.$rb in
		0.5) w=a lerr=/tmp/eb wins_a=$((wins_a + 1)) ;;
		5.0) w=b lerr=/tmp/ea wins_b=$((wins_b + 1)) ;;
		*) echo "round $r: exits $ra (i-a) and $rb (i-b)"; cat /tmp/ea /tmp/eb; return 1 ;;
		esac
		[ "$(wc -l < $lerr)" = 1 ] && grep -q 'race already exists' $lerr ||
			{ echo "round $r: the loser said:"; cat $lerr; return 1; }
		want_md5 /dev/mapper/race i-$w >/dev/null || { echo "round $r: winner i-$w, device not its image"; return 1; }
		qcowsetup close race
		nothing_left
		qcheck $I/i-a.qcow2
		qcheck $I/i-b.qcow2
		r=$((r + 1))
	done
	echo "$ROUNDS rounds: i-a won $wins_a, i-b won $wins_b; each time the loser exited 5 (already exists)"
	counts
}

t_i_race_close_open() {
	r=1 seen=''
	while [ $r -le 5 ]; do
		qcowsetup open $I/i-a.qcow2 race >/dev/null 2>/tmp/eo &
		po=$!
		qcowsetup close race >/dev/null 2>/tmp/ec &
		pc=$!
		ro=0 rc=0
		wait $po || ro=$?
		wait $pc || rc=$?
		[ $ro = 0 ] || { echo "round $r: open exited $ro"; cat /tmp/eo; return 1; }
		case $rc in
		0) [ ! -e /dev/mapper/race ] || { echo "round $r: close succeeded, the device is there"; return 1; } ;;
		4) grep -q 'race does not exist' /tmp/ec || { cat /tmp/ec; return 1; }
		   want_md5 /dev/mapper/race i-a >/dev/null
		   qcowsetup close race ;;
		*) echo "round $r: close exited $rc"; cat /tmp/ec; return 1 ;;
		esac
		seen="$seen $rc"
		nothing_left
		qcheck $I/i-a.qcow2
		r=$((r + 1))
	done
	echo "close exits:$seen (0: closed the new mapping, 4: came first)"
	counts
}

# ---- j. the image path a symlink, swapped while open waits for its key
# (a FIFO): refused, or A's bytes, never B's
swap_case() {	# MODE(--readonly|'') B
	mode=$1 sw_b=$2
	rm -f /tmp/kf
	mkfifo /tmp/kf
	ln -sfn j-a.qcow2 $I/j-link.qcow2
	before=$(fp "$I/$sw_b")
	qcowsetup open $mode --key-file /tmp/kf $I/j-link.qcow2 swap >/dev/null 2>/tmp/err &
	p=$!
	# until open holds A open (and waits on the FIFO)
	i=0
	until ls -l /proc/$p/fd 2>/dev/null | grep -q "$I/j-a.qcow2"; do
		[ $i -lt 100 ] || { echo "open never opened j-a.qcow2"; kill $p; return 1; }
		sleep 0.1
		i=$((i + 1))
	done
	ln -sfn "$sw_b" $I/j-link.qcow2
	timeout 20 sh -c "printf '%s' '$PASS' > /tmp/kf" || { echo "nobody read the key file"; kill $p; return 1; }
	rc=0
	wait $p || rc=$?
	if [ $rc = 0 ]; then
		want_md5 /dev/mapper/swap j-a
		qcowsetup close swap
		echo "swapped to $sw_b ${mode:-(read-write)}: mapped, with j-a's bytes"
	else
		sed 's/^/  stderr: /' /tmp/err
		echo "swapped to $sw_b ${mode:-(read-write)}: refused (exit $rc)"
		case $rc in [1-5]) ;; *) echo "exit $rc is no qcowsetup exit code"; return 1 ;; esac
		grep -q j-link.qcow2 /tmp/err || { echo "the message does not name the image"; return 1; }
		[ "$(wc -l < /tmp/err)" = 1 ] || late="$late
swapped to $sw_b ${mode:-(read-write)}: refused with $(wc -l < /tmp/err) lines on stderr"
	fi
	nothing_left
	same "$before" "$(fp "$I/$sw_b")"
	rm -f /tmp/kf $I/j-link.qcow2
}
t_j_symlink_swap() {
	swap_case --readonly j-b.qcow2
	swap_case --readonly j-plain.qcow2
	swap_case '' j-b.qcow2
	qcheck $I/j-a.qcow2 luks
	qcheck $I/j-b.qcow2 luks
	counts
	late_check
}

# ---- k. qcowtab: a key expected, an unencrypted image found
t_k_allow_unencrypted() {
	T=/tmp/qcowtab
	for o in readonly ''; do
		printf 'k %s %s %s\n' $I/k-plain.qcow2 $H/keys/pass "$o" > $T
		LATE=1 refused 2 "$I/k-plain.qcow2|not encrypted|allow-unencrypted" qcowsetup --qcowtab $T open --tab k
		[ ! -e /dev/mapper/k ]
		nothing_left
	done
	for o in readonly,allow-unencrypted allow-unencrypted; do
		printf 'k %s %s %s\n' $I/k-plain.qcow2 $H/keys/pass "$o" > $T
		qcowsetup --qcowtab $T open --tab k
		want_md5 /dev/mapper/k k-plain
		qcowsetup --qcowtab $T close --tab k
		nothing_left
	done
	qcheck $I/k-plain.qcow2
	counts
	late_check
}

# ---- l. read-write entries asked through systemd-ask-password, as the
# generated unit runs them (stdin /dev/null, systemd "running"), answered by
# ask-agent
agent_start() {	# PASSPHRASE...
	: > /tmp/agent.log
	ask-agent -l /tmp/agent.log "$@" &
	agent_pid=$!
}
agent_stop() {
	kill "$agent_pid" 2>/dev/null || :
	wait "$agent_pid" 2>/dev/null || :
	echo "the agent saw $(wc -l < /tmp/agent.log) question(s):"
	cat /tmp/agent.log
}
forget_cached() {	# systemd-ask-password --keyname=qcowsetup caches in @u
	i=0
	while k=$(keyctl search @u user qcowsetup 2>/dev/null) && [ $i -lt 10 ]; do
		keyctl unlink "$k" @u >/dev/null
		i=$((i + 1))
	done
	! keyctl search @u user qcowsetup >/dev/null 2>&1 || { echo "cannot forget the cached passphrase"; return 1; }
}
# CMD... as a unit with KeyringMode=shared runs it: a session keyring of
# its own, the user keyring linked into it; stdin /dev/null; 120 s at most
as_unit() {
	timeout 120 keyctl session - sh -c 'keyctl link @u @s && exec "$@"' sh "$@" </dev/null
}
l_setup() {
	mkdir -p /run/systemd/system /run/systemd/ask-password
	forget_cached
}
l_done() {
	rm -rf /run/systemd/system
}
# l1_open_asked N: open --tab l1 (the agent started) succeeds, the agent
# was asked N times
l1_open_asked() {
	rc=0
	timeout 120 qcowsetup --qcowtab /tmp/qcowtab open --tab l1 </dev/null || rc=$?
	agent_stop
	[ $rc = 0 ] || { echo "open --tab: exit $rc"; return 1; }
	[ "$(wc -l < /tmp/agent.log)" = "$1" ]
}
# l1_close_checked: l1 reads as its image, closes, leaves nothing; the
# image passes qemu-img check
l1_close_checked() {
	want_md5 /dev/mapper/l1 l-1
	qcowsetup --qcowtab /tmp/qcowtab close --tab l1
	nothing_left
	qcheck $I/l-1.qcow2 luks
	l_done
	counts
}
t_l_agent_first_answer() {
	l_setup
	printf 'l1 %s none\n' $I/l-1.qcow2 > /tmp/qcowtab
	agent_start "$PASS"
	l1_open_asked 1
	dmsetup table l1 | grep -q ' 43:' || { echo "not read-write (no slow path)"; return 1; }
	l1_close_checked
}
t_l_agent_tries() {
	l_setup
	printf 'l1 %s none tries=3\n' $I/l-1.qcow2 > /tmp/qcowtab
	agent_start wrong "$PASS"
	l1_open_asked 2
	l1_close_checked
}
t_l_agent_timeout() {
	l_setup
	printf 'l2 %s none timeout=5s\n' $I/l-2.qcow2 > /tmp/qcowtab
	agent_start
	rc=0
	t0=$(vm_uptime)
	timeout 60 qcowsetup --qcowtab /tmp/qcowtab open --tab l2 </dev/null 2>/tmp/err || rc=$?
	dt=$(awk -v a="$t0" -v b="$(vm_uptime)" 'BEGIN { printf "%d", b - a + 0.5 }')
	agent_stop
	cat /tmp/err
	echo "exit $rc after ${dt}s"
	[ $rc = 2 ] && [ "$dt" -le 15 ] && [ "$dt" -ge 4 ]
	[ "$(wc -l < /tmp/agent.log)" = 1 ]
	[ ! -e /dev/mapper/l2 ]
	nothing_left
	! ls /run/systemd/ask-password/ask.* 2>/dev/null || { echo "a question left behind"; return 1; }
	l_done
	counts
}
t_l_agent_same_passphrase() {
	l_setup
	printf 'l2 %s none same-passphrase\nl3 %s - same-passphrase\n' $I/l-2.qcow2 $I/l-3.qcow2 > /tmp/qcowtab
	agent_start "$PASS" "$PASS"
	rc=0
	timeout 120 qcowsetup --qcowtab /tmp/qcowtab open --tab </dev/null || rc=$?
	agent_stop
	[ $rc = 0 ] || { echo "open --tab: exit $rc"; return 1; }
	[ "$(wc -l < /tmp/agent.log)" = 1 ] || { echo "not one question"; return 1; }
	want_md5 /dev/mapper/l2 l-2
	want_md5 /dev/mapper/l3 l-3
	qcowsetup --qcowtab /tmp/qcowtab close --tab
	nothing_left
	# as the generated units run them: one process per entry, the second
	# takes the passphrase systemd-ask-password cached (--keyname) in the
	# user keyring (spare answers: a second question must not hang the test)
	forget_cached
	agent_start "$PASS" "$PASS"
	rc=0
	as_unit qcowsetup --qcowtab /tmp/qcowtab open --tab l2 || rc=$?
	as_unit qcowsetup --qcowtab /tmp/qcowtab open --tab l3 || rc=$?
	agent_stop
	[ $rc = 0 ] || { echo "open --tab l2, l3: exit $rc"; return 1; }
	[ "$(wc -l < /tmp/agent.log)" = 1 ] || { echo "not one question for the two units"; return 1; }
	want_md5 /dev/mapper/l2 l-2
	want_md5 /dev/mapper/l3 l-3
	qcowsetup --qcowtab /tmp/qcowtab close --tab l3
	qcowsetup --qcowtab /tmp/qcowtab close --tab l2
	nothing_left
	forget_cached
	qcheck $I/l-2.qcow2 luks
	qcheck $I/l-3.qcow2 luks
	l_done
	counts
}

# case_test LETTER NAME FUNCTION: vm_test, unless QS_HOSTILE_CASES (letters,
# space-separated) leaves the case out
case_test() {
	c_letter=$1
	shift
	case " ${QS_HOSTILE_CASES:-$c_letter} " in
	*" $c_letter "*) vm_test "$@" ;;
	esac
}
case_test a "a. data file = another folder's regular file (absolute, ../): read-write open exits 2, the file unchanged" t_a_data_file_elsewhere
case_test b "b. data file = /dev/loop0, ../../../dev/loop0: exit 2, loop0 and its file unchanged" t_b_data_file_loop0
case_test c "c. backing file = /proc/kcore (absolute, ../), a sysfs file: exit 2 even with --trust-names" t_c_backing_kernel_interfaces
case_test d "d. backing file = ../../../dev/loop0: exit 2, loop0 unchanged" t_d_backing_loop0
case_test e "e. data file = a FIFO: probe (file, loop device) exits 0 at once; open/info/map/check/table exit 4 at once" t_e_data_file_fifo
case_test f "f. raw disk: read-write only with --format raw; a qcow2 header the guest wrote is not followed" t_f_raw_disk
case_test g "g. backing file outside the folder (symlink, absolute), of uid 1000: exit 2; --trust-names, --backing-file map right" t_g_backing_outside
case_test h "h. qcow2 chain on block devices (/dev/loopN, symlink): exit 2; --trust-names maps right" t_h_chain_on_block_devices
case_test i "i. race: two opens of one NAME ($ROUNDS rounds): one wins, the other exits 5, the winner's image mapped" t_i_race_open_open
case_test i "i. race: close with open (5 rounds): no crash, nothing left" t_i_race_close_open
case_test j "j. symlink swapped while open waits for the key: refused or A's bytes, never B's" t_j_symlink_swap
case_test k "k. qcowtab: key expected, unencrypted image: exit 2 unless allow-unencrypted" t_k_allow_unencrypted
case_test l "l. read-write LUKS entry via systemd-ask-password: mapped on the first answer" t_l_agent_first_answer
case_test l "l. tries=3: a wrong answer, then the right one: mapped" t_l_agent_tries
case_test l "l. timeout=5s, no answer: exit 2 within 15 s, nothing left" t_l_agent_timeout
case_test l "l. two same-passphrase read-write entries (one open --tab; one per unit): one question, both mapped" t_l_agent_same_passphrase
vm_cleanup
umount $H 2>/dev/null
echo "What the cases checked (up to a failure):"
awk '{ r += $1; m += $2; q += $3; n = $4; for (i = 5; i <= NF; i++) n = n " " $i
	printf "  %s: %d refusals, %d md5 checks, %d qemu-img checks\n", n, $1, $2, $3 }
	END { printf "  total: %d refusals, %d md5 checks, %d qemu-img checks\n", r, m, q }' /tmp/hostile-counts 2>/dev/null
vm_summary
