"""Machine model -> libvirt domain XML: the path past one host.

Typed parts become libvirt elements; what libvirt does not model the way qemuspec does (user-mode
port forwards, option maps, generic devices and objects, ``append``) is carried through libvirt's own
passthrough, ``<qemu:commandline>``, so nothing is lost; what neither can carry is refused with a
clear error (``SpecError``), never dropped. Pure, like the argv renderer: the libvirt backend hands in
where read-only media live on the target host (``media``) and the ownership record (``owner``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from typing import TYPE_CHECKING, Mapping

from qemuspec.errors import SpecError
from qemuspec.render import (
    AGENT_PORT,
    OVMF_CODE,
    OVMF_VARS,
    OWN_ID_PREFIX,
    escape,
    nic_mac,
    optlist,
    wants_cidata,
)

if TYPE_CHECKING:
    from qemuspec.spec.models import Machine

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
OWNER_NS = "https://qemuspec.dev/xmlns/libvirt/1"
# Machine fields that are not part of the domain: the libvirt backend acts on them at run time
# (readiness, stop timeout, ordering, placement, start paused, ssh login); the monitor is libvirt's.
BACKEND_FIELDS = {
    "ready": "probes",
    "stop_timeout": "down",
    "depends_on": "ordering",
    "host": "placement",
    "paused": "started paused",
    "ssh": "ssh probe and login",
    "qmp": "libvirt owns the monitor",
    "provision": "run in the guest after boot (the libvirt backend refuses it for now)",
}
_DRIVER_OPTIONS = ("cache", "io", "discard")
_ON_POWEROFF = {"no": "destroy", "on-failure": "destroy", "always": "restart"}
_ON_CRASH = {"no": "destroy", "on-failure": "restart", "always": "restart"}


def lifecycle(restart: str) -> list[tuple[str, str]]:
    """(event, action) pairs the domain XML's on_poweroff and on_crash say for this restart policy
    (the tables above): what a live change of ``restart`` sets with ``setLifecycleAction``."""
    return [("poweroff", _ON_POWEROFF[restart]), ("crash", _ON_CRASH[restart])]


def _refuse(name: str, field: str, why: str) -> None:
    raise SpecError(
        f"machines.{name}.{field}: {why}; libvirt cannot carry it: remove it, or run this machine locally (no host, no --connect)"
    )


_BOOT = {
    "a": "fd",
    "b": "fd",
    "c": "hd",
    "d": "cdrom",
    "n": "network",
    "o": "network",
    "p": "network",
}
_BUS = {
    "virtio": ("vd", "virtio"),
    "ide": ("sd", "sata"),
    "scsi": ("sd", "scsi"),
    "nvme": ("sd", "sata"),
}
_NIC_MODELS = {
    "virtio-net-pci": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
}


def _json_device(driver: str, props: dict) -> list[str]:
    """A passthrough device in qemu's JSON syntax: libvirt gives its own devices in JSON, and qemu
    creates JSON devices after keyval ones, so a keyval device would take a PCI slot libvirt has
    already assigned. JSON also needs no escaping."""
    import json

    return ["-device", json.dumps({"driver": driver, **props}, separators=(",", ":"))]


def _device_options(machine: Machine, name: str, devices: ET.Element) -> None:
    """The element of each option the model declares as one device (spec/devices.py); when the option
    is off and libvirt would add such a device by default, the element that says none."""
    from qemuspec.spec.models import declared

    for field, decl in declared():
        value = getattr(machine, field)
        if value is None:
            if decl.off is not None:
                _sub(devices, decl.libvirt, model=decl.off)
            continue
        attributes = dict(decl.attributes)
        attrs = {"model": decl.model}
        for prop, setting in value.options.items():
            if prop not in attributes or not isinstance(setting, bool):
                _refuse(
                    name,
                    f"{field}.options",
                    f"{prop} is not an on/off attribute of <{decl.libvirt}> "
                    f"(those are: {', '.join(attributes) or 'none'})",
                )
            attrs[attributes[prop]] = escape(setting)
        _sub(devices, decl.libvirt, **attrs)


# What libvirt's `plan` compares (backends/libvirt_domain.project): the elements and attributes this
# export writes, one line each, so that what is written is what is compared, and libvirt's own
# additions (PCI addresses, controllers, uuid) are not noise. Device options add their element.
PROJECTED = (
    "memory",
    "vcpu",
    "os/type",
    "os/kernel",
    "os/initrd",
    "os/cmdline",
    "os/loader",
    "os/boot",
    "cpu",
    "cpu/model",
    "on_poweroff",
    "on_crash",
    "devices/emulator",
    "devices/disk",
    "devices/disk/source",
    "devices/disk/target",
    "devices/disk/driver",
    "devices/interface",
    "devices/interface/source",
    "devices/interface/model",
    "devices/filesystem",
    "devices/filesystem/source",
    "devices/filesystem/target",
    "devices/serial",
    "devices/channel/target",
    "devices/rng",
    "devices/graphics",
    "devices/video/model",
)
PROJECTED_ATTRS = {
    "os/type": ("machine",),
    "cpu": ("mode",),
    "devices/disk": ("device",),
    "devices/disk/source": ("file",),
    "devices/disk/target": ("bus",),
    "devices/disk/driver": ("type", "cache", "io", "discard"),
    "devices/interface": ("type",),
    "devices/interface/source": ("bridge",),
    "devices/interface/model": ("type",),
    "devices/filesystem/source": ("dir",),
    "devices/filesystem/target": ("dir",),
    "devices/serial": ("type",),
    "devices/channel/target": ("name",),
    "devices/rng": ("model",),
    "devices/graphics": ("type", "listen", "port"),
    "devices/video/model": ("type",),
    "devices/filesystem": ("accessmode",),
    "os/boot": ("dev",),
    "os/loader": ("type", "readonly"),
}


def projected() -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(element paths, their attributes) that libvirt's `plan` compares."""
    from qemuspec.spec.models import declared

    paths, attrs = list(PROJECTED), dict(PROJECTED_ATTRS)
    for _, decl in declared():
        paths.append(f"devices/{decl.libvirt}")
        attrs[f"devices/{decl.libvirt}"] = ("model", *(attr for _, attr in decl.attributes))
    return tuple(paths), attrs


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def kvm_offered(capabilities: str, arch: str = "x86_64") -> bool:
    """Whether a libvirt host's capabilities (``virConnectGetCapabilities``) offer KVM domains for
    ``arch``: what "auto" needs to mean kvm there (render.accelerators)."""
    try:
        root = ET.fromstring(capabilities)
    except ET.ParseError:
        return False
    return any(
        guest.find(f"arch[@name='{arch}']/domain[@type='kvm']") is not None
        for guest in root.iter("guest")
    )


