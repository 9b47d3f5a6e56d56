#!/usr/bin/env python3
"""`cp` through the guest agent against `cp --via ssh`, on one running machine, in one run.

  agent   `qemuspec cp FILE blob NAME:/tmp/blob` and back (guest-file-write/-read, base64, 48 KiB)
  ssh     the same with `--via ssh` (one ssh stream each way)

The guest is the test guest (guest/build.py), 256 MiB, TCG, cloud-init giving it the state
directory's key. Prints MiB/s each way for each, medians of --runs interleaved runs, and ssh / agent.
Issue 19 measured the agent at 2.2 MiB/s and ssh about 3x that.
Usage: python3 bench/cp_via.py [--runs N] [--mib M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "qemuspec.cli.main"]

DEFINITION = """
[machines.cp]
kernel = "{out}/vmlinuz"
initrd = "{out}/initrd.gz"
cmdline = "console=ttyS0 quiet"
memory = "256M"
rng = true
agent = true
stop_timeout = "10s"
[machines.cp.cloud_init]
user_data = \"\"\"#cloud-config
ssh_authorized_keys:
  - {{{{ ssh_public_key }}}}
\"\"\"
[machines.cp.ready]
agent = true
ssh = true
[[machines.cp.nics]]
forwards = [{{ host = 0, guest = 22 }}]
"""


def timed(*args: str) -> float:
    began = time.monotonic()
    subprocess.run([*CLI, *args], check=True, capture_output=True)
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("QEMUSPEC_ACCEL", "tcg")
    with tempfile.TemporaryDirectory(prefix="qemuspec-bench-cp-") as tmp:
        path = os.path.join(tmp, "cp.toml")
        with open(path, "w") as f:
            f.write(DEFINITION.format(out=os.path.join(ROOT, "guest", "out")))
        blob = os.path.join(tmp, "blob")
        with open(blob, "wb") as f:
            f.write(os.urandom(args.mib << 20))
        subprocess.run([*CLI, "up", path, "--quiet"], check=True)
        try:
            rates: dict[str, list[float]] = {
                k: [] for k in ("agent in", "agent out", "ssh in", "ssh out")
            }
            for _ in range(args.runs):
                for via in ("agent", "ssh"):
                    back = os.path.join(tmp, f"back-{via}")
                    seconds = timed("cp", "--via", via, path, blob, "cp:/tmp/blob")
                    rates[f"{via} in"].append(args.mib / seconds)
                    seconds = timed("cp", "--via", via, path, "cp:/tmp/blob", back)
                    rates[f"{via} out"].append(args.mib / seconds)
                    os.remove(back)
        finally:
            subprocess.run([*CLI, "down", path, "--quiet"], check=False)
    median = {k: statistics.median(v) for k, v in rates.items()}
    for key, value in median.items():
        print(f"{key:<10} {value:6.2f} MiB/s")
    for way in ("in", "out"):
        print(f"ssh / agent ({way}): {median[f'ssh {way}'] / median[f'agent {way}']:.2f}x")


if __name__ == "__main__":
    main()
