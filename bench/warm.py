#!/usr/bin/env python3
"""Warm start against a cold boot, measured in one run with one definition per guest.

  cold   `qemuspec up` with no saved state: boot, readiness, then the save (its time shown apart)
  warm   `qemuspec up` restoring the state the cold run saved
  hand   the same restore done by hand, the nearest fair baseline: qemu started on the argv qemuspec
         ran (its sockets made by qemu itself) with `-incoming "exec:cat STATE"`, timed from launch
         until the guest's HTTP server answers through the forward; no clock or RNG work

Two guests:
  demo   machines/dev.toml (the test guest: serial marker, HTTP through a forward, guest agent), run
         with `up --warm`; bar: warm <= 10% of cold
  256M   the same guest with 256 MiB, ready = HTTP through a forward, no agent; bar: warm < 0.3 s

Each figure is a median of --runs runs (>= 5). "up" is the wall time of the `qemuspec up` process;
"ready" is launch to ready inside the supervisor (QEMUSPEC_READY), without the CLI's own start-up
and, for cold runs, without the save. Between cold runs the saved state is deleted.
Usage: python3 bench/warm.py [--runs N]   (QEMUSPEC_ACCEL=tcg by default, as tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "qemuspec.cli.main"]

SMALL = """
[machines.small]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "256M"
rng = true
warm = true
nics = [{{ forwards = [{{ host = 0, guest = 80 }}], device_options = {{ romfile = "" }} }}]
ready = {{ tcp = 80, timeout = "120s" }}
"""


def run(*args: str) -> float:
    began = time.perf_counter()
    result = subprocess.run([*CLI, *args], capture_output=True, text=True)
    took = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"qemuspec {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return took


def last_event(state: str, name: str) -> dict:
    with open(os.path.join(state, "events.jsonl")) as f:
        return [e for e in map(json.loads, f) if e["event"] == name][-1]


def measure(path: str, machine: str, runs: int, extra: list[str]) -> dict:
    state = os.path.join(os.path.dirname(path), ".qemuspec", machine)
    figures: dict[str, list[float]] = {
        "cold up": [],
        "cold ready": [],
        "save": [],
        "state MiB": [],
        "warm up": [],
        "warm ready": [],
    }
    for _ in range(runs):
        shutil.rmtree(os.path.join(state, "warm"), ignore_errors=True)
        figures["cold up"].append(run("up", path, "--no-probe", *extra))
        figures["cold ready"].append(last_event(state, "QEMUSPEC_READY")["data"]["seconds"])
        saved = last_event(state, "QEMUSPEC_SAVED")["data"]
        figures["save"].append(saved["seconds"])
        figures["state MiB"].append(saved["bytes"] / 2**20)
        run("down", path)
    for _ in range(runs):
        figures["warm up"].append(run("up", path, "--no-probe", *extra))
        ready = last_event(state, "QEMUSPEC_READY")
        if ready["data"].get("boot") != "warm":
            sys.exit(f"{machine}: expected a warm start, got {ready}")
        figures["warm ready"].append(ready["data"]["seconds"])
        if "argv" not in figures:
            with open(os.path.join(state, "state.json")) as f:
                figures["argv"] = json.load(f)["exec_argv"]
        run("down", path)
    argv = figures.pop("argv")
    figures["hand"] = [by_hand(argv, os.path.join(state, "warm", "memory")) for _ in range(runs)]
    return {key: statistics.median(values) for key, values in figures.items()}


def by_hand(exec_argv: list[str], memory: str) -> float:
    """Restore the saved state as a user would by hand; seconds from launch to an HTTP answer."""
    import re
    import socket

    with tempfile.TemporaryDirectory(prefix="qemuspec-hand-") as tmp:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        argv = []
        for arg in exec_argv:
            arg = re.sub(r"\bfd=(\d+)", lambda m: f"path={tmp}/{m.group(1)}.sock", arg)
            arg = re.sub(
                r"hostfwd=tcp:127\.0\.0\.1:\d+-:80\b", f"hostfwd=tcp:127.0.0.1:{port}-:80", arg
            )
            arg = re.sub(r"\blogfile=[^,]*", f"logfile={tmp}/serial.log", arg)
            argv.append(arg)
        argv[argv.index("-incoming") + 1] = (
            f"exec:cat {memory}"  # was "defer" (qemuspec passes an fd)
        )
        argv[argv.index("-pidfile") + 1] = os.path.join(tmp, "qemu.pid")
        qmp = os.path.join(
            tmp, exec_argv[exec_argv.index("-mon") - 1].split("fd=")[1].split(",")[0] + ".sock"
        )
        began = time.perf_counter()
        deadline = time.monotonic() + 60
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # The state was saved with the CPUs stopped, so it loads paused: `cont` once loaded.
            while not os.path.exists(qmp):
                time.sleep(0.002)
            with socket.socket(socket.AF_UNIX) as q:
                q.connect(qmp)
                f = q.makefile("rwb")
                f.readline()

                def ask(command: str) -> dict:
                    f.write(json.dumps({"execute": command}).encode() + b"\n")
                    f.flush()
                    while True:
                        reply = json.loads(f.readline())
                        if "return" in reply or "error" in reply:
                            return reply

                ask("qmp_capabilities")
                while ask("query-status")["return"]["status"] == "inmigrate":
                    time.sleep(0.002)
                ask("cont")
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                        sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
                        if sock.recv(256):
                            return time.perf_counter() - began
                except OSError:
                    pass
                if proc.poll() is not None:
                    sys.exit(f"the by-hand restore exited ({proc.returncode}): {' '.join(argv)}")
                time.sleep(0.005)
            sys.exit(f"the by-hand restore did not answer within 60 s: {' '.join(argv)}")
        finally:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("QEMUSPEC_ACCEL", "tcg")
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "guest", "build.py")], check=True, capture_output=True
    )
    kernel, initrd = (os.path.join(ROOT, "guest", "out", f) for f in ("vmlinuz", "initrd.gz"))
    with tempfile.TemporaryDirectory(prefix="qemuspec-warm-") as tmp:
        demo = os.path.join(tmp, "dev.toml")
        text = open(os.path.join(ROOT, "machines", "dev.toml")).read()
        text = (
            text.replace("../guest/out/vmlinuz", kernel)
            .replace("../guest/out/initrd.gz", initrd)
            .replace("host = 8080", "host = 0")
        )
        open(demo, "w").write(text)
        small = os.path.join(tmp, "small.toml")
        open(small, "w").write(SMALL.format(kernel=kernel, initrd=initrd))
        try:
            results = {
                "demo": measure(demo, "dev", args.runs, ["--warm"]),
                "256M": measure(small, "small", args.runs, []),
            }
        finally:
            for path in (demo, small):
                subprocess.run([*CLI, "down", path], capture_output=True)
    accel = os.environ["QEMUSPEC_ACCEL"]
    print(f"medians of {args.runs} runs, accel {accel}, 2-core box; seconds unless noted")
    print(
        f"{'guest':<6} {'cold up':>8} {'cold ready':>10} {'save':>6} {'state':>8} {'warm up':>8} {'warm ready':>10} {'hand':>6} {'up ratio':>8} {'ready ratio':>11} {'hand ratio':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<6} {r['cold up']:8.2f} {r['cold ready']:10.2f} {r['save']:6.2f} {r['state MiB']:6.0f}Mi {r['warm up']:8.2f} {r['warm ready']:10.3f}"
            f" {r['hand']:6.3f} {r['warm up'] / r['cold up']:8.1%} {r['warm ready'] / r['cold ready']:11.1%} {r['hand'] / r['cold up']:10.1%}"
        )
    demo_r, small_r = results["demo"], results["256M"]
    print(
        f"bar: demo warm up <= 10% of cold up: {demo_r['warm up'] / demo_r['cold up']:.1%} "
        f"({'met' if demo_r['warm up'] <= 0.1 * demo_r['cold up'] else 'NOT met'})"
    )
    print(
        f"bar: 256M warm ready < 0.3 s: {small_r['warm ready']:.3f} s ({'met' if small_r['warm ready'] < 0.3 else 'NOT met'});"
        f" with the CLI's own start-up (`up` wall time): {small_r['warm up']:.3f} s ({'met' if small_r['warm up'] < 0.3 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
