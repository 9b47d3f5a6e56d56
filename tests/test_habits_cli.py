"""The habits users bring (issue 19), the parts that need no guest: sharing settings (x-* keys,
templates, extends) judged by the CLI and by an editor's validator, ssh's option grammar, `ls --all`
and `ls --prune` on a private runtime and keep base, `down` of a file that is gone, `exec` from a
terminal, and a library start that fails leaving nothing."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

from qemuspec.cli.guest_commands import split_ssh_options, ssh_block
from qemuspec.spec.schema import schema

ENTRY = [sys.executable, "-m", "qemuspec.cli.main"]


@pytest.fixture
def private_env(tmp_path):
    """A runtime base and keep base of this test's own, so `ls --prune` sees (and prunes) nothing of
    other runs on this host."""
    run, state = tmp_path / "xdg-run", tmp_path / "xdg-state"
    for d in (run, state):
        d.mkdir(mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(run), "XDG_STATE_HOME": str(state)}


def qemuspec(*args, env=None, cwd=None, stdin=None, code=0):
    result = subprocess.run(
        [*ENTRY, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        stdin=stdin,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (
        f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


TOML_SHARED = """
[templates.base]
kernel = "vmlinuz"
memory = "256M"
cmdline = "console=ttyS0"
[templates.base.ready]
serial = "ready"
timeout = "30s"

[templates.big]
extends = "base"
memory = "1G"

[machines.a]
extends = "base"
cpus = 2
[machines.a.ready]
timeout = "60s"

[machines.b]
extends = ["big"]

[machines.c]
extends = "a"
memory = "{{ mem }}"

[vars]
mem = "384M"
"""


def test_toml_machines_extend_templates_and_each_other(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"\0" * 64)
    path = tmp_path / "three.toml"
    path.write_text(TOML_SHARED)
    machines = json.loads(qemuspec("config", str(path), "--json").stdout)["machines"]
    a, b, c = machines["a"], machines["b"], machines["c"]
    assert (a["memory"], a["cpus"], a["ready"]["serial"], a["ready"]["timeout"]) == (
        "256M",
        2,
        "ready",
        60.0,
    )  # tables merge key by key: the template's serial stays, the machine's timeout wins
    assert (b["memory"], b["ready"]["timeout"]) == (
        "1024M",
        30.0,
    )  # a template extending a template
    assert (c["memory"], c["cpus"]) == (
        "384M",
        2,
    )  # a machine extending a machine; templates still render
    assert a["kernel"] == str(
        tmp_path / "vmlinuz"
    )  # paths relative to the file, as if written here
    assert "templates" not in json.loads(qemuspec("config", str(path), "--json").stdout)
    # an editor's validator agrees: the file as written is valid
    import tomllib

    assert (
        list(jsonschema.Draft202012Validator(schema()).iter_errors(tomllib.loads(TOML_SHARED)))
        == []
    )


def test_yaml_x_keys_hold_anchors(tmp_path):
    text = """
x-base: &base
  kernel: vmlinuz
  memory: 256M
x-notes: anything at all, ignored
machines:
  a:
    <<: *base
    cpus: 2
  b:
    <<: *base
"""
    (tmp_path / "vmlinuz").write_bytes(b"\0" * 64)
    path = tmp_path / "shared.yaml"
    path.write_text(text)
    machines = json.loads(qemuspec("config", str(path), "--json").stdout)["machines"]
    assert {n: (m["memory"], m["cpus"]) for n, m in machines.items()} == {
        "a": ("256M", 2),
        "b": ("256M", 1),
    }
    assert list(jsonschema.Draft202012Validator(schema()).iter_errors(yaml.safe_load(text))) == []
    # only x- keys are free: any other unknown top-level key is still an error for both judges
    path.write_text(text.replace("x-notes", "notes"))
    assert "notes" in qemuspec("validate", str(path), code=2).stderr
    assert list(
        jsonschema.Draft202012Validator(schema()).iter_errors(yaml.safe_load(path.read_text()))
    )


@pytest.mark.parametrize(
    "text, where, says",
    [
        (
            '[templates.base]\nmemory = "1G"\n[machines.a]\nkernel = "k"\nextends = "bsae"\n',
            ":5: machines.a.extends:",
            'did you mean "base"?',
        ),
        (
            '[machines.a]\nkernel = "k"\nextends = "b"\n[machines.b]\nkernel = "k"\nextends = "a"\n',
            "machines.",
            "goes round in a circle",
        ),
        (
            '[machines.a]\nkernel = "k"\nextends = 3\n',
            ":3: machines.a.extends:",
            'extends = "NAME"',
        ),
    ],
)
def test_bad_extends_is_one_paragraph_with_the_line(tmp_path, text, where, says):
    (tmp_path / "k").write_bytes(b"\0" * 64)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    err = qemuspec("validate", str(path), code=2).stderr
    assert where in err and says in err, err
    assert err.strip().count("\n\n") == 0  # one paragraph


def test_the_committed_schema_is_the_generated_one():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "schemas", "qemuspec.schema.json")) as f:
        assert json.load(f) == json.loads(json.dumps(schema()))


def test_ssh_options_before_the_remote_command():
    assert split_ssh_options(["-L", "8080:localhost:80", "-A", "uname", "-a"]) == (
        ["-L", "8080:localhost:80", "-A"],
        ["uname", "-a"],
    )
    assert split_ssh_options(["-oServerAliveInterval=5", "-tt", "top"]) == (
        ["-oServerAliveInterval=5", "-tt"],
        ["top"],
    )
    assert split_ssh_options(["-vL", "1:h:2", "--", "-x"]) == (["-vL", "1:h:2"], ["-x"])
    assert split_ssh_options(["echo", "-n", "x"]) == ([], ["echo", "-n", "x"])
    assert split_ssh_options([]) == ([], [])


def test_ssh_config_block_from_the_ssh_argv():
    reach = {
        "argv": [
            "ssh",
            "-i",
            "/keys/id ed25519",
            "-p",
            "2222",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "UserKnownHostsFile=/s/known_hosts",
            "root@127.0.0.1",
        ]
    }
    block = ssh_block("dev", reach)
    assert block["text"].splitlines() == [
        "Host dev",
        "  HostName 127.0.0.1",
        "  User root",
        '  IdentityFile "/keys/id ed25519"',
        "  Port 2222",
        "  IdentitiesOnly yes",
        "  UserKnownHostsFile /s/known_hosts",
    ]


def test_exec_from_a_terminal_says_to_use_ssh_for_a_shell(tmp_path):
    (tmp_path / "k").write_bytes(b"\0" * 64)
    path = tmp_path / "one.toml"
    path.write_text('[machines.box]\nkernel = "k"\nagent = true\n')
    primary, secondary = pty.openpty()
    try:
        err = qemuspec("exec", str(path), "--", "sh", stdin=secondary, code=2).stderr
    finally:
        os.close(primary)
        os.close(secondary)
    assert "qemuspec ssh" in err and "exec -t" in err, err


def _claim(env, state_dir):
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from qemuspec.runtime import statedir; statedir.claim(sys.argv[1])",
            str(state_dir),
        ],
        env=env,
        check=True,
    )


def _lost(env, state_dir, name):
    """A registry record of a qemu that is gone, with no supervisor: what SIGKILLing both leaves."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    code = (
        "import sys, time; from qemuspec.runtime import paths, statedir; "
        "run = paths.run_dir(sys.argv[1]); statedir.ensure_private(run); "
        "statedir.write(run, statedir.MACHINE, statedir.QemuRecord(name=sys.argv[2], pid=int(sys.argv[3]), "
        "state_dir=sys.argv[1], accel=['tcg'], started_at=time.time()))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(state_dir), name, str(dead.pid)], env=env, check=True
    )


