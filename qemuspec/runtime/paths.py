"""Where a machine's files go: state next to the definition, sockets in a short private directory,
secrets and proofs of ownership in a private directory of the user's.

Unix socket paths are limited to 107 bytes, and projects live in deep directories; so sockets go in
the runtime base (:func:`run_base`) under a hash of the state directory, 0700. What a repository must
never be able to plant (ssh keys, the records that prove a state directory is qemuspec's) goes in
the keep base (:func:`keep_dir`), which survives reboots when the user's HOME is private.

A machine's :class:`Layout` is built by one function, :func:`machine_layout`, for every caller that
renders (``qemuspec render``, the library's ``VM.argv()``/``start()``, the supervisor's instance,
warm's key, the judge): accelerators and the TCP monitor are resolved there once, so the same machine
gives the same command line on every path. The file names in it are statedir's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from qemuspec.errors import LaunchError
from qemuspec.runtime import filenames

if TYPE_CHECKING:
    from qemuspec.settings import Settings
    from qemuspec.spec.models import Machine


@dataclass(frozen=True)
class Layout:
    """Where one machine's runtime files are. Sockets go in a short ``run_dir`` (0700) so their paths stay
    under the 108-byte limit wherever the project lives; logs and state go in ``state_dir``. The file
    names are statedir's (the one owner of a machine's files). ``accel`` is resolved (no "auto"), and
    ``fallback`` is what to start again on when qemu cannot start on it (KVM that exists but fails);
    ``qmp_port`` is the TCP monitor's port, None for a unix-only machine."""

    state_dir: str
    run_dir: str
    accel: tuple[str, ...] = ()
    qmp_port: int | None = None
    fds: Mapping[str, int] = field(default_factory=dict)
    fallback: tuple[str, ...] = ()

    @property
    def qmp(self) -> str:
        return os.path.join(self.run_dir, filenames.QMP_SOCK)

    @property
    def tls_dir(self) -> str:
        """The TCP monitor's TLS credentials (runtime/tls.py makes them), in the private runtime
        directory: a repository can plant files in a state directory, never here."""
        return os.path.join(self.run_dir, filenames.TLS_DIR)

    @property
    def qmp_client(self) -> str:
        return os.path.join(self.run_dir, filenames.QMP_CLIENT_SOCK)

    @property
    def console(self) -> str:
        return os.path.join(self.run_dir, filenames.CONSOLE_SOCK)

    @property
    def display(self) -> str:
        """A vnc/spice display's unix socket: only the owner can enter the runtime directory."""
        return os.path.join(self.run_dir, filenames.DISPLAY_SOCK)

    @property
    def console_client(self) -> str:
        """The supervisor's console proxy (`qemuspec console`); qemu's own console socket stays its reader's."""
        return os.path.join(self.run_dir, filenames.CONSOLE_CLIENT)

    @property
    def qga(self) -> str:
        return os.path.join(self.run_dir, filenames.QGA_SOCK)

    def virtiofs(self, index: int) -> str:
        return os.path.join(self.run_dir, filenames.virtiofs_sock(index))

    @property
    def serial_log(self) -> str:
        return os.path.join(self.state_dir, filenames.SERIAL_LOG)

    @property
    def qemu_log(self) -> str:
        return os.path.join(self.state_dir, filenames.QEMU_LOG)

    @property
    def events_log(self) -> str:
        return os.path.join(self.state_dir, filenames.EVENTS)

    @property
    def pidfile(self) -> str:
        return os.path.join(self.state_dir, filenames.PIDFILE)

    @property
    def efivars(self) -> str:
        return os.path.join(self.state_dir, filenames.EFIVARS)

    @property
    def cidata(self) -> str:
        return os.path.join(self.state_dir, filenames.CIDATA)

    def network(self, name: str) -> str:
        """The vde_switch directory of a private network: shared by the machines of one state root."""
        import hashlib

        root = os.path.dirname(self.state_dir)
        digest = hashlib.sha256(f"{root}\0{name}".encode()).hexdigest()[:12]
        return os.path.join(os.path.dirname(self.run_dir), filenames.NETWORK_PREFIX + digest)


def machine_layout(
    machine: Machine, state_dir: str, settings: Settings | None = None, run_dir: str | None = None
) -> Layout:
    """The one constructor of a machine's Layout: its accelerators resolved once (``settings.accel``
    forces them for a run; else "auto" is kvm when /dev/kvm answers, runtime/accel.py) with the
    fallback for a KVM that fails, and its TCP monitor's port. ``run_dir``: the judge's scratch."""
    from qemuspec.runtime import accel

    settings = settings or _settings()
    chosen, fallback = accel.choose(machine.accel, settings.accel)
    port = machine.qmp.port if machine.qmp.transport == "tcp" else None
    return Layout(
        state_dir=os.path.abspath(state_dir),
        run_dir=run_dir or _run_dir(state_dir, settings),
        accel=chosen,
        qmp_port=port,
        fallback=fallback,
    )


