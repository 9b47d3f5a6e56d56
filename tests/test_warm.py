"""Warm start with real guests under TCG: the first `up` boots and saves, later ones restore; the
restored guest has the saved disk, the host's clock, its own RNG output and working forwards; a
changed definition or base image means a cold boot again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import qemu_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

MACHINE = """
[machines.w]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet qemuspec.stamp=warm"
memory = "{memory}"
rng = true
agent = {agent}
warm = true
stop_timeout = "5s"
disks = [{{ file = "disk.qcow2", format = "qcow2", backing = "base.qcow2", backing_format = "qcow2" }}]
nics = [{{ forwards = [{{ host = 0, guest = 80 }}], device_options = {{ romfile = "" }} }}]

[machines.w.ready]
serial = "{marker}"
tcp = 80
agent = {agent}
timeout = "120s"
"""


@pytest.fixture(scope="session")
def generic_guest(qemu_bin) -> dict:
    """The test guest on Debian's generic kernel, which has the vmgenid driver the cloud kernel lacks."""
    sys.path.insert(0, os.path.join(ROOT, "guest"))
    try:
        import build
    finally:
        sys.path.pop(0)
    out = os.path.join(ROOT, "guest", "out-generic")
    try:
        stamp = build.build(out, os.path.join(ROOT, "guest", "cache"), kernel="generic")
    except (SystemExit, Exception) as exc:
        if IN_CI:
            pytest.fail(f"cannot build the generic-kernel test guest: {exc}")
        pytest.skip(f"cannot build the generic-kernel test guest: {exc}")
    return {"kernel": os.path.join(out, "vmlinuz"), "initrd": os.path.join(out, "initrd.gz"), "marker": stamp["marker"]}


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "qemuspec.cli.main", *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def events(path) -> list[dict]:
    with open(os.path.join(os.path.dirname(path), ".qemuspec", "w", "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last(path, name) -> dict:
    return [e for e in events(path) if e["event"] == name][-1]


def plan(path) -> dict:
    result = cli("plan", path, "--json", check=False)
    assert result.returncode in (0, 3), result.stderr  # 3: up would change something
    return json.loads(result.stdout)[0]["warm"]


def identity(path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


@pytest.fixture
def warm_lab(tmp_path):
    """A warm definition in tmp_path with a base image; brought down afterwards, nothing left running."""
    before = qemu_pids(tmp_path)
    made = []

    def make(guest, memory="256M", agent=True):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "16M"], check=True)
        path = tmp_path / "warm.toml"
        path.write_text(MACHINE.format(kernel=guest["kernel"], initrd=guest["initrd"], marker=guest["marker"], memory=memory,
                                       agent="true" if agent else "false"))
        made.append(str(path))
        return str(path)

    yield make
    for path in made:
        cli("down", path, check=False)
    assert qemu_pids(tmp_path) == before, "no qemu left behind"


def agent(path):
    from qemuspec.runtime import paths
    from qemuspec.runtime.agent import GuestAgent

    return GuestAgent(paths.layout(os.path.join(os.path.dirname(path), ".qemuspec", "w")).qga, timeout=30)


def guest_run(ga, *argv: str, stdin: bytes | None = None) -> bytes:
    code, out, err = ga.exec(list(argv), stdin=stdin, timeout=60)
    assert code == 0, f"{argv}: exit {code}: {err!r}"
    return out


def disk_head(ga) -> bytes:
    """The first sector as the disk has it, not as the guest's page cache remembers it."""
    ga.write_file("/proc/sys/vm/drop_caches", b"3\n")
    return guest_run(ga, "/bin/dd", "if=/dev/vda", "bs=512", "count=1")


def http(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return response.read().decode()


def test_warm_restore_has_the_saved_disk_the_host_clock_its_own_rng_and_forwards(warm_lab, generic_guest, tmp_path):
    path = warm_lab(generic_guest)
    # The saved guest's clock is set years off (its hardware clock starts in 2001), so a restore that did
    # not set the clock from the host shows it at once, however little time passed since the save.
    clock = 'append = ["-rtc", "base=2001-01-01T00:00:00"]\n'
    text = open(path).read().replace("\n[machines.w.ready]", "\n" + clock + "\n[machines.w.ready]")
    open(path, "w").write(text)
    assert plan(path)["boot"] == "cold"
    first = cli("up", path)
    assert "boot cold" in first.stdout and "state saved" in first.stdout
    with agent(path) as ga:
        skew = ga.command("guest-get-time") / 1e9 - time.time()
    assert skew < -365 * 86400, f"the saved guest's clock is in 2001, not {skew:+.0f} s off"
    saved = last(path, "QEMUSPEC_SAVED")
    assert saved["data"]["bytes"] > 0
    serial = open(tmp_path / ".qemuspec" / "w" / "serial.log", errors="replace").read()
    written = re.findall(r"qemuspec-guest: disk (stamp-warm-\S+)", serial)
    assert len(written) == 1, "the cold boot wrote one stamp to its disk before the save"
    cli("down", path)
    frozen = identity(tmp_path / "disk.qcow2")
    assert plan(path)["boot"] == "warm"

    outputs = []
    for restore in (1, 2):
        out = cli("up", path)
        assert "boot warm" in out.stdout, out.stdout
        row = json.loads(cli("status", path, "--json").stdout)[0]
        assert row["boot"] == "warm" and row["state"] == "running"
        restored = last(path, "QEMUSPEC_RESTORED")
        assert restored["data"]["rng"] == "reseeded by the guest's vmgenid driver"
        assert restored["data"]["clock"].startswith("set from the host")
        with agent(path) as ga:
            ga.sync()
            assert disk_head(ga).startswith(written[0].encode() + b"\n"), f"restore {restore}: the disk as it was at the save"
            guest_ns = ga.command("guest-get-time")
            assert abs(guest_ns / 1e9 - time.time()) < 2.0, f"restore {restore}: guest clock {guest_ns / 1e9 - time.time():+.1f} s off"
            outputs.append(guest_run(ga, "/bin/dd", "if=/dev/urandom", "bs=32", "count=1"))
            guest_run(ga, "/bin/dd", "of=/dev/vda", "conv=notrunc,fsync", stdin=b"written-after-the-restore\n")
            assert disk_head(ga).startswith(b"written-after-the-restore")
        port = row["ports"][0]["host"]
        assert "qemuspec-guest http ok" in http(port)
        cli("down", path)
    assert len(outputs[0]) == len(outputs[1]) == 32 and outputs[0] != outputs[1], "two restores of one state must not share RNG output"
    assert identity(tmp_path / "disk.qcow2") == frozen, "the frozen disk is never written by a restore"


def test_a_changed_base_image_or_definition_means_a_cold_boot(warm_lab, guest, tmp_path):
    path = warm_lab(guest, agent=False)
    cli("up", path)
    cli("down", path)
    assert plan(path)["boot"] == "warm"
    # Same name, same size, another file: identity is more than the name
    base = str(tmp_path / "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base + ".new", "16M"], check=True)
    os.replace(base + ".new", base)
    verdict = plan(path)
    assert verdict["boot"] == "cold" and base in verdict["why"]
    assert "boot cold" in cli("up", path).stdout
    assert last(path, "QEMUSPEC_LAUNCHED")["data"]["why"] == verdict["why"]
    cli("down", path)
    assert plan(path)["boot"] == "warm"
    restored = cli("up", path)
    assert "boot warm" in restored.stdout
    assert "restores share RNG state" in last(path, "QEMUSPEC_RESTORED")["data"]["rng"]  # said plainly: no agent to check
    cli("down", path)

    text = open(path).read().replace('memory = "256M"', 'memory = "320M"')
    open(path, "w").write(text)
    verdict = plan(path)
    assert verdict["boot"] == "cold" and "definition changed" in verdict["why"]
    assert "boot cold" in cli("up", path).stdout
    cli("down", path)


def test_a_saved_state_that_does_not_load_falls_back_to_a_cold_boot(warm_lab, guest, tmp_path):
    path = warm_lab(guest, agent=False)
    cli("up", path)
    cli("down", path)
    memory = tmp_path / ".qemuspec" / "w" / "warm" / "memory"
    with open(memory, "r+b") as f:  # same size, so only qemu can tell
        f.write(b"\0" * 4096)
    assert plan(path)["boot"] == "warm"
    out = cli("up", path)
    assert "boot cold" in out.stdout
    failed = last(path, "QEMUSPEC_RESTORE_FAILED")
    assert failed["data"]["then"] == "cold boot"
    assert last(path, "QEMUSPEC_SAVED")["timestamp"]["seconds"] >= failed["timestamp"]["seconds"], "a fresh state was saved"
    cli("down", path)
    assert plan(path)["boot"] == "warm"
