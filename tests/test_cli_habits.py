"""The habits users bring to the CLI (issue 19), without a VM: logs like docker/journalctl, the
grammar (validate's file, exec without --, durations, did-you-mean, help COMMAND, plan's hint, qmp's
JSON), --help with examples, option help texts and the environment, the man page, colour."""

from __future__ import annotations

import argparse
import datetime
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = [sys.executable, "-m", "qemuspec"]


def q(*args: str, cwd=None, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ENTRY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        **kw,
    )


def two(tmp_path) -> str:
    path = tmp_path / "two.toml"
    path.write_text(
        '[vars]\nmemory = "256M"\n[machines.a]\nkernel = "two.toml"\nmemory = "{{ memory }}"\n'
        '[machines.b]\nkernel = "two.toml"\n'
    )
    return str(path)


def console_log(tmp_path, machine: str, chunks: list[tuple[float, bytes]]) -> None:
    """A console log written the way the supervisor's reader writes one, at the times given."""
    from qemuspec.runtime import statedir

    directory = tmp_path / ".qemuspec" / machine
    directory.mkdir(parents=True, exist_ok=True)
    log = statedir.CappedLog(str(directory), statedir.SERIAL_LOG, times=statedir.SERIAL_TIMES)
    real = time.time
    try:
        for when, data in chunks:
            time.time = lambda when=when: when  # the index records the time a chunk arrived
            log.write(data)
    finally:
        time.time = real
        log.close()


# -- logs -------------------------------------------------------------------------------------------


def test_logs_n_0_prints_nothing_and_tail_is_n(tmp_path):
    path = two(tmp_path)
    console_log(tmp_path, "a", [(1000.0, b"one\ntwo\nthree\n")])
    assert q("logs", path, "a").stdout == "one\ntwo\nthree\n"
    none = q("logs", path, "a", "-n", "0")
    assert none.returncode == 0 and none.stdout == ""
    assert q("logs", path, "a", "--tail", "2").stdout == "two\nthree\n"
    assert q("logs", path, "a", "--tail", "all").stdout == "one\ntwo\nthree\n"
    bad = q("logs", path, "a", "-n", "x")
    assert bad.returncode == 2 and "not a number of lines" in bad.stderr


