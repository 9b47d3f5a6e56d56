"""Rendered argv against a real qemu-system-x86_64 (no guest boots: -S, or -machine none)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time

import pytest

from helpers import qemu_pids
from qemuspec.errors import LaunchError
from qemuspec.qmp.sync import QMPClient
from qemuspec.render import render
from qemuspec.runtime.paths import Layout
from qemuspec import img
from qemuspec.runtime import images
from qemuspec.runtime.instance import Instance
from qemuspec.spec import load
from qemuspec.spec.models import Machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_rendered(argv: list[str], qmp_path: str):
    """Start qemu on exactly the rendered argv and connect to the QMP socket it creates."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        client = QMPClient.connect(
            f"unix:{qmp_path}", timeout=10, retry_until=time.monotonic() + 10
        )
    except Exception:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"qemu did not start: {err.decode()}")
    return proc, client


def stop_rendered(proc, client):
    try:
        client.command("quit")
    finally:
        client.close()
        proc.wait(10)


def test_example_definition_starts_in_qemu(qemu_bin, guest, tmp_path):
    text = open(os.path.join(ROOT, "machines", "example.toml")).read()
    text = text.replace('"../guest/out/vmlinuz"', f'"{guest["kernel"]}"').replace(
        '"../guest/out/initrd.gz"', f'"{guest["initrd"]}"'
    )
    text = text.replace('file = "web.qcow2"', f'file = "{tmp_path}/web.qcow2"').replace(
        '# backing = "base.qcow2"', f'backing = "{tmp_path}/base.qcow2"'
    )
    path = tmp_path / "example.toml"
    path.write_text(text)
    machine = load(path).machines["web"].model_copy(update={"paused": True})
    img.create(str(tmp_path / "base.qcow2"), "64M")
    images.ensure_disk(machine.disks[0])
    lay = Layout(str(tmp_path / "state"), str(tmp_path / "run"), ("tcg",))
    os.makedirs(lay.state_dir)
    os.makedirs(lay.run_dir)
    argv = render(machine, "web", lay)
    proc, client = run_rendered(argv, lay.qmp)
    try:
        assert client.command("query-status")["status"] == "prelaunch"
        assert client.command("query-name") == {"name": "web"}
        block = {b["device"] or b.get("qdev"): b for b in client.command("query-block")}
        assert any(
            b.get("inserted", {}).get("file") == f"{tmp_path}/web.qcow2" for b in block.values()
        )
    finally:
        stop_rendered(proc, client)


def test_file_names_with_commas_and_equals_reach_qemu_intact(qemu_bin, tmp_path):
    tricky = tmp_path / "disk,file=evil.img,if=ide"
    img.create(str(tricky), "1M", format="raw")
    machine = Machine(
        machine="q35",
        paused=True,
        disks=[{"file": str(tricky), "format": "raw", "interface": "virtio"}],
    )
    lay = Layout(str(tmp_path), str(tmp_path), ("tcg",))
    proc, client = run_rendered(render(machine, "x", lay), lay.qmp)
    try:
        files = [b["inserted"]["file"] for b in client.command("query-block") if "inserted" in b]
        assert files == [str(tricky)]
    finally:
        stop_rendered(proc, client)


def test_tcp_qmp_steps_up_past_a_taken_port(qemu_bin, state_dir):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    inst = Instance(
        "t",
        Machine(machine="none", paused=True, qmp={"transport": "tcp", "port": taken}),
        state_dir,
    )
    inst.launch()
    try:
        host, port = inst.qmp_address.rsplit(":", 1)
        assert host == "tcp:127.0.0.1" and int(port) > taken
        assert inst.qmp.command("query-status")["status"] == "prelaunch"
        argv = open(f"/proc/{inst.process.pid}/cmdline", "rb").read().split(b"\0")
        assert not any(b"0.0.0.0" in a for a in argv), "QMP binds loopback only"
    finally:
        inst.quit()
        blocker.close()


