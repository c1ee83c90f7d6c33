#!/bin/bash
# The main job on a generated sample: an encrypted (LUKS) qcow2 made by
# qemu-img, inspected by qcowsetup: info, map, the dm tables `open` loads,
# and the refcount check. (Mapping it under /dev/mapper comes with the
# read-only mapping work; see README.md.)
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${QS_NO_SETUP:-}" ] || "$top/tools/setup.sh"
qs="$top/qcowsetup"
work=$(mktemp -d /tmp/qcowsetup-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

secret=(--object secret,id=s0,file="$work/pass")
printf 'demo passphrase' > pass
for i in 1 2 3 4 5; do
	# qemu-img 7.2 sometimes fails with "Unable to get accurate CPU usage"
	qemu-img create -q -f qcow2 "${secret[@]}" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100 vm1.qcow2 256M && break
	sleep 1
done
qemu-io "${secret[@]}" --image-opts driver=qcow2,file.filename=vm1.qcow2,encrypt.key-secret=s0 \
	-c 'write -P 0x5a 0 4M' -c 'write -z 8M 1M' -c 'write -P 0x33 100M 64k' >/dev/null

run() { echo; echo "\$ $*"; "$@"; }
run "$qs" info vm1.qcow2
run "$qs" map --json vm1.qcow2
run "$qs" table vm1.qcow2 vm1
run "$qs" check vm1.qcow2
