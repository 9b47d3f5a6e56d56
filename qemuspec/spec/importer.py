"""An existing qemu command line -> a definition. Nothing is dropped, nothing is reordered.

Each qemu option has one handler in :data:`HANDLERS`. A handler turns its option into typed fields
when the model accepts the values (the model's own validators decide, see :func:`fits`), and keeps
it verbatim in ``append`` otherwise. Options qemuspec manages itself (monitors, pidfile, the first
serial port, daemonize) are left out and listed in the returned notes.

Two rules come from how qemu builds a machine, and qemu itself checks them (``import --check``,
:mod:`qemuspec.runtime.judge`):

- qemu places devices in the order it creates them (PCI slots, bus ports), and the renderer writes
  typed disks, then typed NICs, then generic devices. So a device becomes a typed disk or NIC only
  while that keeps the original order; every other ``-device`` stays a generic device, in order.
- ``-hda``, ``-cdrom``, ``-drive if=ide`` and friends are qemu shorthands whose place and defaults
  only qemu knows; they become disks that keep their ``if=``/``index=`` as drive options, so qemu
  places them exactly where the original line had them.
- A kept switch that adds devices to qemu's device list where it stands (``-readconfig``, see
  :data:`ORDERED`) keeps its place among the devices: the devices after it stay in ``append`` too,
  each at its original place relative to the kept switches (``-device usb-tablet,bus=ehci.0`` after
  the config file that makes ``ehci``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from qemuspec.errors import SpecError
from qemuspec.spec.qemuopts import parse_argv, split_opts

# Kept switches whose place among the -device switches matters to qemu: a config file's [device]
# sections join qemu's device list where -readconfig stands (buses they make are used by later devices).
ORDERED = frozenset({"readconfig"})
# The chardev ids and monitors qemuspec's renderer creates for itself.
MANAGED_NOTE = "qemuspec manages this itself"
Options = dict[str, Any]


def value_of(text: str) -> int | bool | str:
    """An option value as the model stores it; rendered back it is the same text. Only the spellings
    the renderer writes back unchanged become numbers or booleans ("yes" stays "yes": for a string
    property it is not "on")."""
    if re.fullmatch(r"-?(0|[1-9]\d{0,17})", text):
        return int(text)
    return {"on": True, "off": False}.get(text, text)


_ADAPTERS: dict[tuple[type, str], Any] = {}


def fits(model: type, name: str, value: object) -> bool:
    """Whether the model accepts ``value`` for its field ``name``: one source of truth for what may
    become typed (MAC patterns, boot letters, identifiers, paths...)."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    key = (model, name)
    if key not in _ADAPTERS:
        info = model.model_fields[name]  # type: ignore[attr-defined]
        annotation: Any = (
            Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        )
        _ADAPTERS[key] = TypeAdapter(annotation)
    try:
        _ADAPTERS[key].validate_python(value)
        return True
    except (ValidationError, ValueError, TypeError):
        return False


def _options_ok(options: dict) -> bool:
    from qemuspec.spec.models import Device

    return fits(Device, "options", options)


@dataclass
class _Device:
    driver: str
    props: dict[str, Any]
    json: bool
    typed: str | None = None  # "disk" or "nic" once it became one
    at: int = 0  # how many words of append were kept before it: where it goes if it stays verbatim
    after_ordered: bool = False  # an ORDERED switch came before it: it stays after that switch


@dataclass
class Import:
    """The state of one import, filled option by option."""

    argv: list[str]
    machine: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    append: list[str] = field(default_factory=list)
    accels: list[str] = field(default_factory=list)
    disks: list[dict] = field(default_factory=list)
    drive_ids: dict[str, dict] = field(default_factory=dict)  # -drive if=none ids -> their disk
    netdevs: dict[str, tuple[dict, list[str]]] = field(
        default_factory=dict
    )  # id -> (nic table, its -netdev words)
    devices: list[_Device] = field(default_factory=list)
    name: str | None = None
    serial_seen: bool = False
    nographic: bool = False
    vga: str | None = None
    has_virtio_drive: bool = False
    parallel_seen: bool = False

    ordered_seen: bool = False

    def keep(self, option: str, value: str | None) -> None:
        self.append += [f"-{option}"] + ([value] if value is not None else [])
        self.ordered_seen = self.ordered_seen or option in ORDERED

    def add_device(self, device: _Device) -> None:
        device.at, device.after_ordered = len(self.append), self.ordered_seen
        self.devices.append(device)

    def note(self, option: str, value: str | None, why: str = MANAGED_NOTE) -> None:
        self.notes.append(f"-{option}{' ' + value if value is not None else ''}: {why}")


