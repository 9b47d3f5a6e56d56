"""Disk images a machine needs before qemu starts: created when missing, never overwritten.

A new image is written under a temporary name and renamed into place, so an interrupted start
never leaves a half-made image that a later start would take for a good one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from qemuspec.errors import ImageError, LaunchError
from qemuspec.spec.models import Disk

QEMU_IMG = "qemu-img"


def qemu_img(*args: str) -> str:
    try:
        result = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError("qemu-img not found: install it (Debian: apt-get install qemu-utils)") from None
    if result.returncode != 0:
        raise ImageError(f"qemu-img {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def info(path: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", path))


def ensure_disk(disk: Disk) -> bool:
    """Create the disk's image if it is missing; True when one was created."""
    if os.path.exists(disk.file):
        return False
    if disk.size is None and disk.backing is None:
        raise LaunchError(f"disk {disk.file} does not exist: create it, or give the disk a size (and format) so qemuspec creates it")
    fmt = disk.format or "raw"
    args = ["create", "-q", "-f", fmt]
    if disk.backing:
        if not os.path.exists(disk.backing):
            raise LaunchError(f"backing image {disk.backing} of disk {disk.file} does not exist")
        args += ["-b", os.path.abspath(disk.backing), "-F", disk.backing_format or info(disk.backing)["format"]]
    os.makedirs(os.path.dirname(os.path.abspath(disk.file)), exist_ok=True)
    tmp = f"{disk.file}.qemuspec-tmp"
    args.append(tmp)
    if disk.size is not None:
        args.append(str(disk.size))
    try:
        qemu_img(*args)
        os.rename(tmp, disk.file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def ensure_efivars(template: str, target: str) -> None:
    """A per-machine copy of the UEFI variable store, so machines never share (or corrupt) one."""
    if not os.path.exists(target):
        if not os.path.exists(template):
            raise LaunchError(f"UEFI variable template {template} not found: install ovmf (Debian) or set firmware.vars")
        shutil.copyfile(template, target + ".tmp")
        os.replace(target + ".tmp", target)
