#!/bin/sh
# cmdline hook of 90qcowsetup: for every entry of the initramfs (/etc/qcowtab,
# the x-initrd.attach entries dracut copied, and rd.qcowsetup.* of the kernel
# command line, see qcowsetup-dracut(7)), a udev rule that queues
# qcowsetup-ask for it when a device it needs appears, and the hooks that
# make the main loop wait for it (unless nofail) and explain an emergency.
# With systemd in the initramfs, qcowsetup-generator does all of this.

type qs_entries > /dev/null 2>&1 || . /lib/qcowsetup-lib.sh

if ! getargbool 1 rd.qcowsetup; then
    info "rd.qcowsetup=0: no qcow2 images are mapped in the initramfs"
    rm -f -- /etc/udev/rules.d/70-qcowsetup.rules
    return 0 2> /dev/null || exit 0
fi

# A root filesystem on a read-only mapping cannot be checked (e2fsck opens
# the device for writing): tell dracut's mount-root not to try.
_qs_root=$(getarg root=)
_qs_root=${_qs_root#block:}
case $_qs_root in
    /dev/mapper/*)
        if qs_entry "${_qs_root#/dev/mapper/}" && {
            qs_has_option "$qs_options" readonly || qs_has_option "$qs_options" read-only ||
                qs_has_option "$qs_options" ro || qs_has_option "$qs_options" snapshot
        }; then
            info "qcowsetup: the root is on a read-only mapping: rd.skipfsck"
            echo rd.skipfsck > /etc/cmdline.d/90qcowsetup-skipfsck.conf
        fi
        ;;
esac

# What goes into the rules and hooks written here: entry names checked by
# qs_valid_name ([A-Za-z0-9._+-]: nothing to quote), tag values only as
# qs_udev_glob patterns, any other field only through qs_shell_quote.
if [ -z "$DRACUT_SYSTEMD" ]; then
    {
        echo 'SUBSYSTEM!="block", GOTO="qcowsetup_end"'
        echo 'ACTION!="add|change", GOTO="qcowsetup_end"'
    } > /etc/udev/rules.d/70-qcowsetup.rules.new

    qs_entries | while read -r _qs_name _qs_image _qs_key _qs_options; do
        [ -n "$_qs_name" ] || continue
        if ! qs_valid_name "$_qs_name"; then
            warn "qcowsetup: $(qs_shell_quote "$_qs_name") is no valid name (letters, digits, . _ + -): entry ignored"
            continue
        fi
        qs_has_option "$_qs_options" noauto && continue
        _qs_queue="RUN+=\"$(command -v initqueue) --onetime --unique --settled --name qcowsetup-ask-$_qs_name $(command -v qcowsetup-ask) $_qs_name\""
        _qs_n=0
        for _qs_loc in "$_qs_image" "$_qs_key"; do
            _qs_match=$(qs_udev_match "$_qs_loc" "$_qs_name")
            [ -n "$_qs_match" ] || continue
            echo "$_qs_match, $_qs_queue" >> /etc/udev/rules.d/70-qcowsetup.rules.new
            _qs_n=$((_qs_n + 1))
        done
        # an image file on no device udev announces: ask once udev settled
        [ "$_qs_n" -gt 0 ] || initqueue --onetime --unique --settled --name "qcowsetup-ask-$_qs_name" \
            "$(command -v qcowsetup-ask)" "$_qs_name"
        if ! qs_has_option "$_qs_options" nofail; then
            printf '[ -e "/dev/mapper/%s" ] || [ -e "/tmp/qcowsetup-failed-%s" ]\n' "$_qs_name" "$_qs_name" \
                > "$hookdir/initqueue/finished/90-qcowsetup-$_qs_name.sh"
        fi
        printf '[ -e "/dev/mapper/%s" ] || warn %s\n' "$_qs_name" \
            "$(qs_shell_quote "qcowsetup: $_qs_name ($_qs_image) is not mapped")" \
            >> "$hookdir/emergency/90-qcowsetup.sh"
    done

    echo 'LABEL="qcowsetup_end"' >> /etc/udev/rules.d/70-qcowsetup.rules.new
    mv /etc/udev/rules.d/70-qcowsetup.rules.new /etc/udev/rules.d/70-qcowsetup.rules
fi
