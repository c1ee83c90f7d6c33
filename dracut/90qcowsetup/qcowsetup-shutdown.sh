#!/bin/sh
# shutdown hook of 90qcowsetup, run by dracut's shutdown (99shutdown) after
# the system went back to the initramfs and unmounted its root: close the
# qcowsetup mappings, so that their daemons finish the images (flush, the
# dirty bit of lazy refcounts, the file's size), then unmount the
# filesystems qcowsetup mounted under /run/qcowsetup/mnt. Before 90dm's
# dm-shutdown.sh, which would remove the devices under the daemons. A
# mapping still in use fails the hook: dracut runs it again.

command -v qcowsetup > /dev/null || exit 0
_qs_ret=0
for _qs_name in $(qcowsetup list 2> /dev/null); do
    if [ -n "$final" ]; then
        qcowsetup close "$_qs_name" 2>&1 | vwarn
    else
        qcowsetup close "$_qs_name" > /dev/null 2>&1
    fi
    [ -b "/dev/mapper/$_qs_name" ] && _qs_ret=1
done
# where they are mounted now: under /run/qcowsetup/mnt, or under the old
# root's /run, which dracut's shutdown moves to /oldsys/run when systemd
# went back to the initramfs (its /run then holds none of them)
_qs_mounts=$(cat /proc/mounts)
while read -r _qs_dev _qs_dir _qs_rest; do
    case $_qs_dir in
        */run/qcowsetup/mnt/*) umount "$_qs_dir" 2> /dev/null && rmdir "$_qs_dir" ;;
    esac
done << EOF_MOUNTS
$_qs_mounts
EOF_MOUNTS
exit $_qs_ret
