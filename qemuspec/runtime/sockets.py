"""Listening sockets made before qemu starts and handed to it as fds.

Binding them here, not in qemu, means: no window in which another process takes a TCP port (we step
up until a bind succeeds, then qemu inherits the bound socket), unix sockets get mode 0600 from the
start, and a client can connect the moment qemu is spawned without polling for a path.
"""

from __future__ import annotations

import errno
import os
import socket

from qemuspec.errors import LaunchError


def listen_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if len(os.fsencode(path)) > 107:
        raise LaunchError(f"socket path {path} is longer than the 107 bytes unix sockets allow: set XDG_RUNTIME_DIR to a shorter directory")
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
    raise LaunchError(f"no free TCP port for QMP in {first_port}..{first_port + tries - 1}: choose another qmp.port")
