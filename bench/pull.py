#!/usr/bin/env python3
"""`qemuspec img pull` of a multi-GB image from a local HTTP server, against `curl` of the same file
in the same run: throughput (qemuspec computes the sha256 while the bytes arrive; curl only writes),
peak memory (ru_maxrss of the qemuspec process, from wait4) and a cached pull.

    .venv/bin/python bench/pull.py [GiB=3] [--runs 3] [--dir /dev/shm] [--dense]

--dir puts the image, curl's output and the cache on one file system (default: the temporary
directory); /dev/shm takes the disk's writeback, shared with whatever else runs, out of the figures.

The image is generated once in a temporary directory: half random data (so neither side can skip
writing it) and half a sparse hole (what a cloud image's empty space looks like: qemuspec keeps it a
hole, curl writes the zeros), or all random with --dense. The server is
tests/helpers.py's ImageServer (sendfile) in a process of its own, so its work never shares the
measured processes' GIL. Runs alternate which goes first, with a sync between measurements (the
previous writer's writeback is not the next one's cost); medians are reported. Boots no guest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = """
import sys, threading
sys.path.insert(0, {tests!r})
from helpers import ImageServer
with ImageServer() as server:
    server.files["bench.raw"] = {path!r}
    print(server.url("bench.raw"), flush=True)
    sys.stdin.read()
"""


def timed(argv: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """(wall seconds, exit code, peak RSS in KiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        assert proc.stderr is not None
        sys.exit(f"{argv[0]} failed: {proc.stderr.read().decode(errors='replace')}")
    return elapsed, proc.returncode, usage.ru_maxrss


def main() -> None:
    valued = ("--runs", "--dir")
    opts = {
        sys.argv[i]: sys.argv[i + 1] for i in range(1, len(sys.argv) - 1) if sys.argv[i] in valued
    }
    args = [
        a
        for i, a in enumerate(sys.argv[1:], 1)
        if not a.startswith("--") and sys.argv[i - 1] not in valued
    ]
    gib = float(args[0]) if args else 3.0
    runs = int(opts.get("--runs", 3))
    work = tempfile.mkdtemp(prefix="qemuspec-bench-pull-", dir=opts.get("--dir"))
    try:
        size = int(gib * (1 << 30))
        image = os.path.join(work, "bench.raw")
        digest = hashlib.sha256()
        dense = size if "--dense" in sys.argv else size // 2
        with open(image, "wb") as f:
            for _ in range(dense >> 20):
                block = os.urandom(1 << 20)
                f.write(block)
                digest.update(block)
            f.truncate(size)
        hole = bytes(1 << 20)
        for _ in range((size - dense) >> 20):
            digest.update(hole)
        server = subprocess.Popen(
            [sys.executable, "-c", SERVE.format(tests=os.path.join(ROOT, "tests"), path=image)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        definition = os.path.join(work, "bench.toml")
        with open(definition, "w") as f:
            f.write(
                f'[machines.bench]\n[[machines.bench.disks]]\nfile = "bench.qcow2"\n'
                f'image = {{ url = "{url}", digest = "sha256:{digest.hexdigest()}" }}\n'
            )
        qemuspec = [sys.executable, "-m", "qemuspec", "img", "pull", definition, "--quiet"]
        curls, durable, pulls, rss, cached_all = [], [], [], [], []
        try:
            for run in range(runs):
                out = os.path.join(work, "curl.out")
                cache = os.path.join(work, f"cache{run}")
                os.mkdir(cache, 0o700)
                env = {
                    k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"
                }  # as users run it
                env["XDG_CACHE_HOME"] = cache

                def curl() -> None:
                    elapsed = timed(["curl", "-sS", "--fail", "-o", out, url])[0]
                    start = time.perf_counter()
                    fd = os.open(out, os.O_RDONLY)
                    os.fsync(
                        fd
                    )  # what qemuspec does before the rename: the cache entry survives a power cut
                    os.close(fd)
                    curls.append(elapsed)
                    durable.append(elapsed + time.perf_counter() - start)
                    os.sync()  # its writeback is not the next measurement's cost
                    os.unlink(out)

                def pull() -> None:
                    elapsed, _, peak = timed(qemuspec, env)
                    os.sync()
                    pulls.append(elapsed)
                    rss.append(peak)

                for step in (
                    (curl, pull) if run % 2 == 0 else (pull, curl)
                ):  # alternate who goes first
                    step()
                    os.sync()
                cached = [timed(qemuspec, env)[0] for _ in range(5)]
                cached_all += cached
                shutil.rmtree(cache)
                print(
                    f"run {run + 1}: curl {curls[-1]:.2f} s (+fsync {durable[-1]:.2f} s), qemuspec {pulls[-1]:.2f} s "
                    f"(peak RSS {rss[-1] / 1024:.1f} MiB), cached pull {statistics.median(cached) * 1000:.0f} ms",
                    flush=True,
                )
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(10)
        curl_rate, pull_rate = size / statistics.median(curls), size / statistics.median(pulls)
        kind = "random" if dense == size else "half random, half sparse"
        print(f"\nimage {gib:g} GiB ({kind}) in {work}, {runs} runs, medians:")
        print(f"  curl -o FILE        {curl_rate / (1 << 20):8.0f} MiB/s")
        print(
            f"  qemuspec img pull   {pull_rate / (1 << 20):8.0f} MiB/s  (sha256 on the fly, rename into the cache)"
        )
        durable_rate = size / statistics.median(durable)
        print(
            f"  curl, then fsync    {durable_rate / (1 << 20):8.0f} MiB/s  (the file on disk, as qemuspec leaves it)"
        )
        print(
            f"  ratio               {pull_rate / curl_rate:8.2f}x curl (goal >= 0.9x), "
            f"{pull_rate / durable_rate:.2f}x curl + fsync"
        )
        print(f"  peak RSS            {max(rss) / 1024:8.1f} MiB (goal < 64 MiB)")
        cached_ms = statistics.median(cached_all) * 1000
        print(f"  cached pull         {cached_ms:8.0f} ms (goal < 200 ms; the whole CLI process)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
