"""The one owner of a machine's files: every file name, one typed record per JSON file, and how they
are written and read.

Every name of a file or directory qemuspec keeps under a state directory, a runtime directory, the
runtime base or the keep base is spelled here and nowhere else (like lima's filenames.go; the test
``tests/test_layout.py`` fails when another module spells one), and every read of them goes through
the helpers below, with O_NOFOLLOW.

Why one module: state directories sit in project trees that other people and tools touch (a
`git clean -fdx`, a planted symlink, a full disk). So every write here is atomic (an O_EXCL temp
file in the same directory, fsync, rename, fsync of the directory), every open is relative to a
directory fd with O_NOFOLLOW (a planted `serial.log -> /etc/shadow` makes the open fail instead of
writing there), directories are 0700 and files 0600 (serial logs can hold cloud-init secrets), and
reads tolerate a torn or forged file by returning None rather than raising.

Two places hold records:

* the **state directory** (``.qemuspec/NAME`` beside the definition): logs, disks' bookkeeping,
  and copies of the records for people to read;
* the **runtime directory** (``$XDG_RUNTIME_DIR/qemuspec/<hash>`` or ``/tmp/qemuspec-UID/<hash>``,
  private to the user): the machine's identity (``machine.json``), the supervisor's record and the
  lock it holds for as long as it lives. Deleting the state directory cannot lose a running machine,
  and only this user can write there, so a forged file in a project tree can never make qemuspec
  signal a process.

A state directory is trusted only once proven qemuspec's (:func:`proven`, :func:`claim`: a token
matched by a record in the user's keep base), because a repository can commit a `.qemuspec/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, TypeVar

from qemuspec import privdir
from qemuspec.errors import LaunchError
from qemuspec.runtime.paths import (
    private_dir as ensure_private,
)  # the one rule for a private directory

if TYPE_CHECKING:
    from qemuspec.runtime.paths import Layout

# -- file names: runtime/filenames.py, re-exported here ---------------------------------------
from qemuspec.runtime.filenames import *  # noqa: F403

LOG_LIMIT = 8 * 1024 * 1024  # a log larger than this is moved to NAME.1 (one generation kept)
RECORD_LIMIT = 1024 * 1024  # a record larger than this is not ours


# -- typed records -------------------------------------------------------------------------------

R = TypeVar("R", bound="Record")


class Record:
    """A JSON file's fields with their types; anything else read from disk is rejected (None)."""

    @classmethod
    def from_dict(cls: type[R], data: object) -> R | None:
        if not isinstance(data, dict):
            return None
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            allowed = cls.TYPES.get(f.name)  # type: ignore[attr-defined]
            if (
                value is not None
                and allowed is not None
                and (
                    not isinstance(value, allowed)
                    or isinstance(value, bool)
                    and bool not in allowed
                )
            ):
                return None
            values[f.name] = value
        try:
            return cls(**values)
        except TypeError:
            return None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


_NUM = (int, float)


@dataclass
class QemuRecord(Record):
    name: str
    pid: int
    exec_argv: list = field(default_factory=list)  # exactly what qemu was started with (identity)
    pid_start: str | None = None  # kernel start time of the pid (identity)
    argv: list = field(default_factory=list)  # canonical argv (for plan's diff)
    hash: str | None = None
    qmp: str | None = None  # the address for people and tools (tcp: needs TLS)
    control: str | None = None  # the controller's unix monitor
    qmp_client: str | None = None
    console: str | None = None
    accel: list = field(default_factory=list)
    started_at: float | None = None
    ports: list = field(default_factory=list)
    state_dir: str | None = None
    owner: str | None = None  # the definition file that started it
    tls: str | None = None  # directory of the TCP monitor's credentials
    boot: str | None = None  # "warm" when started from saved state, else "cold"
    restored: dict | None = None  # after a warm start: what was done about clock and RNG
    TYPES = {
        "name": (str,),
        "pid": (int,),
        "exec_argv": (list,),
        "pid_start": (str,),
        "argv": (list,),
        "hash": (str,),
        "qmp": (str,),
        "control": (str,),
        "qmp_client": (str,),
        "console": (str,),
        "accel": (list,),
        "started_at": _NUM,
        "ports": (list,),
        "state_dir": (str,),
        "owner": (str,),
        "tls": (str,),
        "boot": (str,),
        "restored": (dict,),
    }


