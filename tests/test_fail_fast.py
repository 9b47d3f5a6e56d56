"""A guest that dies early ends the readiness wait at once, and Ctrl-C during `up` stops what it started.

Real test guest under TCG. The readiness timeout is a generous 120 s; a panicking guest must fail well
before it, with the panic lines in the message, an elapsed time that is true and qemu's real state.
Two ways to die: a kernel that panics before init (no root, seen on the console only: the pvpanic
driver is not loaded yet) and a guest whose init panics through sysrq (qemu hears it from the pvpanic
device qemuspec adds, QMP GUEST_PANICKED).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import qemu_pids
from test_lifecycle import definition

ENTRY = [sys.executable, "-m", "qemuspec"]
TIMEOUT = 120.0
# (id, kernel command line, extra definition lines, a readiness probe the guest never passes on its own)
PANICS = [
    (
        "kernel-panics-before-init",
        "rdinit=/nope",
        "",
        "Kernel panic - not syncing: VFS: Unable to mount root fs",
    ),
    (
        "init-panics-through-sysrq",
        "qemuspec.panic=0",
        "[[machines.{name}.nics]]\nforwards = [{{ host = 0, guest = 7778 }}]\n",
        "Kernel panic - not syncing: sysrq triggered crash",
    ),
]


def panicking(tmp_path, guest, name: str, cmdline: str, extra: str) -> str:
    path = definition(
        tmp_path, guest, {name: {"cmdline": cmdline, "extra": extra.format(name=name)}}
    )
    text = open(path).read().replace('timeout = "90s"', f'timeout = "{TIMEOUT:g}s"')
    if "7778" in extra:  # ready when guest port 7778 answers: nothing there ever listens
        text = re.sub(r'serial = ".*"', "tcp = 7778", text)
    open(path, "w").write(text)
    return path


def assert_fails_fast(result, elapsed: float, panic_line: str, code: int = 1) -> str:
    err = result.stderr
    assert result.returncode == code, err
    assert elapsed < TIMEOUT / 4, f"took {elapsed:.1f} s of a {TIMEOUT:g} s timeout:\n{err}"
    assert panic_line in err.split("--- guest panic lines ---", 1)[0], (
        "the panic is named in the message itself"
    )
    assert "--- guest panic lines ---" in err
    assert "before it was ready" in err and f"within {TIMEOUT:g} s" not in err, err
    said = float(re.search(r"failed (\d+\.\d) s after launch", err).group(1))
    assert said <= elapsed, "the elapsed time it reports is no longer than the command ran"
    return err


@pytest.mark.parametrize("case,cmdline,extra,panic_line", PANICS, ids=[p[0] for p in PANICS])
def test_up_of_a_panicking_guest_fails_at_once(tmp_path, guest, case, cmdline, extra, panic_line):
    path = panicking(tmp_path, guest, "crash", cmdline, extra)
    began = time.monotonic()
    result = subprocess.run(
        [*ENTRY, "up", path], capture_output=True, text=True, timeout=TIMEOUT + 60
    )
    elapsed = time.monotonic() - began
    err = assert_fails_fast(result, elapsed, panic_line)
    print(f"{case}: up failed after {elapsed:.1f} s")
    if "sysrq" in case:  # qemu heard it through the pvpanic device, with restart = "no" too
        assert "qemu exited" in err, err
        with open(os.path.join(tmp_path, ".qemuspec", "crash", "events.jsonl")) as f:
            assert "GUEST_PANICKED" in [json.loads(line)["event"] for line in f if line.strip()]
    else:
        assert "qemu is still running (a panicked guest hangs)" in err, err
    assert not qemu_pids(tmp_path), "the failed machine is stopped"
    rows = json.loads(
        subprocess.run([*ENTRY, "status", path, "--json"], capture_output=True, text=True).stdout
    )
    assert (
        rows[0]["state"] == "failed"
        and "never became ready (the guest kernel panicked" in rows[0]["reason"]
    ), rows


@pytest.mark.parametrize("case,cmdline,extra,panic_line", PANICS, ids=[p[0] for p in PANICS])
def test_run_of_a_panicking_guest_fails_at_once(tmp_path, guest, case, cmdline, extra, panic_line):
    path = panicking(tmp_path, guest, "crash", cmdline, "agent = true\n" + extra)
    (tmp_path / "tmp").mkdir()
    began = time.monotonic()
    result = subprocess.run(
        [*ENTRY, "run", path, "--", "true"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 60,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )
    elapsed = time.monotonic() - began
    # run is crash-aware (runtime/crash.py): a panic before ready is a crash, exit 250
    err = assert_fails_fast(result, elapsed, panic_line, code=250)
    assert "the guest kernel crashed (panic" in err, err
    print(f"{case}: run failed after {elapsed:.1f} s")
    assert not qemu_pids(tmp_path) and not os.listdir(tmp_path / "tmp"), "nothing is left"


def test_ctrl_c_during_up_stops_the_machine_it_was_starting(tmp_path, guest):
    path = definition(tmp_path, guest, {"slow": {}})
    text = open(path).read()
    open(path, "w").write(
        re.sub(r'serial = ".*"', 'serial = "never printed"', text)
    )  # boots, never ready
    proc = subprocess.Popen(
        [*ENTRY, "up", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        seen = ""
        while "waiting for ready" not in seen:  # progress lines on a non-terminal, one per step
            line = proc.stderr.readline()
            assert line, f"up ended before the machine was booting: {seen}"
            seen += line
        assert qemu_pids(tmp_path), "qemu is booting"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run([*ENTRY, "down", path], capture_output=True)
    assert proc.returncode == 130, err
    assert "interrupted: stopping slow" in err, err
    assert "slow: stopped" in out, out
    assert not qemu_pids(tmp_path), "no qemu of this test is left"
    rows = json.loads(
        subprocess.run([*ENTRY, "status", path, "--json"], capture_output=True, text=True).stdout
    )
    assert rows[0]["state"] == "stopped", rows


def test_the_console_reader_keeps_panic_lines_and_not_lockup_warnings():
    """A panic line split across reads still counts; a soft-lockup warning (a slow TCG guest prints one and
    boots on) does not. A real socket pair stands in for qemu's chardev."""
    import socket

    from qemuspec.runtime.console import ConsoleReader

    ours, guest_side = socket.socketpair()
    reader = ConsoleReader(ours)
    try:
        guest_side.sendall(
            b"[    3.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:1]\r\n[    4.0] Kernel pa"
        )
        guest_side.sendall(b"nic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n")
        guest_side.sendall(
            b"[    4.1] BUG: kernel NULL pointer dereference, address: 0000000000000000\r\nready\n"
        )
        assert reader.wait_for("^ready$", 10)
        assert reader.panics == [
            "[    4.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
            "[    4.1] BUG: kernel NULL pointer dereference, address: 0000000000000000",
        ]
    finally:
        guest_side.close()
        reader.close()
