#!/bin/sh
# qcowsetup-ask NAME: map the initramfs entry NAME (90qcowsetup), as
# cryptroot-ask does for LUKS. Queued by the udev rules of
# parse-qcowsetup.sh when a device of the entry appears; idempotent: does
# nothing when NAME is mapped, was asked already, or a device it needs is not
# there yet (its arrival queues this again).
#
# One question for the entries marked same-passphrase: all of them whose
# devices are there are mapped by the same `qcowsetup open --tab`. The
# passphrase is asked through plymouth when it runs, else by qcowsetup on the
# console (tries= attempts, timeout=). load-credential= credentials are
# loaded for it as systemd's LoadCredential= would (qs_load_credentials). An
# entry that is not nofail and stays unmapped leads to dracut's emergency
# shell.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
NEWROOT=${NEWROOT:-"/sysroot"}

# do not ask, if we already have root
[ -f "$NEWROOT"/proc ] && exit 0

. /lib/dracut-lib.sh
. /lib/qcowsetup-lib.sh

# names are [A-Za-z0-9._+-] (qs_valid_name): they go unquoted into the
# lists below and the command lines of qcowsetup and plymouth
name=$1
qs_valid_name "$name" || {
    warn "qcowsetup-ask: invalid entry name"
    exit 1
}
[ -b "/dev/mapper/$name" ] && exit 0
[ -e "/tmp/qcowsetup-asked-$name" ] && exit 0
qs_entry "$name" || {
    warn "qcowsetup: no entry $name"
    exit 1
}
qs_present "$qs_image" && qs_present "$qs_key" || {
    info "qcowsetup: $name: waiting for its devices"
    exit 0
}

names=$name
ask=no
case $qs_key in none | - | '') ask=yes ;; esac
tries=$(qs_option_value "$qs_options" tries 3)
if qs_has_option "$qs_options" same-passphrase; then
    # the others of the group that can be mapped now
    while read -r _n _i _k _o; do
        [ "$_n" = "$name" ] && continue
        qs_valid_name "$_n" || continue
        qs_has_option "$_o" same-passphrase || continue
        qs_has_option "$_o" noauto && continue
        [ -b "/dev/mapper/$_n" ] || [ -e "/tmp/qcowsetup-asked-$_n" ] && continue
        qs_present "$_i" && qs_present "$_k" || continue
        names="$names $_n"
    done << EOF_ENTRIES
$(qs_entries)
EOF_ENTRIES
fi

for n in $names; do : >> "/tmp/qcowsetup-asked-$n"; done
[ -d /sys/module/dm_crypt ] || modprobe dm_crypt
[ -d /sys/module/loop ] || modprobe loop
modprobe -q dm_zero

info "qcowsetup: mapping $names"
# the credentials of load-credential=, as a unit's LoadCredential= would
creds=/run/qcowsetup/credentials/$name
# shellcheck disable=SC2086
qs_load_credentials "$creds" $names && export CREDENTIALS_DIRECTORY="$creds" && ask=no
{
    flock -s 9
    # shellcheck disable=SC2086
    if [ $ask = yes ] && type plymouth > /dev/null 2>&1 && plymouth --ping 2> /dev/null; then
        plymouth ask-for-password --prompt "Passphrase for $names" --number-of-tries="$tries" \
            --command="$(command -v qcowsetup) open --tab $names"
    else
        qcowsetup open --tab $names
    fi
} 9> /.console_lock
rm -rf "$creds"

failed=''
for n in $names; do
    [ -b "/dev/mapper/$n" ] && continue
    qs_entry "$n"
    qs_has_option "$qs_options" nofail && continue
    : >> "/tmp/qcowsetup-failed-$n"
    failed="$failed $n"
done

need_shutdown
udevsettle

if [ -n "$failed" ]; then
    {
        flock -s 9
        emergency_shell "qcowsetup: could not map$failed"
    } 9> /.console_lock
fi
exit 0
