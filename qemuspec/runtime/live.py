"""Changing a running qemu to match a changed definition, without rebooting the guest.

``apply(qmp, name, old, new, layout, fields)`` is the one entry point (the local backend's
``change`` calls it; which fields may change live is the reconciler's table, not this module's). Each
change is made over a QMP connection (the local backend uses the tools' monitor: qemu sends its
events, DEVICE_DELETED too, to every monitor) and then checked by asking qemu, never by
trusting a command's silence: a forward must be listed by ``info usernet`` (and accept a connection),
a disk must be in ``query-block``, the balloon's ``actual`` must reach its target, the run state must
be what ``paused`` says. A change that fails undoes what this call already did (newest first) and
raises :class:`LiveChangeFailed` with the reason, so the caller restarts the machine instead of
leaving it half changed.

What each field does here, and why:

- ``nics`` (forwards of user NICs): HMP ``hostfwd_add``/``hostfwd_remove`` on the NIC's netdev
  (``qemuspec-netN``, render's id) through ``human-monitor-command``, QMP having no command for them.
  slirp binds a forward's host port itself (qemuspec binds only its monitors and consoles), so a fixed
  port is checked free first and the error names who holds it; a ``host = 0`` forward gets the port
  slirp picks, read back from ``info usernet``. Any other NIC change needs a restart.
- ``disks``: matched by file. A new one is created as ``up`` creates it (``images.ensure_disk``), opened
  with ``blockdev-add`` (node ``qemuspec-hdHASH``, from the file) and plugged with ``device_add`` (same id) into a
  free hot-plug slot: a free ``pcie-root-port`` on q35 (its root bus takes no hot-plug), the root bus
  on pc, the SCSI controller for scsi disks. A removed one is unplugged with ``device_del``, then
  ``DEVICE_DELETED`` is awaited (the guest must let go of it), then its node is deleted
  (``blockdev-del``; a disk from ``-drive`` goes with its device).
- ``cdrom``: the same number of drives, each one's medium changed in place (``blockdev-change-medium``).
- ``memory``: down (or back up to the size qemu booted with) through the balloon, when the machine has
  one (``balloon``, then ``query-balloon`` until ``actual`` reaches it: the guest's driver must comply).
- ``paused``: ``stop``/``cont``, checked with ``query-status``.
- a NIC's ``link`` (when the model has it): ``set_link`` on its netdev.
- Fields only the supervisor reads (``restart``, ``stop_timeout``, ``ready``, ``depends_on``,
  ``provision``, ``ssh``) need nothing from qemu and are skipped here. Everything else raises
  (a share cannot be hot-plugged on a running guest: 9p and virtiofs devices need ``-fsdev``/
  ``-chardev`` set-up that qemu takes at start only here, so a share is a restart).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import socket
import time
from typing import TYPE_CHECKING, Callable, Sequence

from qemuspec.errors import QemuspecError
from qemuspec.render import DISK_DEVICE, SCSI_CONTROLLER, cdrom_id, netdev_id, own

if TYPE_CHECKING:
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.paths import Layout
    from qemuspec.spec.models import NIC, Disk, Forward, Machine

# Fields qemu never sees: the supervisor (or the reconciler) uses them, so a live change has nothing to do.
SUPERVISOR_FIELDS = frozenset(
    {"restart", "stop_timeout", "ready", "depends_on", "provision", "ssh"}
)
# The guest must answer an unplug request: ACPI hot-plug (pc, and q35's root ports in qemu 7.2) takes
# well under a second with the test guest; native PCIe hot-plug waits out a 5 s attention button.
DEVICE_DELETED_TIMEOUT = 30.0
BALLOON_TIMEOUT = 60.0  # a guest under TCG gives pages back at its own pace


class LiveChangeFailed(QemuspecError):
    """A change could not be made to the running qemu (or qemu did not show it afterwards); whatever
    this call had done already is undone. ``reason`` says why, for the caller's "restarting: ..."."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


Undo = Callable[[], None]
# One change, prepared: doing it makes it, checks it with qemu and says what it did and how to undo it.
Step = Callable[[], tuple[str, "Undo | None"]]
# A field's handler checks everything it can before anything is done, and returns its steps.
Planner = Callable[["QMPClient", str, "Machine", "Machine", "Layout"], list[Step]]