def test_logs_timestamps_and_since_come_from_the_time_index(tmp_path):
    path = two(tmp_path)
    now = time.time()
    console_log(tmp_path, "a", [(now - 7200, b"early line\n"), (now - 60, b"late line\n")])
    stamped = q("logs", path, "a", "--timestamps").stdout.splitlines()
    assert len(stamped) == 2
    for line, ago in zip(stamped, (7200, 60)):
        stamp, _, _ = line.partition(" ")
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
        moment = when.replace(tzinfo=datetime.timezone.utc).timestamp()
        assert abs(moment - (now - ago)) < 0.01, (line, now - ago)
    assert q("logs", path, "a", "--since", "10m").stdout == "late line\n"
    assert q("logs", path, "a", "--since", "3h").stdout == "early line\nlate line\n"
    iso = datetime.datetime.fromtimestamp(now - 600, datetime.timezone.utc).isoformat()
    assert q("logs", path, "a", "--since", iso).stdout == "late line\n"
    assert q("logs", path, "a", "--since", str(now - 600)).stdout == "late line\n"
    bad = q("logs", path, "a", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_logs_since_for_events_uses_their_own_times(tmp_path):
    path = two(tmp_path)
    directory = tmp_path / ".qemuspec" / "a"
    directory.mkdir(parents=True)
    now = time.time()
    (directory / "events.jsonl").write_text(
        f'{{"event": "OLD", "timestamp": {{"seconds": {int(now - 3600)}, "microseconds": 0}}}}\n'
        f'{{"event": "NEW", "timestamp": {{"seconds": {int(now - 5)}, "microseconds": 0}}}}\n'
    )
    out = q("logs", path, "a", "--events", "--since", "1m").stdout
    assert '"NEW"' in out and '"OLD"' not in out


def test_following_a_log_reads_through_its_rotation(tmp_path):
    from qemuspec.cli.vm_commands import _LogFile
    from qemuspec.runtime import statedir

    directory = str(tmp_path)
    log = statedir.CappedLog(directory, statedir.SERIAL_LOG, limit=64, times=statedir.SERIAL_TIMES)
    follower = _LogFile("a", directory, statedir.SERIAL_LOG, events=False)
    follower.start(None)
    seen: list[str] = []
    for n in range(40):  # 32 bytes before each rotation: many generations go by
        log.write(f"line {n:02d}\n".encode())
        if n % 3 == 0:
            seen += [line for line, _ in follower.poll()]
    seen += [line for line, _ in follower.poll()]
    log.close()
    # every line read once, in order, none lost while the follower kept up (a poll per 3 lines)
    assert seen == [f"line {n:02d}" for n in range(40)], seen
    assert os.path.exists(os.path.join(directory, statedir.rotated(statedir.SERIAL_TIMES)))


def test_logs_follow_of_a_stopped_machine_prints_and_ends(tmp_path):
    """`-f` ends when the machines stop; a machine that is not running ends it at once (as docker)."""
    path = two(tmp_path)
    console_log(tmp_path, "a", [(1000.0, b"one\ntwo\n")])
    follow = q("logs", path, "a", "-f")
    assert follow.returncode == 0 and follow.stdout == "", "from the end"
    assert q("logs", path, "a", "-f", "-n", "1").stdout == "two\n"


# -- colour and escapes -------------------------------------------------------------------------------


def on_terminal(args: list[str], env: dict[str, str], cwd=None) -> tuple[int, str]:
    """Run with stdout and stderr on one pseudo-terminal; (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*ENTRY, *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env={**{k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "CI")}, **env},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(30), b"".join(chunks).decode(errors="replace")


def test_state_column_and_error_are_coloured_on_a_terminal_never_with_no_color(tmp_path):
    path = two(tmp_path)
    code, screen = on_terminal(["status", path], {"TERM": "xterm"})
    assert code == 0 and "\x1b[" in screen.split("\n", 1)[1], screen
    assert re.search(r"\na\s+\x1b\[2mstopped\x1b\[0m ", screen), screen
    code, screen = on_terminal(["status", path], {"TERM": "xterm", "NO_COLOR": "1"})
    assert code == 0 and "\x1b[" not in screen, screen
    code, screen = on_terminal(["logs", path, "nosuch"], {"TERM": "xterm"})
    assert code == 2 and "\x1b[31merror:\x1b[0m" in screen, screen
    code, screen = on_terminal(["logs", path, "nosuch"], {"TERM": "xterm", "NO_COLOR": ""})
    assert code == 2 and "\x1b[" not in screen and "error:" in screen
    piped = q("logs", path, "nosuch", env={"TERM": "xterm"})
    assert piped.stderr.startswith("error: "), "no colour off a terminal"


def test_logs_escape_the_guest_on_a_terminal(tmp_path):
    path = two(tmp_path)
    console_log(tmp_path, "a", [(time.time(), b"query \x1b[6n title \x1b]0;x\x07\n")])
    for extra in ([], ["--timestamps"], ["-f", "-n", "1"]):
        code, screen = on_terminal(["logs", path, "a", *extra], {"TERM": "xterm"})
        assert code == 0 and "query \\x1b[6n title \\x1b]0;x\\x07" in screen, (extra, screen)
        assert "\x1b[6n" not in screen, extra
    assert "\x1b[6n" in q("logs", path, "a").stdout, "a pipe gets the bytes as they are"


# -- the grammar ----------------------------------------------------------------------------------------


def test_validate_takes_the_default_file_file_option_and_qemuspec_file(tmp_path):
    path = two(tmp_path)
    shutil.copy(path, tmp_path / "qemuspec.toml")
    for args, env, cwd in (
        (["validate"], {}, tmp_path),
        (["validate", "--file", path], {}, None),
        (["validate", "-F", path], {}, None),
        (["validate"], {"QEMUSPEC_FILE": path}, ROOT),
    ):
        result = q(*args, env=env, cwd=cwd)
        assert result.returncode == 0 and "valid (2 machines: a, b)" in result.stdout, (
            args,
            result,
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    none = q("validate", cwd=empty, env={"QEMUSPEC_FILE": ""})
    assert none.returncode == 2 and "no definition file given" in none.stderr


def test_exec_without_dashes_when_unambiguous_else_it_says_add_them(tmp_path):
    from qemuspec.cli.common import Context
    from qemuspec.cli.parser import parse
    from qemuspec.errors import UsageError
    from qemuspec.settings import Settings

    one = tmp_path / "one.toml"
    one.write_text('[machines.dev]\nkernel = "one.toml"\n')
    path = two(tmp_path)

    def split(*argv: str) -> tuple[list[str], list[str] | None]:
        args, tail = parse(list(argv))
        ctx = Context.from_args(args, tail, Settings())
        return ctx.target.rest, ctx.tail

    assert split("exec", str(one), "uname", "-r") == ([], ["uname", "-r"])
    assert split("exec", str(one), "dev", "uname", "-r") == (["dev"], ["uname", "-r"])
    assert split("exec", path, "b", "ls", "-l", "/tmp") == (["b"], ["ls", "-l", "/tmp"])
    assert split("exec", "--timeout", "5m", path, "a", "cat", "-A") == (["a"], ["cat", "-A"])
    assert split("exec", path, "a", "--", "ls", "--json") == (["a"], ["ls", "--json"])
    with pytest.raises(UsageError, match='none is named "uname": name the machine'):
        split("exec", path, "uname", "-r")
    clash = q("exec", path, "a", "ls", "-q")
    assert clash.returncode == 2 and "-q after the command" in clash.stderr
    assert "-- ls -q" in clash.stderr, clash.stderr


def test_cli_durations():
    from qemuspec.cli.parser import parse

    assert parse(["up", "--timeout", "5m"])[0].timeout == 300.0
    assert parse(["up", "--timeout", "90"])[0].timeout == 90.0
    assert parse(["down", "--timeout", "1.5s"])[0].timeout == 1.5
    assert parse(["exec", "--timeout", "2h", "--", "true"])[0].timeout == 7200.0
    assert parse(["run", "--timeout", "500ms", "--", "true"])[0].timeout == 0.5
    bad = q("up", "--timeout", "5x")
    assert bad.returncode == 2 and 'bad duration "5x"' in bad.stderr


def test_did_you_mean_for_commands():
    typo = q("stauts")
    assert typo.returncode == 2 and 'did you mean "status"?' in typo.stderr
    far = q("frobnicate")
    assert (
        far.returncode == 2 and "did you mean" not in far.stderr and "qemuspec help" in far.stderr
    )
    assert 'did you mean "inspect"' in q("help", "inspekt").stderr


def test_help_command_is_the_command_s_help():
    for topic in (["up"], ["img", "pull"], ["logs"]):
        helped, direct = q("help", *topic), q(*topic, "--help")
        assert helped.returncode == direct.returncode == 0
        assert helped.stdout == direct.stdout and "examples:" in helped.stdout
    top = q("help")
    assert top.returncode == 0 and "commands:" in top.stdout


def test_plan_hint_keeps_the_flags_it_was_given(tmp_path):
    from qemuspec.cli.parser import parse

    path = two(tmp_path)
    state = tmp_path / "my state"
    plan = q("plan", path, "a", "--var", "memory=384M", "--warm", "--state-dir", str(state))
    assert plan.returncode == 3, plan.stderr
    line = re.search(r"`(qemuspec up [^`]*)` applies them", plan.stderr).group(1)
    args, _ = parse(shlex.split(line)[1:])
    assert args.operands == [path, "a"] and args.var == ["memory=384M"]
    assert args.warm and args.state_dir == str(state)


def test_qmp_says_when_an_argument_is_not_json(tmp_path):
    path = two(tmp_path)
    both = q("qmp", path, "query-status", "oops")
    assert both.returncode == 2 and "'oops' is not JSON" in both.stderr
    assert 'no machine "query-status"' in both.stderr
    three = q("qmp", path, "a", "query-status", "{not json")
    assert three.returncode == 2 and "'{not json' is not JSON" in three.stderr
    listed = q("qmp", path, "a", "query-status", "[1]")
    assert listed.returncode == 2 and "one JSON object" in listed.stderr


# -- help, environment, man page ------------------------------------------------------------------------


def parsers() -> dict[str, argparse.ArgumentParser]:
    from qemuspec.cli.parser import build_parser

    _, subs = build_parser()
    out = dict(subs)
    img = next(a for a in subs["img"]._actions if isinstance(a, argparse._SubParsersAction))
    out.update({f"img {name}": p for name, p in img.choices.items()})
    return out


def test_every_command_and_img_action_has_an_example_and_every_option_a_help_text():
    for name, parser in parsers().items():
        assert "examples:\n  qemuspec " in (parser.epilog or ""), f"{name} has no example"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"


def test_help_lists_every_environment_variable_qemuspec_reads():
    from qemuspec.settings import VARIABLES

    source = open(os.path.join(ROOT, "qemuspec", "settings.py")).read()
    read = set(re.findall(r'env\.get\("([A-Za-z_]+)"', source))
    read |= set(re.findall(r'"([A-Z_]+)" in env', source))
    listed = {name for key in VARIABLES for name in re.split(r",\s*", key)}
    assert read - {"HOME"} <= listed | {"QEMUSPEC_VAR_"}, read - listed
    assert {"CI", "QEMUSPEC_DEBUG", "NO_COLOR", "QEMUSPEC_CONNECT", "HOME"} <= listed
    text = q("--help").stdout
    assert "environment:\n" in text
    for key in VARIABLES:
        assert key in text, key


def test_the_shipped_man_page_is_the_generated_one():
    shipped = open(os.path.join(ROOT, "man", "qemuspec.1")).read()
    generated = q("man")
    assert generated.returncode == 0
    assert generated.stdout == shipped, "regenerate: qemuspec man -o man/qemuspec.1"
    for piece in (".SH ENVIRONMENT", "QEMUSPEC_DEBUG", ".SS img pull", ".SH EXIT STATUS"):
        assert piece in shipped
    if shutil.which("groff"):
        check = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z"], input=shipped, capture_output=True, text=True
        )
        assert check.returncode == 0 and not check.stderr.strip(), check.stderr[:2000]
