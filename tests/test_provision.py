"""ready.command, provision and the guest agent's part in stopping, on the small test guest (seconds per
boot) and in validation; tests/test_debian.py does the same on a real distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import qemu_pids
from test_lifecycle import cli

ENTRY = [sys.executable, "-m", "qemuspec"]


def machine(
    guest, tmp_path, body: str, cmdline: str = "", ready: str = "", timeout: str = "90s"
) -> str:
    path = tmp_path / "lab.toml"
    path.write_text(
        '[vars]\nextra = ""\n'
        f'[machines.g]\nkernel = "{guest["kernel"]}"\ninitrd = "{guest["initrd"]}"\nmemory = "256M"\n'
        f'cmdline = "console=ttyS0 quiet {cmdline}"\nrng = true\nagent = true\nstop_timeout = "4s"\n'
        f"{body}\n"
        f'[machines.g.ready]\nserial = "{guest["marker"]}"\ntimeout = "{timeout}"\n{ready}\n'
    )
    return str(path)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            'agent = false\nready.command = "true"',
            "ready.command runs in the guest through the guest agent or ssh",
        ),
        (
            'agent = true\nready.command = "  "',
            "machines.m.ready.command: a guest command must not be empty",
        ),
        ("agent = true\nready.command = 5", "machines.m.ready.command"),
        ("agent = true\nprovision = 3", "machines.m.provision"),
        ('agent = true\nprovision = { script = "missing.sh" }', "provisioning script"),
        ('agent = true\nprovision = { steps = ["x"] }', "machines.m.provision.steps"),
    ],
)
def test_bad_ready_command_and_provision_values_are_one_paragraph(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'[machines.m]\nkernel = "/etc/hostname"\n{body}\n')
    result = cli("validate", str(path), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and str(path) in result.stderr, result.stderr
    assert result.stderr.count("error:") <= (2 if "steps" in body else 1), (
        "one mistake, one error: " + result.stderr
    )


def test_ready_command_timeout_shows_its_last_output(guest, tmp_path):
    """A command that never exits 0: `up` fails at the deadline with the command, its exit code and output."""
    path = machine(
        guest, tmp_path, "", ready='command = "echo not-ready-yet; exit 3"', timeout="15s"
    )
    before = qemu_pids(tmp_path)
    try:
        result = cli("up", path, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert (
            "echo not-ready-yet; exit 3" in result.stderr
            and "exit 3: not-ready-yet" in result.stderr
        ), result.stderr
    finally:
        cli("down", path, check=False)
    assert qemu_pids(tmp_path) == before


def test_ready_command_passes_once_the_guest_says_so(guest, tmp_path):
    """Retried until it exits 0: the first command fails until the guest has been up 10 s."""
    path = machine(
        guest, tmp_path, "", ready='command = ["test $(cut -d. -f1 /proc/uptime) -ge 10", "true"]'
    )
    try:
        cli("up", path)
        code = json.loads(
            cli("exec", path, "--json", "--", "cut", "-d.", "-f1", "/proc/uptime").stdout
        )
        assert int(code["stdout"]) >= 10, "up returned only after the command succeeded"
    finally:
        cli("down", path)


def test_provision_once_per_life_rerun_on_demand_and_a_failing_step_fails_up(guest, tmp_path):
    """A diskless guest: its life is its qemu, so `up` after `down` provisions again, a plain `up` does not;
    `qemuspec provision` always runs. A failing step fails `up` (exit 1) with its output, records
    nothing, and so runs again on the next `up`."""
    body = (
        'provision = ["echo run >> /tmp/count", "echo count-$(wc -l < /tmp/count)", '
        '"if grep -q qemuspec.failprov /proc/cmdline; then echo the-reason-it-failed; exit 4; fi"]'
    )
    path = machine(guest, tmp_path, body, cmdline="{{ extra }}")
    failing = {**os.environ, "QEMUSPEC_VAR_extra": "qemuspec.failprov"}
    before = qemu_pids(tmp_path)
    try:
        first = cli("up", path)
        assert (
            "provision 1/3: echo run >> /tmp/count" in first.stdout and "count-1" in first.stdout
        ), first.stdout
        again = cli("up", path)
        assert "provision" not in again.stdout
        rerun = cli("provision", path, "--json")
        assert json.loads(rerun.stdout)[0]["provisioned"] is True
        assert cli("exec", path, "--", "cat", "/tmp/count").stdout == "run\nrun\n"
        cli("down", path)
        cli("up", path)  # a new life: provisioned again
        assert cli("exec", path, "--", "cat", "/tmp/count").stdout == "run\n"
        for attempt in (
            1,
            2,
        ):  # the changed definition starts a new life, whose provisioning fails each time
            failed = subprocess.run(
                [*ENTRY, "up", path], capture_output=True, text=True, env=failing, timeout=300
            )
            assert failed.returncode == 1, failed.stdout + failed.stderr
            assert "provision step 3/3" in failed.stderr and "exited 4" in failed.stderr, (
                failed.stderr
            )
            assert "the-reason-it-failed" in failed.stdout, "streamed"
            assert "the-reason-it-failed" in failed.stderr, "and in the error"
        assert cli("exec", path, "--", "cat", "/tmp/count").stdout == "run\nrun\n", (
            "running, not provisioned"
        )
    finally:
        subprocess.run([*ENTRY, "down", path], capture_output=True, env=failing, timeout=300)
    assert qemu_pids(tmp_path) == before


def test_forced_quit_syncs_the_guests_writes_through_the_agent(guest, tmp_path):
    """A guest that ignores the power button and cannot power off through its agent (no shutdown or
    poweroff command left): `down` quits qemu, but first has the agent sync, so a write still in the
    guest's page cache (write-back put off for an hour) is on the disk afterwards."""
    disk = tmp_path / "data.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    path = machine(
        guest,
        tmp_path,
        f'[[machines.g.disks]]\nfile = "{disk}"\nformat = "raw"\n',
        cmdline="qemuspec.noacpi",
    )
    before = qemu_pids(tmp_path)
    try:
        cli("up", path)
        cli(
            "exec",
            path,
            "--",
            "sh",
            "-c",
            "echo 360000 > /proc/sys/vm/dirty_expire_centisecs; echo 360000 > /proc/sys/vm/dirty_writeback_centisecs; "
            "rm -f /sbin/poweroff /bin/poweroff /usr/sbin/poweroff /usr/bin/poweroff /sbin/shutdown; "
            # held open: the last close of a block device would write its cache out by itself
            "(exec 3<>/dev/vda; printf written-before-down >&3; : > /tmp/written; exec sleep 3600) "
            "</dev/null >/dev/null 2>&1 &",
        )
        cli(
            "exec",
            path,
            "--timeout",
            "30",
            "--",
            "sh",
            "-c",
            "while [ ! -e /tmp/written ]; do sleep 0.1; done",
        )
        with open(disk, "rb") as f:
            assert not f.read(64).startswith(b"written"), "still only in the guest's cache"
        [down] = json.loads(cli("down", path, "--json").stdout)
        assert (
            down["detail"] == "QMP quit: after guest file systems synced through the guest agent"
        ), down
        assert (
            down["forced"] is True and "written out through the guest agent" in down["warnings"][0]
        )
    finally:
        cli("down", path, check=False)
    with open(disk, "rb") as f:
        assert f.read(19) == b"written-before-down"
    assert qemu_pids(tmp_path) == before
    assert not os.path.exists(tmp_path / ".qemuspec" / "g" / "qemu.pid")
