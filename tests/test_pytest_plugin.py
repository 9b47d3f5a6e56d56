"""The pytest plugin against the real test guest, run as a user runs it: a separate pytest process
that finds the plugin through its pytest11 entry point (no conftest, no -p), with --junitxml.

One inner session: two tests that each write a marker in the guest and check the other's is not
there (each test starts from its own fresh restore, whichever order they run in), one that fails
(its report carries the machine's console and events), one whose guest panics through sysrq (the
crash report ends the test at once), one that catches the crash and passes (failed for it), and the handle methods a test reaches for. The restores come
from one checkpoint in a warm store of this test's own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

from helpers import qemu_pids
from test_lifecycle import definition

INNER = """
import os
import re

import pytest

from qemuspec.errors import GuestCrashed
from qemuspec.pytest_plugin import CommandFailed

DEFINITION = {definition!r}


def fresh_and_marked(qemuspec_machines, mine, other):
    vm = qemuspec_machines(DEFINITION)["box"]
    assert vm.instance.boot == "warm", vm.instance.restored
    vm.fail("test -e /tmp/marker-" + other)
    vm.fail("test -e /tmp/marker-" + mine)
    vm.succeed("echo {{}} > /tmp/marker-{{}}".format(mine, mine))
    assert vm.succeed("cat /tmp/marker-" + mine) == mine + "\\n"
    return vm


def test_first_starts_fresh(qemuspec_machines):
    fresh_and_marked(qemuspec_machines, "first", "second")


def test_second_starts_fresh(qemuspec_machines):
    fresh_and_marked(qemuspec_machines, "second", "first")


def test_handles(qemuspec_machines, tmp_path):
    vm = qemuspec_machines(DEFINITION)["box"]
    code, out = vm.execute("echo out; echo err >&2; exit 3")
    assert (code, out) == (3, "out\\n")
    with pytest.raises(CommandFailed, match="exited 3"):
        vm.succeed("exit 3")
    vm.succeed("(sleep 2; touch /tmp/later) >/dev/null 2>&1 &")
    vm.wait_until_succeeds("test -e /tmp/later", timeout=60)
    vm.succeed("echo console-word-$((6 * 7)) > /dev/console")
    assert vm.wait_for_console_text("console-word-42", timeout=60) == "console-word-42"
    vm.succeed("(sleep 1; httpd -p 8123 -h /tmp) >/dev/null 2>&1 &")
    vm.wait_for_open_port(8123, timeout=60)
    src = tmp_path / "from-host.txt"
    src.write_text("host bytes")
    vm.copy_from_host(str(src), "/tmp/from-host.txt")
    assert vm.succeed("cat /tmp/from-host.txt") == "host bytes"
    vm.copy_from_vm("/tmp/from-host.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "host bytes"
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.succeed("cat /sys/class/net/eth0/carrier") == "1\\n"
    vm.block()
    assert vm.succeed("cat /sys/class/net/eth0/carrier") == "0\\n"
    vm.unblock()
    assert vm.succeed("cat /sys/class/net/eth0/carrier") == "1\\n"


def test_fails_with_console(qemuspec_machines):
    vm = qemuspec_machines(DEFINITION)["box"]
    vm.succeed("echo the-guest-said-this > /dev/console")
    vm.wait_for_console_text("the-guest-said-this", timeout=60)
    vm.succeed("false")


def test_panics(qemuspec_machines):
    vm = qemuspec_machines(DEFINITION)["box"]
    vm.succeed("echo c > /proc/sysrq-trigger")


def test_panic_swallowed(qemuspec_machines):
    vm = qemuspec_machines(DEFINITION)["box"]
    with pytest.raises(GuestCrashed):
        vm.succeed("echo c > /proc/sysrq-trigger")
"""


def test_plugin_gives_each_test_a_fresh_restore(tmp_path, guest):
    path = definition(
        tmp_path,
        guest,
        {"box": {"extra": 'agent = true\nwarm = true\n[[machines.box.nics]]\ntype = "user"\n'}},
    )
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER.format(definition=path)))
    store = tmp_path / "store"
    junit = tmp_path / "junit.xml"
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path / "tmp"),  # the restores' roots: their qemu name this test's tree
        "QEMUSPEC_WARM_DIR": str(store),
        "CI": "true",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            f"--junitxml={junit}",
            str(inner),
        ],
        cwd=str(inner),
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out  # three tests fail, on purpose
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    assert set(cases) == {
        "test_first_starts_fresh",
        "test_second_starts_fresh",
        "test_handles",
        "test_fails_with_console",
        "test_panics",
        "test_panic_swallowed",
    }, out
    for name in ("test_first_starts_fresh", "test_second_starts_fresh", "test_handles"):
        assert cases[name].find("failure") is None and cases[name].find("error") is None, (
            name,
            out,
        )
    failed = cases["test_fails_with_console"]
    assert failed.find("failure") is not None, out
    assert "exited 1 (expected 0)" in failed.find("failure").get("message", ""), out
    text = failed.find("failure").text or ""
    assert "qemuspec console box" in text, out
    assert (
        "the-guest-said-this" in text.split("qemuspec console box", 1)[1]
    )  # the guest's own console
    assert "qemuspec events box" in text and '"event"' in text.split("qemuspec events box", 1)[1]
    assert "qemuspec console box" in result.stdout  # and in pytest's own report
    panicked = cases["test_panics"].find("failure")
    assert panicked is not None, out
    report = panicked.get("message", "") + (panicked.text or "")
    assert "crashed (panic" in report and "sysrq" in report, report
    # a test that caught the crash and passed: failed for it
    swallowed = cases["test_panic_swallowed"].find("failure")
    assert swallowed is not None and "crashed (panic" in (swallowed.text or ""), out
    assert not qemu_pids(tmp_path), "every restore is stopped after its test"
    assert not list((tmp_path / "tmp").glob("qemuspec-*")), "and its throwaway root removed"

    # pytest-xdist: the same tests on two workers, each from its own restore of the one checkpoint
    parallel = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        + ["-n", "2", "-k", "starts_fresh", str(inner)],
        cwd=str(inner),
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    out = parallel.stdout + parallel.stderr
    assert parallel.returncode == 0 and "2 passed" in parallel.stdout, out
    assert "bringing up nodes" in out, out  # xdist workers ran them
    assert not qemu_pids(tmp_path), "every restore of the workers is stopped"


def test_screendump_ppm_becomes_a_png_and_ports_are_read_from_proc():
    import struct
    import zlib

    from qemuspec.pytest_plugin import listening, png, read_ppm

    pixels = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])  # 2x2: red, green / blue, grey
    width, height, rgb = read_ppm(b"P6\n# qemu\n2 2\n255\n" + pixels)
    data = png(width, height, rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (2, 2, 8, 2, 0, 0, 0)
    rows = zlib.decompress(chunks[b"IDAT"])
    assert rows == b"\0" + pixels[:6] + b"\0" + pixels[6:]
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]

    proc = (
        "  sl  local_address rem_address   st\n"
        "   0: 00000000:0050 00000000:0000 0A 00000000:00000000\n"  # :80 listening
        "   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000\n"  # :8080 established
        "   0: 00000000000000000000000000000000:1FBB 00000000000000000000000000000000:0000 0A\n"
    )
    assert listening(proc) == {80, 8123}
