"""Fresh restores of a checkpoint (runtime/fresh.py) with the real test guest: `qemuspec test` runs
every case on its own restore (no case sees another's disk or memory writes, no two read the same
/dev/urandom bytes), a failing case is a failure in the JUnit XML and the exit code, and its files are
kept; `qemuspec run` restores a checkpoint copied with plain `cp` into another store for a moved
checkout, and a changed `memory` boots cold with the reason. Without a VM: the key is of content, not
of paths, and `warm key` prints it; the definition checks of [tests.NAME] and setup."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from helpers import qemu_pids

CASES = 12
DEFINITION = """
[machines.box]
accel = "tcg"
memory = "{memory}"
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
rng = true
agent = true
warm = true
stop_timeout = "5s"
setup = ["echo set-up-{stamp} | dd of=/dev/vda bs=512 seek=40 conv=notrunc,fsync 2>/dev/null"]
disks = [{{ file = "base.qcow2", format = "qcow2" }}]
nics = [{{ forwards = [{{ host = 0, guest = 80 }}], device_options = {{ romfile = "" }} }}]

[machines.box.ready]
serial = "{marker}"
agent = true
timeout = "120s"
"""

# Each case writes its marker into its own sector of the disk and its own file in the guest's tmpfs,
# then reads back every sector and file: only its own marker and the setup's may be there. It prints
# 16 bytes of /dev/urandom as hex.
CASE = """
[tests.case{i:02d}]
command = '''
echo marker-{i} | dd of=/dev/vda bs=512 seek={i} conv=notrunc,fsync 2>/dev/null
echo marker-{i} > /root/marker-{i}
echo 3 > /proc/sys/vm/drop_caches
disk=$(dd if=/dev/vda bs=512 count=41 2>/dev/null | tr -c 'a-z0-9-' '\\n' | grep -e '^marker-' -e '^set-up-' | sort | tr '\\n' ' ')
files=$(ls /root | grep '^marker-' | tr '\\n' ' ')
echo "disk: $disk"
echo "files: $files"
echo "rng: $(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n')"
[ "$disk" = "marker-{i} set-up-{stamp} " ] && [ "$files" = "marker-{i} " ]
'''
timeout = "60s"
"""

FAILING = """
[tests.fails]
command = "echo this case fails on purpose; exit 3"
"""


def cli(env, *args, check=False):
    return subprocess.run(
        [sys.executable, "-m", "qemuspec", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def write(directory, guest, memory="256M", cases=True) -> str:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(directory / "base.qcow2"), "1M"],
        check=True,
    )
    text = DEFINITION.format(
        memory=memory,
        kernel=guest["kernel"],
        initrd=guest["initrd"],
        marker=guest["marker"],
        stamp="s1",
    )
    if cases:
        text += "".join(CASE.format(i=i, stamp="s1") for i in range(CASES)) + FAILING
    path = directory / "box.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def lab(tmp_path):
    """Temporary files (the restores' state roots) and the warm store inside tmp_path, so the qemu
    counted and the files left are this test's own."""
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path / "tmp"),
        "QEMUSPEC_WARM_DIR": str(tmp_path / "store"),
        "QEMUSPEC_ACCEL": "tcg",
    }
    before = qemu_pids(tmp_path)
    yield env
    assert qemu_pids(tmp_path) == before, "no qemu left behind"
    assert os.listdir(tmp_path / "tmp") == [], "no restore's files left behind"


