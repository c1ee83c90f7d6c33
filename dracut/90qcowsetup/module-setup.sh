#!/bin/bash
# dracut module 90qcowsetup: map qcow2 images with qcowsetup in the initramfs,
# those named on the kernel command line (rd.qcowsetup.*, see
# qcowsetup-dracut(7)) and the /etc/qcowtab entries marked x-initrd.attach,
# the root filesystem's among them. Modelled on 90crypt.
#
# Without systemd in the initramfs: parse-qcowsetup.sh (cmdline hook) writes
# udev rules that queue qcowsetup-ask for an entry when its devices appear;
# qcowsetup-ask asks the passphrase the dracut way (plymouth when it runs,
# else the console) and is idempotent. With systemd: qcowsetup-generator
# makes units of the same entries, which ask through systemd-ask-password.
#
# Read-write images (and compressed clusters) need the slow-path daemon
# qcowsetup-daemon and the nbd module: the daemon is installed beside
# qcowsetup, where qcowsetup looks for it first. It outlives the initramfs:
# nothing kills it before switch_root (dracut's shell init kills nothing;
# systemd spares processes whose argv[0] starts with '@', as the daemon's
# does; with systemd, qcowsetup-generator's units start it through
# systemd-run --scope, in a scope no unit stop reaches), and
# qcowsetup-pivot.sh (pre-pivot hook) keeps /dev, /proc and /sys in the
# emptied initramfs for it (its table reloads need them), lists its
# processes in /run/sendsigs.omit.d/ for sysvinit's shutdown and asks for
# the initramfs at shutdown (need_shutdown).
# qcowsetup-shutdown.sh (shutdown hook, before 90dm's) closes the mappings
# once the root is unmounted, when the system goes back to the initramfs to
# shut down.
#
# Entries with the clevis option: clevis, the pins their bindings use and
# what those run (curl for tang, tpm2-tools and the TPM drivers for tpm2;
# the network module for tang) are installed, and nothing of it otherwise.
#
# Environment (tests): QCOWSETUP_QCOWTAB, the qcowtab to take entries from
# (default $dracutsysrootdir/etc/qcowtab); QCOWSETUP_BINARY, a qcowsetup
# program to install as /usr/sbin/qcowsetup instead of the one in PATH;
# QCOWSETUP_DAEMON_BINARY, the daemon to install beside it (default: the
# qcowsetup-daemon beside QCOWSETUP_BINARY); QCOWSETUP_GENERATOR_BINARY, a
# qcowsetup-generator to install instead of the system's (with systemd).

_qcowtab() {
    echo "${QCOWSETUP_QCOWTAB:-$dracutsysrootdir/etc/qcowtab}"
}

