"""Machine model -> qemu argv. A pure function: no I/O, deterministic order.

Every value that lands inside a qemu option list is escaped the way qemu's option parser reads it
(a ``,`` is written ``,,``), and every key and driver name is an identifier the model has validated,
so nothing in a definition can add an option of its own. The one exception is ``append``, which is
passthrough by design and goes last.

Where a VM's files live (sockets, logs, pidfile) is the :class:`Layout`'s business; one function
builds it for a machine (``runtime/paths.machine_layout``: accelerators and monitor resolved once), and
the runtime may hand over pre-opened listening sockets (``fds``) in place of paths. What ``accel``
means is decided here once (:func:`accelerators`), for qemu's argv and libvirt's ``<domain type>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from qemuspec.runtime.paths import Layout
    from qemuspec.spec.models import Disk, Machine, NIC, OptionValue


OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
AGENT_PORT = "org.qemu.guest_agent.0"

OWN_ID_PREFIX = "qemuspec-"  # every id qemuspec gives; a definition's own ids may not start with it


def own(name: str) -> str:
    """The qemu id of a piece qemuspec adds (monitor, console, disk, NIC...): it can never collide with a
    user's id, because the model refuses user ids that start with the prefix."""
    return OWN_ID_PREFIX + name


DISK_DEVICE = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd", "nvme": "nvme"}
SCSI_CONTROLLER = OWN_ID_PREFIX + "scsi0"  # the virtio-scsi-pci that scsi disks sit on


def netdev_id(index: int) -> str:
    """The qemu id of NIC ``index``'s netdev (what hostfwd_add and set_link name at run time)."""
    return own(f"net{index}")


def cdrom_id(index: int) -> str:
    """The qemu id of cdrom ``index``'s drive (what a media change names at run time)."""
    return own(f"cd{index}")


def mac_address(name: str, index: int) -> str:
    """A stable, locally administered MAC for a machine's NIC (the guest finds its address by it)."""
    import hashlib

    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def nic_mac(name: str, index: int, nic: NIC) -> str | None:
    """The MAC a NIC gets: its own, or a stable one when the guest must find the NIC by it."""
    return nic.mac or (mac_address(name, index) if (nic.network or nic.address) else None)


def wants_cidata(machine: Machine) -> bool:
    return machine.cloud_init is not None or any(n.address for n in machine.nics)


def wants_vmgenid(machine: Machine) -> bool:
    """A warm machine gets a VM generation ID: qemu gives it a new GUID on every start (restores
    included), and a Linux guest with CONFIG_VMGENID reseeds its RNG when it changes. It needs ACPI
    (pc/q35 machine types)."""
    return (
        machine.warm
        and machine.machine.startswith(("pc", "q35"))
        and not any(d.driver == "vmgenid" for d in machine.devices)
    )


