#!/usr/bin/env python3
"""Write a fragmented qcow2 v3 image directly: VIRTUAL bytes of guest space,
NCLUSTERS allocated 64 KiB clusters whose guest positions are shuffled (the
host order is the allocation order, as if a guest had written them at
random). Each data cluster gets its first 4 KiB written (so the file is not
taken for metadata-preallocated); refcounts are exact, `qemu-img check`
finds the image clean.

usage: gen-fragmented.py OUT [NCLUSTERS] [VIRTUAL_BYTES] [SEED]"""
import random
import struct
import sys

CB = 16
CS = 1 << CB


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000000
    virtual = int(sys.argv[3]) if len(sys.argv) > 3 else 1 << 40
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    rng = random.Random(seed)
    nguest = virtual // CS
    guest = rng.sample(range(nguest), n)          # shuffled guest clusters
    l2_entries = CS // 8
    l1_size = (nguest + l2_entries - 1) // l2_entries
    l1_clusters = (l1_size * 8 + CS - 1) // CS
    l2_needed = sorted({g // l2_entries for g in guest})

    # layout: header | L1 | L2 tables | data | refcount blocks | refcount table
    cur = 1
    l1_off = cur * CS
    cur += l1_clusters
    l2_off = {}
    for idx in l2_needed:
        l2_off[idx] = cur * CS
        cur += 1
    data_start = cur
    cur += n
    # refcount blocks covering every cluster, including themselves and the table
    per_block = CS // 2
    total = cur
    while True:
        nblocks = (total + per_block - 1) // per_block
        rt_clusters = (nblocks * 8 + CS - 1) // CS
        if cur + nblocks + rt_clusters <= nblocks * per_block:
            break
        total += per_block
    rb_start = cur
    rt_start = cur + nblocks
    end = rt_start + rt_clusters

    with open(out, "wb") as f:
        f.truncate(end * CS)
        hdr = struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649fb, 3, 0, 0, CB, virtual, 0,
                          l1_size, l1_off, rt_start * CS, rt_clusters, 0, 0,
                          0, 0, 0, 4, 104)
        f.seek(0)
        f.write(hdr + struct.pack(">II", 0, 0))
        l1 = bytearray(l1_size * 8)
        for idx, off in l2_off.items():
            struct.pack_into(">Q", l1, idx * 8, off | (1 << 63))
        f.seek(l1_off)
        f.write(l1)
        tables = {idx: bytearray(CS) for idx in l2_needed}
        for i, g in enumerate(guest):
            host = (data_start + i) * CS
            struct.pack_into(">Q", tables[g // l2_entries], (g % l2_entries) * 8, host | (1 << 63))
        for idx in l2_needed:
            f.seek(l2_off[idx])
            f.write(tables[idx])
        block = b"qcowsetup bench " * 256
        for i in range(n):
            f.seek((data_start + i) * CS)
            f.write(block)
        # refcounts: every cluster below `end` is in use exactly once
        for b in range(nblocks):
            rb = bytearray(CS)
            lo, hi = b * per_block, min((b + 1) * per_block, end)
            if hi > lo:
                rb[: (hi - lo) * 2] = b"\x00\x01" * (hi - lo)
            f.seek((rb_start + b) * CS)
            f.write(rb)
        rt = bytearray(rt_clusters * CS)
        for b in range(nblocks):
            struct.pack_into(">Q", rt, b * 8, (rb_start + b) * CS)
        f.seek(rt_start * CS)
        f.write(rt)


if __name__ == "__main__":
    main()
