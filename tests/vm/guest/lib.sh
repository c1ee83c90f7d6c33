# Helpers for test scripts that run inside the test VM (tests/vm/bed/run-vm.sh).
# Source it from a POSIX sh (busybox ash) or bash script:
#
#   . "$(dirname "$0")/lib.sh"
#   vm_test "dm-zero reads zeros" check_zero
#   vm_test "no device left" vm_assert_clean
#   vm_summary
#
# vm_test NAME CMD [ARGS...]
#   Runs CMD in a subshell with `set -e`, output captured. Prints, automake-like,
#   "PASS: NAME (Ts)", "FAIL: NAME" (followed by the captured output, indented) or
#   "SKIP: NAME" (CMD exited 77; its last line is shown as the reason); T is
#   the case's seconds (guest clock), where a test's time goes.
#   QS_VERBOSE=1 shows the output of passing tests too, QS_TRACE=1 runs CMD
#   with `set -x`. Never exits the caller.
# vm_summary
#   Prints "N passed, N failed, N skipped"; returns 1 if a test failed, 77 if
#   every test was skipped, else 0.
# vm_assert_clean     fails (1) if any dm device or loop device is left.
# vm_cleanup          removes every dm device and detaches every loop device.
# vm_require CMD...   exits 77 (skip) when one of the commands is missing.
# vm_uptime           seconds since the guest kernel started.

vm_passed=0
vm_failed=0
vm_skipped=0

vm_uptime() {
	cut -d' ' -f1 /proc/uptime
}

vm_require() {
	for vm_r in "$@"; do
		command -v "$vm_r" >/dev/null 2>&1 || { echo "$vm_r is not available in the VM"; exit 77; }
	done
}

vm_test() {
	vm_name=$1
	shift
	vm_out=$(mktemp /tmp/vm_test.XXXXXX)
	vm_t0=$(vm_uptime)
	case $- in *e*) vm_had_e=1; set +e ;; *) vm_had_e=0 ;; esac
	if [ "${QS_TRACE:-0}" = 0 ]; then
		( set -e; "$@" ) >"$vm_out" 2>&1 </dev/null
	else
		( set -ex; "$@" ) >"$vm_out" 2>&1 </dev/null
	fi
	vm_rc=$?
	[ $vm_had_e = 0 ] || set -e
	vm_dt=$(awk -v a="$vm_t0" -v b="$(vm_uptime)" 'BEGIN { printf "%.1f", b - a }')
	case $vm_rc in
	0)
		vm_passed=$((vm_passed + 1))
		echo "PASS: $vm_name (${vm_dt}s)"
		[ "${QS_VERBOSE:-0}" = 0 ] || sed 's/^/    | /' "$vm_out"
		;;
	77)
		vm_skipped=$((vm_skipped + 1))
		echo "SKIP: $vm_name ($(tail -n 1 "$vm_out"))"
		;;
	*)
		vm_failed=$((vm_failed + 1))
		echo "FAIL: $vm_name (exit $vm_rc after ${vm_dt}s)"
		sed 's/^/    | /' "$vm_out"
		if [ -s /tmp/messages ]; then
			echo "    | syslog (qcowsetup):"
			grep qcowsetup /tmp/messages | tail -n 15 | sed 's/^/    |   /'
		fi
		# what a failed test left must not fail the next ones
		vm_cleanup
		;;
	esac
	rm -f "$vm_out"
	return 0
}

vm_summary() {
	echo "$vm_passed passed, $vm_failed failed, $vm_skipped skipped (guest uptime $(vm_uptime)s)"
	[ "$vm_failed" = 0 ] || return 1
	if [ "$vm_passed" = 0 ] && [ "$vm_skipped" != 0 ]; then return 77; fi
	return 0
}

# The image disk: /dev/vda (ext4) mounted on /mnt/m and made the working
# folder, the modules a mapping needs loaded, the daemons' syslog kept in
# /tmp/messages (a failed case shows what they said).
vm_images_disk() {
	mkdir -p /mnt/m
	mount -t ext4 /dev/vda /mnt/m || { echo "cannot mount the image disk"; exit 1; }
	cd /mnt/m || exit 1
	for vm_mod in dm-crypt dm-zero dm-switch nbd; do modprobe -q $vm_mod 2>/dev/null; done
	syslogd -O /tmp/messages 2>/dev/null || :
}

# Names of the dm devices, one a line (empty when none).
vm_dm_devices() {
	dmsetup info -c --noheadings -o name 2>/dev/null | grep -v '^No devices found' || true
}

# Attached loop devices, one a line (empty when none).
vm_loop_devices() {
	losetup -a 2>/dev/null || true
}

vm_assert_clean() {
	vm_left=0
	if [ -n "$(vm_dm_devices)" ]; then
		echo "dm devices left:"; dmsetup ls
		vm_left=1
	fi
	if [ -n "$(vm_loop_devices)" ]; then
		echo "loop devices left:"; losetup -a
		vm_left=1
	fi
	# the slow path: no daemon (nor guardian), no connected NBD device
	if ps -o pid,args 2>/dev/null | grep -v grep | grep -q '@qcowsetup-daemon'; then
		# (a daemon finishing its exit is allowed a moment)
		sleep 1
		if ps -o pid,args | grep -v grep | grep '@qcowsetup-daemon'; then
			echo "daemon processes left"
			vm_left=1
		fi
	fi
	for b in /sys/block/nbd*; do
		[ ! -e "$b/pid" ] || { echo "${b##*/} still connected (server pid $(cat "$b/pid"))"; vm_left=1; }
	done
	return $vm_left
}

vm_cleanup() {
	for p in $(ps -o pid,args 2>/dev/null | grep '@qcowsetup-daemon' | grep -v grep | awk '{ print $1 }'); do
		kill -9 "$p" 2>/dev/null || true
	done
	dmsetup remove_all --force >/dev/null 2>&1 || true
	for b in /sys/block/nbd*; do
		[ ! -e "$b/pid" ] || qemu-nbd -d "/dev/${b##*/}" >/dev/null 2>&1 || true
	done
	losetup -D >/dev/null 2>&1 || true
}