def test_ls_all_shows_stopped_machines_and_prune_drops_stale_entries(tmp_path, private_env):
    env = private_env
    kept, gone, lost = (tmp_path / "p" / ".qemuspec" / n for n in ("kept", "gone", "lost"))
    for d in (kept, gone, lost):
        d.mkdir(parents=True)
        _claim(env, d)
    _lost(env, lost, "lost")
    shutil.rmtree(gone)
    running = json.loads(qemuspec("ls", "--json", env=env).stdout)
    assert [(r["name"], r["state"]) for r in running] == [("lost", "lost")]
    listed = {
        r["name"]: r["state"] for r in json.loads(qemuspec("ls", "--all", "--json", env=env).stdout)
    }
    assert listed == {
        "kept": "stopped",
        "lost": "lost",
    }  # a directory that is gone is not a machine
    assert "kept" in qemuspec("ls", "--all", env=env).stdout
    pruned = json.loads(qemuspec("ls", "--prune", "--all", "--json", env=env).stdout)
    assert sorted(p["path"] for p in pruned["pruned"]) == sorted([str(gone), str(lost)])
    assert {r["name"]: r["state"] for r in pruned["machines"]} == {
        "kept": "stopped",
        "lost": "stopped",
    }
    assert json.loads(qemuspec("ls", "--json", env=env).stdout) == []
    again = json.loads(qemuspec("ls", "--prune", "--json", env=env).stdout)
    assert again["pruned"] == []  # nothing stale is left; the kept directory stays claimed
    assert kept.is_dir() and lost.is_dir()  # prune forgets records, never a directory


def test_down_of_a_gone_file_names_what_it_needs(tmp_path, private_env):
    err = qemuspec("down", "--quiet", cwd=tmp_path, env=private_env, code=2).stderr
    assert "qemuspec ls" in err and "--state-dir" in err
    err = qemuspec("down", "nosuch", cwd=tmp_path, env=private_env, code=2).stderr
    assert "no machine qemuspec runs matches nosuch" in err and "qemuspec ls" in err
    err = qemuspec("down", str(tmp_path / "gone.toml"), env=private_env, code=2).stderr
    assert "gone.toml: no such file" in err


def test_a_failed_library_start_removes_its_temporary_state_directory(qemu_bin, tmp_path):
    from qemuspec import Qemu
    from qemuspec.errors import LaunchError

    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"\x7fELF" + b"\0" * 4096)
    vm = Qemu().vm("broken", kernel=str(kernel), memory="64M", accel="tcg")
    state_dir = vm.state_dir
    assert os.path.isdir(state_dir)
    with pytest.raises(LaunchError):
        vm.start()
    assert not os.path.exists(state_dir)
    assert not vm.running()


@pytest.mark.parametrize(
    "extra, says",
    [
        ('kernel = "nope/vmlinuz"\n', "kernel file"),
        ('kernel = "k"\nqemu = "qemu-system-nothere"\n', "is not an executable qemu"),
        ('kernel = "k"\nmemory = "900T"\n', "more than this host has"),
    ],
)
def test_run_refuses_what_up_refuses_with_the_same_paragraph(tmp_path, extra, says):
    (tmp_path / "k").write_bytes(b"\0" * 64)
    path = tmp_path / "bad.toml"
    path.write_text("[machines.m]\nagent = true\n" + extra)
    up = qemuspec("up", str(path), code=2).stderr
    run = qemuspec("run", str(path), "--", "true", code=2).stderr
    errors = [
        [line for line in text.splitlines() if line.startswith("error:")] for text in (up, run)
    ]
    assert errors[0] == errors[1] and says in errors[0][0], (up, run)