def escape(value: OptionValue) -> str:
    """One value as qemu's option parser reads it back: booleans on/off, commas doubled."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return value.replace(",", ",,")


def optlist(
    head: str | None,
    pairs: Iterable[tuple[str, OptionValue]],
    options: Mapping[str, OptionValue] = {},
) -> str:
    """``head,key=value,...``; keys from ``options`` replace typed keys of the same name."""
    merged = [(k, v) for k, v in pairs if k not in options] + list(options.items())
    parts = [head] if head else []
    parts += [f"{key}={escape(value)}" for key, value in merged]
    return ",".join(parts)


def render(machine: Machine, name: str, layout: Layout) -> list[str]:
    argv: list[str] = [machine.qemu, "-name", optlist(None, [("guest", name)])]
    virtiofs = any(s.type == "virtiofs" for s in machine.shares)
    machine_pairs: list[tuple[str, OptionValue]] = [("type", machine.machine)]
    if virtiofs:
        machine_pairs.append(("memory-backend", own("mem0")))
    argv += ["-machine", optlist(None, machine_pairs, machine.machine_options)]
    if not layout.accel:
        raise ValueError(
            "a Layout without resolved accelerators: build it with runtime.paths.machine_layout"
        )
    for index, accel in enumerate(layout.accel):
        argv += ["-accel", optlist(accel, [], machine.accel_options if index == 0 else {})]
    if machine.machine != "none":  # the empty machine has no CPUs to configure
        argv += ["-cpu", optlist(machine.cpu, [], machine.cpu_options), "-smp", str(machine.cpus)]
    argv += ["-m", f"{machine.memory}M"]
    argv += ["-no-user-config"] if machine.defaults else ["-nodefaults", "-no-user-config"]
    argv += _display(machine, layout)
    argv += ["-pidfile", layout.pidfile]
    argv += _monitors(layout)
    if machine.paused:
        argv.append("-S")
    argv += _serial(machine, layout)
    argv += _firmware(machine, layout)
    if machine.kernel:
        argv += ["-kernel", machine.kernel]
    if machine.initrd:
        argv += ["-initrd", machine.initrd]
    if machine.cmdline is not None:
        argv += ["-append", machine.cmdline]
    if machine.boot_order:
        argv += ["-boot", optlist(None, [("order", machine.boot_order)])]
    argv += _disks(machine.disks)
    for index, iso in enumerate(machine.cdrom):
        argv += [
            "-drive",
            optlist(
                None,
                [
                    ("if", "none"),
                    ("id", cdrom_id(index)),
                    ("media", "cdrom"),
                    ("readonly", True),
                    ("format", "raw"),
                    ("file", iso),
                ],
            ),
        ]
        argv += ["-device", optlist("ide-cd", [("drive", cdrom_id(index))])]
    if wants_cidata(machine):
        argv += [
            "-drive",
            optlist(
                None,
                [
                    ("if", "none"),
                    ("id", own("cidata")),
                    ("media", "cdrom"),
                    ("readonly", True),
                    ("format", "raw"),
                    ("file", layout.cidata),
                ],
            ),
        ]
        argv += [
            "-device",
            f"virtio-scsi-pci,id={own('cidata-scsi')}",
            "-device",
            f"scsi-cd,drive={own('cidata')},bus={own('cidata-scsi')}.0",
        ]
    for index, nic in enumerate(machine.nics):
        argv += _nic(index, nic, name, layout)
    argv += _shares(machine, layout)
    if machine.rng:
        argv += [
            "-object",
            f"rng-random,id={own('rng0')},filename=/dev/urandom",
            "-device",
            f"virtio-rng-pci,rng={own('rng0')}",
        ]
    if machine.agent:
        argv += ["-chardev", _socket_chardev(own("qga0"), layout, "qga", layout.qga)]
        argv += ["-device", f"virtio-serial-pci,id={own('vser0')}"]
        argv += [
            "-device",
            f"virtserialport,bus={own('vser0')}.0,chardev={own('qga0')},name={AGENT_PORT}",
        ]
    for obj in machine.objects:
        argv += ["-object", optlist(obj.type, [("id", obj.id)], obj.options)]
    for dev in machine.devices:
        argv += ["-device", optlist(dev.driver, [("id", dev.id)] if dev.id else [], dev.options)]
    argv += _device_options(machine)
    if wants_vmgenid(machine):
        argv += ["-device", "vmgenid,id=qemuspec-vmgenid"]
    if _wants_pvpanic(machine):
        argv += ["-device", f"pvpanic,id={own('pvpanic')}"]
    if machine.overrides:
        argv = _without(argv, machine.overrides)
    argv += machine.append
    return argv


def _device_options(machine: Machine) -> list[str]:
    """The devices of options the model declares as one device each (spec/devices.py), in field order."""
    from qemuspec.spec.models import declared

    argv: list[str] = []
    for name, decl in declared():
        value = getattr(machine, name)
        if value is not None:
            argv += ["-device", optlist(decl.driver, [("id", own(decl.id))], value.options)]
    return argv


def _wants_pvpanic(machine: Machine) -> bool:
    """qemu must hear of a guest panic: without a pvpanic device a panicked Linux just hangs, so a
    readiness wait would sit out its timeout and a restart policy would never see the failure. The ISA
    device (port 0x505, found through ACPI) takes no PCI slot, so the devices the definition declares keep
    their addresses. Added on pc/q35 machines unless the definition has one already."""
    if not (
        machine.machine.startswith(("q35", "pc"))
        or "-q35-" in machine.machine
        or "-i440fx-" in machine.machine
    ):
        return False
    if any(dev.driver.startswith("pvpanic") for dev in machine.devices):
        return False
    return not any("pvpanic" in arg for arg in machine.append)


def _without(argv: list[str], overrides: list[str]) -> list[str]:
    """The rendered argv less the switches the definition overrides on purpose (its append has them)."""
    from qemuspec.spec.qemuopts import parse_argv
    from qemuspec.spec.passthrough import switch

    dropped = {switch(name) for name in overrides}
    out = argv[:1]
    for name, value in parse_argv(argv):
        if switch("-" + name) not in dropped:
            out += ["-" + name] + ([] if value is None else [value])
    return out


def accelerators(wanted: str | Sequence[str], kvm: bool) -> tuple[str, ...]:
    """The one meaning of ``accel``: "auto" is kvm when the host offers a KVM that answers (``kvm``:
    this host's probe for a local machine, the target's capabilities for libvirt), else tcg; a list
    is kept in order (qemu takes the first that starts), duplicates dropped."""
    out: list[str] = []
    for one in [wanted] if isinstance(wanted, str) else list(wanted):
        one = one.strip()
        if one == "auto":
            one = "kvm" if kvm else "tcg"
        if one and one not in out:
            out.append(one)
    return tuple(out)


def accel_fallback(wanted: str | Sequence[str], chosen: tuple[str, ...]) -> tuple[str, ...]:
    """What to start again on when qemu cannot start on ``chosen``: tcg after a KVM that "auto" chose
    (it exists but fails: nested hosts, bad MSRs), never against an explicit kvm; () for none."""
    listed = [wanted] if isinstance(wanted, str) else list(wanted)
    if "kvm" not in chosen or "tcg" in chosen:
        return ()
    if "auto" in listed or ("tcg" in listed and listed.index("tcg") > listed.index("kvm")):
        return ("tcg",)
    return ()


def display_endpoint(machine: Machine, layout: Layout) -> dict | None:
    """Where a vnc/spice display listens and who may connect (``auth``): ``owner``, the private unix
    socket in the runtime directory (the default); ``password``, TCP that refuses every client until a
    password is set over QMP (``set_password``); ``none``, TCP open to every local user (opt-in)."""
    display = machine.display
    if display.type not in ("vnc", "spice"):
        return None
    if display.listen is None and display.port is None:
        return {"type": display.type, "socket": layout.display, "auth": "owner"}
    port = display.port or (5900 if display.type == "vnc" else 5930)
    return {
        "type": display.type,
        "address": display.listen or "127.0.0.1",
        "port": port,
        "auth": "none" if display.unauthenticated else "password",
    }


def _display(machine: Machine, layout: Layout) -> list[str]:
    display = machine.display
    if display.type == "none":
        return ["-display", "none"]
    argv = ["-vga", display.vga] if display.vga != "default" else []
    where = display_endpoint(machine, layout)
    if where is None:
        return argv + ["-display", optlist(display.type, [], display.options)]
    if display.type == "vnc":
        if "socket" in where:
            head, pairs = f"unix:{escape(where['socket'])}", []
        else:  # password=on: qemu refuses every client until set_password gives one
            host = f"[{where['address']}]" if ":" in where["address"] else where["address"]
            head, pairs = (
                f"{escape(host)}:{where['port'] - 5900}",
                [] if display.unauthenticated else [("password", True)],
            )
        return argv + ["-display", "none", "-vnc", optlist(head, pairs, display.options)]
    if "socket" in where:  # the socket's directory is the authentication
        pairs = [("unix", True), ("addr", where["socket"]), ("disable-ticketing", True)]
    else:  # ticketing without a password: nobody connects until set_password
        pairs = [("addr", where["address"]), ("port", where["port"])] + (
            [("disable-ticketing", True)] if display.unauthenticated else []
        )
    return argv + ["-display", "none", "-spice", optlist(None, pairs, display.options)]


def _socket_chardev(
    chardev_id: str,
    layout: Layout,
    role: str,
    path: str,
    extra: Iterable[tuple[str, OptionValue]] = (),
) -> str:
    fd = layout.fds.get(role)
    where: list[tuple[str, OptionValue]] = [("fd", fd)] if fd is not None else [("path", path)]
    return optlist(
        "socket", [("id", chardev_id), *where, ("server", True), ("wait", False), *extra]
    )


def _monitors(layout: Layout) -> list[str]:
    """The controller's monitor and the tools' monitor, both unix sockets; with qmp.transport = "tcp"
    a third monitor on 127.0.0.1 that only TLS clients with a certificate from the state directory's
    CA can use (QMP has no authentication, and any local user can reach a loopback port)."""
    main = _socket_chardev(own("qmp"), layout, "qmp", layout.qmp)
    client = _socket_chardev(own("qmp-client"), layout, "qmp-client", layout.qmp_client)
    argv = [
        "-chardev",
        main,
        "-mon",
        f"chardev={own('qmp')},mode=control",
        "-chardev",
        client,
        "-mon",
        f"chardev={own('qmp-client')},mode=control",
    ]
    if layout.qmp_port is not None:
        fd = layout.fds.get("qmp-tcp")
        where: list[tuple[str, OptionValue]] = (
            [("fd", fd)] if fd is not None else [("host", "127.0.0.1"), ("port", layout.qmp_port)]
        )
        argv += [
            "-object",
            optlist(
                "tls-creds-x509",
                [
                    ("id", own("qmp-tls")),
                    ("dir", layout.tls_dir),
                    ("endpoint", "server"),
                    ("verify-peer", True),
                ],
            ),
            "-chardev",
            optlist(
                "socket",
                [
                    ("id", own("qmp-tcp")),
                    *where,
                    ("server", True),
                    ("wait", False),
                    ("tls-creds", own("qmp-tls")),
                ],
            ),
            "-mon",
            f"chardev={own('qmp-tcp')},mode=control",
        ]
    return argv


def _serial(machine: Machine, layout: Layout) -> list[str]:
    if machine.serial == "none":
        return ["-serial", "none"]
    if machine.serial == "pty":
        chardev = optlist(
            "pty", [("id", own("serial0")), ("logfile", layout.serial_log), ("logappend", True)]
        )
    elif machine.serial == "log":
        # serial.log is written by the console's reader (runtime/console.py), not by qemu: qemu's
        # logfile= repeats bytes behind a slow socket reader and grows without bound while it runs
        chardev = _socket_chardev(own("serial0"), layout, "console", layout.console)
    else:
        chardev = _socket_chardev(own("serial0"), layout, "console", layout.console)
    return ["-chardev", chardev, "-serial", f"chardev:{own('serial0')}"]


def _firmware(machine: Machine, layout: Layout) -> list[str]:
    fw = machine.firmware
    if fw.type == "bios":
        return ["-bios", fw.code] if fw.code else []
    code = fw.code or OVMF_CODE
    return [
        "-drive",
        optlist(
            None,
            [("if", "pflash"), ("format", "raw"), ("unit", 0), ("readonly", True), ("file", code)],
        ),
        "-drive",
        optlist(None, [("if", "pflash"), ("format", "raw"), ("unit", 1), ("file", layout.efivars)]),
    ]


def _disks(disks: list[Disk]) -> list[str]:
    argv: list[str] = []
    if any(d.interface == "scsi" for d in disks):
        argv += ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER}"]
    for index, disk in enumerate(disks):
        drive_id = disk.id or own(f"disk{index}")
        pairs: list[tuple[str, OptionValue]] = [
            ("if", "none"),
            ("id", drive_id),
            ("file", disk.file),
        ]
        if disk.format:
            pairs.append(("format", disk.format))
        if disk.readonly:
            pairs.append(("readonly", True))
        argv += ["-drive", optlist(None, pairs, disk.options)]
        if disk.interface == "none":
            continue
        dev: list[tuple[str, OptionValue]] = [("drive", drive_id)]
        if disk.interface == "scsi":
            dev.append(("bus", f"{SCSI_CONTROLLER}.0"))
        if disk.serial or disk.interface == "nvme":
            dev.append(("serial", disk.serial or drive_id))
        argv += ["-device", optlist(DISK_DEVICE[disk.interface], dev, disk.device_options)]
    return argv


def _address(value: str) -> list[tuple[str, OptionValue]]:
    """A stream netdev's address: a unix socket path, or host:port."""
    if value.startswith("/"):
        return [("addr.type", "unix"), ("addr.path", value)]
    host, _, port = value.rpartition(":")
    return [("addr.type", "inet"), ("addr.host", host or "127.0.0.1"), ("addr.port", port)]