# The lines of qcowtab marked x-initrd.attach; in hostonly mode also those
# whose mapping holds a filesystem the host needs (as 90crypt does for
# crypttab).
_qcowsetup_initrd_entries() {
    local _tab _name _image _key _options _dev
    _tab=$(_qcowtab)
    [[ -f $_tab ]] || return 0
    while read -r _name _image _key _options || [[ -n $_name ]]; do
        [[ -z $_name || $_name == \#* ]] && continue
        # fields copied as written (escaped): qcowtab(5) syntax, read by
        # qcowsetup and qcowsetup-lib.sh, never by a shell as code
        if [[ ,$_options, == *,x-initrd.attach,* ]]; then
            printf '%s %s %s %s\n' "$_name" "$_image" "${_key:-none}" "$_options"
            continue
        fi
        if [[ $hostonly ]] || [[ $mount_needs ]]; then
            # shellcheck disable=SC2154 # dracut's
            for _dev in "${!host_fs_types[@]}"; do
                if [[ /dev/mapper/$_name -ef $_dev ]]; then
                    printf '%s %s %s %s\n' "$_name" "$_image" "${_key:-none}" "${_options:+$_options,}x-initrd.attach"
                    break
                fi
            done
        fi
    done < "$_tab"
}

# The clevis pins the initrd entries with the clevis option need, one a
# line: those their images' bindings name (qcowsetup info --json, sss's
# pins included) when the image is a file the host can read now, else all
# the pins clevis has here. Nothing without such an entry.
_qcowsetup_clevis_pins() {
    local _name _image _key _options _pins _p
    while read -r _name _image _key _options; do
        [[ ,$_options, == *,clevis,* ]] || continue
        _pins=
        if [[ $_image == /* && -f $_image ]] && command -v jq > /dev/null; then
            _pins=$("${QCOWSETUP_BINARY:-qcowsetup}" info --json "$_image" 2> /dev/null |
                jq -r '.["backing-chain"][].encrypt.bindings[]? | .pin, (.config | fromjson? | .pins? // {} | keys[])')
        fi
        if [[ -z $_pins ]]; then
            for _p in /usr/bin/clevis-decrypt-*; do
                [[ -x $_p ]] && _pins+=" ${_p##*-}"
            done
        fi
        printf '%s\n' $_pins
    done <<< "$(_qcowsetup_initrd_entries)" | grep -vx null | sort -u
}

# The qcowsetup-daemon to install: QCOWSETUP_DAEMON_BINARY; else beside
# QCOWSETUP_BINARY; else where the installed qcowsetup $1 looks for it:
# beside itself, then its built-in $(pkglibexecdir) (PREFIX/libexec/qcowsetup
# for $1 in PREFIX/sbin; distributions' libexec directories).
_qcowsetup_daemon() {
    local _d
    if [[ $QCOWSETUP_DAEMON_BINARY ]]; then
        echo "$QCOWSETUP_DAEMON_BINARY"
        return 0
    fi
    if [[ $QCOWSETUP_BINARY ]]; then
        _d=${QCOWSETUP_BINARY%/*}/qcowsetup-daemon
        [[ -x $_d ]] && echo "$_d"
        return 0
    fi
    for _d in "${1%/*}" "${1%/*/*}/libexec/qcowsetup" /usr/libexec/qcowsetup /usr/lib/qcowsetup; do
        _d=$_d/qcowsetup-daemon
        if [[ -x $_d ]]; then
            echo "$_d"
            return 0
        fi
    done
}

# The files of the systemd credentials the entries on stdin load
# (load-credential=ID[:PATH], load-credential-encrypted=ID[:PATH]), one a
# line "STORE FILE": STORE credstore or credstore.encrypted, FILE the PATH,
# or the credential store file systemd looks in without one. With systemd in
# the initramfs the units load them from there; without, qcowsetup-ask does
# for the plain ones (qcowtab(5)).
_qcowsetup_credential_files() {
    local _name _image _key _options _o _id _path _store
    while read -r _name _image _key _options; do
        IFS=, read -ra _o <<< "$_options"
        for _o in "${_o[@]}"; do
            case $_o in
                load-credential=*) _store=credstore ;;
                load-credential-encrypted=*) _store=credstore.encrypted ;;
                *) continue ;;
            esac
            _id=${_o#*=}
            _path=
            [[ $_id == *:* ]] && _path=${_id#*:} _id=${_id%%:*}
            echo "$_store ${_path:-/etc/$_store/$_id}"
        done
    done
}

# called by dracut
check() {
    local _dev
    [[ $QCOWSETUP_BINARY ]] || require_binaries qcowsetup || return 1
    if [[ $hostonly ]] || [[ $mount_needs ]]; then
        [[ $(_qcowsetup_initrd_entries) ]] && return 0
        # shellcheck disable=SC2154
        for _dev in "${!host_fs_types[@]}"; do
            [[ $(dmsetup info -c --noheadings -o uuid "$_dev" 2> /dev/null) == QCOW2-* ]] && return 0
        done
        return 255
    fi
    return 0
}

# called by dracut
depends() {
    echo dm rootfs-block
    # a tang binding is decrypted over the network: dracut's network
    # module when it is there (Debian: dracut-network), else the initramfs
    # has only what rd.neednet or another module brings up
    if _qcowsetup_clevis_pins | grep -qx tang; then
        if compgen -G "${dracutbasedir:-/usr/lib/dracut}/modules.d/[0-9][0-9]network" > /dev/null; then
            echo network
        else
            dwarn "qcowsetup: a tang binding needs the network in the initramfs, and dracut has no network module here"
        fi
    fi
    return 0
}

# called by dracut
installkernel() {
    local _name _rest _cipher
    # nbd: the slow path of read-write mappings (qcowsetup-daemon)
    hostonly='' instmods dm_mod dm_crypt dm_zero dm_switch loop nbd
    if [[ $hostonly ]]; then
        # the ciphers of the images mapped now, as 90crypt
        dmsetup table --target crypt 2> /dev/null | while read -r _name _ _ _ _cipher _rest; do
            [[ $(dmsetup info -c --noheadings -o uuid "${_name%:}" 2> /dev/null) == QCOW2-* ]] || continue
            IFS='-:' read -ra _mods <<< "$_cipher"
            hostonly='' instmods "${_mods[@]/#/crypto-}" "crypto-$_cipher"
        done
        # what qemu-img uses for LUKS images by default, and legacy AES
        hostonly='' instmods crypto-aes crypto-xts crypto-cbc crypto-plain64 crypto-sha256
    else
        instmods "=crypto"
    fi
    # the TPM for tpm2 bindings
    _qcowsetup_clevis_pins | grep -qx tpm2 && hostonly='' instmods tpm_tis tpm_crb
    return 0
}

# clevis, its decrypt side for the pins needed, and their tools, only when
# an entry asks for its bindings (the clevis option).
_qcowsetup_install_clevis() {
    local _pins _p
    _pins=$(_qcowsetup_clevis_pins)
    [[ $_pins ]] || return 0
    if ! require_binaries clevis clevis-decrypt jose; then
        dwarn "qcowsetup: an entry has the clevis option but clevis is not installed: it will ask for a passphrase"
        return 0
    fi
    inst_multiple clevis clevis-decrypt jose
    for _p in $_pins; do
        inst_multiple -o "clevis-decrypt-$_p"
        case $_p in
            tang) inst_multiple -o curl ;;
            tpm2)
                inst_multiple -o tpm2_createprimary tpm2_flushcontext tpm2_load tpm2_unseal cat mktemp
                # tpm2-tools load their TPM transport at run time
                inst_libdir_file "libtss2-tcti-device.so*"
                ;;
        esac
    done
}

