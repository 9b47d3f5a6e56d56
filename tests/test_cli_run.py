"""`qemuspec run` on the real test guest: the command's exit code kept, output streamed as it comes,
stdin passed, the definition's disk never written, and nothing left (processes, overlays, sockets)
after success, failure, SIGINT and SIGTERM. One guest at a time: no other machine is up here."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from helpers import qemu_pids
from test_cli_commands import sha
from test_lifecycle import definition

ENTRY = [sys.executable, "-m", "qemuspec"]


@pytest.fixture
def scope(tmp_path):
    """The environment of this test's runs: temporary files in tmp_path and a runtime directory of its
    own (short, for socket paths), so what is left is counted among this test's files only, never those
    of the demo or of other runs on the host."""
    (tmp_path / "tmp").mkdir()
    runtime = tempfile.mkdtemp(prefix="qs-run-", dir="/tmp")
    yield {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "XDG_RUNTIME_DIR": runtime}
    shutil.rmtree(runtime, ignore_errors=True)


def leftovers(env) -> set[str]:
    """Files a run could leave: its temporary directories and socket directories."""
    runtime = os.path.join(env["XDG_RUNTIME_DIR"], "qemuspec", "*")
    return set(glob.glob(os.path.join(env["TMPDIR"], "*"))) | set(glob.glob(runtime))


@pytest.fixture
def box(tmp_path, guest):
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * (4 << 20))
    return definition(
        tmp_path,
        guest,
        {
            "box": {
                "extra": f'agent = true\n[[machines.box.disks]]\nfile = "{disk}"\nformat = "raw"\n'
            }
        },
    )


def test_run_keeps_the_exit_code_streams_and_leaves_nothing(box, tmp_path, scope):
    before_pids, before_files = qemu_pids(tmp_path), leftovers(scope)
    disk = open(box).read().split('file = "')[1].split('"')[0]
    disk_sum = sha(disk)
    proc = subprocess.Popen(
        [
            *ENTRY,
            "run",
            box,
            "--",
            "/bin/sh",
            "-c",
            "echo first; sleep 3; dd if=/dev/urandom of=/dev/vda bs=4k count=16 2>/dev/null; read line; echo second $line; exit 7",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=scope,
    )
    try:
        proc.stdin.write(b"from-stdin\n")
        proc.stdin.close()
        assert proc.stdout.readline() == b"first\n"
        assert proc.poll() is None, "the first line arrived while the command was still running"
        rest, err = proc.stdout.read(), proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 7, err
    assert rest == b"second from-stdin\n"
    assert sha(disk) == disk_sum, "the definition's disk was not written"
    assert qemu_pids(tmp_path) == before_pids
    assert leftovers(scope) == before_files
    ok = subprocess.run(
        [*ENTRY, "run", box, "--", "uname", "-n"],
        capture_output=True,
        text=True,
        timeout=300,
        env=scope,
    )
    assert (ok.returncode, ok.stdout) == (0, "qemuspec-guest\n"), ok.stderr
    assert qemu_pids(tmp_path) == before_pids and leftovers(scope) == before_files


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_leaves_nothing(box, signum, tmp_path, scope):
    before_pids, before_files = qemu_pids(tmp_path), leftovers(scope)
    proc = subprocess.Popen(
        [*ENTRY, "run", box, "--", "/bin/sh", "-c", "echo started; sleep 600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=scope,
    )
    try:
        assert proc.stdout.readline() == b"started\n"
        assert qemu_pids(tmp_path) - before_pids, "the run's qemu is up"
        assert len(leftovers(scope) - before_files) == 2, (
            "its work and socket directories are where this test looks"
        )
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signum
    assert qemu_pids(tmp_path) == before_pids
    assert leftovers(scope) == before_files


def test_run_json_lines(box):
    result = subprocess.run(
        [*ENTRY, "run", box, "--json", "--", "/bin/sh", "-c", "echo hi; echo oops >&2; exit 4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 4, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"stream": "stdout", "data": "hi\n"} in records and {
        "stream": "stderr",
        "data": "oops\n",
    } in records
    final = records[-1]  # and how it started (boot, checkpoint), the kernel warnings seen
    assert (final["machine"], final["exitcode"], final["warnings"]) == ("box", 4, [])
    assert final["boot"] == "cold"  # not a warm machine


def test_up_timeout_overrides_readiness_for_one_run(box, tmp_path):
    before = qemu_pids(tmp_path)
    result = subprocess.run(
        [*ENTRY, "up", box, "--timeout", "0.5"], capture_output=True, text=True, timeout=300
    )
    try:
        assert result.returncode == 1
        assert "was not ready within 0.5 s" in result.stderr
    finally:
        subprocess.run([*ENTRY, "down", box, "--quiet"], capture_output=True, timeout=120)
    assert qemu_pids(tmp_path) == before
