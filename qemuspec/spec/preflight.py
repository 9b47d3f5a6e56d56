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
import stat
from typing import TYPE_CHECKING, Iterator, Mapping, NamedTuple

from qemuspec.spec import limits

if TYPE_CHECKING:
    from qemuspec.spec.models import File, Machine

ALLOW_LOCAL_QEMU_ENV = "QEMUSPEC_ALLOW_LOCAL_QEMU"
ALLOW_HOST_PATHS_ENV = "QEMUSPEC_ALLOW_HOST_PATHS"
# Device nodes a VM may read without an opt-in: entropy and nothing.
HARMLESS_DEVICES = frozenset({"/dev/urandom", "/dev/random", "/dev/null"})

Problem = tuple[tuple, str]


def host_problems(
    spec: "File",
    source: str,
    names: list[str],
    allow_local_qemu: bool = False,
    environ: Mapping[str, str] | None = None,
    allow_host_paths: bool = False,
) -> list[Problem]:
    """``environ``: the settings' environment form (Settings.var_environ; the caller's, never the process's)."""
    env = environ or {}
    allow_local_qemu = allow_local_qemu or env.get(ALLOW_LOCAL_QEMU_ENV, "") not in ("", "0")
    root = project_root(source)
    problems: list[Problem] = []
    for name in names:
        machine = spec.machines[name]
        at = ("machines", name)
        problems += [(at + path, message) for path, message in _missing_files(machine)]
        problems += [(at + path, message) for path, message in _unbootable(machine, name)]
        problems += [(at + path, message) for path, message in _memory(machine)]
        accels = [machine.accel] if isinstance(machine.accel, str) else list(machine.accel)
        if accels == ["kvm"] and not env.get("QEMUSPEC_ACCEL") and (why := _kvm_missing()):
            problems.append(
                (
                    at + ("accel",),
                    f'accel = "kvm" but {why}: use accel = "auto" (kvm when '
                    'usable, else tcg) or "tcg", or run with QEMUSPEC_ACCEL=tcg',
                )
            )
        problems += [
            (at + ("qemu",), m) for m in _qemu_problems(machine.qemu, root, allow_local_qemu)
        ]
    return problems + host_path_problems(spec, source, names, allow_host_paths, env)


def missing_files(spec: "File", names: list[str]) -> list[Problem]:
    """The files a machine reads from this host that do not exist (also for a libvirt host, which gets uploads)."""
    return [
        (("machines", name) + path, message)
        for name in names
        for path, message in _missing_files(spec.machines[name])
    ]


def host_path_problems(
    spec: "File",
    source: str,
    names: list[str],
    allow: bool = False,
    environ: Mapping[str, str] | None = None,
) -> list[Problem]:
    """The host paths outside the tree that need the user's opt-in (see :func:`host_paths`), unless given."""
    env = environ or {}
    if allow or env.get(ALLOW_HOST_PATHS_ENV, "") not in ("", "0"):
        return []
    root = project_root(source)
    return [
        (("machines", name) + path.key, path.refusal(root))
        for name in names
        for path in host_paths(spec.machines[name], root)
        if path.needs_opt_in
    ]


class HostPath(NamedTuple):
    """A host path outside the definition's tree that the VM can use: where the definition names it,
    the path, what the guest can do with it, and whether the user must allow it."""

    key: tuple
    path: str
    access: str  # "read", "read-write", "passed to qemu"
    kind: str  # "file", "directory", "device", "missing"
    needs_opt_in: bool

    def refusal(self, root: str) -> str:
        what = {"device": "a device node", "directory": "a directory"}.get(self.kind, "a file")
        can = "read and write" if self.access == "read-write" else "use"
        return (
            f"{self.path} is {what} outside the definition's tree ({root}) that the guest can {can}: a definition "
            "from someone else's repository could hand the guest any host file, directory or device this way. If "
            f"you mean it, allow it for this run with --allow-host-paths (or {ALLOW_HOST_PATHS_ENV}=1); otherwise "
            "use a path inside the tree"
            + (
                " or readonly = true"
                if self.access == "read-write" and self.kind != "directory"
                else ""
            )
        )


