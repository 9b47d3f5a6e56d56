"""Files in and out of a guest through its guest agent, streamed.

The agent moves file contents as base64 in JSON messages, one ``guest-file-read``/``-write`` per
chunk. Reading the local file (or writing it) chunk by chunk keeps memory flat whatever the size;
modes travel with ``stat``/``chmod`` run through ``guest-exec``, and directories with ``find`` and
``mkdir -p`` there (busybox has them all).

The guest is hostile: its ``find`` and ``stat`` may be replaced and its file names may hold any byte
but NUL and ``/``. So the listing is NUL-separated names (``find -print0``) and a ``stat`` whose
output holds no name at all, parsed strictly; every name must lie under the source and every
component must be a plain name; everything on the host is created relative to directory fds with
O_NOFOLLOW|O_EXCL (files under a temporary name, renamed when complete); setuid, setgid and sticky
bits are dropped; and only directories this copy created get the guest's modes. Host trees copied
into the guest keep their symlinks as symlinks (as ``cp -R``, ``tar`` and ``rsync -a`` do) unless
``dereference`` is asked for, so a planted ``leak -> /proc/self/environ`` sends no host bytes.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import warnings
from typing import TYPE_CHECKING, Callable, Iterator

from qemuspec.errors import QemuspecError, QemuspecWarning

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent

CHUNK = 1024 * 1024  # bytes per agent message: ~1.4 MB of base64, far below qemu-ga's message limit
Progress = Callable[[str, int, "int | None"], None]
PROGRESS_FROM = 8 * 1024 * 1024  # smaller files are done before a bar would be worth drawing
STAT_BATCH = 256  # names per guest `stat` (its argv stays far below ARG_MAX)
_STAT_LINE = re.compile(rb"([0-9a-f]{1,8}) ([0-9]{1,20})")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _run(agent: "GuestAgent", argv: list[str]) -> bytes:
    code, out, err = agent.exec(argv, timeout=60)
    if code != 0:
        raise QemuspecError(
            f"in the guest, {' '.join(argv[:4])}{' ...' if len(argv) > 4 else ''} failed ({code}): "
            f"{err.decode(errors='replace').strip()[:500]!r}"
        )
    return out


def _is_guest_dir(agent: "GuestAgent", path: str) -> bool:
    code, _, _ = agent.exec(["test", "-d", path], timeout=30)
    return code == 0


def _warn(text: str) -> None:
    warnings.warn(text, QemuspecWarning, stacklevel=3)


# -- host -> guest ---------------------------------------------------------------------------------


def write_stream(
    agent: "GuestAgent",
    local: str,
    guest: str,
    progress: Progress | None = None,
    follow: bool = True,
) -> tuple[int, int]:
    """Stream one local regular file into ``guest`` (created or replaced); returns (bytes written, its
    mode). Without ``follow`` a symlink is refused (O_NOFOLLOW); a FIFO or device never is read."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(local, flags)
    except OSError as exc:
        raise QemuspecError(f"cannot read {local}: {exc.strerror}") from None
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise QemuspecError(
                f"{local} is not a regular file: only files, directories and symlinks are copied"
            )
        handle = agent.file_open(guest, "w")
        done = 0
        try:
            while chunk := f.read(CHUNK):
                agent.file_write(handle, chunk, timeout=60)
                done += len(chunk)
                if progress and info.st_size >= PROGRESS_FROM:
                    progress(local, done, info.st_size)
        finally:
            agent.file_close(handle)
    return done, stat.S_IMODE(info.st_mode)


