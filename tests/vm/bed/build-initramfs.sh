#!/bin/bash
# Build the initramfs of the qcowsetup VM test bed, from scratch (no dracut).
#
#   tests/vm/bed/build-initramfs.sh OUTDIR [--kver KVER] [--extra FILE[=DEST]]...
#
# Writes OUTDIR/initramfs.cpio (not compressed: TCG would spend seconds of each
# boot inflating it) holding: busybox (applets as symlinks), the
# kernel modules the tests need with all their dependencies (from modules.dep of
# the installed kernel, decompressed, re-indexed with depmod), the userspace
# tools (dmsetup, util-linux losetup/blkid, qemu-img/io/nbd, fio, mkfs.ext4,
# md5sum, keyctl, cryptsetup, bash) with every shared library ldd reports and the
# dynamic loader, the extra files, and tests/vm/bed/init.sh as /init.
#
# An extra FILE goes to /usr/local/bin/ (or DEST); a libtool wrapper script is
# replaced by the real binary in .libs/; ELF files get their libraries copied.
#
# Cached: OUTDIR/initramfs.stamp holds the sha256 of the options and of the
# inputs list OUTDIR/initramfs.inputs (path, size and mtime of every file copied
# in: programs, libraries, modules, modules.dep, these scripts); nothing is
# rebuilt while it matches. Safe to run concurrently (flock).
# Environment: QS_VM_KVER (kernel version), QS_VM_EXTRA_MODULES (more modules),
# QS_VM_FORCE=1 (rebuild anyway).
set -eu

me=build-initramfs
die() { echo "$me: error: $*" >&2; exit 1; }
warn() { echo "$me: warning: $*" >&2; }
usage() {
	sed -n '3p' "$0" | sed 's/^#  *//' >&2
	exit 2
}

here=$(cd "$(dirname "$0")" && pwd)
outdir=
kver=${QS_VM_KVER:-}
extras=()
while [ $# -gt 0 ]; do
	case $1 in
	--kver) [ $# -ge 2 ] || usage; kver=$2; shift 2 ;;
	--extra) shift
		while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do extras+=("$1"); shift; done ;;
	-h|--help) usage ;;
	-*) die "unknown option $1" ;;
	*) [ -z "$outdir" ] || usage; outdir=$1; shift ;;
	esac
done
[ -n "$outdir" ] || usage

