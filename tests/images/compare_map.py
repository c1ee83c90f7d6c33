#!/usr/bin/env python3
"""Compare qcowsetup's answers with QEMU's (the oracles of gen-matrix.sh).

  compare_map.py map [--allow-extra] [--ignore-file-holes] ORACLE OURS
      ORACLE is `qemu-img map --output=json`, OURS `qcowsetup map --json`.
      Without options the two must be equal record for record. With
      --allow-extra (encrypted and compressed images) our records may also
      carry "offset" and "compressed" where QEMU's record has no such key,
      and may split one QEMU record where only those keys tell them apart;
      every key QEMU has must still match over every byte. With
      --ignore-file-holes, "zero": true is dropped from data records, and
      records merged again, on both sides first (see README.md, file holes).
  compare_map.py info ORACLE OURS
      ORACLE is `qemu-img info --output=json --backing-chain` (a list), OURS
      `qcowsetup info --json` (an object, or a list whose first is the image):
      "virtual-size" must be equal.
  compare_map.py check ORACLE ORACLE_RC OURS OURS_RC
      `qemu-img check --output=json` and `qcowsetup check --json`, with their
      exit statuses: "leaks" and "corruptions" (absent means 0) must be equal.
      Where QEMU cannot check (exit 63, qcow v1), ours may fail too, or must
      report no leaks and no corruptions.
  compare_map.py --selftest

Exit status: 0 equal, 1 different (a diff of the first difference on stdout),
2 unusable input. Standard library only.
"""

import json
import sys

BASE_KEYS = ("start", "length", "depth", "present", "zero", "data")
EXTRA_KEYS = {"offset": int, "compressed": bool}


class Mismatch(Exception):
    pass


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise Mismatch("cannot read %s: %s" % (path, e.strerror))
    if not text.strip():
        raise Mismatch("%s is empty" % path)
    try:
        return json.loads(text)
    except ValueError as e:
        first = text.strip().splitlines()[0][:200]
        raise Mismatch("%s is not JSON (%s); it starts: %s" % (path, e, first))


def fmt(rec):
    return json.dumps(rec, separators=(", ", ": ")) if rec is not None else "(none)"


def validate_map(recs, who):
    if not isinstance(recs, list):
        raise Mismatch("%s: a map must be a JSON list, got %s" % (who, type(recs).__name__))
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise Mismatch("%s: record %d is not an object: %s" % (who, i, fmt(r)))
        for k in BASE_KEYS:
            if k not in r:
                raise Mismatch("%s: record %d has no %r: %s" % (who, i, k, fmt(r)))
        for k in ("start", "length", "depth"):
            if type(r[k]) is not int or r[k] < 0:
                raise Mismatch("%s: record %d: %r is not a natural number: %s" % (who, i, k, fmt(r)))
        for k in ("present", "zero", "data"):
            if type(r[k]) is not bool:
                raise Mismatch("%s: record %d: %r is not a boolean: %s" % (who, i, k, fmt(r)))
        if "offset" in r and (type(r["offset"]) is not int or r["offset"] < 0):
            raise Mismatch("%s: record %d: offset is not a natural number: %s" % (who, i, fmt(r)))
        if "compressed" in r and type(r["compressed"]) is not bool:
            raise Mismatch("%s: record %d: compressed is not a boolean: %s" % (who, i, fmt(r)))
        if r["length"] == 0:
            raise Mismatch("%s: record %d has length 0: %s" % (who, i, fmt(r)))
        expect = recs[i - 1]["start"] + recs[i - 1]["length"] if i else 0
        if r["start"] != expect:
            raise Mismatch("%s: record %d starts at %d, expected %d (gap or overlap): %s"
                           % (who, i, r["start"], expect, fmt(r)))


def mergeable(a, b):
    """qemu-img's entry_mergeable(), on JSON records."""
    keys = set(a) | set(b)
    for k in keys - {"start", "length", "offset"}:
        if a.get(k) != b.get(k):
            return False
    if ("offset" in a) != ("offset" in b):
        return False
    if "offset" in a and a["offset"] + a["length"] != b["offset"]:
        return False
    return True


def merge(recs):
    out = []
    for r in recs:
        if out and mergeable(out[-1], r):
            out[-1] = dict(out[-1], length=out[-1]["length"] + r["length"])
        else:
            out.append(dict(r))
    return out


def drop_file_holes(recs):
    out = []
    for r in recs:
        r = dict(r)
        if r["data"] and r["zero"]:
            r["zero"] = False
        out.append(r)
    return merge(out)


def context(recs, i, n=1):
    lo, hi = max(0, i - n), min(len(recs), i + n + 1)
    return ["    [%d] %s%s" % (j, fmt(recs[j]), "   <==" if j == i else "") for j in range(lo, hi)]