def apply(
    qmp: QMPClient,
    name: str,
    old: Machine,
    new: Machine,
    layout: Layout,
    fields: Sequence[str],
) -> list[str]:
    """Make the running machine ``name`` (started from ``old``) what ``new`` says, for the changed
    ``fields`` (the model's names: "memory", "nics", or dotted paths such as "nics[0].forwards" —
    the first name counts). Every field is checked before any change is made (a change that cannot
    be live is refused with nothing done); then the changes are made in order, each confirmed by
    qemu. Returns the steps done, in words. Raises :class:`LiveChangeFailed` after undoing every step
    of this call when one fails or qemu does not confirm it."""
    done: list[str] = []
    undo: list[Undo] = []
    try:
        steps: list[Step] = []
        for top in _top_fields(fields, resuming=old.paused and not new.paused):
            if top in SUPERVISOR_FIELDS:
                continue
            planner = _PLANNERS.get(top)
            if planner is None:
                raise LiveChangeFailed(
                    f"machine {name}: {top} cannot change in a running qemu"
                    + _WHY_NOT.get(top, "")
                    + "; it takes a restart"
                )
            steps += planner(qmp, name, old, new, layout)
        for step in steps:
            text, back = step()
            done.append(text)
            if back is not None:
                undo.append(back)
    except BaseException as exc:
        notes = _undo(undo)
        if isinstance(exc, LiveChangeFailed):
            reason = exc.reason
        elif isinstance(exc, QemuspecError):
            reason = f"machine {name}: {exc}"
        else:
            raise
        if notes:
            reason += "; undoing the live changes: " + "; ".join(notes)
        raise LiveChangeFailed(reason) from None
    return done


def _top_fields(fields: Sequence[str], resuming: bool = False) -> list[str]:
    """ "nics[0].forwards[1].host" -> "nics"; each once, in the order given, except that
    ``paused`` goes first when the guest resumes and last when it pauses (hot-plug and the balloon
    need a running guest)."""
    out: list[str] = []
    for field in fields:
        top = re.split(r"[.\[]", field, maxsplit=1)[0]
        if top and top not in out:
            out.append(top)
    if "paused" in out:
        out.remove("paused")
        out.insert(0 if resuming else len(out), "paused")
    return out


def _undo(undo: list[Undo]) -> list[str]:
    """Run the undo steps newest first; what failed, in words (an empty list: all undone)."""
    notes = []
    for step in reversed(undo):
        try:
            step()
        except QemuspecError as exc:
            notes.append(f"could not undo: {exc}")
    undo.clear()
    return notes


def _hmp(qmp: QMPClient, line: str) -> str:
    out = qmp.command("human-monitor-command", {"command-line": line})
    return out if isinstance(out, str) else ""


# -- forwards -------------------------------------------------------------------------------------


def _nics(qmp, name: str, old: Machine, new: Machine, layout: Layout) -> list[Step]:
    if len(old.nics) != len(new.nics):
        raise LiveChangeFailed(
            f"machine {name}: a NIC added or removed takes a restart (NICs are not hot-plugged)"
        )
    steps: list[Step] = []
    for index, (was, now) in enumerate(zip(old.nics, new.nics)):
        live_keys = {"forwards", "link"}
        if was.model_dump(exclude=live_keys) != now.model_dump(exclude=live_keys):
            raise LiveChangeFailed(
                f"machine {name}: nics[{index}] changed in more than its forwards and link; "
                "that takes a restart"
            )
        if was.forwards != now.forwards:
            steps += _forwards(qmp, name, index, was, now)
        up, was_up = _link(now), _link(was)
        if up != was_up:

            def cable(index: int = index, up: bool = up, was_up: bool = was_up) -> tuple[str, Undo]:
                set_link(qmp, index, up)
                return f"nics[{index}]: link {'up' if up else 'down'}", (
                    lambda: set_link(qmp, index, was_up)
                )

            steps.append(cable)
    return steps


def _link(nic: NIC) -> bool:
    """A NIC's link state (``link``, when the model has the field; up otherwise)."""
    return bool(getattr(nic, "link", True))


def set_link(qmp: QMPClient, index: int, up: bool) -> None:
    """The link of NIC ``index`` up or down (``set_link`` on its netdev, ``qemuspec-netN``: qemu sets
    the peer NIC's link with it, which the guest sees as carrier). qemu 7.2 has no command that reads
    a link state back (``info network`` does not show it), so qemu's answer is the check: an unknown
    name is an error."""
    qmp.command("set_link", {"name": netdev_id(index), "up": up})


