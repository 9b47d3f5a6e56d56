"""One owner per concern for a machine's files, its Layout and the settings (issue 21, steps 2 and 3).

The scans read the source (AST), so a new module that spells a state file name, reads the
environment or builds Settings from it again fails here, not in review. The behaviour tests plant
real symlinks and compare the command lines the two faces of qemuspec (CLI and library) give.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from qemuspec import api
from qemuspec.libvirt import domain_xml, kvm_offered
from qemuspec.render import render
from qemuspec.runtime import accel, paths, statedir
from qemuspec.settings import Settings
from qemuspec.spec import loads
from qemuspec.spec.models import Machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "qemuspec")
TCG = Settings(accel="tcg")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for base, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                with open(path, encoding="utf-8") as f:
                    out[os.path.relpath(path, ROOT)] = ast.parse(f.read(), path)
    return out


def _strings(tree: ast.Module) -> list[tuple[int, str]]:
    """Every string constant, f-string parts included, with its line."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def _state_names() -> set[str]:
    """The names statedir declares that look like nothing but a file name: those with a dot or a
    trailing dash (``qmp.sock``, ``.owner``, ``net-``) and the ssh key. Its plain words (``warm``,
    ``tls``, ``memory``, ``known_hosts``, ``owners``, ``ssh``) are also field, transport and
    command names elsewhere, so the scan cannot tell them apart and leaves them to review."""
    names = {v for k, v in vars(statedir).items() if k.isupper() and isinstance(v, str)}
    names |= {
        n for v in vars(statedir).values() if isinstance(v, tuple) for n in v if isinstance(n, str)
    }
    names |= {
        statedir.live_disk(0),
        statedir.virtiofs_sock(0),
        statedir.tls_cert("client"),
        statedir.tls_key("client"),
    }
    return {n for n in names if "." in n or n.endswith("-")} | {statedir.SSH_KEY}


# filenames (the names; statedir re-exports them), statedir, and privdir below it: the atomic write's temporary names (``.NAME.RANDOM.tmp``) are its own
OWNERS = ("qemuspec/runtime/filenames.py", "qemuspec/runtime/statedir.py", "qemuspec/privdir.py")
# the same spelling for a file that is no state or runtime file: the image cache's per-digest locks
# live in the user's cache (imagecache.py owns that directory)
ELSEWHERE = {("qemuspec/imagecache.py", ".lock")}


def test_only_statedir_spells_a_state_file_name():
    names = _state_names()
    assert {
        "qmp.sock",
        "serial.log",
        "events.jsonl",
        "cidata.iso",
        "key.json",
        "ca-cert.pem",
        ".pid",
    } <= names
    spelled = [
        f"{path}:{line}: {value!r}"
        for path, tree in _modules().items()
        if path not in OWNERS
        for line, value in _strings(tree)
        if value in names and (path, value) not in ELSEWHERE
    ]
    assert not spelled, "state file names belong in qemuspec/runtime/statedir.py:\n" + "\n".join(
        spelled
    )


def _environment_reads(tree: ast.Module) -> list[int]:
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")
        ):
            found.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in ("environ", "environb", "getenv", "getenvb") for a in node.names)
        ):
            found.append(node.lineno)
    return found


def test_the_environment_is_read_in_settings_only():
    """A child process that needs an environment of its own would get one built from Settings
    (none does today: qemu, qemu-img, openssl and ssh inherit qemuspec's as it is)."""
    reads = [
        f"{path}:{line}"
        for path, tree in _modules().items()
        if path != "qemuspec/settings.py"
        for line in _environment_reads(tree)
    ]
    assert not reads, (
        "read the environment in qemuspec/settings.py and pass Settings down:\n" + "\n".join(reads)
    )


def test_settings_are_built_from_the_environment_once():
    """Only the CLI's start (and settings.current, for a library caller who passed none) build them."""
    calls = [
        f"{path}:{node.lineno}"
        for path, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_env"
    ]
    assert sorted(c.split(":")[0] for c in calls) == [
        "qemuspec/cli/main.py",
        "qemuspec/settings.py",
    ], calls


def test_library_settings_are_passed_not_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QEMUSPEC_ACCEL", "kvm")
    monkeypatch.setenv("QEMUSPEC_STATE_DIR", str(tmp_path / "elsewhere"))
    vm = api.Qemu(state_dir=str(tmp_path / "state"), settings=TCG).vm("box", machine="none")
    argv = vm.argv()
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert str(tmp_path / "state" / "box") in argv[argv.index("-pidfile") + 1]
    lay = paths.machine_layout(
        Machine(accel="auto"), str(tmp_path / "m")
    )  # the process's settings: installed once
    assert lay.accel == ("tcg",), "an environment changed after start is not read again"


TCP_MACHINE = """\
[machines.vm]
machine = "none"
paused = true
agent = true

[machines.vm.qmp]
transport = "tcp"
port = 4555
"""


