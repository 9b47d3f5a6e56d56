"""What ``append`` may and may not say, so that what the file's typed fields say is what runs.

qemu takes some switches once (or lets the last one win): ``-m``, ``-smp``, ``-kernel``... When a typed
field or qemuspec itself already renders one of them, the same switch in ``append`` would silently win
over the field that ``plan`` and ``status`` show. That is an error naming both places, unless the
machine lists the switch in ``overrides``: then the renderer leaves its own out and the append wins,
visibly. Ids are checked here too: a definition's ids are unique and never use qemuspec's prefix.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from qemuspec.spec.models import Machine

OWN_ID_PREFIX = "qemuspec-"

# Spellings qemu accepts for one switch.
ALIASES = {
    "-M": "-machine",
    "-nographic": "-display",
    "-enable-kvm": "-accel",
    "-no-kvm": "-accel",
    "-no-acpi": "-machine",
}

Rule = tuple[
    Callable[["Machine"], bool], str, str
]  # (rendered for this machine?, what renders it, fix)


def _visible(m: "Machine") -> bool:
    return m.display.type != "none" and m.display.vga != "default"


RULES: dict[str, Rule] = {
    "-m": (lambda m: True, "memory", 'set memory = "SIZE"'),
    "-smp": (lambda m: m.machine != "none", "cpus", "set cpus = N"),
    "-cpu": (lambda m: m.machine != "none", "cpu", 'set cpu = "MODEL" and cpu_options = { ... }'),
    "-machine": (lambda m: True, "machine", 'set machine = "TYPE" and machine_options = { ... }'),
    "-accel": (
        lambda m: True,
        "accel",
        'set accel = "kvm", "tcg" or "auto", and accel_options = { ... }',
    ),
    "-kernel": (lambda m: m.kernel is not None, "kernel", 'set kernel = "PATH"'),
    "-initrd": (lambda m: m.initrd is not None, "initrd", 'set initrd = "PATH"'),
    "-append": (lambda m: m.cmdline is not None, "cmdline", 'set cmdline = "..."'),
    "-bios": (
        lambda m: m.firmware.type == "uefi" or m.firmware.code is not None,
        "firmware",
        'set firmware = { code = "PATH" }',
    ),
    "-boot": (lambda m: m.boot_order is not None, "boot_order", 'set boot_order = "..."'),
    "-display": (lambda m: True, "display", 'set display = "none", "vnc", "gtk", ...'),
    "-vga": (_visible, "display.vga", 'set display = { type = "...", vga = "..." }'),
}
# Switches only qemuspec may give: they carry its supervision, its monitors and its defaults.
OWNED = {
    "-name": "qemuspec names the machine after its table",
    "-pidfile": "qemuspec keeps the machine's pidfile",
    "-daemonize": "qemuspec supervises qemu itself and needs it in the foreground",
    "-S": "use paused = true",
    "-nodefaults": "qemuspec gives -nodefaults unless defaults = true",
    "-no-user-config": "qemuspec always gives it",
    "-runas": "run qemuspec as the user the machine should run as",
    "-chroot": "not supported under qemuspec",
}
OVERRIDABLE = frozenset(RULES)


def switch(token: str) -> str:
    """The canonical spelling of a switch: ``--m`` is ``-m``, ``-M`` is ``-machine``."""
    name = "-" + token.lstrip("-")
    return ALIASES.get(name, name)


def switches(append: list[str]) -> Iterator[tuple[int, str, str | None]]:
    """(index in append, canonical switch, its argument) for each switch of an append list."""
    from qemuspec.spec.qemuopts import parse_argv

    index = 0
    for name, value in parse_argv(["qemu", *append]):
        if name:
            yield index, switch("-" + name), value
        index += 1 if (not name or value is None) else 2


def conflicts(machine: "Machine") -> list[tuple[str, str]]:
    """(field path, message) for each switch in append that the file already says elsewhere."""
    problems = []
    for index, name, value in switches(machine.append):
        shown = f'"{name}{" " + value if value is not None else ""}"'
        if name in OWNED:
            problems.append(
                (
                    f"append.{index}",
                    f"{shown} cannot be passed through: {OWNED[name]}. Remove it from append",
                )
            )
            continue
        rule = RULES.get(name)
        if rule is None or name in machine.overrides or not rule[0](machine):
            continue
        problems.append(
            (
                f"append.{index}",
                f'{shown} would silently replace what "{rule[1]}" says (qemuspec renders {name} from it): '
                f'{rule[2]} and remove it from append, or add "{name}" to overrides to let append win on purpose',
            )
        )
    return problems


# qemu keeps one id namespace per kind of backend: a netdev and a device may both be "net0" (libvirt,
# Proxmox and OSX-KVM lines do that). Devices and objects are held to one namespace here.
_NAMESPACE = {
    "-device": "device",
    "-object": "device",
    "-chardev": "chardev",
    "-netdev": "netdev",
    "-drive": "block",
    "-blockdev": "block",
    "-fsdev": "fsdev",
    "-mon": "monitor",
    "-audiodev": "audiodev",
}


def user_ids(machine: "Machine") -> Iterator[tuple[str, str, str]]:
    """(field path, id, namespace) for every id a definition gives: disks, devices, objects, append."""
    for index, disk in enumerate(machine.disks):
        if disk.id:
            yield f"disks.{index}.id", disk.id, "block"
    for index, dev in enumerate(machine.devices):
        if dev.id:
            yield f"devices.{index}.id", dev.id, "device"
    for index, obj in enumerate(machine.objects):
        yield f"objects.{index}.id", obj.id, "device"
    for index, sw, value in switches(machine.append):
        if value is None or sw not in _NAMESPACE:
            continue
        for key in ("id", "node-name"):
            for found in _option_values(value, key):
                yield f"append.{index + 1}", found, _NAMESPACE[sw]


def id_problems(machine: "Machine") -> list[tuple[str, str]]:
    problems = []
    typed_options: list[tuple[str, Sequence[object], tuple[str, ...]]] = [
        ("disks", machine.disks, ("options", "device_options")),
        ("nics", machine.nics, ("options", "device_options")),
        ("shares", machine.shares, ("options",)),
        ("devices", machine.devices, ("options",)),
        ("objects", machine.objects, ("options",)),
    ]
    for field, items, maps in typed_options:
        for index, item in enumerate(items):
            for attr in maps:
                if "id" in getattr(item, attr):
                    problems.append(
                        (
                            f"{field}.{index}.{attr}.id",
                            f'"id" is given by qemuspec{" (use the id field)" if field in ("devices", "objects", "disks") else ""}: remove it from {attr}',
                        )
                    )
    seen: dict[tuple[str, str], str] = {}
    for where, ident, namespace in user_ids(machine):
        if ident.startswith(OWN_ID_PREFIX):
            problems.append(
                (
                    where,
                    f'the id "{ident}" starts with "{OWN_ID_PREFIX}", which qemuspec keeps for its own monitors, console, disks and NICs: rename it',
                )
            )
        elif (namespace, ident) in seen:
            problems.append(
                (
                    where,
                    f'the id "{ident}" is already used at {seen[namespace, ident]}: ids must be unique, rename one of them',
                )
            )
        else:
            seen[namespace, ident] = where
    return problems


def _option_values(value: str, key: str) -> list[str]:
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return []
        found = data.get(key) if isinstance(data, dict) else None
        return [found] if isinstance(found, str) else []
    from qemuspec.spec.qemuopts import split_opts

    return [v for k, v in split_opts(value, implied="")[1] if k == key]
