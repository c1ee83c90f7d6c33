#!/bin/bash
# Generates the hostile-image set of tests/vm/test-hostile.sh (the issue "an
# image is untrusted input"): images whose backing and external data file
# names lead where they must not (another folder, a host disk, /proc/kcore,
# sysfs, a FIFO, a symlink out of the folder, another user's file, a block
# device), a raw disk, and the ordinary images of the race, symlink-swap,
# qcowtab and password-agent cases.
#
#   tests/vm/gen-hostile.sh DIR
#
# Writes DIR/disk/ (the tree of the ext4 disk the guest mounts at /mnt/h)
# and DIR/share/ (what the guest compares with: NAME.md5 = md5 of the guest
# data of an image or chain as `qemu-img convert` reads it, here on the
# host; f-hdr.qcow2, a qcow2 header to write into a raw disk; pass).
#
# Images are made by qemu-img and qemu-io with harmless names; the hostile
# names are then written into the header by the Python below (header
# extensions and backing file name rebuilt in the first cluster), which
# never opens the file a name points to. (`qemu-img amend -o data_file=`
# creates the file it names, and qemu-img may open a backing file: neither
# is ever pointed at a host file here.) Guest paths: /mnt/h is the disk,
# images live in /mnt/h/img, so ../../../dev/loop0 from there is /dev/loop0.
#
# Exit: 0, 1 on failure, 77 without qemu-img, qemu-io or python3.
set -eu
me='gen-hostile'
[ $# = 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
for t in qemu-img qemu-io python3; do
	command -v $t >/dev/null || { echo "$me: SKIP: $t not found"; exit 77; }
done
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)
disk=$out/disk share=$out/share gen=$out/gen
rm -rf "$disk" "$share" "$gen"
mkdir -p "$disk/img" "$disk/outside" "$disk/victim" "$disk/blk" "$disk/keys" "$share" "$gen"
PASS='hostile passphrase'
H=/mnt/h	# where the guest mounts the disk

# ---- the header patcher: set_names IMAGE [backing NAME FMT] [data NAME]
set_names() {
	python3 - "$@" <<'PY'
import struct, sys

EXT_END, EXT_BACKING_FORMAT, EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
INCOMPAT_DATA_FILE = 1 << 2

path, args = sys.argv[1], sys.argv[2:]
backing = data = fmt = None
while args:
    if args[0] == "backing":
        backing, fmt, args = args[1].encode(), args[2].encode(), args[3:]
    elif args[0] == "data":
        data, args = args[1].encode(), args[2:]
    else:
        sys.exit("set_names: bad argument %r" % args[0])
with open(path, "r+b") as f:
    h = bytearray(f.read(2 * 1024 * 1024))
    magic, version = struct.unpack_from(">II", h, 0)
    if magic != 0x514649FB or version != 3:
        sys.exit("%s: not a qcow2 version 3 image" % path)
    cluster = 1 << struct.unpack_from(">I", h, 20)[0]
    hdr_len = struct.unpack_from(">I", h, 100)[0]
    exts, off = [], hdr_len
    while True:
        t, n = struct.unpack_from(">II", h, off)
        if t == EXT_END:
            break
        exts.append((t, bytes(h[off + 8:off + 8 + n])))
        off += 8 + ((n + 7) & ~7)
    if data is not None:
        if not struct.unpack_from(">Q", h, 72)[0] & INCOMPAT_DATA_FILE:
            sys.exit("%s: made without an external data file" % path)
        exts = [e for e in exts if e[0] != EXT_DATA_FILE] + [(EXT_DATA_FILE, data)]
    if backing is not None:
        exts = [e for e in exts if e[0] != EXT_BACKING_FORMAT] + [(EXT_BACKING_FORMAT, fmt)]
    else:
        bo, bs = struct.unpack_from(">QI", h, 8)
        backing = bytes(h[bo:bo + bs]) if bo else None
    area = b""
    for t, v in exts:
        area += struct.pack(">II", t, len(v)) + v + b"\0" * (-len(v) % 8)
    area += struct.pack(">II", EXT_END, 0)
    end = hdr_len + len(area) + (len(backing) if backing else 0)
    if end > cluster:
        sys.exit("%s: the names do not fit in the first cluster" % path)
    h[hdr_len:cluster] = b"\0" * (cluster - hdr_len)
    h[hdr_len:hdr_len + len(area)] = area
    if backing:
        struct.pack_into(">QI", h, 8, hdr_len + len(area), len(backing))
        h[hdr_len + len(area):end] = backing
    else:
        struct.pack_into(">QI", h, 8, 0, 0)
    f.seek(0)
    f.write(h[:cluster])
PY
}