def _key(fwd: Forward) -> tuple[str, str, int, int]:
    return (fwd.protocol, fwd.address, fwd.host, fwd.guest)


def usernet(qmp: QMPClient) -> dict[str, list[dict]]:
    """netdev id -> its forwards as slirp holds them (``info usernet``): protocol, address, host port
    (the real one: a port 0 forward shows the port slirp bound), guest port."""
    text = _hmp(qmp, "info usernet")
    out: dict[str, list[dict]] = {}
    current: list[dict] | None = None
    for line in text.splitlines():
        head = re.match(r"^\S.*\((\S+)\):\s*$", line)
        if head:
            current = out.setdefault(head.group(1), [])
            continue
        match = re.match(
            r"^\s*(TCP|UDP)\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)", line
        )
        if match and current is not None:
            proto, address, host, _guest_addr, guest = match.groups()
            address = "0.0.0.0" if address == "*" else address  # slirp shows INADDR_ANY as *
            current.append(
                {
                    "protocol": proto.lower(),
                    "address": address,
                    "host": int(host),
                    "guest": int(guest),
                }
            )
    return out


def _forwards(qmp, name: str, index: int, was: NIC, now: NIC) -> list[Step]:
    netdev = netdev_id(index)
    if was.type != "user":
        raise LiveChangeFailed(f"machine {name}: nics[{index}] is not a user NIC")
    old_keys = [_key(f) for f in was.forwards]
    new_keys = [_key(f) for f in now.forwards]
    steps: list[Step] = []
    for fwd in was.forwards:
        if _key(fwd) not in new_keys:
            _find_forward(qmp, name, netdev, fwd)  # it must be there to be removed

            def remove(fwd: Forward = fwd) -> tuple[str, Undo | None]:
                port = _remove_forward(qmp, name, netdev, fwd)
                return f"forward {_show(fwd, port)} removed", (
                    lambda: _quiet(_add_forward(qmp, name, netdev, fwd, port))
                )

            steps.append(remove)
    for fwd in now.forwards:
        if _key(fwd) not in old_keys:
            if fwd.host:
                _check_free(name, fwd, fwd.host)

            def add(fwd: Forward = fwd) -> tuple[str, Undo | None]:
                port = _add_forward(qmp, name, netdev, fwd, fwd.host)
                return f"forward {_show(fwd, port)} added", (
                    lambda: _quiet(_remove_forward(qmp, name, netdev, fwd, port))
                )

            steps.append(add)
    return steps


def _quiet(_result: object) -> None:
    """An undo step's result is not needed (it raises when it fails)."""


def _show(fwd: Forward, port: int) -> str:
    return f"{fwd.address}:{port}->{fwd.guest}/{fwd.protocol}"


def _held(qmp, netdev: str, fwd: Forward) -> list[dict]:
    return [
        f
        for f in usernet(qmp).get(netdev, [])
        if f["protocol"] == fwd.protocol and f["guest"] == fwd.guest
    ]


def _add_forward(qmp, name: str, netdev: str, fwd: Forward, port: int) -> int:
    """Add one forward; the host port it got, once ``info usernet`` lists it (and, TCP, it accepts)."""
    if port:
        _check_free(name, fwd, port)
    before = {f["host"] for f in _held(qmp, netdev, fwd)}
    rule = f"{fwd.protocol}:{fwd.address}:{port}-:{fwd.guest}"
    said = _hmp(qmp, f"hostfwd_add {netdev} {rule}").strip()
    after = [f for f in _held(qmp, netdev, fwd) if f["host"] not in before]
    got = [f["host"] for f in after if f["host"] == port or not port]
    if len(got) != 1:
        raise LiveChangeFailed(
            f"machine {name}: forward {_show(fwd, port)}: qemu did not add it"
            + (f" ({said})" if said else " (info usernet does not list it)")
        )
    if fwd.protocol == "tcp" and not _accepts(fwd.address, got[0]):
        _hmp(qmp, f"hostfwd_remove {netdev} {fwd.protocol}:{fwd.address}:{got[0]}")
        raise LiveChangeFailed(
            f"machine {name}: forward {_show(fwd, got[0])} is listed but does not accept connections"
        )
    return got[0]


