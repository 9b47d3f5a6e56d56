#!/usr/bin/env python3
"""`qemuspec up` against launching qemu by hand, measured in one run.

  raw         Popen(the rendered argv) until the QMP greeting, inside this process
  raw+python  the same from a fresh Python interpreter (what a hand-written Python launcher costs)
  up 1        `qemuspec up` of one paused-at-start machine (no readiness probe), fresh state
  up 10       `qemuspec up` of ten such machines (started in parallel)
  status 10   `qemuspec status --json` with the ten running

Bars from issue 4: up 1 / raw <= 1.5x; up 10 / up 1 <= 3x. Medians of --runs runs.
Usage: python3 bench/up.py [--runs N]
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
LAUNCH = r"""
import socket, subprocess, sys
path, argv = sys.argv[1], sys.argv[2:]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen()
argv = [a.replace("path=" + path, "fd=%d" % s.fileno()) for a in argv]
p = subprocess.Popen(argv, pass_fds=[s.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
c = socket.socket(socket.AF_UNIX); c.connect(path); c.recv(4096)
print(p.pid)
"""


def definition(directory: str, count: int) -> str:
    path = os.path.join(directory, f"bench{count}.toml")
    with open(path, "w") as f:
        for i in range(count):
            f.write(
                f'[machines.m{i}]\naccel = "tcg"\nmemory = "128M"\npaused = true\nserial = "none"\n\n'
            )
    return path


def raw_argv(directory: str) -> tuple[list[str], str]:
    from qemuspec.render import render
    from qemuspec.runtime.paths import Layout
    from qemuspec.spec.models import Machine

    machine = Machine(accel="tcg", memory="128M", paused=True, serial="none")
    lay = Layout(directory, directory, ("tcg",))
    return render(machine, "raw", lay), lay.qmp


def time_raw(directory: str) -> float:
    argv, qmp = raw_argv(directory)
    for path in (qmp, os.path.join(directory, "qmp-client.sock")):
        if os.path.exists(path):
            os.unlink(path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(qmp)
    server.listen()
    argv = [a.replace(f"path={qmp}", f"fd={server.fileno()}") for a in argv]
    began = time.perf_counter()
    proc = subprocess.Popen(
        argv, pass_fds=[server.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = socket.socket(socket.AF_UNIX)
    client.connect(qmp)
    client.recv(4096)
    took = time.perf_counter() - began
    proc.kill()
    proc.wait()
    client.close()
    server.close()
    return took


def time_raw_python(directory: str) -> float:
    argv, qmp = raw_argv(directory)
    for path in (qmp, os.path.join(directory, "qmp-client.sock")):
        if os.path.exists(path):
            os.unlink(path)
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", LAUNCH, qmp, *argv], capture_output=True, text=True, check=True
    ).stdout
    took = time.perf_counter() - began
    os.kill(int(out), 9)
    return took


def time_up(path: str, state: str) -> float:
    began = time.perf_counter()
    subprocess.run(CLI + ["up", path, "--state-dir", state], check=True, capture_output=True)
    took = time.perf_counter() - began
    return took


def down(path: str, state: str) -> None:
    subprocess.run(
        CLI + ["down", path, "--state-dir", state, "--timeout", "0.1"],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    os.environ["QEMUSPEC_ACCEL"] = "tcg"
    with tempfile.TemporaryDirectory(prefix="qemuspec-bench-") as tmp:
        one, ten = definition(tmp, 1), definition(tmp, 10)
        state = os.path.join(tmp, "state")
        results: dict[str, list[float]] = {
            k: [] for k in ("raw", "raw+python", "up 1", "up 10", "status 10")
        }
        for _ in range(args.runs):
            results["raw"].append(time_raw(tmp))
            results["raw+python"].append(time_raw_python(tmp))
            results["up 1"].append(time_up(one, state))
            down(one, state)
            results["up 10"].append(time_up(ten, state))
            began = time.perf_counter()
            subprocess.run(
                CLI + ["status", ten, "--json", "--state-dir", state],
                check=True,
                capture_output=True,
            )
            results["status 10"].append(time.perf_counter() - began)
            down(ten, state)
    med = {k: statistics.median(v) * 1000 for k, v in results.items()}
    print(f"median of {args.runs} runs, paused q35 machines (-S, 128M, TCG), no readiness probe")
    for name, ms in med.items():
        print(f"{name:<12} {ms:8.1f} ms")
    print(f"up 1 / raw          = {med['up 1'] / med['raw']:.1f}x  (bar 1.5x)")
    print(f"up 1 / raw+python   = {med['up 1'] / med['raw+python']:.1f}x")
    print(f"up 10 / up 1        = {med['up 10'] / med['up 1']:.2f}x (bar 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