def compare_maps(oracle, ours, allow_extra=False, ignore_file_holes=False):
    """Returns None if equal, else a list of lines describing the first difference."""
    validate_map(oracle, "qemu-img map")
    validate_map(ours, "qcowsetup map")
    if ignore_file_holes:
        oracle, ours = drop_file_holes(oracle), drop_file_holes(ours)
    end_q = oracle[-1]["start"] + oracle[-1]["length"] if oracle else 0
    end_o = ours[-1]["start"] + ours[-1]["length"] if ours else 0

    qi = oi = 0
    while qi < len(oracle) and oi < len(ours):
        q, o = oracle[qi], ours[oi]
        pos = max(q["start"], o["start"])
        problems = []
        for k in q:
            if k in ("start", "length"):
                continue
            if k not in o:
                problems.append("key %r missing (qemu: %s)" % (k, json.dumps(q[k])))
            elif k == "offset":
                qoff = q["offset"] + pos - q["start"]
                ooff = o["offset"] + pos - o["start"]
                if qoff != ooff:
                    problems.append("offset at guest %d: qemu %d, ours %d" % (pos, qoff, ooff))
            elif o[k] != q[k]:
                problems.append("%s: qemu %s, ours %s" % (k, json.dumps(q[k]), json.dumps(o[k])))
        for k in o:
            if k in q:
                continue
            if not allow_extra or k not in EXTRA_KEYS:
                problems.append("unexpected key %r: %s" % (k, json.dumps(o[k])))
        if not problems:
            q_end, o_end = q["start"] + q["length"], o["start"] + o["length"]
            if o_end > q_end and qi + 1 < len(oracle):
                problems.append("our record goes on past qemu's record end %d "
                                "(qemu has a boundary there, ours does not)" % q_end)
            elif o_end < q_end:
                nxt = ours[oi + 1] if oi + 1 < len(ours) else None
                if not allow_extra:
                    problems.append("our record ends at %d, inside qemu's record (ends at %d)"
                                    % (o_end, q_end))
                elif nxt is not None and not any(k in o or k in nxt for k in EXTRA_KEYS
                                                 if k not in q):
                    problems.append("our record ends at %d, inside qemu's record (ends at %d), "
                                    "and no extra key explains the split" % (o_end, q_end))
        if problems:
            lines = ["first difference at guest offset %d (qemu record %d, our record %d):"
                     % (pos, qi, oi)]
            lines += ["  " + p for p in problems]
            lines.append("  qemu-img map:")
            lines += context(oracle, qi)
            lines.append("  qcowsetup map:")
            lines += context(ours, oi)
            return lines
        q_end, o_end = q["start"] + q["length"], o["start"] + o["length"]
        if q_end <= o_end:
            qi += 1
        if o_end <= q_end:
            oi += 1
    if end_q != end_o or qi != len(oracle) or oi != len(ours):
        return ["maps cover different lengths: qemu %d bytes in %d records, ours %d bytes in %d records"
                % (end_q, len(oracle), end_o, len(ours))]
    return None


def cmd_map(args):
    allow_extra = ignore_holes = False
    files = []
    for a in args:
        if a == "--allow-extra":
            allow_extra = True
        elif a == "--ignore-file-holes":
            ignore_holes = True
        else:
            files.append(a)
    if len(files) != 2:
        return usage()
    diff = compare_maps(load_json(files[0]), load_json(files[1]), allow_extra, ignore_holes)
    if diff:
        print("\n".join(diff))
        return 1
    return 0


def first_image(info, who):
    if isinstance(info, list):
        if not info:
            raise Mismatch("%s: empty list" % who)
        info = info[0]
    if not isinstance(info, dict):
        raise Mismatch("%s: not a JSON object" % who)
    return info


def cmd_info(args):
    if len(args) != 2:
        return usage()
    q = first_image(load_json(args[0]), "qemu-img info")
    o = first_image(load_json(args[1]), "qcowsetup info")
    if "virtual-size" not in o:
        print("our info has no \"virtual-size\"; keys: %s" % ", ".join(sorted(o)))
        return 1
    if o["virtual-size"] != q["virtual-size"]:
        print("virtual-size: qemu %s, ours %s" % (q["virtual-size"], o["virtual-size"]))
        return 1
    return 0


def counts(check):
    return {k: check.get(k, 0) for k in ("leaks", "corruptions")}


