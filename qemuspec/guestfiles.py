"""Files in and out of a guest through its guest agent, streamed.

The agent moves file contents as base64 in JSON messages, one ``guest-file-read``/``-write`` per
chunk. Reading the local file (or writing it) chunk by chunk keeps memory flat whatever the size;
modes travel with ``stat``/``chmod`` run through ``guest-exec``, and directories with ``find`` and
``mkdir -p`` there (busybox has them all).
"""

from __future__ import annotations

import base64
import os
import stat
from typing import TYPE_CHECKING, Callable

from qemuspec.errors import QemuspecError

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent

CHUNK = 1024 * 1024  # bytes per agent message: ~1.4 MB of base64, far below qemu-ga's message limit
Progress = Callable[[str, int, "int | None"], None]
PROGRESS_FROM = 8 * 1024 * 1024  # smaller files are done before a bar would be worth drawing


def _run(agent: "GuestAgent", argv: list[str]) -> str:
    code, out, err = agent.exec(argv, timeout=60)
    if code != 0:
        raise QemuspecError(f"in the guest, {' '.join(argv)} failed ({code}): {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


def _is_guest_dir(agent: "GuestAgent", path: str) -> bool:
    code, _, _ = agent.exec(["test", "-d", path], timeout=30)
    return code == 0


def write_stream(agent: "GuestAgent", local: str, guest: str, progress: Progress | None = None) -> int:
    """Stream one local file into ``guest`` (created or replaced); returns the bytes written."""
    total = os.path.getsize(local)
    handle = agent.command("guest-file-open", {"path": guest, "mode": "w"})
    done = 0
    try:
        with open(local, "rb") as f:
            while chunk := f.read(CHUNK):
                agent.command("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()}, timeout=60)
                done += len(chunk)
                if progress and total >= PROGRESS_FROM:
                    progress(local, done, total)
    finally:
        agent.command("guest-file-close", {"handle": handle})
    return done


def read_stream(agent: "GuestAgent", guest: str, local: str, progress: Progress | None = None, total: int | None = None) -> int:
    """Stream ``guest`` into a local file, written under a temporary name and renamed when complete."""
    handle = agent.command("guest-file-open", {"path": guest, "mode": "r"})
    done = 0
    tmp = local + ".qemuspec-tmp"
    try:
        with open(tmp, "wb") as f:
            while True:
                result = agent.command("guest-file-read", {"handle": handle, "count": CHUNK}, timeout=60)
                data = base64.b64decode(result.get("buf-b64", ""))
                f.write(data)
                done += len(data)
                if progress and (total or 0) >= PROGRESS_FROM:
                    progress(local, done, total)
                if result.get("eof") or not result.get("count"):
                    break
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        agent.command("guest-file-close", {"handle": handle})
    return done


def copy_to_guest(agent: "GuestAgent", source: str, dest: str, recursive: bool = False, progress: Progress | None = None) -> list[dict]:
    """Copy a local file (or, with ``recursive``, a directory tree) to ``dest`` in the guest, modes kept.
    Like cp: into ``dest`` when it is a directory in the guest."""
    if not os.path.exists(source):
        raise QemuspecError(f"{source}: no such file")
    if _is_guest_dir(agent, dest):
        dest = dest.rstrip("/") + "/" + os.path.basename(source.rstrip("/"))
    copied = []
    if os.path.isdir(source):
        if not recursive:
            raise QemuspecError(f"{source} is a directory: add -r")
        for top, dirs, files in os.walk(source):
            rel = os.path.relpath(top, source)
            gdir = dest if rel == "." else f"{dest}/{rel}"
            _run(agent, ["mkdir", "-p", gdir])
            _run(agent, ["chmod", f"{stat.S_IMODE(os.stat(top).st_mode):o}", gdir])
            for name in sorted(files):
                path = os.path.join(top, name)
                copied.append(_put(agent, path, f"{gdir}/{name}", progress))
        return copied
    return [_put(agent, source, dest, progress)]


def _put(agent: "GuestAgent", local: str, guest: str, progress: Progress | None) -> dict:
    size = write_stream(agent, local, guest, progress)
    mode = stat.S_IMODE(os.stat(local).st_mode)
    _run(agent, ["chmod", f"{mode:o}", guest])
    return {"source": local, "target": guest, "bytes": size, "mode": f"{mode:o}"}


def _guest_entries(agent: "GuestAgent", path: str) -> list[tuple[str, int, int, str]]:
    """(kind, mode, size, path) of everything under ``path`` in the guest: kind "d", "f" or "?"."""
    out = _run(agent, ["find", path, "-exec", "stat", "-c", "%f %s %n", "{}", "+"])
    entries = []
    for line in out.splitlines():
        raw_mode, size, name = line.split(" ", 2)
        mode = int(raw_mode, 16)
        kind = "d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode) else "?"
        entries.append((kind, stat.S_IMODE(mode), int(size), name))
    return entries


def copy_from_guest(agent: "GuestAgent", source: str, dest: str, recursive: bool = False, progress: Progress | None = None) -> list[dict]:
    """Copy a guest file (or, with ``recursive``, a directory tree) to ``dest`` here, modes kept."""
    entries = _guest_entries(agent, source)
    if not entries:
        raise QemuspecError(f"{source}: no such file in the guest")
    root_kind = entries[0][0]
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(source.rstrip("/")))
    if root_kind == "d" and not recursive:
        raise QemuspecError(f"{source} is a directory in the guest: add -r")
    copied = []
    for kind, mode, size, name in entries:
        rel = os.path.relpath(name, source)
        local = dest if rel == "." else os.path.join(dest, rel)
        if kind == "d":
            os.makedirs(local, exist_ok=True)
            os.chmod(local, mode | 0o700)
        elif kind == "f":
            done = read_stream(agent, name, local, progress, size)
            os.chmod(local, mode)
            copied.append({"source": name, "target": local, "bytes": done, "mode": f"{mode:o}"})
    for kind, mode, _, name in entries:  # directories' own modes last: a read-only one would refuse its files
        rel = os.path.relpath(name, source)
        if kind == "d":
            os.chmod(dest if rel == "." else os.path.join(dest, rel), mode)
    return copied
