"""The output contract (issue 19): progress on stderr and only while it is live, each outcome once on
stdout; the live line names the probe it waits on and the guest's last console line (escaped); `run`
gets the same line as `up`; off a terminal a heartbeat during a long wait. The real test guest for
`up`/`down`/`run`; the progress object itself with fake streams."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading

from helpers import qemu_pids
from test_lifecycle import definition

ENTRY = [sys.executable, "-m", "qemuspec"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Told(io.StringIO):
    """A stream that says when a line containing ``word`` was written (no sleeping on it)."""

    def __init__(self, word: str):
        super().__init__()
        self.word = word
        self.seen = threading.Event()

    def write(self, text):
        n = super().write(text)
        if self.word in self.getvalue():
            self.seen.set()
        return n


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NO_COLOR")}
    return {**env, **extra}


def test_off_a_terminal_progress_is_changes_only_and_never_an_outcome():
    from qemuspec.cli.progress import Progress

    plain = io.StringIO()
    progress = Progress(["a"], stream=plain, deadline=120, heartbeat=3600)
    progress("a", "starting")
    progress("a", "waiting for serial /ready/")
    progress("a", "waiting for serial /ready/")  # the same again: no second line
    progress("a", "ready in 3.1 s")
    progress("a", "failed")
    progress.close()
    assert plain.getvalue() == "a: starting\na: waiting for serial /ready/\n", plain.getvalue()


def test_live_lines_are_erased_when_the_command_is_done_and_show_the_console(tmp_path):
    from qemuspec.cli.progress import Progress
    from qemuspec.settings import Settings

    log = tmp_path / "serial.log"
    log.write_bytes(b"[    1.0] booting\r\n[    2.0] evil \x1b[6n\x1b]0;title\x07 here\r\n\r\n")
    term = Terminal()
    progress = Progress(
        ["a"], stream=term, deadline=60, settings=Settings(term="xterm"), consoles={"a": str(log)}
    )
    progress("a", "waiting for tcp guest port 80")
    drawn = term.getvalue()
    assert "waiting for tcp guest port 80  [0 s of 60 s]" in drawn
    assert "| [    2.0] evil \\x1b[6n\\x1b]0;title\\x07 here" in drawn, drawn
    assert "\x1b[6n" not in drawn and "\x07" not in drawn, (
        "the guest's bytes never reach the terminal"
    )
    progress.close()
    assert term.getvalue().endswith("\x1b[1A\r\x1b[J"), "the live line is erased at the end"
    progress("a", "ready in 1.0 s")  # nothing after close: the outcome is the command's
    assert term.getvalue().endswith("\x1b[1A\r\x1b[J")


def test_a_live_line_never_wraps(tmp_path, monkeypatch):
    from qemuspec.cli.progress import Progress
    from qemuspec.settings import Settings

    monkeypatch.setenv("COLUMNS", "60")
    log = tmp_path / "serial.log"
    log.write_text("x" * 500 + "\n")
    term = Terminal()
    Progress(["a"], stream=term, settings=Settings(term="xterm"), consoles={"a": str(log)})(
        "a", "waiting for ready"
    )
    line = term.getvalue().rsplit("\x1b[2K", 1)[1]
    assert len(line.rstrip("\n")) <= 59, line


def test_off_a_terminal_a_long_wait_has_a_heartbeat(tmp_path):
    from qemuspec.cli.progress import Progress

    log = tmp_path / "serial.log"
    log.write_text("Loading initial ramdisk\nRun /init as init process\n")
    told = Told("still")
    progress = Progress(["a"], stream=told, deadline=300, heartbeat=0.05, consoles={"a": str(log)})
    progress("a", "waiting for serial /ready/")
    try:
        assert told.seen.wait(10), told.getvalue()
    finally:
        progress.close()
    line = told.getvalue().splitlines()[1]
    assert re.match(
        r"a: still waiting for serial /ready/ \(\d+ s of 300 s\); "
        r"last console line: Run /init as init process$",
        line,
    ), line


def test_the_heartbeat_is_thirty_seconds_by_default():
    from qemuspec.cli.progress import HEARTBEAT, Progress

    assert HEARTBEAT == 30.0 and Progress(["a"], stream=io.StringIO()).heartbeat == 30.0


def test_up_down_and_run_print_each_outcome_once(tmp_path, guest):
    """`up` with its streams captured apart: the probe it waits on on stderr, the outcome once on
    stdout; `down >f 2>&1` shows "lab: stopped" once; `run` names the probe too."""
    path = definition(tmp_path, guest, {"lab": {"extra": "agent = true\n"}})
    before = qemu_pids(tmp_path)
    try:
        up = subprocess.run(
            [*ENTRY, "up", path], capture_output=True, text=True, timeout=300, env=_env()
        )
        assert up.returncode == 0, up.stderr
        assert re.fullmatch(r"lab: started \(pid \d+, [^\n]*\)\n", up.stdout), up.stdout
        assert f"lab: waiting for serial /{guest['marker']}/\n" in up.stderr, up.stderr
        assert "started" not in up.stderr and "ready in" not in up.stderr, up.stderr
        progress = up.stderr.split("lab: starting\n", 1)[1]  # after the host paths it lists
        assert all(line.startswith("lab: ") for line in progress.splitlines()), up.stderr
        # exec without --: the file has one machine and "uname" is not one of its names
        uname = subprocess.run(
            [*ENTRY, "exec", path, "uname", "-s"], capture_output=True, text=True, timeout=120
        )
        assert uname.returncode == 0 and uname.stdout == "Linux\n", uname.stderr
        # logs -f: from the end, the guest's new lines, and it ends by itself when the machine stops
        follow = subprocess.Popen(
            [*ENTRY, "logs", path, "-f", "--timestamps"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        said = subprocess.run(
            [*ENTRY, "exec", path, "--", "sh", "-c", "echo followed-line > /dev/ttyS0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert said.returncode == 0, said.stderr
    finally:
        with open(tmp_path / "down.out", "w") as f:
            down = subprocess.run(
                [*ENTRY, "down", path], stdout=f, stderr=subprocess.STDOUT, timeout=120, env=_env()
            )
    both = (tmp_path / "down.out").read_text()
    assert down.returncode == 0, both
    followed, _ = follow.communicate(timeout=30)  # ended on its own once the machine stopped
    assert follow.returncode == 0
    assert guest["marker"] not in followed, "-f begins at the end"
    assert re.search(r"^\d{4}-\d\d-\d\dT[\d:.]+Z followed-line$", followed, re.M), followed
    assert both.count("lab: stopped") == 1, both
    assert both.endswith("\n") and "stopping" in both.split("lab: stopped")[0], both
    run = subprocess.run(
        [*ENTRY, "run", path, "--", "echo", "hello"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello\n"
    assert f"lab: waiting for serial /{guest['marker']}/\n" in run.stderr, run.stderr
    assert re.search(r"^lab: ready in \d+\.\d s$", run.stderr, re.M), run.stderr
    assert qemu_pids(tmp_path) == before


def test_run_on_a_terminal_has_up_s_live_line(tmp_path, guest):
    """stderr on a pseudo-terminal: the live line with the probe, the clock and the guest's last console
    line, erased before the command's output (stdout, a pipe) begins."""
    path = definition(
        tmp_path, guest, {"lab": {"extra": "agent = true\n", "cmdline": "loglevel=7"}}
    )
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every copy of the slave is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    before = qemu_pids(tmp_path)
    try:
        run = subprocess.run(
            [*ENTRY, "run", path, "--", "echo", "hello"],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            timeout=300,
            env=_env(TERM="xterm", COLUMNS="200"),
        )
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert run.returncode == 0, screen
    assert run.stdout == b"hello\n"
    assert "\x1b[2K" in screen, "drawn in place"
    assert f"waiting for serial /{guest['marker']}/  [" in screen, screen
    assert re.search(r" of \d+ s\]  \| \S", screen), f"the last console line is shown:\n{screen!r}"
    assert "\x1b[J" in screen, "erased before the command's output"
    assert qemu_pids(tmp_path) == before
