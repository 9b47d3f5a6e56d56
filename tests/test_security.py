"""Hostile conditions around a machine's files and monitors, with real qemu: another local user, a TCP
monitor, planted symlinks and forged records, and what `down --purge` may delete."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import IN_CI
from helpers import qemu_pids

OTHER_USER = "qemuspec-other"


def cli(*args, check=True, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture
def project(qemu_bin):
    """A project directory others can enter (0755), as a checkout in a home directory is: the test
    must show that qemuspec's own modes protect the files, not the test's temporary directory."""
    path = tempfile.mkdtemp(prefix="qemuspec-sec-", dir="/tmp")
    os.chmod(path, 0o755)
    before = qemu_pids(path)
    yield path
    for name in os.listdir(path):
        if name.endswith((".toml", ".yaml")):
            cli("down", os.path.join(path, name), check=False)
    shutil.rmtree(path, ignore_errors=True)
    assert qemu_pids(path) == before, "no qemu left behind"


PAUSED = """
[machines.{name}]
machine = "q35"
memory = "64M"
paused = true
serial = "log"
agent = true
[machines.{name}.qmp]
transport = "tcp"
port = {port}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(project: str, text: str, name: str = "lab.toml") -> str:
    path = os.path.join(project, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def _greeting(sock: socket.socket, timeout: float = 3.0) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except (socket.timeout, ConnectionError, ssl.SSLError, OSError):
        return b""


def test_tcp_monitor_needs_a_client_certificate(project):
    path = _write(project, PAUSED.format(name="m", port=_free_port()))
    cli("up", path)
    [row] = json.loads(cli("status", path, "--json").stdout)
    assert row["state"] == "paused"
    host, port = row["qmp"].removeprefix("tcp:").rsplit(":", 1)
    assert host == "127.0.0.1"
    from qemuspec.runtime import paths

    tls_dir = os.path.join(
        paths.run_dir(os.path.join(project, ".qemuspec", "m")), "tls"
    )  # never the state directory
    # a plain client: reset or silence, never a greeting
    with socket.create_connection((host, int(port)), timeout=5) as plain:
        plain.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert b"QMP" not in _greeting(plain)
    # TLS without a client certificate: refused
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(tls_dir, "ca-cert.pem"))
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert b"QMP" not in _greeting(tls)
        except (ssl.SSLError, ConnectionError, OSError):
            pass
    # with the state directory's client certificate: the greeting
    from qemuspec.runtime.tls import client_context

    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with client_context(tls_dir).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert b'"QMP"' in _greeting(tls, 10)
    assert not os.path.exists(os.path.join(tls_dir, "ca-key.pem")), (
        "nobody can mint new client certificates"
    )
    assert {
        oct(os.stat(os.path.join(tls_dir, f)).st_mode & 0o777) for f in os.listdir(tls_dir)
    } == {"0o600"}


def _other_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root so that this test can create a second user")
        pytest.skip("needs root to act as a second local user")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True,
        )
        return pwd.getpwnam(OTHER_USER)


PROBE = textwrap.dedent("""
    import json, os, socket, ssl, sys
    roots, tcp_port = json.loads(sys.argv[1])
    got = []
    for root in roots:
        for base, dirs, files in os.walk(root):
            for name in files + dirs:
                path = os.path.join(base, name)
                try:
                    if os.path.isdir(path):
                        os.listdir(path)
                        got.append("listed " + path)
                    elif name.endswith(".sock"):
                        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path); got.append("connected " + path)
                    else:
                        with open(path, "rb") as f:
                            f.read(1)
                        got.append("read " + path)
                except OSError:
                    pass
        try:
            os.listdir(root)
            got.append("listed " + root)
        except OSError:
            pass
    s = socket.create_connection(("127.0.0.1", tcp_port), timeout=5)
    s.settimeout(3)
    try:
        s.sendall(b'{"execute": "qmp_capabilities"}\\n')
        if b"QMP" in s.recv(4096):
            got.append("QMP greeting on the TCP monitor")
    except OSError:
        pass
    print(json.dumps(got))
""")


