"""Disks, images, cloud-init, guest access and private networks, with real guests under TCG."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
import time

import pytest

from qemuspec import img
from qemuspec.runtime.paths import Layout
from qemuspec.runtime.cloudinit import ensure_seed
from qemuspec.spec import loads
from test_lifecycle import cli, status

GUEST_BASE = """
[machines.{name}]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "256M"
rng = true
agent = true
stop_timeout = "10s"
"""


def machine(guest, name, extra=""):
    return GUEST_BASE.format(name=name, kernel=guest["kernel"], initrd=guest["initrd"]) + extra


def wait_console(path, name, text, timeout=60.0):
    log = os.path.join(os.path.dirname(path), ".qemuspec", name, "serial.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(log) and text in open(log, errors="replace").read():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not on {name}'s console within {timeout} s")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_overlay_keeps_the_base_and_reset_gives_a_clean_one(guest, tmp_path):
    base = tmp_path / "base.qcow2"
    img.create(str(base), "32M")
    before = sha(base)
    path = tmp_path / "disk.toml"
    path.write_text(
        machine(
            guest,
            "d",
            f"""
[machines.d.ready]
serial = "{guest["marker"]}"
agent = true
[[machines.d.disks]]
file = "overlay.qcow2"
format = "qcow2"
backing = "base.qcow2"
""",
        )
    )
    try:
        cli("up", str(path))
        assert img.info(str(tmp_path / "overlay.qcow2")).backing == str(base)
        written = cli(
            "exec",
            "d",
            "--file",
            str(path),
            "--",
            "/bin/sh",
            "-c",
            "echo written-by-the-guest | dd of=/dev/vda bs=512 seek=64 conv=fsync 2>/dev/null; "
            "dd if=/dev/vda bs=512 skip=64 count=1 2>/dev/null | head -c 21",
        )
        assert written.stdout == "written-by-the-guest\n"
        cli("snapshot", "save", "d", "before", "--file", str(path))
        assert json.loads(cli("snapshot", "list", "d", "--file", str(path), "--json").stdout) == [
            "before"
        ]
        cli(
            "exec",
            "d",
            "--file",
            str(path),
            "--",
            "/bin/sh",
            "-c",
            "echo after-the-snapshot > /tmp/mark",
        )
        cli("snapshot", "load", "d", "before", "--file", str(path))
        gone = cli(
            "exec", "d", "--file", str(path), "--", "/bin/sh", "-c", "cat /tmp/mark", check=False
        )
        assert gone.returncode == 1 and "No such file" in gone.stderr, (
            "loading the snapshot brought back the earlier guest memory"
        )
        cli("snapshot", "delete", "d", "before", "--file", str(path))
        assert json.loads(cli("snapshot", "list", "d", "--file", str(path), "--json").stdout) == []
    finally:
        cli("down", str(path))
    assert sha(base) == before, "the base image is untouched"
    differs = subprocess.run(
        ["qemu-img", "compare", "-q", str(tmp_path / "overlay.qcow2"), str(base)]
    )
    assert differs.returncode == 1, "the overlay holds the guest's write"
    cli("reset", "d", "--file", str(path))
    same = subprocess.run(["qemu-img", "compare", "-q", str(tmp_path / "overlay.qcow2"), str(base)])
    assert same.returncode == 0, "reset gave a clean overlay"
    assert sha(base) == before


def test_up_never_resizes_an_existing_image_silently(guest, tmp_path):
    img.create(str(tmp_path / "small.qcow2"), "16M")
    path = tmp_path / "grow.toml"
    path.write_text(
        machine(
            guest,
            "g",
            '[[machines.g.disks]]\nfile = "small.qcow2"\nformat = "qcow2"\nsize = "32M"\n',
        )
    )
    result = cli("up", str(path), check=False)
    assert (
        result.returncode == 1
        and "never resizes silently" in result.stderr
        and "img resize" in result.stderr
    )
    assert img.info(str(tmp_path / "small.qcow2")).virtual_size == 16 << 20


def test_img_info_json_and_convert_with_progress_only_on_a_terminal(tmp_path):
    src = tmp_path / "src.qcow2"
    assert cli("img", "create", str(src), "64M").returncode == 0
    info = json.loads(cli("img", "info", str(src), "--json").stdout)
    assert info["format"] == "qcow2" and info["virtual_size"] == 64 << 20
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qemuspec.cli.main",
            "img",
            "convert",
            str(src),
            str(tmp_path / "a.raw"),
            "-O",
            "raw",
        ],
        stdout=subprocess.PIPE,
        stderr=secondary,
    )
    os.close(secondary)
    out, _ = proc.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert proc.returncode == 0
    assert b"100.0%" in shown and b"[####" in shown, shown
    quiet = cli("img", "convert", str(src), str(tmp_path / "b.raw"), "-O", "raw")
    assert "%" not in quiet.stderr
    assert img.info(str(tmp_path / "b.raw")).format == "raw"
    again = cli("img", "convert", str(src), str(tmp_path / "b.raw"), "-O", "raw", check=False)
    assert again.returncode == 1 and "never overwrites" in again.stderr


def test_cloud_init_seed_is_rebuilt_only_when_its_inputs_change(tmp_path):
    spec = loads(
        '[machines.m.cloud_init]\nuser_data = "#cloud-config\\nhostname: {{ machine_name }}\\n"\n',
        "toml",
    )
    lay = Layout(str(tmp_path), str(tmp_path))
    m = spec.machines["m"]
    assert ensure_seed("m", m, lay, "") is True
    first = sha(lay.cidata)
    assert ensure_seed("m", m, lay, "") is False
    assert sha(lay.cidata) == first
    changed = m.model_copy(
        update={
            "cloud_init": m.cloud_init.model_copy(
                update={"user_data": "#cloud-config\nhostname: other\n"}
            )
        }
    )
    assert ensure_seed("m", changed, lay, "") is True
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(lay.cidata)
    names = sorted(
        c.rock_ridge.name().decode()
        for c in iso.list_children(rr_path="/")
        if c.rock_ridge and c.rock_ridge.name() not in (b".", b"..")
    )
    assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    iso.close()
    assert names == ["meta-data", "user-data"]


LAN = """
[networks.lan]
{a}
[machines.a.cloud_init]
user_data = \"\"\"#cloud-config
hostname: {{{{ machine_name }}}}
ssh_authorized_keys:
  - {{{{ ssh_public_key }}}}
