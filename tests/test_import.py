"""`qemuspec import` on real-world command lines: nothing dropped, the re-rendered definition asks
qemu for the same machine, and it starts (-S) and answers QMP."""

from __future__ import annotations

import os
import shutil

import pytest

from qemuspec import img
from qemuspec.render import Layout, render
from qemuspec.runtime.cloudinit import build_iso
from qemuspec.runtime.instance import Instance
from qemuspec.spec import loads
from qemuspec.spec.importer import import_argv, normalise, split_command
from test_cli import cli

CORPUS = os.path.join(os.path.dirname(__file__), "data", "import_corpus.txt")
LINES = [line for line in open(CORPUS).read().splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, guest):
    tmp = tmp_path_factory.mktemp("import")
    img.create(str(tmp / "disk.qcow2"), "64M")
    img.create(str(tmp / "disk2.qcow2"), "64M")
    img.create(str(tmp / "raw.img"), "16M", format="raw")
    (tmp / "boot.iso").write_bytes(build_iso({"readme": b"hello\n"}))
    code = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    if not os.path.exists(code):
        pytest.fail("OVMF is missing: apt-get install ovmf")
    shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", tmp / "vars.fd")
    (tmp / "share").mkdir()
    return {"kernel": guest["kernel"], "initrd": guest["initrd"], "disk": str(tmp / "disk.qcow2"), "disk2": str(tmp / "disk2.qcow2"),
            "raw": str(tmp / "raw.img"), "iso": str(tmp / "boot.iso"), "code": code, "vars": str(tmp / "vars.fd"), "dir": str(tmp / "share")}


def test_the_corpus_is_large_enough():
    assert len(LINES) >= 30


@pytest.mark.parametrize("line", LINES, ids=[f"{i:02d}" for i in range(len(LINES))])
def test_import_round_trip_and_start(line, files, tmp_path):
    argv = split_command(line.format(**files))
    name, table, notes = import_argv(argv, base_dir=str(tmp_path))
    import tomli_w

    text = tomli_w.dumps({"machines": {name: table}})
    machine = loads(text, "toml", base_dir=str(tmp_path)).machines[name]
    rendered = render(machine, name, Layout(str(tmp_path / "state"), str(tmp_path / "run")))
    original, again = normalise(argv), normalise(rendered)
    assert [x for x in original if x not in again] == [] and [x for x in again if x not in original] == []
    # every switch of the original is typed, kept in append, or named in the notes
    kept = " ".join(rendered)
    for token in argv[1:]:
        if token.startswith("-") and token.lstrip("-") not in ("name", "nographic", "serial", "display", "qmp", "pidfile", "monitor", "mon", "S", "M", "enable-kvm", "cdrom", "hda", "hdb"):
            assert token in kept or any(token in n for n in notes), f"{token} dropped"
    inst = Instance(name, machine.model_copy(update={"paused": True}), str(tmp_path / "state" / name))
    inst.launch()
    try:
        assert inst.qmp.command("query-status")["status"] == "prelaunch"
    finally:
        inst.quit()


def test_import_command_writes_a_definition_that_validates(tmp_path, files):
    out = tmp_path / "imported.toml"
    result = cli("import", "-o", str(out), "--check", "--", "qemu-system-x86_64", "-M", "q35", "-m", "1G", "-kernel", files["kernel"],
                 "-netdev", "user,id=n0,hostfwd=tcp::2222-:22", "-device", "virtio-net-pci,netdev=n0", "-rtc", "base=utc", "-name", "web", "-nographic")
    assert result.returncode == 0, result.stderr
    assert "asks qemu for the same machine" in result.stderr
    text = out.read_text()
    assert "[machines.web]" in text and '"-rtc"' in text and "left to qemuspec: -nographic" in text
    assert cli("validate", str(out)).returncode == 0
    again = cli("import", "-o", str(out), "--", "qemu-system-x86_64")
    assert again.returncode == 2 and "--force" in again.stderr


def test_import_from_a_shell_script_file(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n# my VM\nqemu-system-x86_64 \\\n  -m 512 \\\n  -smp 2 \\\n  -append 'console=ttyS0 quiet' -kernel vmlinuz\n")
    result = cli("import", "--from", str(script), "--name", "old")
    assert result.returncode == 0, result.stderr
    assert 'cmdline = "console=ttyS0 quiet"' in result.stdout and "cpus = 2" in result.stdout
    assert f'kernel = "{os.getcwd()}/vmlinuz"' in result.stdout
