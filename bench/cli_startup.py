#!/usr/bin/env python3
"""Start-up time of `qemuspec --help`, `validate`, and of `status`/`down`/`plan` of an unchanged
definition (served from the definition cache, no pydantic), against the Python interpreter starting
and doing nothing, measured in one run (median of N runs each)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(argv: list[str], runs: int, env: dict | None = None) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=env
        )
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    entry = [sys.executable, "-m", "qemuspec.cli.main"]
    # as installed: compiled modules (an editable install under PYTHONDONTWRITEBYTECODE has none)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "qemuspec")], check=True
    )
    dev = os.path.join(ROOT, "machines", "dev.toml")
    state = ["--state-dir", os.path.join(tempfile.mkdtemp(prefix="qemuspec-bench-"), "state")]
    uncached = dict(os.environ, QEMUSPEC_CACHE="0")
    subprocess.run(
        entry + ["status", dev, *state], capture_output=True
    )  # fills the definition cache
    rows = {
        "python -c pass (baseline)": timed([sys.executable, "-c", "pass"], runs),
        # what any CLI of this shape imports from the standard library, before any work of its own
        "stdlib floor (imports only)": timed(
            [
                sys.executable,
                "-c",
                "import argparse, json, socket, dataclasses, selectors, "
                "subprocess, fcntl, hashlib, threading",
            ],
            runs,
        ),
        "qemuspec --help": timed(entry + ["--help"], runs),
        "qemuspec up --help": timed(entry + ["up", "--help"], runs),
        "qemuspec completion bash": timed(entry + ["completion", "bash"], runs),
        "qemuspec validate dev.toml": timed(
            entry + ["validate", os.path.join(ROOT, "machines", "dev.toml")], runs
        ),
        "qemuspec render dev.toml": timed(
            entry + ["render", os.path.join(ROOT, "machines", "dev.toml")], runs
        ),
        "qemuspec validate --probe (cached)": timed(
            entry + ["validate", "--probe", os.path.join(ROOT, "machines", "dev.toml")], runs
        ),
        "qemuspec status dev.toml": timed(entry + ["status", dev, *state], runs),
        "qemuspec status (QEMUSPEC_CACHE=0)": timed(
            entry + ["status", dev, *state], runs, uncached
        ),
        "qemuspec down dev.toml (stopped)": timed(entry + ["down", dev, *state], runs),
        "qemuspec plan dev.toml": timed(entry + ["plan", dev, *state], runs),
    }
    base = rows["python -c pass (baseline)"]
    print(f"median of {runs} runs")
    for name, ms in rows.items():
        print(
            f"{name:<36} {ms:7.1f} ms  (+{ms - base:.1f} ms over the interpreter, {ms / base:.2f}x)"
        )
    for row in ("qemuspec --help", "qemuspec status dev.toml", "qemuspec down dev.toml (stopped)"):
        print(
            f"goal: {row} within 2x the bare interpreter: {'met' if rows[row] <= 2 * base else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