def _render_cli(path: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec", "render", path, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "QEMUSPEC_ACCEL": "tcg"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_vm_argv_and_render_give_one_command_line_for_a_tcp_monitor(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(TCP_MACHINE)
    rendered = _render_cli(str(path))
    assert any("tls-creds=qemuspec-qmp-tls" in a and "port=4555" in a for a in rendered), rendered
    assert api.load(str(path), settings=TCG)["vm"].argv() == rendered, (
        "the library loads the same machine"
    )
    built = api.Qemu(tcp=True, port=4555, state_dir=str(tmp_path / ".qemuspec"), settings=TCG).vm(
        "vm", machine="none", paused=True, agent=True
    )
    other = tmp_path / "built.toml"
    other.write_text(built.to_toml())
    assert built.argv() == _render_cli(str(other)), (
        "the builder's machine renders as its own definition does"
    )


CAPABILITIES = """<capabilities><host><cpu><arch>x86_64</arch></cpu></host>
<guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>
<emulator>/usr/bin/qemu-system-x86_64</emulator><domain type='qemu'/>{kvm}</arch></guest></capabilities>"""


@pytest.mark.parametrize("kvm", [True, False])
def test_accel_auto_means_one_thing_for_the_argv_and_the_libvirt_export(kvm, monkeypatch, tmp_path):
    """ "auto" is kvm where the host offers a KVM (this host's probe; a libvirt host's capabilities),
    else tcg, in the argv and in <domain type>; only a KVM chosen by "auto" may fall back to tcg.
    No real KVM is used: the probe and the capabilities answer are fakes."""
    monkeypatch.setattr(accel, "kvm_usable", lambda: kvm)
    machine = Machine(accel="auto")
    lay = paths.machine_layout(machine, str(tmp_path / "s"), Settings())
    argv = render(machine, "x", lay)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-accel"] == ["kvm" if kvm else "tcg"]
    assert lay.fallback == (("tcg",) if kvm else ())
    offered = kvm_offered(CAPABILITIES.format(kvm="<domain type='kvm'/>" if kvm else ""))
    assert offered is kvm
    xml = domain_xml(machine, "x", kvm=offered)
    assert f'<domain type="{"kvm" if kvm else "qemu"}"' in xml
    assert '<domain type="kvm"' in domain_xml(Machine(accel="kvm"), "x"), (
        "an explicit kvm stays kvm"
    )
    assert paths.machine_layout(machine, str(tmp_path / "s"), TCG).accel == ("tcg",), (
        "QEMUSPEC_ACCEL forces a run"
    )


def test_inspect_does_not_follow_symlinks_planted_in_a_state_directory(tmp_path):
    """`qemuspec inspect` (api.machine_info) read events.jsonl and exit.json through any symlink."""
    spec = loads('[machines.m]\nmachine = "none"\n', "toml")
    root = tmp_path / ".qemuspec"
    state = root / "m"
    state.mkdir(parents=True)
    (state / statedir.EVENTS).write_text('{"event": "OURS"}\n')
    statedir.write(str(state), statedir.EXIT, statedir.ExitRecord(phase="stopped", why="ours"))
    info = api.machine_info(spec, str(root), "m")
    assert [e["event"] for e in info["events"]] == ["OURS"], "a real file is read"
    assert info["last_exit"]["why"] == "ours"
    secret_events, secret_exit = tmp_path / "secret.jsonl", tmp_path / "secret.json"
    secret_events.write_text('{"event": "SECRET"}\n')
    secret_exit.write_text('{"phase": "stopped", "why": "SECRET"}\n')
    for name, target in ((statedir.EVENTS, secret_events), (statedir.EXIT, secret_exit)):
        os.unlink(state / name)
        os.symlink(target, state / name)
    info = api.machine_info(spec, str(root), "m")
    assert info["events"] == [] and "last_exit" not in info
    assert "SECRET" not in json.dumps(info)


def test_a_network_switch_pidfile_is_not_read_through_a_symlink(tmp_path):
    from qemuspec.runtime import network

    switch = tmp_path / "net-abc"
    planted = tmp_path / "elsewhere.pid"
    planted.write_text(f"{os.getpid()}\n")
    os.symlink(planted, str(switch) + statedir.SWITCH_PID)
    monkey_cmdline = network.cmdline
    try:
        network.cmdline = lambda pid: [str(switch)]  # the pid would pass the command-line check
        assert network.switch_pid(str(switch)) is None
        os.unlink(str(switch) + statedir.SWITCH_PID)
        (tmp_path / ("net-abc" + statedir.SWITCH_PID)).write_text(f"{os.getpid()}\n")
        assert network.switch_pid(str(switch)) == os.getpid(), "a real pidfile is read"
    finally:
        network.cmdline = monkey_cmdline
