#!/usr/bin/env python3
"""Cases on fresh restores of one checkpoint against cold boots, measured in one run on this box.

  cold x12   the 12 commands as 12 cold `qemuspec run`s of the demo guest (warm = false), one after
             another: what CI does today, the baseline
  test       `qemuspec test` of the same 12 commands as [tests.NAME] cases, each on its own fresh
             restore (default -j: what the host carries), the checkpoint already made ("warm"), and
             once including the checkpoint's cold boot, setup and save ("first")
  run        `qemuspec run` of the warm demo guest (a restore) against the same `run` cold; the
             median of --runs each
  memory     the qemu processes' RSS and PSS with 1 and with 3 restores running at once: what one
             more parallel restore costs

Goals (issue 17): test at least 6x faster than the cold runs; a warm `run` at most 20% of a cold one.
The guest is machines/dev.toml's (the test guest: serial marker, HTTP through a forward, the agent),
with its forwards on free ports. Usage: python3 bench/forked.py [--runs N]  (QEMUSPEC_ACCEL=tcg).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "qemuspec.cli.main"]
CASES = 12
COMMAND = "uname -r >/dev/null && wget -qO- http://127.0.0.1/ | grep -q ok && echo case-{i}"


def definition(directory: str, warm: bool) -> str:
    demo = open(os.path.join(ROOT, "machines", "dev.toml")).read()
    demo = demo.replace("host = 8080,", "host = 0,")
    demo = demo.replace("../guest/out/", os.path.join(ROOT, "guest", "out") + "/")
    demo = demo.split("\n[tests.", 1)[0]  # the demo's own cases replaced by the bench's
    demo = demo.replace("[machines.dev]\n", f"[machines.dev]\nwarm = {str(warm).lower()}\n", 1)
    demo += "".join(
        f'\n[tests.case{i:02d}]\ncommand = "{COMMAND.format(i=i)}"\n' for i in range(CASES)
    )
    path = os.path.join(directory, "warm.toml" if warm else "cold.toml")
    with open(path, "w") as f:
        f.write(demo)
    return path


def timed(env: dict, *args: str) -> float:
    began = time.perf_counter()
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env)
    took = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"qemuspec {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return took


def memory(env: dict, path: str) -> tuple[float, float]:
    """(RSS MiB, PSS MiB) of the qemu processes of 1 and of 3 restores at once: per extra restore."""
    from contextlib import ExitStack

    from qemuspec.runtime import fresh
    from qemuspec.settings import Settings

    settings = Settings.from_env(env)

    def sizes(pids: list[int]) -> tuple[float, float]:
        rss = pss = 0
        for pid in pids:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        return rss / 1024, pss / 1024

    figures = []
    for count in (1, 3):
        with ExitStack() as stack:
            pids = []
            for _ in range(count):
                inst = stack.enter_context(fresh.started(path, "dev", settings, warm=True))
                assert inst.process is not None
                pids.append(inst.process.pid)
            figures.append(sizes(pids))
    (rss1, pss1), (rss3, pss3) = figures
    return (rss3 - rss1) / 2, (pss3 - pss1) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="qemuspec-bench-forked-")
    env = {
        **os.environ,
        "QEMUSPEC_ACCEL": os.environ.get("QEMUSPEC_ACCEL", "tcg"),
        "QEMUSPEC_WARM_DIR": os.path.join(work, "store"),
        "TMPDIR": work,
    }
    os.environ.update({k: env[k] for k in ("QEMUSPEC_ACCEL", "QEMUSPEC_WARM_DIR", "TMPDIR")})
    try:
        cold_path, warm_path = definition(work, False), definition(work, True)
        cold = [
            timed(env, "run", cold_path, "--", "/bin/sh", "-c", COMMAND.format(i=i))
            for i in range(CASES)
        ]
        first = timed(env, "test", warm_path)
        forked = timed(env, "test", warm_path)
        cold_run = statistics.median(
            timed(env, "run", cold_path, "--", "true") for _ in range(args.runs)
        )
        warm_run = statistics.median(
            timed(env, "run", warm_path, "--", "true") for _ in range(args.runs)
        )
        rss, pss = memory(env, warm_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(cold)
    print(f"cold x{CASES} runs    {total:6.1f} s  (median {statistics.median(cold):.2f} s each)")
    print(f"test, warm       {forked:6.1f} s  {total / forked:5.1f}x faster (goal >= 6x)")
    print(f"test, first      {first:6.1f} s  {total / first:5.1f}x (checkpoint made: boot, save)")
    print(f"run cold         {cold_run:6.2f} s  (median of {args.runs})")
    print(
        f"run warm         {warm_run:6.2f} s  {100 * warm_run / cold_run:5.1f}% of cold (goal <= 20%)"
    )
    print(f"one more restore {rss:6.0f} MiB RSS, {pss:.0f} MiB PSS (3 restores against 1)")


if __name__ == "__main__":
    main()
