#!/bin/bash
# Automake test: the boot scripts that put qcowtab fields, kernel command
# line values and image data into udev rules and shell scripts quote them.
#
# dracut (90qcowsetup, without systemd in the initramfs): the cmdline hook
# parse-qcowsetup.sh runs in a subshell on a crafted qcowtab and kernel
# command line ($(...), backquotes, quotes, ';', '|', globs, blanks and
# octal escapes), under dash and bash: no command runs, every udev rule line
# it writes has the expected shape, the hooks it writes run without
# running anything, invalid names are refused, and its entries are the
# generator's (qcowsetup's parser) for the same command line. The scripts
# run with their absolute paths (/etc, /lib, /tmp) moved under a work folder
# and dracut's functions stubbed. qs_load_credentials loads the
# load-credential= files of the entries it is given, and only those.
#
# udev: the shell of 11-dm-qcowsetup.rules prints an image id only when it
# is hex digits and dashes (a LUKS UUID from an image can hold "\n" for sh's
# echo); the link patterns of both rules files take a UUID (and a path hash)
# and nothing else.
#
# Exit 0 pass, 1 fail, 99 error.
set -u
me=test-hooks
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
gen=${QCOWSETUP_GENERATOR:-$builddir/qcowsetup-generator}
mod=$top/dracut/90qcowsetup
need_built "$gen"

make_work
tmp=$work

# ---- dracut ---------------------------------------------------------------

# What the hostile values try: create $canary.
canary=$tmp/pwned
# qcowtab fields: no raw blanks (\040), anything else as it is
cat > "$tmp/qcowtab" <<TAB
good     LABEL=my\\040disk\$(touch\\040$canary):/i.qcow2   none   readonly
quote    /srv/a'b"c\\047\\042\`touch\\040$canary\`.qcow2   /k;touch\\040$canary   ro
semi     PARTLABEL=x;touch\\040$canary;|*   none
bad\$(touch\\040$canary)   /x.qcow2
bad\\040sp   /x.qcow2
dev      /dev/disk/by-id/usb-\$(touch\\040$canary)   none   nofail
TAB
# kernel command line words: double quotes hold blanks
cmdline='quiet root=/dev/mapper/croot ro rd.qcowsetup.image="UUID=1234:/a b$(touch CANARY)'"'"'.qcow2"'
cmdline+=' rd.qcowsetup.name=croot rd.qcowsetup.key="/k`touch CANARY`" rd.qcowsetup.options=readonly'
cmdline+=' rd.qcowsetup.image="/dev/vd*;touch CANARY|x" rd.qcowsetup.name="cmd$(touch CANARY)"'
cmdline+=' rd.qcowsetup.image=PARTUUID=ab\\cd'
cmdline=${cmdline//CANARY/$canary}

# The module's scripts with their absolute paths under $root.
prepare() {
	local root=$1 f
	mkdir -p "$root/etc/udev/rules.d" "$root/etc/cmdline.d" "$root/lib" "$root/tmp" "$root/bin" \
		"$root/hooks/initqueue/finished" "$root/hooks/emergency"
	cp "$tmp/qcowtab" "$root/etc/qcowtab"
	# the programs the rules name (command -v)
	printf '#!/bin/sh\nprintf "%%s\\n" "initqueue $*" >> "$QS_ROOT/initqueue.log"\n' > "$root/bin/initqueue"
	printf '#!/bin/sh\nexit 0\n' > "$root/bin/qcowsetup-ask"
	chmod +x "$root/bin/initqueue" "$root/bin/qcowsetup-ask"
	for f in parse-qcowsetup.sh qcowsetup-lib.sh qcowsetup-ask.sh; do
		sed -e "s#/etc/#@ROOT@/etc/#g" -e "s#/tmp/#@ROOT@/tmp/#g" \
			-e "s#/lib/qcowsetup-lib.sh#@ROOT@/lib/qcowsetup-lib.sh#g" \
			-e "s#/lib/dracut-lib.sh#@ROOT@/lib/dracut-lib.sh#g" -e "s#@ROOT@#$root#g" "$mod/$f" > "$root/lib/$f"
	done
	# dracut's functions, stubbed: the command line is $CMDLINE
	cat > "$root/lib/dracut-lib.sh" <<'LIB'
getcmdline() { printf '%s' "$CMDLINE"; }
getarg() { local w; for w in $CMDLINE; do case $w in "$1"*) printf '%s\n' "${w#"$1"}"; return 0 ;; esac; done; return 1; }
getargbool() { case " $CMDLINE " in *" $2=0 "*) return 1 ;; esac; return 0; }
info() { printf 'info: %s\n' "$*" >&2; }
warn() { printf 'warn: %s\n' "$*" >&2; }
need_shutdown() { :; }
udevsettle() { :; }
emergency_shell() { printf 'emergency: %s\n' "$*" >&2; }
LIB
}

