#!/bin/sh
# cmdline hook of the test-only module 99qsunlock (module-setup.sh): the
# loopback up, then tangd and the key server when the command line asks.

ip link set lo up

if getargbool 0 qstest.tang; then
    _qst_port=$(getarg qstest.tang.port=)
    info "qstest: tangd on 127.0.0.1:${_qst_port}"
    socat "TCP-LISTEN:${_qst_port},bind=127.0.0.1,reuseaddr,fork" \
        EXEC:"/usr/libexec/tangd /etc/qstest/tang" < /dev/null > /dev/null 2>&1 &
fi

if getargbool 0 qstest.keyserver; then
    mkdir -p /run/qstest
    info "qstest: key server on /run/qstest/key.sock"
    qstest-key-server /run/qstest/key.sock /run/qstest/key-server.log \
        "$(getarg qstest.keyserver.name=)=/etc/qstest/pass" < /dev/null > /dev/null 2>&1 &
fi
