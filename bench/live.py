#!/usr/bin/env python3
"""A live `up` against a restart `up`, measured in one run on one machine (the test guest, TCG).

  live     `qemuspec up` after a supervisor-only change (stop_timeout): the definition is recorded,
           the supervisor re-reads it (SIGHUP), qemu keeps running (same pid)
  restart  `qemuspec up` after a restart-class change (memory without a balloon): stop (ACPI),
           start, boot to the serial marker
  noop     `qemuspec up` with nothing changed: the CLI's own floor, the baseline of both

Each figure is the median wall time of the `qemuspec up` process over --runs runs (each run flips
the field back and forth, so every `up` has a change to apply). The live `up` also checks that the
qemu pid did not change.
Usage: python3 bench/live.py [--runs N]   (QEMUSPEC_ACCEL=tcg by default, as tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "qemuspec.cli.main"]

MACHINE = """
[machines.box]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "{memory}"
rng = true
stop_timeout = "{stop}"
ready = {{ serial = "{marker}", timeout = "120s" }}
"""


def up(path: str) -> tuple[float, dict]:
    began = time.perf_counter()
    result = subprocess.run([*CLI, "up", path, "--json"], capture_output=True, text=True)
    took = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"qemuspec up failed:\n{result.stdout}{result.stderr}")
    return took, json.loads(result.stdout)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("QEMUSPEC_ACCEL", "tcg")
    sys.path.insert(0, os.path.join(ROOT, "guest"))
    import build  # the test guest, built once into guest/out

    out = os.path.join(ROOT, "guest", "out")
    stamp = build.build(out, os.path.join(ROOT, "guest", "cache"))
    guest = {
        "kernel": os.path.join(out, "vmlinuz"),
        "initrd": os.path.join(out, "initrd.gz"),
        "marker": stamp["marker"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "box.toml")

        def write(memory: str, stop: str) -> None:
            with open(path, "w") as f:
                f.write(MACHINE.format(memory=memory, stop=stop, **guest))

        write("256M", "5s")
        try:
            up(path)
            times: dict[str, list[float]] = {"noop": [], "live": [], "restart": []}
            memory = "256M"
            for run in range(args.runs):
                times["noop"].append(up(path)[0])
                before = up(path)[1]["pid"]
                write(memory, f"{6 + run % 2}s")
                took, outcome = up(path)
                if outcome["action"] != "changed" or outcome["pid"] != before:
                    sys.exit(f"the live up did not change in place: {outcome}")
                times["live"].append(took)
                memory = "288M" if memory == "256M" else "256M"
                write(memory, f"{6 + run % 2}s")
                took, outcome = up(path)
                if outcome["action"] != "restarted":
                    sys.exit(f"the restart up did not restart: {outcome}")
                times["restart"].append(took)
        finally:
            subprocess.run([*CLI, "down", path], capture_output=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"runs: {args.runs} (medians, wall time of `qemuspec up`)")
    for name in ("noop", "live", "restart"):
        print(f"  {name:<8} {med[name]:6.2f} s")
    print(
        f"  live is {med['live'] / med['restart'] * 100:.1f}% of a restart; "
        f"{med['live'] - med['noop']:.2f} s over a no-op up"
    )


if __name__ == "__main__":
    main()