def _nic(index: int, nic: NIC, name: str, layout: Layout | None) -> list[str]:
    net_id = netdev_id(index)
    pairs: list[tuple[str, OptionValue]] = [("id", net_id)]
    if nic.type == "user":
        if (
            not nic.outbound
        ):  # else the guest reaches the host's 127.0.0.1 as 10.0.2.2 (forwards still work)
            pairs.append(("restrict", True))
        for fwd in nic.forwards:
            pairs.append(("hostfwd", f"{fwd.protocol}:{fwd.address}:{fwd.host}-:{fwd.guest}"))
    elif nic.type == "socket":
        for key in ("listen", "connect", "mcast"):
            if getattr(nic, key):
                pairs.append((key, getattr(nic, key)))
    elif nic.type == "stream":
        if nic.listen:
            pairs += [("server", True), *_address(nic.listen)]
        else:
            pairs += [("server", False), *_address(nic.connect or "")]
    elif nic.type == "tap":
        if nic.ifname:
            pairs.append(("ifname", nic.ifname))
        pairs += [("script", "no"), ("downscript", "no")]
    elif nic.type == "bridge":
        pairs.append(("br", nic.bridge or ""))
    elif (
        nic.type == "network" and layout is not None
    ):  # None: libvirt's export, which refuses private networks
        pairs.append(("sock", layout.network(nic.network or "")))
    dev: list[tuple[str, OptionValue]] = [("netdev", net_id)]
    mac = nic_mac(name, index, nic)
    if mac:
        dev.append(("mac", mac))
    backend = "vde" if nic.type == "network" else nic.type
    return [
        "-netdev",
        optlist(backend, pairs, nic.options),
        "-device",
        optlist(nic.model, dev, nic.device_options),
    ]


def _shares(machine: Machine, layout: Layout) -> list[str]:
    argv: list[str] = []
    if any(s.type == "virtiofs" for s in machine.shares):
        argv += [
            "-object",
            f"memory-backend-memfd,id={own('mem0')},size={machine.memory}M,share=on",
        ]
    for index, share in enumerate(machine.shares):
        if share.type == "9p":
            pairs: list[tuple[str, OptionValue]] = [
                ("id", own(f"fs{index}")),
                ("path", share.source),
                ("security_model", share.security_model),
            ]
            if share.readonly:
                pairs.append(("readonly", True))
            argv += ["-fsdev", optlist("local", pairs, share.options)]
            argv += [
                "-device",
                optlist("virtio-9p-pci", [("fsdev", own(f"fs{index}")), ("mount_tag", share.tag)]),
            ]
        else:
            argv += [
                "-chardev",
                optlist("socket", [("id", own(f"vfs{index}")), ("path", layout.virtiofs(index))]),
            ]
            argv += [
                "-device",
                optlist(
                    "vhost-user-fs-pci",
                    [("chardev", own(f"vfs{index}")), ("tag", share.tag)],
                    share.options,
                ),
            ]
    return argv
