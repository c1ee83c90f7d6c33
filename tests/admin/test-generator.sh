#!/bin/bash
# Automake test: qcowsetup-generator turns a qcowtab (and, "in the
# initramfs", rd.qcowsetup.* options) into units with the expected
# dependencies, and every unit passes `systemd-analyze verify`.
# Exit 0 pass, 1 fail, 77 skip (no systemd-analyze), 99 error.
set -u
me=test-generator
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
gen=${QCOWSETUP_GENERATOR:-$builddir/qcowsetup-generator}
qs=${QCOWSETUP:-$builddir/qcowsetup}
need_built "$gen"
need_built "$qs"
# the real program, not a libtool wrapper, goes into ExecStart=
[ -x "$(dirname "$qs")/.libs/$(basename "$qs")" ] && qs=$(dirname "$qs")/.libs/$(basename "$qs")
qs=$(cd "$(dirname "$qs")" && pwd)/$(basename "$qs")

make_work
tmp=$work

cat > "$tmp/qcowtab" <<'TAB'
# name  image  key  options
root    UUID=0b1f22c4-5a6e-4b7d-9e2f-1c2d3e4f5a6b:/images/root.qcow2  /keys/root.key:LABEL=keys  readonly,x-initrd.attach
data    PARTUUID=AA-BB   none   readonly,nofail,same-passphrase,x-systemd.device-timeout=30s
vm-1    /var/lib/images/vm1.qcow2   /etc/qcow.key   readonly,noauto
lbl     LABEL=my\040disk:/x.qcow2   -   readonly
direct  /dev/disk/by-id/virtio-qd   none   readonly
broken  relative.qcow2
TAB
out=$tmp/out
mkdir "$out"
QCOWSETUP_QCOWTAB=$tmp/qcowtab QCOWSETUP_BIN=$qs SYSTEMD_IN_INITRD=0 "$gen" "$out" "$out" "$out" 2>"$tmp/err"
rc=$?
check "a bad line is reported, the generator says so (exit 1)" \
	grep -q "qcowtab:7: broken: image" "$tmp/err"
[ $rc = 1 ] || fail "generator exit status $rc, not 1"
u=$out/qcowsetup@root.service
check "one unit per good entry" test "$(ls "$out"/qcowsetup@*.service | wc -l)" = 5
check "escaped names (vm-1 -> vm\\x2d1)" test -f "$out/qcowsetup@vm\\x2d1.service"
check "root: runs qcowsetup open/close --tab" grep -q "^ExecStart=$qs open --tab --qcowtab $tmp/qcowtab root\$" "$u"
check "root: bound to the device holding the image" grep -q '^BindsTo=dev-disk-by\\x2duuid-0b1f22c4\\x2d5a6e\\x2d4b7d\\x2d9e2f\\x2d1c2d3e4f5a6b.device$' "$u"
check "root: wants the key's device" grep -q '^Wants=dev-disk-by\\x2dlabel-keys.device$' "$u"
check "root: before local-fs-pre and cryptsetup targets" \
	eval "grep -q '^Before=local-fs-pre.target' '$u' && grep -q '^Before=cryptsetup.target' '$u'"
check "root: x-initrd.attach, no Conflicts=umount.target" eval "! grep -q umount '$u'"
check "root: required by cryptsetup.target" test -L "$out/cryptsetup.target.requires/qcowsetup@root.service"
check "root: required by /dev/mapper/root" test -L "$out/dev-mapper-root.device.requires/qcowsetup@root.service"
check "data: nofail: wanted, not ordered before cryptsetup.target" \
	eval "test -L '$out/cryptsetup.target.wants/qcowsetup@data.service' && ! grep -q '^Before=cryptsetup' '$out/qcowsetup@data.service'"
check "data: device timeout drop-in" grep -q '^JobRunningTimeoutSec=30$' "$out/dev-disk-by\\x2dpartuuid-aa\\x2dbb.device.d/40-qcowsetup-device-timeout.conf"
check "vm-1: noauto: not pulled by cryptsetup.target" eval "! ls '$out'/cryptsetup.target.*/ | grep -q vm"
check "vm-1: RequiresMountsFor= image and key, not before local-fs-pre" \
	eval "grep -q '^RequiresMountsFor=/var/lib/images/vm1.qcow2' '$out/qcowsetup@vm\\x2d1.service' && grep -q '^RequiresMountsFor=/etc/qcow.key' '$out/qcowsetup@vm\\x2d1.service' && ! grep -q local-fs-pre '$out/qcowsetup@vm\\x2d1.service'"
