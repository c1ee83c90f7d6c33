#!/bin/bash
# Automake test: the Debian package (debian/). Behind QS_DEB=1: the build
# alone takes 4 to 7 minutes on two busy cores, the whole test 5 to 11.
# Builds the packages once with `dpkg-buildpackage -b` from a copy of the
# tree's files (git ls-files: a clean build, the tree untouched), then checks:
#   - each package's file list (the list below; udev rules and the systemd
#     generator where this release's udev and systemd keep theirs);
#   - qcowsetup's Depends come from the shared libraries it links;
#   - lintian: no error and no warning;
#   - in the VM (tests/vm/guest/deb.sh; dpkg put into the test bed's
#     initramfs, which holds no other qcowsetup): both packages install,
#     the installed qcowsetup maps a LUKS image read-write through the
#     installed daemon, and purging them leaves no file behind.
# Exit: 0 pass, 1 fail, 77 skip (QS_DEB unset, no debian/, no
# dpkg-buildpackage, missing build dependencies), 99 error.
set -eu
me=test-deb
. "$(cd "$(dirname "$0")/.." && pwd)/lib.sh"

[ "${QS_DEB:-0}" != 0 ] || skip_test "the package build takes minutes: QS_DEB=1 runs this test"
[ -d "$top/debian" ] || skip_test "no debian/ (a dist tarball: the packaging lives in the git tree)"
need dpkg-buildpackage dpkg-deb git
git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1 || skip_test "$top is not a git checkout"
deps=$(cd "$top" && dpkg-checkbuilddeps 2>&1) || skip_test "$deps"

make_work --keep-on-failure
check_log=$work/check.log

# ---- the build, once, from the tree's files (tracked, and new ones not ignored)
mkdir "$work/src"
(cd "$top" && git ls-files -z -c -o --exclude-standard |
	while IFS= read -r -d '' f; do [ ! -e "$f" ] && [ ! -L "$f" ] || printf '%s\0' "$f"; done |
	xargs -0 cp -P --parents -t "$work/src")
