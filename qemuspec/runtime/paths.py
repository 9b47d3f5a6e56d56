"""Where a machine's files go: state next to the definition, sockets in a short private directory.

Unix socket paths are limited to 107 bytes, and projects live in deep directories; so sockets go in
``$XDG_RUNTIME_DIR/qemuspec`` (or ``/tmp/qemuspec-UID``) under a hash of the state directory, 0700.
"""

from __future__ import annotations

import hashlib
import os

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
    return Layout(state_dir=os.path.abspath(state_dir), run_dir=run_dir(state_dir), accel=accel, qmp_port=qmp_port, fds=fds or {})


def run_dir(state_dir: str) -> str:
    """The runtime directory of the machine whose state lives in ``state_dir`` (its registry entry)."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:16]
    return os.path.join(run_base(), digest)


def private_dir(path: str) -> None:
    """Create ``path`` 0700 and refuse one that another user owns, or a symlink."""
    from qemuspec.runtime.statedir import ensure_private

    ensure_private(path)


def prepare(lay: Layout) -> None:
    """The state directory and the runtime directory: both 0700 and ours (the parent of a state
    directory may be the user's project: left as it is)."""
    private_dir(lay.state_dir)
    private_dir(os.path.dirname(lay.run_dir))
    private_dir(lay.run_dir)


def registry() -> list[str]:
    """Every runtime directory of this user: one per machine qemuspec runs (or ran and lost)."""
    base = run_base()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return [os.path.join(base, n) for n in sorted(names) if len(n) == 16 and not n.startswith("net-")]