check "lbl: a label with a space, as udev encodes it" grep -q '^BindsTo=dev-disk-by\\x2dlabel-my\\x5cx20disk.device$' "$out/qcowsetup@lbl.service"
check "direct: bound to the disk" grep -q '^BindsTo=dev-disk-by\\x2did-virtio\\x2dqd.device$' "$out/qcowsetup@direct.service"

# in the initramfs: the kernel command line adds entries, rd.qcowsetup=0 none
out2=$tmp/initrd
mkdir "$out2"
QCOWSETUP_QCOWTAB=$tmp/none QCOWSETUP_BIN=$qs SYSTEMD_IN_INITRD=1 \
	SYSTEMD_PROC_CMDLINE='quiet rd.qcowsetup.image=UUID=1234:/r.qcow2 rd.qcowsetup.name=croot rd.qcowsetup.options=readonly rd.qcowsetup.image=PARTUUID=99' \
	"$gen" "$out2" "$out2" "$out2" 2>"$tmp/err2"
check "initramfs: rd.qcowsetup.* entries (named and default qcow-2)" \
	eval "test -f '$out2/qcowsetup@croot.service' && test -f '$out2/qcowsetup@qcow\\x2d2.service'"
u2="$out2/qcowsetup@qcow\\x2d2.service"
check "initramfs: open runs in a scope of its own (systemd-run --scope)" grep -qxF \
	"ExecStart=systemd-run --scope --quiet --property=DefaultDependencies=no \"--unit=qcowsetup-qcow\\\\x2d2.scope\" \"--description=qcowsetup: the slow-path daemon of qcow-2\" $qs open --tab --qcowtab $tmp/none qcow-2" "$u2"
check "initramfs: close as it is" grep -qxF "ExecStop=$qs close --tab --qcowtab $tmp/none qcow-2" "$u2"
out3=$tmp/off
mkdir "$out3"
QCOWSETUP_QCOWTAB=$tmp/qcowtab SYSTEMD_IN_INITRD=1 SYSTEMD_PROC_CMDLINE='rd.qcowsetup=0 rd.qcowsetup.image=PARTUUID=99' \
	"$gen" "$out3" "$out3" "$out3" 2>/dev/null
check "initramfs: rd.qcowsetup=0: no units" test -z "$(ls "$out3")"

# Escaping: paths with blanks, '%', '$', quotes, backslashes and UTF-8 go
# into the units as systemd reads them back (specifiers, quoting, C escapes,
# unit names as systemd-escape makes them); what a unit cannot hold is
# refused with its qcowtab line, and no unit is written for it.
odd="$tmp/odd dir %n \$x é"
mkdir "$odd"
ln -s "$qs" "$odd/qs %i"
plus=$(printf '+%.0s' $(seq 100))
longlabel=$(printf 'x\\040%.0s' $(seq 40))
cat > "$odd/tab 100%" <<TAB
sp      /srv/my\040vms/100%\134img's"q.qcow2  /k\040ey%s   readonly
dev     /dev/disk/by-id/usb-My\040Disk%1   none   readonly
lbl     LABEL=50%\134off"x\072y:/i.qcow2   -   readonly
nl      /srv/a\012b.qcow2
u8      /srv/\377x.qcow2   none   readonly
$plus   /x.qcow2
long    LABEL=$longlabel:/i.qcow2
dots    /dev/disk/by-id/../../sda
keynl   /dev/vdb   /k\012ey   readonly
TAB
out4=$tmp/odd
mkdir "$out4"
QCOWSETUP_QCOWTAB="$odd/tab 100%" QCOWSETUP_BIN="$odd/qs %i" SYSTEMD_IN_INITRD=0 "$gen" "$out4" "$out4" "$out4" 2>"$tmp/err4"
rc=$?
[ $rc = 1 ] || fail "odd paths: generator exit status $rc, not 1"
check "odd paths: units only for the entries a unit can hold" \
	test "$(cd "$out4" && ls qcowsetup@*.service | tr '\n' ' ')" = "qcowsetup@dev.service qcowsetup@lbl.service qcowsetup@sp.service "
