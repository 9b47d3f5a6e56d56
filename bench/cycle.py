#!/usr/bin/env python3
"""A real-guest `up` + `down` cycle against the same cycle by hand, measured in one run.

  hand       a fresh Python launcher (what a hand-written script costs): start qemu on the argv
             qemuspec renders (qemu makes its own sockets), wait until the guest's HTTP server
             answers through the forward, ACPI power-down over QMP, wait for qemu to exit
  qemuspec   `qemuspec up FILE` (ready = the same HTTP answer) then `qemuspec down FILE`
  status     `qemuspec status FILE` while it runs, against `python -c pass`

The guest is the test guest (guest/build.py), 256 MiB, TCG. Bar from issue 13: qemuspec / hand
<= 1.15x. Medians of --runs runs (the two are interleaved, so drift hits both).
Usage: python3 bench/cycle.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLI = [sys.executable, "-m", "qemuspec.cli.main"]

DEFINITION = """
[machines.cycle]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "256M"
rng = true
stop_timeout = "30s"
nics = [{{ forwards = [{{ host = {port}, guest = 80 }}], device_options = {{ romfile = "" }} }}]
ready = {{ tcp = 80, timeout = "120s" }}
"""

LAUNCHER = r"""
import json, socket, subprocess, sys, time
port, qmp_path, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
import atexit
atexit.register(lambda: proc.poll() is None and proc.kill())  # a failed run leaves no qemu behind
while True:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            if s.recv(256):
                break
    except OSError:
        pass
    time.sleep(0.05)
q = socket.socket(socket.AF_UNIX)
q.connect(qmp_path)
f = q.makefile("rwb")
f.readline()
def ask(cmd):
    f.write(json.dumps({"execute": cmd}).encode() + b"\n"); f.flush()
    while b'"return"' not in f.readline():
        pass
ask("qmp_capabilities")
ask("system_powerdown")
try:
    proc.wait(30)  # the definition's stop_timeout, then quit: what `qemuspec down` does
except subprocess.TimeoutExpired:
    ask("quit")
    proc.wait(10)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hand_argv(path: str, tmp: str) -> tuple[list[str], str]:
    from qemuspec.render import render
    from qemuspec.runtime.paths import Layout
    from qemuspec.spec.loader import load

    machine = load(path).machines["cycle"]
    lay = Layout(os.path.join(tmp, "hand"), os.path.join(tmp, "hand-run"), ("tcg",))
    os.makedirs(lay.state_dir, exist_ok=True)
    os.makedirs(lay.run_dir, mode=0o700, exist_ok=True)
    return render(machine, "cycle", lay), lay.qmp


def timed(argv: list[str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    took = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ["QEMUSPEC_ACCEL"] = "tcg"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "guest", "build.py")], check=True, capture_output=True
    )
    kernel, initrd = (os.path.join(ROOT, "guest", "out", f) for f in ("vmlinuz", "initrd.gz"))
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "qemuspec")], check=True
    )
    with tempfile.TemporaryDirectory(prefix="qemuspec-cycle-") as tmp:
        port = free_port()
        path = os.path.join(tmp, "cycle.toml")
        with open(path, "w") as f:
            f.write(DEFINITION.format(kernel=kernel, initrd=initrd, port=port))
        argv, qmp = hand_argv(path, tmp)
        figures: dict[str, list[float]] = {
            "hand": [],
            "qemuspec": [],
            "up": [],
            "down": [],
            "status": [],
            "python": [],
        }
        try:
            timed(
                [*CLI, "validate", path]
            )  # fills the definition cache, as any earlier command would
            for _ in range(args.runs):
                if os.path.exists(qmp):
                    os.unlink(qmp)
                figures["hand"].append(
                    timed([sys.executable, "-c", LAUNCHER, str(port), qmp, *argv])
                )
                up = timed([*CLI, "up", path])
                figures["status"].append(timed([*CLI, "status", path]))
                figures["python"].append(timed([sys.executable, "-c", "pass"]))
                down = timed([*CLI, "down", path])
                figures["up"].append(up)
                figures["down"].append(down)
                figures["qemuspec"].append(up + down)
        finally:
            subprocess.run([*CLI, "down", path], capture_output=True)
            shutil.rmtree(os.path.join(tmp, ".qemuspec"), ignore_errors=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(
        f"medians of {args.runs} runs, 256 MiB test guest, TCG, ready = HTTP through a forward; seconds"
    )
    for name in ("hand", "qemuspec", "up", "down"):
        print(f"{name:<10} {med[name]:7.3f}")
    print(
        f"status     {med['status'] * 1000:7.1f} ms   (python -c pass {med['python'] * 1000:.1f} ms, {med['status'] / med['python']:.2f}x)"
    )
    ratio = med["qemuspec"] / med["hand"]
    print(f"qemuspec / hand = {ratio:.3f}x (bar 1.15x: {'met' if ratio <= 1.15 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
