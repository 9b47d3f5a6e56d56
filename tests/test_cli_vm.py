"""The machine-side CLI on one running guest: console, pause/resume, logs, events, attach, and
the progress display."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import pytest

from helpers import qemu_pids
from test_lifecycle import cli, definition, status, wait_event


@pytest.fixture(scope="module")
def running(tmp_path_factory, guest):
    tmp = tmp_path_factory.mktemp("cli")
    path = definition(tmp, guest, {"box": {}})
    cli("up", path)
    yield path
    cli("down", path)


def test_console_attach_sends_input_and_shows_output(running):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", "console", "box", "--file", running],
        input="echo console-$((6*7))\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "console-42" in result.stdout


def test_console_detach_key_leaves_the_machine_running(running):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", "console", "box", "--file", running],
        input="\x1d",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert status(running)["box"]["state"] == "running"


def test_pause_and_resume(running):
    assert json.loads(cli("pause", "box", "--file", running, "--json").stdout) == [
        {"name": "box", "state": "paused"}
    ]
    assert status(running)["box"]["state"] == "paused"
    wait_event(running, "box", lambda e: e["event"] == "STOP")
    cli("resume", "box", "--file", running)
    assert status(running)["box"]["state"] == "running"


def test_logs_and_events(running, guest):
    assert guest["marker"] in cli("logs", "--file", running).stdout
    last = cli("logs", "box", "-n", "3", "--file", running).stdout
    assert len(last.strip().splitlines()) <= 3
    kinds = [
        json.loads(line)["event"]
        for line in cli("events", "box", "--file", running).stdout.splitlines()
    ]
    assert "QEMUSPEC_LAUNCHED" in kinds and "QEMUSPEC_READY" in kinds
    assert "QEMUSPEC_READY" in cli("logs", "--events", "--file", running).stdout


def test_unknown_machine_is_a_usage_error(running):
    result = cli("qmp", "bx", "query-status", "--file", running, check=False)
    assert result.returncode == 2 and 'did you mean "box"' in result.stderr


def test_up_attach_streams_and_ctrl_c_brings_machines_down(tmp_path, guest):
    path = definition(tmp_path, guest, {"att": {}})
    before = qemu_pids(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemuspec.cli.main", "up", path, "--attach"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if line.startswith("attached"):
                break
        assert status(path)["att"]["state"] == "running"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "att: stopped" in out
    assert status(path)["att"]["state"] == "stopped"
    assert qemu_pids(tmp_path) == before


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_live_lines_and_no_color():
    from qemuspec.cli.progress import Progress
    from qemuspec.settings import Settings

    xterm = Settings(term="xterm")
    term = FakeTerminal()
    progress = Progress(["a", "bb"], stream=term, settings=xterm)
    progress("a", "starting")
    progress("a", "ready in 3.2 s")
    text = term.getvalue()
    assert "\x1b[2A" in text, "redraws the lines in place"
    assert "\x1b[32mready in 3.2 s\x1b[0m" in text
    term = FakeTerminal()
    Progress(["a"], stream=term, settings=Settings(term="xterm", no_color=True))(
        "a", "ready in 1.0 s"
    )
    assert "\x1b[32m" not in term.getvalue()
    term = FakeTerminal()
    Progress(["a"], stream=term, settings=Settings(term="dumb"))("a", "ready in 1.0 s")
    assert "\x1b[2K" not in term.getvalue(), "TERM=dumb: plain lines, never redrawn"
    plain = io.StringIO()
    Progress(["a"], stream=plain, settings=xterm)("a", "starting")
    Progress(["a"], stream=plain, settings=xterm)("a", "failed")
    assert plain.getvalue() == "a: starting\n", "off a terminal: changes, never the outcome"
