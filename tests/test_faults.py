"""The fault matrix (issue 9) with real qemu under TCG. Each row injects one fault into a running
machine and asserts what status says and what is left behind (processes, sockets, files).

Most rows use a paused q35 machine: the faults are about processes and files, and a booting guest
would add nothing but time (guest panic, which needs a guest, is in test_lifecycle.py). Detection and
recovery times are written to $QEMUSPEC_FAULT_TIMINGS (JSON lines) when it is set, for the report;
they are never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import IN_CI
from helpers import alive, qemu_pids

PAUSED = """
[machines.{name}]
machine = "q35"
memory = "64M"
paused = true
restart = "{restart}"
stop_timeout = "5s"
{extra}
"""


def cli(*args, check=True, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def status(path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(cli("status", path, "--json").stdout)}


def until(predicate, timeout=60.0, what="condition"):
    """Wait for a condition that has no event to wait on (a process state, a record), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def timing(row: str, **figures: float) -> None:
    out = os.environ.get("QEMUSPEC_FAULT_TIMINGS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"row": row, **{k: round(v, 3) for k, v in figures.items()}}) + "\n")


@pytest.fixture
def lab(tmp_path, qemu_bin):
    before = qemu_pids(tmp_path)
    made = []

    def make(name="web", restart="no", extra="", file="lab.toml"):
        path = tmp_path / file
        path.write_text(PAUSED.format(name=name, restart=restart, extra=extra))
        made.append(str(path))
        return str(path)

    yield make
    for path in made:
        cli("down", path, check=False)
    assert qemu_pids(tmp_path) == before, "no qemu left behind"
    from qemuspec.runtime import paths

    for path in made:
        run = paths.run_dir(os.path.join(os.path.dirname(path), ".qemuspec", "web"))
        assert not os.path.exists(run), f"runtime directory left: {os.listdir(run)}"


def _run_dir(path, name="web"):
    from qemuspec.runtime import paths

    return paths.run_dir(os.path.join(os.path.dirname(path), ".qemuspec", name))


def test_state_directory_deleted_under_a_running_machine(lab):
    path = lab()
    [started] = json.loads(cli("up", path, "--json").stdout)
    shutil.rmtree(os.path.join(os.path.dirname(path), ".qemuspec"))  # what `git clean -fdx` does
    row = status(path)["web"]
    assert row["state"] == "paused" and row["pid"] == started["pid"], (
        "still found through the runtime registry"
    )
    assert any(
        r["pid"] == started["pid"] and r["file"] == path
        for r in json.loads(cli("ls", "--json").stdout)
    )
    before = qemu_pids(os.path.dirname(path))
    [again] = json.loads(cli("up", path, "--json").stdout)
    assert again["action"] == "up to date" and qemu_pids(os.path.dirname(path)) == before, (
        "no second qemu"
    )
    began = time.monotonic()
    [down] = json.loads(cli("down", path, "--json").stdout)
    assert down["action"] == "stopped" and not alive(started["pid"])
    timing("state directory deleted", down=time.monotonic() - began)
    assert not os.path.exists(_run_dir(path))


def test_supervisor_and_qemu_both_killed(lab):
    path = lab(restart="on-failure")
    [started] = json.loads(cli("up", path, "--json").stdout)
    sup = status(path)["web"]["supervisor"]
    os.kill(sup, signal.SIGKILL)
    os.kill(started["pid"], signal.SIGKILL)
    until(lambda: not alive(sup) and not alive(started["pid"]), what="both gone")
    began = time.monotonic()
    row = status(path)["web"]
    detect = time.monotonic() - began
    assert row["state"] == "lost" and "supervisor and qemu were killed" in row["reason"]
    [again] = json.loads(cli("up", path, "--json").stdout)
    assert again["action"] == "started" and again["pid"] != started["pid"]
    timing("supervisor and qemu killed", detection=detect, recovery=time.monotonic() - began)
    row = status(path)["web"]
    assert row["state"] == "paused" and row["supervisor"] not in (None, sup)


def test_sigstopped_qemu_is_unresponsive_and_down_still_stops_it_within_its_budget(lab):
    from qemuspec.runtime.policy import stop_budget

    path = lab()
    [started] = json.loads(cli("up", path, "--json").stdout)
    os.kill(started["pid"], signal.SIGSTOP)
    try:
        began = time.monotonic()
        row = status(path)["web"]
        timing("SIGSTOP", detection=time.monotonic() - began)
        assert row["state"] == "unresponsive" and "stopped" in row["reason"]
        began = time.monotonic()
        [down] = json.loads(cli("down", path, "--json").stdout)
        seconds = time.monotonic() - began
        timing("SIGSTOP: down", recovery=seconds)
        assert down["detail"] == "SIGKILL" and seconds < stop_budget(5.0)
        assert not alive(started["pid"])
    finally:
        if alive(started["pid"]):
            os.kill(started["pid"], signal.SIGKILL)


def test_status_during_restart_backoff_counts_attempts(lab):
    path = lab(restart="always")
    [started] = json.loads(cli("up", path, "--json").stdout)
    pid = started["pid"]
    for attempt, delay in ((1, 1.0), (2, 2.0)):
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        row = until(
            lambda: (r := status(path)["web"])["state"] == "restarting" and r, what="restarting"
        )
        detect = time.monotonic() - killed
        assert row["attempt"] == attempt and 0 <= row["next_in"] <= delay
        assert (
            f"attempt {attempt}, next in" in row["reason"] and "killed (signal 9)" in row["reason"]
        )
        row = until(
            lambda: (r := status(path)["web"])["state"] == "paused" and r["pid"] != pid and r,
            what="restarted",
        )
        timing(
            f"qemu killed, restart attempt {attempt}",
            detection=detect,
            recovery=time.monotonic() - killed,
        )
        assert row["restarts"] == attempt
        pid = row["pid"]


def test_busy_forward_port_names_the_holder_and_does_not_loop(lab):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = lab(
            restart="always",
            extra=f"[[machines.web.nics]]\nforwards = [{{ host = {port}, guest = 22 }}]\n",
        )
        began = time.monotonic()
        result = cli("up", path, check=False)
        timing("busy forward port", detection=time.monotonic() - began)
        assert result.returncode in (
            1,
            2,
        )  # main's preflight refuses it before any supervisor exists
        assert str(port) in result.stderr and f"pid {os.getpid()}" in result.stderr
        row = status(path)["web"]
        assert row["state"] in ("stopped", "failed") and row["supervisor"] is None, (
            "no supervisor left retrying in a loop"
        )
        assert not os.path.exists(_run_dir(path))
    finally:
        holder.close()


def test_full_state_directory_while_running(lab, tmp_path):
    """The supervisor survives failed writes (ENOSPC), keeps supervising, and status says what failed."""
    if os.getuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root (this test mounts a small tmpfs)")
        pytest.skip("needs root to mount a small tmpfs")
    path = lab(restart="on-failure")
    state = os.path.join(os.path.dirname(path), ".qemuspec")
    os.makedirs(state, mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", state], check=True
    )
    try:
        [started] = json.loads(cli("up", path, "--json").stdout)
        with open(os.path.join(state, "filler"), "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        killed = time.monotonic()
        os.kill(started["pid"], signal.SIGKILL)
        try:
            row = until(
                lambda: (
                    (r := status(path)["web"])["state"] == "paused"
                    and r["pid"] != started["pid"]
                    and r
                ),
                what="restart on a full disk",
                timeout=20,
            )
        except AssertionError:
            print(status(path), open(os.path.join(state, "web", "supervisor.log")).read()[-3000:])
            raise
        timing("state directory full", recovery=time.monotonic() - killed)
        assert row["supervisor"] is not None and "No space left on device" in row["reason"]
        [down] = json.loads(cli("down", path, "--json").stdout)
        assert down["action"] == "stopped" and not alive(row["pid"])
    finally:
        cli("down", path, check=False)
        subprocess.run(["umount", state], check=False)


WRAPPER = """#!/bin/sh
# a "qemu" that forks a child and hangs without ever answering QMP
sleep {marker} &
exec sleep {marker}
"""


def _marked(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_a_qemu_that_forks_and_hangs_is_killed_with_its_children(lab, tmp_path):
    marker = str(3000 + os.getpid() % 1000)
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "qemu-system-x86_64"
    wrapper.write_text(WRAPPER.format(marker=marker))
    wrapper.chmod(0o755)
    path = lab(extra=f'qemu = "{wrapper}"')
    # a short greeting timeout (not the 10 s of the probe and 15 s of up): what is asserted is the same
    short = {"QEMUSPEC_GREETING_TIMEOUT": "2"}
    began = time.monotonic()
    probe = cli("validate", "--probe", "--allow-local-qemu", path, check=False, env=short)
    probe_seconds = time.monotonic() - began
    assert probe.returncode != 0 and "Traceback" not in probe.stderr
    assert _marked(marker) == [], "the probe left nothing behind"
    began = time.monotonic()
    result = cli("up", "--no-probe", "--allow-local-qemu", path, check=False, env=short)
    up_seconds = time.monotonic() - began
    timing("qemu forks and hangs", probe=probe_seconds, up=up_seconds)
    assert probe_seconds < 10 and up_seconds < 15, (
        "QEMUSPEC_GREETING_TIMEOUT shortens the probe's 10 s and up's 15 s"
    )
    assert result.returncode == 1 and "did not answer on QMP" in result.stderr
    assert _marked(marker) == [], "the wrapper's child is gone too"


def test_two_files_declaring_the_same_machine_do_not_touch_each_other(lab):
    first = lab(file="example.toml")
    second = lab(file="example2.toml")
    [started] = json.loads(cli("up", first, "--json").stdout)
    result = cli("up", second, check=False)
    assert result.returncode == 1 and f"is run by {first}" in result.stderr
    refused = cli("down", second, "--json", check=False)
    [down] = json.loads(refused.stdout)
    assert down["action"] == "belongs to another file" and alive(started["pid"])
    assert refused.returncode == 1, "a refusal is a runtime failure (issue 22 item 11)"
    [step] = json.loads(cli("plan", second, "--json", check=False).stdout)
    assert step["action"] == "belongs to another file"
    assert f"run by {first}" in status(second)["web"]["reason"]
    assert status(first)["web"]["pid"] == started["pid"]


def test_huge_values_are_validation_errors(tmp_path):
    path = tmp_path / "a.toml"
    for line in ("stop_timeout = 1e300", 'memory = "' + "9" * 400 + 'G"', "stop_timeout = nan"):
        path.write_text(f"[machines.a]\n{line}\n")
        result = cli("validate", str(path), check=False)
        assert (
            result.returncode == 2
            and "a.toml:2" in result.stderr
            and "Traceback" not in result.stderr
        )


def test_logs_are_size_bounded(tmp_path):
    from qemuspec.qmp.protocol import EventLog
    from qemuspec.runtime import statedir

    log = EventLog(str(tmp_path / "events.jsonl"), limit=1000)
    for i in range(100):
        log.write({"event": "X", "data": {"i": i}})
    log.close()
    assert (
        os.path.getsize(tmp_path / "events.jsonl") <= 1000
        and os.path.getsize(tmp_path / "events.jsonl.1") <= 1000
    )
    (tmp_path / "qemu.log").write_bytes(b"x" * 2000)
    os.close(statedir.open_log(str(tmp_path), "qemu.log", limit=1000))
    assert (
        os.path.getsize(tmp_path / "qemu.log") == 0
        and os.path.getsize(tmp_path / "qemu.log.1") == 2000
    )


def test_logs_are_size_bounded_and_rotated(tmp_path):
    """Logs (qemu.log, serial.log, supervisor.log) and events.jsonl keep at most one old generation."""
    from qemuspec.qmp.protocol import EventLog
    from qemuspec.runtime import statedir

    directory = str(tmp_path)
    for _ in range(3):
        fd = statedir.open_log(directory, "qemu.log", limit=1000)
        os.write(fd, b"x" * 900)
        os.close(fd)
    assert (
        os.path.getsize(tmp_path / "qemu.log") <= 1800
        and os.path.getsize(tmp_path / "qemu.log.1") <= 1800
    )
    assert oct(os.stat(tmp_path / "qemu.log").st_mode & 0o777) == "0o600"
    log = EventLog(str(tmp_path / "events.jsonl"), limit=500)
    for n in range(100):
        log.write(
            {"event": "TICK", "data": {"n": n}, "timestamp": {"seconds": n, "microseconds": 0}}
        )
    assert os.path.getsize(tmp_path / "events.jsonl") <= 500
    assert os.path.exists(tmp_path / "events.jsonl.1")
    assert '"n":99' in (tmp_path / "events.jsonl").read_text()  # the newest events are kept
