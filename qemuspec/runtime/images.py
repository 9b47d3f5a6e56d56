"""Disk images a machine needs before qemu starts: created when missing, never overwritten, never
resized behind the user's back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import os
import shutil

from qemuspec import img
from qemuspec.errors import ImageError, LaunchError

if TYPE_CHECKING:
    from qemuspec.imagecache import ImageCache
    from qemuspec.spec.models import Disk


def ensure_disk(disk: Disk, state_dir: str | None = None, images: ImageCache | None = None) -> bool:
    """Create the disk's image if it is missing (True then). An existing image smaller than the
    declared size is an error that names the fix, not a silent resize. A disk with an ``image`` gets
    its base from the image cache first (no network when it is there; `up` pulls it before anything
    starts, with progress) and is a new qcow2 overlay on it: the cached base is only ever a backing
    file, which qemu opens read-only."""
    if disk.image is not None:
        if images is None:
            from qemuspec.imagecache import from_settings
            from qemuspec.settings import current

            images = from_settings(current())
        base = images.ensure(disk.image)
        if not os.path.exists(disk.file):
            size = disk.size
            if size is not None:
                virtual = img.info(base.path).virtual_size
                if size < virtual:
                    raise LaunchError(
                        f"disk {disk.file}: size {size} is smaller than its base image ({virtual} bytes, "
                        f"{disk.image.url}): remove size, or give at least {virtual}"
                    )
            try:
                img.create(disk.file, size, "qcow2", backing=base.path, backing_format=base.format)
            except ImageError as exc:
                raise LaunchError(
                    f"cannot create the overlay {disk.file} on {base.path}: {exc}"
                ) from None
            if state_dir is not None:
                from qemuspec.runtime.statedir import note_created

                note_created(state_dir, disk.file)
            return True
    if os.path.exists(disk.file):
        if disk.size is not None:
            have = img.info(disk.file).virtual_size
            if have < disk.size:
                raise LaunchError(
                    f"disk {disk.file} is {have} bytes but the definition says {disk.size}: qemuspec never resizes "
                    f"silently; run `qemuspec img resize {disk.file} {disk.size}` or change the size"
                )
        return False
    if disk.size is None and disk.backing is None:
        raise LaunchError(
            f"disk {disk.file} does not exist: create it, or give the disk a size (and format) so qemuspec creates it"
        )
    try:
        img.create(
            disk.file,
            disk.size,
            disk.format or "raw",
            backing=disk.backing,
            backing_format=disk.backing_format,
        )
    except ImageError as exc:
        raise LaunchError(f"cannot create disk {disk.file}: {exc}") from None
    if state_dir is not None:  # what `down --purge` may delete: only files recorded here
        from qemuspec.runtime.statedir import note_created

        note_created(state_dir, disk.file)
    return True


def reset_overlays(disks: list[Disk], state_dir: str, where: str) -> list[str]:
    """Throw away overlays' changes: a new empty overlay on the same base for each disk with a
    ``backing``. A definition can name any file as an overlay, so an existing one is replaced only if
    qemuspec recorded creating that very file (created.json: path, device, inode); all are checked
    before any is touched. ``where`` names the machine in errors ("FILE: machines.NAME")."""
    from qemuspec.runtime.statedir import created_files

    overlays = [
        (index, disk) for index, disk in enumerate(disks) if disk.backing or disk.image is not None
    ]
    ours = set(created_files(state_dir))
    for index, disk in overlays:
        if os.path.lexists(disk.file) and os.path.abspath(disk.file) not in ours:
            raise LaunchError(
                f"{where}.disks.{index}.file: {disk.file} is not an overlay qemuspec created for "
                "this machine (created.json does not record this very file), so `reset` leaves it "
                "alone: if it really is a throwaway overlay, delete it yourself and `qemuspec up` "
                "makes a fresh one"
            )
    for _index, disk in overlays:
        if os.path.lexists(disk.file):
            os.unlink(disk.file)
        ensure_disk(disk, state_dir)
    return [disk.file for _index, disk in overlays]


def ensure_efivars(template: str, target: str) -> None:
    """A per-machine copy of the UEFI variable store, so machines never share (or corrupt) one."""
    if not os.path.exists(target):
        if not os.path.exists(template):
            raise LaunchError(
                f"UEFI variable template {template} not found: install ovmf (Debian) or set firmware.vars"
            )
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".efivars-", dir=os.path.dirname(target))  # O_EXCL, 0600
        try:
            with open(template, "rb") as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