printf '%s' "$PASS" > "$gen/pass"
sec=(--object "secret,id=s0,file=$gen/pass")
qio() { qemu-io -f qcow2 "$@" >/dev/null; }
md5_of() {	# NAME [qemu-img convert options] IMAGE: the guest data's md5 into share/NAME.md5
	local name=$1
	shift
	qemu-img convert -O raw "$@" "$gen/$name.raw"
	md5sum < "$gen/$name.raw" | cut -d' ' -f1 > "$share/$name.md5"
	rm -f "$gen/$name.raw"
}
luks() {	# IMAGE SIZE PATTERN: a LUKS qcow2 (qemu-img's PBKDF2 timing can fail under load: retry)
	local try
	for try in 1 2 3 4 5 6; do
		qemu-img create -q -f qcow2 "${sec[@]}" \
			-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$1" "$2" 2>/dev/null && break
		[ $try = 6 ] && { echo "$me: cannot create the LUKS image $1" >&2; return 1; }
		sleep 1
	done
	qemu-io "${sec[@]}" --image-opts -c "write -P $3 0 1M" -c "write -P $3 2M 64k" \
		"driver=qcow2,file.filename=$1,encrypt.key-secret=s0" >/dev/null
}
luks_md5() { md5_of "$1" "${sec[@]}" --image-opts "driver=qcow2,file.filename=$2,encrypt.key-secret=s0"; }
# an image with an external data file (made here, under a harmless name),
# some data in it, then the name set to $2
with_data_file() {	# IMAGE NAME
	local b
	b=$(basename "$1" .qcow2)
	(cd "$gen" && qemu-img create -q -f qcow2 -o "data_file=$b.data" "$b.qcow2" 4M &&
		qemu-io -f qcow2 -c 'write -P 0x5a 0 2M' "$b.qcow2" >/dev/null)
	cp "$gen/$b.qcow2" "$1"
	set_names "$1" data "$2"
}
# an image whose backing file is $2 (format $3), over a harmless raw base
with_backing() {	# IMAGE NAME FORMAT
	qemu-img create -q -f raw "$gen/base.raw" 4M
	qemu-img create -q -f qcow2 -b "$gen/base.raw" -F raw "$1" 4M
	qio -c 'write -P 0x6b 1M 64k' "$1"
	set_names "$1" backing "$2" "$3"
}

