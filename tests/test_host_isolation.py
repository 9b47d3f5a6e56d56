"""What a VM exposes on its host: its display to other local users, and the host's loopback to its guest.

A display is a keyboard and a screen: another local user who reaches it types into the VM as its owner.
A user-mode (slirp) NIC makes the host's 127.0.0.1 the guest's 10.0.2.2: a hostile guest reaches every
loopback service of the host, other VMs' monitors and displays included. Both are tried for real: a
second local user created by the test against real qemu displays, and the real test guest against a
listener on the host's loopback.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import urllib.request

from test_guest import booted
from test_security import _other_user, _write, cli, project  # noqa: F401 - project is a fixture

DISPLAYS = """
[machines.vnc]
machine = "q35"
memory = "64M"
paused = true
serial = "none"
display = "vnc"

[machines.spice]
machine = "q35"
memory = "64M"
paused = true
serial = "none"
display = "spice"

[machines.tcp]
machine = "q35"
memory = "64M"
paused = true
serial = "none"
display = {{ type = "vnc", port = {port} }}
"""

# As the other user: try every display; print what each attempt got.
KNOCK = textwrap.dedent("""
    import json, socket, sys
    sockets, tcp_port = json.loads(sys.argv[1])
    got = {}
    for path in sockets:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(path)
            got[path] = "connected"
        except OSError as exc:
            got[path] = type(exc).__name__
    s = socket.create_connection(("127.0.0.1", tcp_port), timeout=5)
    s.settimeout(5)
    version = s.recv(12)
    s.sendall(version)
    count = s.recv(1)[0]
    got["tcp"] = [version.decode(), list(s.recv(count))]
    print(json.dumps(got))
""")


def _rfb_security_types(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The RFB 3.8 handshake up to the server's list of security types (1: none, 2: VNC password)."""
    sock.settimeout(5)
    version = sock.recv(12)
    sock.sendall(version)
    count = sock.recv(1)[0]
    return version, list(sock.recv(count))


def _free_vnc_port() -> int:
    for port in range(5990, 5900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free vnc port")


def test_another_local_user_cannot_reach_a_display_and_the_owner_can(project):  # noqa: F811 - the fixture
    other = _other_user()
    path = _write(project, DISPLAYS.format(port=_free_vnc_port()))
    cli("up", path)
    rows = {row["name"]: row for row in json.loads(cli("status", path, "--json").stdout)}
    vnc_sock, spice_sock = rows["vnc"]["display"]["socket"], rows["spice"]["display"]["socket"]
    tcp = rows["tcp"]["display"]
    assert tcp["address"] == "127.0.0.1" and tcp["auth"] == "password"
    assert (
        rows["vnc"]["display"]["auth"] == "owner"
        and "vnc on the unix socket" in cli("status", path).stdout
    )
    for sock_path in (vnc_sock, spice_sock):
        assert (
            stat.S_ISSOCK(os.stat(sock_path).st_mode)
            and stat.S_IMODE(os.stat(sock_path).st_mode) & 0o077 == 0
        ), "owner only"
        assert stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o700

    # the owner: the VNC server offers "no authentication" on the private socket; SPICE accepts
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(vnc_sock)
        version, types = _rfb_security_types(s)
        assert version.startswith(b"RFB ") and 1 in types
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(spice_sock)

    def knock() -> dict:
        script = os.path.join(project, "knock.py")
        with open(script, "w") as f:
            f.write(KNOCK)
        os.chmod(script, 0o644)
        result = subprocess.run(
            [
                "setpriv",
                f"--reuid={other.pw_uid}",
                f"--regid={other.pw_gid}",
                "--clear-groups",
                sys.executable,
                script,
                json.dumps([[vnc_sock, spice_sock], tcp["port"]]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    got = knock()
    assert got[vnc_sock] == got[spice_sock] == "PermissionError"
    version, types = got["tcp"]
    assert version.startswith("RFB ") and types == [2], (
        "TCP offers only VNC password auth, and no password is set"
    )
    # a chmod of the runtime directory still leaves the sockets the owner's alone (qemu runs with umask 077)
    run_dir = os.path.dirname(vnc_sock)
    os.chmod(os.path.dirname(run_dir), 0o755)
    os.chmod(run_dir, 0o755)
    os.chmod(os.path.dirname(spice_sock), 0o755)
    got = knock()
    assert got[vnc_sock] == got[spice_sock] == "PermissionError"


class _LoopbackService:
    """A listener on the host's 127.0.0.1 that answers a secret and counts who connected."""

    SECRET = b"host-loopback-secret"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(self.SECRET + b"\n")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def _guest_reaches_host_loopback(guest, state_dir, outbound: bool) -> tuple[bytes, int]:
    """(what the guest read from 10.0.2.2:PORT, connections the host listener saw); asserts the forward serves."""
    service = _LoopbackService()
    vm = booted(guest, state_dir, agent=True, ready={"agent": True, "tcp": 80})
    vm.nic("user", outbound=outbound).forward(0, 80)
    vm.start()
    try:
        assert ("restrict=on" in " ".join(vm.instance.argv)) is not outbound
        page = urllib.request.urlopen(f"http://127.0.0.1:{vm.host_port(80)}/", timeout=10).read()
        assert page == b"qemuspec-guest http ok\n", (
            "the forward serves HTTP with or without restrict=on"
        )
        code, out, err = vm.exec(
            "/bin/sh", "-c", f"nc -w 5 10.0.2.2 {service.port} </dev/null", timeout=30
        )
        return out, service.accepted
    finally:
        vm.stop(timeout=2)
        service.close()


def test_the_guest_does_not_reach_the_hosts_loopback_by_default(guest, state_dir):
    out, accepted = _guest_reaches_host_loopback(guest, state_dir, outbound=False)
    assert _LoopbackService.SECRET not in out and accepted == 0


def test_outbound_lets_the_guest_reach_the_hosts_loopback(guest, state_dir):
    out, accepted = _guest_reaches_host_loopback(guest, state_dir, outbound=True)
    assert _LoopbackService.SECRET in out and accepted == 1