@dataclass
class SupervisorRecord(Record):
    pid: int
    started: str | None = None  # kernel start time of the supervisor
    phase: str = "starting"  # starting, running, restarting, stopping
    restarts: int = 0
    restart: str = "no"
    attempt: int = 0  # restart attempt being waited for (phase restarting)
    next_at: float | None = None  # wall-clock time of the next attempt
    last_exit: str | None = None  # why qemu last ended (shown while restarting)
    error: str | None = None  # the last write that failed (disk full, read-only, deleted)
    owner: str | None = None
    state_dir: str | None = None
    TYPES = {
        "pid": (int,),
        "started": (str,),
        "phase": (str,),
        "restarts": (int,),
        "restart": (str,),
        "attempt": (int,),
        "next_at": _NUM,
        "last_exit": (str,),
        "error": (str,),
        "owner": (str,),
        "state_dir": (str,),
    }


@dataclass
class ExitRecord(Record):
    phase: str  # stopped, crashed, failed
    why: str = ""
    reason: str = ""  # for status: "exited (code 1)", "killed (signal 9)", "guest panic", ...
    step: str | None = None
    code: int | None = None
    signal: int | None = None
    restarts: int = 0
    at: float | None = None
    TYPES = {
        "phase": (str,),
        "why": (str,),
        "reason": (str,),
        "step": (str,),
        "code": (int,),
        "signal": (int,),
        "restarts": (int,),
        "at": _NUM,
    }


@dataclass
class StopRequest(Record):
    timeout: float | None = None
    TYPES = {"timeout": _NUM}


@dataclass
class OwnerRecord(Record):
    token: str
    dev: int
    ino: int
    path: str = ""
    TYPES = {"token": (str,), "dev": (int,), "ino": (int,), "path": (str,)}


@dataclass
class CreatedRecord(Record):
    files: list = field(
        default_factory=list
    )  # [{"path", "dev", "ino"}]: deleted by purge only if still the same file
    TYPES = {"files": (list,)}


@dataclass
class SaveRecord(Record):
    """Written before a warm save moves any disk onto a live overlay, removed when the save is done or
    undone: while it exists, the overlays it names may hold the disks' newest writes (runtime/warm.py)."""

    overlays: list = field(default_factory=list)  # [{"index", "overlay", "file"}]
    at: float | None = None
    TYPES = {"overlays": (list,), "at": _NUM}


@dataclass
class ProvisionRecord(Record):
    """The provision steps ran for this machine life (runtime/provision.py: its disks, or its qemu)."""

    life: str
    steps: str = ""  # digest of the steps that ran
    at: float | None = None
    TYPES = {"life": (str,), "steps": (str,), "at": _NUM}


@dataclass
class PortsRecord(Record):
    """The host ports the last qemu of this machine got for its ``host = 0`` forwards: the next start
    asks for the same ones (while they are free), so ssh configs and bookmarks stay right."""

    forwards: list = field(default_factory=list)  # [{"protocol", "address", "guest", "host"}]
    TYPES = {"forwards": (list,)}


# -- directories ---------------------------------------------------------------------------------

# -- proof of ownership --------------------------------------------------------------------------
#
# A state directory is qemuspec's only when proven so: its `.owner` holds a random token, and the
# keep base (runtime/paths.keep_dir: private to the user, persistent when HOME is private) holds a
# record of the same token with the directory's device and inode. A repository can commit a
# `.qemuspec/NAME/` with any files, but not that record; a new checkout is a new inode. Records,
# saved state, seeds and known hosts are read only from a proven directory; `up` claims an
# unproven one by moving those names aside into `untrusted-TIME/` (never deleted: qemuspec deletes
# only what it recorded creating) before it writes its own token. Logs and disks stay where they
# are: logs are read without following symlinks, disks are the definition's.