def test_unix_sockets_are_private_even_in_a_deep_directory(qemu_bin, tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 8)
    deep.mkdir(parents=True)
    assert len(str(deep)) > 200
    inst = Instance("deep", Machine(machine="none", paused=True, agent=False), str(deep / "state"))
    inst.launch()
    try:
        run_dir = inst.layout.run_dir
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.dirname(run_dir)).st_mode) == 0o700
        for name in ("qmp.sock", "qmp-client.sock", "console.sock"):
            info = os.stat(os.path.join(run_dir, name))
            assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            assert len(os.path.join(run_dir, name)) < 108
        with QMPClient.connect(
            f"unix:{inst.layout.qmp_client}", timeout=5
        ) as second:  # a second client alongside
            assert second.command("query-status")["status"] == "prelaunch"
    finally:
        inst.quit()
    assert not os.path.exists(inst.layout.run_dir), "sockets are removed after stop"


def test_a_bad_switch_fails_with_qemus_own_message_and_leaves_nothing(qemu_bin, state_dir):
    before = qemu_pids(state_dir)
    inst = Instance("bad", Machine(machine="none", append=["-no-such-option"]), state_dir)
    with pytest.raises(LaunchError, match="no-such-option"):
        inst.launch()
    assert qemu_pids(state_dir) == before
    assert not os.path.exists(inst.layout.run_dir)


def test_missing_binary_is_a_clear_error(state_dir):
    inst = Instance("nobin", Machine(qemu="/nonexistent/qemu-system-x86_64"), state_dir)
    with pytest.raises(LaunchError, match="not found: install it"):
        inst.launch()


def test_stale_state_pointing_at_an_unrelated_process_is_never_adopted(state_dir):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        os.makedirs(os.path.join(state_dir, "m"))
        with open(os.path.join(state_dir, "m", "state.json"), "w") as f:
            f.write(f'{{"pid": {sleeper.pid}, "qmp": "unix:/nonexistent"}}')
        assert Instance.find("m", Machine(), os.path.join(state_dir, "m")) is None
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_auto_falls_back_to_tcg_only_when_kvm_cannot_start():
    from qemuspec.render import accel_fallback
    from qemuspec.runtime import accel

    assert accel_fallback("auto", ("kvm",)) == ("tcg",)
    assert accel_fallback(["kvm", "tcg"], ("kvm", "tcg")) == (), "qemu already tries tcg after kvm"
    assert accel_fallback("kvm", ("kvm",)) == (), "an explicit kvm is never silently replaced"
    assert accel_fallback("auto", ("tcg",)) == ()
    assert accel.choose("auto", forced="kvm") == (("kvm",), ()), "QEMUSPEC_ACCEL is obeyed as given"


def test_auto_accelerator_starts_whatever_kvm_does_here(qemu_bin, state_dir):
    """On hosts where /dev/kvm exists but qemu cannot run on it, "auto" must still start (on TCG)."""
    from qemuspec.runtime import paths
    from qemuspec.settings import Settings

    machine = Machine(accel="auto", paused=True)
    inst = Instance(
        "auto", machine, state_dir, paths.machine_layout(machine, state_dir, Settings())
    )
    inst.launch()
    try:
        assert inst.qmp.command("query-status")["status"] == "prelaunch"
        assert inst.layout.accel in (("kvm",), ("tcg",))
        if inst.kvm_failure:
            assert inst.layout.accel == ("tcg",)
    finally:
        inst.quit()


def test_qmp_async_is_an_asyncio_client_on_the_tools_monitor(qemu_bin, state_dir):
    """The library's qmp_async runs through qmp/aio.py on the tools monitor, not in a thread over the
    controller's client: while another client holds that monitor it waits (and times out), and calls
    made together queue there and all get their replies."""
    import asyncio

    from qemuspec.api import VM
    from qemuspec.errors import QMPTimeout

    vm = VM("box", {"machine": "q35", "memory": "64M", "paused": True}, state_dir=state_dir)
    vm.start()
    try:
        holder = QMPClient.connect(f"unix:{vm.instance.layout.qmp_client}", timeout=10)
        try:
            with pytest.raises(QMPTimeout):
                asyncio.run(vm.qmp_async("query-status", timeout=1))
            assert vm.qmp("query-status")["status"] == "prelaunch", (
                "the controller's monitor stays free"
            )
        finally:
            holder.close()

        async def together():
            return await asyncio.gather(
                *(vm.qmp_async("query-status", timeout=20) for _ in range(4)),
                vm.qmp_async("query-name", timeout=20),
            )

        *states, name = asyncio.run(together())
        assert [s["status"] for s in states] == ["prelaunch"] * 4 and name == {"name": "box"}
    finally:
        vm.quit()
    assert not vm.running()