# The lines of 70-qcowsetup.rules: the fixed ones, or a match made of
# pattern characters only followed by the queueing of qcowsetup-ask for a
# valid name.
rules_shaped() {
	local rules=$1 bad
	bad=$(grep -vxE \
		-e 'SUBSYSTEM!="block", GOTO="qcowsetup_end"' \
		-e 'ACTION!="add\|change", GOTO="qcowsetup_end"' \
		-e 'LABEL="qcowsetup_end"' \
		-e 'ENV\{(ID_FS_UUID|ID_FS_LABEL|ID_PART_ENTRY_UUID|ID_PART_ENTRY_NAME)\}=="[A-Za-z0-9#+,./:=@_*?-]+", RUN\+="[^" ]+/initqueue --onetime --unique --settled --name qcowsetup-ask-([A-Za-z0-9._+-]+) [^" ]+/qcowsetup-ask \2"' \
		-e 'ENV\{ID_QCOW2_QCOWTAB\}=="([A-Za-z0-9._+-]+)\|\1 \*\|\* \1\|\* \1 \*", RUN\+="[^" ]+/initqueue --onetime --unique --settled --name qcowsetup-ask-\1 [^" ]+/qcowsetup-ask \1"' \
		"$rules")
	[ -z "$bad" ] || { printf '    | %s\n' "$bad"; return 1; }
}

shells=""
for sh in dash bash busybox; do
	command -v $sh >/dev/null && shells="$shells $sh"