def _proof_name(state_dir: str) -> str:
    import hashlib

    return hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:32] + ".json"


def proven(state_dir: str) -> bool:
    """True when ``state_dir`` is the very directory qemuspec claimed (token and identity match)."""
    import hmac

    from qemuspec.errors import QemuspecError
    from qemuspec.runtime import paths

    try:
        info = os.lstat(state_dir)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    token = read_bytes(state_dir, OWNER, 256)
    if not token:
        return False
    try:
        record = read(paths.keep_dir(KEEP_OWNERS), _proof_name(state_dir), OwnerRecord)
    except (OSError, QemuspecError):
        return False
    return (
        record is not None
        and record.dev == info.st_dev
        and record.ino == info.st_ino
        and hmac.compare_digest(record.token.encode(), token.strip())
    )


def claim(state_dir: str) -> list[str]:
    """Make ``state_dir`` (0700, ours) proven qemuspec's; an unproven one first has what qemuspec
    would trust moved aside. Returns the names moved (empty for a new or proven directory)."""
    import secrets
    import time

    from qemuspec.runtime import paths

    ensure_private(state_dir)
    if proven(state_dir):
        return []
    moved = []
    with dirfd(state_dir) as dfd:
        present = [n for n in UNTRUSTED if _lexists(dfd, n)]
        if present:
            aside = f"untrusted-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
            os.mkdir(aside, 0o700, dir_fd=dfd)
            for name in present:
                os.rename(
                    name, f"{aside}/{name}", src_dir_fd=dfd, dst_dir_fd=dfd
                )  # a symlink moves as itself
                moved.append(name)
        token = secrets.token_hex(16)
        privdir.write(dfd, OWNER, (token + "\n").encode())
        info = os.fstat(dfd)
    write(
        paths.keep_dir(KEEP_OWNERS),
        _proof_name(state_dir),
        OwnerRecord(token=token, dev=info.st_dev, ino=info.st_ino, path=os.path.abspath(state_dir)),
    )
    return moved


def prepare(lay: Layout) -> None:
    """The state directory and the runtime directory: both 0700 and ours (the parent of a state
    directory may be the user's project: left as it is); the state directory proven ours
    (:func:`claim`: what a repository planted there is moved aside, never used)."""
    claim(lay.state_dir)
    base = os.path.dirname(lay.run_dir)
    try:
        ensure_private(base)
    except LaunchError:  # made by another user between run_base's look and ours
        raise LaunchError(
            f"{base} is not a directory of yours (another user created it, or it is a symlink): "
            f"set XDG_RUNTIME_DIR to a directory of your own with mode 0700 and run the command "
            f"again"
        ) from None
    ensure_private(lay.run_dir)


def claimed() -> list[str]:
    """Every state directory this user's qemuspec claimed and did not disown (the keep base's proofs),
    whether it still exists or not (:func:`proven` says)."""
    from qemuspec.errors import QemuspecError
    from qemuspec.runtime import paths

    try:
        base = paths.keep_dir(KEEP_OWNERS)
        names = sorted(os.listdir(base))
    except (OSError, QemuspecError):
        return []
    found = []
    for name in names:
        if not name.endswith(".json") or name.endswith(TMP_SUFFIX):
            continue
        with contextlib.suppress(OSError, QemuspecError):
            record = read(base, name, OwnerRecord)
            if record is not None and record.path and _proof_name(record.path) == name:
                found.append(record.path)
    return found


def disown(state_dir: str) -> None:
    """Forget the proof of a state directory about to be deleted (throwaway ones of `run` and the library)."""
    from qemuspec.errors import QemuspecError
    from qemuspec.runtime import paths

    with contextlib.suppress(OSError, QemuspecError):
        remove(paths.keep_dir(KEEP_OWNERS), _proof_name(state_dir))


