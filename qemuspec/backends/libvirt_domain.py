"""up, down, status and plan for machines placed on libvirt hosts: the reconciler's job, with
libvirt's domain state as the record.

A domain qemuspec defines carries ``<metadata><qemuspec:owner file=… file_sha256=… hash=…/>``: the
definition file, its content hash, and the machine's definition hash (the one the local supervisor
records). ``up`` compares that hash the way it compares the local record; a domain without the
record, or with another file's, is never started, stopped, redefined or undefined.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from qemuspec.backends import libvirt_storage as storage
from qemuspec.backends.libvirt_conn import binding, connect, label, message
from qemuspec.backends.libvirt_guest import Console, forwarded_ports, wait_agent
from qemuspec.backends.libvirt_reach import Reach
from qemuspec.errors import QemuspecError
from qemuspec.libvirt import OWNER_NS, domain_xml
from qemuspec.reconcile import Outcome, stopped
from qemuspec.spec.records import definition_hash
from qemuspec.spec.models import File, Machine

Report = Callable[[str, str], None]


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def lookup(conn: Any, name: str) -> Any | None:
    libvirt = binding()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def owner(dom: Any) -> dict | None:
    libvirt = binding()
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, OWNER_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0)
    except libvirt.libvirtError:
        return None
    try:
        return dict(ET.fromstring(text).attrib)
    except ET.ParseError:
        return None


def _ours(dom: Any, uri: str, name: str, source: str) -> dict:
    """The owner record, when this definition file made the domain; else a refusal."""
    record = owner(dom)
    if record is None:
        raise QemuspecError(f"machine {name}: a domain named {name} exists on {uri} and qemuspec did not define it: "
                            "qemuspec leaves it alone; rename the machine, or remove that domain yourself")
    if record.get("file") != os.path.abspath(source) or record.get("machine") != name:
        raise QemuspecError(f"machine {name}: the domain {name} on {uri} belongs to {record.get('file')}, not {os.path.abspath(source)}: "
                            "bring it down from that file, or rename the machine")
    return record


def _state(dom: Any) -> str:
    libvirt = binding()
    state, _reason = dom.state()
    return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
            libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_BLOCKED: "running",
            libvirt.VIR_DOMAIN_SHUTDOWN: "stopping"}.get(state, "stopped")


def _seed(name: str, machine: Machine, state_root: str) -> bytes | None:
    from qemuspec.render import wants_cidata

    if not wants_cidata(machine):
        return None
    from qemuspec.runtime import cloudinit, sshkeys

    _, public = sshkeys.ensure_key(state_root)
    return cloudinit.build_iso(cloudinit.seed_files(name, machine, public))


def _wanted_xml(conn: Any, name: str, machine: Machine, source: str, media: dict, volumes: list[str], pool: Any | None) -> str:
    record = {"file": os.path.abspath(source), "file_sha256": _file_sha(source), "hash": definition_hash(machine),
              "machine": name, "volumes": " ".join(sorted(set(volumes + [os.path.basename(p) for p in media.values()])))}
    return domain_xml(machine, name, media=media, owner=record, serial_log=storage.serial_log(pool, name))


def stop(dom: Any, timeout: float) -> str:
    """ACPI power button, then destroy when the guest has not powered off within ``timeout``.
    A restart-on-poweroff policy is switched off for the running domain first, or the power button
    would reboot it."""
    libvirt = binding()
    if not dom.isActive():
        return "already stopped"
    try:
        dom.setLifecycleAction(libvirt.VIR_DOMAIN_LIFECYCLE_POWEROFF, libvirt.VIR_DOMAIN_LIFECYCLE_ACTION_DESTROY, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError:
        pass
    try:
        if _state(dom) == "paused":
            dom.resume()
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # libvirt reports the stop as an event too; its state is the same fact
            if not dom.isActive():
                return "ACPI powerdown"
            time.sleep(0.05)
        dom.destroy()
        return "destroy"
    except libvirt.libvirtError:
        if not dom.isActive():
            return "ACPI powerdown"
        raise


def _undefine(dom: Any) -> None:
    libvirt = binding()
    flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError:
        if dom.isPersistent():
            raise


def _wait_ready(dom: Any, uri: str, name: str, machine: Machine, console: Console | None, began: float, state_root: str) -> None:
    deadline = began + machine.ready.timeout
    alive = lambda: dom.isActive()  # noqa: E731
    if machine.ready.serial:
        if console is None:
            raise QemuspecError('ready.serial reads the serial console, and serial = "none" has none: remove one of them')
        console.wait_for(machine.ready.serial, deadline, alive)
    if machine.ready.agent:
        wait_agent(dom, deadline, alive)
    if machine.ready.tcp or machine.ready.ssh:
        reach = Reach(uri)
        if machine.ready.tcp:
            reach.wait_tcp(_forward(dom, machine.ready.tcp), deadline, alive)
        if machine.ready.ssh:
            from qemuspec.runtime import probes

            forward = _forward(dom, machine.ssh.port)
            reach.wait_tcp(forward, deadline, alive, b"SSH-")
            probes.wait_ssh_login(ssh_argv(uri, name, machine, state_root, ["true"], forward, batch=True), deadline, alive)


def _forward(dom: Any, guest_port: int) -> dict:
    for forward in forwarded_ports(dom):
        if forward["protocol"] == "tcp" and forward["guest"] == guest_port:
            return forward
    raise QemuspecError(f"no forward to guest port {guest_port}: add forwards = [{{ host = 0, guest = {guest_port} }}] to a user NIC")


def ssh_argv(uri: str, name: str, machine: Machine, state_root: str, command: list[str], forward: dict | None = None,
             batch: bool = False, dom: Any = None) -> list[str]:
    """`ssh` into a machine on a libvirt host with the state directory's key, through its forward."""
    from qemuspec.runtime import sshkeys

    key, _ = sshkeys.ensure_key(state_root)
    state_dir = os.path.join(state_root, name)
    os.makedirs(state_dir, exist_ok=True)
    forward = forward or _forward(dom, machine.ssh.port)
    argv = sshkeys.ssh_argv(key, state_dir, machine.ssh.user, forward["host"], command, batch=batch)
    return Reach(uri).ssh_argv(argv, forward)


