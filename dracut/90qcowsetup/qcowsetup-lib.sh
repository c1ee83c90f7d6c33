#!/bin/sh
# Shell helpers of dracut's 90qcowsetup module (installed as
# /lib/qcowsetup-lib.sh). POSIX sh; needs dracut-lib.sh's getcmdline.
#
# Entries are lines "name image key options" whose fields are written as
# qcowtab writes them: blanks, backslashes and newlines as \NNN octal escapes
# (qcowtab(5)), so that a field is one word of a line. A field's value
# reaches a udev rule, a hook script or a test only through the helpers
# below: qs_unescape decodes it, qs_shell_quote quotes it for sh,
# qs_udev_glob makes a udev match of it, qs_udev_encode a udev link name.
# Names are checked with qs_valid_name: only [A-Za-z0-9._+-] go anywhere.

command -v getcmdline > /dev/null || . /lib/dracut-lib.sh

# a blank: space, tab, newline (the kernel command line's separators)
_qs_blanks=' 	
'
_qs_alnum=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789

# Whether $1 can name an entry: letters, digits and . _ + -, at most 100,
# not . or .. (as qcowsetup's qcowtab_valid_name).
qs_valid_name() {
    case $1 in
        '' | . | .. | *[!"$_qs_alnum"._+-]*) return 1 ;;
    esac
    [ ${#1} -le 100 ]
}

# qcowtab's \NNN octal escapes of $1 decoded, into qs_ret (a variable, not
# output: a decoded newline at the end would be lost by $(...)). \000 and
# values over \377 stay as written, as qcowsetup reads them.
qs_unescape() {
    local _s="$1" _d _c
    qs_ret=''
    while :; do
        case $_s in
            *\\*) ;;
            *) break ;;
        esac
        qs_ret=$qs_ret${_s%%\\*}
        _s=${_s#*\\}
        case $_s in
            [0-3][0-7][0-7]*)
                _d=${_s%"${_s#???}"}
                if [ "$_d" != 000 ]; then
                    # printf's own \NNN; the dot keeps a trailing newline
                    # shellcheck disable=SC2059 # the format is the escape
                    _c=$(printf "\\$_d.")
                    qs_ret=$qs_ret${_c%.}
                    _s=${_s#???}
                    continue
                fi
                ;;
        esac
        qs_ret=$qs_ret\\
    done
    qs_ret=$qs_ret$_s
}

# $1 in single quotes for sh ('\'' for a quote): a word that a generated
# script reads back as $1 whatever it holds.
qs_shell_quote() {
    local _s="$1" _o=''
    while :; do
        case $_s in
            *\'*)
                _o="$_o${_s%%\'*}'\\''"
                _s=${_s#*\'}
                ;;
            *) break ;;
        esac
    done
    printf "'%s'" "$_o$_s"
}

# A udev match pattern for the value $1 (decoded): its letters, digits and
# # + , . / : = @ _ - as they are, every run of other characters (blanks,
# quotes, backslashes, glob characters, '|', '%', '$', non-ASCII) as '*'.
# The pattern matches more than $1, never less: it only queues
# qcowsetup-ask, which checks the device itself.
qs_udev_glob() {
    local _s="$1" _o='' _c
    while [ -n "$_s" ]; do
        _c=${_s%"${_s#?}"}
        _s=${_s#?}
        case $_c in
            ["$_qs_alnum"#+,./:=@_-]) _o=$_o$_c ;;
            *)
                case $_o in
                    *\*) ;;
                    *) _o="$_o*" ;;
                esac
                ;;
        esac
    done
    case $_o in
        '' | \*) _o='?*' ;;
    esac
    printf '%s' "$_o"
}

