#!/bin/sh
# pre-pivot hook of 90qcowsetup: the slow-path daemons of the mappings made
# in the initramfs (qcowsetup-daemon, the root's among them) go on serving
# after switch_root, from the initramfs' root, which switch_root empties and
# leaves without its /dev, /proc and /sys (it moves those mounts into the new
# root). A daemon needs them for its table reloads: each gets a second mount
# on top of itself here, which switch_root moves, the first staying for the
# daemons. /run is left alone (the holding filesystems are mounted under
# it): the daemons' state files there go stale.
#
# Nothing may stop the daemons before the root filesystem is unmounted:
# systemd spares them at shutdown by their argv[0] ('@') (with systemd in
# the initramfs, they are in scopes no unit stop reaches: qcowsetup-generator);
# for sysvinit's sendsigs, their process ids go to /run/sendsigs.omit.d/
# (one file each; /run moves into the new root). The mappings are closed by
# the shutdown hook, in the initramfs systemd goes back to at shutdown:
# need_shutdown asks dracut-shutdown.service to unpack it there.

_qs_found=''
for _qs_proc in /proc/[0-9]*; do
    _qs_arg0=''
    # (the process may be gone: the error of the redirection goes too)
    read -r _qs_arg0 2> /dev/null < "$_qs_proc/cmdline"
    case $_qs_arg0 in
        @qcowsetup-daemon*)
            mkdir -p /run/sendsigs.omit.d
            echo "${_qs_proc#/proc/}" > "/run/sendsigs.omit.d/qcowsetup-daemon.${_qs_proc#/proc/}"
            _qs_found=1
            ;;
    esac
done
if [ -n "$_qs_found" ]; then
    # dracut-shutdown.service unpacks the initramfs for the shutdown hook
    need_shutdown
    for _qs_fs in /dev /proc /sys; do
        mount --rbind "$_qs_fs" "$_qs_fs" || warn "qcowsetup: cannot keep $_qs_fs for the slow-path daemons"
    done
fi
unset _qs_proc _qs_arg0 _qs_found _qs_fs