# called by dracut
install() {
    local _entries _bin _daemon _cred _store
    if [[ $QCOWSETUP_BINARY ]]; then
        _bin=/usr/sbin/qcowsetup
        inst_binary "$QCOWSETUP_BINARY" "$_bin"
    else
        _bin=$(find_binary qcowsetup)
        inst_multiple qcowsetup
    fi
    # beside qcowsetup: where it looks for the daemon first
    _daemon=$(_qcowsetup_daemon "$_bin")
    if [[ $_daemon ]]; then
        inst_binary "$_daemon" "${_bin%/*}/qcowsetup-daemon"
    else
        dwarn "qcowsetup: no qcowsetup-daemon found: read-write images cannot be mapped in the initramfs"
    fi
    inst_multiple -o flock rmdir
    inst_hook cmdline 30 "$moddir/parse-qcowsetup.sh"
    inst_hook pre-pivot 90 "$moddir/qcowsetup-pivot.sh"
    inst_hook shutdown 20 "$moddir/qcowsetup-shutdown.sh"
    inst_simple "$moddir/qcowsetup-lib.sh" /lib/qcowsetup-lib.sh
    # recognition of qcow2 on block devices, hiding of the internal layers
    inst_rules 60-qcowsetup.rules 11-dm-qcowsetup.rules 56-dm-qcowsetup.rules

    if dracut_module_included "systemd"; then
        [[ $QCOWSETUP_GENERATOR_BINARY ]] &&
            inst_binary "$QCOWSETUP_GENERATOR_BINARY" "$systemdutildir"/system-generators/qcowsetup-generator
        inst_multiple -o \
            "$systemdutildir"/system-generators/qcowsetup-generator \
            "$systemdsystemunitdir"/systemd-ask-password-console.path \
            "$systemdsystemunitdir"/systemd-ask-password-console.service \
            "$systemdsystemunitdir"/cryptsetup.target \
            "$systemdsystemunitdir"/cryptsetup-pre.target \
            "$systemdsystemunitdir"/sysinit.target.wants/cryptsetup.target \
            systemd-ask-password systemd-tty-ask-password-agent systemd-run
    else
        inst_script "$moddir/qcowsetup-ask.sh" /sbin/qcowsetup-ask
    fi

    _qcowsetup_install_clevis

    _entries=$(_qcowsetup_initrd_entries)
    if [[ $_entries ]]; then
        printf '%s\n' "$_entries" > "$initdir/etc/qcowtab"
        chmod 0644 "$initdir/etc/qcowtab"
        [[ $hostonly ]] && mark_hostonly /etc/qcowtab
        while read -r _store _cred; do
            if [[ $_store == credstore.encrypted ]] && ! dracut_module_included "systemd"; then
                dwarn "qcowsetup: $_cred: encrypted credentials need systemd in the initramfs; the entry will ask instead"
            elif [[ -f $dracutsysrootdir$_cred ]]; then
                inst_simple "$dracutsysrootdir$_cred" "$_cred"
                [[ $hostonly ]] && mark_hostonly "$_cred"
            else
                dwarn "qcowsetup: no credential $_cred to put into the initramfs"
            fi
        done < <(printf '%s\n' "$_entries" | _qcowsetup_credential_files)
    fi
    dracut_need_initqueue
}