def _lexists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def dirfd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _check_parent(path: str) -> None:
    """A directory we write into must not be a symlink planted in place of ours."""
    if os.path.islink(path):
        raise OSError(errno.ELOOP, f"{path} is a symlink")


# -- records -------------------------------------------------------------------------------------


def write(directory: str, name: str, record: Record | dict) -> None:
    """Replace ``directory/name`` atomically with the record as JSON (fsync'd; 0600)."""
    data = record.as_dict() if isinstance(record, Record) else record
    write_bytes(directory, name, (json.dumps(data, indent=2) + "\n").encode())


def write_bytes(directory: str, name: str, payload: bytes) -> None:
    """Replace ``directory/name`` atomically (O_EXCL temp file, fsync, rename, fsync the directory; 0600)."""
    with dirfd(directory) as dfd:
        privdir.write(dfd, name, payload)


def read(directory: str, name: str, kind: type[R]) -> R | None:
    """The record, or None when it is missing, torn, too large, a symlink or of the wrong shape."""
    data = read_bytes(directory, name, RECORD_LIMIT)
    if data is None:
        return None
    try:
        return kind.from_dict(json.loads(data))
    except (ValueError, RecursionError):
        return None


def read_bytes(directory: str, name: str, limit: int) -> bytes | None:
    """A file's bytes, or None when missing, a symlink (the directory too), not a regular file of
    this user's, or over ``limit``."""
    try:
        with dirfd(directory) as dfd:
            return privdir.read(dfd, name, limit)
    except OSError:
        return None


def read_from(path: str, offset: int = 0, limit: int = 2 * LOG_LIMIT) -> bytes | None:
    """A state file's bytes from ``offset`` (logs, events: `qemuspec logs`, console tails in error
    messages), or None when it is missing, a symlink (``serial.log -> /proc/self/environ`` prints
    nothing), in a symlinked directory or not a regular file of this user's."""
    try:
        with dirfd(os.path.dirname(path) or ".") as dfd:
            fd = os.open(
                os.path.basename(path),
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                dir_fd=dfd,
            )
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                return None
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            out = bytearray()
            while len(out) < limit:
                chunk = os.read(fd, min(limit - len(out), 1 << 20))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        finally:
            os.close(fd)
    except OSError:
        return None


def remove(directory: str, *names: str) -> None:
    try:
        with dirfd(directory) as dfd:
            for name in names:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


# -- logs ----------------------------------------------------------------------------------------


def open_log(directory: str, name: str, limit: int = LOG_LIMIT) -> int:
    """An append fd for a log (0600, never through a symlink); a log over ``limit`` is first moved
    to NAME.1, so logs stay bounded at about twice the limit."""
    with dirfd(directory) as dfd:
        rotate(dfd, name, limit)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{os.path.join(directory, name)} is not a regular file")
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
    return fd


def rotate(dfd: int, name: str, limit: int = LOG_LIMIT) -> bool:
    try:
        info = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(info.st_mode) and info.st_size > limit:
        os.replace(name, name + ".1", src_dir_fd=dfd, dst_dir_fd=dfd)
        return True
    return False


def precreate(directory: str, name: str, limit: int = LOG_LIMIT) -> str:
    """Make sure ``name`` is a regular 0600 file of ours before a program that opens it by path
    (qemu's logfile=, -pidfile) does; rotated when over the limit. Returns the path."""
    path = os.path.join(directory, name)
    try:
        os.close(open_log(directory, name, limit))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EINVAL):
            raise LaunchError(
                f"{path} is a symlink or not a regular file: qemuspec never writes through one; remove it"
            ) from None
        raise LaunchError(f"cannot create {path}: {exc.strerror or exc}") from None
    return path


