"""Where a machine's files go: state next to the definition, sockets in a short private directory.

Unix socket paths are limited to 107 bytes, and projects live in deep directories; so sockets go in
``$XDG_RUNTIME_DIR/qemuspec`` (or ``/tmp/qemuspec-UID``) under a hash of the state directory, 0700.
"""

from __future__ import annotations

import hashlib
import os
import stat

from qemuspec.errors import LaunchError
from qemuspec.render import Layout

STATE_ENV = "QEMUSPEC_STATE_DIR"


def state_root(definition: str | None, override: str | None = None) -> str:
    """``override`` (the caller's --state-dir or settings), else $QEMUSPEC_STATE_DIR, else .qemuspec beside the file."""
    if not override:
        from qemuspec.settings import Settings

        override = Settings.from_env().state_dir
    if override:
        return os.path.abspath(override)
    base = os.path.dirname(os.path.abspath(definition)) if definition else os.getcwd()
    return os.path.join(base, ".qemuspec")


def run_base() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "qemuspec")
    return f"/tmp/qemuspec-{os.getuid()}"


def layout(state_dir: str, accel: tuple[str, ...] = (), qmp_port: int | None = None, fds: dict | None = None) -> Layout:
    """The layout of one machine whose state lives in ``state_dir``."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:16]
    return Layout(state_dir=os.path.abspath(state_dir), run_dir=os.path.join(run_base(), digest), accel=accel, qmp_port=qmp_port, fds=fds or {})


def private_dir(path: str) -> None:
    """Create ``path`` 0700 and refuse one that another user owns or others can enter."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise LaunchError(f"{path} is not a directory owned by you: remove it, or set XDG_RUNTIME_DIR to a private directory")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def prepare(lay: Layout) -> None:
    os.makedirs(lay.state_dir, exist_ok=True)
    private_dir(os.path.dirname(lay.run_dir))
    private_dir(lay.run_dir)