\"\"\"
[machines.a.ready]
serial = "{marker}"
ssh = true
agent = true
[[machines.a.nics]]
forwards = [{{ host = 0, guest = 22 }}]
[[machines.a.nics]]
network = "lan"
address = "10.10.0.1/24"
{b}
[machines.b.ready]
serial = "{marker}"
agent = true
[[machines.b.nics]]
network = "lan"
address = "10.10.0.2/24"
"""


@pytest.fixture(scope="module")
def lan(tmp_path_factory, guest):
    if "/usr/sbin/dropbear" not in guest["extras"]:
        pytest.fail("the test guest has no dropbear: install dropbear-bin and rebuild it")
    tmp = tmp_path_factory.mktemp("lan")
    path = tmp / "lan.toml"
    path.write_text(
        LAN.format(a=machine(guest, "a"), b=machine(guest, "b"), marker=guest["marker"])
    )
    try:
        cli("up", str(path))
        yield str(path)
    finally:
        cli("down", str(path))
    assert not subprocess.run(["pgrep", "-f", f"vde_switch -s {tmp}"], capture_output=True).stdout


def test_guest_reads_the_cloud_init_seed(lan):
    log = open(os.path.join(os.path.dirname(lan), ".qemuspec", "a", "serial.log")).read()
    assert "ci| hostname: a" in log
    from qemuspec.runtime import sshkeys

    public = (
        open(sshkeys.key_path(os.path.join(os.path.dirname(lan), ".qemuspec")) + ".pub")
        .read()
        .split()[1]
    )
    assert public in log, "the generated key went into the user-data the guest read"


def test_exec_keeps_output_and_exit_codes(lan):
    ok = cli("exec", "a", "--file", lan, "--", "/bin/uname", "-a")
    assert ok.stdout.startswith("Linux qemuspec-guest")
    failing = cli(
        "exec", "a", "--file", lan, "--", "/bin/sh", "-c", "echo to-stderr >&2; exit 7", check=False
    )
    assert failing.returncode == 7 and failing.stderr == "to-stderr\n"
    as_json = json.loads(
        cli("exec", "a", "--file", lan, "--json", "--", "/bin/sh", "-c", "exit 3").stdout
    )
    assert as_json["exitcode"] == 3


def test_cp_round_trips_a_mebibyte(lan, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(1 << 20))
    cli("cp", "--file", lan, str(blob), "b:/tmp/blob")
    inside = cli(
        "exec", "b", "--file", lan, "--", "/bin/sh", "-c", "sha256sum /tmp/blob"
    ).stdout.split()[0]
    assert inside == sha(blob)
    cli("cp", "--file", lan, "b:/tmp/blob", str(tmp_path / "back"))
    assert sha(tmp_path / "back") == sha(blob)


def test_ssh_runs_a_command_with_the_generated_key(lan):
    from qemuspec.runtime import sshkeys

    key = sshkeys.key_path(
        os.path.join(os.path.dirname(lan), ".qemuspec")
    )  # outside the state directory
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    result = cli("ssh", "a", "--file", lan, "--", "echo", "over-ssh", "$(uname -n)")
    assert result.stdout.strip() == "over-ssh qemuspec-guest"
    ports = status(lan)["a"]["ports"]
    assert any(p["guest"] == 22 and p["host"] > 0 for p in ports)


def test_two_machines_talk_over_the_private_network(lan):
    cli(
        "exec",
        "a",
        "--file",
        lan,
        "--",
        "/bin/sh",
        "-c",
        "(echo served-over-lan | nc -l -p 9000 >/dev/null && echo 'qemuspec-lan: served a client') </dev/null >/dev/console 2>&1 &",
    )
    fetched = ""
    deadline = time.monotonic() + 30
    while (
        "served-over-lan" not in fetched and time.monotonic() < deadline
    ):  # until the listener is up
        fetched = cli(
            "exec",
            "b",
            "--file",
            lan,
            "--",
            "/bin/sh",
            "-c",
            "nc -w 3 10.10.0.1 9000 </dev/null | tee /dev/console",
            check=False,
        ).stdout
    assert "served-over-lan" in fetched
    wait_console(lan, "a", "qemuspec-lan: served a client")
    wait_console(lan, "b", "served-over-lan")
