"""`plan` and `up` on a running machine whose definition changed, with the real test guest (TCG):
fields only the supervisor reads change with no qemu touched (same pid, no new launch) and the
supervisor really acts on them; `up --no-restart` refuses a restart-class change with its own exit
code and changes nothing; `up` then restarts (disks kept). The qemu side of live changes (forwards,
disks, balloon) is tests/test_live_qemu.py's, through runtime/live.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from helpers import alive

MACHINE = """
[machines.box]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "{memory}"
rng = true
restart = "{restart}"
stop_timeout = "{stop}"
[machines.box.ready]
serial = "{marker}"
timeout = "90s"
"""

NO_RESTART = 4  # cli/common.py NO_RESTART: `up --no-restart` when a restart or recreate is needed


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def write(path, guest, memory="256M", restart="no", stop="5s") -> None:
    path.write_text(
        MACHINE.format(
            kernel=guest["kernel"],
            initrd=guest["initrd"],
            marker=guest["marker"],
            memory=memory,
            restart=restart,
            stop=stop,
        )
    )


def launches(tmp_path) -> list[dict]:
    with open(tmp_path / ".qemuspec" / "box" / "events.jsonl") as f:
        return [e for e in map(json.loads, f) if e["event"] == "QEMUSPEC_LAUNCHED"]


def running_pid(path: str, deadline: float) -> int:
    """The pid of a running qemu once status says so (a supervisor restart takes a boot)."""
    while True:
        [row] = json.loads(cli("status", path, "--json").stdout)
        if row.get("state") == "running" and row.get("pid"):
            return row["pid"]
        assert time.monotonic() < deadline, f"not running again: {row}"
        time.sleep(0.2)


def test_live_then_no_restart_then_restart(tmp_path, guest):
    path = tmp_path / "box.toml"
    write(path, guest)
    first = cli("up", str(path), "--json")
    assert first.returncode == 0, first.stderr
    pid = json.loads(first.stdout)[0]["pid"]
    try:
        # supervisor-only fields: plan says live for the machine and each field
        write(path, guest, restart="on-failure", stop="7s")
        plan = cli("plan", str(path), "--json")
        assert plan.returncode == 3, plan.stderr
        [step] = json.loads(plan.stdout)
        assert step["action"] == step["class"] == "live", step
        assert {c["field"]: (c["class"], c["by"]) for c in step["changes"]} == {
            "restart": ("live", "supervisor"),
            "stop_timeout": ("live", "supervisor"),
        }
        human = cli("plan", str(path))
        assert "box: live" in human.stdout and "stop_timeout: 5.0 -> 7.0  [live:" in human.stdout

        changed = cli("up", str(path), "--no-restart", "--json")
        assert changed.returncode == 0, changed.stderr
        [outcome] = json.loads(changed.stdout)
        assert outcome["action"] == "changed" and outcome["pid"] == pid, outcome
        assert alive(pid) and len(launches(tmp_path)) == 1, "no qemu was started or stopped"
        assert cli("plan", str(path)).returncode == 0, "the next plan is empty"
        [row] = json.loads(cli("status", str(path), "--json").stdout)
        assert row["pid"] == pid

        # the supervisor acts on the new policy: a killed qemu is started again (restart = on-failure)
        os.kill(pid, signal.SIGKILL)
        again = running_pid(str(path), time.monotonic() + 90)
        assert again != pid and len(launches(tmp_path)) == 2

        # a restart-class field with a live one: --no-restart refuses, names it, changes nothing
        recorded = (tmp_path / ".qemuspec" / "box" / "definition.json").read_bytes()
        write(path, guest, memory="320M", restart="on-failure", stop="9s")
        [step] = json.loads(cli("plan", str(path), "--json").stdout)
        assert step["class"] == "restart"
        assert {c["field"]: c["class"] for c in step["changes"]} == {
            "memory": "restart",
            "stop_timeout": "live",
        }
        refused = cli("up", str(path), "--no-restart")
        assert refused.returncode == NO_RESTART, refused.stderr
        assert "memory" in refused.stderr and "restart needed" in refused.stderr
        assert (tmp_path / ".qemuspec" / "box" / "definition.json").read_bytes() == recorded
        assert alive(again) and len(launches(tmp_path)) == 2, "nothing was stopped or started"
        assert cli("plan", str(path)).returncode == 3, "the change is still pending"

        restarted = cli("up", str(path), "--json")
        assert restarted.returncode == 0, restarted.stderr
        [outcome] = json.loads(restarted.stdout)
        assert outcome["action"] == "restarted" and outcome["pid"] != again, outcome
        assert not alive(again)
        assert cli("plan", str(path)).returncode == 0
    finally:
        cli("down", str(path))


FORWARDED = """
[machines.box]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "256M"
agent = true
stop_timeout = "5s"
nics = [{{ type = "user", forwards = [{forwards}] }}]
[machines.box.ready]
serial = "{marker}"
agent = true
timeout = "90s"
"""


def _http(port: int, deadline: float) -> str:
    """The guest's web page through a host port, retried until the deadline (the guest's httpd)."""
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                return reply.read().decode()
        except OSError:
            assert time.monotonic() < deadline, f"nothing answered on port {port}"
            time.sleep(0.2)


def test_up_adds_and_removes_a_forward_live(tmp_path, guest):
    """`up` through the whole path (plan, Backend.change, live.apply on the client monitor, the
    supervisor's re-read): a forward added to a running machine serves the guest's HTTP, a removed one
    is closed, and the guest never rebooted (same pid, uptime growing, its tmpfs file still there)."""
    import socket

    path = tmp_path / "box.toml"

    def write_forwards(forwards: str) -> None:
        path.write_text(
            FORWARDED.format(
                kernel=guest["kernel"],
                initrd=guest["initrd"],
                marker=guest["marker"],
                forwards=forwards,
            )
        )

    write_forwards("")
    first = cli("up", str(path), "--json")
    assert first.returncode == 0, first.stderr
    pid = json.loads(first.stdout)[0]["pid"]
    try:
        assert cli("exec", str(path), "--", "sh", "-c", "echo stays > /tmp/stay").returncode == 0
        uptime = float(cli("exec", str(path), "--", "cat", "/proc/uptime").stdout.split()[0])

        write_forwards("{ host = 0, guest = 80 }")
        [step] = json.loads(cli("plan", str(path), "--json").stdout)
        assert step["class"] == "live", step
        assert [(c["field"], c["class"], c["by"]) for c in step["changes"]] == [
            ("nics[0].forwards", "live", "qemu")
        ], step
        added = cli("up", str(path), "--no-restart", "--json")
        assert added.returncode == 0, added.stderr
        [outcome] = json.loads(added.stdout)
        assert outcome["action"] == "changed" and outcome["pid"] == pid, outcome
        [row] = json.loads(cli("status", str(path), "--json").stdout)
        [port] = [p["host"] for p in row["ports"] if p["guest"] == 80]
        assert "qemuspec-guest" in _http(port, time.monotonic() + 30)
        assert cli("plan", str(path)).returncode == 0, "the next plan is empty"

        write_forwards("")
        removed = cli("up", str(path), "--no-restart", "--json")
        assert removed.returncode == 0, removed.stderr
        assert json.loads(removed.stdout)[0]["pid"] == pid
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the removed forward is closed"

        assert alive(pid) and len(launches(tmp_path)) == 1, "qemu was never restarted"
        later = float(cli("exec", str(path), "--", "cat", "/proc/uptime").stdout.split()[0])
        assert later > uptime, "the guest's uptime kept growing: no reboot"
        assert cli("exec", str(path), "--", "cat", "/tmp/stay").stdout == "stays\n"
    finally:
        cli("down", str(path))
