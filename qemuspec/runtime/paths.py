"""Where a machine's files go: state next to the definition, sockets in a short private directory,
secrets and proofs of ownership in a private directory of the user's.

Unix socket paths are limited to 107 bytes, and projects live in deep directories; so sockets go in
the runtime base (:func:`run_base`) under a hash of the state directory, 0700. What a repository must
never be able to plant (ssh keys, the records that prove a state directory is qemuspec's) goes in
the keep base (:func:`keep_dir`), which survives reboots when the user's HOME is private.
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


def _own_dir(path: str) -> bool:
    """A real directory of this user's that nobody else can write (not a symlink)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def keep_base(create: bool = True) -> str | None:
    """qemuspec's persistent private directory (``$XDG_STATE_HOME/qemuspec``, else
    ``~/.local/state/qemuspec``), or None when it lies in a tree another user can change (sudo
    keeping HOME, su without -): then nothing of ours is kept there."""
    from qemuspec.privdir import open_private

    home = os.environ.get("HOME") or os.path.expanduser("~")
    base = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state"), "qemuspec")
    fd = open_private(base, create)
    if fd is None:
        return None
    os.close(fd)  # every ancestor is root's or ours and closed to others: the path stays ours
    return base


def run_base() -> str:
    """The one rule for where this user's runtime registry is, so every command finds it again:
    ``$XDG_RUNTIME_DIR/qemuspec`` when XDG_RUNTIME_DIR is a directory of ours closed to others; else
    ``/tmp/qemuspec-UID`` unless another user squatted it first; else (squatted) ``run/`` in the
    keep base, which is also used from then on while it holds machines. With neither, a clear error
    naming XDG_RUNTIME_DIR as the fix."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and _own_dir(xdg):
        return os.path.join(xdg, "qemuspec")
    tmp = f"/tmp/qemuspec-{os.getuid()}"
    tmp_ours = not os.path.lexists(tmp) or _own_dir(tmp)
    keep = keep_base(create=not tmp_ours)
    fallback = os.path.join(keep, "run") if keep else None
    if fallback and _own_dir(fallback) and os.listdir(fallback):
        return fallback  # chosen before, while /tmp/qemuspec-UID was squatted: its machines live here
    if tmp_ours:
        return tmp
    if fallback:
        return fallback
    raise LaunchError(f"{tmp} is not a directory of yours (another user created it, or it is a symlink) and HOME "
                      f"has no private directory to use instead: set XDG_RUNTIME_DIR to a directory of your own "
                      f"with mode 0700 (for example /run/user/{os.getuid()})")


def keep_dir(kind: str) -> str:
    """``kind`` (ssh keys, owner proofs) in the keep base, or in the runtime base when the keep base
    is not private (then it lasts until reboot); made 0700 and ours."""
    keep = keep_base()
    path = os.path.join(keep, kind) if keep else os.path.join(run_base(), "keep-" + kind)
    private_dir(path)
    return path


def layout(state_dir: str, accel: tuple[str, ...] = (), qmp_port: int | None = None, fds: dict | None = None) -> Layout:
    """The layout of one machine whose state lives in ``state_dir``."""
    return Layout(state_dir=os.path.abspath(state_dir), run_dir=run_dir(state_dir), accel=accel, qmp_port=qmp_port, fds=fds or {})


def run_dir(state_dir: str) -> str:
    """The runtime directory of the machine whose state lives in ``state_dir`` (its registry entry)."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:16]
    return os.path.join(run_base(), digest)


def private_dir(path: str) -> None:
    """Create ``path`` 0700 (parents as usual) and refuse a symlink, a non-directory or another
    user's directory; tighten one we own that others can enter."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LaunchError(f"cannot create {path}: {exc.strerror}") from None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise LaunchError(f"{path} is not a directory owned by you (a symlink or another user's): remove it, or choose another state directory with --state-dir")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def registry() -> list[str]:
    """Every runtime directory of this user: one per machine qemuspec runs (or ran and lost)."""
    base = run_base()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return [os.path.join(base, n) for n in sorted(names) if len(n) == 16 and not n.startswith("net-")]
