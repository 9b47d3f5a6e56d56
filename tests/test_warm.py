"""Warm start with real guests under TCG: the first `up` boots and saves, later ones restore; the
restored guest has the saved disk, the host's clock, its own RNG output and working forwards; a
changed definition or base image means a cold boot again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import alive, qemu_pids
from test_faults import timing, until

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
    return {
        "kernel": os.path.join(out, "vmlinuz"),
        "initrd": os.path.join(out, "initrd.gz"),
        "marker": stamp["marker"],
    }


def cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def events(path) -> list[dict]:
    with open(os.path.join(os.path.dirname(path), ".qemuspec", "w", "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last(path, name) -> dict:
    return [e for e in events(path) if e["event"] == name][-1]


def stamp(event) -> float:
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


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
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "16M"],
            check=True,
        )
        path = tmp_path / "warm.toml"
        path.write_text(
            MACHINE.format(
                kernel=guest["kernel"],
                initrd=guest["initrd"],
                marker=guest["marker"],
                memory=memory,
                agent="true" if agent else "false",
            )
        )
        made.append(str(path))
        return str(path)

    yield make
    for path in made:
        cli("down", path, check=False)
    assert qemu_pids(tmp_path) == before, "no qemu left behind"


def agent(path):
    from qemuspec.runtime import paths
    from qemuspec.runtime.agent import GuestAgent

    return GuestAgent(
        paths.layout(os.path.join(os.path.dirname(path), ".qemuspec", "w")).qga, timeout=30
    )


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


def test_warm_restore_has_the_saved_disk_the_host_clock_its_own_rng_and_forwards(
    warm_lab, generic_guest, tmp_path
):
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
            assert disk_head(ga).startswith(written[0].encode() + b"\n"), (
                f"restore {restore}: the disk as it was at the save"
            )
            guest_ns = ga.command("guest-get-time")
            assert abs(guest_ns / 1e9 - time.time()) < 2.0, (
                f"restore {restore}: guest clock {guest_ns / 1e9 - time.time():+.1f} s off"
            )
            outputs.append(guest_run(ga, "/bin/dd", "if=/dev/urandom", "bs=32", "count=1"))
            guest_run(
                ga,
                "/bin/dd",
                "of=/dev/vda",
                "conv=notrunc,fsync",
                stdin=b"written-after-the-restore\n",
            )
            assert disk_head(ga).startswith(b"written-after-the-restore")
        port = row["ports"][0]["host"]
        assert "qemuspec-guest http ok" in http(port)
        cli("down", path)
    assert len(outputs[0]) == len(outputs[1]) == 32 and outputs[0] != outputs[1], (
        "two restores of one state must not share RNG output"
    )
    assert identity(tmp_path / "disk.qcow2") == frozen, (
        "the frozen disk is never written by a restore"
    )


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
    assert (
        "restores share RNG state" in last(path, "QEMUSPEC_RESTORED")["data"]["rng"]
    )  # said plainly: no agent to check
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
    with open(memory, "r+b") as f:  # same size, and the digest made to match: only qemu can tell
        f.write(b"\0" * 4096)
    key = tmp_path / ".qemuspec" / "w" / "warm" / "key.json"
    record = json.loads(key.read_text())
    record["memory_sha256"] = hashlib.sha256(memory.read_bytes()).hexdigest()
    key.write_text(json.dumps(record))
    assert plan(path)["boot"] == "warm"
    out = cli("up", path)
    assert "boot cold" in out.stdout
    failed = last(path, "QEMUSPEC_RESTORE_FAILED")
    assert failed["data"]["then"] == "cold boot"
    assert last(path, "QEMUSPEC_SAVED")["timestamp"]["seconds"] >= failed["timestamp"]["seconds"], (
        "a fresh state was saved"
    )
    cli("down", path)
    assert plan(path)["boot"] == "warm"


# -- fault matrix (issue 22, items 1-4): each row asserts the data kept (read back from the disk image on
# the host), what up and status say, and what is left running. Timings go to $QEMUSPEC_FAULT_TIMINGS.

DATA_SECTOR = 2048  # 1 MiB into the disk: the guest's boot stamp only ever writes sector 0


def write_data(path, text: bytes) -> None:
    """The guest writes and fsyncs ``text`` at DATA_SECTOR, and reads it back from the disk."""
    with agent(path) as ga:
        ga.sync()
        guest_run(
            ga,
            "/bin/dd",
            "of=/dev/vda",
            "bs=512",
            f"seek={DATA_SECTOR}",
            "conv=notrunc,fsync",
            stdin=text,
        )
        ga.write_file("/proc/sys/vm/drop_caches", b"3\n")
        assert guest_run(
            ga, "/bin/dd", "if=/dev/vda", "bs=512", f"skip={DATA_SECTOR}", "count=1"
        ).startswith(text)


def on_host(tmp_path, sector=DATA_SECTOR) -> bytes:
    """A sector of the declared disk as qemu-img reads its image chain (qemu is stopped)."""
    raw = tmp_path / "read-back.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(tmp_path / "disk.qcow2"), str(raw)], check=True
    )
    with open(raw, "rb") as f:
        f.seek(sector * 512)
        data = f.read(512)
    raw.unlink()
    return data


def open_files(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def held_supervisor(path) -> int:
    """The supervisor pid once it has stopped itself at the QEMUSPEC_TEST_HOLD_SAVE point."""
    from qemuspec.runtime import statedir, paths

    run = paths.run_dir(os.path.join(os.path.dirname(path), ".qemuspec", "w"))

    def stopped():
        rec = statedir.read(run, statedir.SUPERVISOR, statedir.SupervisorRecord)
        return rec.pid if rec is not None and proc_state(rec.pid) == "T" else None

    return until(stopped, timeout=180, what="the supervisor to stop at the save")


def up_held(path, point: str) -> subprocess.Popen:
    env = {**os.environ, "QEMUSPEC_TEST_HOLD_SAVE": point}
    return subprocess.Popen(
        [sys.executable, "-m", "qemuspec.cli.main", "up", path, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def status_row(path) -> dict:
    return json.loads(cli("status", path, "--json").stdout)[0]


def test_a_failed_warm_save_keeps_the_disk_and_every_later_write(warm_lab, guest, tmp_path):
    """Item 1: the state directory is full, the migration fails: the disk is moved back onto its file
    before the guest runs again, nothing qemu has open is deleted, `up` says the save failed and why."""
    if os.getuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root (this test mounts a small tmpfs)")
        pytest.skip("needs root to mount a small tmpfs")
    path = warm_lab(guest)
    state = tmp_path / ".qemuspec"
    state.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(state)], check=True
    )
    try:
        result = cli("up", path, "--json")
        [up] = json.loads(result.stdout)
        assert up["action"] == "started" and "boot cold" in up["detail"]
        assert "warm save failed" in up["detail"] and "No space left on device" in up["detail"], up
        assert "the disks are back on their own files" in up["detail"]
        assert any(
            "warm save failed" in w and "No space left on device" in w for w in up["warnings"]
        )
        failed = last(path, "QEMUSPEC_SAVE_FAILED")
        began = [e for e in events(path) if e["event"] == "MIGRATION"][0]
        committed = last(path, "BLOCK_JOB_COMPLETED")
        timing(
            "warm save fails (state directory full)",
            detection=stamp(failed) - stamp(began),
            recovery=stamp(committed) - stamp(began),
        )
        files = open_files(up["pid"])
        assert not [f for f in files if f.endswith(" (deleted)")], (
            f"qemu has deleted files open: {files}"
        )
        assert str(tmp_path / "disk.qcow2") in files and not any("live-disk" in f for f in files), (
            files
        )
        assert not (state / "w" / "warm" / "live-disk0.qcow2").exists()
        row = status_row(path)
        assert (
            row["state"] == "running"
            and row["pid"] == up["pid"]
            and row["next_boot"]["boot"] == "cold"
        )
        write_data(path, b"written-after-the-failed-save\n")
        [down] = json.loads(cli("down", path, "--json").stdout)
        assert down["action"] == "stopped" and down["forced"] is False
        assert on_host(tmp_path).startswith(b"written-after-the-failed-save\n"), (
            "the write reached the declared disk"
        )
    finally:
        cli("down", path, check=False)
        subprocess.run(["umount", str(state)], check=False)


def test_a_supervisor_killed_in_the_save_is_adopted_and_no_write_is_lost(warm_lab, guest, tmp_path):
    """Item 2: the supervisor dies mid-save (guest stopped, disk on the live overlay). `up` adopts it,
    undoes the save (commits the overlay back) and resumes it; later writes survive a cold boot + save."""
    path = warm_lab(guest)
    first = up_held(path, "migrating")
    sup = held_supervisor(path)
    os.kill(sup, signal.SIGKILL)
    killed = time.monotonic()
    out, err = first.communicate(timeout=120)
    assert (
        first.returncode == 1 and "supervisor exited unexpectedly" in json.loads(out)[0]["detail"]
    ), (out, err)
    row = status_row(path)
    detected = time.monotonic() - killed
    assert row["state"] == "unsupervised" and "died during a warm save" in row["reason"], row
    qemu = row["pid"]
    began = time.monotonic()
    [adopted] = json.loads(cli("up", path, "--json").stdout)
    recovery = time.monotonic() - began
    timing("supervisor killed during the save", detection=detected, recovery=recovery)
    assert adopted["action"] == "adopted" and adopted["pid"] == qemu
    assert (
        "the interrupted save was undone: the disks are back on their own files"
        in adopted["detail"]
    ), adopted
    row = status_row(path)
    assert (
        row["state"] == "running"
        and row["supervisor"] not in (None, sup)
        and row["next_boot"]["boot"] == "cold"
    )
    files = open_files(qemu)
    assert str(tmp_path / "disk.qcow2") in files and not any(
        "live-disk" in f or "(deleted)" in f for f in files
    ), files
    write_data(path, b"written-after-the-adoption\n")
    cli("down", path)
    [cold] = json.loads(cli("up", path, "--json").stdout)
    assert "boot cold" in cold["detail"] and "state saved" in cold["detail"]
    cli("down", path)
    assert on_host(tmp_path).startswith(b"written-after-the-adoption\n"), (
        "the new save froze the disk with the write"
    )


def test_writes_into_an_interrupted_saves_overlay_are_committed_before_the_next_boot(
    warm_lab, guest, tmp_path
):
    """Item 2, without adoption: the supervisor dies mid-save, the guest is resumed by hand and writes
    into the overlay, `down` stops it. The next start commits the overlay into the disk before qemu
    runs (a cold boot never starts from a disk its overlay holds newer data for)."""
    path = warm_lab(guest)
    first = up_held(path, "migrating")
    os.kill(held_supervisor(path), signal.SIGKILL)
    first.communicate(timeout=120)
    assert status_row(path)["state"] == "unsupervised"
    cli("resume", path)
    write_data(path, b"written-into-the-overlay\n")
    cli("down", path)
    assert (tmp_path / ".qemuspec" / "w" / "warm" / "live-disk0.qcow2").exists(), (
        "the overlay with the write is kept"
    )
    assert not on_host(tmp_path).startswith(b"written-into-the-overlay"), (
        "the write is only in the overlay so far"
    )
    assert "interrupted" in plan(path)["why"]
    began = time.monotonic()
    [cold] = json.loads(cli("up", path, "--json").stdout)
    timing(
        "overlay of an interrupted save committed at the next start",
        recovery=time.monotonic() - began,
    )
    assert "boot cold" in cold["detail"] and "state saved" in cold["detail"]
    assert "committed" in last(path, "QEMUSPEC_SAVE_RECOVERED")["data"]["done"][0]
    cli("down", path)
    assert on_host(tmp_path).startswith(b"written-into-the-overlay\n")


def test_qemu_dying_during_the_save_is_a_failure_and_the_next_start_recovers(
    warm_lab, guest, tmp_path
):
    """Item 4: qemu killed in the save (after the disk moved onto the overlay): `up` fails with the
    reason, nothing is left running, and the next `up` commits the overlay and boots cold."""
    path = warm_lab(guest)
    first = up_held(path, "snapshot")
    sup = held_supervisor(path)
    from qemuspec.runtime.instance import recorded

    qemu = recorded(str(tmp_path / ".qemuspec" / "w")).pid
    os.kill(qemu, signal.SIGKILL)
    killed = time.monotonic()
    os.kill(sup, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    detected = time.monotonic() - killed
    assert first.returncode == 1, (out, err)
    [failed] = json.loads(out)
    assert failed["action"] == "failed", failed
    assert "qemu exited during the warm save (killed (signal 9))" in failed["detail"], failed
    row = status_row(path)
    assert row["state"] == "failed" and row["pid"] is None and row["supervisor"] is None
    assert not alive(qemu) and not alive(sup)
    serial = open(tmp_path / ".qemuspec" / "w" / "serial.log", errors="replace").read()
    [boot_stamp] = re.findall(r"qemuspec-guest: disk (stamp-warm-\S+)", serial)
    assert (tmp_path / ".qemuspec" / "w" / "warm" / "live-disk0.qcow2").exists(), (
        "the overlay qemu died on is kept"
    )
    assert on_host(tmp_path, 0).startswith(boot_stamp.encode() + b"\n"), (
        "what the guest wrote before the save is kept"
    )
    began = time.monotonic()
    [again] = json.loads(cli("up", path, "--json").stdout)
    timing("qemu killed during the save", detection=detected, recovery=time.monotonic() - began)
    assert (
        again["action"] == "started"
        and "boot cold" in again["detail"]
        and "state saved" in again["detail"]
    )
    assert "committed" in last(path, "QEMUSPEC_SAVE_RECOVERED")["data"]["done"][0]
    cli("down", path)
    assert plan(path)["boot"] == "warm"


def test_a_changed_memory_file_is_refused_by_its_digest_and_the_machine_boots_cold(
    warm_lab, guest, tmp_path
):
    """Item 4: 16 bytes flipped in warm/memory (same size, same mtime kept): the digest saved with the
    key refuses it before qemu reads it; `up` boots cold, says why, and saves a fresh state."""
    path = warm_lab(guest, agent=False)
    cli("up", path)
    cli("down", path)
    memory = tmp_path / ".qemuspec" / "w" / "warm" / "memory"
    before = os.stat(memory)
    with open(memory, "r+b") as f:
        f.seek(before.st_size // 2)
        chunk = f.read(16)
        f.seek(before.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    os.utime(memory, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert plan(path)["boot"] == "warm", "nothing but the bytes changed"
    began = time.monotonic()
    result = cli("up", path)
    timing("warm/memory changed (16 bytes)", recovery=time.monotonic() - began)
    assert "boot cold" in result.stdout and "does not match the sha256 digest" in result.stdout, (
        result.stdout
    )
    assert (
        "warning: w: the saved state was not restored" in result.stderr
        and "digest" in result.stderr
    )
    assert "digest" in last(path, "QEMUSPEC_RESTORE_FAILED")["data"]["error"]
    assert "digest" in last(path, "QEMUSPEC_LAUNCHED")["data"]["why"]
    assert last(path, "QEMUSPEC_LAUNCHED")["data"]["boot"] == "cold"
    cli("down", path)
    assert plan(path)["boot"] == "warm", "a fresh state was saved"


def test_validate_plan_up_and_status_say_that_warm_disk_writes_end_at_down(
    warm_lab, guest, tmp_path
):
    """Item 3: a warm machine's disk writes after the save are dropped by the next start; every
    command that shows the machine says so."""
    path = warm_lab(guest, agent=False)
    validate = cli("validate", path)
    assert "last only until `down`" in validate.stderr
    assert (
        "last only until `down`"
        in json.loads(cli("validate", path, "--json").stdout)[0]["notes"][0]
    )
    assert "last only until `down`" in plan(path)["disk_writes"]
    assert "last only until `down`" in cli("plan", path, check=False).stdout
    up = cli("up", path)
    assert "writes to its disks last only until `down`" in up.stdout
    assert "last only until `down`" in cli("status", path).stdout
    assert "last only until `down`" in status_row(path)["next_boot"]["disk_writes"]
    cli("down", path)
