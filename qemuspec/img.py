"""A qemu-img wrapper: typed results, the project's own errors, progress for long work.

    from qemuspec import img
    img.create("disk.qcow2", "10G")
    img.create("overlay.qcow2", backing="base.qcow2")
    info = img.info("overlay.qcow2")          # ImageInfo(format="qcow2", virtual_size=..., backing=...)
    img.convert("disk.qcow2", "disk.raw", "raw", progress=print)

qemu-img is always run without a shell, with its arguments as a list.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterator

from qemuspec.errors import ImageError


def qemu_img() -> str:
    """The qemu-img binary ($QEMUSPEC_QEMU_IMG, read once by qemuspec.settings)."""
    from qemuspec.settings import current

    return current().qemu_img


_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    vm_state_size: int
    date_sec: int


@dataclass(frozen=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    backing: str | None = None
    backing_format: str | None = None
    dirty: bool = False
    snapshots: list[Snapshot] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict) -> "ImageInfo":
        return cls(
            filename=data.get("filename", ""),
            format=data.get("format", ""),
            virtual_size=int(data.get("virtual-size", 0)),
            actual_size=data.get("actual-size"),
            backing=data.get("full-backing-filename") or data.get("backing-filename"),
            backing_format=data.get("backing-filename-format"),
            dirty=bool(data.get("dirty-flag", False)),
            snapshots=[
                Snapshot(
                    s.get("id", ""),
                    s.get("name", ""),
                    int(s.get("vm-state-size", 0)),
                    int(s.get("date-sec", 0)),
                )
                for s in data.get("snapshots", [])
            ],
            raw=data,
        )

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "raw"}
        out["snapshots"] = [s.__dict__ for s in self.snapshots]
        return out


# Images hold the guest's data: qemu-img creates them with the process umask, so every image
# qemuspec makes (declared disks, overlays, `run`'s and warm restores' overlays, converts) is 0600.
IMAGE_UMASK = 0o077


def run(*args: str, progress: Callable[[float], None] | None = None) -> str:
    """Run qemu-img; its stdout, or :class:`ImageError` with qemu-img's own message."""
    argv = [qemu_img(), *args]
    try:
        if progress is None:
            result = subprocess.run(argv, capture_output=True, text=True, umask=IMAGE_UMASK)
            out, err, code = result.stdout, result.stderr, result.returncode
        else:
            out, err, code = _with_progress(argv, progress)
    except FileNotFoundError:
        raise ImageError(
            "qemu-img not found: install it (Debian: apt-get install qemu-utils)"
        ) from None
    if code != 0:
        message = (err or out).strip().removeprefix("qemu-img: ")
        raise ImageError(f"qemu-img {args[0]} failed: {message}")
    return out


def _with_progress(argv: list[str], progress: Callable[[float], None]) -> tuple[str, str, int]:
    """qemu-img -p writes "(12.34/100%)" with carriage returns; report each new percentage."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, umask=IMAGE_UMASK)
    assert proc.stdout is not None and proc.stderr is not None
    buffer = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
        if not chunk:
            break
        buffer += chunk
        for match in _PROGRESS.finditer(buffer):
            progress(float(match.group(1)))
        buffer = buffer[-32:]
    err = proc.stderr.read().decode(errors="replace")
    return "", err, proc.wait()


def create(
    path: str,
    size: int | str | None = None,
    format: str = "qcow2",
    backing: str | None = None,
    backing_format: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """A new image, written under a temporary name and renamed: never a half-made file at ``path``.
    An existing ``path`` is an error, never overwritten."""
    if os.path.exists(path):
        raise ImageError(
            f"{path} exists already: qemuspec never overwrites an image (delete it first, or use resize)"
        )
    args = ["create", "-q", "-f", format]
    if backing:
        if not os.path.exists(backing):
            raise ImageError(f"backing image {backing} does not exist")
        args += ["-b", os.path.abspath(backing), "-F", backing_format or info(backing).format]
    for key, value in (options or {}).items():
        args += ["-o", f"{key}={value}"]
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with _private_tmp(parent) as tmp:
        args.append(tmp)
        if size is not None:
            args.append(str(size))
        run(*args)
        _publish(tmp, path)


@contextlib.contextmanager
def _private_tmp(parent: str) -> Iterator[str]:
    """A temporary name inside a fresh 0700 directory (mkdtemp: O_EXCL, unpredictable): qemu-img opens
    it by path, and no planted file or symlink can be waiting there."""
    import shutil
    import tempfile

    workdir = tempfile.mkdtemp(prefix=".qemuspec-", dir=parent)
    try:
        yield os.path.join(workdir, "image")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _publish(tmp: str, path: str) -> None:
    """Move the finished image into place without replacing anything that appeared meanwhile."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ImageError(
            f"{path} exists already: qemuspec never overwrites an image (delete it first, or use resize)"
        ) from None
    except OSError:
        os.rename(tmp, path)  # a filesystem without hard links


def info(path: str) -> ImageInfo:
    """Image facts from ``qemu-img info --output=json`` (-U: readable while a VM uses the image)."""
    return ImageInfo.from_json(json.loads(run("info", "--output=json", "-U", path)))


def check(path: str) -> dict:
    """``qemu-img check``'s JSON report; raises when the image has errors."""
    result = subprocess.run(
        [qemu_img(), "check", "--output=json", path], capture_output=True, text=True
    )
    if result.returncode not in (0, 1, 2, 3) or not result.stdout.strip():
        raise ImageError(f"qemu-img check failed: {result.stderr.strip()}")
    report = json.loads(result.stdout)
    if result.returncode in (1, 2):
        raise ImageError(
            f"{path} has errors: {report.get('corruptions', 0)} corruptions, {report.get('leaks', 0)} leaks"
        )
    return report


def convert(
    source: str,
    target: str,
    format: str,
    progress: Callable[[float], None] | None = None,
    compress: bool = False,
) -> None:
    if os.path.exists(target):
        raise ImageError(f"{target} exists already: qemuspec never overwrites an image")
    args = ["convert", "-O", format]
    if compress:
        args.append("-c")
    if progress is not None:
        args.append("-p")
    parent = os.path.dirname(os.path.abspath(target))
    with _private_tmp(parent) as tmp:
        run(*args, source, tmp, progress=progress)
        _publish(tmp, target)


def resize(path: str, size: int | str, shrink: bool = False) -> None:
    args = ["resize", "-q"] + (["--shrink"] if shrink else []) + [path, str(size)]
    run(*args)


def rebase(
    path: str, backing: str, backing_format: str | None = None, unsafe: bool = False
) -> None:
    args = [
        "rebase",
        "-q",
        "-b",
        os.path.abspath(backing),
        "-F",
        backing_format or info(backing).format,
    ]
    if unsafe:
        args.append("-u")
    run(*args, path)


def snapshot(path: str, action: str, tag: str | None = None) -> list[Snapshot] | None:
    """Internal snapshots of a stopped image: action is list, create, apply or delete."""
    if action == "list":
        return info(path).snapshots
    flag = {"create": "-c", "apply": "-a", "delete": "-d"}.get(action)
    if flag is None or not tag:
        raise ImageError(f"snapshot {action}: use list, or create/apply/delete with a tag")
    run("snapshot", flag, tag, path)
    return None