def _up_one(spec: File, source: str, state_root: str, uri: str, name: str, report: Report) -> Outcome:
    libvirt = binding()
    machine = spec.machines[name]
    began = time.monotonic()
    try:
        conn = connect(uri)
        dom = lookup(conn, name)
        action = "started"
        if dom is not None:
            record = _ours(dom, uri, name, source)
            if dom.isActive() and record.get("hash") == definition_hash(machine):
                report(name, "up to date")
                return Outcome(name, "up to date", 0.0, ports=forwarded_ports(dom))
            if dom.isActive():
                report(name, "definition changed: stopping")
                stop(dom, machine.stop_timeout)
                action = "recreated"
            _undefine(dom)
        media, volumes = storage.prepare(conn, name, machine, _seed(name, machine, state_root))
        pool = storage.pool(conn)
        try:
            dom = conn.defineXML(_wanted_xml(conn, name, machine, source, media, volumes, pool))
        except libvirt.libvirtError as exc:
            raise QemuspecError(f"machine {name}: libvirt at {uri} refused the domain: {message(exc)}") from None
        report(name, "starting")
        console = None
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            if machine.serial != "none":
                console = Console(conn, dom)
            if not machine.paused:
                dom.resume()
                report(name, "waiting for ready")
                _wait_ready(dom, uri, name, machine, console, began, state_root)
        except (QemuspecError, libvirt.libvirtError) as exc:
            detail = f"machine {name} on {label(uri)}: {message(exc)}"
            if console is not None and console.tail():
                detail += "\nlast console lines:\n" + console.tail()
            report(name, "failed")
            if dom.isActive():
                dom.destroy()
            _undefine(dom)
            return Outcome(name, "failed", time.monotonic() - began, detail=detail)
        finally:
            if console is not None:
                console.close()
        seconds = time.monotonic() - began
        report(name, f"ready in {seconds:.1f} s")
        return Outcome(name, action, seconds, ports=forwarded_ports(dom))
    except (QemuspecError, libvirt.libvirtError) as exc:
        report(name, "failed")
        return Outcome(name, "failed", time.monotonic() - began, detail=f"machine {name} on {label(uri)}: {message(exc)}")