def layout(state_dir: str, settings: Settings | None = None) -> Layout:
    """Where the files of the machine in ``state_dir`` are, for code without the machine at hand (a
    pidfile, a network's switch, an agent socket); it renders nothing (no accelerators)."""
    return Layout(
        state_dir=os.path.abspath(state_dir), run_dir=_run_dir(state_dir, settings or _settings())
    )


def with_accel(lay: Layout, accel: tuple[str, ...]) -> Layout:
    """``lay`` on other accelerators (a KVM that failed; a running machine's recorded ones)."""
    return dataclasses.replace(lay, accel=accel, fallback=())


def _settings() -> Settings:
    from qemuspec.settings import current

    return current()


def state_root(definition: str | None, override: str | None = None) -> str:
    """``override`` (the caller's --state-dir, else Settings.state_dir), else .qemuspec beside the file."""
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


def keep_base(create: bool = True, settings: Settings | None = None) -> str | None:
    """qemuspec's persistent private directory (``$XDG_STATE_HOME/qemuspec``, else
    ``~/.local/state/qemuspec``), or None when it lies in a tree another user can change (sudo
    keeping HOME, su without -): then nothing of ours is kept there."""
    from qemuspec.privdir import open_private

    settings = settings or _settings()
    base = os.path.join(
        settings.state_home or os.path.join(settings.home, ".local", "state"), "qemuspec"
    )
    fd = open_private(base, create)
    if fd is None:
        return None
    os.close(fd)  # every ancestor is root's or ours and closed to others: the path stays ours
    return base


def run_base(settings: Settings | None = None) -> str:
    """The one rule for where this user's runtime registry is, so every command finds it again:
    ``$XDG_RUNTIME_DIR/qemuspec`` when XDG_RUNTIME_DIR is a directory of ours closed to others; else
    ``/tmp/qemuspec-UID`` unless another user squatted it first; else (squatted) ``run/`` in the
    keep base, which is also used from then on while it holds machines. With neither, a clear error
    naming XDG_RUNTIME_DIR as the fix."""
    settings = settings or _settings()
    xdg = settings.runtime_dir
    if xdg and _own_dir(xdg):
        return os.path.join(xdg, "qemuspec")
    tmp = f"/tmp/qemuspec-{os.getuid()}"
    tmp_ours = not os.path.lexists(tmp) or _own_dir(tmp)
    keep = keep_base(not tmp_ours, settings)
    fallback = os.path.join(keep, "run") if keep else None
    if fallback and _own_dir(fallback) and os.listdir(fallback):
        return (
            fallback  # chosen before, while /tmp/qemuspec-UID was squatted: its machines live here
        )
    if tmp_ours:
        return tmp
    if fallback:
        return fallback
    raise LaunchError(
        f"{tmp} is not a directory of yours (another user created it, or it is a symlink) and HOME "
        f"has no private directory to use instead: set XDG_RUNTIME_DIR to a directory of your own "
        f"with mode 0700 (for example /run/user/{os.getuid()})"
    )


def keep_dir(kind: str) -> str:
    """``kind`` (ssh keys, owner proofs) in the keep base, or in the runtime base when the keep base
    is not private (then it lasts until reboot); made 0700 and ours."""
    keep = keep_base()
    path = (
        os.path.join(keep, kind) if keep else os.path.join(run_base(), filenames.KEEP_PREFIX + kind)
    )
    private_dir(path)
    return path


def run_dir(state_dir: str) -> str:
    """The runtime directory of the machine whose state lives in ``state_dir`` (its registry entry)."""
    return _run_dir(state_dir, _settings())


def _run_dir(state_dir: str, settings: Settings) -> str:
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:16]
    return os.path.join(run_base(settings), digest)


def private_dir(path: str) -> None:
    """Create ``path`` 0700 (parents as usual) and refuse a symlink, a non-directory or another
    user's directory; tighten one we own that others can enter. The one rule for a private
    directory (statedir.ensure_private is this function)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LaunchError(f"cannot create {path}: {exc.strerror}") from None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise LaunchError(
            f"{path} is not a directory owned by you (a symlink or another user's): remove it, "
            "or choose another state directory with --state-dir"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def registry() -> list[str]:
    """Every runtime directory of this user: one per machine qemuspec runs (or ran and lost)."""
    base = run_base()
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return [
        os.path.join(base, n)
        for n in sorted(names)
        if len(n) == 16 and not n.startswith(filenames.NETWORK_PREFIX)
    ]
