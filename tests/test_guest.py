"""Lifecycle with a real Linux guest under TCG: boot, probes, guest agent, stop escalation,
crash detection, the library API as the seed wrote it, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import qemu_pids
from qemuspec import Qemu, load
from qemuspec.errors import QMPConnectionError, ReadyTimeout
from qemuspec.spec import loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT = 90  # generous: two guests booting under TCG on 2 cores take ~7 s


def booted(guest, state_dir, name="g", cmdline="", **fields):
    """A builder for the test guest, with a console marker probe."""
    vm = Qemu(state_dir=state_dir).vm(name)
    vm.kernel(guest["kernel"]).initrd(guest["initrd"]).cmdline(
        f"console=ttyS0 quiet {cmdline}".strip()
    )
    vm.memory("256M").rng().ready(
        serial=guest["marker"], timeout=READY_TIMEOUT, **fields.pop("ready", {})
    )
    return vm.set(**fields) if fields else vm


def test_seed_script_verbatim(guest, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(guest["kernel"], data / "vmlinuz")
    os.symlink(guest["initrd"], data / "initrd")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(data / "disk.img"), "8M"], check=True
    )
    script = textwrap.dedent("""\
        import socket
        held = socket.socket(); held.bind(("127.0.0.1", 2000)); held.listen()   # port 2000 is taken
        from qemuspec import Qemu
        qemu = Qemu(qemu="qemu-system-x86_64", tcp=True, port=2000)   # binary override, QMP over TCP from port 2000 up
        vm = qemu.vm()
        vm.hda("data/disk.img").kernel("data/vmlinuz").initrd("data/initrd").append("-rtc", "base=utc")
        vm.on("SHUTDOWN", lambda event: print(event))
        vm.start()                       # returns once running (and ready, when a probe is set); start(callback) also accepted
        print(vm.qmp("query-status"))
        print("QMP", vm.instance.qmp_address)
        vm.quit()
        """)
    (tmp_path / "seed.py").write_text(script)
    (
        tmp_path / "tmp"
    ).mkdir()  # the builder's state directory goes here, so its qemu names tmp_path
    before = qemu_pids(tmp_path)
    result = subprocess.run(
        [sys.executable, "seed.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'status': 'running'" in lines[0]
    qmp_port = int(lines[1].rsplit(":", 1)[1])
    assert qmp_port > 2000, "stepped up past the taken port"
    assert "'event': 'SHUTDOWN'" in lines[2] and "host-qmp-quit" in lines[2]
    assert qemu_pids(tmp_path) == before


def test_boot_probes_agent_and_acpi_stop(guest, state_dir):
    ssh = "/usr/sbin/dropbear" in guest["extras"]
    vm = booted(guest, state_dir, agent=True, ready={"tcp": 80, "agent": True, "ssh": ssh})
    vm.forward(0, 80).forward(0, 22)  # on a user NIC made for them
    events = []
    vm.on("SHUTDOWN", events.append)
    vm.start()
    try:
        assert vm.qmp("query-status")["status"] == "running"
        code, out, err = vm.exec("/bin/uname", "-a")
        assert code == 0 and b"Linux qemuspec-guest" in out
        code, out, err = vm.exec("/bin/sh", "-c", "echo oops >&2; exit 3")
        assert (code, err) == (3, b"oops\n")
        import urllib.request

        page = urllib.request.urlopen(f"http://127.0.0.1:{vm.host_port(80)}/", timeout=10).read()
        assert page == b"qemuspec-guest http ok\n"
    finally:
        result = vm.stop(timeout=2)
    assert result.step == "ACPI powerdown", "the guest powered off inside the 2 s stop timeout"
    assert result.returncode == 0
    assert events and events[-1]["data"]["reason"] == "guest-shutdown"
    with open(os.path.join(state_dir, "g", "events.jsonl")) as f:
        assert any(json.loads(line)["event"] == "SHUTDOWN" for line in f)


def test_guest_ignoring_acpi_is_stopped_by_escalation(guest, state_dir):
    vm = booted(guest, state_dir, cmdline="qemuspec.noacpi")
    vm.start()
    assert "ignoring ACPI" in open(os.path.join(state_dir, "g", "serial.log")).read()
    result = vm.stop(timeout=2)
    assert result.step == "QMP quit", "ACPI was ignored for 2 s, then quit (5 s budget) stopped it"
    assert not vm.running()


def test_sigkilled_qemu_is_noticed_within_a_second(guest, state_dir):
    vm = booted(guest, state_dir)
    vm.start(ready=False)
    lost = threading.Event()
    vm.instance.qmp.on_close(lost.set)
    os.kill(vm.pid, signal.SIGKILL)
    assert lost.wait(1.0), "QMP saw EOF within 1 s"
    assert vm.wait(1.0) == -signal.SIGKILL
    with pytest.raises(QMPConnectionError):
        vm.qmp("query-status")


def test_probe_timeout_names_the_accelerator_and_shows_the_console(guest, state_dir):
    vm = booted(guest, state_dir, ready={"tcp": 81})  # nothing listens on 81 in the guest
    vm.forward(0, 81)
    vm.set(ready={"serial": guest["marker"], "tcp": 81, "timeout": 15})
    with pytest.raises(ReadyTimeout) as info:
        vm.start()
    message = str(info.value)
    assert "probe: tcp guest port 81" in message
    assert "accelerator: tcg" in message
    assert "--- last console lines ---" in message and guest["marker"] in message
    assert not vm.running(), "a machine that never became ready is not left running"


def test_async_face_and_event_iterator(guest, state_dir):
    async def main():
        vm = booted(guest, state_dir)
        await vm.start_async()
        seen = []

        async def collect():
            async for event in vm.events_async():
                seen.append(event["event"])

        collector = asyncio.ensure_future(collect())
        assert (await vm.qmp_async("query-status"))["running"] is True
        result = await vm.stop_async(timeout=5)
        await asyncio.wait_for(collector, 10)
        return result, seen

    result, seen = asyncio.run(main())
    assert result.step == "ACPI powerdown"
    assert "POWERDOWN" in seen and "SHUTDOWN" in seen


def test_builder_round_trips_through_toml_and_yaml(guest, tmp_path):
    vm = (
        booted(guest, str(tmp_path), agent=True)
        .drive(str(tmp_path / "d.qcow2"), format="qcow2", size="64M")
        .forward(0, 22)
    )
    for text, fmt in ((vm.to_toml(), "toml"), (vm.to_yaml(), "yaml")):
        assert loads(text, fmt).machines["g"] == vm.model


def test_load_gives_machines_that_start_like_the_file(guest, tmp_path):
    text = (
        open(os.path.join(ROOT, "machines", "dev.toml")).read().replace("host = 8080", "host = 0")
    )
    path = tmp_path / "dev.toml"
    path.write_text(
        text.replace("../guest/out/vmlinuz", guest["kernel"]).replace(
            "../guest/out/initrd.gz", guest["initrd"]
        )
    )
    machines = load(str(path), state_dir=str(tmp_path / "state"))
    vm = machines["dev"]
    vm.start()
    try:
        assert vm.qmp("query-status")["status"] == "running"
        assert vm.argv()[:3] == ["qemu-system-x86_64", "-name", "guest=dev"]
    finally:
        assert vm.stop().step == "ACPI powerdown"


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_cli_up_status_qmp_down(guest, tmp_path):
    text = (
        open(os.path.join(ROOT, "machines", "dev.toml")).read().replace("host = 8080", "host = 0")
    )
    path = tmp_path / "dev.toml"
    path.write_text(
        text.replace("../guest/out/vmlinuz", guest["kernel"]).replace(
            "../guest/out/initrd.gz", guest["initrd"]
        )
    )
    before = qemu_pids(tmp_path)
    try:
        first = cli("up", str(path), "--json")
        assert first.returncode == 0, first.stderr
        [started] = json.loads(first.stdout)
        assert started["action"] == "started"
        status = json.loads(cli("status", str(path), "--json").stdout)
        assert status[0]["state"] == "running" and status[0]["pid"] == started["pid"]
        assert {p["guest"] for p in status[0]["ports"]} == {80, 22} and all(
            p["host"] > 0 for p in status[0]["ports"]
        )
        again = json.loads(cli("up", str(path), "--json").stdout)
        assert again[0]["action"] == "up to date" and again[0]["pid"] == started["pid"]
        assert qemu_pids(tmp_path) - before == {started["pid"]}, "one qemu for the machine"
        answer = cli("qmp", "dev", "query-status", "--file", str(path))
        assert json.loads(answer.stdout)["status"] == "running"
        bad = cli("qmp", "dev", "no-such-command", "--file", str(path))
        assert (
            bad.returncode == 1
            and "CommandNotFound" in bad.stderr
            and "Traceback" not in bad.stderr
        )
        assert guest["marker"] in cli("logs", "--file", str(path)).stdout
    finally:
        down = cli("down", str(path))
    assert down.returncode == 0 and "ACPI powerdown" in down.stdout
    assert qemu_pids(tmp_path) == before
    assert json.loads(cli("status", str(path), "--json").stdout)[0]["state"] == "stopped"