def _levels(spec: File, names: list[str]) -> list[list[str]]:
    from qemuspec.reconcile import with_dependencies

    return with_dependencies(spec, names)


def up(spec: File, source: str, state_root: str, names: list[str], hosts: dict[str, str | None], report: Report) -> list[Outcome]:
    """Level by level in depends_on order, a level's machines in parallel; local machines of a mixed
    file go to the local reconciler, level by level too."""
    from qemuspec import reconcile

    outcomes: list[Outcome] = []
    for level in _levels(spec, names):
        remote = [n for n in level if hosts.get(n) or spec.machines[n].host]
        local = [n for n in level if n not in remote]
        with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            futures = [pool.submit(_up_one, spec, source, state_root, str(hosts.get(n) or spec.machines[n].host), n, report) for n in remote]
            if local:
                with reconcile.locked(state_root):
                    outcomes += reconcile._up_level(spec, state_root, local, report)
            outcomes += [f.result() for f in futures]
        if any(o.action == "failed" for o in outcomes):
            break
    return outcomes


def _down_one(spec: File, source: str, uri: str, name: str, timeout: float | None, report: Report, purge: bool) -> Outcome:
    libvirt = binding()
    try:
        conn = connect(uri)
        dom = lookup(conn, name)
        if dom is None:
            if purge:
                storage.purge(conn, name, _media_in_use(conn, name))
            return Outcome(name, "not running")
        _ours(dom, uri, name, source)
        began = time.monotonic()
        step = "already stopped"
        if dom.isActive():
            report(name, "stopping")
            step = stop(dom, spec.machines[name].stop_timeout if timeout is None else timeout)
        _undefine(dom)
        if purge:
            storage.purge(conn, name, _media_in_use(conn, name))
        seconds = time.monotonic() - began
        if step == "already stopped":
            return Outcome(name, "not running")
        report(name, f"stopped ({step}, {seconds:.1f} s)")
        return stopped(name, seconds, step)
    except (QemuspecError, libvirt.libvirtError) as exc:
        report(name, "failed")
        return Outcome(name, "failed", detail=f"machine {name} on {label(uri)}: {message(exc)}")


def _media_in_use(conn: Any, leaving: str) -> set[str]:
    used: set[str] = set()
    for dom in conn.listAllDomains(0):
        record = owner(dom)
        if record is not None and dom.name() != leaving:
            used.update(record.get("volumes", "").split())
    return used


def down(spec: File, source: str, state_root: str, names: list[str], hosts: dict[str, str | None], timeout: float | None,
         report: Report, purge: bool = False) -> list[Outcome]:
    from qemuspec import reconcile
    from qemuspec.spec.order import order_machines

    outcomes: list[Outcome] = []
    selected = set(names)
    for level in reversed(order_machines(spec.machines)):
        level = [n for n in level if n in selected]
        remote = [n for n in level if hosts.get(n)]
        local = [n for n in level if not hosts.get(n)]
        with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            futures = [pool.submit(_down_one, spec, source, str(hosts[n]), n, timeout, report, purge) for n in remote]
            if local:
                outcomes += reconcile.down(spec, state_root, local, timeout, report)
            outcomes += [f.result() for f in futures]
    return outcomes


