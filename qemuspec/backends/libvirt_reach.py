"""Reaching a guest port that a libvirt host forwards (``forwards`` on a user NIC bind on that host).

On this host's own daemon the forward is a local port. Through ``qemu+ssh://`` the same ssh that
carries libvirt's connection carries the probe (``ssh -W``) and ``qemuspec ssh`` (a ProxyCommand),
so a forward bound to the remote host's loopback — the safe default — still works. Through other
remote transports the forward must listen on an address this host can reach.
"""

from __future__ import annotations

import os
import select
import shlex
import socket
import subprocess
import time
import urllib.parse

from qemuspec.errors import QemuspecError, ReadyTimeout


class Reach:
    def __init__(self, uri: str):
        parts = urllib.parse.urlsplit(uri)
        self.uri = uri
        self.host = parts.hostname or ""
        self.hop: list[str] | None = None
        transport = parts.scheme.partition("+")[2]
        if transport in ("ssh", "libssh", "libssh2"):
            hop = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
            if parts.port:
                hop += ["-p", str(parts.port)]
            from qemuspec.spec.uris import params

            keyfile = params(uri).get("keyfile")  # split on & and ; as libvirt does
            if keyfile:
                hop += ["-i", keyfile]
            self.hop = hop + [f"{parts.username}@{self.host}" if parts.username else self.host]

    def _target(self, forward: dict) -> tuple[str, int]:
        address = forward["address"]
        if address in ("0.0.0.0", "::", ""):
            address = "127.0.0.1"
        if self.hop is not None or not self.host:
            return address, forward["host"]
        if address.startswith("127."):
            raise QemuspecError(
                f"guest port {forward['guest']} is forwarded to {self.host}'s loopback only: "
                'set address = "0.0.0.0" on the forward (and firewall it), or reach the host with qemu+ssh://'
            )
        return self.host, forward["host"]

    def exchange(self, forward: dict, expect: bytes | None, deadline: float) -> bool:
        """One attempt: True when the guest side sent data (starting with ``expect`` if given)."""
        address, port = self._target(forward)
        if self.hop is None:
            return _exchange_socket(address, port, expect, deadline)
        proc = subprocess.Popen(
            self.hop + ["-W", f"{address}:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stdin is not None  # both are pipes
        try:
            fd = proc.stdout.fileno()
            ready, _, _ = select.select(
                [fd], [], [], max(0.05, min(3.0, deadline - time.monotonic()))
            )
            if not ready and expect is None:  # a silent service may be HTTP: ask it
                proc.stdin.write(b"HEAD / HTTP/1.0\r\n\r\n")
                proc.stdin.flush()
                ready, _, _ = select.select(
                    [fd], [], [], max(0.05, min(2.0, deadline - time.monotonic()))
                )
            data = os.read(fd, 256) if ready else b""
            return bool(data) and (expect is None or data.startswith(expect))
        except OSError:
            return False
        finally:
            proc.kill()
            proc.wait()

    def wait_tcp(self, forward: dict, deadline: float, alive, expect: bytes | None = None) -> None:
        delay = 0.05
        while True:
            if self.exchange(forward, expect, deadline):
                return
            if not alive():
                raise QemuspecError("the machine stopped while waiting for the guest port")
            if time.monotonic() >= deadline:
                raise ReadyTimeout(
                    f"guest port {forward['guest']} (host port {forward['host']} on {self.host or 'this host'}) gave no data"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    def ssh_argv(self, argv: list[str], forward: dict) -> list[str]:
        """Point an argv from sshkeys.ssh_argv (user@127.0.0.1 -p PORT) at the forward on the libvirt host."""
        address, port = self._target(forward)
        out = list(argv)
        out[out.index("-p") + 1] = str(port)
        if self.hop is not None:
            proxy = " ".join(shlex.quote(a) for a in self.hop) + " -W %h:%p"
            out[1:1] = ["-o", f"ProxyCommand={proxy}"]
        at = next(i for i, a in enumerate(out) if a.endswith("@127.0.0.1"))
        out[at] = out[at].rsplit("@", 1)[0] + "@" + address
        return out


def _exchange_socket(address: str, port: int, expect: bytes | None, deadline: float) -> bool:
    remaining = max(0.05, deadline - time.monotonic())
    try:
        with socket.create_connection((address, port), timeout=min(2.0, remaining)) as sock:
            sock.settimeout(min(1.0, remaining))
            try:
                data = sock.recv(256)
            except socket.timeout:
                if expect is not None:
                    return False
                sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
                sock.settimeout(min(2.0, max(0.05, deadline - time.monotonic())))
                data = sock.recv(256)
            return bool(data) and (expect is None or data.startswith(expect))
    except OSError:
        return False