Handler = Callable[[Import, str, "str | None"], None]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


def _keep(imp: Import, option: str, value: str | None) -> None:
    imp.keep(option, value)


@handles("name")
def _name(imp: Import, option: str, value: str | None) -> None:
    head, pairs = split_opts(value or "", implied="guest")
    imp.name = imp.name or head or dict(pairs).get("guest")
    imp.note(
        option, value, "the machine is named by its table (process and thread names are qemuspec's)"
    )


@handles(
    "pidfile",
    "qmp",
    "qmp-pretty",
    "monitor",
    "mon",
    "daemonize",
    "no-user-config",
    "D",
    "display",
    "runas",
    "chroot",
)
def _managed(imp: Import, option: str, value: str | None) -> None:
    if (
        option == "display"
        and value is not None
        and split_opts(value, implied="type")[0] not in ("none", None)
    ):
        imp.note(
            option, value, "qemuspec runs machines headless; a window is not part of the machine"
        )
        return
    imp.note(option, value)


@handles("chardev")
def _chardev(imp: Import, option: str, value: str | None) -> None:
    """A chardev under qemuspec's id prefix is the plumbing of a line qemuspec rendered (its monitors,
    its console): qemuspec makes it again. Every other chardev is the machine's, kept as written."""
    from qemuspec.spec.passthrough import OWN_ID_PREFIX

    if dict(split_opts(value or "", implied="backend")[1]).get("id", "").startswith(OWN_ID_PREFIX):
        imp.note(option, value)
    else:
        imp.keep(option, value)


@handles("nographic")
def _nographic(imp: Import, option: str, value: str | None) -> None:
    imp.nographic = True
    imp.note(
        option, value, "qemuspec keeps the console itself; the machine property graphics=off stays"
    )


@handles("serial")
def _serial(imp: Import, option: str, value: str | None) -> None:
    if imp.serial_seen:  # a second serial port is part of the machine
        imp.keep(option, value)
        return
    imp.serial_seen = True
    if value == "none":
        imp.machine["serial"] = "none"
    imp.note(option, value, "the first serial port is qemuspec's console")


@handles("parallel")
def _parallel(imp: Import, option: str, value: str | None) -> None:
    imp.parallel_seen = True
    imp.keep(option, value)


@handles("no-acpi")
def _no_acpi(imp: Import, option: str, value: str | None) -> None:
    imp.machine.setdefault("machine_options", {})["acpi"] = False  # what -no-acpi means in qemu 7.2


@handles("S")
def _paused(imp: Import, option: str, value: str | None) -> None:
    imp.machine["paused"] = True


@handles("nodefaults")
def _nodefaults(imp: Import, option: str, value: str | None) -> None:
    imp.machine["defaults"] = False


