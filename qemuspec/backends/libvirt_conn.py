"""Connections to libvirt daemons, one per URI and process, with libvirt's event loop running in a
thread: console streams and keepalives of remote connections need it, and it must be registered
before the first connection opens. libvirt's default error printer is silenced: its errors become
QemuspecErrors with one paragraph each."""

from __future__ import annotations

import threading
from typing import Any

from qemuspec.errors import QemuspecError

_lock = threading.Lock()
_connections: dict[str, Any] = {}
_loop: threading.Thread | None = None


def binding() -> Any:
    try:
        import libvirt
    except ImportError:
        raise QemuspecError(
            "running machines through libvirt needs the libvirt Python binding: pip install 'qemuspec[libvirt]' "
            "(it builds against Debian's libvirt-dev and pkg-config; scripts/bootstrap installs both)"
        ) from None
    return libvirt


class Unreachable(QemuspecError):
    """A libvirt host that did not answer; ``reason`` is libvirt's own words, for status's row."""

    def __init__(self, text: str, reason: str):
        super().__init__(text)
        self.reason = reason


def _start_loop(libvirt: Any) -> None:
    global _loop
    if _loop is not None:
        return
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    _loop = threading.Thread(target=run, name="libvirt-events", daemon=True)
    _loop.start()


def connect(uri: str) -> Any:
    """The open connection to ``uri``, checked again here (whatever record it came from): libvirt runs
    programs a URI names."""
    from qemuspec.spec.uris import check_libvirt_uri

    try:
        check_libvirt_uri(uri)
    except ValueError as exc:
        raise QemuspecError(f"libvirt host: {exc}") from None
    libvirt = binding()
    with _lock:
        _start_loop(libvirt)
        conn = _connections.get(uri)
        if conn is not None and conn.isAlive():
            return conn
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            reason = exc.get_error_message() or str(exc)
            raise Unreachable(
                f"cannot connect to libvirt at {uri}: {reason}: check that libvirtd runs there and that you "
                "may use it (for qemu+ssh://, that `ssh` to the host works without a password)",
                reason,
            ) from None
        if "://" in uri and not uri.split("://", 1)[1].startswith("/"):
            conn.setKeepAlive(5, 3)  # a remote host that vanishes is noticed in ~20 s, not never
        _connections[uri] = conn
        return conn


def message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    return (get() if get else None) or str(exc)


def label(uri: str) -> str:
    """How status and errors name a host: the URI's host part, or the URI for a local daemon."""
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    host = rest.split("/", 1)[0]
    return host or uri
