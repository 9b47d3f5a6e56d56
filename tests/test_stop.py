"""`down` does not wait out stop_timeout when qemu can tell nothing will answer the power button."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import qemu_pids

from qemuspec.runtime.instance import Instance
from qemuspec.spec.models import Machine


def cli(*args):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"qemuspec {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def test_down_of_a_machine_without_acpi_quits_at_once_and_says_why(qemu_bin, tmp_path):
    before = qemu_pids(tmp_path)
    path = tmp_path / "none.toml"
    path.write_text(
        '[machines.empty]\nmachine = "none"\nmemory = "64M"\nserial = "none"\nstop_timeout = "300s"\n'
    )
    cli("up", str(path))
    out = cli("down", str(path)).stdout
    assert "QMP quit: the machine has no ACPI" in out, out
    seconds = float(out.rsplit(", ", 1)[1].split(" s)")[0])  # "empty: stopped (STEP, N.N s)"
    assert seconds < 300, "the stop timeout was not waited out"
    assert qemu_pids(tmp_path) == before


def test_a_guest_that_never_enabled_acpi_is_quit_without_waiting(guest, state_dir):
    machine = Machine(
        kernel=guest["kernel"],
        initrd=guest["initrd"],
        cmdline="console=ttyS0 quiet acpi=off",
        memory="256M",
        stop_timeout=300,
        ready={"serial": guest["marker"], "timeout": 120},
    )
    inst = Instance("g", machine, state_dir)
    inst.launch()
    try:
        inst.wait_ready()
        result = inst.stop()
    finally:
        inst.kill()
    assert result.step == "QMP quit: the guest has not enabled ACPI yet"
    assert result.seconds < 300


def test_a_guest_with_acpi_still_gets_the_power_button(guest, state_dir):
    machine = Machine(
        kernel=guest["kernel"],
        initrd=guest["initrd"],
        cmdline="console=ttyS0 quiet",
        memory="256M",
        stop_timeout=30,
        ready={"serial": guest["marker"], "timeout": 120},
    )
    inst = Instance("g", machine, state_dir)
    inst.launch()
    try:
        inst.wait_ready()
        result = inst.stop()
    finally:
        inst.kill()
    assert result.step == "ACPI powerdown"


def test_down_of_a_guest_that_ignores_acpi_says_it_was_a_forced_stop(guest, tmp_path):
    """Item 5 of issue 22: the power button is ignored, `down` quits qemu after stop_timeout: a warning
    and "forced": true, as libvirt separates shutdown from destroy. A clean stop is not forced."""
    before = qemu_pids(tmp_path)
    path = tmp_path / "deaf.toml"
    text = (
        f'[machines.g]\nkernel = "{guest["kernel"]}"\ninitrd = "{guest["initrd"]}"\nmemory = "256M"\n'
        f'cmdline = "console=ttyS0 quiet CMDLINE"\nstop_timeout = "2s"\n'
        f'[machines.g.ready]\nserial = "{guest["marker"]}"\ntimeout = "120s"\n'
    )
    path.write_text(text.replace("CMDLINE", "qemuspec.noacpi"))
    try:
        cli("up", str(path))
        human = cli("down", str(path))
        assert "g: stopped (QMP quit" in human.stdout
        assert (
            "warning: g: forced stop (QMP quit): the guest did not shut down by itself"
            in human.stderr
        ), human.stderr
        cli("up", str(path))
        [down] = json.loads(cli("down", str(path), "--json").stdout)
        assert (
            down["forced"] is True
            and down["detail"] == "QMP quit"
            and "forced stop" in down["warnings"][0]
        )
        events = [json.loads(line) for line in open(tmp_path / ".qemuspec" / "g" / "events.jsonl")]
        assert [e for e in events if e["event"] == "QEMUSPEC_DOWN"][-1]["data"]["forced"] is True

        path.write_text(text.replace("CMDLINE", ""))
        cli("up", str(path))
        [clean] = json.loads(cli("down", str(path), "--json").stdout)
        assert (
            clean["detail"] == "ACPI powerdown"
            and clean["forced"] is False
            and clean["warnings"] == []
        )
    finally:
        subprocess.run(
            [sys.executable, "-m", "qemuspec.cli.main", "down", str(path)],
            capture_output=True,
            timeout=300,
        )
    assert qemu_pids(tmp_path) == before