check "odd paths: a newline in an image path is refused, one line naming the qcowtab line" \
	grep -qx "qcowsetup-generator: $odd/tab 100%:4: nl: image /srv/a\\\\012b.qcow2: systemd's RequiresMountsFor= cannot hold a newline, a control character or invalid UTF-8 (line ignored)" "$tmp/err4"
check "odd paths: invalid UTF-8 in an image path is refused" grep -q "tab 100%:5: u8: image /srv/\\\\377x.qcow2: " "$tmp/err4"
check "odd paths: a name too long once escaped (100 '+') is refused" grep -q "tab 100%:6: $plus: the name is too long" "$tmp/err4"
check "odd paths: a device unit name over 255 characters is refused" grep -q "tab 100%:7: long: image LABEL=.*longer than 255" "$tmp/err4"
check "odd paths: a .. in a device path is refused" grep -q "tab 100%:8: dots: image" "$tmp/err4"
check "odd paths: a newline in a key file path is refused" grep -q "tab 100%:9: keynl: key file /k\\\\012ey: " "$tmp/err4"
check "odd paths: one line per refused entry" test "$(wc -l < "$tmp/err4")" = 6
u=$out4/qcowsetup@sp.service
check "odd paths: RequiresMountsFor= quoted, '%' doubled" \
	grep -qxF 'RequiresMountsFor="/srv/my vms/100%%\\img'"'"'s\"q.qcow2"' "$u"
check "odd paths: ExecStart= words quoted, '%' doubled, '\$' doubled in arguments, UTF-8 as C escapes" \
	grep -qxF "ExecStart=\"$tmp/odd dir %%n \$x \\xc3\\xa9/qs %%i\" open --tab --qcowtab \"$tmp/odd dir %%n \$\$x \\xc3\\xa9/tab 100%%\" sp" "$u"
check "odd paths: SourcePath= with '%' doubled" grep -qxF "SourcePath=$tmp/odd dir %%n \$x é/tab 100%%" "$u"
if command -v systemd-escape >/dev/null; then
	check "odd paths: a /dev path's device unit is systemd-escape --path's" \
		grep -qxF "BindsTo=$(systemd-escape --path '/dev/disk/by-id/usb-My Disk%1').device" "$out4/qcowsetup@dev.service"
	check "odd paths: a label's device unit: udev's link name (\\x25 \\x5c \\x22), systemd-escape'd" \
		grep -qxF "BindsTo=$(systemd-escape --path '/dev/disk/by-label/50\x25\x5coff\x22x:y').device" "$out4/qcowsetup@lbl.service"
fi
# _netdev (an image bound to a tang server): ordered as
# systemd-cryptsetup-generator orders such crypttab lines
cat > "$tmp/netdev" <<'TAB'
tang    /v/t.qcow2   none   clevis,_netdev
tangnf  /v/n.qcow2   none   clevis,_netdev,nofail
tpm     /dev/disk/by-id/virtio-qt   none   clevis
TAB
out6=$tmp/netdev.out
mkdir "$out6"
QCOWSETUP_QCOWTAB=$tmp/netdev QCOWSETUP_BIN=$qs SYSTEMD_IN_INITRD=0 "$gen" "$out6" "$out6" "$out6" 2>"$tmp/err6" ||
	fail "_netdev: generator exit status $?"
u=$out6/qcowsetup@tang.service
check "_netdev: after and wanting network-online.target, after remote-fs-pre.target" \
	eval "grep -qx 'After=remote-fs-pre.target network-online.target' '$u' && grep -qx 'Wants=network-online.target' '$u'"
check "_netdev: before remote-cryptsetup.target and required by it, not cryptsetup.target or local-fs-pre.target" \
	eval "grep -qx 'Before=remote-cryptsetup.target' '$u' && test -L '$out6/remote-cryptsetup.target.requires/qcowsetup@tang.service' &&
		! grep -q -e '^Before=cryptsetup.target' -e local-fs-pre '$u' && ! ls '$out6'/cryptsetup.target.* 2>/dev/null | grep -q tang"