# The newest installed kernel that has its modules: /boot/vmlinuz-KVER.
newest_kver() {
	local k v
	# shellcheck disable=SC2012 # kernel file names have no white space
	for k in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
		v=${k#/boot/vmlinuz-}
		[ -f "/usr/lib/modules/$v/modules.dep" ] || [ -f "/lib/modules/$v/modules.dep" ] || continue
		echo "$v"; return 0
	done
	return 1
}
[ -n "$kver" ] || kver=$(newest_kver) || die "no kernel with modules in /boot and /usr/lib/modules"
moddir=/usr/lib/modules/$kver
[ -d "$moddir" ] || moddir=/lib/modules/$kver
[ -f "$moddir/modules.dep" ] || die "no $moddir/modules.dep"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
image=$outdir/initramfs.cpio
stamp=$outdir/initramfs.stamp
inputs_list=$outdir/initramfs.inputs
if command -v flock >/dev/null; then
	exec 9>"$outdir/.initramfs.lock"
	flock 9      # make check -j: one build at a time, the others reuse it
fi

# ---------------------------------------------------------------- cache stamp
# The stamp is the sha256 of the options and of "path size mtime" of every input
# file (the list of the last build). Checking it costs a stat per file, not a
# resolution (ldd) nor a hash of 100 MB; a new dependency can only appear when a
# listed file changes, which triggers the full resolution below.
options="kver=$kver extra=${extras[*]+${extras[*]}} modules=${QS_VM_EXTRA_MODULES:-}"
inputs_sum() {
	{ echo "$options"; tr '\n' '\0' < "$inputs_list" | xargs -0 stat -L -c '%n %s %.9Y' 2>&1; } |
		sha256sum | cut -d' ' -f1
}
if [ -z "${QS_VM_FORCE:-}" ] && [ -f "$image" ] && [ -f "$stamp" ] && [ -f "$inputs_list" ] &&
   [ "$(inputs_sum)" = "$(cat "$stamp")" ]; then
	exit 0
fi

# ---------------------------------------------------------------- resolution
# Modules: names as modprobe knows them ('-' and '_' are the same).
modules_required="dm-mod dm-crypt dm-zero dm-switch loop nbd ecb cbc xts essiv aes_generic
	serpent_generic twofish_generic sha256_generic 9p 9pnet 9pnet_virtio virtio
	virtio_ring virtio_pci virtio_blk ext4 jbd2 mbcache crc16 crc32c_generic
	af_alg algif_skcipher algif_hash"
# (dm-log-writes, dm-snapshot, dm-flakey: the write log test, test-logwrites.sh;
# unix_diag: how dm.c asks whether udevd listens, else /proc/net/unix)
modules_optional="aesni_intel crc32c_intel virtio_rng dm_log_writes dm_snapshot dm_flakey unix_diag
	${QS_VM_EXTRA_MODULES:-}"

# "name path deps..." for every module file of the kernel, name normalised.
modindex=$(awk -F': *' '{
	n = $1; sub(/.*\//, "", n); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", n); gsub(/-/, "_", n)
	print n, $1, $2 }' "$moddir/modules.dep")
builtin_index=$(sed 's|.*/||; s/\.ko$//; s/-/_/g' "$moddir/modules.builtin" 2>/dev/null || true)

load_list=()     # what /init loads with modprobe, in this order
module_files=()  # module files (relative to moddir), deduplicated below
add_module() {   # NAME REQUIRED(0/1)
	local n line
	n=$(echo "$1" | tr - _)
	line=$(echo "$modindex" | awk -v n="$n" '$1 == n { $1 = ""; print; exit }')
	if [ -n "$line" ]; then
		load_list+=("$n")
		# shellcheck disable=SC2206 # word splitting of "path deps..." intended
		module_files+=($line)
	elif echo "$builtin_index" | grep -qx "$n"; then
		:  # built into the kernel
	elif [ "$2" = 1 ]; then
		die "module $1 is neither in $moddir/modules.dep nor built in"
	fi
}
for m in $modules_required; do add_module "$m" 1; done
for m in $modules_optional; do add_module "$m" 0; done
mapfile -t module_files < <(printf '%s\n' "${module_files[@]}" | sort -u)

# Binaries: first in PATH plus the sbin directories (unprivileged PATHs lack them).
search_path="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
find_bin() { PATH=$search_path command -v "$1" 2>/dev/null || true; }
bins_required="dmsetup losetup blkid md5sum"
bins_optional="dash qemu-img qemu-io qemu-nbd fio mkfs.ext4 resize2fs e2fsck keyctl cryptsetup bash blockdev"
busybox=$(find_bin busybox)
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
binaries=()      # "SOURCE DEST" (DEST inside the image)
for b in $bins_required $bins_optional; do
	p=$(find_bin "$b")
	if [ -z "$p" ]; then
		case " $bins_required " in
		*" $b "*) die "$b not found" ;;
		*) warn "$b not found, not in the initramfs" ; continue ;;
		esac
	fi
	case $(dirname "$p") in
	*/sbin) d=/usr/sbin ;;
	*) d=/usr/bin ;;
	esac
	binaries+=("$p $d/$b")