def _inside(path: str, root: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


def _kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "device"


def _passed_paths(machine: "Machine") -> Iterator[tuple[tuple, str]]:
    """Absolute paths in option maps and ``append`` (qemu reads what they name; best effort: a value
    that starts with ``/``, or a ``key=/path`` part of a switch's argument)."""
    maps: list[tuple[tuple, dict]] = [(("machine_options",), machine.machine_options)]
    maps += [(("disks", i, "options"), d.options) for i, d in enumerate(machine.disks)]
    maps += [(("nics", i, "options"), n.options) for i, n in enumerate(machine.nics)]
    maps += [(("shares", i, "options"), s.options) for i, s in enumerate(machine.shares)]
    maps += [(("devices", i, "options"), d.options) for i, d in enumerate(machine.devices)]
    maps += [(("objects", i, "options"), o.options) for i, o in enumerate(machine.objects)]
    for key, options in maps:
        for name, value in options.items():
            if isinstance(value, str) and value.startswith("/"):
                yield key + (name,), value
    for index, word in enumerate(machine.append):
        for part in word.replace('"', ",").split(","):
            value = part.partition("=")[2] if "=" in part else part
            if value.startswith("/"):
                yield ("append", index), value


def host_paths(machine: "Machine", root: str) -> list[HostPath]:
    """Every host path outside ``root`` the machine's VM can read or write (``validate``, ``render`` and
    ``up`` list them). Shares and writable disks outside the tree, and device nodes, need the user's
    opt-in (``--allow-host-paths``): a definition cannot give it to itself."""
    named: list[tuple[tuple, str | None, str]] = [
        (("kernel",), machine.kernel, "read"),
        (("initrd",), machine.initrd, "read"),
        (("firmware", "code"), machine.firmware.code, "read"),
        (("firmware", "vars"), machine.firmware.vars, "read"),
    ]
    for index, disk in enumerate(machine.disks):
        named.append(
            (("disks", index, "file"), disk.file, "read" if disk.readonly else "read-write")
        )
        named.append((("disks", index, "backing"), disk.backing, "read"))
        if disk.image is not None and disk.image.url.lower().startswith(
            "file://"
        ):  # copied into the image cache
            from urllib.parse import unquote, urlsplit

            named.append(
                (("disks", index, "image", "url"), unquote(urlsplit(disk.image.url).path), "read")
            )
    named += [(("cdrom", index), iso, "read") for index, iso in enumerate(machine.cdrom)]
    named += [
        (("shares", index, "source"), share.source, "read" if share.readonly else "read-write")
        for index, share in enumerate(machine.shares)
    ]
    if machine.cloud_init is not None:
        named += [
            (("cloud_init", key), getattr(machine.cloud_init, key), "read")
            for key in ("user_data_file", "network_config_file")
        ]
    if (script := getattr(machine.provision, "script", None)) is not None:
        named.append((("provision", "script"), script, "read"))
    named += [(key, path, "passed to qemu") for key, path in _passed_paths(machine)]
    out = []
    for key, path, access in named:
        if path is None or _inside(path, root):
            continue
        kind = _kind(path)
        # A cloud-init file that is not a regular file is refused outright (_missing_files).
        device = (
            kind == "device"
            and os.path.realpath(path) not in HARMLESS_DEVICES
            and key[0] not in ("cloud_init", "provision")
        )
        typed = access != "passed to qemu"
        share = key[0] == "shares" and typed
        # a file:// image outside the tree is copied into the cache, and a mismatch prints its digest
        image = key[0] == "disks" and "image" in key
        opt_in = (
            device or image or (typed and (share or (key[0] == "disks" and access == "read-write")))
        )
        out.append(HostPath(key, path, access, kind, opt_in))
    return out


def qemu_path(qemu: str) -> str | None:
    """The absolute binary ``qemu`` names (what ``up`` says it runs), or None when there is none."""
    found = (
        shutil.which(qemu) if os.sep not in qemu else (qemu if os.access(qemu, os.X_OK) else None)
    )
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
        yield (
            f'"{qemu}" is not an executable qemu on this host: install it (Debian: apt-get install qemu-system-x86) '
            'or set qemu = "/path/to/qemu-system-ARCH"'
        )
        return
    inside = os.path.commonpath([path, os.path.realpath(root)]) == os.path.realpath(root)
    # As written: a path relative to the definition (kept un-normalised by the model) or naming a
    # place in its tree is the file's choice even when `../` or a committed symlink leads out of it.
    written = qemu.startswith(os.path.join(root, "")) or qemu.startswith(
        os.path.join(os.path.realpath(root), "")
    )
    if (inside or written) and not allow_local:
        where = "inside" if inside else "written relative to"
        yield (
            f"\"{qemu}\" is {path}, {where} the definition's own tree ({root}): a definition from someone else's "
            f"repository could ship any program under that name (or reach one with ../ or a symlink). If you built "
            f"it yourself, allow it for this run with --allow-local-qemu (or {ALLOW_LOCAL_QEMU_ENV}=1); otherwise "
            "use a system qemu by name or absolute path"
        )


def _empty(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _kvm_missing() -> str | None:
    """Why this host has no KVM for us, from the device alone (``up`` and ``validate --probe`` also start
    qemu on it without a guest: runtime/capabilities.py kvm_failure)."""
    if not os.path.exists("/dev/kvm"):
        return "this host has no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "this user cannot open /dev/kvm (join the kvm group)"
    return None


def _memory(machine: "Machine") -> Iterator[Problem]:
    """More memory than the host has: qemu would fail to allocate it or the host would swap to a halt."""
    try:
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (ValueError, OSError):
        return
    if host and machine.memory > host:
        from qemuspec.spec.units import format_bytes

        yield (
            ("memory",),
            (
                f"memory = {format_bytes(machine.memory << 20)} is more than this host has "
                f'({host} MiB of RAM): lower it, for example memory = "{max(64, host // 4)}M"'
            ),
        )


def _unbootable(machine: "Machine", name: str) -> Iterator[Problem]:
    """A machine that waits for a sign of life from a guest it cannot boot: no kernel, no cdrom, no disk
    holding anything yet (a disk ``up`` creates is blank), no network boot and nothing in ``append`` or
    ``devices`` that could carry a boot image. It would only wait out its readiness timeout."""
    ready = machine.ready
    if (
        not (ready.serial or ready.tcp or ready.ssh or ready.agent or ready.command)
        or machine.paused
        or machine.machine == "none"
    ):
        return
    if (
        machine.kernel
        or machine.cdrom
        or machine.firmware.code
        or machine.append
        or machine.devices
    ):
        return
    if any(
        os.path.exists(d.file) or d.backing or d.image for d in machine.disks
    ):  # an image: a base with an OS
        return
    if machine.boot_order and "n" in machine.boot_order and machine.nics:
        return
    blank = [d.file for d in machine.disks]
    what = (
        f"its only disk{'s' if len(blank) > 1 else ''} ({', '.join(blank)}) would be created blank by up"
        if blank
        else "it has no kernel, disk or cdrom"
    )
    yield (
        (),
        (
            f"machine {name} has nothing to boot: {what}, so the guest can never pass its readiness probe. Fill in "
            'kernel = "path/to/vmlinuz" (with initrd and cmdline), or cdrom = "installer.iso" with '
            'boot_order = "dc", '
            "or point disks[0].file at an image that has an OS"
        ),
    )


def _missing_files(machine: "Machine") -> Iterator[Problem]:
    def missing(path: str | None) -> bool:
        return path is not None and not os.path.exists(path)

    for key in ("kernel", "initrd"):
        path = getattr(machine, key)
        if missing(path):
            yield (
                (key,),
                (
                    f"{key} file {path} does not exist: fix the path (relative paths are relative to the "
                    "definition file)"
                ),
            )
        elif path is not None and os.path.isdir(path):
            inside = os.path.join(path, "vmlinuz" if key == "kernel" else "initrd.img")
            yield (
                (key,),
                f"{key} {path} is a directory: name the {key} file in it (for example {inside})",
            )
        elif key == "kernel" and path is not None and _empty(path):
            yield (
                (key,),
                f"kernel file {path} is empty: a build or download did not finish; rebuild it or fix the path",
            )
    for key in ("code", "vars"):
        if missing(getattr(machine.firmware, key)):
            yield (
                ("firmware", key),
                f"firmware {key} {getattr(machine.firmware, key)} does not exist: fix the path, or install ovmf for UEFI",
            )
    for index, disk in enumerate(machine.disks):
        if missing(disk.backing):
            yield (
                ("disks", index, "backing"),
                f"backing image {disk.backing} does not exist: fix the path",
            )
        if missing(disk.file) and disk.size is None and disk.backing is None and disk.image is None:
            yield (
                ("disks", index, "file"),
                (
                    f"disk image {disk.file} does not exist and has no size to create it with: "
                    'fix the path, or add size = "10G" (and format = "qcow2") so up creates it'
                ),
            )
    for index, iso in enumerate(machine.cdrom):
        if missing(iso):
            yield ("cdrom", index), f"cdrom image {iso} does not exist: fix the path"
    for index, share in enumerate(machine.shares):
        if not os.path.isdir(share.source):
            yield (
                ("shares", index, "source"),
                f"shared directory {share.source} does not exist: create it or fix the path",
            )
    if machine.cloud_init is not None:
        for key in ("user_data_file", "network_config_file"):
            path = getattr(machine.cloud_init, key)
            if missing(path):
                yield ("cloud_init", key), f"{key} {path} does not exist: fix the path"
            elif path is not None and (problem := limits.source_file_problem(path)):
                yield ("cloud_init", key), problem
    if (script := getattr(machine.provision, "script", None)) is not None:
        if missing(script):
            yield (
                ("provision", "script"),
                f"provisioning script {script} does not exist: fix the path",
            )
        elif problem := limits.source_file_problem(script):
            yield ("provision", "script"), problem