# udev's (libblkid's) encoding of $1 (decoded) in link names
# (/dev/disk/by-label/...): ASCII outside [0-9A-Za-z#+-.:=@_] as \xNN,
# other characters (UTF-8) as they are. Into qs_ret.
qs_udev_encode() {
    local _s="$1" _c _n
    qs_ret=''
    while [ -n "$_s" ]; do
        _c=${_s%"${_s#?}"}
        _s=${_s#?}
        case $_c in
            ["$_qs_alnum"#+.:=@_-]) qs_ret=$qs_ret$_c ;;
            *)
                _n=$(printf '%d' "'$_c")
                if [ "$_n" -ge 0 ] && [ "$_n" -lt 128 ]; then
                    qs_ret=$qs_ret$(printf '\\x%02x' "$_n")
                else
                    qs_ret=$qs_ret$_c
                fi
                ;;
        esac
    done
}

# The words of the kernel command line $1 that start with rd.qcowsetup.,
# one a line, as qcowsetup reads them: double quotes removed (the blanks
# they hold stay in the word), blanks, newlines and backslashes written as
# \NNN escapes.
_qs_cmdline_words() {
    local _s="$1" _w='' _started='' _quoted='' _chunk _c
    while [ -n "$_s" ]; do
        # the text up to the next quote or blank, at once
        # shellcheck disable=SC2295 # blanks in a bracket, on purpose
        _chunk=${_s%%[\"$_qs_blanks]*}
        if [ -n "$_chunk" ]; then
            _s=${_s#"$_chunk"}
            while :; do
                case $_chunk in
                    *\\*) ;;
                    *) break ;;
                esac
                _w="$_w${_chunk%%\\*}\\134"
                _chunk=${_chunk#*\\}
            done
            _w=$_w$_chunk
            _started=1
            continue
        fi
        _c=${_s%"${_s#?}"}
        _s=${_s#?}
        if [ "$_c" = '"' ]; then
            _started=1
            if [ -n "$_quoted" ]; then _quoted=''; else _quoted=1; fi
        elif [ -n "$_quoted" ]; then
            case $_c in
                ' ') _w="$_w\\040" ;;
                '	') _w="$_w\\011" ;;
                *) _w="$_w\\012" ;;
            esac
        else
            case $_w in
                rd.qcowsetup.*) printf '%s\n' "$_w" ;;
            esac
            _w='' _started=''
        fi
    done
    if [ -n "$_started" ]; then
        case $_w in
            rd.qcowsetup.*) printf '%s\n' "$_w" ;;
        esac
    fi
    return 0
}

# The $1-th non-empty line of $2, or failure.
_qs_nth() {
    local _n="$1" _l
    while read -r _l; do
        [ -n "$_l" ] || continue
        _n=$((_n - 1))
        if [ "$_n" = 0 ]; then
            printf '%s' "$_l"
            return 0
        fi
    done << EOF
$2
EOF
    return 1
}

# The entries of the initramfs, one a line: "name image key options" --
# /etc/qcowtab then the rd.qcowsetup.* options of the kernel command line
# (the N-th name, key and options go with the N-th image, at most 64 images;
# see qcowsetup-dracut(7)). qcowsetup itself reads the same two sources.
# Fields stay escaped; names are not checked here (qs_valid_name).
qs_entries() {
    local _i _w _img _name _key _opt _imgs='' _names='' _keys='' _opts=''
    if [ -f /etc/qcowtab ]; then
        while read -r _name _img _key _opt || [ -n "$_name" ]; do
            [ -z "$_name" ] || [ "${_name#\#}" != "$_name" ] && continue
            printf '%s %s %s %s\n' "$_name" "$_img" "${_key:-none}" "$_opt"
        done < /etc/qcowtab
    fi
    while read -r _w; do
        case $_w in
            rd.qcowsetup.image=?*) _imgs="$_imgs${_w#rd.qcowsetup.image=}
" ;;
            rd.qcowsetup.name=?*) _names="$_names${_w#rd.qcowsetup.name=}
" ;;
            rd.qcowsetup.key=?*) _keys="$_keys${_w#rd.qcowsetup.key=}
" ;;
            rd.qcowsetup.options=?*) _opts="$_opts${_w#rd.qcowsetup.options=}
" ;;
        esac
    done << EOF
$(_qs_cmdline_words "$(getcmdline)")
EOF
    _i=0
    while [ $_i -lt 64 ]; do
        _i=$((_i + 1))
        _img=$(_qs_nth $_i "$_imgs") || break
        _name=$(_qs_nth $_i "$_names") || _name=qcow-$_i
        _key=$(_qs_nth $_i "$_keys") || _key=none
        _opt=$(_qs_nth $_i "$_opts") || _opt=
        printf '%s %s %s %s\n' "$_name" "$_img" "$_key" "${_opt:+$_opt,}x-initrd.attach"
    done
}

# The entry called $1: sets qs_name qs_image qs_key qs_options (escaped as
# in qcowtab). Fails for a name qs_valid_name refuses.
qs_entry() {
    local _n _i _k _o
    qs_name='' qs_image='' qs_key='' qs_options=''
    qs_valid_name "$1" || return 1
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
    local _o _IFS="$IFS" _glob=+f _v="$3"
    case $- in
        *f*) _glob=-f ;;
    esac
    IFS=,
    set -f
    for _o in $1; do
        case $_o in
            "$2"=*)
                _v=${_o#"$2"=}
                break
                ;;
        esac
    done
    IFS=$_IFS
    set $_glob
    printf '%s\n' "$_v"
}

