"""What a definition says is what runs: passthrough cannot silently win over typed fields, ids never
collide, and `validate` finds before anything starts what `up` would fail on. Where it matters, qemu
itself is asked what it runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from helpers import qemu_pids
from qemuspec.errors import SpecError
from qemuspec.render import render
from qemuspec.runtime.paths import Layout
from qemuspec.spec import load, preflight
from test_qemu_real import run_rendered, stop_rendered


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path, text: str, name: str = "m.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def layout(tmp_path) -> Layout:
    lay = Layout(str(tmp_path / "state"), str(tmp_path / "run"), ("tcg",))
    os.makedirs(lay.state_dir, exist_ok=True)
    os.makedirs(lay.run_dir, exist_ok=True)
    return lay


# -- passthrough ------------------------------------------------------------------------------------


def test_append_memory_beside_memory_is_an_error_naming_both(tmp_path):
    path = write(
        tmp_path, '[machines.vm]\nmemory = "256M"\nappend = ["-rtc", "base=utc", "-m", "1G"]\n'
    )
    result = cli("validate", path)
    assert result.returncode == 2
    assert f"{path}:3: machines.vm.append[2]" in result.stderr
    assert (
        '"-m 1G" would silently replace what "memory" says' in result.stderr
        and "overrides" in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "append, field",
    [
        (["-smp", "4"], "cpus"),
        (["-M", "pc"], "machine"),
        (["-machine", "q35,accel=kvm"], "machine"),
        (["-cpu", "host"], "cpu"),
        (["-enable-kvm"], "accel"),
        (["-accel", "kvm"], "accel"),
        (["-display", "gtk"], "display"),
        (["-nographic"], "display"),
        (["--m", "1G"], "memory"),
    ],
)
def test_switches_that_typed_fields_render_are_refused_in_append(tmp_path, append, field):
    with pytest.raises(SpecError, match=f'what "{field}" says'):
        load(write(tmp_path, f"[machines.vm]\nappend = {append!r}\n".replace("'", '"')))


@pytest.mark.parametrize(
    "append, why",
    [
        (["-daemonize"], "supervises qemu"),
        (["-pidfile", "/tmp/p"], "pidfile"),
        (["-name", "other"], "names the machine"),
        (["-S"], "paused = true"),
        (["-nodefaults"], "defaults = true"),
    ],
)
def test_switches_qemuspec_owns_cannot_be_passed_through(tmp_path, append, why):
    with pytest.raises(SpecError, match=why):
        load(write(tmp_path, f"[machines.vm]\nappend = {append!r}\n".replace("'", '"')))


def test_kernel_switch_is_free_when_no_typed_field_renders_it(tmp_path):
    machine = load(
        write(tmp_path, '[machines.vm]\nappend = ["-kernel", "/boot/vmlinuz"]\n')
    ).machines["vm"]
    assert render(machine, "vm", Layout("/s", "/r", ("tcg",)))[-2:] == ["-kernel", "/boot/vmlinuz"]


def test_overrides_must_name_a_switch_that_append_gives(tmp_path):
    with pytest.raises(SpecError, match='"-m" is not in append'):
        load(write(tmp_path, '[machines.vm]\noverrides = ["-m"]\n'))
    with pytest.raises(SpecError, match='"-rtc" is not a switch qemuspec renders'):
        load(
            write(tmp_path, '[machines.vm]\noverrides = ["-rtc"]\nappend = ["-rtc", "base=utc"]\n')
        )


def test_a_deliberate_override_is_said_and_is_what_qemu_runs(qemu_bin, tmp_path):
    path = write(
        tmp_path,
        '[machines.vm]\nmachine = "q35"\npaused = true\nmemory = "256M"\noverrides = ["-m"]\nappend = ["-m", "384M"]\n',
    )
    result = cli("validate", path)
    assert result.returncode == 0 and "append overrides -m (not memory)" in result.stderr
    machine = load(path).machines["vm"]
    lay = layout(tmp_path)
    argv = render(machine, "vm", lay)
    assert argv.count("-m") == 1
    proc, client = run_rendered(argv, lay.qmp)
    try:
        assert client.command("query-memory-size-summary")["base-memory"] == 384 << 20
    finally:
        stop_rendered(proc, client)


# -- ids --------------------------------------------------------------------------------------------


def test_an_imported_monitor_id_no_longer_collides_with_qemuspecs_own(qemu_bin, tmp_path):
    sock = tmp_path / "their-monitor.sock"
    path = write(
        tmp_path,
        f'[machines.vm]\npaused = true\nappend = ["-chardev", "socket,id=qmp,path={sock},server=on,wait=off", '
        f'"-mon", "chardev=qmp,mode=control", "-object", "rng-random,id=serial0,filename=/dev/urandom"]\n',
    )
    machine = load(path).machines["vm"]
    lay = layout(tmp_path)
    proc, client = run_rendered(render(machine, "vm", lay), lay.qmp)
    try:
        labels = {c["label"] for c in client.command("query-chardev")}
        assert {"qmp", "qemuspec-qmp", "qemuspec-qmp-client"} <= labels
        assert sock.exists()
    finally:
        stop_rendered(proc, client)


@pytest.mark.parametrize(
    "text, expect",
    [
        (
            'devices = [{ driver = "virtio-rng-pci", id = "r" }]\nappend = ["-device", "virtio-balloon-pci,id=r"]',
            'the id "r" is already used at devices.0.id',
        ),
        (
            'append = ["-device", \'{"driver": "virtio-balloon-pci", "id": "b"}\', "-object", "rng-random,id=b,filename=/dev/urandom"]',
            'the id "b" is already used at append.1',
        ),
        (
            'objects = [{ type = "rng-random", id = "qemuspec-rng0", options = { filename = "/dev/urandom" } }]',
            'starts with "qemuspec-"',
        ),
        ('append = ["-netdev", "user,id=qemuspec-net0"]', 'starts with "qemuspec-"'),
        (
            'disks = [{ file = "/dev/null", options = { id = "mine" } }]',
            '"id" is given by qemuspec',
        ),
        ('nics = [{ device_options = { id = "mine" } }]', '"id" is given by qemuspec'),
        ('devices = [{ driver = "e1000", options = { id = "x" } }]', "use the id field"),
    ],
)
def test_id_collisions_are_errors(tmp_path, text, expect):
    with pytest.raises(SpecError, match=expect.replace("[", r"\[").replace(".", r"\.")):
        load(write(tmp_path, f"[machines.vm]\n{text}\n"))


# -- validate catches what up would fail on ---------------------------------------------------------


def test_validate_reports_missing_files_with_line_field_and_fix(tmp_path):
    (tmp_path / "present.img").write_bytes(b"")
    path = write(
        tmp_path,
        '[machines.vm]\nkernel = "nope/vmlinuz"\ninitrd = "nope/initrd"\ncdrom = "nope.iso"\n'
        '[[machines.vm.disks]]\nfile = "missing.img"\n[[machines.vm.disks]]\nfile = "new.qcow2"\nformat = "qcow2"\nsize = "1G"\n'
        '[[machines.vm.disks]]\nfile = "o.qcow2"\nformat = "qcow2"\nbacking = "base.qcow2"\n'
        '[[machines.vm.disks]]\nfile = "present.img"\n',
    )
    result = cli("validate", path)
    assert result.returncode == 2
    err = result.stderr
    assert (
        f"{path}:2: machines.vm.kernel: kernel file {tmp_path}/nope/vmlinuz does not exist" in err
    )
    assert f"{path}:3: machines.vm.initrd" in err and f"{path}:4: machines.vm.cdrom" in err
    assert f"{path}:6: machines.vm.disks[0].file" in err and 'add size = "10G"' in err
    assert f"{path}:14: machines.vm.disks[2].backing" in err
    assert "disks[1]" not in err and "disks[3]" not in err  # created by up / exists
    assert "Traceback" not in err


def test_a_host_port_declared_twice_is_an_error(tmp_path):
    path = write(
        tmp_path,
        "[machines.a]\nnics = [{ forwards = [{ host = 8080, guest = 80 }] }]\n"
        "[machines.b]\nnics = [{ forwards = [{ host = 8080, guest = 8000 }] }]\n",
    )
    result = cli("validate", path)
    assert result.returncode == 2
    assert (
        f"{path}:4: machines.b.nics[0].forwards[0].host: host port 8080/tcp is already declared at machines.a"
        in result.stderr
    )


@pytest.mark.parametrize(
    "text",
    [
        'kernel = "/k"\ncmdline = "console=ttyS0\\nquiet"',
        'append = ["-rtc", "base=utc\\n"]',
        'disks = [{ file = "/dev/null", options = { cache = "none\\n" } }]',
    ],
)
def test_a_line_break_qemu_cannot_take_is_an_error(tmp_path, text):
    with pytest.raises(SpecError, match="line break"):
        load(write(tmp_path, f"[machines.vm]\n{text}\n"))


def test_kvm_without_dev_kvm_is_an_error(tmp_path, monkeypatch):
    spec = load(write(tmp_path, '[machines.vm]\naccel = "kvm"\n'))
    real = os.path.exists
    monkeypatch.setattr(
        preflight.os.path, "exists", lambda p: False if p == "/dev/kvm" else real(p)
    )
    problems = preflight.host_problems(spec, str(tmp_path / "m.toml"), ["vm"], environ={})
    assert (
        problems == [(("machines", "vm", "accel"), problems[0][1])]
        and 'use accel = "auto"' in problems[0][1]
    )
    assert (
        preflight.host_problems(
            spec, str(tmp_path / "m.toml"), ["vm"], environ={"QEMUSPEC_ACCEL": "tcg"}
        )
        == []
    )


def test_a_qemu_inside_the_definitions_tree_needs_an_explicit_opt_in(tmp_path):
    (tmp_path / ".git").mkdir()
    marker = tmp_path / "ran"
    fake = tmp_path / "tools" / "qemu-system-x86_64"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    path = write(tmp_path, '[machines.vm]\nqemu = "tools/qemu-system-x86_64"\n')
    refused = cli("validate", path)
    assert (
        refused.returncode == 2
        and "inside the definition's own tree" in refused.stderr
        and "--allow-local-qemu" in refused.stderr
    )
    assert cli("validate", path, "--allow-local-qemu").returncode == 0
    assert cli("render", path).returncode == 0
    up = cli("up", path, "--state-dir", str(tmp_path / "state"))
    assert up.returncode == 2 and "--allow-local-qemu" in up.stderr
    assert not marker.exists()


def test_up_checks_host_ports_before_starting_any_machine(qemu_bin, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    path = write(
        tmp_path,
        f'[machines.first]\npaused = true\n[machines.second]\npaused = true\ndepends_on = ["first"]\n'
        f"nics = [{{ forwards = [{{ host = {port}, guest = 22 }}] }}]\n",
    )
    before = qemu_pids(tmp_path)
    try:
        result = cli("up", path, "--no-probe")
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert (
        f"{path}:6: machines.second.nics[0].forwards[0].host: host port 127.0.0.1:{port}/tcp is in use by pid {os.getpid()}"
        in result.stderr
    )
    assert qemu_pids(tmp_path) == before
    assert not (tmp_path / ".qemuspec" / "first" / "state.json").exists()


def test_up_names_the_absolute_qemu_it_runs(qemu_bin, tmp_path):
    path = write(tmp_path, '[machines.vm]\nmachine = "none"\npaused = true\n')
    try:
        result = cli("up", path, "--no-probe")
        assert result.returncode == 0, result.stderr
        assert f"qemu {os.path.realpath(qemu_bin)}" in result.stdout
        assert "accel tcg" in result.stdout  # the accelerator actually used is on up's line
    finally:
        assert cli("down", path).returncode == 0


def test_render_says_what_auto_will_try(tmp_path):
    path = write(tmp_path, '[machines.vm]\nmachine = "none"\naccel = "auto"\n')
    env = {k: v for k, v in os.environ.items() if k != "QEMUSPEC_ACCEL"}
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", "render", path, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    import json

    argv = json.loads(result.stdout)
    if (
        argv[argv.index("-accel") + 1] == "kvm"
    ):  # this host has a /dev/kvm: say what happens if qemu cannot use it
        assert "if qemu cannot start on kvm, up starts it again on tcg" in result.stderr
    else:
        assert argv[argv.index("-accel") + 1] == "tcg" and result.stderr == ""
