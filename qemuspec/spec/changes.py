"""What a changed definition field costs a running machine: the one table of field -> class.

``live``: applied to the running machine, no reboot: to the supervisor alone (fields only it and the
CLI read: restart policy, stop timeout, readiness, dependencies, provisioning, ssh) or to qemu over
QMP (forwards, a NIC's link, disks added or removed, cdrom media, memory through a balloon, paused;
``runtime/live.py`` does those and checks each by asking qemu). ``restart``: qemu is stopped and
started again on the same disks, their contents kept (anything qemu only takes on its command line:
machine type, CPUs, kernel, devices...). ``recreate``: disks or seeds are rebuilt before the start (a
disk's size, backing, format or base image; the cloud-init seed, which a guest reads on its first
boot only; a move to another libvirt host).

A machine's class is the strongest of its fields' (live < restart < recreate). The table works on
the definition as ``model_dump(mode="json")`` gives it (what ``definition.json`` records), so it needs
no pydantic and answers for a cached ``plan``. Lists are matched as what they are: disks by their
``file`` (one added or removed is live, the others untouched), forwards as a set, cdroms by position
(same count: a media change), NICs by position. docs/live.md explains each row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LIVE, RESTART, RECREATE = "live", "restart", "recreate"
STRENGTH = {LIVE: 0, RESTART: 1, RECREATE: 2}

# Top-level fields only the supervisor (or the CLI) reads: a change reaches no qemu.
SUPERVISOR = {
    "restart": "the supervisor's restart policy",
    "stop_timeout": "how long the supervisor lets ACPI take at the next stop",
    "ready": "readiness probes run at the next start; a running machine is ready already",
    "depends_on": "start order, decided by `up` across machines",
    "provision": "run once per machine life; `qemuspec provision` runs it again",
    "ssh": "how the CLI logs in (user, guest port)",
}
# Fields qemu takes over QMP while it runs (runtime/live.py applies them).
QEMU_LIVE = {
    "paused": "stop / cont",
    "nics.forwards": "hostfwd_add / hostfwd_remove",
    "nics.link": "set_link",
    "disks+": "blockdev-add + device_add (a disk added)",
    "disks-": "device_del, DEVICE_DELETED, blockdev-del (a disk removed)",
    "cdrom": "blockdev-change-medium (same number of cdrom drives)",
    "memory": "balloon, up to the size the machine booted with (needs balloon)",
}
# Disk fields that mean a different image: the disk is made again.
DISK_RECREATE = {"size", "backing", "backing_format", "image", "format"}
# Top-level fields that rebuild something before the start.
TOP_RECREATE = {
    "cloud_init": "the NoCloud seed is rebuilt, and a guest reads it on its first boot only",
    "host": "the machine moves to another libvirt host (or from / to this one)",
}


@dataclass
class Change:
    """One changed field: dotted path as ``plan`` shows it, old and new values, its class, how it is
    applied (``by``: "supervisor", "qemu", or "start" for a restart or recreate) and why."""

    field: str
    old: object
    new: object
    cls: str
    by: str
    why: str

    def as_dict(self) -> dict:
        data = asdict(self)
        data["class"] = data.pop("cls")
        return data


def field_changes(old: object, new: object, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, old value, new value) for every leaf that differs between two definitions."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, object, object]] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += field_changes(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            c for i, (a, b) in enumerate(zip(old, new)) for c in field_changes(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [(path, old, new)]


def strongest(classes: list[str]) -> str:
    """The class of a machine: its strongest field's (live when nothing changed)."""
    return max(classes, key=STRENGTH.__getitem__, default=LIVE)


def classify(old: dict, new: dict, booted_memory: int | None = None) -> list[Change]:
    """Every changed field between a recorded definition and the file's, each with its class.
    ``booted_memory``: the MiB the running qemu started with (a balloon gives memory back up to
    it); unknown, the recorded definition's memory is the bound."""
    out: list[Change] = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in SUPERVISOR:
            out += _leaves(a, b, key, LIVE, "supervisor", SUPERVISOR[key])
        elif key == "paused":
            out.append(Change(key, a, b, LIVE, "qemu", QEMU_LIVE["paused"]))
        elif key == "memory":
            out.append(_memory(old, new, booted_memory))
        elif key == "disks" and isinstance(a, list) and isinstance(b, list):
            out += _disks(a, b, old, new)
        elif key == "nics" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            out += _nics(a, b)
        elif key == "cdrom" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            out += [
                Change(f"cdrom[{i}]", x, y, LIVE, "qemu", QEMU_LIVE["cdrom"])
                for i, (x, y) in enumerate(zip(a, b))
                if x != y
            ]
        elif key in TOP_RECREATE:
            out += _leaves(a, b, key, RECREATE, "start", TOP_RECREATE[key])
        else:
            out += _leaves(a, b, key, RESTART, "start", "qemu takes it on its command line only")
    return out


def _leaves(a: object, b: object, path: str, cls: str, by: str, why: str) -> list[Change]:
    return [Change(f, x, y, cls, by, why) for f, x, y in field_changes(a, b, path)]