def test_every_case_on_its_own_restore_with_its_own_rng_and_junit(lab, guest, tmp_path):
    path = write(tmp_path, guest)
    junit, kept = tmp_path / "report.xml", tmp_path / "failed"
    result = cli(lab, "test", path, "-j", "2", "--junit", str(junit), "--keep-failed", str(kept))
    assert result.returncode == 1, (
        f"a failing case fails the run:\n{result.stdout}\n{result.stderr}"
    )
    assert "booting cold to make checkpoint" in result.stderr, result.stderr
    assert re.search(r"^FAIL fails: exit 3", result.stdout, re.M), result.stdout
    assert f"{CASES} passed, 1 failed" in result.stdout

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == (str(CASES + 1), "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    failure = cases.pop("fails").find("failure")
    assert failure is not None and failure.get("message") == "exit code 3"
    assert "fails on purpose" in (failure.text or "")
    values = []
    for name, case in sorted(cases.items()):
        out = case.findtext("system-out") or ""
        assert case.find("failure") is None and case.find("error") is None, f"{name}: {out}"
        i = int(name[4:])
        assert f"disk: marker-{i} set-up-s1 " in out, f"{name} sees only its own disk writes: {out}"
        assert f"files: marker-{i} " in out, f"{name} sees only its own files: {out}"
        values.append(re.search(r"rng: ([0-9a-f]{32})", out).group(1))
    assert len(values) == CASES and len(set(values)) == CASES, (
        f"every restore reads its own /dev/urandom bytes: {values}"
    )
    assert sorted(os.listdir(kept / "fails")) == [
        "events.jsonl",
        "output.txt",
        "qemu.log",
        "serial.log",
    ]
    assert "fails on purpose" in (kept / "fails" / "output.txt").read_text()
    assert "MIGRATION" in (kept / "fails" / "events.jsonl").read_text(), "a restore's own events"
    assert not os.path.exists(kept / "case00"), "passing cases keep nothing"

    again = cli(lab, "test", path, "-k", "case0[12]", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert sorted(r["case"] for r in rows if "case" in r) == ["case01", "case02"]
    assert all(r["boot"] == "warm" for r in rows if "case" in r)

    # a case whose guest kernel panics fails with the crash report and test's crash exit code
    with open(path, "a") as f:
        f.write('\n[tests.panics]\ncommand = "echo c > /proc/sysrq-trigger"\ntimeout = "60s"\n')
    crashed = cli(lab, "test", path, "-k", "panics", "--json", "--junit", str(junit))
    assert crashed.returncode == 250, crashed.stdout + crashed.stderr
    row = next(json.loads(line) for line in crashed.stdout.splitlines() if '"case"' in line)
    assert row["passed"] is False and "sysrq" in json.dumps(row["crash"]), row
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and "sysrq" in ET.tostring(suite, encoding="unicode")


def test_a_copied_store_is_restored_for_a_moved_checkout_and_memory_change_boots_cold(
    lab, guest, tmp_path
):
    first = tmp_path / "first"
    first.mkdir()
    path = write(first, guest, cases=False)
    made = cli(lab, "run", path, "--json", "--", "true")
    assert made.returncode == 0, made.stderr
    key = cli(lab, "warm", "key", path).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", key), key
    assert os.path.isdir(os.path.join(lab["QEMUSPEC_WARM_DIR"], key))

    moved = (
        tmp_path / "moved"
    )  # the checkout elsewhere, the store copied with plain cp (new inodes)
    moved.mkdir()
    shutil.copy(first / "box.toml", moved / "box.toml")
    shutil.copy(first / "base.qcow2", moved / "base.qcow2")
    shutil.rmtree(first)
    copied = str(tmp_path / "copied-store")
    subprocess.run(["cp", "-r", lab["QEMUSPEC_WARM_DIR"], copied], check=True)
    shutil.rmtree(lab["QEMUSPEC_WARM_DIR"])
    env = {**lab, "QEMUSPEC_WARM_DIR": copied}
    moved_path = str(moved / "box.toml")
    assert cli(env, "warm", "key", moved_path).stdout.strip() == key, "the key is of content"

    sector = "dd if=/dev/vda bs=512 skip=40 count=1 2>/dev/null | head -n1"
    restored = cli(env, "run", moved_path, "--json", "--", "/bin/sh", "-c", sector)
    assert restored.returncode == 0, restored.stderr
    lines = [json.loads(line) for line in restored.stdout.splitlines()]
    assert "set-up-s1" in "".join(line.get("data", "") for line in lines), (
        "the setup's disk write, from the copied checkpoint's disk on the moved base"
    )
    assert lines[-1]["boot"] == "warm" and lines[-1]["checkpoint"] == key, lines[-1]
    assert "made" not in lines[-1] and "booting cold" not in restored.stderr

    text = (moved / "box.toml").read_text().replace('memory = "256M"', 'memory = "320M"')
    (moved / "box.toml").write_text(text)
    cold = cli(env, "run", moved_path, "--", "true")
    assert cold.returncode == 0, cold.stderr
    assert re.search(
        f"checkpoint {key} does not fit: .*-m 256M -> 320M.*: booting cold", cold.stderr
    ), cold.stderr
    assert re.search(r"restored checkpoint (?!" + key + ")", cold.stderr), "its own new checkpoint"


def fake_guest(directory) -> dict:
    """Files standing for the guest's kernel and initrd: the key and validate only read them."""
    for name in ("vmlinuz", "initrd.gz"):
        (directory / name).write_bytes(name.encode() * 1000)
    return {"kernel": "vmlinuz", "initrd": "initrd.gz", "marker": "ready"}


def test_the_key_is_of_content_not_paths_and_warm_key_prints_it(tmp_path, qemu_bin):
    from qemuspec.runtime import fresh
    from qemuspec.settings import Settings
    from qemuspec.spec.loader import load

    settings = Settings.from_env({**os.environ, "QEMUSPEC_ACCEL": "tcg"})
    keys = []
    for where in ("a", "b"):
        directory = tmp_path / where
        directory.mkdir()
        path = write(directory, fake_guest(directory))
        keys.append(fresh.key("box", load(path).machines["box"], settings).digest)
    assert keys[0] == keys[1], "copies of the same files in another directory: the same key"
    with open(tmp_path / "b" / "initrd.gz", "ab") as f:
        f.write(b"\0")
    changed = fresh.key("box", load(path).machines["box"], settings)
    assert changed.digest != keys[0], "another initrd: another key"
    printed = cli({**os.environ, "QEMUSPEC_ACCEL": "tcg"}, "warm", "key", path)
    assert printed.returncode == 0 and printed.stdout.strip() == changed.digest, printed.stderr


@pytest.mark.parametrize(
    "extra, says",
    [
        ('[tests.t]\nmachine = "nope"\ncommand = "true"\n', 'no machine named "nope"'),
        ('[tests.t]\ncommand = "true"\ntimeout = "soon"\n', "tests.t.timeout"),
        ("[tests.t]\ntimeout = 5\n", "tests.t.command"),
    ],
)
def test_declared_cases_are_checked_by_validate(tmp_path, extra, says):
    path = write(tmp_path, fake_guest(tmp_path), cases=False)
    with open(path, "a") as f:
        f.write(extra)
    result = cli(os.environ, "validate", path)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