check "_netdev,nofail: wanted by remote-cryptsetup.target" test -L "$out6/remote-cryptsetup.target.wants/qcowsetup@tangnf.service"
check "clevis without _netdev (a tpm2 binding): no network, cryptsetup.target as before" \
	eval "! grep -q network '$out6/qcowsetup@tpm.service' && test -L '$out6/cryptsetup.target.requires/qcowsetup@tpm.service' &&
		grep -qx 'Before=local-fs-pre.target' '$out6/qcowsetup@tpm.service'"

if command -v systemd-analyze >/dev/null; then
	# systemd's own reading of what was written
	( cd "$out4" && SYSTEMD_LOG_LEVEL=debug systemd-analyze verify --man=no ./qcowsetup@sp.service ) >"$tmp/dump" 2>&1
	check "odd paths: systemd reads RequiresMountsFor= back as the image's path" \
		grep -qF "RequiresMountsFor: /srv/my vms/100%\\img's\"q.qcow2 " "$tmp/dump"
	check "odd paths: systemd reads RequiresMountsFor= back as the key file's path" \
		grep -qF "RequiresMountsFor: /k ey%s " "$tmp/dump"
fi

# Key sources: systemd credentials become LoadCredential=/LoadCredentialEncrypted=
# (qcowsetup reads them in $CREDENTIALS_DIRECTORY); with keyfile-timeout= the
# unit does not wait for the key file's device or mount (qcowsetup does, then
# asks).
cat > "$tmp/keysrc" <<'TAB'
credp   /v/p.qcow2   none   load-credential=qcow-p.key:/etc/keys/p%1,headless
crede   /v/e.qcow2   -      load-credential-encrypted=qcow-e.key,password-echo=masked
credg   /v/g.qcow2   -      credential=given.key
kto     /v/k.qcow2   /keys/k.key:LABEL=usb   keyfile-timeout=5s
ktom    /v/m.qcow2   /mnt/usb/k.key   keyfile-timeout=1min
credbad /v/b.qcow2   -      load-credential=x:/a\040b
TAB
out5=$tmp/keysrc.out
mkdir "$out5"
QCOWSETUP_QCOWTAB=$tmp/keysrc QCOWSETUP_BIN=$qs SYSTEMD_IN_INITRD=0 "$gen" "$out5" "$out5" "$out5" 2>"$tmp/err5"
rc=$?
[ $rc = 1 ] || fail "key sources: generator exit status $rc, not 1"
check "credentials: LoadCredential=ID:PATH, '%' doubled" grep -qxF 'LoadCredential=qcow-p.key:/etc/keys/p%%1' "$out5/qcowsetup@credp.service"
check "credentials: LoadCredentialEncrypted=ID (systemd searches its credential stores)" \
	grep -qx 'LoadCredentialEncrypted=qcow-e.key' "$out5/qcowsetup@crede.service"
check "credentials: credential=ID alone loads nothing" eval "! grep -q Credential '$out5/qcowsetup@credg.service'"
check "credentials: a path with a blank is refused" grep -q "keysrc:6: credbad: credential x: its path" "$tmp/err5"
check "keyfile-timeout: the key's device wanted, not waited for" \
	eval "grep -qx 'Wants=dev-disk-by\\\\x2dlabel-usb.device' '$out5/qcowsetup@kto.service' && ! grep -q '^After=dev-disk-by.x2dlabel-usb' '$out5/qcowsetup@kto.service'"
check "keyfile-timeout: no RequiresMountsFor= for the key file, the image's kept" \
	eval "! grep -q '^RequiresMountsFor=/mnt/usb' '$out5/qcowsetup@ktom.service' && grep -qx 'RequiresMountsFor=/v/m.qcow2' '$out5/qcowsetup@ktom.service'"

if command -v systemd-analyze >/dev/null; then
	# (the program's path holds ' ', '%', '$' and UTF-8 in $out4: verify
	# finds it only if ExecStart= was read back right)
	for d in "$out" "$out2" "$out4" "$out5" "$out6"; do
		( cd "$d" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no ./qcowsetup@*.service ) >"$tmp/verify" 2>&1
		if [ $? = 0 ] && [ ! -s "$tmp/verify" ]; then
			pass "systemd-analyze verify: $(cd "$d" && ls qcowsetup@*.service | tr '\n' ' ')"
		else
			fail "systemd-analyze verify in $(basename "$d")"
			sed 's/^/    | /' "$tmp/verify"
		fi
	done
else
	skipped "systemd-analyze verify: no systemd-analyze"
fi
summary
