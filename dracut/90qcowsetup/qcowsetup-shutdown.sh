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
for _qs_dir in /run/qcowsetup/mnt/*; do
    [ -d "$_qs_dir" ] || continue
    umount "$_qs_dir" 2> /dev/null && rmdir "$_qs_dir"
done
exit $_qs_ret
