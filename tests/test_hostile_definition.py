"""A hostile definition file (issue 20: items 1, 3, 5, 9, 13, 14, 18), tried as the attack it is: a
planted program, planted files and symlinks, host paths outside the tree. Each test asserts that
nothing happened, and that the refusal is one paragraph naming the file and the field."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest


def cli(*args, cwd=None, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "qemuspec.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def _one_paragraph(stderr: str) -> None:
    assert "Traceback" not in stderr and stderr.strip() and "\n\n" not in stderr.strip(), stderr


def _evil(directory) -> str:
    """A program the repository ships: it leaves a marker if anything runs it."""
    marker = os.path.join(directory, "ran")
    script = os.path.join(directory, "evil.sh")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(script, 0o755)
    return marker


# ---- item 1: a libvirt URI cannot name a program ---------------------------------------------

SMUGGLED = [
    "qemu+ssh://ci@h/system?keyfile=id;command=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id;netcat=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id%26command=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id%3Bcommand=./evil.sh",
    "qemu+ssh://ci@h/system?Command=./evil.sh",
    "qemu+ssh://ci@h/system?COMMAND=./evil.sh",
    "qemu+ssh://ci@h/system?%63ommand=./evil.sh",
    "qemu+ssh://ci@h/system?proxy=netcat&netcat=./evil.sh",
    "qemu+ssh://ci@h/system?socket=/x;./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=$(./evil.sh)",
    "qemu+ssh://ci@h/system?keyfile=-oProxyCommand=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id%0A./evil.sh",
    "qemu+ssh://ci@h/system?keyfile",
    "qemu+ssh://ci@h/system?",
]


@pytest.mark.parametrize("uri", SMUGGLED)
def test_a_host_uri_smuggling_a_program_runs_nothing(uri, tmp_path):
    marker = _evil(tmp_path)
    path = tmp_path / "m.toml"
    path.write_text(f'[machines.m]\nhost = "{uri}"\nmemory = "64M"\n')
    for command in ("status", "plan", "validate"):
        result = cli(command, str(path), cwd=tmp_path, env={"QEMUSPEC_CONNECT": ""})
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "m.toml" in result.stderr and "machines.m.host" in result.stderr, result.stderr
        assert "not a libvirt QEMU URI" in result.stderr, result.stderr
        _one_paragraph(result.stderr)
    assert not os.path.exists(marker), "the repository's program ran"


@pytest.mark.parametrize("uri", SMUGGLED[:5])
def test_a_connect_uri_smuggling_a_program_runs_nothing(uri, tmp_path):
    marker = _evil(tmp_path)
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "64M"\n')
    result = cli("status", str(path), "--connect", uri, cwd=tmp_path)
    assert result.returncode == 2 and "--connect" in result.stderr and "not a libvirt QEMU URI" in result.stderr, result.stderr
    _one_paragraph(result.stderr)
    assert not os.path.exists(marker)


def test_the_connection_itself_refuses_a_uri_that_names_a_program(tmp_path):
    """The last line: a URI reaching ``connect`` from any record (a cache entry, a library caller)."""
    from qemuspec.backends.libvirt_conn import connect
    from qemuspec.errors import QemuspecError

    marker = _evil(tmp_path)
    os.chdir(tmp_path)
    with pytest.raises(QemuspecError, match="not a libvirt QEMU URI"):
        connect("qemu+ssh://ci@h/system?keyfile=id;command=./evil.sh")
    assert not os.path.exists(marker)


def test_uri_parameters_users_write_still_pass():
    from qemuspec.spec.uris import check_libvirt_uri

    for uri in ["qemu+ssh://ci@h/system?keyfile=/home/ci/.ssh/id_ed25519;no_verify=1",
                "qemu+ssh://ci@h/system?keyfile=%2Fk&known_hosts_verify=ignore&sshauth=agent,privkey",
                "qemu+tls://h/system?pkipath=/etc/pki/x&tls_priority=NORMAL:%25COMPAT", "qemu:///system?mode=direct"]:
        assert check_libvirt_uri(uri) == uri
