"""Directories only this user can change, opened once and used through their descriptor.

Why: caches and qemuspec's private records live under HOME or XDG_CACHE_HOME, and those can be a
tree another local user controls (``sudo`` keeping HOME, ``su`` without ``-``). A check of a path
followed by an open of the same path loses to a user who swaps a component in between, and a
predictable temporary name opened through a symlink overwrites whatever it points at. So the
directory is resolved once, walked from ``/`` one component at a time with O_NOFOLLOW, every
ancestor must be owned by root or this user and writable by nobody else (a sticky directory such as
/tmp passes: others cannot rename what is ours in it), and the directory itself must be this
user's. Everything after that is relative to the descriptor: entries are opened with O_NOFOLLOW and
fstat'd (a regular file of this user's), writes go to an O_EXCL temporary name of random bytes and
are renamed into place. A directory that fails the rule is not used at all (None): a cache then
costs speed, never correctness.

This module is the bottom layer (no qemuspec imports) so the spec layer's cache can use it too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Iterator

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _safe_ancestor(info: os.stat_result, uid: int) -> bool:
    """Nobody but root and this user can replace what is inside (sticky: others may add, not replace)."""
    if info.st_uid not in (0, uid):
        return False
    return not info.st_mode & 0o022 or bool(info.st_mode & stat.S_ISVTX)


def open_private(path: str, create: bool = True) -> int | None:
    """A descriptor of ``path`` (made 0700 when missing and ``create``), or None when the directory
    or one of its ancestors could be changed by another user, or it is not a directory of ours."""
    uid = os.getuid()
    parts = [p for p in os.path.realpath(path).split("/") if p]
    try:
        fd = os.open("/", _DIR)
    except OSError:
        return None
    ok = False
    try:
        for part in parts:
            if not _safe_ancestor(os.fstat(fd), uid):
                return None
            try:
                child = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if (
            info.st_uid != uid or info.st_mode & 0o022
        ):  # others could have put or swapped entries in it
            return None
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
        ok = True
        return fd
    except OSError:
        return None
    finally:
        if not ok:
            os.close(fd)


@contextlib.contextmanager
def private(path: str, create: bool = True) -> Iterator[int | None]:
    """:func:`open_private` as a context (the descriptor is closed after; None is yielded as is)."""
    fd = open_private(path, create)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def read(dfd: int, name: str, limit: int) -> bytes | None:
    """The bytes of ``name`` in the directory, or None: missing, a symlink, not a regular file of
    this user's, or larger than ``limit``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return None if len(data) > limit else data


def write(dfd: int, name: str, payload: bytes, sync: bool = True) -> None:
    """Replace ``name`` atomically: an O_EXCL|O_NOFOLLOW temporary of random name (0600), fsync'd,
    renamed over ``name`` relative to the directory, then the directory fsync'd."""
    tmp = f".{name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
    )
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    if sync:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