def domain_xml(
    machine: Machine,
    name: str,
    state_dir: str = "/var/lib/qemuspec",
    media: Mapping[str, str] = {},
    owner: Mapping[str, str] | None = None,
    serial_log: str | None = None,
    kvm: bool = False,
) -> str:
    """``media`` maps a path on this host to the same file on the libvirt host; ``owner`` becomes
    the ``<metadata>`` record that marks the domain as qemuspec's. ``kvm``: the target host offers
    KVM (:func:`kvm_offered`), so "auto" is ``<domain type="kvm">`` there, as it is locally."""
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace("qemuspec", OWNER_NS)
    at = lambda path: media.get(path, path)  # noqa: E731
    if machine.defaults:
        _refuse(name, "defaults", "libvirt always starts qemu with -nodefaults")
    if getattr(machine, "warm", False):
        _refuse(
            name,
            "warm",
            "warm start restores qemuspec's own saved state; through libvirt, use virsh managedsave",
        )
    if machine.overrides:
        _refuse(
            name,
            "overrides",
            "libvirt renders those switches from the domain XML itself and cannot leave them out for append's",
        )
    if machine.accel_options:
        _refuse(
            name,
            "accel_options",
            "libvirt passes -accel itself and has no per-accelerator properties",
        )
    from qemuspec.render import accelerators

    accels = accelerators(machine.accel, kvm)  # the one meaning of accel, against the target host
    dom = ET.Element("domain", {"type": "kvm" if accels[0] == "kvm" else "qemu"})
    passthrough: list[str] = []
    _sub(dom, "name", name)
    if owner is not None:
        meta = _sub(dom, "metadata")
        _sub(meta, f"{{{OWNER_NS}}}owner", **owner)
    _sub(dom, "memory", str(machine.memory), unit="MiB")
    _sub(dom, "vcpu", str(machine.cpus))

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=machine.machine)
    if machine.firmware.type == "uefi":
        _sub(os_el, "loader", machine.firmware.code or OVMF_CODE, readonly="yes", type="pflash")
        nvram = _sub(os_el, "nvram", template=machine.firmware.vars or OVMF_VARS)
        if (
            owner is None
        ):  # the backend lets libvirt choose (and remove, on undefine) the NVRAM file
            nvram.text = f"{state_dir}/{name}_VARS.fd"
    elif machine.firmware.code:
        _sub(os_el, "loader", machine.firmware.code, type="rom")
    for tag, value in (
        ("kernel", machine.kernel),
        ("initrd", machine.initrd),
        ("cmdline", machine.cmdline),
    ):
        if value is not None:
            _sub(os_el, tag, at(value) if tag != "cmdline" else value)
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
        passthrough += [
            "-cpu",
            optlist(machine.cpu if machine.cpu != "max" else "max", [], machine.cpu_options),
        ]
    if machine.machine_options:
        passthrough += ["-machine", optlist(None, [], machine.machine_options)]
    _sub(dom, "on_poweroff", _ON_POWEROFF[machine.restart])
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", _ON_CRASH[machine.restart])

    devices = _sub(dom, "devices")
    _sub(
        devices,
        "emulator",
        machine.qemu if machine.qemu.startswith("/") else f"/usr/bin/{machine.qemu}",
    )
    counters = {"vd": 0, "sd": 0}
    for index, disk in enumerate(machine.disks):
        if (
            disk.image is not None
        ):  # the base lives in this host's image cache, the overlay is made by `up` here
            _refuse(
                name,
                f"disks.{index}.image",
                "a base image by URL is pulled into this host's image cache; for a libvirt "
                "host, `qemuspec img pull` it and give the cached file as backing",
            )
        if disk.interface in (
            "none",
            "nvme",
        ):  # libvirt 9 has no nvme disk bus: qemu's own options carry it
            drive = [
                ("if", "none"),
                ("id", disk.id or f"{OWN_ID_PREFIX}disk{index}"),
                ("file", at(disk.file)),
            ] + ([("format", disk.format)] if disk.format else [])
            passthrough += [
                "-drive",
                optlist(
                    None, drive + ([("readonly", True)] if disk.readonly else []), disk.options
                ),
            ]
            if disk.interface == "nvme":
                passthrough += _json_device(
                    "nvme",
                    {
                        "drive": disk.id or f"{OWN_ID_PREFIX}disk{index}",
                        "serial": disk.serial or f"disk{index}",
                        **disk.device_options,
                    },
                )
            elif disk.device_options:
                _refuse(
                    name,
                    f"disks.{index}.device_options",
                    'a disk with interface = "none" has no device',
                )
            continue
        if disk.id:
            _refuse(
                name,
                f"disks.{index}.id",
                'libvirt names the drives of its disks itself: use interface = "none" to give this drive to your own device',
            )
        other = sorted(set(disk.options) - set(_DRIVER_OPTIONS))
        if other:
            _refuse(
                name,
                f"disks.{index}.options",
                f"{', '.join(other)} has no libvirt <driver> attribute (only {', '.join(_DRIVER_OPTIONS)})",
            )
        if disk.device_options:
            _refuse(
                name, f"disks.{index}.device_options", "libvirt builds the disk's -device itself"
            )
        prefix, bus = _BUS[disk.interface]
        el = _sub(devices, "disk", type="file", device="disk")
        _sub(
            el,
            "driver",
            name="qemu",
            type=disk.format or "raw",
            **{k: escape(v) for k, v in disk.options.items()},
        )
        _sub(el, "source", file=at(disk.file))
        _sub(el, "target", dev=f"{prefix}{chr(ord('a') + counters[prefix])}", bus=bus)
        counters[prefix] += 1
        if disk.readonly:
            _sub(el, "readonly")
        if disk.serial:
            _sub(el, "serial", disk.serial)
    for iso in machine.cdrom:
        el = _sub(devices, "disk", type="file", device="cdrom")
        _sub(el, "driver", name="qemu", type="raw")
        _sub(el, "source", file=at(iso))
        _sub(el, "target", dev=f"sd{chr(ord('a') + counters['sd'])}", bus="sata")
        counters["sd"] += 1
        _sub(el, "readonly")
    if wants_cidata(machine):  # the NoCloud seed; the backend builds and uploads it
        el = _sub(devices, "disk", type="file", device="cdrom")
        _sub(el, "driver", name="qemu", type="raw")
        _sub(el, "source", file=media.get("cidata", f"{state_dir}/{name}/cidata.iso"))
        _sub(
            el, "target", dev=f"sd{chr(ord('a') + counters['sd'])}", bus="scsi"
        )  # virtio-scsi, as qemuspec's own argv has it
        counters["sd"] += 1
        _sub(el, "readonly")
    if any(d.get("bus") == "scsi" for d in devices.iter("target")):
        _sub(
            devices, "controller", type="scsi", model="virtio-scsi"
        )  # not libvirt's default lsilogic
    for index, nic in enumerate(machine.nics):
        typed = not nic.options and not nic.device_options and nic.model in _NIC_MODELS
        if (
            nic.type == "user" and nic.outbound and not nic.forwards and typed
        ):  # libvirt's user NIC has no restrict=on
            el = _sub(devices, "interface", type="user")
            mac = nic_mac(name, index, nic)
            if mac:
                _sub(el, "mac", address=mac)
            _sub(el, "model", type=_NIC_MODELS[nic.model])
        elif nic.type == "bridge":
            if not typed:
                _refuse(
                    name,
                    f"nics.{index}",
                    f"a bridge NIC through libvirt takes a model of {', '.join(_NIC_MODELS)} and no options",
                )
            el = _sub(devices, "interface", type="bridge")
            mac = nic_mac(name, index, nic)
            if mac:
                _sub(el, "mac", address=mac)
            _sub(el, "source", bridge=nic.bridge or "")
            _sub(el, "model", type=_NIC_MODELS[nic.model])
        elif nic.type == "network":
            _refuse(
                name,
                f"nics.{index}.network",
                "a private network is a vde switch on the machine's own host; through libvirt, use a bridge NIC on a libvirt network's bridge",
            )
        else:  # forwards, restrict=on, sockets: libvirt's user networking has neither hostfwd nor restrict
            from qemuspec.render import _nic

            netdev = _nic(index, nic, name, None)[:2]
            passthrough += netdev
            mac = nic_mac(name, index, nic)
            passthrough += _json_device(
                nic.model,
                {
                    "netdev": f"{OWN_ID_PREFIX}net{index}",
                    **({"mac": mac} if mac else {}),
                    **nic.device_options,
                },
            )
    for index, share in enumerate(machine.shares):
        if share.options:
            _refuse(
                name, f"shares.{index}.options", "libvirt builds the share's -fsdev/-device itself"
            )
        if share.type == "9p":
            el = _sub(
                devices,
                "filesystem",
                type="mount",
                accessmode={
                    "mapped-xattr": "mapped",
                    "mapped-file": "mapped",
                    "passthrough": "passthrough",
                    "none": "squash",
                }[share.security_model],
            )
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
        if serial_log:
            _sub(serial, "log", file=serial_log, append="on")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if machine.agent:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=AGENT_PORT)
    _device_options(
        machine, name, devices
    )  # before <rng>: libvirt keeps <memballoon> there, and plan compares in order
    if machine.rng:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
    display = machine.display
    if display.options:
        _refuse(name, "display.options", "libvirt builds -vnc/-spice itself")
    if display.type == "curses":
        _refuse(name, "display", 'libvirt has no curses display: use "vnc" or "spice"')
    if display.type in ("vnc", "spice"):
        if (
            display.listen is None and display.port is None
        ):  # a unix socket in libvirt's private directory
            graphics = _sub(devices, "graphics", type=display.type)
            _sub(graphics, "listen", type="socket")
        else:
            if not display.unauthenticated:
                _refuse(
                    name,
                    "display",
                    "a TCP display through libvirt needs its password in the domain XML: use the default unix socket, "
                    "or unauthenticated = true",
                )
            attrs = {"listen": display.listen or "127.0.0.1"}
            attrs.update({"port": str(display.port)} if display.port else {"autoport": "yes"})
            _sub(devices, "graphics", type=display.type, **attrs)
        if display.vga != "default":
            video = _sub(devices, "video")
            _sub(
                video,
                "model",
                type={"std": "vga", "virtio": "virtio", "qxl": "qxl", "cirrus": "cirrus"}.get(
                    display.vga, "vga"
                ),
            )
    elif display.type in ("gtk", "sdl"):
        _sub(devices, "graphics", type="sdl" if display.type == "sdl" else "egl-headless")
    elif display.type == "egl-headless":
        _sub(devices, "graphics", type="egl-headless")
    for obj in machine.objects:
        passthrough += ["-object", optlist(obj.type, [("id", obj.id)], obj.options)]
    for dev in machine.devices:
        passthrough += _json_device(
            dev.driver, {**({"id": dev.id} if dev.id else {}), **dev.options}
        )
    passthrough += machine.append
    if passthrough:
        cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in passthrough:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"
