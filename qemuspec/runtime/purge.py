"""`down --purge`: delete what qemuspec created for a machine, and nothing else.

Disk images count only if qemuspec recorded creating them (created.json: path, device, inode) and
the file there is still that very file; an image the user supplied, or one that existed before the
first `up`, stays. The state directory is removed only if it really is a directory of ours (not a
symlink into another tree), and without following symlinks inside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat

from qemuspec.errors import QemuspecError
from qemuspec.runtime import statedir


def _ours(path: str) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise QemuspecError(
            f"{path} is not a directory of yours (a symlink or another user's): --purge deletes nothing there; remove it by hand if you mean to"
        )
    return True


def purge(root: str, name: str) -> list[str]:
    """Delete the machine's recorded disks and its state directory; returns what was deleted."""
    if not _ours(root):
        return []
    state_dir = os.path.join(root, name)
    if not _ours(state_dir):
        return []
    deleted = []
    for path in statedir.created_files(state_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            deleted.append(path)
    shutil.rmtree(
        state_dir, ignore_errors=True
    )  # fd-based on Linux: never follows a symlink inside
    deleted.append(state_dir)
    with contextlib.suppress(OSError):
        os.rmdir(root)  # only when empty
    return deleted
