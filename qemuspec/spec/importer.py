"""An existing qemu command line -> a definition. Nothing is dropped.

Options the model types become typed fields (their extra properties go to the matching options map);
options qemuspec itself manages (monitors, pidfile, serial and display plumbing, daemonize) are left
out and listed in the returned notes; everything else is kept verbatim in ``append``.

:func:`normalise` is the other half: a canonical form of what a command line asks qemu for, used to
prove that the rendered definition asks for the same machine (tests, and ``import --check``).
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

# Switches that take no argument (qemu-options.hx: those without HAS_ARG), as far as imports meet them.
NO_ARG = {
    "S", "nographic", "enable-kvm", "no-reboot", "no-shutdown", "nodefaults", "no-user-config", "daemonize",
    "snapshot", "no-hpet", "no-acpi", "s", "full-screen", "no-fd-bootchk", "only-migratable", "preconfig",
    "version", "help", "h", "no-quit", "win2k-hack", "no-frame", "alt-grab", "ctrl-grab", "enable-fips",
    "nodefconfig", "semihosting", "curses", "sdl", "usb", "no-kvm", "rtc-td-hack", "singlestep",
}
# Options whose job qemuspec does itself (monitors, console plumbing, process management).
QEMUSPEC_CHARDEVS = {"qemuspec-qmp", "qemuspec-qmp-client", "qemuspec-serial0"}  # what the renderer adds for its own plumbing
MANAGED = {"pidfile", "qmp", "qmp-pretty", "monitor", "mon", "serial", "daemonize", "display", "nographic", "name", "no-user-config", "D"}


def split_command(text: str) -> list[str]:
    """A shell command line as a file holds it (continuation backslashes, comments)."""
    text = re.sub(r"\\\n", " ", text)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return shlex.split("\n".join(lines))


def parse_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """[(option without dash, argument or None)] in order; argv[0] (the binary) excluded."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            out.append(("", token))  # a bare image name: qemu's -hda shorthand
            i += 1
            continue
        name = token.lstrip("-")
        if name in NO_ARG or i + 1 >= len(argv):
            out.append((name, None))
            i += 1
        else:
            out.append((name, argv[i + 1]))
            i += 2
    return out


