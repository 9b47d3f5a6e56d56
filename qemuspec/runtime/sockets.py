"""Listening sockets made before qemu starts and handed to it as fds.

Binding them here, not in qemu, means: no window in which another process takes a TCP port (we step
up until a bind succeeds, then qemu inherits the bound socket), unix sockets get mode 0600 from the
start, and a client can connect the moment qemu is spawned without polling for a path.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from qemuspec.spec.models import NIC, Forward

from qemuspec.errors import LaunchError


def listen_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if len(os.fsencode(path)) > 107:
        raise LaunchError(
            f"socket path {path} is longer than the 107 bytes unix sockets allow: set XDG_RUNTIME_DIR to a shorter directory"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def listen_tcp(first_port: int, tries: int = 200) -> tuple[socket.socket, int]:
    """Bind 127.0.0.1 at ``first_port`` or the next free port upward."""
    for port in range(first_port, min(first_port + tries, 65536)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise LaunchError(f"cannot bind 127.0.0.1:{port} for QMP: {exc}") from None
        sock.listen(16)
        return sock, port
    raise LaunchError(
        f"no free TCP port for QMP in {first_port}..{first_port + tries - 1}: choose another qmp.port"
    )


def busy_forwards(nics: Sequence[NIC]) -> Iterator[tuple[int, int, Forward, str]]:
    """(nic index, forward index, forward, who holds it) for each fixed host port of a forward that is
    taken now (a bind test; the socket is released at once)."""
    for index, nic in enumerate(nics):
        for number, fwd in enumerate(getattr(nic, "forwards", []) or []):
            if not fwd.host:
                continue
            kind = socket.SOCK_STREAM if fwd.protocol == "tcp" else socket.SOCK_DGRAM
            sock = socket.socket(socket.AF_INET, kind)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((fwd.address, fwd.host))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    holder = port_holder(fwd.host, fwd.protocol)
                    yield index, number, fwd, f"in use by {holder}" if holder else "in use"
            finally:
                sock.close()


def is_free(address: str, port: int, protocol: str = "tcp") -> bool:
    """Whether ``address:port`` can be bound now (a bind test; the socket is released at once)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def check_forwards(name: str, nics) -> None:
    """Fail early, naming the port and who holds it, when a fixed host port of a forward is taken
    (qemu would only say "Could not set up host forwarding rule")."""
    for _, _, fwd, why in busy_forwards(nics):
        raise LaunchError(
            f"machine {name}: host port {fwd.address}:{fwd.host}/{fwd.protocol} (forward to guest port {fwd.guest}) "
            f"is {why}: stop that, choose another host port, or use host = 0 for any free port"
        )


def port_holder(port: int, protocol: str = "tcp") -> str | None:
    """ "pid N (comm)" of a process with a socket bound to ``port``, when /proc lets us see it."""
    inodes = set()
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    inodes.discard("0")
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    with open(f"/proc/{entry}/comm") as f:
                        return f"pid {entry} ({f.read().strip()})"
        except OSError:
            continue
    return None
