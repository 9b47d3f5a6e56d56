"""Checks of a valid definition against this host, before anything starts.

The model says whether a definition is well-formed; these say whether ``up`` could start it here: the
files it names exist, ``accel = "kvm"`` has a /dev/kvm, and the qemu binary is one the user can trust
(``up`` also checks its forwarded host ports, with runtime/sockets.py). Nothing here executes anything
the definition names: it only looks at the file system.
Each problem is a (key path, message) pair that :func:`qemuspec.spec.messages.located` turns into a
file:line paragraph.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    from qemuspec.spec.models import File, Machine

ALLOW_LOCAL_QEMU_ENV = "QEMUSPEC_ALLOW_LOCAL_QEMU"

Problem = tuple[tuple, str]


def host_problems(spec: "File", source: str, names: list[str], allow_local_qemu: bool = False,
                  environ: Mapping[str, str] | None = None) -> list[Problem]:
    env = os.environ if environ is None else environ
    allow_local_qemu = allow_local_qemu or env.get(ALLOW_LOCAL_QEMU_ENV, "") not in ("", "0")
    root = project_root(source)
    problems: list[Problem] = []
    for name in names:
        machine = spec.machines[name]
        at = ("machines", name)
        problems += [(at + path, message) for path, message in _missing_files(machine)]
        accels = [machine.accel] if isinstance(machine.accel, str) else list(machine.accel)
        if accels == ["kvm"] and not env.get("QEMUSPEC_ACCEL") and not os.path.exists("/dev/kvm"):
            problems.append((at + ("accel",), 'accel = "kvm" but this host has no /dev/kvm: use accel = "auto" (kvm when '
                             'usable, else tcg) or "tcg", or run with QEMUSPEC_ACCEL=tcg'))
        problems += [(at + ("qemu",), m) for m in _qemu_problems(machine.qemu, root, allow_local_qemu)]
    return problems


def qemu_path(qemu: str) -> str | None:
    """The absolute binary ``qemu`` names (what ``up`` says it runs), or None when there is none."""
    found = shutil.which(qemu) if os.sep not in qemu else (qemu if os.access(qemu, os.X_OK) else None)
    return os.path.realpath(found) if found else None


def project_root(source: str) -> str:
    """The tree a definition came with: its git checkout, else its directory."""
    here = os.path.dirname(os.path.abspath(source))
    probe = here
    while True:
        if os.path.exists(os.path.join(probe, ".git")):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return here
        probe = parent


def _qemu_problems(qemu: str, root: str, allow_local: bool) -> Iterator[str]:
    path = qemu_path(qemu)
    if path is None:
        yield (f'"{qemu}" is not an executable qemu on this host: install it (Debian: apt-get install qemu-system-x86) '
               'or set qemu = "/path/to/qemu-system-ARCH"')
        return
    inside = os.path.commonpath([path, os.path.realpath(root)]) == os.path.realpath(root)
    # As written: a path relative to the definition (kept un-normalised by the model) or naming a
    # place in its tree is the file's choice even when `../` or a committed symlink leads out of it.
    written = qemu.startswith(os.path.join(root, "")) or qemu.startswith(os.path.join(os.path.realpath(root), ""))
    if (inside or written) and not allow_local:
        where = "inside" if inside else "written relative to"
        yield (f'"{qemu}" is {path}, {where} the definition\'s own tree ({root}): a definition from someone else\'s '
               f"repository could ship any program under that name (or reach one with ../ or a symlink). If you built "
               f"it yourself, allow it for this run with --allow-local-qemu (or {ALLOW_LOCAL_QEMU_ENV}=1); otherwise "
               "use a system qemu by name or absolute path")


def _missing_files(machine: "Machine") -> Iterator[Problem]:
    def missing(path: str | None) -> bool:
        return path is not None and not os.path.exists(path)

    for key in ("kernel", "initrd"):
        if missing(getattr(machine, key)):
            yield (key,), f'{key} file {getattr(machine, key)} does not exist: fix the path (relative paths are relative to the definition file)'
    for key in ("code", "vars"):
        if missing(getattr(machine.firmware, key)):
            yield ("firmware", key), f"firmware {key} {getattr(machine.firmware, key)} does not exist: fix the path, or install ovmf for UEFI"
    for index, disk in enumerate(machine.disks):
        if missing(disk.backing):
            yield ("disks", index, "backing"), f"backing image {disk.backing} does not exist: fix the path"
        if missing(disk.file) and disk.size is None and disk.backing is None:
            yield ("disks", index, "file"), (f"disk image {disk.file} does not exist and has no size to create it with: "
                                             'fix the path, or add size = "10G" (and format = "qcow2") so up creates it')
    for index, iso in enumerate(machine.cdrom):
        if missing(iso):
            yield ("cdrom", index), f"cdrom image {iso} does not exist: fix the path"
    for index, share in enumerate(machine.shares):
        if not os.path.isdir(share.source):
            yield ("shares", index, "source"), f"shared directory {share.source} does not exist: create it or fix the path"
    if machine.cloud_init is not None:
        for key in ("user_data_file", "network_config_file"):
            if missing(getattr(machine.cloud_init, key)):
                yield ("cloud_init", key), f"{key} {getattr(machine.cloud_init, key)} does not exist: fix the path"