done
for e in "${extras[@]}"; do
	src=${e%%=*}
	dst=/usr/local/bin/$(basename "$src")
	[ "$src" = "$e" ] || dst=${e#*=}
	[ -f "$src" ] || die "extra file $src does not exist"
	# A libtool wrapper script: take the real program from .libs/.
	if [ "$(head -c 4 "$src" | od -An -c | tr -d ' ')" != '177ELF' ] &&
	   grep -q 'temporary wrapper script for' "$src" 2>/dev/null; then
		for c in "$(dirname "$src")/.libs/lt-$(basename "$src")" "$(dirname "$src")/.libs/$(basename "$src")"; do
			if [ -f "$c" ]; then src=$c; break; fi
		done
	fi
	binaries+=("$(cd "$(dirname "$src")" && pwd)/$(basename "$src") $dst")
done

# Shared libraries of every ELF file, and the loader, as ldd names them.
libs=()
for entry in "${binaries[@]}" "$busybox x"; do
	src=${entry%% *}
	[ "$(head -c 4 "$src" | od -An -c | tr -d ' ')" = '177ELF' ] || continue
	out=$(LC_ALL=C ldd "$src" 2>&1) || continue      # static: "not a dynamic executable"
	if echo "$out" | grep -q 'not found'; then
		die "$src: missing shared libraries: $(echo "$out" | grep 'not found' | tr -s ' \t' ' ')"
	fi
	while read -r l; do libs+=("$l"); done < <(echo "$out" | awk '
		$2 == "=>" && $3 ~ /^\// { print $3 }
		$1 ~ /^\// { print $1 }')
done
# glibc dlopens libgcc_s for pthread_cancel/exit: ldd cannot see it.
libc=$(printf '%s\n' "${libs[@]}" | grep '/libc\.so\.6$' | head -1 || true)
if [ -n "$libc" ] && [ -e "$(dirname "$libc")/libgcc_s.so.1" ]; then
	libs+=("$(dirname "$libc")/libgcc_s.so.1")
fi
mapfile -t libs < <(printf '%s\n' "${libs[@]}" | sort -u)

etc_files=()
[ ! -f /etc/mke2fs.conf ] || etc_files+=(/etc/mke2fs.conf)

{
	echo "$here/build-initramfs.sh"; echo "$here/init.sh"; echo "$busybox"
	for e in "${binaries[@]}"; do echo "${e%% *}"; done
	printf '%s\n' "${libs[@]}" "${etc_files[@]+"${etc_files[@]}"}"
	for m in "${module_files[@]}"; do echo "$moddir/$m"; done
	for f in modules.dep modules.builtin modules.builtin.modinfo modules.order; do
		if [ -f "$moddir/$f" ]; then echo "$moddir/$f"; fi
	done
} > "$inputs_list.new"
mv -f "$inputs_list.new" "$inputs_list"
sum=$(inputs_sum)

# ---------------------------------------------------------------- staging
echo "$me: building $image for kernel $kver" >&2
stage=$(mktemp -d "$outdir/.stage.XXXXXX")
trap 'rm -rf "$stage" "$image.tmp"' EXIT
cd "$stage"
mkdir -p usr/bin usr/sbin usr/lib usr/lib64 usr/local/bin usr/local/sbin \
	etc proc sys dev tmp run root host mnt var
ln -s usr/bin bin; ln -s usr/sbin sbin; ln -s usr/lib lib; ln -s usr/lib64 lib64
ln -s /proc/self/mounts etc/mtab
ln -s /run var/run
ln -s /run/lock var/lock
printf 'root:x:0:0:root:/root:/bin/sh\n' > etc/passwd
printf 'root:x:0:\ndisk:x:6:\n' > etc/group
for f in "${etc_files[@]}"; do cp -L "$f" ".$f"; done

# busybox and its applets (merged /usr: bin/x and sbin/x land in usr/).
cp -L "$busybox" usr/bin/busybox
"$busybox" --list-full | while read -r a; do
	case $a in
	usr/*) p=$a ;;
	bin/*|sbin/*) p=usr/$a ;;
	*) continue ;;   # linuxrc
	esac
	[ -e "$p" ] || [ -L "$p" ] || ln -s /usr/bin/busybox "$p"
done

# Real binaries replace the applets of the same name, in both bin and sbin.
for e in "${binaries[@]}"; do
	src=${e%% *} dst=${e#* }
	rm -f "usr/bin/${dst##*/}" "usr/sbin/${dst##*/}"
	mkdir -p ".$(dirname "$dst")"
	cp -L "$src" ".$dst"      # keeps the mode bits (less the umask)
done
# /bin/sh is dash when there is one: busybox ash runs its own applets before
# anything in PATH (FEATURE_SH_STANDALONE), which would hide util-linux losetup,
# coreutils md5sum... from every script.
if [ -f usr/bin/dash ]; then
	ln -sfn dash usr/bin/sh
else
	warn "no dash: /bin/sh is busybox ash, whose applets shadow the real tools"
fi
for l in "${libs[@]}"; do
	mkdir -p ".$(dirname "$l")"
	cp -L "$l" ".$l"
done

# Modules, decompressed so that busybox modprobe/insmod load them.
kdir=usr/lib/modules/$kver
mkdir -p "$kdir"
for m in "${module_files[@]}"; do
	dst=$kdir/${m%.*}
	mkdir -p "$(dirname "$dst")"
	case $m in
	*.ko.xz) xz -dc "$moddir/$m" > "${dst%.ko}.ko" ;;
	*.ko.zst) zstd -qdc "$moddir/$m" > "${dst%.ko}.ko" ;;
	*.ko.gz) gzip -dc "$moddir/$m" > "${dst%.ko}.ko" ;;
	*.ko) cp "$moddir/$m" "$kdir/$m" ;;
	*) die "unexpected module file $m" ;;
	esac
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
	if [ -f "$moddir/$f" ]; then
		sed 's/\.ko\.\(xz\|zst\|gz\)$/.ko/' "$moddir/$f" > "$kdir/$f"
	fi
done
if command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ]; then
	PATH=$search_path depmod -b "$stage" "$kver"
else
	"$busybox" depmod -b "$stage" "$kver"
fi
[ -s "$kdir/modules.dep" ] || die "depmod wrote no modules.dep"
echo "$kver" > etc/qs-kver
printf '%s\n' "${load_list[@]}" > etc/qs-modules

cp "$here/init.sh" init
chmod 755 init

# ---------------------------------------------------------------- archive
if command -v cpio >/dev/null; then
	cpio_create() { cpio --quiet -o -H newc -R 0:0; }
else
	cpio_create() { "$busybox" cpio -o -H newc -R 0:0; }
fi
find . -mindepth 1 | LC_ALL=C sort | cpio_create > "$image.tmp"
mv -f "$image.tmp" "$image"
echo "$sum" > "$stamp"
echo "$me: $(du -h "$image" | cut -f1) $image (${#load_list[@]} modules, ${#binaries[@]} programs, ${#libs[@]} libraries)" >&2