def _find_forward(qmp, name: str, netdev: str, fwd: Forward) -> int:
    """The host port a declared forward has in the running qemu (a port 0 one: the port slirp gave
    it), or why it cannot be told."""
    held = [f["host"] for f in _held(qmp, netdev, fwd) if f["address"] == fwd.address]
    port = fwd.host or (held[0] if len(held) == 1 else 0)
    if port not in held:
        raise LiveChangeFailed(
            f"machine {name}: forward {_show(fwd, fwd.host)} is not in the running qemu "
            f"(info usernet lists {len(held)} such forwards)"
        )
    return port


def _remove_forward(qmp, name: str, netdev: str, fwd: Forward, port: int | None = None) -> int:
    """Remove one forward; its host port, once qemu no longer lists it."""
    if port is None:
        port = _find_forward(qmp, name, netdev, fwd)
    said = _hmp(qmp, f"hostfwd_remove {netdev} {fwd.protocol}:{fwd.address}:{port}").strip()
    if port in [f["host"] for f in _held(qmp, netdev, fwd)]:
        raise LiveChangeFailed(
            f"machine {name}: forward {_show(fwd, port)}: qemu did not remove it ({said})"
        )
    return port


def _check_free(name: str, fwd: Forward, port: int) -> None:
    from qemuspec.runtime.sockets import port_holder

    kind = socket.SOCK_STREAM if fwd.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((fwd.address, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise LiveChangeFailed(
                    f"machine {name}: forward {_show(fwd, port)}: cannot bind {fwd.address}:{port}: {exc}"
                ) from None
            holder = port_holder(port, fwd.protocol)
            raise LiveChangeFailed(
                f"machine {name}: host port {fwd.address}:{port}/{fwd.protocol} (forward to guest port "
                f"{fwd.guest}) is in use{' by ' + holder if holder else ''}: stop that, choose another "
                "host port, or use host = 0 for any free port"
            ) from None


def _accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection(
            ("127.0.0.1" if address == "0.0.0.0" else address, port), timeout=2.0
        ):
            return True
    except OSError:
        return False


# -- disks ----------------------------------------------------------------------------------------


def hotplug_id(disk: Disk) -> str:
    """The node name and device id of a disk added live: from its file, so a later removal finds it
    (block node names must stay under 32 characters)."""
    digest = hashlib.sha256(os.path.abspath(disk.file).encode()).hexdigest()[:12]
    return own(f"hd{digest}")


def _disks(qmp, name: str, old: Machine, new: Machine, layout: Layout) -> list[Step]:
    before = {os.path.abspath(d.file): d for d in old.disks}
    after = {os.path.abspath(d.file): d for d in new.disks}
    for path in before.keys() & after.keys():
        if before[path].model_dump() != after[path].model_dump():
            raise LiveChangeFailed(
                f"machine {name}: disk {path} changed (not only added or removed); that takes a restart"
            )
    blocks = _query_block(qmp)
    bridges = _bridges(qmp)
    free = [port for port, used in bridges.items() if not used]
    steps: list[Step] = []
    for path, disk in before.items():
        if path not in after:
            block, bus = _removable(name, old, disk, blocks, bridges)
            if bus is not None:
                free.append(bus)  # the new disks may take the slot this one leaves
            steps.append(functools.partial(_remove_disk, qmp, name, disk, block, bus))
    for path, disk in after.items():
        if path not in before:
            slot = _slot(name, old, disk, free)
            steps.append(functools.partial(_add_disk, qmp, name, disk, slot, layout))
    return steps


def _bridges(qmp) -> dict[str, list[str]]:
    """Each PCI(e) bridge or root port that has an id -> the ids of the devices behind it."""
    out: dict[str, list[str]] = {}
    for bus in qmp.command("query-pci") or []:
        for dev in bus.get("devices", []) if isinstance(bus, dict) else []:
            bridge = dev.get("pci_bridge") if isinstance(dev, dict) else None
            if isinstance(bridge, dict) and dev.get("qdev_id"):
                out[str(dev["qdev_id"])] = [
                    str(d.get("qdev_id") or "") for d in bridge.get("devices") or []
                ]
    return out


def _i440fx(machine: Machine) -> bool:
    return machine.machine.startswith("pc") or "-i440fx-" in machine.machine


def _query_block(qmp) -> list[dict]:
    found = qmp.command("query-block")
    return [b for b in found if isinstance(b, dict)] if isinstance(found, list) else []


def _block_file(block: dict) -> str | None:
    inserted = block.get("inserted")
    if not isinstance(inserted, dict):
        return None
    image = inserted.get("image")
    if isinstance(image, dict) and isinstance(image.get("filename"), str):
        return image["filename"]
    return inserted.get("file") if isinstance(inserted.get("file"), str) else None


def _block_of(blocks: list[dict], path: str) -> dict | None:
    for block in blocks:
        file = _block_file(block)
        if file is not None and os.path.abspath(file) == path:
            return block
    return None


def _slot(name: str, running: Machine, disk: Disk, free: list[str]) -> dict:
    """Where a hot-added disk's device goes in the ``running`` machine (``bus``; a root port taken
    from ``free``), or why it cannot be hot-plugged."""
    if disk.options:
        raise LiveChangeFailed(
            f"machine {name}: disk {disk.file} has -drive options, which a live disk cannot take; "
            "that takes a restart"
        )
    if disk.interface == "none":
        return {}
    if disk.interface == "scsi":
        if not any(d.interface == "scsi" for d in running.disks):  # render's controller
            raise LiveChangeFailed(
                f"machine {name}: a scsi disk needs the SCSI controller, which this running machine "
                "does not have; that takes a restart"
            )
        return {"bus": f"{SCSI_CONTROLLER}.0"}
    if disk.interface != "virtio":
        raise LiveChangeFailed(
            f"machine {name}: an {disk.interface} disk is not hot-plugged (virtio and scsi are); "
            "that takes a restart"
        )
    if _i440fx(running):
        return {}  # i440fx's root bus takes ACPI hot-plug
    if free:
        return {"bus": free.pop(0)}
    raise LiveChangeFailed(
        f"machine {name}: no free hot-plug slot for disk {disk.file}: q35's root bus takes no hot-plug, "
        "so a disk can be added live only into a free PCIe root port; declare spare ones, e.g. "
        'devices = [{ driver = "pcie-root-port", id = "hp0", options = { chassis = 1 } }], '
        "or let the machine restart"
    )


def _plug(qmp, name: str, disk: Disk, slot: dict) -> None:
    """``blockdev-add`` the disk's file and ``device_add`` its device (both named ``hotplug_id``);
    confirmed by ``query-block``. What this did is taken back when a later part fails."""
    fmt = disk.format or _probed_format(disk.file)
    node = hotplug_id(disk)
    qmp.command(
        "blockdev-add",
        {
            "driver": fmt,
            "node-name": node,
            "read-only": disk.readonly,
            "file": {"driver": "file", "filename": disk.file},
        },
    )
    try:
        if disk.interface != "none":
            device: dict[str, object] = {
                "driver": DISK_DEVICE[disk.interface],
                "id": node,
                "drive": node,
                **slot,
            }
            if disk.serial:
                device["serial"] = disk.serial
            device.update(disk.device_options)
            qmp.command("device_add", device)
        block = next((b for b in _query_block(qmp) if _node(b) == node), None)
        if block is None or (disk.interface != "none" and node not in str(block.get("qdev", ""))):
            if disk.interface != "none":
                _unplug(qmp, name, node, disk.file)
            raise LiveChangeFailed(
                f"machine {name}: disk {disk.file} was added but query-block does not show it attached"
            )
    except BaseException:
        with contextlib.suppress(QemuspecError):
            qmp.command("blockdev-del", {"node-name": node})
        raise


def _unplug_hotplugged(qmp, name: str, disk: Disk) -> None:
    node = hotplug_id(disk)
    if disk.interface != "none":
        _unplug(qmp, name, node, disk.file)
    qmp.command("blockdev-del", {"node-name": node})


def _add_disk(qmp, name: str, disk: Disk, slot: dict, layout: Layout) -> tuple[str, Undo | None]:
    from qemuspec.runtime import images

    try:
        images.ensure_disk(disk, layout.state_dir)  # made as `up` makes it, recorded as ours
    except QemuspecError as exc:
        raise LiveChangeFailed(f"machine {name}: {exc}") from None
    _plug(qmp, name, disk, slot)
    return f"disk {disk.file} added ({DISK_DEVICE.get(disk.interface, 'no device')})", (
        lambda: _unplug_hotplugged(qmp, name, disk)
    )


def _node(block: dict) -> str | None:
    inserted = block.get("inserted")
    return inserted.get("node-name") if isinstance(inserted, dict) else None


def _probed_format(path: str) -> str:
    """The format of an existing disk declared without one: what qemu-img reads (as -drive would)."""
    from qemuspec import img

    try:
        return img.info(path).format
    except QemuspecError as exc:
        raise LiveChangeFailed(f"cannot read {path}: {exc}") from None


def _removable(
    name: str, machine: Machine, disk: Disk, blocks: list[dict], bridges: dict[str, list[str]]
) -> tuple[dict, str | None]:
    """The disk's entry in ``query-block`` and the bridge it sits behind (None: the root bus or a
    SCSI bus), or why it cannot be unplugged."""
    block = _block_of(blocks, os.path.abspath(disk.file))
    if block is None:
        raise LiveChangeFailed(
            f"machine {name}: disk {disk.file} is not in the running qemu (query-block)"
        )
    if disk.interface == "scsi" or disk.interface == "none":
        return block, None
    device = _device_of(block)
    if disk.interface == "virtio":
        for bridge, ids in bridges.items():
            if device.rsplit("/", 1)[-1] in ids:
                return block, bridge
        if _i440fx(machine):
            return block, None
    raise LiveChangeFailed(
        f"machine {name}: disk {disk.file} cannot be unplugged from the running qemu ("
        + (
            "q35's root bus takes no hot-unplug; only a disk added live sits in a root port"
            if disk.interface == "virtio"
            else f"an {disk.interface} disk is not hot-plugged"
        )
        + "); that takes a restart"
    )


def _device_of(block: dict) -> str:
    """The device to ``device_del`` for a ``query-block`` entry: its id, or its QOM path (a virtio
    disk's entry names the inner virtio device, below the PCI one)."""
    return str(block.get("qdev") or "").removesuffix("/virtio-backend")


def _remove_disk(
    qmp, name: str, disk: Disk, block: dict, bus: str | None
) -> tuple[str, Undo | None]:
    path = os.path.abspath(disk.file)
    device = _device_of(block)
    node = _node(block)
    if device and disk.interface != "none":
        _unplug(qmp, name, device, disk.file)
    if not block.get("device") and node:  # added with blockdev-add: its node stays until deleted
        qmp.command("blockdev-del", {"node-name": node})
    if _block_of(_query_block(qmp), path) is not None:
        raise LiveChangeFailed(
            f"machine {name}: disk {disk.file} was unplugged but query-block still shows it"
        )
    slot = (
        {"bus": bus}
        if bus
        else ({"bus": f"{SCSI_CONTROLLER}.0"} if disk.interface == "scsi" else {})
    )
    return f"disk {disk.file} removed", lambda: _plug(qmp, name, disk, slot)


def _unplug(qmp, name: str, device: str, what: str) -> None:
    """``device_del``, then wait for the guest to let go (``DEVICE_DELETED``)."""
    mark = qmp.event_count
    qmp.command("device_del", {"id": device})

    def gone(event: dict) -> bool:
        data = event.get("data") or {}
        return data.get("device") == device or data.get("path") == device

    try:
        qmp.wait_for("DEVICE_DELETED", DEVICE_DELETED_TIMEOUT, gone, since=mark)
    except QemuspecError:
        raise LiveChangeFailed(
            f"machine {name}: the guest did not release {what} within {DEVICE_DELETED_TIMEOUT:g} s "
            "(no DEVICE_DELETED); a restart removes it"
        ) from None


# -- cdrom, memory, paused ------------------------------------------------------------------------


def _cdrom(qmp, name: str, old: Machine, new: Machine, layout: Layout) -> list[Step]:
    if len(old.cdrom) != len(new.cdrom):
        raise LiveChangeFailed(
            f"machine {name}: a cdrom drive added or removed takes a restart (media change in place)"
        )
    steps: list[Step] = []
    for index, (was, now) in enumerate(zip(old.cdrom, new.cdrom)):
        if was == now:
            continue
        if not os.path.isfile(now):
            raise LiveChangeFailed(f"machine {name}: cdrom[{index}]: {now} is not a file")

        def change(index: int = index, was: str = was, now: str = now) -> tuple[str, Undo | None]:
            drive = cdrom_id(index)
            _change_medium(qmp, name, drive, now)
            return f"cdrom[{index}]: medium {now}", lambda: _change_medium(qmp, name, drive, was)

        steps.append(change)
    return steps


def _change_medium(qmp, name: str, drive: str, path: str) -> None:
    qmp.command(
        "blockdev-change-medium",
        {"device": drive, "filename": path, "format": "raw", "read-only-mode": "read-only"},
    )
    block = next((b for b in _query_block(qmp) if b.get("device") == drive), None)
    file = _block_file(block) if block else None
    if file is None or os.path.abspath(file) != os.path.abspath(path):
        raise LiveChangeFailed(
            f"machine {name}: cdrom {drive}: query-block shows {file or 'no medium'}, not {path}"
        )


def _memory(qmp, name: str, old: Machine, new: Machine, layout: Layout) -> list[Step]:
    if new.balloon is None or old.balloon is None:
        raise LiveChangeFailed(
            f"machine {name}: memory changes live only through a balloon (balloon = true); "
            "without one it takes a restart"
        )
    if new.paused:
        raise LiveChangeFailed(
            f"machine {name}: a paused guest cannot give memory back to the balloon; "
            "that takes a restart"
        )
    summary = qmp.command("query-memory-size-summary")
    booted = int(summary.get("base-memory", 0)) if isinstance(summary, dict) else 0
    target = new.memory * 2**20
    if target > booted:
        raise LiveChangeFailed(
            f"machine {name}: memory {new.memory}M is more than the {booted // 2**20}M qemu started "
            "with; a balloon gives back at most that, so growing it takes a restart"
        )

    def inflate() -> tuple[str, Undo | None]:
        previous = int(qmp.command("query-balloon").get("actual", booted))
        set_balloon(qmp, name, target)
        return f"memory {new.memory}M (balloon)", lambda: set_balloon(
            qmp, name, previous, wait=False
        )

    return [inflate]


def set_balloon(qmp, name: str, target: int, wait: bool = True) -> None:
    """Ask the guest for ``target`` bytes of RAM and wait until ``query-balloon`` says it has them."""
    qmp.command("balloon", {"value": target})
    if not wait:
        return
    deadline = time.monotonic() + BALLOON_TIMEOUT
    while True:
        mark = qmp.event_count
        actual = int(qmp.command("query-balloon").get("actual", -1))
        if abs(actual - target) < 2**20:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LiveChangeFailed(
                f"machine {name}: the balloon reached {actual // 2**20}M, not {target // 2**20}M, "
                f"within {BALLOON_TIMEOUT:g} s (does the guest load virtio_balloon?)"
            )
        # qemu rate-limits BALLOON_CHANGE to one a second, so the last one may come late: ask
        # again after a short wait for it as well
        with contextlib.suppress(QemuspecError):
            qmp.wait_for("BALLOON_CHANGE", min(remaining, 0.1), since=mark)


def _paused(qmp, name: str, old: Machine, new: Machine, layout: Layout) -> list[Step]:
    def run_state() -> tuple[str, Undo | None]:
        set_paused(qmp, name, new.paused)
        return ("paused" if new.paused else "resumed"), lambda: set_paused(qmp, name, old.paused)

    return [run_state]


def set_paused(qmp, name: str, paused: bool) -> None:
    """``stop`` or ``cont`` unless qemu is so already; checked with ``query-status``."""
    status = qmp.command("query-status")
    if bool(status.get("running")) == (not paused):
        return
    qmp.command("stop" if paused else "cont")
    status = qmp.command("query-status")
    if bool(status.get("running")) == paused:
        raise LiveChangeFailed(
            f"machine {name}: qemu is {status.get('status')} after {'stop' if paused else 'cont'}"
        )


_WHY_NOT = {
    "shares": " (a 9p share needs an -fsdev, which qemu 7.2 takes only at start; a virtiofs share "
    "needs its virtiofsd and the shared memory backend from boot)",
    "balloon": " (the balloon device is not hot-plugged)",
}

_PLANNERS: dict[str, Planner] = {
    "paused": _paused,  # first when it resumes, last when it pauses (see _top_fields)
    "nics": _nics,
    "disks": _disks,
    "cdrom": _cdrom,
    "memory": _memory,
}
