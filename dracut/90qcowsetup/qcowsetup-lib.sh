#!/bin/sh
# Shell helpers of dracut's 90qcowsetup module (installed as
# /lib/qcowsetup-lib.sh). POSIX sh; needs dracut-lib.sh's getarg(s).

command -v getarg > /dev/null || . /lib/dracut-lib.sh

# The N-th word of the rest of the arguments.
_qs_nth() {
    _qs_n=$1
    shift
    [ "$_qs_n" -le $# ] || return 1
    eval "printf '%s' \"\${$_qs_n}\""
}

# The entries of the initramfs, one a line: "name image key options" --
# /etc/qcowtab then the rd.qcowsetup.* options of the kernel command line
# (the N-th name, key and options go with the N-th image; see
# qcowsetup-dracut(7)). qcowsetup itself reads the same two sources.
qs_entries() {
    local _i _img _name _key _opt _names _keys _opts
    if [ -f /etc/qcowtab ]; then
        while read -r _name _img _key _opt || [ -n "$_name" ]; do
            [ -z "$_name" ] || [ "${_name#\#}" != "$_name" ] && continue
            echo "$_name $_img ${_key:-none} ${_opt}"
        done < /etc/qcowtab
    fi
    _names=$(getargs rd.qcowsetup.name=)
    _keys=$(getargs rd.qcowsetup.key=)
    _opts=$(getargs rd.qcowsetup.options=)
    _i=0
    for _img in $(getargs rd.qcowsetup.image=); do
        _i=$((_i + 1))
        # shellcheck disable=SC2086
        _name=$(_qs_nth $_i $_names) || _name=qcow-$_i
        # shellcheck disable=SC2086
        _key=$(_qs_nth $_i $_keys) || _key=none
        # shellcheck disable=SC2086
        _opt=$(_qs_nth $_i $_opts) || _opt=
        echo "$_name $_img $_key ${_opt:+$_opt,}x-initrd.attach"
    done
}

# The entry called $1: sets qs_name qs_image qs_key qs_options.
qs_entry() {
    local _n _i _k _o
    qs_name='' qs_image='' qs_key='' qs_options=''
    while read -r _n _i _k _o; do
        if [ "$_n" = "$1" ]; then
            qs_name=$_n qs_image=$_i qs_key=$_k qs_options=$_o
            return 0
        fi
    done << EOF_ENTRIES
$(qs_entries)
EOF_ENTRIES
    return 1
}

# Whether the comma-separated options $1 hold option $2 (alone or $2=...).
qs_has_option() {
    case ",$1," in
        *",$2,"* | *",$2="*) return 0 ;;
    esac
    return 1
}

# The value of option $2= in options $1, or $3.
qs_option_value() {
    local _o _IFS=$IFS
    IFS=,
    for _o in $1; do
        case $_o in
            "$2"=*)
                IFS=$_IFS
                echo "${_o#"$2"=}"
                return 0
                ;;
        esac
    done
    IFS=$_IFS
    echo "$3"
}

# The TAG=VALUE part of a location ("TAG=VALUE:/path", "/path:TAG=VALUE",
# "TAG=VALUE"), or nothing.
qs_location_tag() {
    local _tail _tag=''
    case $1 in
        UUID=* | LABEL=* | PARTUUID=* | PARTLABEL=*)
            echo "${1%%:/*}"
            return 0
            ;;
    esac
    # /path:TAG=VALUE: the last ':' followed by a tag starts it
    _tail=$1
    while :; do
        case $_tail in
            *:*) _tail=${_tail#*:} ;;
            *) break ;;
        esac
        case $_tail in
            UUID=* | LABEL=* | PARTUUID=* | PARTLABEL=*) _tag=$_tail ;;
        esac
    done
    [ -n "$_tag" ] && echo "$_tag"
    return 0
}

# The udev link of TAG=VALUE.
qs_tag_link() {
    local _v=${1#*=}
    case $1 in
        UUID=*) echo "/dev/disk/by-uuid/$_v" ;;
        LABEL=*) echo "/dev/disk/by-label/$(str_replace "$_v" ' ' '\x20')" ;;
        PARTUUID=*) echo "/dev/disk/by-partuuid/$_v" ;;
        PARTLABEL=*) echo "/dev/disk/by-partlabel/$(str_replace "$_v" ' ' '\x20')" ;;
    esac
}

# A udev match for the device holding location $1 (image or key file) of
# entry $2, or nothing (a file on a filesystem of the initramfs).
qs_udev_match() {
    local _tag _v
    _tag=$(qs_location_tag "$1")
    _v=${_tag#*=}
    case $_tag in
        UUID=*) printf 'ENV{ID_FS_UUID}=="%s"' "$_v" ;;
        LABEL=*) printf 'ENV{ID_FS_LABEL}=="%s"' "$(str_replace "$_v" ' ' '_')" ;;
        PARTUUID=*) printf 'ENV{ID_PART_ENTRY_UUID}=="%s"' "$_v" ;;
        PARTLABEL=*) printf 'ENV{ID_PART_ENTRY_NAME}=="%s"' "$_v" ;;
        *)
            case $1 in
                /dev/*) printf 'ENV{ID_QCOW2_QCOWTAB}=="%s|%s *|* %s|* %s *"' "$2" "$2" "$2" "$2" ;;
            esac
            ;;
    esac
}

# Whether the device holding location $1 is there (a key of "none" is).
qs_present() {
    local _tag
    case $1 in
        none | - | '') return 0 ;;
    esac
    _tag=$(qs_location_tag "$1")
    if [ -n "$_tag" ]; then
        [ -b "$(qs_tag_link "$_tag")" ]
        return
    fi
    case $1 in
        /dev/*) [ -b "$1" ] ;;
        *) return 0 ;;
    esac
}