def cmd_check(args):
    if len(args) != 4:
        return usage()
    q_rc, o_rc = int(args[1]), int(args[3])
    if q_rc == 63:  # "This image format does not support checks"
        try:
            o = load_json(args[2])
        except Mismatch:
            if o_rc != 0:
                return 0
            print("qemu cannot check this format; ours exited 0 without JSON")
            return 1
        if not isinstance(o, dict) or counts(o) != {"leaks": 0, "corruptions": 0}:
            print("qemu cannot check this format; ours reports %s" % json.dumps(o))
            return 1
        return 0
    q = load_json(args[0])
    o = load_json(args[2])
    if not isinstance(o, dict):
        print("our check output is not a JSON object")
        return 1
    for k in ("leaks", "corruptions"):
        if k in o and type(o[k]) is not int:
            print("our %r is not an integer: %s" % (k, json.dumps(o[k])))
            return 1
    if counts(q) != counts(o):
        print("qemu (exit %d): %s; ours (exit %d): %s"
              % (q_rc, json.dumps(counts(q)), o_rc, json.dumps(counts(o))))
        return 1
    return 0


def rec(start, length, depth=0, present=True, zero=False, data=True, **extra):
    r = {"start": start, "length": length, "depth": depth,
         "present": present, "zero": zero, "data": data}
    r.update(extra)
    return r


SELFTESTS = [
    # (name, oracle, ours, allow_extra, ignore_holes, expect_equal)
    ("identical", [rec(0, 4096, offset=8192), rec(4096, 4096, present=False, zero=True, data=False)],
     [rec(0, 4096, offset=8192), rec(4096, 4096, present=False, zero=True, data=False)],
     False, False, True),
    ("offset differs", [rec(0, 4096, offset=8192)], [rec(0, 4096, offset=8704)], False, False, False),
    ("flag differs", [rec(0, 4096, zero=True, data=False)], [rec(0, 4096, zero=False, data=False)],
     False, False, False),
    ("depth differs", [rec(0, 4096, depth=1)], [rec(0, 4096, depth=0)], False, False, False),
    ("length differs", [rec(0, 4096)], [rec(0, 8192)], False, False, False),
    ("gap", [rec(0, 4096), rec(4096, 4096, zero=True, data=False)],
     [rec(0, 4096), rec(8192, 4096, zero=True, data=False)], False, False, False),
    ("missing offset", [rec(0, 4096, offset=8192)], [rec(0, 4096)], True, False, False),
    ("extra offset not allowed", [rec(0, 4096)], [rec(0, 4096, offset=8192)], False, False, False),
    ("extra offset and compressed allowed", [rec(0, 8192)],
     [rec(0, 4096, offset=8192, compressed=True), rec(4096, 4096, offset=65536, compressed=True)],
     True, False, True),
    ("extra unknown key", [rec(0, 4096)], [rec(0, 4096, foo=1)], True, False, False),
    ("split without reason", [rec(0, 8192, offset=0)], [rec(0, 4096, offset=0), rec(4096, 4096, offset=4096)],
     False, False, False),
    ("split without extra key", [rec(0, 8192)], [rec(0, 4096), rec(4096, 4096)], True, False, False),
    ("merged across qemu boundary", [rec(0, 4096, offset=0), rec(4096, 4096, offset=65536)],
     [rec(0, 8192, offset=0)], False, False, False),
    ("extra offset, but merged over a qemu boundary",
     [rec(0, 4096), rec(4096, 4096, zero=True, data=False)], [rec(0, 8192, offset=0)], True, False, False),
    ("file hole counted", [rec(0, 4096, offset=0), rec(4096, 4096, zero=True, offset=4096)],
     [rec(0, 8192, offset=0)], False, False, False),
    ("file hole ignored", [rec(0, 4096, offset=0), rec(4096, 4096, zero=True, offset=4096)],
     [rec(0, 8192, offset=0)], False, True, True),
    ("not a list", [rec(0, 4096)], {"start": 0}, False, False, False),
    ("empty maps", [], [], False, False, True),
]


def selftest():
    failed = 0
    for name, q, o, extra, holes, expect in SELFTESTS:
        try:
            diff = compare_maps(q, o, extra, holes)
        except Mismatch as e:
            diff = [str(e)]
        ok = (diff is None) == expect
        failed += not ok
        print("%s: compare_map %s%s" % ("PASS" if ok else "FAIL", name,
                                         "" if ok else ": " + " / ".join(diff or ["equal"])))
    return 1 if failed else 0


def usage():
    sys.stderr.write(__doc__)
    return 2


def main(argv):
    if not argv:
        return usage()
    if argv[0] == "--selftest":
        return selftest()
    cmds = {"map": cmd_map, "info": cmd_info, "check": cmd_check}
    if argv[0] not in cmds:
        return usage()
    try:
        return cmds[argv[0]](argv[1:])
    except Mismatch as e:
        print(e)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
