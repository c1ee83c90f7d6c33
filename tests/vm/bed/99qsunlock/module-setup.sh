#!/bin/bash
# Test-only dracut module of tests/vm/test-boot-unlock.sh (never installed):
# the key sources that a real system has outside the initramfs, put inside
# it so that the boots need nothing beyond the VM. Its directory, as the test
# copies it beside its data (tests/vm/bed/build-dracut.sh,
# QS_DRACUT_TEST_MODULE), holds data/: tang/ (the tang server's keys),
# pass (the passphrase) and key-server (tests/vm/prog/key-server).
# qsunlock-start.sh (cmdline hook, before 90qcowsetup's) brings up the
# loopback and, as the kernel command line asks, starts them:
#   qstest.tang=1       tangd behind socat on 127.0.0.1:qstest.tang.port=
#   qstest.keyserver=1  key-server on /run/qstest/key.sock, answering the
#                       volume qstest.keyserver.name= with the passphrase

# called by dracut
check() {
    return 255
}

# called by dracut
depends() {
    return 0
}

# called by dracut
install() {
    inst_multiple ip socat /usr/libexec/tangd
    inst_binary "$moddir/data/key-server" /usr/bin/qstest-key-server
    inst_simple "$moddir/data/pass" /etc/qstest/pass
    local _k
    for _k in "$moddir"/data/tang/*.jwk; do
        inst_simple "$_k" "/etc/qstest/tang/${_k##*/}"
    done
    inst_hook cmdline 20 "$moddir/qsunlock-start.sh"
}
