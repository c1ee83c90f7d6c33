#!/bin/bash
# The images of test-scale.sh and bench-scale.sh, into DIR: key, luks.qcow2
# (LUKS, cheap PBKDF) and plain.qcow2, 64 MiB, empty; the guest copies them.
#   tests/vm/gen-scale.sh DIR
set -eu
cd "$1"
printf 'scale passphrase' >key
# (PBKDF timing fails now and then on a loaded machine: "Unable to get accurate CPU usage")
for try in 1 2 3 4 5 6; do
	qemu-img create -q -f qcow2 --object secret,id=s0,file=key \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 luks.qcow2 64M 2>/dev/null && break
	[ $try = 6 ] && { echo "gen-scale: cannot create a LUKS image" >&2; exit 1; }
done
qemu-img create -q -f qcow2 plain.qcow2 64M