# ---- a. an external data file elsewhere: another regular file, absolute and climbing
head -c 1M /dev/urandom > "$disk/victim/victim.bin"
with_data_file "$disk/img/a-data-abs.qcow2" "$H/victim/victim.bin"
with_data_file "$disk/img/a-data-climb.qcow2" "../victim/victim.bin"
# ---- b. the data file a host disk: /dev/loop0, absolute and climbing
with_data_file "$disk/img/b-data-loop0.qcow2" /dev/loop0
with_data_file "$disk/img/b-data-climb.qcow2" ../../../dev/loop0
# ---- c. backing files that are kernel interfaces
with_backing "$disk/img/c-back-kcore.qcow2" /proc/kcore raw
with_backing "$disk/img/c-back-kcore-climb.qcow2" ../../../proc/kcore raw
with_backing "$disk/img/c-back-sysfs.qcow2" /sys/kernel/notes raw
# ---- d. the backing file a host disk, climbing
with_backing "$disk/img/d-back-loop0.qcow2" ../../../dev/loop0 raw
# ---- e. the data file a FIFO (in the image's folder: made by the guest)
with_data_file "$disk/img/e-data-fifo.qcow2" e-fifo.data
# ---- f. a raw disk, and the qcow2 header a guest writes into it: its
# data file is a host file outside the folder
head -c 4M /dev/urandom > "$disk/img/raw.img"
with_data_file "$share/f-hdr.qcow2" "$H/victim/victim.bin"
# ---- g. backing files outside the folder (symlink, absolute) and another
# user's (the guest makes it uid 1000's)
qemu-img create -q -f qcow2 "$disk/outside/base.qcow2" 4M
qio -c 'write -P 0x71 0 4M' "$disk/outside/base.qcow2"
ln -s ../outside/base.qcow2 "$disk/img/g-base-link.qcow2"
(cd "$disk/img" && qemu-img create -q -f qcow2 -b g-base-link.qcow2 -F qcow2 g-link.qcow2 4M)
qio -c 'write -P 0x72 1M 1M' "$disk/img/g-link.qcow2"
md5_of g-link "$disk/img/g-link.qcow2"
(cd "$disk/img" && qemu-img create -q -f qcow2 -b ../outside/base.qcow2 -F qcow2 g-abs.qcow2 4M)
qio -c 'write -P 0x73 2M 512k' "$disk/img/g-abs.qcow2"
md5_of g-abs "$disk/img/g-abs.qcow2"
set_names "$disk/img/g-abs.qcow2" backing "$H/outside/base.qcow2" qcow2
qemu-img create -q -f qcow2 "$disk/img/g-base-1000.qcow2" 4M
qio -c 'write -P 0x74 0 3M' "$disk/img/g-base-1000.qcow2"
(cd "$disk/img" && qemu-img create -q -f qcow2 -b g-base-1000.qcow2 -F qcow2 g-owner.qcow2 4M)
qio -c 'write -P 0x75 512k 1M' "$disk/img/g-owner.qcow2"
md5_of g-owner "$disk/img/g-owner.qcow2"
# ---- h. a chain on block devices: the guest attaches blk/base.qcow2 to
# /dev/loop6 and a top to /dev/loop7; top-dev names /dev/loop6, top-link a
# symlink to it (/mnt/h/blk/base-dev, made by the guest)
qemu-img create -q -f qcow2 "$disk/blk/base.qcow2" 4M
qio -c 'write -P 0x81 0 4M' "$disk/blk/base.qcow2"
for t in dev link; do
	(cd "$disk/blk" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "top-$t.qcow2" 4M)
	qio -c "write -P 0x8$([ $t = dev ] && echo 2 || echo 3) 1M 1M" "$disk/blk/top-$t.qcow2"
	md5_of "h-$t" "$disk/blk/top-$t.qcow2"
done
set_names "$disk/blk/top-dev.qcow2" backing /dev/loop6 qcow2
set_names "$disk/blk/top-link.qcow2" backing "$H/blk/base-dev" qcow2
# ---- i. the race: two small images
qemu-img create -q -f qcow2 "$disk/img/i-a.qcow2" 4M
qio -c 'write -P 0x91 0 1M' -c 'write -P 0x92 2M 512k' "$disk/img/i-a.qcow2"
md5_of i-a "$disk/img/i-a.qcow2"
qemu-img create -q -f qcow2 "$disk/img/i-b.qcow2" 4M
qio -c 'write -P 0x93 512k 1M' "$disk/img/i-b.qcow2"
md5_of i-b "$disk/img/i-b.qcow2"
# ---- j. the symlink swap: two LUKS images with one passphrase, one plain
luks "$disk/img/j-a.qcow2" 4M 0xa1
luks "$disk/img/j-b.qcow2" 4M 0xa2
qemu-img create -q -f qcow2 "$disk/img/j-plain.qcow2" 4M
qio -c 'write -P 0xa3 0 1M' "$disk/img/j-plain.qcow2"
luks_md5 j-a "$disk/img/j-a.qcow2"
luks_md5 j-b "$disk/img/j-b.qcow2"
md5_of j-plain "$disk/img/j-plain.qcow2"
# ---- k. an unencrypted image where a qcowtab entry expects a key
qemu-img create -q -f qcow2 "$disk/img/k-plain.qcow2" 4M
qio -c 'write -P 0xb1 0 1M' "$disk/img/k-plain.qcow2"
md5_of k-plain "$disk/img/k-plain.qcow2"
# ---- l. read-write LUKS entries asked through systemd-ask-password
for n in 1 2 3; do
	luks "$disk/img/l-$n.qcow2" 4M "0xc$n"
	luks_md5 "l-$n" "$disk/img/l-$n.qcow2"
done

cp "$gen/pass" "$disk/keys/pass"
cp "$gen/pass" "$share/pass"
rm -rf "$gen"
