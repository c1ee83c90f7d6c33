#!/bin/bash
# Automake test: key files that are AF_UNIX sockets, on the host (no root):
# qcowsetup connects to the socket a key server (tests/vm/prog/key-server)
# listens on, from a socket bound to the abstract name
# "\0RANDOM/cryptsetup/VOLUME" as systemd-cryptsetup does for crypttab(5);
# the server sees VOLUME with getpeername(2) and sends that volume's key.
# --keyfile-offset/--keyfile-size apply; a socket path longer than
# sockaddr_un holds works; a server that sends nothing is no passphrase
# (exit 2); a socket nobody listens on is an error. (open --tab with a
# socket, a credential directory and headless=: tests/vm/guest/tab.sh.)
# Exit 0 pass, 1 fail, 99 not built.
me=test-keysrc
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"
export LC_ALL=C
need_qcowsetup
server=${KEY_SERVER:-$builddir/tests/vm/prog/key-server}
need_built "$server"
make_work
cd "$work" || hard_error "cannot enter $work"

printf 'secret-key' > k
printf 'XYZsecret-keyTAIL' > k-offset
printf 'wrong' > k-wrong
chmod 600 k k-offset k-wrong
"$QCOWSETUP" format --key-file k --iter-time 10 a.qcow2 1M >/dev/null 2>&1 || hard_error "cannot format a.qcow2"
cp a.qcow2 b.qcow2

# start_server DIR VOLUME=KEYFILE...: a server on DIR/key.sock (bound from
# DIR: its path may be longer than sockaddr_un holds); $spid; ready once the
# socket exists
start_server() {
	local dir=$1 i
	shift
	(cd "$dir" && exec "$server" key.sock "$work/peers" "$@") &
	spid=$!
	for ((i = 0; i < 100; i++)); do [ -S "$dir/key.sock" ] && return 0; sleep 0.05; done
	hard_error "the key server did not start"
}
stop_server() { kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; }
trap 'stop_server; work_cleanup' EXIT

start_server "$work" a.qcow2="$work/k-offset" b.qcow2="$work/k"
"$QCOWSETUP" add-key --key-file "$work/key.sock" --keyfile-offset 3 --keyfile-size 10 --iter-time 10 a.qcow2 k-wrong \
	>out 2>err
rc=$?
check "a socket key file unlocks (add-key; --keyfile-offset 3 --keyfile-size 10 of what the server sends)" test "$rc" = 0
check "the server saw \\0RANDOM/cryptsetup/VOLUME (VOLUME the image's name), RANDOM 16 hex digits" \
	grep -Eqx 'peer @[0-9a-f]{16}/cryptsetup/a\.qcow2: sent 17' peers
"$QCOWSETUP" add-key --key-file "$work/key.sock" --iter-time 10 b.qcow2 k-wrong >out 2>err
check "one server, one key per volume (b.qcow2 gets its own)" eval "[ $? = 0 ] && grep -Eqx 'peer @[0-9a-f]{16}/cryptsetup/b\.qcow2: sent 10' peers"
check "each connection has its own random name" test "$(cut -d/ -f1 peers | sort -u | wc -l)" = 2
cp a.qcow2 c.qcow2
"$QCOWSETUP" remove-key --key-file "$work/key.sock" c.qcow2 >out 2>err
rc=$?
check "a volume the server does not know gets nothing: no passphrase, exit 2" \
	eval "[ $rc = 2 ] && grep -q 'Nothing to read' err && grep -Eqx 'peer @[0-9a-f]{16}/cryptsetup/c\.qcow2: refused' peers"
stop_server

deep=$work/$(printf 'd%.0s' $(seq 60))/$(printf 'e%.0s' $(seq 60))
mkdir -p "$deep"
start_server "$deep" b.qcow2="$work/k"
len=$(printf %s "$deep/key.sock" | wc -c)
"$QCOWSETUP" remove-key --key-file "$deep/key.sock" b.qcow2 >out 2>err
rc=$?
check "a socket path longer than sockaddr_un holds ($len bytes): remove-key by the key it sends" \
	eval "[ $rc = 0 ] && [ \$(grep -c 'cryptsetup/b.qcow2: sent' peers) = 2 ]"
# a server that died: its socket stays, nobody listens
{ kill -9 "$spid"; wait "$spid"; } 2>/dev/null

"$QCOWSETUP" add-key --key-file "$deep/key.sock" --iter-time 10 b.qcow2 k-wrong >out 2>err
rc=$?
check "a socket nobody listens on: an error, said so (exit $rc)" \
	eval "[ $rc != 0 ] && [ -S '$deep/key.sock' ] && grep -q 'Cannot connect to the key socket' err"
summary
