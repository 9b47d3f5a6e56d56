"""A libvirt domain (what `virsh dumpxml` prints) -> a definition. Nothing is dropped silently.

libvirt elements with a typed counterpart become typed fields; ``<qemu:commandline>`` arguments go
through the command-line importer's handlers, so they are typed or kept exactly as a qemu line would
be; what libvirt manages for itself (controllers it adds, consoles, lifecycle actions, seclabels) is
named in the notes. Reading XML never executes anything, and ``defusedxml``-style entity expansion
is refused: the parser runs without DTDs or entities.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from qemuspec.errors import SpecError

if TYPE_CHECKING:
    from qemuspec.spec.devices import QemuDevice
    from qemuspec.spec.importer import Import

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_BOOT = {"hd": "c", "cdrom": "d", "network": "n", "fd": "a"}
_NIC_MODEL = {
    "virtio": "virtio-net-pci",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}
_DISK_BUS = {"virtio": "virtio", "sata": "ide", "ide": "ide", "scsi": "scsi"}
_VGA = {
    "vga": "std",
    "virtio": "virtio",
    "qxl": "qxl",
    "cirrus": "cirrus",
    "vmvga": "vmware",
    "none": "none",
}
_ACCESS = {"mapped": "mapped-xattr", "passthrough": "passthrough", "squash": "none"}
_UNIT = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


def _parse(text: str, source: str) -> ET.Element:
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise SpecError(
            f"{source}: a libvirt domain has no DOCTYPE or entities: remove them (they are refused, not expanded)"
        )
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise SpecError(
            f"{source}: not well-formed XML ({exc}): give the output of `virsh dumpxml NAME`"
        ) from None
    if root.tag != "domain":
        raise SpecError(
            f"{source}: the root element is <{root.tag}>, not <domain>: give the output of `virsh dumpxml NAME`"
        )
    return root


def _mib(el: ET.Element, source: str) -> int:
    unit = (el.get("unit") or "KiB").lower()
    try:
        size = int((el.text or "").strip()) * _UNIT[unit]
    except (ValueError, KeyError):
        raise SpecError(
            f"{source}: <{el.tag}> {el.text!r} {unit}: write a whole number with a unit such as KiB or MiB"
        ) from None
    if size < (1 << 20) or size % (1 << 20):
        raise SpecError(
            f"{source}: <{el.tag}> is not a whole number of MiB: qemuspec sizes memory in MiB"
        )
    return size >> 20


def import_domain(
    text: str, name: str | None = None, source: str = "<domain>"
) -> tuple[str, dict, list[str]]:
    """(machine name, machine table, notes) for a libvirt domain XML document."""
    from qemuspec.spec.importer import (
        HANDLERS,
        Import,
        _finish,
        _keep,
        _safe_name,
        refuse_line_breaks,
    )
    from qemuspec.spec.qemuopts import parse_argv

    root = _parse(text, source)
    notes: list[str] = []
    domain_type = root.get("type", "kvm")
    emulator = root.findtext("devices/emulator") or "qemu-system-x86_64"
    imp = Import([emulator], name=name or root.findtext("name"))
    machine = imp.machine
    machine["qemu"] = emulator
    imp.accels.append("kvm" if domain_type == "kvm" else "tcg")
    os_el = root.find("os")
    if os_el is not None:
        type_el = os_el.find("type")
        if type_el is not None and type_el.get("machine"):
            machine["machine"] = type_el.get("machine")
        loader = os_el.find("loader")
        if loader is not None and (loader.text or "").strip():
            if loader.get("type") == "pflash":
                firmware: dict[str, object] = {"type": "uefi", "code": (loader.text or "").strip()}
                nvram = os_el.find("nvram")
                if nvram is not None and nvram.get("template"):
                    firmware["vars"] = nvram.get("template")
                machine["firmware"] = firmware
                notes.append(
                    "<nvram>: qemuspec keeps each machine's UEFI variables in its state directory, copied from the template"
                )
            else:
                machine["firmware"] = {"type": "bios", "code": (loader.text or "").strip()}
        for tag, key in (("kernel", "kernel"), ("initrd", "initrd"), ("cmdline", "cmdline")):
            value = os_el.findtext(tag)
            if value:
                machine[key] = value
        order = "".join(_BOOT.get(b.get("dev", ""), "") for b in os_el.findall("boot"))
        if order:
            machine["boot_order"] = order
    memory = root.find("memory")
    if memory is not None:
        machine["memory"] = _mib(memory, source)
    vcpu = root.findtext("vcpu")
    if vcpu:
        try:
            machine["cpus"] = int(vcpu.strip())
        except ValueError:
            raise SpecError(f"{source}: <vcpu> {vcpu!r} is not a number of CPUs") from None
    cpu = root.find("cpu")
    if cpu is not None:
        mode = cpu.get("mode", "custom")
        machine["cpu"] = {"host-passthrough": "host", "host-model": "host", "maximum": "max"}.get(
            mode
        ) or (cpu.findtext("model") or "qemu64")
        topology = cpu.find("topology")
        if topology is not None:
            smp = ",".join(
                [str(machine.get("cpus", 1))]
                + [
                    f"{k}={topology.get(k)}"
                    for k in ("sockets", "dies", "cores", "threads")
                    if topology.get(k)
                ]
            )
            imp.keep("smp", smp)
    features = root.find("features")
    if features is None or features.find("acpi") is None:
        machine.setdefault("machine_options", {})["acpi"] = False
    for tag in ("on_poweroff", "on_reboot", "on_crash"):
        if root.findtext(tag):
            notes.append(
                f"<{tag}>{root.findtext(tag)}: qemuspec's restart policy decides (restart = ...)"
            )

    devices = root.find("devices")
    for el in list(devices) if devices is not None else []:
        _device(el, imp, notes)
    machine["defaults"] = False  # libvirt always gives -nodefaults
    for arg_list in root.iter(f"{{{QEMU_NS}}}commandline"):
        words = [a.get("value", "") for a in arg_list.findall(f"{{{QEMU_NS}}}arg")]
        refuse_line_breaks(words, f"{source}: <qemu:commandline>")
        for option, value in parse_argv([emulator, *words], strict=True):
            HANDLERS.get(option, _keep)(imp, option, value)
    for el in root:
        if el.tag not in (
            "name",
            "uuid",
            "memory",
            "currentMemory",
            "vcpu",
            "os",
            "features",
            "cpu",
            "devices",
            "on_poweroff",
            "on_reboot",
            "on_crash",
            "clock",
            f"{{{QEMU_NS}}}commandline",
            "metadata",
            "description",
            "title",
            "seclabel",
            "resource",
        ):
            notes.append(f"<{el.tag}>: not imported (no qemuspec counterpart)")
    clock = root.find("clock")
    if clock is not None and clock.get("offset") in ("localtime", "utc"):
        imp.keep("rtc", f"base={clock.get('offset')}")
    uuid = root.findtext("uuid")
    if uuid:
        imp.keep("uuid", uuid.strip())
    got_name, table, more = _finish(imp, None)
    table["serial"] = (
        "log"
        if any(e.tag in ("serial", "console") for e in (devices if devices is not None else []))
        else "none"
    )
    return _safe_name(got_name), table, notes + more


def _device_options() -> dict[str, tuple[str, QemuDevice]]:
    """libvirt element -> (field, declaration) of the options that are one device (spec/devices.py)."""
    from qemuspec.spec.models import declared

    return {decl.libvirt: (field, decl) for field, decl in declared()}


def _device(el: ET.Element, imp: Import, notes: list[str]) -> None:  # noqa: C901 - one branch per libvirt element
    machine = imp.machine
    tag = el.tag
    if tag == "emulator":
        return
    if tag == "disk":
        source = el.find("source")
        path = source.get("file") if source is not None else None
        device = el.get("device", "disk")
        target = el.find("target")
        bus = target.get("bus", "virtio") if target is not None else "virtio"
        driver = el.find("driver")
        if not path:
            notes.append(f"<disk device='{device}'> without a source file: not imported")
            return
        if device == "cdrom":
            machine.setdefault("cdrom", []).append(path)
            return
        if bus not in _DISK_BUS or el.get("type", "file") != "file":
            notes.append(
                f"<disk type='{el.get('type')}' bus='{bus}'>: not imported (qemuspec disks are files on virtio, ide/sata or scsi)"
            )
            return
        disk: dict[str, object] = {"file": path, "interface": _DISK_BUS[bus]}
        if driver is not None and driver.get("type"):
            disk["format"] = driver.get("type")
        options = {
            k: driver.get(k) for k in ("cache", "discard") if driver is not None and driver.get(k)
        }
        if driver is not None and driver.get("io"):
            options["aio"] = driver.get("io")
        if options:
            disk["options"] = options
        if el.find("readonly") is not None:
            disk["readonly"] = True
        if el.findtext("serial"):
            disk["serial"] = el.findtext("serial")
        imp.disks.append(disk)
    elif tag == "interface":
        kind = el.get("type")
        model = el.find("model")
        nic: dict[str, object] = {
            "type": "user",
            "outbound": True,
        }  # libvirt's user networking is not restricted
        if kind == "bridge" and el.find("source") is not None:
            nic = {"type": "bridge", "bridge": el.find("source").get("bridge")}  # type: ignore[union-attr]
        elif kind != "user":
            notes.append(
                f"<interface type='{kind}'>: imported as user-mode networking (qemuspec does not manage libvirt networks)"
            )
        nic["model"] = _NIC_MODEL.get(
            str(model.get("type")) if model is not None else "virtio", "virtio-net-pci"
        )
        mac = el.find("mac")
        if mac is not None and mac.get("address"):
            nic["mac"] = mac.get("address")
        machine.setdefault("nics", []).append(nic)
    elif tag == "filesystem":
        source, target, driver = el.find("source"), el.find("target"), el.find("driver")
        if source is None or target is None:
            notes.append("<filesystem> without source or target: not imported")
            return
        share: dict[str, object] = {"source": source.get("dir"), "tag": target.get("dir")}
        if driver is not None and driver.get("type") == "virtiofs":
            share["type"] = "virtiofs"
        else:
            share["type"] = "9p"
            share["security_model"] = _ACCESS.get(
                el.get("accessmode", "passthrough"), "passthrough"
            )
        if el.find("readonly") is not None:
            share["readonly"] = True
        machine.setdefault("shares", []).append(share)
    elif tag == "channel":
        target = el.find("target")
        if target is not None and target.get("name") == "org.qemu.guest_agent.0":
            machine["agent"] = True
        else:
            notes.append(
                f"<channel> {target.get('name') if target is not None else ''}: not imported"
            )
    elif tag == "rng":
        machine["rng"] = True
    elif tag == "graphics":
        kind = el.get("type")
        if kind in ("vnc", "spice"):
            listen = el.find("listen")
            display: dict[str, object] = {"type": kind}
            if el.get("socket") is None and (listen is None or listen.get("type") != "socket"):
                # libvirt's TCP display without passwd= is open to every local user: the definition says so
                address = (
                    el.get("listen")
                    or (listen.get("address") if listen is not None else None)
                    or "127.0.0.1"
                )
                display.update(listen=address, unauthenticated=el.get("passwd") is None)
                if el.get("passwd") is not None:
                    notes.append(
                        f"<graphics type='{kind}' passwd=...>: the password is not imported; set one with `qemuspec qmp NAME set_password`"
                    )
                if el.get("port") and el.get("port") != "-1" and el.get("autoport") != "yes":
                    display["port"] = int(el.get("port") or 0)
            machine["display"] = {**machine.get("display", {}), **display}
        else:
            notes.append(f"<graphics type='{kind}'>: qemuspec runs machines headless")
    elif tag == "video":
        model = el.find("model")
        vga = _VGA.get(str(model.get("type")) if model is not None else "vga", "std")
        machine["display"] = {**machine.get("display", {"type": "none"}), "vga": vga}
    elif tag in ("serial", "console"):
        notes.append(f"<{tag}>: the first serial port is qemuspec's console")
    elif tag in _device_options():
        field, decl = _device_options()[tag]
        if el.get("model") == decl.model:
            props: dict[str, object] = {
                prop: el.get(attr) == "on"
                for prop, attr in decl.attributes
                if el.get(attr) in ("on", "off")
            }
            machine[field] = {"options": props} if props else True
        elif el.get("model") != decl.off:
            notes.append(
                f"<{tag} model='{el.get('model')}'>: not imported (qemuspec's {field} is model {decl.model})"
            )
    elif tag == "input":
        if el.get("bus") == "usb":
            machine.setdefault("devices", []).append(
                {"driver": f"usb-{el.get('type', 'tablet')}", "options": {}}
            )
            machine.setdefault("machine_options", {})["usb"] = True
    elif tag == "controller":
        notes.append(
            f"<controller type='{el.get('type')}'>: libvirt adds controllers itself; qemu's own are used"
        )
    else:
        notes.append(f"<{tag}>: not imported (no qemuspec counterpart)")
