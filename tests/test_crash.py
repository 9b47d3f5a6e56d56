"""Crash-awareness: the one console detector (runtime/console.py CRASH_KINDS) and the watch over a
running machine (runtime/crash.py), then `qemuspec run` on the real test guest panicking through
sysrq: the run ends within seconds of the panic with exit 250, a report (text and JSON) naming
sysrq, and with --vmcore an ELF core that readelf calls CORE."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import qemu_pids
from test_lifecycle import definition

OOPS = b"""[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000000
[   12.000002] #PF: supervisor write access in kernel mode
[   12.000003] Oops: 0002 [#1] PREEMPT SMP NOPTI
[   12.000004] CPU: 0 PID: 77 Comm: sh Not tainted 6.1.0 #1
[   12.000005] Call Trace:
[   12.000006]  <TASK>
[   12.000007]  do_thing+0x10/0x20
[   12.000008]  </TASK>
[   12.000009] ---[ end trace 0000000000000000 ]---
"""
WARNING = b"""[    3.100000] WARNING: CPU: 1 PID: 1 at drivers/x.c:42 probe+0x1/0x2
[    3.100001] Call Trace:
[    3.100002]  <TASK>
[    3.100003]  probe+0x1/0x2
[    3.100004]  </TASK>
[    3.100005] ---[ end trace 0000000000000000 ]---
"""
LOCKUP = b"[   40.5] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [swapper/0:1]\n"


class FakeInstance:
    """What a Watch reads of an Instance: a real console reader over a socketpair, no QMP."""

    def __init__(self, console):
        self.name, self.console, self.qmp = "box", console, None
        self.started_at = time.time()
        self.process = None

    def running(self) -> bool:
        return True


@pytest.fixture
def console():
    from qemuspec.runtime.console import ConsoleReader

    ours, guest = socket.socketpair()
    reader = ConsoleReader(ours)
    yield reader, guest
    guest.close()
    reader.close()


def fed(reader, guest, data: bytes, count: int) -> None:
    guest.sendall(data)
    deadline = time.monotonic() + 5
    while not (len(reader.crashes) >= count and reader.crashes[-1].complete):
        assert time.monotonic() < deadline, reader.crashes
        time.sleep(0.01)


def test_console_kinds_blocks_and_panic_lines(console):
    reader, guest = console
    fed(reader, guest, b"booting\n" + WARNING + LOCKUP + b"ordinary line\n" * 80 + OOPS, 3)
    warning, lockup, oops = reader.crashes
    assert (warning.kind, warning.severity, warning.uptime) == ("warning", "warning", 3.1)
    assert warning.complete and warning.lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert (lockup.kind, lockup.severity) == ("soft lockup", "warning")
    # the BUG line opened the block; the Oops inside it made it an oops, one crash not two
    assert (oops.kind, oops.severity) == ("oops", "error")
    assert oops.line.endswith("BUG: kernel NULL pointer dereference, address: 0000000000000000")
    assert oops.uptime == 12.000001
    # readiness waits still end on error lines only, never on warnings or lockups
    assert [line.split("] ", 1)[1] for line in reader.panics] == [
        "BUG: kernel NULL pointer dereference, address: 0000000000000000",
        "Oops: 0002 [#1] PREEMPT SMP NOPTI",
    ]


def test_watch_fails_on_errors_and_on_warnings_only_when_asked(console):
    from qemuspec.errors import GuestCrashed
    from qemuspec.runtime.crash import Watch

    reader, guest = console
    fed(reader, guest, WARNING, 1)
    lenient = Watch(FakeInstance(reader), "panic")
    strict = Watch(FakeInstance(reader), "warn")
    assert not lenient.tripped.is_set() and strict.tripped.is_set()
    assert lenient.call(lambda: 7) == 7
    assert [w["kind"] for w in lenient.warnings()] == ["warning"]
    with pytest.raises(GuestCrashed) as warned:
        strict.call(lambda: 7)
    assert warned.value.report["kind"] == "warning"
    assert warned.value.report["trace"][0].endswith("Call Trace:")
    assert warned.value.report["trace"][-1].endswith("</TASK>")

    began = time.monotonic()
    with pytest.raises(GuestCrashed) as crashed:  # a crash ends a call that would go on for minutes
        lenient.call(lambda: (guest.sendall(OOPS), time.sleep(120)))
    assert time.monotonic() - began < 10
    report = crashed.value.report
    assert (report["kind"], report["severity"], report["uptime"]) == ("oops", "error", 12.000001)
    assert [w["kind"] for w in report["warnings"]] == ["warning"]
    assert "the guest kernel crashed (oops, 12.0 s after the guest booted" in str(crashed.value)
    json.dumps(report)  # the JSON report is plain data


def test_run_ends_at_a_sysrq_panic_with_its_code_report_and_core(tmp_path, guest):
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    path = definition(tmp_path, guest, {"box": {"extra": "agent = true\n"}})
    core = tmp_path / "box.vmcore"
    (tmp_path / "tmp").mkdir()  # the run's throwaway directory: its qemu names this test's tree
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qemuspec",
            "run",
            path,
            "--json",
            "--vmcore",
            str(core),
            "--",
            "/bin/sh",
            "-c",
            # the agent's output is read while the command runs: a second for the line to arrive
            "echo before-panic; sleep 1; echo c > /proc/sysrq-trigger; sleep 120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CI": "true", "TMPDIR": str(tmp_path / "tmp")},
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(json.loads(line))
            if lines[-1].get("data") == "before-panic\n":
                break
        else:
            raise AssertionError(f"no output before the panic: {proc.stderr.read()}")
        panicking = time.monotonic()
        rest, err = proc.communicate(timeout=60)
        ended = time.monotonic() - panicking
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 250, err
    assert ended < 1 + 10, f"the run went on for {ended - 1:.1f} s after the panic"
    final = json.loads(rest.strip().splitlines()[-1])
    report = final["crash"]
    assert final["exitcode"] == 250 and report["kind"] == "panic", final
    assert "sysrq" in report["line"] and report["uptime"] is not None
    assert any("sysrq" in frame for frame in report["trace"]), report["trace"]
    assert report["qmp_event"]["event"] == "GUEST_PANICKED"
    assert "the guest kernel crashed (panic" in err and "sysrq" in err
    assert report["vmcore"] == str(core) and core.stat().st_mode & 0o077 == 0
    header = subprocess.run(["readelf", "-h", str(core)], capture_output=True, text=True).stdout
    assert "CORE (Core file)" in header, header
    assert not qemu_pids(tmp_path)