def _walk(
    top: str, dereference: bool, seen: set[tuple[int, int]]
) -> Iterator[tuple[str, str, str]]:
    """(kind, host path, path relative to ``top``) below ``top``, parents first: kind "d", "f", "l"
    (a symlink, not followed unless ``dereference``) or "?" (anything else). A directory met twice
    through symlinks (a loop) is not entered again."""
    with os.scandir(top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_symlink() and not dereference:
            yield "l", entry.path, entry.name
        elif entry.is_dir(follow_symlinks=dereference):
            info = entry.stat(follow_symlinks=True)
            if (info.st_dev, info.st_ino) in seen:
                _warn(f"{entry.path}: skipped, a directory already copied (a symlink loop)")
                continue
            seen.add((info.st_dev, info.st_ino))
            yield "d", entry.path, entry.name
            for kind, path, rel in _walk(entry.path, dereference, seen):
                yield kind, path, f"{entry.name}/{rel}"
        elif entry.is_file(follow_symlinks=dereference):
            yield "f", entry.path, entry.name
        else:
            yield "?", entry.path, entry.name


def copy_to_guest(
    agent: "GuestAgent",
    source: str,
    dest: str,
    recursive: bool = False,
    progress: Progress | None = None,
    dereference: bool = False,
) -> list[dict]:
    """Copy a local file (or, with ``recursive``, a directory tree) to ``dest`` in the guest, modes kept.
    Like cp: into ``dest`` when it is a directory in the guest. In a tree, symlinks are made as
    symlinks in the guest; ``dereference`` copies what they point to instead (like ``cp -L``)."""
    if not os.path.lexists(source):
        raise QemuspecError(f"{source}: no such file")
    if _is_guest_dir(agent, dest):
        dest = dest.rstrip("/") + "/" + os.path.basename(source.rstrip("/"))
    if recursive and not dereference and os.path.islink(source):
        return [_link(agent, source, dest)]
    if not os.path.isdir(source):
        return [_put(agent, source, dest, progress, follow=True)]
    if not recursive:
        raise QemuspecError(f"{source} is a directory: add -r")
    top = os.stat(source)
    copied: list[dict] = []
    _mkdir(agent, dest, stat.S_IMODE(top.st_mode))
    for kind, path, rel in _walk(source, dereference, {(top.st_dev, top.st_ino)}):
        target = f"{dest}/{rel}"
        if kind == "d":
            _mkdir(agent, target, stat.S_IMODE(os.stat(path).st_mode))
        elif kind == "f":
            copied.append(_put(agent, path, target, progress, follow=dereference))
        elif kind == "l":
            copied.append(_link(agent, path, target))
        else:
            _warn(f"{path}: skipped, not a regular file, directory or symlink")
    return copied


def _mkdir(agent: "GuestAgent", guest: str, mode: int) -> None:
    _run(agent, ["mkdir", "-p", "--", guest])
    _run(agent, ["chmod", f"{mode:o}", "--", guest])


def _put(
    agent: "GuestAgent", local: str, guest: str, progress: Progress | None, follow: bool
) -> dict:
    size, mode = write_stream(agent, local, guest, progress, follow=follow)
    _run(agent, ["chmod", f"{mode:o}", "--", guest])
    return {"source": local, "target": guest, "bytes": size, "mode": f"{mode:o}"}


def _link(agent: "GuestAgent", local: str, guest: str) -> dict:
    """A host symlink as a symlink in the guest: the link's text travels, never what it points to."""
    text = os.readlink(local)
    _run(agent, ["ln", "-sfn", "--", text, guest])
    return {"source": local, "target": guest, "bytes": 0, "link": text}


# -- guest -> host ---------------------------------------------------------------------------------


def _guest_stats(agent: "GuestAgent", paths: list[str]) -> list[tuple[str, int, int]]:
    """(kind, mode, size) of each guest path (not following symlinks), from a ``stat`` whose output
    names nothing, so no file name can shift a line; anything but one strict line per path is refused."""
    out: list[tuple[str, int, int]] = []
    for start in range(0, len(paths), STAT_BATCH):
        batch = paths[start : start + STAT_BATCH]
        lines = _run(agent, ["stat", "-c", "%f %s", "--", *batch]).split(b"\n")
        if lines[-1:] == [b""]:
            lines.pop()
        if len(lines) != len(batch) or not all(_STAT_LINE.fullmatch(line) for line in lines):
            first = lines[0][:80] if lines else b""
            raise QemuspecError(
                f"the guest's stat answered {len(lines)} lines for {len(batch)} files, or lines "
                f'that are not "MODE SIZE" (first: {first!r}): refusing the copy'
            )
        for line in lines:
            raw_mode, raw_size = line.split(b" ")
            mode = int(raw_mode, 16)
            kind = (
                "d"
                if stat.S_ISDIR(mode)
                else "f"
                if stat.S_ISREG(mode)
                else "l"
                if stat.S_ISLNK(mode)
                else "?"
            )
            out.append((kind, stat.S_IMODE(mode), int(raw_size)))
    return out


def _guest_tree(agent: "GuestAgent", root: str) -> list[tuple[str, ...]]:
    """The names below guest directory ``root`` as tuples of components, each proven a plain name
    (non-empty, no ``/``, not ``.`` or ``..``); a name outside ``root`` refuses the whole copy."""
    out = _run(agent, ["find", root, "-mindepth", "1", "-print0"])
    if out and not out.endswith(b"\0"):
        raise QemuspecError(
            f"the guest's find listing of {root} does not end with NUL: refusing the copy"
        )
    prefix = root.encode() + b"/"
    names = []
    for raw in out.split(b"\0")[:-1]:
        rel = raw[len(prefix) :].split(b"/") if raw.startswith(prefix) else []
        if not rel or any(part in (b"", b".", b"..") for part in rel):
            raise QemuspecError(
                f"the guest listed {raw[:200]!r}, which is not a plain path below {root}: "
                "refusing the copy"
            )
        try:
            names.append(tuple(part.decode() for part in rel))
        except UnicodeDecodeError:  # the agent takes paths as JSON text: such a name cannot be read
            _warn(f"{raw[:200]!r} in the guest: skipped, its name is not UTF-8")
    return names


def _component(name: str, what: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise QemuspecError(f"{what}: {name!r} is not a file name to create")
    return name


def read_stream(
    agent: "GuestAgent",
    guest: str,
    dir_fd: int,
    name: str,
    mode: int,
    progress: Progress | None = None,
    total: int | None = None,
    shown: str | None = None,
) -> int:
    """Stream ``guest`` into ``name`` in the directory ``dir_fd``: written under a fresh temporary
    name (O_CREAT|O_EXCL|O_NOFOLLOW, 0600), given ``mode`` without setuid/setgid/sticky, renamed over
    ``name`` when complete. More bytes than ``total`` (the size the guest's stat gave) is an error."""
    shown = shown or name
    tmp = f".{name[:32]}.{secrets.token_hex(6)}.qemuspec-tmp"  # within NAME_MAX whatever the name
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    done = 0
    try:
        handle = agent.file_open(guest, "r")
        try:
            with open(fd, "wb", closefd=False) as f:
                while True:
                    data, eof = agent.file_read(handle, CHUNK, timeout=60)
                    done += len(data)
                    if total and done > total:
                        raise QemuspecError(
                            f"{guest}: the guest sent more than the {total} bytes its stat reported "
                            "(the file grew during the copy, or the guest lies): nothing was kept"
                        )
                    f.write(data)
                    if progress and (total or 0) >= PROGRESS_FROM:
                        progress(shown, done, total)
                    if eof:
                        break
        finally:
            agent.file_close(handle)
        os.fchmod(fd, mode & 0o777)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    return done


def _enter(parent_fd: int, name: str, shown: str) -> tuple[int, bool]:
    """Open directory ``name`` under ``parent_fd`` without following a symlink, creating it (0700)
    when missing; (fd, whether this call created it)."""
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd), created
    except (NotADirectoryError, OSError) as exc:
        if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
            raise QemuspecError(
                f"{shown} exists and is not a directory (a symlink there is never followed): "
                "move it away, or copy somewhere else"
            ) from None
        raise


def copy_from_guest(
    agent: "GuestAgent",
    source: str,
    dest: str,
    recursive: bool = False,
    progress: Progress | None = None,
) -> list[dict]:
    """Copy a guest file (or, with ``recursive``, a directory tree) to ``dest`` here, modes kept (less
    setuid, setgid and sticky). The guest's listing is hostile input (see the module's doc)."""
    if not source.startswith("/"):
        raise QemuspecError(f"{source}: guest paths are absolute (write NAME:/path)")
    src = source.rstrip("/")
    if not src:
        raise QemuspecError("copying the guest's whole / is refused: name a directory below it")
    kind, mode, size = _guest_stats(agent, [src])[0]
    if kind == "d" and not recursive:
        raise QemuspecError(f"{source} is a directory in the guest: add -r")
    if kind not in ("d", "f"):
        raise QemuspecError(f"{source} is not a regular file or directory in the guest")
    if os.path.isdir(dest):
        parent, name = dest, os.path.basename(src)
    else:
        parent, name = os.path.dirname(dest) or ".", os.path.basename(dest)
    _component(name, dest)
    real = os.path.realpath(parent)
    try:
        root_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise QemuspecError(f"cannot write into {parent}: {exc.strerror}") from None
    try:
        if kind == "f":
            done = read_stream(agent, src, root_fd, name, mode, progress, size, shown=dest)
            return [
                {
                    "source": src,
                    "target": os.path.join(real, name),
                    "bytes": done,
                    "mode": f"{mode & 0o777:o}",
                }
            ]
        return _copy_tree(agent, src, root_fd, real, name, mode, progress)
    except OSError as exc:
        raise QemuspecError(
            f"copying {source} to {dest}: {exc.filename or ''}: {exc.strerror}"
        ) from None
    finally:
        os.close(root_fd)


def _copy_tree(
    agent: "GuestAgent",
    src: str,
    root_fd: int,
    real: str,
    name: str,
    mode: int,
    progress: Progress | None,
) -> list[dict]:
    names = sorted(_guest_tree(agent, src))  # tuples sort parents first, then their children
    stats = _guest_stats(agent, [src + "/" + "/".join(rel) for rel in names])
    top = os.path.join(real, name)
    fd, created = _enter(root_fd, name, top)
    made: list[
        tuple[tuple[str, ...], int, int, int]
    ] = []  # (components, device, inode, mode) of directories made here
    if created:
        info = os.fstat(fd)
        made.append(((), info.st_dev, info.st_ino, mode))
    stack: list[tuple[tuple[str, ...], int]] = [((), fd)]
    copied = []
    try:
        for rel, (kind, entry_mode, size) in zip(names, stats):
            while stack[-1][0] != rel[:-1]:
                if len(stack) == 1:
                    raise QemuspecError(
                        f"the guest listed {src}/{'/'.join(rel)} but not its directory: "
                        "refusing the copy"
                    )
                os.close(stack.pop()[1])
            parent_fd = stack[-1][1]
            target = os.path.join(top, *rel)
            if (
                os.path.commonpath([top, target]) != top
            ):  # proven by the components; kept as the rule itself
                raise QemuspecError(f"{target} is outside {top}: refusing the copy")
            if kind == "d":
                fd, created = _enter(parent_fd, rel[-1], target)
                if created:
                    info = os.fstat(fd)
                    made.append((rel, info.st_dev, info.st_ino, entry_mode))
                stack.append((rel, fd))
            elif kind == "f":
                guest = src + "/" + "/".join(rel)
                done = read_stream(
                    agent, guest, parent_fd, rel[-1], entry_mode, progress, size, shown=target
                )
                copied.append(
                    {
                        "source": guest,
                        "target": target,
                        "bytes": done,
                        "mode": f"{entry_mode & 0o777:o}",
                    }
                )
            else:
                _warn(
                    f"{src}/{'/'.join(rel)} in the guest: skipped, not a regular file or directory"
                )
    finally:
        for _, fd in stack:
            os.close(fd)
    # modes last, deepest first: a read-only directory would refuse its files
    for rel, device, inode, dir_mode in reversed(made):
        _chmod_made(root_fd, (name, *rel), device, inode, dir_mode)
    return copied


def _chmod_made(root_fd: int, parts: tuple[str, ...], device: int, inode: int, mode: int) -> None:
    """Give a directory this copy made its guest mode (less setuid/setgid/sticky), walking to it with
    O_NOFOLLOW and checking it is still the one made (device and inode): nothing else is chmodded."""
    fds = []
    try:
        fd = root_fd
        for part in parts:
            fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            fds.append(fd)
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) == (device, inode):
            os.fchmod(fd, mode & 0o777)
    finally:
        for opened in fds:
            os.close(opened)
