#!/bin/bash
# Install what building and testing qcowsetup needs on Debian 12 (when
# missing and we are root), then configure and build in the source tree.
# Used by the README's two quick-start commands.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

PKGS="build-essential autoconf automake libtool pkg-config
libdevmapper-dev libcryptsetup-dev libblkid-dev libssl-dev zlib1g-dev libzstd-dev
qemu-utils qemu-system-x86 linux-image-amd64 busybox-static dmsetup cryptsetup-bin
keyutils e2fsprogs fio python3 jq valgrind clang time
dracut-core systemd udev asciidoctor man-db bash-completion
clevis clevis-tpm2 tang swtpm swtpm-tools tpm2-tools jose socat curl"

missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "setup: missing packages:$missing (run as root to install them)" >&2
		exit 1
	fi
	echo "setup: installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x configure ] || [ configure.ac -nt configure ]; then
	autoreconf -fi >/dev/null
fi
if [ ! -f Makefile ] || [ configure -nt Makefile ]; then
	./configure --enable-werror >/dev/null
fi
make -j"$(nproc)" >/dev/null