def _memory(old: dict, new: dict, booted: int | None) -> Change:
    from qemuspec.spec.units import parse_mib

    a, b = old.get("memory"), new.get("memory")
    balloon = bool(old.get("balloon")) and bool(new.get("balloon"))
    try:
        within = parse_mib(b) <= (booted if booted is not None else parse_mib(a))
    except (TypeError, ValueError):
        within = False
    if balloon and within:
        return Change("memory", a, b, LIVE, "qemu", QEMU_LIVE["memory"])
    why = (
        "more memory than the machine booted with needs a restart (a balloon only gives memory back)"
        if balloon
        else "without a balloon (balloon = true) qemu's RAM is fixed at boot"
    )
    return Change("memory", a, b, RESTART, "start", why)


def _disks(a: list, b: list, old: dict, new: dict) -> list[Change]:
    def key(disk: object) -> object:
        return disk.get("file") if isinstance(disk, dict) else disk

    old_keys, new_keys = [key(d) for d in a], [key(d) for d in b]
    kept = [k for k in old_keys if k in new_keys]
    if len(set(old_keys)) != len(old_keys) or kept != [k for k in new_keys if k in old_keys]:
        return [Change("disks", a, b, RESTART, "start", "disks reordered: their places change")]
    out: list[Change] = []
    for i, disk in enumerate(a):
        if key(disk) not in new_keys:
            why = _plug(disk, old)
            if why is None:
                out.append(Change(f"disks[{i}]", disk, None, LIVE, "qemu", QEMU_LIVE["disks-"]))
            else:
                out.append(Change(f"disks[{i}]", disk, None, RESTART, "start", why))
    for j, disk in enumerate(b):
        if key(disk) not in old_keys:
            why = _plug(disk, {**new, "disks": a})
            if why is None:
                out.append(Change(f"disks[{j}]", None, disk, LIVE, "qemu", QEMU_LIVE["disks+"]))
            else:
                out.append(Change(f"disks[{j}]", None, disk, RESTART, "start", why))
            continue
        before = a[old_keys.index(key(disk))]
        for f, x, y in field_changes(before, disk, f"disks[{j}]"):
            leaf = f.split(".", 1)[1].split(".", 1)[0].split("[", 1)[0] if "." in f else ""
            if leaf in DISK_RECREATE:
                out.append(Change(f, x, y, RECREATE, "start", "a different image: made again"))
            else:
                out.append(Change(f, x, y, RESTART, "start", "a disk's device is set at start"))
    return out


UNPLUGGABLE = "only virtio and scsi disks are hot-plugged (ide and nvme are set at start)"


def _plug(disk: object, machine: dict) -> str | None:
    """Why a disk cannot be added to or removed from this running machine (None: it can, live):
    virtio disks need a hot-plug slot (i440fx's root bus has them; q35's root bus has none, so only a
    declared ``pcie-root-port`` takes one), scsi disks the SCSI controller another scsi disk brought,
    and -drive options cannot be given to a live disk. runtime/live.py checks the same against qemu."""
    if not isinstance(disk, dict):
        return UNPLUGGABLE
    interface = disk.get("interface", "virtio")
    if disk.get("options"):
        return "a disk with -drive options is set at start"
    if interface == "none":
        return None
    if interface == "scsi":
        scsi = any(
            isinstance(d, dict) and d.get("interface") == "scsi" and d is not disk
            for d in machine.get("disks") or []
        )
        return None if scsi else "the SCSI controller comes with a scsi disk at start"
    if interface != "virtio":
        return UNPLUGGABLE
    kind = str(machine.get("machine") or "q35")
    if kind.startswith("pc") or "-i440fx-" in kind:
        return None
    ports = any(
        isinstance(d, dict) and d.get("driver") == "pcie-root-port"
        for d in machine.get("devices") or []
    )
    return (
        None
        if ports
        else (
            "q35's root bus takes no hot-plug: declare spare pcie-root-port devices for live disks"
        )
    )


def _nics(a: list, b: list) -> list[Change]:
    out: list[Change] = []
    for i, (x, y) in enumerate(zip(a, b)):
        if not (isinstance(x, dict) and isinstance(y, dict)):
            out += _leaves(x, y, f"nics[{i}]", RESTART, "start", "a NIC is set at start")
            continue
        for key in list(x) + [k for k in y if k not in x]:
            if x.get(key) == y.get(key):
                continue
            path = f"nics[{i}].{key}"
            if key in ("forwards", "link") and (key != "forwards" or x.get("type") == "user"):
                out.append(
                    Change(path, x.get(key), y.get(key), LIVE, "qemu", QEMU_LIVE[f"nics.{key}"])
                )
            else:
                out += _leaves(
                    x.get(key), y.get(key), path, RESTART, "start", "a NIC is set at start"
                )
    return out


def summary(changes: list[Change]) -> str:
    """The fields of the strongest class, for messages: "memory, nics[0].model"."""
    top = strongest([c.cls for c in changes])
    return ", ".join(c.field for c in changes if c.cls == top)


def table() -> list[tuple[str, str, str]]:
    """(field, class, why) rows for docs and `--help`: the table above as a user reads it."""
    rows = [(f, LIVE, f"supervisor: {why}") for f, why in SUPERVISOR.items()]
    rows += [(f.rstrip("+-"), LIVE, f"qemu: {how}") for f, how in QEMU_LIVE.items()]
    rows += [
        (f"disks.{f}", RECREATE, "a different image: made again") for f in sorted(DISK_RECREATE)
    ]
    rows += [(f, RECREATE, why) for f, why in TOP_RECREATE.items()]
    rows.append(("anything else", RESTART, "qemu takes it on its command line only"))
    return rows