def status(spec: File, source: str, name: str, uri: str) -> dict:
    machine = spec.machines[name]
    row: dict[str, Any] = {"name": name, "state": "stopped", "pid": None, "supervisor": None, "uptime": None, "restarts": 0,
                           "restart": machine.restart, "qmp": None, "ports": [], "accel": [], "host": uri}
    conn = connect(uri)
    dom = lookup(conn, name)
    if dom is None:
        return row
    record = owner(dom)
    if record is None or record.get("file") != os.path.abspath(source):
        row["state"] = "not ours"
        return row
    row["state"] = _state(dom)
    if dom.isActive():
        row["ports"] = forwarded_ports(dom)
        row["accel"] = ["kvm" if ET.fromstring(dom.XMLDesc(0)).get("type") == "kvm" else "tcg"]
    return row


_KIB = {"KiB": 1, "k": 1, "K": 1, "MiB": 1024, "M": 1024, "GiB": 1 << 20, "G": 1 << 20, "b": 1 / 1024, "bytes": 1 / 1024}


def project(xml: str) -> list[str]:
    """The parts of libvirt's domain XML that qemuspec writes (libvirt.projected), one line each."""
    from qemuspec.libvirt import projected

    _PROJECT, _ATTRS = projected()
    root = ET.fromstring(xml)
    lines: list[str] = [f"domain: type={root.get('type')}"]

    def walk(el: ET.Element, path: str) -> None:
        for child in el:
            sub = f"{path}/{child.tag}" if path else child.tag
            if sub in _PROJECT:
                text = (child.text or "").strip()
                if sub == "memory":
                    text = f"{int(int(text) * _KIB.get(child.get('unit', 'KiB'), 1) / 1024)} MiB"
                values = {k: str(child.get(k)) for k in _ATTRS.get(sub, ()) if child.get(k) is not None}
                if sub == "os/type" and "machine" in values:  # libvirt stores the alias's versioned name
                    values["machine"] = re.sub(r"^pc-q35-[\d.]+$", "q35", re.sub(r"^pc-i440fx-[\d.]+$", "pc", values["machine"]))
                attrs = " ".join(f"{k}={v}" for k, v in values.items())
                lines.append(f"{sub}: {' '.join(x for x in (attrs, text) if x)}".rstrip())
            walk(child, sub)

    walk(root, "")
    if [line for line in lines if line.startswith("os/boot:")] == ["os/boot: dev=hd"]:
        lines.remove("os/boot: dev=hd")  # libvirt's default boot order, written out when none is given
    qemu = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    lines += [f"qemu:arg {arg.get('value')}" for arg in root.iter(f"{qemu}arg")]
    return lines


def plan(spec: File, source: str, state_root: str, names: list[str], hosts: dict[str, str | None]) -> list[dict]:
    from qemuspec import reconcile

    out = []
    for level in _levels(spec, names):
        for name in level:
            uri = hosts.get(name)
            if not uri:
                out += [step for step in reconcile.plan(spec, state_root, [name]) if step["name"] == name]
                continue
            machine = spec.machines[name]
            conn = connect(uri)
            dom = lookup(conn, name)
            if dom is None:
                out.append({"name": name, "action": "start", "diff": [], "host": uri})
                continue
            record = _ours(dom, uri, name, source)
            if record.get("hash") == definition_hash(machine) and dom.isActive():
                out.append({"name": name, "action": "up to date", "diff": [], "host": uri})
                continue
            pool = storage.pool(conn, create=False)
            media = {p: storage.predicted(pool, p) for p in storage.media_paths(machine)}
            for index, disk in enumerate(machine.disks):
                if disk.size is not None or disk.backing:
                    media[disk.file] = os.path.join(storage.pool_dir(pool) if pool else storage.SYSTEM_POOL_DIR,
                                                    storage.disk_volume(name, index, disk.format))
            held = dom.XMLDesc(binding().VIR_DOMAIN_XML_INACTIVE)
            wanted = _wanted_xml(conn, name, machine, source, media, [], pool)
            diff = list(difflib.unified_diff(project(held), project(wanted), "libvirt", "definition", lineterm="", n=1))
            out.append({"name": name, "action": "recreate" if dom.isActive() else "start", "diff": diff, "host": uri})
    return out