class CappedLog:
    """A log qemuspec writes itself (serial.log, from the console bytes the supervisor receives), kept
    under ``limit`` in total while the machine runs: the file moves to NAME.1 before it would pass
    half the limit, so NAME plus NAME.1 never exceed it. Writes never raise (a full disk, a deleted or
    read-only state directory lose log lines, not the machine); a failed open is retried at most once
    a second."""

    RETRY = 1.0

    def __init__(self, directory: str, name: str, limit: int = LOG_LIMIT, times: str | None = None):
        """``times``: also keep a time index (``TimeIndex``) of when the bytes arrived, rotated
        with the log, for `logs --timestamps` and `--since`."""
        self.directory, self.name, self.half = directory, name, max(1, limit // 2)
        self.error: str | None = None
        self.errno: int | None = None
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self.times = times
        self._times_fd: int | None = None
        self._last_time = 0.0
        self._open(rotate_first=False)

    def _open(self, rotate_first: bool) -> None:
        import time

        self._retry_at = time.monotonic() + self.RETRY
        try:
            with dirfd(self.directory) as dfd:
                try:
                    size = os.stat(self.name, dir_fd=dfd, follow_symlinks=False).st_size
                except FileNotFoundError:
                    size = 0
                if rotate_first and size:
                    os.replace(self.name, rotated(self.name), src_dir_fd=dfd, dst_dir_fd=dfd)
                    if self.times:
                        with contextlib.suppress(FileNotFoundError):
                            os.replace(
                                self.times, rotated(self.times), src_dir_fd=dfd, dst_dir_fd=dfd
                            )
                elif (
                    size > self.half
                ):  # written by someone else (an older qemuspec's qemu): keep its end
                    fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    try:
                        os.lseek(fd, size - self.half, os.SEEK_SET)
                        end = os.read(fd, self.half)
                    finally:
                        os.close(fd)
                    write_bytes(self.directory, rotated(self.name), end)
                    os.unlink(self.name, dir_fd=dfd)
                    size = 0
                if self.times and not size:  # a new log: its index starts afresh
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.times, dir_fd=dfd)
            self._fd = open_log(self.directory, self.name, limit=2**62)
            self._size = os.fstat(self._fd).st_size
            if self.times:
                if self._times_fd is not None:
                    os.close(self._times_fd)
                self._times_fd = open_log(self.directory, self.times, limit=2**62)
            self.error = self.errno = None
        except OSError as exc:
            self._fd, self.errno = None, exc.errno
            self.error = (
                f"cannot write {os.path.join(self.directory, self.name)}: {exc.strerror or exc}"
            )

    def write(self, data: bytes) -> None:
        import time

        data = data[-self.half :]  # one chunk never holds more than half the limit
        if self._fd is not None and self._size + len(data) > self.half:
            self.close()
            self._open(rotate_first=True)
        elif self._fd is None:
            if time.monotonic() < self._retry_at:
                return
            self._open(rotate_first=False)
        if self._fd is None:
            return
        self._stamp()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._size += len(data)
        except OSError as exc:
            self.error = (
                f"cannot write {os.path.join(self.directory, self.name)}: {exc.strerror or exc}"
            )
            self.close()

    def _stamp(self) -> None:
        """A time index record for the bytes about to be written: at most one a millisecond (a line
        is then dated to within 1 ms), so the index stays a bounded fraction of the log."""
        import time

        now = time.time()
        if self._times_fd is None or now - self._last_time < 0.001:
            return
        self._last_time = now
        with contextlib.suppress(OSError):  # the index is a convenience: never the log's trouble
            os.write(self._times_fd, TimeIndex.RECORD.pack(self._size, now))

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._times_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._times_fd)
            self._times_fd = None