# Without systemd in the initramfs, what its LoadCredential= does for the
# units: the credential file of each entry named in $2... with
# load-credential=ID[:PATH] (PATH, else ID in systemd's credential stores)
# copied to the directory $1 (made, 0700) as ID, for qcowsetup to read as
# $CREDENTIALS_DIRECTORY/ID. load-credential-encrypted= needs systemd-creds
# and systemd: not done here (the entry asks). Fails when nothing was loaded.
qs_load_credentials() {
    local _dir="$1" _n _id _path _d _loaded=1
    shift
    for _n in "$@"; do
        qs_entry "$_n" || continue
        _id=$(qs_option_value "$qs_options" load-credential '')
        [ -n "$_id" ] || continue
        _path=''
        case $_id in
            *:*) _path=${_id#*:} _id=${_id%%:*} ;;
        esac
        if [ -z "$_path" ]; then
            for _d in /etc/credstore /run/credstore /usr/local/lib/credstore /usr/lib/credstore; do
                [ -f "$_d/$_id" ] && _path=$_d/$_id && break
            done
        fi
        if [ -z "$_path" ] || [ ! -f "$_path" ]; then
            warn "qcowsetup: $_n: no credential $_id (${_path:-in no credential store})"
            continue
        fi
        (umask 077 && mkdir -p "$_dir" && cp "$_path" "$_dir/$_id") || continue
        _loaded=0
    done
    return $_loaded
}

# The TAG=VALUE part of a location ("TAG=VALUE:/path", "/path:TAG=VALUE",
# "TAG=VALUE"), still escaped, or nothing.
qs_location_tag() {
    local _tail _tag=''
    case $1 in
        UUID=* | LABEL=* | PARTUUID=* | PARTLABEL=*)
            printf '%s\n' "${1%%:/*}"
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
    [ -n "$_tag" ] && printf '%s\n' "$_tag"
    return 0
}

# The udev link of TAG=VALUE (escaped), into qs_ret.
qs_tag_link() {
    qs_unescape "${1#*=}"
    case $1 in
        UUID=*)
            qs_udev_encode "$qs_ret"
            qs_ret=/dev/disk/by-uuid/$qs_ret
            ;;
        LABEL=*)
            qs_udev_encode "$qs_ret"
            qs_ret=/dev/disk/by-label/$qs_ret
            ;;
        PARTUUID=*)
            qs_udev_encode "$qs_ret"
            qs_ret=/dev/disk/by-partuuid/$qs_ret
            ;;
        PARTLABEL=*)
            qs_udev_encode "$qs_ret"
            qs_ret=/dev/disk/by-partlabel/$qs_ret
            ;;
        *) qs_ret='' ;;
    esac
}

# A udev match for the device holding location $1 (image or key file,
# escaped) of entry $2 (a valid name), or nothing (a file on a filesystem of
# the initramfs). Only what qs_udev_glob lets through reaches the rule.
qs_udev_match() {
    local _tag _v
    _tag=$(qs_location_tag "$1")
    qs_unescape "${_tag#*=}"
    _v=$qs_ret
    case $_tag in
        UUID=*) printf 'ENV{ID_FS_UUID}=="%s"' "$(qs_udev_glob "$_v")" ;;
        LABEL=*) printf 'ENV{ID_FS_LABEL}=="%s"' "$(qs_udev_glob "$_v")" ;;
        PARTUUID=*) printf 'ENV{ID_PART_ENTRY_UUID}=="%s"' "$(qs_udev_glob "$_v")" ;;
        PARTLABEL=*) printf 'ENV{ID_PART_ENTRY_NAME}=="%s"' "$(qs_udev_glob "$_v")" ;;
        *)
            qs_valid_name "$2" || return 0
            case $1 in
                /dev/*) printf 'ENV{ID_QCOW2_QCOWTAB}=="%s|%s *|* %s|* %s *"' "$2" "$2" "$2" "$2" ;;
            esac
            ;;
    esac
}

# Whether the device holding location $1 (escaped) is there (a key of
# "none" is).
qs_present() {
    local _tag
    case $1 in
        none | - | '') return 0 ;;
    esac
    _tag=$(qs_location_tag "$1")
    if [ -n "$_tag" ]; then
        qs_tag_link "$_tag"
        [ -b "$qs_ret" ]
        return
    fi
    case $1 in
        /dev/*)
            qs_unescape "$1"
            [ -b "$qs_ret" ]
            ;;
        *) return 0 ;;
    esac
}