@handles("machine", "M")
def _machine(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Machine

    head, pairs = split_opts(value or "", implied="type")
    rest = dict(pairs)
    kind = head or rest.pop("type", None)
    if kind is not None and not fits(Machine, "machine", kind):
        imp.keep(option, value)
        return
    if kind is not None:
        imp.machine["machine"] = kind
    if "accel" in rest:
        accels = [a for a in str(rest.pop("accel")).split(":") if a]
        if not all(fits(Machine, "accel", a) for a in accels):
            imp.keep(option, value)
            return
        imp.accels += accels
    options = {k: value_of(v) for k, v in rest.items()}
    if options and fits(
        Machine, "machine_options", {**imp.machine.get("machine_options", {}), **options}
    ):
        imp.machine.setdefault("machine_options", {}).update(options)
    elif options:
        imp.keep(option, ",".join(f"{k}={v}" for k, v in rest.items()))


@handles("accel")
def _accel(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Machine

    head, pairs = split_opts(value or "", implied="accel")
    accel = head or dict(pairs).get("accel", "tcg")
    options = {k: value_of(v) for k, v in pairs if k != "accel"}
    if not fits(Machine, "accel", accel) or (
        options and (imp.accels or not fits(Machine, "accel_options", options))
    ):
        imp.keep(option, value)  # a second accelerator's properties are not modelled
        return
    imp.accels.append(accel)
    if options:
        imp.machine["accel_options"] = options


@handles("enable-kvm")
def _enable_kvm(imp: Import, option: str, value: str | None) -> None:
    imp.accels.append("kvm")


def _cpu_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The legacy "+feature"/"-feature" spelling as feature=on/off."""
    out = []
    for key, value in pairs:
        if key[:1] in ("+", "-") and value == "on":
            out.append((key[1:], "on" if key[0] == "+" else "off"))
        else:
            out.append((key, value))
    return out


@handles("cpu")
def _cpu(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Machine

    head, pairs = split_opts(value or "", implied="model")
    options = {k: value_of(v) for k, v in _cpu_pairs(pairs)}
    if (
        not head
        or not fits(Machine, "cpu", head)
        or not fits(Machine, "cpu_options", options)
        or len(options) != len(pairs)
    ):
        imp.keep(option, value)  # a feature given twice, or a name the model cannot hold
        return
    imp.machine["cpu"] = head
    if options:
        imp.machine["cpu_options"] = options


_TOPOLOGY = ("sockets", "dies", "clusters", "cores", "threads")


@handles("smp")
def _smp(imp: Import, option: str, value: str | None) -> None:
    """``cpus`` is typed; a topology stays in append (qemu merges the two -smp options). Without a
    count, qemu 7.2 counts maxcpus, else sockets*dies*clusters*cores*threads (missing ones = 1)."""
    from qemuspec.spec.models import Machine

    head, pairs = split_opts(value or "", implied="cpus")
    props = dict(pairs)
    count = head if head is not None else props.pop("cpus", None)
    props.pop("cpus", None)
    numbers = {k: v for k, v in props.items()}
    if (
        not all(re.fullmatch(r"\d+", v) for v in numbers.values())
        or set(numbers) - set(_TOPOLOGY) - {"maxcpus"}
        or (count is not None and not re.fullmatch(r"\d+", count))
    ):
        imp.keep(option, value)
        return
    if count is None:
        product = 1
        for key in _TOPOLOGY:
            product *= int(numbers.get(key, 1))
        cpus = int(numbers["maxcpus"]) if "maxcpus" in numbers else product
    else:
        cpus = int(count)
    if not fits(Machine, "cpus", cpus):
        imp.keep(option, value)
        return
    imp.machine["cpus"] = cpus
    if numbers:
        imp.keep(
            option, value
        )  # the topology: this -smp overrides the typed one (overrides = ["-smp"])


@handles("m")
def _memory(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec import units

    head, pairs = split_opts(value or "", implied="size")
    size = head if head is not None else dict(pairs).get("size")
    try:
        mib = units.parse_mib(int(size) if size and size.isdigit() else size)
    except (ValueError, TypeError):
        imp.keep(option, value)
        return
    if mib * (1 << 20) != _bytes(str(size)) or not 1 <= mib <= (1 << 30):
        imp.keep(option, value)  # not a whole number of MiB
        return
    imp.machine["memory"] = mib
    if [k for k, _ in pairs if k != "size"]:
        imp.keep(option, value)  # slots/maxmem: qemu merges this with the typed size


def _bytes(size: str) -> int:
    from qemuspec.spec import units

    return units.parse_bytes(size, "M")


@handles("kernel", "initrd")
def _boot_file(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Machine

    if fits(Machine, option, value):
        imp.machine[option] = value
    else:
        imp.keep(option, value)


@handles("append")
def _cmdline(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Machine

    if fits(Machine, "cmdline", value):
        imp.machine["cmdline"] = value
    else:
        imp.keep(option, value)


@handles("bios")
def _bios(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Firmware

    if "firmware" not in imp.machine and fits(Firmware, "code", value):
        imp.machine["firmware"] = {"type": "bios", "code": value}
    else:
        imp.keep(option, value)


@handles("boot")
def _boot(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Machine

    head, pairs = split_opts(value or "", implied="order")
    order = head if head is not None else dict(pairs).get("order")
    if (
        order is not None
        and len(pairs) == (0 if head is not None else 1)
        and fits(Machine, "boot_order", order)
        and "boot_order" not in imp.machine
    ):
        imp.machine["boot_order"] = order
    else:
        imp.keep(option, value)


# -- disks ---------------------------------------------------------------------------------------

_SHORTHAND = {
    "hda": ("ide", 0),
    "hdb": ("ide", 1),
    "hdc": ("ide", 2),
    "hdd": ("ide", 3),
    "": ("ide", 0),
    "fda": ("floppy", 0),
    "fdb": ("floppy", 1),
    "cdrom": ("ide", 2),
    "mtdblock": ("mtd", None),
    "sd": ("sd", None),
    "pflash": ("pflash", None),
}


def _disk(imp: Import, option: str, value: str | None, props: dict[str, str]) -> dict | None:
    """A -drive's properties as a disk table, or None when the model cannot hold them."""
    from qemuspec.spec.models import Disk

    if "file" not in props or not fits(Disk, "file", props["file"]):
        return None
    disk: dict[str, Any] = {"file": props.pop("file"), "interface": "none"}
    if "format" in props and fits(Disk, "format", props["format"]):
        disk["format"] = props.pop("format")
    if props.get("readonly") == "on":
        props.pop("readonly")
        disk["readonly"] = True
    options = {k: value_of(v) for k, v in props.items()}
    if not fits(Disk, "options", options):
        return None
    if options:
        disk["options"] = options
    return disk


@handles("hda", "hdb", "hdc", "hdd", "", "fda", "fdb", "cdrom", "mtdblock", "sd", "pflash")
def _shorthand(imp: Import, option: str, value: str | None) -> None:
    """qemu's own spelling of a -drive: kept as its if=/index= so qemu places it as before."""
    iface, index = _SHORTHAND[option]
    props = {"file": value or ""}
    if option == "cdrom":
        props["media"] = "cdrom"
    props["if"] = iface
    if index is not None:
        props["index"] = str(index)
    if option == "":  # a bare word: qemu's -hda
        option = "hda"
    disk = _disk(imp, option, value, props)
    if disk is None:
        imp.keep(option, value)
    else:
        imp.disks.append(disk)


@handles("drive")
def _drive(imp: Import, option: str, value: str | None) -> None:
    _, pairs = split_opts(value or "")
    props = dict(pairs)
    if len(props) != len(pairs):
        imp.keep(option, value)
        return
    iface = props.get("if", "ide")
    if iface == "virtio":
        imp.has_virtio_drive = True
    drive_id = props.get("id")
    disk = _disk(imp, option, value, dict(props))
    if disk is None:
        imp.keep(option, value)
        return
    if (
        drive_id
    ):  # its id is the user's: typed only if a typed device takes it (then qemuspec names it)
        disk["_words"] = [f"-{option}", value or ""]
        disk["_if"] = iface
        (disk.get("options") or {}).pop("id", None)
        if not disk.get("options"):
            disk.pop("options", None)
        imp.drive_ids[drive_id] = disk
    else:
        disk.setdefault("options", {}).setdefault("if", iface)
    imp.disks.append(disk)


# -- networks, devices, objects -----------------------------------------------------------------


def _forward(text: str) -> dict | None:
    from qemuspec.spec.models import NIC

    match = re.fullmatch(r"(tcp|udp)?:(\d+\.\d+\.\d+\.\d+)?:(\d+)-(?:10\.0\.2\.15)?:(\d+)", text)
    if not match:
        return None
    proto, addr, host, guest = match.groups()
    out = {
        "host": int(host),
        "guest": int(guest),
        "protocol": proto or "tcp",
        "address": addr or "0.0.0.0",
    }
    return out if fits(NIC, "forwards", [out]) else None


@handles("netdev")
def _netdev(imp: Import, option: str, value: str | None) -> None:
    """A user netdev (port forwards) or socket netdev becomes a typed NIC once a device uses it."""
    from qemuspec.spec.models import NIC

    if value is not None and value.lstrip().startswith("{"):
        imp.keep(option, value)
        return
    head, pairs = split_opts(value or "", implied="type")
    props = dict(pairs)
    kind = head or props.pop("type", None)
    netdev_id = props.pop("id", None)
    nic: dict[str, Any] | None = None
    if kind == "user" and netdev_id:
        forwards = [_forward(v) for k, v in pairs if k == "hostfwd"]
        # qemu's default is restrict=off (the guest reaches out, and the host's loopback as 10.0.2.2): the
        # typed NIC says so with outbound = true; restrict=on is the model's default.
        restrict = [v for k, v in pairs if k == "restrict"]
        pairs = [(k, v) for k, v in pairs if k != "restrict"]
        rest = {k: value_of(v) for k, v in pairs if k not in ("hostfwd", "id", "type")}
        restricted = {"on": True, "yes": True, "off": False, "no": False}.get(
            restrict[-1] if restrict else "off"
        )
        if (
            restricted is not None
            and len(restrict) <= 1
            and all(forwards)
            and len([k for k, _ in pairs if k != "hostfwd"])
            == len(rest) + 1 + ("type" in dict(pairs))
        ):
            nic = {"type": "user"}
            if not restricted:
                nic["outbound"] = True
            if forwards:
                nic["forwards"] = forwards
            if rest:
                nic["options"] = rest
    elif (
        kind == "socket"
        and netdev_id
        and set(props) <= {"listen", "connect", "mcast"}
        and len(props) == 1
        and len(pairs) == 2
    ):
        nic = {"type": "socket", **props}
    if nic is None or not fits(NIC, "options", nic.get("options", {})) or not _nic_ok(nic):
        imp.keep(option, value)
        return
    imp.netdevs[netdev_id] = (nic, [f"-{option}", value or ""])  # type: ignore[index]


def _nic_ok(nic: dict) -> bool:
    from pydantic import ValidationError

    from qemuspec.spec.models import NIC

    try:
        NIC.model_validate(nic)
        return True
    except (ValidationError, ValueError):
        return False


@handles("device")
def _device(imp: Import, option: str, value: str | None) -> None:
    text = value or ""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise SpecError(
                f"-device {text[:80]}: not valid JSON (qemu reads a -device that starts with {{ as JSON): fix the JSON"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("driver"), str):
            raise SpecError(f'-device {text[:80]}: a JSON -device needs "driver": add it')
        driver = data.pop("driver")
        imp.add_device(_Device(driver, data, True))
        return
    head, pairs = split_opts(text, implied="driver")
    props = dict(pairs)
    driver = head if head is not None else props.pop("driver", "")
    if len(props) != len(pairs) - (head is None and "driver" in dict(pairs)):
        imp.add_device(
            _Device("", {"_verbatim": text}, False)
        )  # a property given twice: qemu's business
        return
    from qemuspec.spec.passthrough import OWN_ID_PREFIX

    if (
        driver == "pvpanic" and props.get("id") == OWN_ID_PREFIX + "pvpanic"
    ):  # render.py adds it to every machine
        imp.note(option, value, "qemuspec gives every machine its panic device")
        return
    imp.add_device(_Device(driver, {k: v for k, v in props.items()}, False))


@handles("object")
def _object(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import QomObject

    text = value or ""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise SpecError(
                f"-object {text[:80]}: not valid JSON (qemu reads an -object that starts with {{ as JSON): fix the JSON"
            ) from None
        if not isinstance(data, dict):
            raise SpecError(
                f"-object {text[:80]}: a JSON -object must be an object with qom-type and id"
            )
        kind, obj_id = data.get("qom-type"), data.get("id")
        options = {k: v for k, v in data.items() if k not in ("qom-type", "id")}
    else:
        head, pairs = split_opts(text, implied="qom-type")
        props = dict(pairs)
        kind = head if head is not None else props.pop("qom-type", None)
        obj_id = props.pop("id", None)
        options = {k: value_of(v) for k, v in props.items() if k != "qom-type"}
        if len(props) != len([p for p in pairs if p[0] not in ("id",)]) - (
            "qom-type" in dict(pairs) and head is None
        ):
            options = None
    table = {"type": kind, "id": obj_id, "options": options}
    if options is None or not all(fits(QomObject, k, v) for k, v in table.items()):
        imp.keep(option, value)
        return
    imp.machine.setdefault("objects", []).append(table)


@handles("virtfs")
def _virtfs(imp: Import, option: str, value: str | None) -> None:
    """-virtfs is qemu's shorthand for -fsdev plus -device virtio-9p-pci, and qemu puts that device
    in the device list where -virtfs stands: so the device joins the generic devices, in place."""
    head, pairs = split_opts(value or "", implied="fsdriver")
    props = dict(pairs)
    driver = head if head is not None else props.pop("fsdriver", None)
    tag = props.pop("mount_tag", None)
    if (
        driver is None
        or tag is None
        or len(props) + 1 != len([p for p in pairs if p[0] != "fsdriver"])
    ):
        imp.keep(option, value)
        return
    fsdev_id = props.pop("id", tag)
    imp.keep(
        "fsdev",
        ",".join(
            [driver, f"id={fsdev_id}".replace(",", ",,")]
            + [f"{k}={v.replace(',', ',,')}" for k, v in props.items()]
        ),
    )
    imp.add_device(_Device("virtio-9p-pci", {"fsdev": fsdev_id, "mount_tag": tag}, False))


@handles("vnc")
def _vnc(imp: Import, option: str, value: str | None) -> None:
    from qemuspec.spec.models import Display

    head, pairs = split_opts(value or "", implied="vnc")
    match = re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|localhost)?:(\d{1,2})", head or "")
    options = {k: value_of(v) for k, v in pairs}
    password = options.pop(
        "password", False
    )  # the typed display asks for one unless unauthenticated = true
    if (
        not match
        or "display" in imp.machine
        or not isinstance(password, bool)
        or not fits(Display, "options", options)
    ):
        imp.keep(option, value)
        return
    host = (match.group(1) or "0.0.0.0").replace(
        "localhost", "127.0.0.1"
    )  # qemu: no host = every address
    imp.machine["display"] = {
        "type": "vnc",
        "listen": host,
        "port": 5900 + int(match.group(2)),
        "vga": "default",
        **({} if password else {"unauthenticated": True}),
        **({"options": options} if options else {}),
    }


@handles("vga")
def _vga(imp: Import, option: str, value: str | None) -> None:
    imp.vga = value


# Everything else is part of the machine and has no typed form: kept as written, in order.
for _name_ in (
    "global",
    "rtc",
    "numa",
    "smbios",
    "usb",
    "usbdevice",
    "tpmdev",
    "incoming",
    "blockdev",
    "fw_cfg",
    "loadvm",
    "mem-path",
    "mem-prealloc",
    "no-hpet",
    "k",
    "msg",
    "overcommit",
    "sandbox",
    "watchdog",
    "watchdog-action",
    "action",
    "snapshot",
    "no-reboot",
    "no-shutdown",
    "L",
    "option-rom",
    "acpitable",
    "set",
    "iscsi",
    "net",
    "nic",
    "spice",
    "audiodev",
    "audio",
    "soundhw",
    "uuid",
    "add-fd",
    "fsdev",
    "icount",
    "semihosting-config",
    "device-memory",
    "compat",
    "readconfig",
    "plugin",
    "trace",
    "d",
    "seed",
    "boot-once",
    "tb-size",
    "prom-env",
    "g",
    "dtb",
    "debugcon",
    "echr",
    "balloon",
    "localtime",
    "std-vga",
    "win2k-hack",
    "no-fd-bootchk",
    "full-screen",
    "only-migratable",
    "preconfig",
    "enable-fips",
    "xen-domid",
    "iothread",
):
    HANDLERS.setdefault(_name_, _keep)


# -- the whole line ------------------------------------------------------------------------------


def refuse_line_breaks(words: list[str], where: str) -> None:
    """qemu takes a value with a line break, but a definition written from it could hide lines (in its
    header comments, a reader's view): qemu options never need one, so an import refuses them."""
    for index, word in enumerate(words):
        if "".join(word.splitlines()) != word:  # any line separator, \u2028 included
            raise SpecError(
                f"word {index} of {where} ({word!r}) holds a line break: qemu options never need one; "
                "remove it and import again"
            )


def import_argv(
    argv: list[str], name: str | None = None, base_dir: str | None = None
) -> tuple[str, dict, list[str]]:
    """(machine name, machine table, notes) for a qemu command line. With ``base_dir`` (the directory
    the command ran in), relative paths in typed fields become absolute, so the definition works from
    wherever it is saved; paths inside ``append`` stay as written."""
    from qemuspec.spec.models import Machine

    if not argv:
        raise SpecError("the command line is empty: give qemu-system-ARCH and its options")
    refuse_line_breaks(argv, "the command line")
    if not fits(Machine, "qemu", argv[0]):
        raise SpecError(
            f'"{argv[0]}" is not a qemu system emulator: the command line must start with qemu-system-ARCH'
        )
    imp = Import(argv, name=name)
    imp.machine["qemu"] = argv[0]
    for option, value in parse_argv(argv, strict=True):
        HANDLERS.get(option, _keep)(imp, option, value)
    return _finish(imp, base_dir)


_DISK_DEVICES = {"virtio-blk-pci": "virtio", "ide-hd": "ide", "nvme": "nvme"}


def _finish(imp: Import, base_dir: str | None) -> tuple[str, dict, list[str]]:
    from qemuspec.spec.models import Device, NIC

    machine = imp.machine
    # Devices in their original order; typed disks and NICs only while the renderer's order
    # (disks, NICs, generic devices) is still the original one.
    rank = 0
    nics: list[dict] = []
    typed_disks: list[dict] = []
    used_netdevs: set[str] = set()
    for dev in imp.devices:
        props = dev.props
        if dev.json or "_verbatim" in props:
            continue
        if dev.after_ordered:  # it must stay after a kept switch: not typed, not before append
            rank = 2
            continue
        disk = imp.drive_ids.get(props.get("drive", "")) if dev.driver in _DISK_DEVICES else None
        if (
            disk is not None
            and rank <= 0
            and "id" not in props
            and disk.get("_if") == "none"
            and not disk.get("_claimed")
        ):
            rest = {k: value_of(v) for k, v in props.items() if k not in ("drive", "id")}
            serial = props.get("serial")
            from qemuspec.spec.models import Disk

            if serial is not None and fits(Disk, "serial", serial):
                rest.pop("serial")
            else:
                serial = None
            if fits(Disk, "device_options", rest):
                disk["interface"] = _DISK_DEVICES[dev.driver]
                disk["_claimed"] = True
                if serial is not None:
                    disk["serial"] = serial
                if rest:
                    disk["device_options"] = rest
                dev.typed = "disk"
                typed_disks.append(disk)
                continue
        netdev = props.get("netdev", "")
        if (
            netdev in imp.netdevs
            and netdev not in used_netdevs
            and rank <= 1
            and "id" not in props
            and fits(NIC, "model", dev.driver)
        ):
            nic = dict(imp.netdevs[netdev][0])
            rest = {k: value_of(v) for k, v in props.items() if k not in ("netdev",)}
            mac = props.get("mac")
            if mac is not None and fits(NIC, "mac", mac):
                nic["mac"] = rest.pop("mac")
            if fits(NIC, "device_options", rest):
                nic["model"] = dev.driver
                if rest:
                    nic["device_options"] = rest
                nics.append(nic)
                used_netdevs.add(netdev)
                dev.typed = "nic"
                rank = 1
                continue
        rank = 2
    _device_options(imp)
    generic: list[dict] = []
    generic_json: list[dict] = []  # qemu creates JSON devices after every keyval one
    late: list[_Device] = []  # stay verbatim in append
    convert_json = (
        not imp.has_virtio_drive
    )  # qemu creates -drive if=virtio devices between keyval and JSON ones
    for dev in imp.devices:
        if dev.typed:
            continue
        if "_verbatim" in dev.props or (dev.after_ordered and not dev.json):
            entry = None
        elif dev.json:
            entry = {
                "driver": dev.driver,
                "options": {k: v for k, v in dev.props.items() if k != "id"},
            }
            if "id" in dev.props:
                entry["id"] = dev.props["id"]
            if not convert_json:
                entry = None
        else:
            entry = {
                "driver": dev.driver,
                "options": {k: value_of(v) for k, v in dev.props.items() if k != "id"},
            }
            if "id" in dev.props:
                entry["id"] = dev.props["id"]
        if entry is not None and all(fits(Device, k, v) for k, v in entry.items()):
            (generic_json if dev.json else generic).append(entry)
        else:
            late.append(dev)
    generic += generic_json
    if generic:
        machine["devices"] = machine.get("devices", []) + generic
    if late:  # placed among the kept switches before anything else changes append
        _order_late(imp, late)
    # Typed disks go first, in their device order; drives no device claimed keep their place after them.
    disks = typed_disks
    for disk in imp.disks:
        if disk.get("_claimed"):
            continue
        if (
            "_words" in disk
        ):  # a drive with an id no typed device took: others refer to it by that id
            imp.append += disk["_words"]
        else:
            disks.append(disk)
    for disk in disks:
        disk.pop("_claimed", None)
        disk.pop("_words", None)
        disk.pop("_if", None)
    for netdev_id, (nic, words) in imp.netdevs.items():
        if netdev_id not in used_netdevs:
            imp.append[:0] = (
                words  # no device took it: the netdev stays as written (before its users)
            )
    if disks:
        machine["disks"] = disks
    if nics:
        machine["nics"] = machine.get("nics", []) + nics
    if imp.vga is not None:
        if machine.get("display", {}).get("type") == "vnc":
            machine["display"]["vga"] = imp.vga
        else:
            imp.append += ["-vga", imp.vga]
    if imp.nographic:
        machine.setdefault("machine_options", {}).setdefault("graphics", False)
        if machine.get("defaults", True) and not imp.parallel_seen:
            imp.append += ["-parallel", "null"]  # -nographic's default for the parallel port
    machine.setdefault("machine", "pc")
    machine.setdefault("cpu", "qemu64")
    machine.setdefault("memory", 128)
    machine["accel"] = imp.accels[0] if len(imp.accels) == 1 else (imp.accels or "tcg")
    machine.setdefault("defaults", True)
    if not _has_serial_port(imp):
        machine["serial"] = "none"
    machine.setdefault("serial", "log")
    _overrides(imp)
    if imp.append:
        machine["append"] = imp.append
    if base_dir:
        absolute = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
        for key in ("kernel", "initrd"):
            if key in machine:
                machine[key] = absolute(machine[key])
        for disk in machine.get("disks", []):
            disk["file"] = absolute(disk["file"])
        if "firmware" in machine and machine["firmware"].get("code"):
            machine["firmware"]["code"] = absolute(machine["firmware"]["code"])
    name = imp.name or os.path.basename(imp.argv[0])
    return _safe_name(name), machine, imp.notes


def _device_options(imp: Import) -> None:
    """Devices that are an option of their own (spec/devices.py) become that option while the
    renderer's order keeps the original one: it writes them last among the devices, in field order,
    so only the line's last devices can be typed, and only in that order."""
    from qemuspec.spec.models import declared
    from qemuspec.spec.models import DeviceOption
    from qemuspec.spec.passthrough import OWN_ID_PREFIX

    options = declared()
    limit = len(options)
    for dev in reversed(imp.devices):
        found = next(
            (i for i, (_, decl) in enumerate(options[:limit]) if decl.driver == dev.driver), None
        )
        if found is None or dev.typed or dev.json or "_verbatim" in dev.props or dev.after_ordered:
            return
        field, decl = options[found]
        props = {k: value_of(v) for k, v in dev.props.items() if k != "id"}
        if dev.props.get("id", OWN_ID_PREFIX + decl.id) != OWN_ID_PREFIX + decl.id or not fits(
            DeviceOption, "options", props
        ):
            return  # another id may be referred to; properties the model cannot hold stay with the device
        imp.machine[field] = {"options": props} if props else True
        dev.typed, limit = field, found


def _order_late(imp: Import, late: list[_Device]) -> None:
    """Devices that could not be typed stay in append, each at its place among the kept switches
    (where it stood relative to a -readconfig matters). The renderer writes the generic devices
    before append; if a generic keyval device came after a late keyval one, qemu would create them
    in another order, so then every device that is not typed goes to append, at its place."""
    keyval = [dev for dev in imp.devices if not dev.typed and not dev.json]
    first = next((i for i, dev in enumerate(keyval) if dev in late), None)
    if first is not None and any(dev not in late for dev in keyval[first:]):
        late = [dev for dev in imp.devices if not dev.typed]
        imp.machine.pop("devices", None)
    _place(imp, [(dev.at, _words(dev)) for dev in late])


def _words(dev: _Device) -> list[str]:
    if dev.json:
        return ["-device", json.dumps({"driver": dev.driver, **dev.props}, separators=(",", ":"))]
    return ["-device", dev.props.get("_verbatim") or _keyval(dev.driver, dev.props)]


def _place(imp: Import, placed: list[tuple[int, list[str]]]) -> None:
    """Insert each word group before the kept word it preceded in the original line (stable)."""
    out: list[str] = []
    pending = sorted(placed, key=lambda item: item[0])
    for index, word in enumerate(imp.append):
        while pending and pending[0][0] <= index:
            out += pending.pop(0)[1]
        out.append(word)
    for _, words in pending:
        out += words
    imp.append = out


def _overrides(imp: Import) -> None:
    """A switch kept in append that a typed field also renders (-machine, -smp, -m, -cpu...) wins on
    purpose: it is listed in ``overrides``, and the renderer leaves its own out. For -machine and
    -accel the typed parts then go to append too, before the kept ones (qemu merges -machine)."""
    from qemuspec.spec import passthrough

    kept = [
        (index, sw)
        for index, sw, _ in passthrough.switches(imp.append)
        if sw in passthrough.OVERRIDABLE
    ]
    if not kept:
        return
    machine = imp.machine
    for sw in ("-machine", "-accel"):
        first = next((index for index, name in kept if name == sw), None)
        if first is None:
            continue
        if sw == "-machine":
            pairs = [("type", machine.get("machine", "pc"))] + list(
                machine.get("machine_options", {}).items()
            )
            words = ["-machine", ",".join(f"{k}={_escape(v)}" for k, v in pairs)]
        else:
            words = []
            for n, accel in enumerate(imp.accels or ["tcg"]):
                opts = machine.get("accel_options", {}) if n == 0 else {}
                words += [
                    "-accel",
                    ",".join([accel] + [f"{k}={_escape(v)}" for k, v in opts.items()]),
                ]
        imp.append[first:first] = words
    machine["overrides"] = sorted({sw for _, sw in kept})


def _escape(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def _keyval(driver: str, props: dict[str, str]) -> str:
    return ",".join([driver] + [f"{k}={v.replace(',', ',,')}" for k, v in props.items()])


def _has_serial_port(imp: Import) -> bool:
    """qemu gives a machine its first serial port unless -nodefaults, -serial none, or a serial
    device of the line's own takes that place; qemuspec's console needs that port."""
    if imp.machine.get("serial") == "none":
        return False
    if imp.serial_seen:
        return True
    if any(
        d.driver in ("isa-serial", "pci-serial", "pci-serial-2x", "pci-serial-4x")
        for d in imp.devices
    ):
        return False
    return imp.machine.get("defaults", True)


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", name).strip("-") or "imported"
    return cleaned[:63] if cleaned[0].isalnum() else f"m{cleaned}"[:63]