class TimeIndex:
    """When a capped log's bytes arrived (``CappedLog(times=)``): records of (offset in the log,
    unix time) as little-endian u64 + f64, read through the state owner (never a symlink)."""

    RECORD = struct.Struct("<Qd")

    def __init__(self, path: str):
        self.path = path
        self.offsets: list[int] = []
        self.times: list[float] = []
        self._read = 0

    def refresh(self) -> bool:
        """Read records appended since the last call; False when there is no index."""
        data = read_from(self.path, self._read)
        if data is None:
            return False
        usable = len(data) - len(data) % self.RECORD.size
        for offset, when in self.RECORD.iter_unpack(data[:usable]):
            self.offsets.append(offset)
            self.times.append(when)
        self._read += usable
        return True

    def at(self, offset: int) -> float | None:
        """The time the byte at ``offset`` arrived (to within a millisecond), or None if unknown."""
        import bisect

        i = bisect.bisect_right(self.offsets, offset) - 1
        return self.times[i] if i >= 0 else None


# -- files qemuspec created ----------------------------------------------------------------------


def record_definition(state_dir: str, definition: dict) -> None:
    """Keep the resolved definition a machine was started from (its model dump), for `plan` by field."""
    ensure_private(state_dir)
    write(state_dir, DEFINITION, definition)


def recorded_definition(state_dir: str) -> dict | None:
    """What the machine was last started from (or last changed to live), when a directory proven
    qemuspec's says so; None otherwise (plan then knows no fields, and a change restarts)."""
    if not proven(state_dir):
        return None
    data = read_bytes(state_dir, DEFINITION, RECORD_LIMIT)
    try:
        found = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def note_created(state_dir: str, path: str) -> None:
    """Remember a file qemuspec made (a disk image), with its identity, for `down --purge`."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    claim(
        state_dir
    )  # a record in a directory not proven ours would count for nothing (reset, purge)
    record = read(state_dir, CREATED, CreatedRecord) or CreatedRecord()
    entry = {"path": os.path.abspath(path), "dev": info.st_dev, "ino": info.st_ino}
    record.files = [
        f for f in record.files if isinstance(f, dict) and f.get("path") != entry["path"]
    ] + [entry]
    write(state_dir, CREATED, record)


def created_files(state_dir: str) -> list[str]:
    """The files qemuspec made that are still the very files it made (same device and inode, not a
    symlink), recorded in a directory proven ours: nothing else is ever deleted by purge."""
    record = read(state_dir, CREATED, CreatedRecord) if proven(state_dir) else None
    out = []
    for entry in record.files if record else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        try:
            info = os.lstat(entry["path"])
        except OSError:
            continue
        if (
            stat.S_ISREG(info.st_mode)
            and info.st_dev == entry.get("dev")
            and info.st_ino == entry.get("ino")
        ):
            out.append(entry["path"])
    return out


# -- the supervisor's lock -----------------------------------------------------------------------


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (made 0600, never through a symlink) for the block: the one
    way qemuspec makes parallel processes take turns on a shared thing (a network's switch, a
    checkpoint being made)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold_lock(run_dir: str, wait: bool = True) -> int:
    """Taken by the supervisor for its whole life (the fd is kept open; the kernel drops it at exit).
    With ``wait`` False, a lock someone else holds raises BlockingIOError."""
    fd = os.open(
        os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def beat(lock_fd: int) -> None:
    """The supervisor's heartbeat: the lock file's mtime, set through the held fd (no fsync, no path)."""
    with contextlib.suppress(OSError):
        os.utime(lock_fd)


def heartbeat_age(run_dir: str) -> float | None:
    """Seconds since the supervisor's last heartbeat (None: no lock file)."""
    import time

    try:
        return max(
            0.0, time.time() - os.stat(os.path.join(run_dir, LOCK), follow_symlinks=False).st_mtime
        )
    except OSError:
        return None


def same_file(fd: int, directory: str, name: str) -> bool:
    """Whether ``directory/name`` is still the file open as ``fd`` (False once it was removed)."""
    try:
        here, there = os.fstat(fd), os.stat(os.path.join(directory, name), follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def lock_holders(run_dir: str) -> set[int]:
    """Pids holding the supervisor lock, from /proc/locks (empty: no live supervisor)."""
    try:
        info = os.stat(os.path.join(run_dir, LOCK), follow_symlinks=False)
    except OSError:
        return set()
    dev = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                    holders.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    return holders
