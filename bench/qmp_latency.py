#!/usr/bin/env python3
"""QMP round-trip latency of `query-status`, measured in one run against one qemu:

  floor     a minimal blocking socket client (send a line, read a line): the best Python can do
  sync      qemuspec.qmp.sync.QMPClient (reader thread, events, timeouts)
  async     qemuspec.qmp.aio.AsyncQMPClient
  qemu.qmp  QEMU's own qemu.qmp QMPClient (asyncio), if installed

Bar: the sync face's median within 1.5x of the floor. Each client gets its own QMP monitor.
Usage: python3 bench/qmp_latency.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qemuspec.qmp.aio import AsyncQMPClient  # noqa: E402
from qemuspec.qmp.sync import QMPClient  # noqa: E402


def stats(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99) - 1] * 1e6


def floor(path: str, rounds: int) -> list[float]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b'{"execute":"qmp_capabilities"}\n')
    f.readline()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        sock.sendall(b'{"execute":"query-status"}\n')
        f.readline()
        out.append(time.perf_counter() - t)
    sock.close()
    return out


def ours_sync(path: str, rounds: int) -> list[float]:
    out = []
    with QMPClient.connect(f"unix:{path}") as client:
        for _ in range(rounds):
            t = time.perf_counter()
            client.command("query-status")
            out.append(time.perf_counter() - t)
    return out


def ours_async(path: str, rounds: int) -> list[float]:
    async def run():
        client = await AsyncQMPClient.connect(f"unix:{path}")
        out = []
        for _ in range(rounds):
            t = time.perf_counter()
            await client.command("query-status")
            out.append(time.perf_counter() - t)
        await client.close()
        return out

    return asyncio.run(run())


def qemu_qmp(path: str, rounds: int) -> list[float] | None:
    try:
        from qemu.qmp import QMPClient as Upstream
    except ImportError:
        return None

    async def run():
        client = Upstream("bench")
        await client.connect(path)
        out = []
        for _ in range(rounds):
            t = time.perf_counter()
            await client.execute("query-status")
            out.append(time.perf_counter() - t)
        await client.disconnect()
        return out

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = ["floor", "sync", "async", "qemu.qmp"]
        socks = {n: os.path.join(tmp, f"{i}.sock") for i, n in enumerate(names)}
        argv = ["qemu-system-x86_64", "-machine", "none", "-S", "-nodefaults", "-display", "none"]
        for path in socks.values():
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while (
                not all(os.path.exists(p) for p in socks.values()) and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            runners = {"floor": floor, "sync": ours_sync, "async": ours_async, "qemu.qmp": qemu_qmp}
            for name in names:  # warm-up, then measure
                runners[name](socks[name], 200)
            results = {name: runners[name](socks[name], args.rounds) for name in names}
        finally:
            proc.kill()
            proc.wait()
    base = statistics.median(results["floor"])
    print(
        f"query-status round trip over a unix socket, {args.rounds} rounds each, qemu -machine none"
    )
    print(f"{'client':<10} {'median µs':>10} {'p99 µs':>10} {'x floor':>8}")
    for name in names:
        if results[name] is None:
            print(f"{name:<10} {'(not installed: pip install qemu.qmp)':>30}")
            continue
        median, p99 = stats(results[name])
        print(f"{name:<10} {median:>10.0f} {p99:>10.0f} {median / (base * 1e6):>8.2f}")
    ratio = statistics.median(results["sync"]) / base
    verdict = "meets" if ratio <= 1.5 else "MISSES"
    print(f"sync face / floor = {ratio:.2f}x: {verdict} the 1.5x bar")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
