"""Machine model -> libvirt domain XML: the path past one host.

Typed parts become libvirt elements; what libvirt does not model the way qemuspec does (user-mode
port forwards, option maps, generic devices and objects, ``append``) is carried through libvirt's own
passthrough, ``<qemu:commandline>``, so nothing is lost. Pure, like the argv renderer.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from qemuspec.render import AGENT_PORT, OVMF_CODE, OVMF_VARS, escape, nic_mac, optlist
from qemuspec.spec.models import Machine

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_BOOT = {"a": "fd", "b": "fd", "c": "hd", "d": "cdrom", "n": "network", "o": "network", "p": "network"}
_BUS = {"virtio": ("vd", "virtio"), "ide": ("sd", "sata"), "scsi": ("sd", "scsi"), "nvme": ("sd", "sata")}
_NIC_MODELS = {"virtio-net-pci": "virtio", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139"}


def _json_device(driver: str, props: dict) -> list[str]:
    """A passthrough device in qemu's JSON syntax: libvirt gives its own devices in JSON, and qemu
    creates JSON devices after keyval ones, so a keyval device would take a PCI slot libvirt has
    already assigned. JSON also needs no escaping."""
    import json

    return ["-device", json.dumps({"driver": driver, **props}, separators=(",", ":"))]


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def domain_xml(machine: Machine, name: str, state_dir: str = "/var/lib/qemuspec") -> str:
    ET.register_namespace("qemu", QEMU_NS)
    accels = [machine.accel] if isinstance(machine.accel, str) else list(machine.accel)
    dom = ET.Element("domain", {"type": "kvm" if accels[0] == "kvm" else "qemu"})
    passthrough: list[str] = []
    _sub(dom, "name", name)
    _sub(dom, "memory", str(machine.memory), unit="MiB")
    _sub(dom, "vcpu", str(machine.cpus))

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=machine.machine)
    if machine.firmware.type == "uefi":
        _sub(os_el, "loader", machine.firmware.code or OVMF_CODE, readonly="yes", type="pflash")
        _sub(os_el, "nvram", f"{state_dir}/{name}_VARS.fd", template=machine.firmware.vars or OVMF_VARS)
    elif machine.firmware.code:
        _sub(os_el, "loader", machine.firmware.code, type="rom")
    for tag, value in (("kernel", machine.kernel), ("initrd", machine.initrd), ("cmdline", machine.cmdline)):
        if value is not None:
            _sub(os_el, tag, value)
    for letter in machine.boot_order or "":
        _sub(os_el, "boot", dev=_BOOT[letter])
    features = _sub(dom, "features")
    _sub(features, "acpi")

    if machine.cpu == "host":
        _sub(dom, "cpu", mode="host-passthrough")
    elif machine.cpu == "max":
        _sub(dom, "cpu", mode="maximum")
    else:
        cpu = _sub(dom, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", machine.cpu, fallback="forbid")
    if machine.cpu_options:
        passthrough += ["-cpu", optlist(machine.cpu if machine.cpu != "max" else "max", [], machine.cpu_options)]
    if machine.machine_options:
        passthrough += ["-machine", optlist(None, [], machine.machine_options)]
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    _sub(devices, "emulator", machine.qemu if machine.qemu.startswith("/") else f"/usr/bin/{machine.qemu}")
    counters = {"vd": 0, "sd": 0}
    for disk in machine.disks:
        if disk.interface == "none":
            passthrough += ["-drive", optlist(None, [("if", "none"), ("file", disk.file)] + ([("format", disk.format)] if disk.format else []), disk.options)]
            continue
        prefix, bus = _BUS[disk.interface]
        el = _sub(devices, "disk", type="file", device="disk")
        _sub(el, "driver", name="qemu", type=disk.format or "raw", **{k: escape(v) for k, v in disk.options.items() if k in ("cache", "io", "discard")})
        _sub(el, "source", file=disk.file)
        _sub(el, "target", dev=f"{prefix}{chr(ord('a') + counters[prefix])}", bus=bus)
        counters[prefix] += 1
        if disk.readonly:
            _sub(el, "readonly")
        if disk.serial:
            _sub(el, "serial", disk.serial)
    for iso in machine.cdrom:
        el = _sub(devices, "disk", type="file", device="cdrom")
        _sub(el, "driver", name="qemu", type="raw")
        _sub(el, "source", file=iso)
        _sub(el, "target", dev=f"sd{chr(ord('a') + counters['sd'])}", bus="sata")
        counters["sd"] += 1
        _sub(el, "readonly")
    for index, nic in enumerate(machine.nics):
        if nic.type == "user" and not nic.forwards and not nic.options and nic.model in _NIC_MODELS:
            el = _sub(devices, "interface", type="user")
            if nic.mac:
                _sub(el, "mac", address=nic.mac)
            _sub(el, "model", type=_NIC_MODELS[nic.model])
        elif nic.type == "bridge":
            el = _sub(devices, "interface", type="bridge")
            _sub(el, "source", bridge=nic.bridge or "")
            _sub(el, "model", type=_NIC_MODELS.get(nic.model, "virtio"))
        else:  # forwards, sockets, private networks: libvirt's user networking has no hostfwd
            from qemuspec.render import Layout, _nic

            netdev = _nic(index, nic, name, Layout(state_dir, f"/run/qemuspec/{name}"))[:2]
            passthrough += [netdev[0], netdev[1].replace(f"id=qemuspec-net{index}", f"id=qsnet{index}", 1)]
            mac = nic_mac(name, index, nic)
            passthrough += _json_device(nic.model, {"netdev": f"qsnet{index}", **({"mac": mac} if mac else {}), **nic.device_options})
    for share in machine.shares:
        if share.type == "9p":
            el = _sub(devices, "filesystem", type="mount", accessmode={"mapped-xattr": "mapped", "mapped-file": "mapped", "passthrough": "passthrough", "none": "squash"}[share.security_model])
            _sub(el, "source", dir=share.source)
            _sub(el, "target", dir=share.tag)
            if share.readonly:
                _sub(el, "readonly")
        else:
            el = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
            _sub(el, "driver", type="virtiofs")
            _sub(el, "source", dir=share.source)
            _sub(el, "target", dir=share.tag)
    if machine.serial != "none":
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if machine.agent:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=AGENT_PORT)
    if machine.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    display = machine.display
    if display.type in ("vnc", "spice"):
        attrs = {"listen": display.listen}
        attrs.update({"port": str(display.port)} if display.port else {"autoport": "yes"})
        _sub(devices, "graphics", type=display.type, **attrs)
        if display.vga != "default":
            video = _sub(devices, "video")
            _sub(video, "model", type={"std": "vga", "virtio": "virtio", "qxl": "qxl", "cirrus": "cirrus"}.get(display.vga, "vga"))
    elif display.type in ("gtk", "sdl"):
        _sub(devices, "graphics", type="sdl" if display.type == "sdl" else "egl-headless")
    for obj in machine.objects:
        passthrough += ["-object", optlist(obj.type, [("id", obj.id)], obj.options)]
    for dev in machine.devices:
        passthrough += _json_device(dev.driver, {**({"id": dev.id} if dev.id else {}), **dev.options})
    passthrough += machine.append
    if passthrough:
        cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in passthrough:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"

