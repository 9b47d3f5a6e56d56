#!/usr/bin/env python3
"""Start-up time of `qemuspec --help` and of `qemuspec validate`, against the Python interpreter
starting and doing nothing, measured in one run (median of N runs each)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    entry = [sys.executable, "-m", "qemuspec.cli.main"]
    rows = {
        "python -c pass (baseline)": timed([sys.executable, "-c", "pass"], runs),
        "qemuspec --help": timed(entry + ["--help"], runs),
        "qemuspec up --help": timed(entry + ["up", "--help"], runs),
        "qemuspec completion bash": timed(entry + ["completion", "bash"], runs),
        "qemuspec validate dev.toml": timed(entry + ["validate", os.path.join(ROOT, "machines", "dev.toml")], runs),
        "qemuspec render dev.toml": timed(entry + ["render", os.path.join(ROOT, "machines", "dev.toml")], runs),
        "qemuspec validate --probe (cached)": timed(entry + ["validate", "--probe", os.path.join(ROOT, "machines", "dev.toml")], runs),
    }
    base = rows["python -c pass (baseline)"]
    print(f"median of {runs} runs")
    for name, ms in rows.items():
        print(f"{name:<36} {ms:7.1f} ms  (+{ms - base:.1f} ms over the interpreter, {ms / base:.2f}x)")
    print(f"goal: qemuspec --help within 2x the bare interpreter: {'met' if rows['qemuspec --help'] <= 2 * base else 'NOT met'}")


if __name__ == "__main__":
    main()