def test_a_second_local_user_reads_no_file_key_or_socket_and_cannot_use_the_monitor(project):
    other = _other_user()
    text = (
        PAUSED.format(name="m", port=_free_port())
        + '\n[machines.m.cloud_init]\nuser_data = "#cloud-config\\nssh_authorized_keys: [\\"{{ ssh_public_key }}\\"]\\n"\n'
    )
    path = _write(project, text)
    up = cli("up", path, check=False)
    if (
        up.returncode != 0
    ):  # cloud-init on machine none may be refused by validation: keep the test about files
        path = _write(project, PAUSED.format(name="m", port=_free_port()))
        cli("up", path)
        from qemuspec.runtime import sshkeys

        sshkeys.ensure_key(os.path.join(project, ".qemuspec"))
    [row] = json.loads(cli("status", path, "--json").stdout)
    port = int(row["qmp"].rsplit(":", 1)[1])
    from qemuspec.runtime import paths

    state = os.path.join(project, ".qemuspec")
    run = paths.run_dir(os.path.join(state, "m"))
    assert os.path.exists(os.path.join(state, "m", "serial.log")) and os.path.exists(
        os.path.join(run, "qmp.sock")
    )

    def probe() -> list[str]:
        script = os.path.join(project, "probe.py")
        with open(script, "w") as f:
            f.write(PROBE)
        os.chmod(script, 0o644)
        result = subprocess.run(
            [
                "setpriv",
                f"--reuid={other.pw_uid}",
                f"--regid={other.pw_gid}",
                "--clear-groups",
                sys.executable,
                script,
                json.dumps([[state, os.path.dirname(run)], port]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert probe() == []
    # even if the directories were opened up (a loose umask, a chmod -R), the files stay 0600
    for base, dirs, _ in os.walk(state):
        for d in [base] + [os.path.join(base, d) for d in dirs]:
            os.chmod(d, 0o755)
    os.chmod(os.path.dirname(run), 0o755)
    os.chmod(run, 0o755)
    leaks = [g for g in probe() if not g.startswith("listed ")]
    assert leaks == [], "every file and socket is 0600"


def test_planted_symlinks_are_never_written_through(project):
    victim = os.path.join(project, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    state = os.path.join(project, ".qemuspec", "m")
    os.makedirs(state)
    os.symlink(victim, os.path.join(state, "serial.log"))
    os.symlink(victim, os.path.join(project, "disk.qcow2.qemuspec-tmp"))
    text = PAUSED.format(name="m", port=_free_port()).replace(
        '[machines.m.qmp]\ntransport = "tcp"', '[machines.m.qmp]\ntransport = "unix"'
    )
    text += '[[machines.m.disks]]\nfile = "disk.qcow2"\nsize = "16M"\nformat = "qcow2"\n'
    path = _write(project, text)
    result = cli("up", path, check=False)
    assert result.returncode == 1
    assert "serial.log is a symlink" in result.stderr and "Traceback" not in result.stderr
    assert open(victim).read() == "precious\n"
    os.unlink(os.path.join(state, "serial.log"))
    cli("up", path)
    assert open(victim).read() == "precious\n", "the disk was made in a private temporary directory"
    assert os.path.isfile(os.path.join(project, "disk.qcow2"))


def test_purge_deletes_only_what_qemuspec_created(project):
    mine = os.path.join(project, "user.img")
    with open(mine, "wb") as f:
        f.write(b"user data")
    text = PAUSED.format(name="m", port=0).replace(
        '[machines.m.qmp]\ntransport = "tcp"\nport = 0\n', ""
    )
    text += '[[machines.m.disks]]\nfile = "user.img"\nsize = "1M"\n[[machines.m.disks]]\nfile = "made.qcow2"\nsize = "16M"\nformat = "qcow2"\n'
    path = _write(project, text)
    cli("down", path, "--purge")  # never started: the user's image stays
    assert open(mine, "rb").read() == b"user data"
    os.unlink(mine)
    with open(mine, "wb") as f:
        f.truncate(1024 * 1024)
    cli("up", path)
    made = os.path.join(project, "made.qcow2")
    assert os.path.exists(made)
    cli("down", path, "--purge")
    assert not os.path.exists(made), "the image qemuspec created is gone"
    assert os.path.exists(mine), "the image that existed before is kept"
    assert not os.path.exists(os.path.join(project, ".qemuspec", "m"))


def test_purge_never_follows_a_state_directory_symlink(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "m").mkdir(parents=True)
    (elsewhere / "m" / "keep.txt").write_text("keep")
    os.symlink(elsewhere, os.path.join(project, ".qemuspec"))
    path = _write(
        project,
        PAUSED.format(name="m", port=0).replace(
            '[machines.m.qmp]\ntransport = "tcp"\nport = 0\n', ""
        ),
    )
    result = cli("down", path, "--purge", check=False)
    assert (
        result.returncode != 0 and "symlink" in result.stderr and "Traceback" not in result.stderr
    )
    assert (elsewhere / "m" / "keep.txt").read_text() == "keep"
    os.unlink(os.path.join(project, ".qemuspec"))


def test_nic_hostfwd_passthrough_cannot_replace_the_loopback_forward(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(
        '[machines.a]\n[[machines.a.nics]]\nforwards = [{ host = 2222, guest = 22 }]\noptions = { hostfwd = "tcp::2222-:22" }\n'
    )
    result = cli("validate", str(path), check=False)
    assert result.returncode == 2 and "options.hostfwd is not passed through" in result.stderr


def test_forged_records_never_make_down_signal_another_process(project):
    """A process whose argv merely names the pidfile, and records (state.json, supervisor.json) that
    point at it: status does not count it, down does not signal it."""
    path = _write(
        project,
        PAUSED.format(name="m", port=0).replace(
            '[machines.m.qmp]\ntransport = "tcp"\nport = 0\n', ""
        ),
    )
    state = os.path.join(project, ".qemuspec", "m")
    os.makedirs(state)
    pidfile = os.path.join(state, "qemu.pid")
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "-pidfile", pidfile]
    )
    try:
        with open(f"/proc/{decoy.pid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
        argv = open(f"/proc/{decoy.pid}/cmdline", "rb").read().decode().split("\0")[:-1]
        with open(os.path.join(state, "state.json"), "w") as f:
            json.dump(
                {
                    "name": "m",
                    "pid": decoy.pid,
                    "exec_argv": argv,
                    "pid_start": started,
                    "qmp": "unix:/nonexistent",
                },
                f,
            )
        with open(os.path.join(state, "supervisor.json"), "w") as f:
            json.dump({"pid": decoy.pid, "started": started, "phase": "running"}, f)
        [row] = json.loads(cli("status", path, "--json").stdout)
        assert row["state"] == "stopped" and row["pid"] is None
        cli("down", path)
        assert decoy.poll() is None, "the decoy is untouched"
    finally:
        decoy.kill()
        decoy.wait()
