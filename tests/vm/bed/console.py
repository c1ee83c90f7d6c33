#!/usr/bin/env python3
"""Drive a VM's serial console: run QEMU, then wait for text, type, hotplug.

  tests/vm/bed/console.py [--log FILE] [--timeout S] [--qmp SOCKET] STEP... -- QEMU ARGS...

QEMU ARGS must route the serial console to stdio (-serial stdio); with --qmp,
they must also open that QMP socket (-qmp unix:SOCKET,server=on,wait=off).
The console goes to stdout and to the log (each line there with the seconds
since QEMU started), escape sequences and CRs removed.
Steps run in order:

  expect:REGEX       wait (within the timeout) for REGEX in console output
                     not seen by an earlier expect
  send:TEXT          type TEXT (\\n, \\r, \\t escapes), a character at a time
  sleep:SECONDS      wait
  qmp:JSON           a QMP command, e.g. {"execute": "device_add", ...}
  count:N:REGEX      at the end: REGEX matched exactly N times in the whole log
  absent:REGEX       at the end: REGEX never matched
  end                wait for QEMU to exit (poweroff)

Exit 0 when every step passed, 1 when one failed (the reason is the last
line on stderr), 124 on timeout.
"""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[cDEHM78=>]")


class Console:
    def __init__(self, args, log):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.buf = ""
        self.pos = 0  # where the next expect starts
        self.lock = threading.Condition()
        self.log = open(log, "w") if log else None
        self.done = False
        self.t0 = time.monotonic()
        self.at_line_start = True
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        pending = b""
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                break
            pending += chunk
            # keep a possibly cut escape sequence for the next chunk
            cut = pending.rfind(b"\x1b")
            if cut >= 0 and len(pending) - cut < 8:
                data, pending = pending[:cut], pending[cut:]
            else:
                data, pending = pending, b""
            text = ANSI.sub(b"", data).replace(b"\r", b"").decode("utf-8", "replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            if self.log:
                # the log gets the time since QEMU started at each line
                for part in text.splitlines(keepends=True):
                    if self.at_line_start:
                        self.log.write("[%6.1f] " % (time.monotonic() - self.t0))
                    self.log.write(part)
                    self.at_line_start = part.endswith("\n")
                self.log.flush()
            with self.lock:
                self.buf += text
                self.lock.notify_all()
        with self.lock:
            self.done = True
            self.lock.notify_all()

    def expect(self, regex, deadline):
        r = re.compile(regex)
        with self.lock:
            while True:
                m = r.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    return True
                if self.done:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(regex)
                self.lock.wait(min(left, 1.0))

    def send(self, text):
        for c in text:
            self.proc.stdin.write(c.encode())
            self.proc.stdin.flush()
            time.sleep(0.02)

    def wait_end(self, deadline):
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU to exit")
            time.sleep(0.2)
        with self.lock:
            while not self.done and time.monotonic() < deadline:
                self.lock.wait(0.5)


def qmp(path, command, deadline):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            s.connect(path)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError("QMP socket")
            time.sleep(0.2)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    for cmd in ({"execute": "qmp_capabilities"}, json.loads(command)):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
        if "error" in reply:
            s.close()
            return reply["error"].get("desc", str(reply))
    s.close()
    return None


def unescape(t):
    return t.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t")


def main():
    argv = sys.argv[1:]
    log, timeout, qmp_path, steps = None, 300.0, None, []
    while argv and argv[0] != "--":
        a = argv.pop(0)
        if a == "--log":
            log = argv.pop(0)
        elif a == "--timeout":
            timeout = float(argv.pop(0))
        elif a == "--qmp":
            qmp_path = argv.pop(0)
        else:
            steps.append(a)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    qemu = argv[1:]
    deadline = time.monotonic() + timeout
    con = Console(qemu, log)
    failed = None
    try:
        for step in steps:
            kind, _, arg = step.partition(":")
            if kind == "expect":
                if not con.expect(arg, deadline):
                    failed = "the VM ended before /%s/ was seen" % arg
                    break
            elif kind == "send":
                con.send(unescape(arg))
            elif kind == "sleep":
                time.sleep(float(arg))
            elif kind == "qmp":
                err = qmp(qmp_path, arg, deadline)
                if err:
                    failed = "QMP %s: %s" % (arg, err)
                    break
            elif kind == "end":
                con.wait_end(deadline)
            elif kind in ("count", "absent"):
                pass
            else:
                failed = "unknown step " + step
                break
    except TimeoutError as e:
        failed = "timeout (%ds) waiting for %s" % (timeout, e)
        rc = 124
    else:
        rc = 1 if failed else 0
    if con.proc.poll() is None:
        con.proc.kill()
        con.proc.wait()
    time.sleep(0.2)
    if not failed:
        for step in steps:
            kind, _, arg = step.partition(":")
            if kind == "count":
                n, _, regex = arg.partition(":")
                got = len(re.findall(regex, con.buf))
                if got != int(n):
                    failed = "/%s/ seen %d times, not %s" % (regex, got, n)
            elif kind == "absent" and re.search(arg, con.buf):
                failed = "/%s/ was seen" % arg
        rc = 1 if failed else 0
    if failed:
        print("\nconsole: FAILED: " + failed, file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