t0=$EPOCHREALTIME
# (nocheck: make check runs the unit tests already)
if ! (cd "$work/src" && DEB_BUILD_OPTIONS="nocheck parallel=$(nproc)" \
	dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1; then
	tail -30 "$work/build.log"
	fail "dpkg-buildpackage -b"
	summary "$me"
	exit 1
fi
echo "$me: dpkg-buildpackage -b: $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')s"
version=$(cd "$work/src" && dpkg-parsechangelog -S Version)
arch=$(dpkg --print-architecture)
deb=$work/qcowsetup_${version}_$arch.deb
deb_dracut=$work/qcowsetup-dracut_${version}_all.deb
pass "dpkg-buildpackage -b builds qcowsetup and qcowsetup-dracut"

# ---- file lists: every file and link (not the folders)
# (as debian/rules finds them)
udevdir=$(pkg-config --variable=udevdir udev 2>/dev/null || :)
gendir=$(pkg-config --variable=systemdsystemgeneratordir systemd 2>/dev/null || :)
udevdir=${udevdir:-/usr/lib/udev} gendir=${gendir:-/usr/lib/systemd/system-generators}
files_of() { dpkg-deb --fsys-tarfile "$1" | tar -t | grep -v '/$' | sed 's|^\./|/|' | LC_ALL=C sort; }
LC_ALL=C sort >"$work/qcowsetup.files" <<EOF
$udevdir/rules.d/56-dm-qcowsetup.rules
$udevdir/rules.d/60-qcowsetup.rules
$gendir/qcowsetup-generator
/usr/libexec/qcowsetup/qcowsetup-daemon
/usr/sbin/qcowsetup
/usr/share/bash-completion/completions/qcowsetup
/usr/share/doc/qcowsetup/changelog.gz
/usr/share/doc/qcowsetup/copyright
/usr/share/man/man5/qcowtab.5.gz
/usr/share/man/man8/qcowsetup-keys.8.gz
/usr/share/man/man8/qcowsetup.8.gz
EOF
LC_ALL=C sort >"$work/qcowsetup-dracut.files" <<EOF
/usr/lib/dracut/modules.d/90qcowsetup/module-setup.sh
/usr/lib/dracut/modules.d/90qcowsetup/parse-qcowsetup.sh
/usr/lib/dracut/modules.d/90qcowsetup/qcowsetup-ask.sh
/usr/lib/dracut/modules.d/90qcowsetup/qcowsetup-lib.sh
/usr/lib/dracut/modules.d/90qcowsetup/qcowsetup-pivot.sh
/usr/lib/dracut/modules.d/90qcowsetup/qcowsetup-shutdown.sh
/usr/share/doc/qcowsetup-dracut/changelog.gz
/usr/share/doc/qcowsetup-dracut/copyright
/usr/share/lintian/overrides/qcowsetup-dracut
/usr/share/man/man7/qcowsetup-dracut.7.gz
EOF
check "qcowsetup's files: the command, the daemon, udev rules, generator, man pages, completion" \
	diff -u "$work/qcowsetup.files" <(files_of "$deb")
check "qcowsetup-dracut's files: the dracut module and its man page" \
	diff -u "$work/qcowsetup-dracut.files" <(files_of "$deb_dracut")

# ---- what the command looks for where
mkdir "$work/x"
dpkg-deb -x "$deb" "$work/x"
# (the VM case below runs it: the daemon it starts is the package's)
check "qcowsetup looks for its daemon where the package puts it (/usr/libexec/qcowsetup)" \
	grep -qaF /usr/libexec/qcowsetup/ "$work/x/usr/sbin/qcowsetup"
check "the udev rules and the generator run /usr/sbin/qcowsetup" \
	grep -qF /usr/sbin/qcowsetup "$work/x$udevdir/rules.d/60-qcowsetup.rules" "$work/x$gendir/qcowsetup-generator"
depends=$(dpkg-deb -f "$deb" Depends)
shlibs_depends() {
	local lib
	for lib in libcryptsetup12 libdevmapper1.02.1 libblkid1 libssl3 libzstd1 zlib1g libc6; do
		[[ ", $depends" == *", $lib "* ]] || { echo "Depends: $depends: no $lib"; return 1; }
	done
}
check "qcowsetup's Depends from shlibs (libcryptsetup, libdevmapper, libblkid, OpenSSL, zstd, zlib, libc)" shlibs_depends

not() { ! "$@"; }

# ---- lintian (as Debian's archive runs it, and the pedantic tags)
if command -v lintian >/dev/null; then
	lintian -EI --pedantic "$work/qcowsetup_${version}_$arch.changes" >"$work/lintian.log" 2>&1 || :
	sed 's/^/    | /' "$work/lintian.log"
	check "lintian: no error, no warning" not grep -q '^[EW]: ' "$work/lintian.log"
else
	skipped "lintian (not installed)"
fi

# ---- install, use and purge in the VM
name="in the VM: dpkg -i, the installed command and daemon map an image read-write, dpkg --purge leaves nothing"
if ! command -v "${QEMU:-qemu-system-x86_64}" >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
	skipped "$name (no QEMU system emulator or no kernel in /boot)"
	summary "$me"
	exit
fi
need qemu-img mkfs.ext4
share=$work/share
mkdir "$share" "$work/d"
cp "$deb" "$deb_dracut" "$work/qcowsetup.files" "$share/"
guest_script deb "$share"
# a LUKS qcow2 image on an ext4 disk, as test-rw.sh makes them
printf 'correct horse' >"$work/d/pass.key"
retry 5 qemu-img create -q -f qcow2 --object secret,id=s0,file="$work/d/pass.key" \
	-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
	"$work/d/luks.qcow2" 16M || hard_error "qemu-img create failed"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$work/d" "$work/disk.img" 64M
# dpkg (GNU tar for dpkg-deb), and the libraries of the package's programs: the initramfs gets
# them, not the programs (the package brings those)
extras=()
for f in /usr/bin/dpkg /usr/bin/dpkg-deb /usr/bin/dpkg-split /usr/bin/dpkg-query /usr/bin/tar /sbin/ldconfig; do
	extras+=(--extra "$f=$f")
done
while read -r lib; do extras+=(--extra "$lib=$lib"); done < <(
	ldd "$work/x/usr/sbin/qcowsetup" "$work/x/usr/libexec/qcowsetup/qcowsetup-daemon" |
		awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)
# no qcowsetup of the build tree in the VM (run-vm.sh adds $QCOWSETUP), and
# an initramfs cache of its own (the other tests' stays as it is)
if env -u QCOWSETUP QS_VM_CACHE="$builddir/tests/vm/out-deb" \
	"$top/tests/vm/bed/run-vm.sh" --share "$share" --disk "$work/disk.img" \
	"${extras[@]}" --timeout 600 -- deb.sh >"$work/vm.log" 2>&1; then
	grep -E '^(PASS|FAIL|SKIP): ' "$work/vm.log" | sed 's/^/    VM /'
	pass "$name"
else
	cat "$work/vm.log"
	fail "$name"
fi

summary "$me"