def split_opts(text: str, implied: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """qemu's option-list syntax: ",," is a comma; a first item without "=" is the implied key."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    head, pairs = None, []
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep and index == 0 and implied is not None:
            head = part
        elif not sep:
            pairs.append((part, "on"))
        else:
            pairs.append((key, value))
    return head, pairs


def _value(text: str) -> Any:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text in ("on", "yes", "true"):
        return True
    if text in ("off", "no", "false"):
        return False
    return text


def _size_mib(text: str) -> int | None:
    _, pairs = split_opts(text, implied="size")
    size = dict(pairs).get("size") if "=" in text else text.split(",")[0]
    match = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", size or "")
    if not match or (len(pairs) > (1 if "=" in text else 0)):
        return None
    number, unit = int(match.group(1)), (match.group(2) or "M").upper()
    return {"K": number // 1024, "M": number, "G": number * 1024, "T": number * 1024 * 1024}[unit]


def import_argv(argv: list[str], name: str | None = None, base_dir: str | None = None) -> tuple[str, dict, list[str]]:
    """(machine name, machine table, notes) for a qemu command line. With ``base_dir`` (the directory
    the command ran in), relative paths in typed fields become absolute, so the definition works from
    wherever it is saved; paths inside ``append`` stay as written."""
    options = parse_argv(argv)
    machine: dict[str, Any] = {"qemu": argv[0]}
    notes: list[str] = []
    append: list[str] = []
    accels: list[str] = []
    drives: dict[str, dict] = {}
    netdevs: dict[str, dict] = {}
    devices: list[tuple[str, list[tuple[str, str]]]] = []
    ide_index = 0

    def keep(option: str, value: str | None) -> None:
        append.extend([f"-{option}"] + ([value] if value is not None else []))

    for option, value in options:
        if option == "name" and value is not None:
            head, pairs = split_opts(value, implied="guest")
            name = name or head or dict(pairs).get("guest")
            notes.append(f"-name {value}: the machine is named by its table")
        elif option in MANAGED or option == "S":
            if option == "S":
                machine["paused"] = True
            else:
                notes.append(f"-{option}{' ' + value if value else ''}: qemuspec manages this itself")
        elif option == "nodefaults":
            machine["defaults"] = False
        elif option in ("machine", "M") and value is not None:
            head, pairs = split_opts(value, implied="type")
            rest = dict(pairs)
            machine["machine"] = head or rest.pop("type", "pc")
            if "accel" in rest:
                accels += [a for a in str(rest.pop("accel")).split(":") if a]
            if rest:
                machine["machine_options"] = {k: _value(v) for k, v in rest.items()}
        elif option == "accel" and value is not None:
            head, pairs = split_opts(value, implied="accel")
            if pairs and (accels or machine.get("accel_options")):
                keep(option, value)  # properties for a second accelerator: not modelled
            else:
                accels.append(head or dict(pairs).pop("accel", "tcg"))
                if pairs:
                    machine["accel_options"] = {k: _value(v) for k, v in pairs if k != "accel"}
        elif option == "enable-kvm":
            accels.append("kvm")
        elif option == "cpu" and value is not None:
            head, pairs = split_opts(value, implied="model")
            machine["cpu"] = head or "qemu64"
            if pairs:
                machine["cpu_options"] = {k: _value(v) for k, v in _cpu_pairs(pairs)}
        elif option == "smp" and value is not None and re.fullmatch(r"(cpus=)?\d+", value):
            machine["cpus"] = int(value.removeprefix("cpus="))
        elif option == "m" and value is not None and _size_mib(value) is not None:
            machine["memory"] = _size_mib(value)
        elif option in ("kernel", "initrd") and value is not None:
            machine[option] = value
        elif option == "append" and value is not None:
            machine["cmdline"] = value
        elif option == "bios" and value is not None:
            machine["firmware"] = {"type": "bios", "code": value}
        elif option == "boot" and value is not None:
            head, pairs = split_opts(value, implied="order")
            order = head or dict(pairs).get("order")
            if order and re.fullmatch(r"[a-dn-p]{1,8}", order) and len(pairs) <= (0 if head else 1):
                machine["boot_order"] = order
            else:
                keep(option, value)
        elif option == "cdrom" and value is not None:
            machine.setdefault("cdrom", []).append(value)
        elif option in ("hda", "hdb", "hdc", "hdd", "") and value is not None:
            drives[f"_{option or 'hda'}{ide_index}"] = {"file": value, "interface": "ide", "_order": len(drives)}
            ide_index += 1
        elif option == "drive" and value is not None:
            _, pairs = split_opts(value)
            props = dict(pairs)
            iface = props.pop("if", "ide")
            positional = {"index", "bus", "unit"} & set(props)
            if "file" not in props or props.get("media") == "cdrom" or iface not in ("virtio", "ide", "none") or positional:
                keep(option, value)
                continue
            drive_id = props.pop("id", None)
            disk: dict[str, Any] = {"file": props.pop("file"), "interface": {"virtio": "virtio", "ide": "ide", "none": "none"}[iface], "_order": len(drives)}
            if "format" in props:
                disk["format"] = props.pop("format")
            if props.get("readonly") in ("on", "yes", "true"):
                props.pop("readonly")
                disk["readonly"] = True
            if props:
                disk["options"] = {k: _value(v) for k, v in props.items()}
            drives[drive_id or f"_drive{len(drives)}"] = disk
        elif option == "netdev" and value is not None:
            head, pairs = split_opts(value, implied="type")
            props = dict(pairs)
            if head == "user" and "id" in props and all(k in ("id", "hostfwd") for k, _ in pairs):
                forwards = [_forward(v) for k, v in pairs if k == "hostfwd"]
                if all(forwards):
                    netdevs[props["id"]] = {"type": "user", "forwards": forwards}
                    continue
            keep(option, value)
        elif option == "device" and value is not None:
            head, pairs = split_opts(value, implied="driver")
            devices.append((head or dict(pairs).get("driver", ""), pairs))
        elif option == "object" and value is not None:
            head, pairs = split_opts(value, implied="qom-type")
            props = dict(pairs)
            if head and "id" in props:
                machine.setdefault("objects", []).append({"type": head, "id": props.pop("id"), "options": {k: _value(v) for k, v in props.items()}})
            else:
                keep(option, value)
        elif option == "vnc" and value is not None and re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|localhost)?:\d{1,2}", value):
            host = value.rsplit(":", 1)[0].replace("localhost", "127.0.0.1") or "0.0.0.0"  # qemu: empty = every address
            machine["display"] = {"type": "vnc", "listen": host, "port": 5900 + int(value.rsplit(":", 1)[1]), "vga": "default"}
        else:
            keep(option, value)

    # -device X,drive=ID and -device X,netdev=ID join their backends into typed disks and NICs.
    disk_drivers = {"virtio-blk-pci": "virtio", "ide-hd": "ide", "nvme": "nvme"}
    nics: list[dict] = []
    for driver, pairs in devices:
        props = dict(pairs)
        if props.get("drive") in drives and driver in disk_drivers and drives[props["drive"]]["interface"] == "none":
            disk = drives[props.pop("drive")]
            disk["interface"] = disk_drivers[driver]
            props.pop("driver", None)
            if props.get("serial") and re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", props["serial"]):
                disk["serial"] = props.pop("serial")
            if props:
                disk["device_options"] = {k: _value(v) for k, v in props.items()}
        elif props.get("netdev") in netdevs:
            nic = dict(netdevs.pop(props.pop("netdev")))
            nic["model"] = driver
            props.pop("driver", None)
            if "mac" in props and re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", props["mac"]):
                nic["mac"] = props.pop("mac")
            if props:
                nic["device_options"] = {k: _value(v) for k, v in props.items()}
            nics.append(nic)
        else:
            rest = {k: _value(v) for k, v in pairs if k not in ("driver", "id")}
            entry: dict[str, Any] = {"driver": driver, "options": rest}
            if "id" in props:
                entry["id"] = props["id"]
            machine.setdefault("devices", []).append(entry)
    for netdev_id, nic in netdevs.items():  # a user netdev with no device: keep it as written
        append += ["-netdev", ",".join(["user", f"id={netdev_id}"] + [f"hostfwd={_unforward(f)}" for f in nic["forwards"]])]
    disks = []
    for drive_id, disk in sorted(drives.items(), key=lambda item: item[1]["_order"]):
        disk.pop("_order")
        if disk["interface"] == "none" and not drive_id.startswith("_"):
            disk["id"] = drive_id  # referenced by a device we keep as written
        disks.append(disk)
    if disks:
        machine["disks"] = disks
    if nics:
        machine["nics"] = nics
    machine.setdefault("machine", "pc")
    machine.setdefault("cpu", "qemu64")
    machine.setdefault("memory", 128)
    machine["accel"] = accels or ["tcg"]
    if len(machine["accel"]) == 1:
        machine["accel"] = machine["accel"][0]
    machine.setdefault("defaults", True)
    machine["serial"] = "log"
    if append:
        machine["append"] = append
        from qemuspec.spec.passthrough import OVERRIDABLE, switches

        # A switch kept as written that a typed field would render too: the written one must win, visibly.
        kept = sorted({sw for _, sw, _ in switches(append) if sw in OVERRIDABLE})
        if kept:
            machine["overrides"] = kept
    if base_dir:
        absolute = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
        for key in ("kernel", "initrd"):
            if key in machine:
                machine[key] = absolute(machine[key])
        for disk in machine.get("disks", []):
            disk["file"] = absolute(disk["file"])
        machine["cdrom"] = [absolute(c) for c in machine.get("cdrom", [])] or machine.pop("cdrom", None) or []
        if not machine["cdrom"]:
            machine.pop("cdrom")
        if "firmware" in machine and machine["firmware"].get("code"):
            machine["firmware"]["code"] = absolute(machine["firmware"]["code"])
    return (_safe_name(name or os.path.basename(argv[0]))), machine, notes


def _cpu_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The legacy "+feature"/"-feature" spelling as feature=on/off."""
    out = []
    for key, value in pairs:
        if key[:1] in "+-" and value == "on":
            out.append((key[1:], "on" if key[0] == "+" else "off"))
        else:
            out.append((key, value))
    return out


def _forward(text: str) -> dict | None:
    match = re.fullmatch(r"(tcp|udp)?:(\d+\.\d+\.\d+\.\d+)?:(\d+)-(?:\d+\.\d+\.\d+\.\d+)?:(\d+)", text)
    if not match:
        return None
    proto, addr, host, guest = match.groups()
    out: dict[str, Any] = {"host": int(host), "guest": int(guest), "protocol": proto or "tcp"}
    out["address"] = addr or "0.0.0.0"
    return out


def _unforward(f: dict) -> str:
    return f"{f['protocol']}:{f['address']}:{f['host']}-:{f['guest']}"


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", name).strip("-") or "imported"
    return cleaned[:63] if cleaned[0].isalnum() else f"m{cleaned}"[:63]


# -- the canonical form of a command line --------------------------------------------------------

def normalise(argv: list[str]) -> list[tuple]:
    """What a command line asks qemu for, order-free and spelling-free: management options out,
    defaults made explicit, disks and NICs as records whatever shorthand or id wiring they use."""
    options = parse_argv(argv)
    out: list[tuple] = []
    cpu: tuple[str | None, tuple[tuple[str, str], ...]] = ("qemu64", ())
    mem: int | None = 128
    machine_type, accels, smp = "pc", [], "1"
    nodefaults = False
    drives: dict[str, dict] = {}
    netdevs: dict[str, tuple] = {}
    devices = []
    for option, value in options:
        if option in MANAGED or option == "S":
            continue
        if option == "nodefaults":
            nodefaults = True
        elif option in ("machine", "M"):
            head, pairs = split_opts(value or "", implied="type")
            rest = dict(pairs)
            machine_type = head or rest.pop("type", "pc")
            accels += [a for a in str(rest.pop("accel", "")).split(":") if a]
            if rest:
                out.append(("machine-options", tuple(sorted((k, str(_value(v))) for k, v in rest.items()))))
        elif option == "accel":
            head, pairs = split_opts(value or "", implied="accel")
            accels.append(head or dict(pairs).get("accel", "tcg"))
            if pairs:
                out.append(("accel-options", len(accels), tuple(sorted((k, str(_value(v))) for k, v in pairs if k != "accel"))))
        elif option == "enable-kvm":
            accels.append("kvm")
        elif option == "cpu":
            head, pairs = split_opts(value or "", implied="model")
            cpu = (head, tuple(sorted((k, str(_value(v))) for k, v in _cpu_pairs(pairs))))
        elif option == "smp" and value and re.fullmatch(r"(cpus=)?\d+", value):
            smp = value.removeprefix("cpus=")
        elif option == "m" and value and _size_mib(value) is not None:
            mem = _size_mib(value)
        elif option in ("hda", "hdb", "hdc", "hdd", ""):
            drives[f"_{len(drives)}"] = {"file": value, "iface": "ide"}
        elif option == "drive":
            _, pairs = split_opts(value or "")
            props = {k: str(_value(v)) for k, v in pairs}
            iface = props.pop("if", "ide")
            drive_id = props.pop("id", f"_{len(drives)}")
            if props.get("media") == "cdrom":  # read-only raw media, however it is spelt
                props.setdefault("readonly", "True")
                props.setdefault("format", "raw")
            drives[drive_id] = {**props, "iface": iface}
        elif option == "netdev":
            head, pairs = split_opts(value or "", implied="type")
            props = dict(pairs)
            netdevs[props.get("id", "")] = (head, tuple(sorted((k, _hostfwd(v) if k == "hostfwd" else v) for k, v in pairs if k != "id")))
        elif option == "device":
            head, pairs = split_opts(value or "", implied="driver")
            devices.append((head, {k: str(_value(v)) for k, v in pairs}))
        elif option == "cdrom":
            drives[f"_cd{len(drives)}"] = {"file": value, "media": "cdrom", "readonly": "True", "format": "raw", "iface": "ide"}
        elif option == "chardev" and dict(split_opts(value or "", implied="backend")[1]).get("id") in QEMUSPEC_CHARDEVS:
            continue
        elif option == "bios":
            out.append(("bios", value))
        elif option == "vnc":
            out.append(("vnc", re.sub(r"^:", "0.0.0.0:", (value or "").replace("localhost:", "127.0.0.1:"))))
        elif option == "object":
            head, pairs = split_opts(value or "", implied="qom-type")
            out.append(("object", head, tuple(sorted((k, str(_value(v))) for k, v in pairs))))
        elif option == "boot":
            head, pairs = split_opts(value or "", implied="order")
            out.append(("boot", tuple(sorted(([("order", head)] if head else []) + pairs))))
        else:
            out.append((option, value))
    disk_drivers = {"virtio-blk-pci": "virtio", "ide-hd": "ide", "nvme": "nvme", "ide-cd": "ide"}
    for driver, props in devices:
        drive = drives.get(props.get("drive", ""))
        if drive is not None and driver in disk_drivers and drive["iface"] == "none":
            props.pop("drive")
            props.pop("id", None)
            drive["iface"] = disk_drivers[driver]
            drive["device"] = tuple(sorted(props.items()))
        elif props.get("netdev") in netdevs:
            backend = netdevs.pop(props.pop("netdev"))
            props.pop("id", None)
            out.append(("nic", driver, backend, tuple(sorted(props.items()))))
        else:
            out.append(("device", driver, tuple(sorted(props.items()))))
    for netdev_id, backend in netdevs.items():
        out.append(("netdev", netdev_id, backend))
    for drive_id, drive in drives.items():
        record = {k: v for k, v in drive.items() if k not in ("iface",)}
        record.setdefault("device", ())
        if drive_id.startswith("_") or drive["iface"] != "none":
            out.append(("disk", drive["iface"], tuple(sorted((k, str(v)) for k, v in record.items()))))
        else:
            out.append(("disk", "none", drive_id, tuple(sorted((k, str(v)) for k, v in record.items()))))
    out += [("machine", machine_type), ("accel", tuple(accels or ["tcg"])), ("cpu", cpu), ("smp", smp), ("m", mem), ("nodefaults", nodefaults)]
    return sorted(out, key=repr)


def _hostfwd(text: str) -> str:
    f = _forward(text)
    return _unforward(f) if f else text