done
for sh in $shells; do
	run="$sh"
	[ "$sh" = busybox ] && run="busybox sh"
	root=$tmp/root-$sh
	prepare "$root"
	rm -f "$canary"
	( cd "$root" && export QS_ROOT="$root" CMDLINE="$cmdline" hookdir="$root/hooks" PATH="$root/bin:$PATH" &&
		$run -c ". '$root/lib/dracut-lib.sh'; . '$root/lib/parse-qcowsetup.sh'" ) \
		> "$root/out" 2> "$root/err"
	check "$sh: parse-qcowsetup.sh runs no command from qcowtab or the command line" test ! -e "$canary"
	rules=$root/etc/udev/rules.d/70-qcowsetup.rules
	check "$sh: 70-qcowsetup.rules written" test -s "$rules"
	check "$sh: every udev rule line has the expected shape" rules_shaped "$rules"
	check "$sh: a rule for each tagged location and the disk image" \
		test "$(grep -c 'RUN+=' "$rules")" = 5
	check "$sh: the label's match: its safe characters, '*' for the others" \
		grep -qF 'ENV{ID_FS_LABEL}=="my*disk*touch*' "$rules"
	check "$sh: invalid names refused with a warning, nothing written for them" eval \
		"[ \"\$(grep -c 'is no valid name' '$root/err')\" = 3 ] && ! grep -q 'bad' '$rules' && ! ls '$root/hooks/initqueue/finished' | grep -q bad"
	check "$sh: finished hooks for the entries without nofail" \
		test "$(cd "$root/hooks/initqueue/finished" && ls | tr '\n' ' ')" = "90-qcowsetup-croot.sh 90-qcowsetup-good.sh 90-qcowsetup-qcow-3.sh 90-qcowsetup-quote.sh 90-qcowsetup-semi.sh "
	# the hooks dracut sources: run them, warn prints its argument
	( cd "$root" && $run -c "warn() { printf '%s\n' \"\$*\"; }; . '$root/hooks/emergency/90-qcowsetup.sh'" ) \
		> "$root/emergency.out" 2>&1
	check "$sh: the emergency hook runs nothing" test ! -e "$canary"
	check "$sh: the emergency hook tells each image as written in qcowtab" \
		grep -qxF "qcowsetup: quote (/srv/a'b\"c\\047\\042\`touch\\040$canary\`.qcow2) is not mapped" "$root/emergency.out"
	check "$sh: ... and as given on the command line" \
		grep -qxF "qcowsetup: croot (UUID=1234:/a\\040b\$(touch\\040$canary)'.qcow2) is not mapped" "$root/emergency.out"
	for f in "$root"/hooks/initqueue/finished/*.sh; do
		( cd "$root" && $run "$f" ) >/dev/null 2>&1
	done
	check "$sh: the finished hooks run nothing" test ! -e "$canary"
	check "$sh: root on a read-only mapping from the command line: rd.skipfsck" \
		grep -qx rd.skipfsck "$root/etc/cmdline.d/90qcowsetup-skipfsck.conf"

	# qcowsetup-ask with a hostile name does nothing but refuse
	( cd "$root" && export QS_ROOT="$root" CMDLINE="$cmdline" && $run "$root/lib/qcowsetup-ask.sh" "x;touch $canary" ) \
		> "$root/ask.out" 2>&1
	rc=$?
	check "$sh: qcowsetup-ask refuses an invalid name (exit 1), runs nothing" eval "[ $rc = 1 ] && [ ! -e '$canary' ]"

	# the helpers qcowsetup-ask uses on the same fields
	( cd "$root" && export QS_ROOT="$root" CMDLINE="$cmdline" && $run -c ". '$root/lib/dracut-lib.sh'; . '$root/lib/qcowsetup-lib.sh'
		qs_entry good && qs_present \"\$qs_image\"; echo present=\$?
		qs_tag_link \"\$(qs_location_tag \"\$qs_image\")\"; printf '%s\n' \"\$qs_ret\"
		qs_entry semi && qs_present \"\$qs_image\"; qs_entry quote && qs_present \"\$qs_key\"
		qs_entry croot && qs_present \"\$qs_key\"; qs_entry qcow-3 && qs_present \"\$qs_image\"
		qs_entry 'bad\$(touch $canary)'; echo bad=\$?
		qs_entries" ) > "$root/lib.out" 2>&1
	check "$sh: qs_entry/qs_present/qs_tag_link run nothing" test ! -e "$canary"
	check "$sh: a label's link as udev encodes it" \
		grep -qxF "/dev/disk/by-label/my\\x20disk\\x24\\x28touch\\x20${canary//\//\\x2f}\\x29" "$root/lib.out"
	check "$sh: qs_entry refuses an invalid name" grep -qx 'bad=1' "$root/lib.out"
	# the valid names of qs_entries' lines
	grep -E '^[^ ]+ [^ ]+ [^ ]+' "$root/lib.out" | cut -d' ' -f1 | grep -xE '[A-Za-z0-9._+-]+' | sort > "$root/names"
done

# The generator (qcowsetup's parser) sees the same entries in the initramfs.
out=$tmp/gen
mkdir "$out"
QCOWSETUP_QCOWTAB=$tmp/qcowtab QCOWSETUP_BIN=/usr/sbin/qcowsetup SYSTEMD_IN_INITRD=1 SYSTEMD_PROC_CMDLINE="$cmdline" \
	"$gen" "$out" >/dev/null 2>"$tmp/gen.err"
( cd "$out" && ls qcowsetup@*.service ) | sed -e 's/^qcowsetup@//' -e 's/\.service$//' -e 's/\\x2d/-/g' | sort > "$tmp/gen.names"
for sh in $shells; do
	check "$sh: the entries of qcowsetup-lib.sh are the generator's ($(tr '\n' ' ' < "$tmp/gen.names"))" \
		cmp -s "$tmp/root-$sh/names" "$tmp/gen.names"
done

# qs_load_credentials (qcowsetup-ask without systemd): load-credential=ID:PATH
# and load-credential=ID (the credential stores) copied into a 0700
# directory as ID; an entry without one loads nothing
for sh in $shells; do
	run="$sh"
	[ "$sh" = busybox ] && run="busybox sh"
	root=$tmp/root-$sh
	mkdir -p "$root/etc/credstore"
	printf 'one' > "$root/k1.txt"
	printf 'two' > "$root/etc/credstore/k2"
	ccmd="rd.qcowsetup.image=/a.qcow2 rd.qcowsetup.name=ca rd.qcowsetup.options=load-credential=k1:$root/k1.txt"
	ccmd="$ccmd rd.qcowsetup.image=/b.qcow2 rd.qcowsetup.name=cb rd.qcowsetup.options=readonly,load-credential=k2"
	ccmd="$ccmd rd.qcowsetup.image=/c.qcow2 rd.qcowsetup.name=cc rd.qcowsetup.options=readonly"
	( cd "$root" && export CMDLINE="$ccmd" && $run -c ". '$root/lib/dracut-lib.sh'; . '$root/lib/qcowsetup-lib.sh'
		qs_load_credentials '$root/creds' ca cb cc; echo loaded=\$?
		qs_load_credentials '$root/none' cc; echo none=\$?" ) > "$root/cred.out" 2>&1
	check "$sh: qs_load_credentials: ID:PATH and ID from /etc/credstore, in a 0700 directory" eval \
		"grep -qx loaded=0 '$root/cred.out' && [ \"\$(cat '$root/creds/k1')\" = one ] &&
		 [ \"\$(cat '$root/creds/k2')\" = two ] && [ \"\$(stat -c %a '$root/creds')\" = 700 ] &&
		 [ \"\$(ls '$root/creds' | tr '\n' ' ')\" = 'k1 k2 ' ]"
	check "$sh: qs_load_credentials: nothing for an entry without load-credential=" eval \
		"grep -qx none=1 '$root/cred.out' && [ ! -e '$root/none' ]"
done

# ---- udev -----------------------------------------------------------------

# a value of a rules file, udev's substitutions done ($$ is $, %% is %)
rule_value() { # FILE KEY: the value of the first KEY"..." (no '"' in it)
	local line v
	line=$(grep -F "$2\"" "$1" | head -n 1)
	v=${line#*"$2\""}
	v=${v%%\"*}
	v=${v//\$\$/\$}
	printf '%s\n' "${v//%%/%}"
}
import=$(rule_value "$top/udev/11-dm-qcowsetup.rules" 'IMPORT{program}=')
script=${import#/bin/sh -c \'}
script=${script%\'}
image_id() { DM_UUID=$1 DM_NAME=$2 sh -c "$script"; }
uuid=0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6b
check "11-dm: a LUKS UUID is the image id" test "$(image_id "QCOW2-$uuid-vm1" vm1)" = "QCOWSETUP_IMAGE_ID=$uuid"
check "11-dm: a path hash is the image id" test "$(image_id QCOW2-0123456789abcdef-a-b a-b)" = "QCOWSETUP_IMAGE_ID=0123456789abcdef"
check "11-dm: an id with a backslash (echo's \\n) prints nothing" \
	test -z "$(image_id 'QCOW2-a\nSYSTEMD_WANTS=x.service-vm1' vm1)"
check "11-dm: an id with '/' or '..' prints nothing" test -z "$(image_id 'QCOW2-../../etc-vm1' vm1)"
check "11-dm: an id with blanks or globs prints nothing" test -z "$(image_id 'QCOW2-a b*-vm1' vm1)"

# udev matches with fnmatch(3) and '|' alternatives: bash's [[ == ]] does
# the same for these patterns
udev_match() { # PATTERN VALUE
	local p
	IFS='|' read -ra alts <<< "$1"
	for p in "${alts[@]}"; do
		# shellcheck disable=SC2053 # a pattern
		[[ $2 == $p ]] && return 0
	done
	return 1
}
for f in "$top/udev/11-dm-qcowsetup.rules:ENV{QCOWSETUP_IMAGE_ID}==" "$top/udev/60-qcowsetup.rules.in:ENV{ID_QCOW2_LUKS_UUID}=="; do
	pat=$(rule_value "${f%%:*}" "${f#*:}")
	what="$(basename "${f%%:*}") ${f#*:}"
	check "$what: a UUID makes a link" udev_match "$pat" "$uuid"
	check "$what: an upper case UUID too" udev_match "$pat" "${uuid^^}"
	for bad in "../../../../../../../../../etc/passw" "$uuid/../x" "${uuid%?}/" "${uuid%?}" "$uuid " \
		"0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6g" "0b1f22c45a6e-4b7d-9e2f-1c2d3e4f5a6b-" ""; do
		check "$what: no link for \"$bad\"" eval '! udev_match "$pat" "$bad"'
	done
done
check "11-dm: a path hash makes a link" udev_match "$(rule_value "$top/udev/11-dm-qcowsetup.rules" 'ENV{QCOWSETUP_IMAGE_ID}==')" 0123456789abcdef

summary
