"""Every example users are shown runs: the `$ qemuspec ...` lines of README.md and the "examples:"
of every `--help`, as written, through a shell, against the demo definition (machines/dev.toml)
and the real test guest. Also: the grammar's forms, `python -m qemuspec`, and bash completion of
machine names from a file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import qemu_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENTRY = [sys.executable, "-m", "qemuspec"]


def readme_examples() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    return [
        line[2:].strip()
        for block in re.findall(r"```console\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith("$ qemuspec")
    ]


def help_examples() -> list[str]:
    from qemuspec.cli.commands import COMMANDS, IMG_EXAMPLES

    out = []
    for command in ["", *COMMANDS, *(f"img {action}" for action in IMG_EXAMPLES)]:
        text = subprocess.run(
            [*ENTRY, *command.split(), "--help"], capture_output=True, text=True
        ).stdout
        if "examples:\n" in text:
            block = text.split("examples:\n", 1)[1].split("\n\n", 1)[0]
            out += [
                line.strip() for line in block.splitlines() if line.strip().startswith("qemuspec")
            ]
    return out


PHASES = {
    "up": 1,
    "status": 2,
    "ps": 2,
    "ls": 2,
    "console": 2,
    "pause": 2,
    "resume": 2,
    "restart": 2,
    "reset": 3,
    "qmp": 2,
    "inspect": 2,
    "logs": 2,
    "events": 2,
    "exec": 2,
    "provision": 2,
    "cp": 2,
    "snapshot": 2,
    "ssh": 2,
    "ssh-config": 2,
    "plan": 2,
    "down": 3,
    "run": 4,
}


@pytest.fixture
def project(tmp_path, guest):
    """A directory laid out like the repository: machines/dev.toml, README.md, the built guest. The demo's
    fixed forward (host port 8080) becomes a free port, so the examples run while the demo itself is up."""
    (tmp_path / "machines").mkdir()
    demo = open(os.path.join(ROOT, "machines", "dev.toml")).read()
    assert "host = 8080," in demo
    (tmp_path / "machines" / "dev.toml").write_text(demo.replace("host = 8080,", "host = 0,"))
    shutil.copy(os.path.join(ROOT, "machines", "example.yaml"), tmp_path / "machines")
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path)
    (tmp_path / "guest").mkdir()
    os.symlink(os.path.dirname(guest["kernel"]), tmp_path / "guest" / "out")
    return tmp_path


# examples shown but not run here, and why (each is run by the test named)
NOT_RUN = {
    # the demo guest has no cloud-init user-data, so no key to log in with: tests/test_guest_access.py
    "qemuspec ssh machines/dev.toml dev -- uname -r",
}


def test_every_readme_and_help_example_runs(project):
    readme, helps = readme_examples(), help_examples()
    assert "qemuspec qmp machines/dev.toml query-status" in readme
    assert len(helps) >= 40
    assert NOT_RUN <= set(helps), "an example no longer shown need not be skipped"
    examples = [e for e in dict.fromkeys(readme + helps) if e not in NOT_RUN]
    examples.sort(key=lambda line: PHASES.get(line.split()[1], 0))
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "HOME": str(project)}
    before = qemu_pids(project)
    failures = []
    try:
        for line in examples:
            result = subprocess.run(
                ["bash", "-c", line],
                cwd=project,
                env=env,
                capture_output=True,
                stdin=subprocess.DEVNULL,  # `console` reads its input to the end, then detaches
                text=True,
                timeout=300,
            )
            allowed = {0, 3} if line.split()[1] == "plan" else {0}
            if "/proc/sysrq-trigger" in line:  # README's crash example: the crash's own exit code
                allowed = {250}
            if result.returncode not in allowed:
                failures.append(
                    f"$ {line}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
                )
    finally:
        if os.path.exists("/tmp/dev.core"):  # README's crash example keeps a vmcore there
            os.unlink("/tmp/dev.core")
        subprocess.run(
            [*ENTRY, "down", "machines/dev.toml", "--quiet"],
            cwd=project,
            env=env,
            capture_output=True,
            timeout=120,
        )
    assert not failures, "\n\n".join(failures)
    assert qemu_pids(project) == before


def test_ci_runs_the_readmes_two_set_up_commands_demo_first():
    """README's Set-up has exactly two commands, and CI takes them from there: the demo (which leaves a
    .qemuspec/ in machines/), the demo stopped, then the tests, so the suite meets what a new user's tree has."""
    commands = subprocess.run(
        [os.path.join(ROOT, ".ci", "readme-commands")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "guest/build.py" in demo and demo.endswith("qemuspec up machines/dev.toml")
    assert "-m pytest" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert ".ci/readme-commands" in ci
    order = [
        ci.index('-c "${commands[0]}"'),
        ci.index("\nstop_demo\n"),
        ci.index('-c "${commands[1]}"'),
    ]
    assert order == sorted(order), "CI runs the demo, stops it, then runs the tests"


def test_the_file_is_accepted_the_same_way_everywhere(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text("[machines.a]\n[machines.b]\n")
    forms = [
        ["render", str(path), "a", "--json"],
        ["render", "a", "--file", str(path), "--json"],
        ["render", "--machine", "a", "-F", str(path), "--json"],
        ["render", "a", "--json"],
    ]
    outputs = set()
    for form in forms:
        env = (
            {**os.environ, "QEMUSPEC_FILE": str(path)}
            if "--file" not in form and "-F" not in form and str(path) not in form
            else None
        )
        result = subprocess.run(
            [*ENTRY, *form], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0, (form, result.stderr)
        outputs.add(result.stdout)
    assert len(outputs) == 1
    # a file is never taken for a machine name (found: `logs FILE` did)
    logs = subprocess.run([*ENTRY, "logs", str(path)], capture_output=True, text=True, timeout=60)
    assert logs.returncode == 1 and "no console log yet for a, b" in logs.stderr
    one = subprocess.run([*ENTRY, "events", str(path)], capture_output=True, text=True, timeout=60)
    assert one.returncode == 2 and "declares machines a, b: name one" in one.stderr


def test_python_dash_m_and_quiet(tmp_path):
    version = subprocess.run(
        [sys.executable, "-m", "qemuspec", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("qemuspec ")
    path = tmp_path / "q.toml"
    quiet = subprocess.run([*ENTRY, "init", str(path), "--quiet"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    path.write_text(
        path.read_text().replace('# kernel = "vmlinuz"', 'kernel = "q.toml"')
    )  # something to boot
    valid = subprocess.run([*ENTRY, "validate", str(path), "-q"], capture_output=True, text=True)
    assert valid.returncode == 0 and valid.stdout == ""


def test_bash_completes_commands_flags_and_machine_names(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text("[machines.alpha]\n[machines.beta]\n")
    script = subprocess.run([*ENTRY, "completion", "bash"], capture_output=True, text=True).stdout
    (tmp_path / "completion.bash").write_text(script)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        program = (
            f"source {tmp_path / 'completion.bash'}\nCOMP_WORDS=(qemuspec {line})\nCOMP_CWORD={len(words)}\n"
            "_qemuspec\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
        )
        env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
        result = subprocess.run(
            ["bash", "-c", program],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert "inspect" in complete("ins")
    assert complete("up", str(path), "--ti") == ["--timeout"]
    assert set(complete("up", str(path), "")) >= {"alpha", "beta"}
    assert complete("exec", "--file", str(path), "al") == ["alpha"]
    assert "lab.toml" in complete("up", "la")
    for shell in ("zsh", "fish"):
        text = subprocess.run([*ENTRY, "completion", shell], capture_output=True, text=True).stdout
        assert "__complete-machines" in text and "inspect" in text


def test_status_columns_fit_long_names(tmp_path):
    path = tmp_path / "long.toml"
    long_name = "a-machine-name-well-over-sixteen-characters"
    path.write_text(f"[machines.{long_name}]\n[machines.b]\n")
    lines = subprocess.run(
        [*ENTRY, "status", str(path)], capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert len(lines) == 3
    starts = {line.index("stopped") if "stopped" in line else line.index("STATE") for line in lines}
    assert len(starts) == 1, lines
    assert lines[1].startswith(long_name + "  ")


def test_progress_shows_elapsed_time_and_deadline_on_a_terminal():
    import io

    from qemuspec.cli.progress import Progress
    from qemuspec.settings import Settings

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    progress = Progress(["vm"], stream=term, deadline=120, settings=Settings(term="xterm"))
    progress("vm", "waiting for ready")
    progress.close()
    assert "waiting for ready  [0 s of 120 s]" in term.getvalue()
    plain = io.StringIO()
    Progress(["vm"], stream=plain, deadline=120)("vm", "waiting for ready")
    assert plain.getvalue() == "vm: waiting for ready\n", (
        "line-based and without clocks off a terminal (CI logs)"
    )


@pytest.mark.parametrize("no_color", [False, True])
def test_plan_colours_only_on_a_terminal_without_no_color(tmp_path, no_color):
    import pty

    path = tmp_path / "one.toml"
    path.write_text("[machines.a]\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    if no_color:
        env["NO_COLOR"] = "1"
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            [*ENTRY, "plan", str(path)], stdout=slave, stderr=subprocess.PIPE, env=env, timeout=60
        )
        os.close(slave)
        text = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            text += chunk
    finally:
        os.close(master)
    assert result.returncode == 3
    assert (b"\x1b[33mstart\x1b[0m" in text) is (not no_color), text
    assert b"a: " in text
