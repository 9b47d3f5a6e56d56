"""The command line on one running test guest: every command's --json, `cp` streaming in flat memory with
modes and directories, `exec` stdin, clear errors for a paused machine or one without an agent, and
plan's field diff and exit code."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from test_lifecycle import cli, definition

ENTRY = [sys.executable, "-m", "qemuspec"]


def sha(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def box(tmp_path_factory, guest):
    """One running machine with a guest agent and a raw data disk."""
    tmp = tmp_path_factory.mktemp("box")
    disk = tmp / "data.img"
    disk.write_bytes(b"\0" * (4 << 20))
    path = definition(
        tmp,
        guest,
        {
            "box": {
                "memory": "768M",
                "extra": f'agent = true\nprovision = ["echo box-provisioned"]\n[[machines.box.disks]]\nfile = "{disk}"\nformat = "raw"\n'
                '[[machines.box.nics]]\ntype = "user"\nforwards = [{ host = 0, guest = 22 }]\n',
            }
        },
    )
    cli("up", path)
    yield path
    cli("down", path)


def as_json(*args, code=0, **kw):
    result = subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == code, (
        f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return json.loads(result.stdout)


def as_json_lines(*args, code=0, **kw):
    result = subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == code, (
        f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_command_prints_json(box, tmp_path):
    """Each command of the parser, with --json: one JSON document (or JSON lines for streams)."""
    from qemuspec.cli.commands import COMMANDS

    seen = set()

    def check(command, *args, code=0, lines=False, **kw):
        seen.add(command)
        return (as_json_lines if lines else as_json)(command, "--json", *args, code=code, **kw)

    assert check("validate", box)[0]["valid"]
    assert check("render", box)[0].endswith("qemu-system-x86_64")
    assert check("config", box)["machines"]["box"]["memory"] == "768M"
    assert check("schema")["properties"]["machines"]
    assert check("init", str(tmp_path / "new.toml"))["wrote"].endswith("new.toml")
    assert check("up", box)[0]["action"] == "up to date"
    assert check("status", box)[0]["state"] == "running"
    assert check("ps", box)[0]["name"] == "box"
    assert any(r["name"] == "box" and r["file"] == os.path.abspath(box) for r in check("ls"))
    assert check("plan", box)[0]["action"] == "up to date"
    assert check("inspect", box)["argv"][0] == "qemu-system-x86_64"
    assert any("line" in r for r in check("logs", box, lines=True))
    assert any(e["event"] == "QEMUSPEC_READY" for e in check("events", box, lines=True))
    assert all("data" in r for r in check("console", box, lines=True, input=""))
    assert check("qmp", box, "query-status")["status"] == "running"
    assert check("pause", box) == [{"name": "box", "state": "paused"}]
    assert check("resume", box) == [{"name": "box", "state": "running"}]
    assert check("exec", box, "--", "/bin/true")["exitcode"] == 0
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 1000)
    assert check("cp", box, str(blob), "box:/tmp/blob")["bytes"] == 1000
    assert check("snapshot", "list", box) == []
    assert check("provision", box) == [
        {"name": "box", "provisioned": True, "seconds": pytest.approx(0.5, abs=30)}
    ]
    assert "port" in check("ssh", box)
    assert check("ssh-config", box)[0]["text"].startswith("Host box\n")
    assert check("completion", "bash")["script"].startswith("# qemuspec completion")
    imported = check("import", "--", "qemu-system-x86_64", "-m", "512")
    assert imported["definition"]["machines"]
    image = tmp_path / "i.qcow2"
    assert as_json("img", "create", str(image), "16M", "--json")["created"] == str(image)
    for action, args in (
        ("info", [str(image)]),
        ("check", [str(image)]),
        ("resize", [str(image), "32M"]),
        ("snapshot", ["list", str(image)]),
        ("convert", [str(image), str(tmp_path / "i.raw"), "-O", "raw"]),
        ("create", [str(tmp_path / "o.qcow2"), "-b", str(image), "-F", "qcow2"]),
        ("rebase", [str(tmp_path / "o.qcow2"), "-b", str(image), "-F", "qcow2", "-u"]),
    ):
        as_json("img", action, *args, "--json")
    seen.add("img")
    stopped = tmp_path / "stopped.toml"
    stopped.write_text(open(box).read().replace("[machines.box", "[machines.other"))
    assert check("reset", str(stopped))[0]["name"] == "other"
    assert check("down", str(stopped))[0]["action"] == "not running"
    assert check("restart", box)[0]["action"] in ("started", "recreated")
    busy = check(
        "run", box, "--", "/bin/true", code=1
    )  # the JSON-lines success case is in test_cli_run.py
    assert "is running" in busy["error"] and "qemuspec down" in busy["error"]
    assert check("help", "up")["text"].startswith("usage: qemuspec up")
    assert check("help", "img", "pull")["text"].startswith("usage: qemuspec img pull")
    assert check("man")["page"].startswith(".TH QEMUSPEC 1")
    assert check("warm", "key", box)[0]["key"]
    assert "declares no test cases" in check("test", box, code=2)["error"]
    assert seen == set(COMMANDS), f"not checked: {set(COMMANDS) - seen}"


def test_validation_errors_in_json_are_objects(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[machines.web]\nmemroy = "1G"\n')
    result = as_json("validate", str(bad), "--json", code=2)
    assert result[0]["errors"] == [
        {
            "file": str(bad),
            "line": 2,
            "column": None,
            "field": "machines.web.memroy",
            "message": 'unknown key "memroy"',
            "fix": 'did you mean "memory"?',
        }
    ]
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[machines.web\n")
    error = as_json("render", str(syntax), "--json", code=2)
    problem = error["problems"][0]
    assert (problem["file"], problem["line"], problem["column"]) == (str(syntax), 1, 14)
    assert problem["fix"].startswith("Fix the syntax")


def test_cp_streams_large_files_in_flat_memory(box, tmp_path):
    """A file as large as the memory limit, into the guest and back: same checksum, the CLI's peak RSS
    under 64 MiB, so it cannot have held the file. (The agent moves ~2 MiB/s under TCG: CI copies
    64 MiB; bench/cp_memory.py runs this with 256 MiB.)"""
    size_mib = int(os.environ.get("CP_TEST_MIB", "64"))
    big = tmp_path / "big"
    with open(big, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    measure = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    peaks = []
    for args in ([str(big), "box:/tmp/big"], ["box:/tmp/big", str(tmp_path / "back")]):
        result = subprocess.run(
            [sys.executable, "-c", measure, *ENTRY, "cp", "--quiet", box, *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        code, peak_kib = result.stdout.split()
        assert code == "0", result.stderr
        peaks.append(int(peak_kib))
        print(f"cp {' '.join(args)}: peak RSS {int(peak_kib) / 1024:.1f} MiB")
    inside = cli("exec", box, "--", "sha256sum", "/tmp/big").stdout.split()[0]
    assert inside == sha(big) == sha(tmp_path / "back")
    assert max(peaks) < 64 * 1024, f"peak RSS {max(peaks)} KiB"
    cli("exec", box, "--", "rm", "/tmp/big")


def test_cp_recursive_keeps_modes(box, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(tree / "run.sh", 0o751)
    (tree / "sub" / "data").write_bytes(b"1234")
    os.chmod(tree / "sub" / "data", 0o640)
    refused = cli("cp", box, str(tree), "box:/tmp/tree", check=False)
    assert refused.returncode == 2 and "-r" in refused.stderr
    cli("cp", box, "-r", str(tree), "box:/tmp/tree")
    modes = cli(
        "exec", box, "--", "stat", "-c", "%a %n", "/tmp/tree/run.sh", "/tmp/tree/sub/data"
    ).stdout.split("\n")
    assert modes[:2] == ["751 /tmp/tree/run.sh", "640 /tmp/tree/sub/data"]
    back = tmp_path / "back"
    cli("cp", box, "-r", "box:/tmp/tree", str(back))
    assert (back / "sub" / "data").read_bytes() == b"1234"
    assert oct(os.stat(back / "run.sh").st_mode & 0o777) == "0o751"
    assert oct(os.stat(back / "sub" / "data").st_mode & 0o777) == "0o640"


def test_exec_passes_stdin_through(box):
    result = subprocess.run(
        [*ENTRY, "exec", box, "--", "/bin/sh", "-c", "tr a-z A-Z"],
        input=b"shout\n",
        capture_output=True,
        timeout=120,
    )
    assert result.stdout == b"SHOUT\n", result.stderr


def test_paused_machine_and_missing_agent_are_clear(box, tmp_path):
    cli("pause", box)
    try:
        paused = cli("exec", box, "--", "/bin/true", check=False)
    finally:
        cli("resume", box)
    assert (
        paused.returncode == 1
        and "is paused" in paused.stderr
        and "qemuspec resume" in paused.stderr
    )
    no_agent = tmp_path / "noagent.toml"
    no_agent.write_text(open(box).read().replace("agent = true", "agent = false"))
    # same machine, definition without the agent: the check is made before reaching the guest
    result = cli(
        "exec",
        str(no_agent),
        "--state-dir",
        os.path.join(os.path.dirname(box), ".qemuspec"),
        "--",
        "/bin/true",
        check=False,
    )
    assert "has no guest-agent channel" in result.stderr, result.stderr


def test_plan_names_changed_fields_and_exits_3(box, tmp_path):
    assert cli("plan", box).returncode == 0
    again = as_json("up", box, "--timeout", "45", "--json")
    assert again[0]["action"] == "up to date", (
        "a readiness timeout for one run does not change the machine"
    )
    original = open(box).read()
    try:  # the same file, edited: another file naming the same state would be told whose the machine is
        with open(box, "w") as f:
            f.write(original.replace('memory = "768M"', 'memory = "800M"'))
        result = subprocess.run([*ENTRY, "plan", box], capture_output=True, text=True, timeout=60)
    finally:
        with open(box, "w") as f:
            f.write(original)
    assert result.returncode == 3, result.stderr
    assert "box: restart" in result.stdout
    assert "    memory: 768M -> 800M  [restart: " in result.stdout
    assert "-768M" in result.stdout and "+800M" in result.stdout
    assert "\x1b[" not in result.stdout, "no colour off a terminal"
