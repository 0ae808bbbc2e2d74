#!/usr/bin/env python3
"""Host-side check of `pcisim-guest agent` over a pseudo-terminal.

Starts the agent on the slave side of a pty (standing in for the guest's
/dev/ttyS1) and talks the JSON-lines protocol from the master side, checking
raw mode (no echo), run (output, exit code, timeout), write_file/read_file,
errors, long lines, concurrency and poweroff.

The agent runs inside a new user namespace (`unshare --user --map-root-user`)
so that its reboot(RB_POWER_OFF) fails with EPERM instead of powering off the
host: the script refuses to run otherwise.

With --pid1 the agent runs as PID 1 of a new PID namespace (as it does in the
guest, exec'd by /init): orphans must be reaped, and poweroff ends the namespace.

usage: tools/agent_pty_check.py [--pid1] [path/to/pcisim-guest]
"""

import json
import os
import select
import subprocess
import sys
import termios
import time

DEFAULT_BIN = "target/x86_64-unknown-linux-gnu/release/pcisim-guest"


class Agent:
    def __init__(self, binary, pid1):
        self.master, self.slave = os.openpty()
        name = os.ttyname(self.slave)
        ns = ["unshare", "--user", "--map-root-user"]
        if pid1:
            ns += ["--pid", "--fork", "--mount-proc"]
        # Keep the slave in its default (cooked, echoing) mode: the agent must
        # switch it to raw mode itself.
        self.proc = subprocess.Popen(
            ns + [binary, "agent", "--port", name],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.buf = b""

    def send_raw(self, data):
        os.write(self.master, data)

    def send(self, obj):
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def line(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line within {timeout}s; have {self.buf[:200]!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise EOFError(f"pty closed; have {self.buf[:200]!r}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def reply(self, timeout=10.0):
        raw = self.line(timeout)
        try:
            return json.loads(raw)
        except ValueError:
            raise AssertionError(f"reply is not JSON: {raw[:300]!r}")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok - {what}")


def main():
    args = sys.argv[1:]
    pid1 = "--pid1" in args
    args = [a for a in args if a != "--pid1"]
    binary = args[0] if args else DEFAULT_BIN
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "true"], capture_output=True
    )
    if probe.returncode != 0:
        print("cannot create a user namespace; refusing to run (poweroff would be real)")
        return 4

    a = Agent(binary, pid1)
    ready = a.reply()
    check(ready.get("ready") is True, f"ready line: {ready}")
    check(isinstance(ready.get("kernel"), str) and ready["kernel"], "ready has kernel")
    check(isinstance(ready.get("uptime_ms"), int), "ready has uptime_ms")

    attrs = termios.tcgetattr(a.slave)
    lflag = attrs[3]
    check(lflag & termios.ECHO == 0, "slave has ECHO off")
    check(lflag & termios.ICANON == 0, "slave has ICANON off")
    check(attrs[1] & termios.OPOST == 0, "slave has OPOST off")

    # run: the first thing back must be the reply, not an echo of the request.
    a.send({"id": 1, "op": "run", "argv": ["/bin/echo", "hello", "world"], "timeout_ms": 5000})
    r = a.reply()
    check(r.get("id") == 1, f"run reply id (no echo): {r}")
    check(r["exit"] == 0 and r["signal"] is None and r["timed_out"] is False, "echo exit 0")
    check(r["stdout"] == "hello world\n" and r["stderr"] == "", "echo stdout captured")
    check(isinstance(r["elapsed_ms"], int), "elapsed_ms present")

    a.send({"id": 2, "op": "run", "argv": ["/bin/sh", "-c", "echo o; echo e >&2; cat; exit 7"]})
    r = a.reply()
    check(r["id"] == 2 and r["exit"] == 7, f"exit code 7: {r}")
    check(r["stdout"] == "o\n" and r["stderr"] == "e\n", "stdout/stderr separate, stdin is /dev/null")

    t0 = time.monotonic()
    a.send({"id": 3, "op": "run", "argv": ["/bin/sh", "-c", "echo before; sleep 30"], "timeout_ms": 700})
    r = a.reply(timeout=10)
    dt = time.monotonic() - t0
    check(r["id"] == 3 and r["timed_out"] is True, f"timeout flagged: {r}")
    check(r["exit"] is None and r["signal"] == 9, "killed with SIGKILL")
    check(r["stdout"] == "before\n", "output before the timeout kept")
    check(dt < 5, f"timeout reply after {dt:.2f}s")

    a.send({"id": 4, "op": "run", "argv": ["/nonexistent/prog"]})
    r = a.reply()
    check(r["id"] == 4 and "error" in r, f"spawn failure is an error: {r}")

    path = f"/tmp/pcisim-agent-check-{os.getpid()}"
    a.send({"id": 5, "op": "write_file", "path": path, "data": "1\n"})
    r = a.reply()
    check(r == {"id": 5, "ok": True}, f"write_file ok: {r}")
    with open(path) as f:
        check(f.read() == "1\n", "write_file content")
    a.send({"id": 6, "op": "read_file", "path": path})
    r = a.reply()
    check(r == {"id": 6, "ok": True, "data": "1\n"}, f"read_file: {r}")
    os.unlink(path)
    a.send({"id": 7, "op": "write_file", "path": "/nonexistent-dir/x", "data": "1"})
    r = a.reply()
    check(r["id"] == 7 and r["ok"] is False and "nonexistent" in r["error"], f"write_file error: {r}")

    a.send_raw(b"{this is not json\n")
    r = a.reply()
    check(r.get("id") is None and "malformed JSON" in r.get("error", ""), f"malformed JSON: {r}")
    a.send({"id": 8, "op": "dance"})
    r = a.reply()
    check(r["id"] == 8 and "unknown op" in r["error"], f"unknown op: {r}")
    a.send_raw(b'{"id":9,"op":"run"}\r\n\n')
    r = a.reply()
    check(r["id"] == 9 and "argv" in r["error"], f"missing argv (CRLF line, blank line ignored): {r}")

    # Long lines both ways, written in small pieces (partial reads).
    big = "x" * (1 << 20)
    path = f"/tmp/pcisim-agent-big-{os.getpid()}"
    req = json.dumps({"id": 10, "op": "write_file", "path": path, "data": big}).encode() + b"\n"
    for i in range(0, len(req), 3000):
        a.send_raw(req[i : i + 3000])
    r = a.reply(timeout=30)
    check(r == {"id": 10, "ok": True}, "1 MiB write_file in pieces")
    check(os.path.getsize(path) == len(big), "1 MiB written")
    a.send({"id": 11, "op": "run", "argv": ["/bin/cat", path]})
    r = a.reply(timeout=30)
    check(r["id"] == 11 and r["stdout"] == big, "1 MiB stdout in the reply")
    os.unlink(path)
    a.send({"id": 12, "op": "run", "argv": ["/bin/printf", "caf\\303\\251 \\001 \"q\"\\n"]})
    r = a.reply()
    check(r["stdout"] == 'café \x01 "q"\n', f"UTF-8, control chars and quotes survive: {r['stdout']!r}")

    # Requests run concurrently: a ping overtakes a slow run.
    a.send({"id": 13, "op": "run", "argv": ["/bin/sleep", "1"]})
    a.send({"id": 14, "op": "ping"})
    first = a.reply()
    second = a.reply(timeout=10)
    check(first == {"id": 14, "ok": True}, f"ping answered while run is in progress: {first}")
    check(second["id"] == 13 and second["exit"] == 0, "slow run answered afterwards")

    if pid1:
        a.send({"id": 30, "op": "run", "argv": ["/bin/sh", "-c", "echo $PPID"]})
        r = a.reply()
        check(r["stdout"] == "1\n", f"agent is PID 1 (the parent of its children): {r['stdout']!r}")
        a.send({"id": 31, "op": "run", "argv": ["/bin/sh", "-c", "sleep 0.2 >/dev/null 2>&1 & echo bg"]})
        check(a.reply()["stdout"] == "bg\n", "background child started")
        time.sleep(1.5)
        a.send({"id": 32, "op": "run", "argv": ["/bin/sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status; true"]})
        r = a.reply()
        check(r["stdout"] == "", f"orphan reaped, no zombies: {r['stdout']!r}")
        a.send({"id": 33, "op": "poweroff"})
        r = a.reply()
        check(r == {"id": 33, "ok": True}, f"poweroff ok reply: {r}")
        rc = a.proc.wait(timeout=10)
        check(True, f"PID namespace ended by reboot(RB_POWER_OFF) (unshare exit {rc})")
        print("all agent checks passed (PID 1 mode)")
        return 0

    # poweroff: replies ok first; here reboot() fails (user namespace) and the
    # agent reports it and keeps serving.
    a.send({"id": 15, "op": "poweroff"})
    r = a.reply()
    check(r == {"id": 15, "ok": True}, f"poweroff ok reply: {r}")
    r = a.reply()
    check(r["id"] == 15 and "reboot" in r.get("error", ""), f"reboot failure reported: {r}")
    a.send({"id": 16, "op": "ping"})
    check(a.reply() == {"id": 16, "ok": True}, "still serving")

    a.proc.terminate()
    a.proc.wait(timeout=5)
    err = a.proc.stderr.read().decode(errors="replace")
    print("# agent stderr:")
    for l in err.splitlines():
        print("#   " + l)
    print("all agent checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
