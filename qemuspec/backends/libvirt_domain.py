"""The libvirt backend (backends/base.py): one machine's look, start, stop, status and plan diff on a
libvirt host, with libvirt's domain state as the record; reconcile does the rest above it.

A domain qemuspec defines carries ``<metadata><qemuspec:owner file=… file_sha256=… hash=…/>``: the
definition file, its content hash, and the machine's definition hash (the one the local supervisor
records). ``up`` compares that hash the way it compares the local record; a domain without the
record, or with another file's, is never started, stopped, redefined or undefined.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, TypeVar

from qemuspec.backends import libvirt_storage as storage
from qemuspec.backends.base import Outcome, Problem, Report, Seen, unsupported
from qemuspec.backends.libvirt_conn import Unreachable, binding, connect, label, message
from qemuspec.backends.libvirt_guest import (
    Console,
    LibvirtAgent,
    Monitor,
    forwarded_ports,
    wait_agent,
)
from qemuspec.backends.libvirt_reach import Reach
from qemuspec.errors import QemuspecError
from qemuspec.libvirt import OWNER_NS, domain_xml, kvm_offered
from qemuspec.spec.records import definition_hash
from qemuspec.spec.models import File, Machine


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
        text = dom.metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            OWNER_NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0,
        )
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
        raise QemuspecError(
            f"machine {name}: a domain named {name} exists on {uri} and qemuspec did not define it: "
            "qemuspec leaves it alone; rename the machine, or remove that domain yourself"
        )
    if record.get("file") != os.path.abspath(source) or record.get("machine") != name:
        raise QemuspecError(
            f"machine {name}: the domain {name} on {uri} belongs to {record.get('file')}, not {os.path.abspath(source)}: "
            "bring it down from that file, or rename the machine"
        )
    return record


def _state(dom: Any) -> str:
    libvirt = binding()
    state, _reason = dom.state()
    return {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_BLOCKED: "running",
        libvirt.VIR_DOMAIN_SHUTDOWN: "stopping",
    }.get(state, "stopped")


def _seed(name: str, machine: Machine, state_root: str) -> bytes | None:
    from qemuspec.render import wants_cidata

    if not wants_cidata(machine):
        return None
    from qemuspec.runtime import cloudinit, sshkeys

    _, public = sshkeys.ensure_key(state_root)
    return cloudinit.build_iso(cloudinit.seed_files(name, machine, public))


def _wanted_xml(
    conn: Any,
    name: str,
    machine: Machine,
    source: str,
    media: dict,
    volumes: list[str],
    pool: Any | None,
) -> str:
    record = {
        "file": os.path.abspath(source),
        "file_sha256": _file_sha(source),
        "hash": definition_hash(machine),
        "machine": name,
        "volumes": " ".join(sorted(set(volumes + [os.path.basename(p) for p in media.values()]))),
    }
    return domain_xml(
        machine,
        name,
        media=media,
        owner=record,
        serial_log=storage.serial_log(pool, name),
        kvm=kvm_offered(conn.getCapabilities()),
    )  # "auto" is kvm where the host offers it


def stop(dom: Any, timeout: float) -> str:
    """ACPI power button, then destroy when the guest has not powered off within ``timeout``.
    A restart-on-poweroff policy is switched off for the running domain first, or the power button
    would reboot it."""
    libvirt = binding()
    if not dom.isActive():
        return "already stopped"
    try:
        dom.setLifecycleAction(
            libvirt.VIR_DOMAIN_LIFECYCLE_POWEROFF,
            libvirt.VIR_DOMAIN_LIFECYCLE_ACTION_DESTROY,
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )
    except libvirt.libvirtError:
        pass
    try:
        if _state(dom) == "paused":
            dom.resume()
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        deadline = time.monotonic() + timeout
        while (
            time.monotonic() < deadline
        ):  # libvirt reports the stop as an event too; its state is the same fact
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
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    )
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError:
        if dom.isPersistent():
            raise


def _wait_ready(
    dom: Any,
    uri: str,
    name: str,
    machine: Machine,
    console: Console | None,
    began: float,
    state_root: str,
) -> None:
    deadline = began + machine.ready.timeout
    alive = lambda: dom.isActive()  # noqa: E731
    if machine.ready.serial:
        if console is None:
            raise QemuspecError(
                'ready.serial reads the serial console, and serial = "none" has none: remove one of them'
            )
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
            probes.wait_ssh_login(
                ssh_argv(uri, name, machine, state_root, ["true"], forward, batch=True),
                deadline,
                alive,
            )


def _forward(dom: Any, guest_port: int) -> dict:
    for forward in forwarded_ports(dom):
        if forward["protocol"] == "tcp" and forward["guest"] == guest_port:
            return forward
    raise QemuspecError(
        f"no forward to guest port {guest_port}: add forwards = [{{ host = 0, guest = {guest_port} }}] to a user NIC"
    )


def ssh_argv(
    uri: str,
    name: str,
    machine: Machine,
    state_root: str,
    command: list[str],
    forward: dict | None = None,
    batch: bool = False,
    dom: Any = None,
) -> list[str]:
    """`ssh` into a machine on a libvirt host with the state directory's key, through its forward."""
    from qemuspec.runtime import sshkeys

    key, _ = sshkeys.ensure_key(state_root)
    state_dir = os.path.join(state_root, name)
    os.makedirs(state_dir, exist_ok=True)
    forward = forward or _forward(dom, machine.ssh.port)
    argv = sshkeys.ssh_argv(key, state_dir, machine.ssh.user, forward["host"], command, batch=batch)
    return Reach(uri).ssh_argv(argv, forward)


def _media_in_use(conn: Any, leaving: str) -> set[str]:
    used: set[str] = set()
    for dom in conn.listAllDomains(0):
        record = owner(dom)
        if record is not None and dom.name() != leaving:
            used.update(record.get("volumes", "").split())
    return used


_KIB = {
    "KiB": 1,
    "k": 1,
    "K": 1,
    "MiB": 1024,
    "M": 1024,
    "GiB": 1 << 20,
    "G": 1 << 20,
    "b": 1 / 1024,
    "bytes": 1 / 1024,
}


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
                values = {
                    k: str(child.get(k)) for k in _ATTRS.get(sub, ()) if child.get(k) is not None
                }
                if (
                    sub == "os/type" and "machine" in values
                ):  # libvirt stores the alias's versioned name
                    values["machine"] = re.sub(
                        r"^pc-q35-[\d.]+$",
                        "q35",
                        re.sub(r"^pc-i440fx-[\d.]+$", "pc", values["machine"]),
                    )
                attrs = " ".join(f"{k}={v}" for k, v in values.items())
                lines.append(f"{sub}: {' '.join(x for x in (attrs, text) if x)}".rstrip())
            walk(child, sub)

    walk(root, "")
    if [line for line in lines if line.startswith("os/boot:")] == ["os/boot: dev=hd"]:
        lines.remove(
            "os/boot: dev=hd"
        )  # libvirt's default boot order, written out when none is given
    qemu = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    lines += [f"qemu:arg {arg.get('value')}" for arg in root.iter(f"{qemu}arg")]
    return lines


T = TypeVar("T")


class LibvirtBackend:
    """Machines on the libvirt host at ``uri``, one domain each (named after the machine), the domain's
    metadata as the record. ``root``: this host's state root (the ssh key, known_hosts, definition.json);
    ``source``: the definition file, recorded as the domain's owner."""

    kind = "libvirt"

    def __init__(self, uri: str, root: str, source: str):
        self.uri, self.root, self.source = uri, root, source
        self.where = label(uri)

    def _call(self, name: str, what: Callable[[], T]) -> T:
        libvirt = binding()
        try:
            return what()
        except libvirt.libvirtError as exc:
            raise QemuspecError(f"machine {name} on {self.where}: {message(exc)}") from None

    def look(self, name: str, machine: Machine) -> Seen:
        def look() -> Seen:
            dom = lookup(connect(self.uri), name)
            if dom is None:
                return Seen()
            record = owner(dom)
            if record is None:
                return Seen(
                    claimed=True,
                    refusal=f"machine {name}: a domain named {name} exists on {self.uri} and qemuspec "
                    "did not define it: qemuspec leaves it alone; rename the machine, or "
                    "remove that domain yourself",
                )
            running = bool(dom.isActive())
            if record.get("machine") != name and record.get("file") == os.path.abspath(self.source):
                return Seen(
                    claimed=True,
                    refusal=f"machine {name}: the domain {name} on {self.uri} was defined for machine "
                    f"{record.get('machine')}: rename one of them",
                )
            return Seen(
                running=running,
                hash=record.get("hash"),
                owner=record.get("file"),
                claimed=True,
                place=f"on {self.uri}",
                ports=forwarded_ports(dom) if running else [],
                booted_memory=dom.maxMemory() // 1024 if running else None,
            )

        return self._call(name, look)

    def start(
        self, name: str, machine: Machine, action: str, report: Report
    ) -> Callable[[], Outcome]:
        return lambda: self._start(name, machine, action, report)

    def _start(self, name: str, machine: Machine, action: str, report: Report) -> Outcome:
        libvirt = binding()
        began = time.monotonic()
        try:
            conn = connect(self.uri)
            dom = lookup(conn, name)
            if dom is not None:  # a leftover of ours, stopped (reconcile checked whose it is)
                _undefine(dom)
            media, volumes = storage.prepare(conn, name, machine, _seed(name, machine, self.root))
            pool = storage.pool(conn)
            try:
                dom = conn.defineXML(
                    _wanted_xml(conn, name, machine, self.source, media, volumes, pool)
                )
            except libvirt.libvirtError as exc:
                raise QemuspecError(
                    f"libvirt at {self.uri} refused the domain: {message(exc)}"
                ) from None
            report(name, "starting")
            console = None
            try:
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                if machine.serial != "none":
                    console = Console(conn, dom)
                if not machine.paused:
                    dom.resume()
                    report(name, "waiting for ready")
                    _wait_ready(dom, self.uri, name, machine, console, began, self.root)
            except (QemuspecError, libvirt.libvirtError) as exc:
                detail = f"machine {name} on {self.where}: {message(exc)}"
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
            return Outcome(
                name,
                "failed",
                time.monotonic() - began,
                detail=f"machine {name} on {self.where}: {message(exc)}",
            )

    def join(self, name: str, machine: Machine, began: float) -> Outcome | None:
        return (
            None  # libvirt starts a domain in one call: there is no start in progress to wait for
        )

    def change(self, name: str, old: Machine, new: Machine, fields: list[str]) -> Outcome:
        """The same table as the local backend (spec/changes.py), through libvirt's live calls, each
        with LIVE and CONFIG so the next boot keeps it: ``memory`` by ``setMemoryFlags`` (the
        balloon), ``paused`` by suspend/resume, ``restart`` by ``setLifecycleAction`` (on_poweroff,
        on_crash); the other supervisor fields are qemuspec's own and need nothing of libvirt. Forwards
        live on the host's side (libvirt_reach), and disks and cdroms need volumes uploaded first, so
        those say restart (a QemuspecError before anything changed). Last, the owner record takes
        the new definition hash, so plan and up see the machine up to date."""
        from qemuspec.spec.changes import classify

        libvirt = binding()
        by = {
            c.field: c.by
            for c in classify(old.model_dump(mode="json"), new.model_dump(mode="json"))
        }
        restart_only = [f for f in fields if by.get(f) == "qemu" and f not in ("memory", "paused")]
        if restart_only:
            raise QemuspecError(
                f"machine {name} on {self.where}: {', '.join(restart_only)} cannot change in a "
                "running libvirt domain through qemuspec; it takes a restart"
            )
        dom = self._domain(name)
        both = libvirt.VIR_DOMAIN_AFFECT_LIVE | (
            libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        )
        steps: list[str] = []
        if "memory" in fields:
            self._call(name, lambda: dom.setMemoryFlags(new.memory * 1024, both))
            steps.append(f"setMemoryFlags {new.memory} MiB")
        if "restart" in fields:
            from qemuspec.libvirt import lifecycle

            for event, action in lifecycle(new.restart):
                kind = getattr(libvirt, f"VIR_DOMAIN_LIFECYCLE_{event.upper()}")
                value = getattr(libvirt, f"VIR_DOMAIN_LIFECYCLE_ACTION_{action.upper()}")
                self._call(name, functools.partial(dom.setLifecycleAction, kind, value, both))
            steps.append(f"setLifecycleAction for restart = {new.restart}")
        if "paused" in fields:
            self._call(name, dom.suspend if new.paused else dom.resume)
            steps.append("suspend" if new.paused else "resume")
        record = {**(owner(dom) or {}), "hash": definition_hash(new)}
        element = ET.Element("owner", record)  # libvirt puts it in OWNER_NS, prefix "qemuspec"
        self._call(
            name,
            lambda: dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                ET.tostring(element, encoding="unicode"),
                "qemuspec",
                OWNER_NS,
                both,
            ),
        )
        supervised = [f for f in fields if by.get(f) == "supervisor"]
        if supervised:
            steps.append("recorded: " + ", ".join(supervised))
        return Outcome(name, "changed", detail="; ".join(steps) or "recorded")

    def stop(self, name: str, machine: Machine, timeout: float | None) -> str:
        def down() -> str:
            dom = lookup(connect(self.uri), name)
            if dom is None:
                return "already stopped"
            step = stop(dom, machine.stop_timeout if timeout is None else timeout)
            _undefine(dom)
            return step

        return self._call(name, down)

    def clean(self, name: str) -> None:
        def clean() -> None:
            dom = lookup(connect(self.uri), name)
            if dom is not None and not dom.isActive():
                _undefine(dom)

        self._call(name, clean)

    def plan_step(self, name: str, machine: Machine, seen: Seen, action: str) -> dict:
        """The diff of the domain XML libvirt holds against the XML the definition gives now."""

        def diff() -> list[str]:
            conn = connect(self.uri)
            dom = lookup(conn, name)
            if dom is None or action not in ("start", "recreate"):
                return []
            pool = storage.pool(conn, create=False)
            media = {p: storage.predicted(pool, p) for p in storage.media_paths(machine)}
            for index, disk in enumerate(machine.disks):
                if disk.size is not None or disk.backing:
                    media[disk.file] = os.path.join(
                        storage.pool_dir(pool) if pool else storage.SYSTEM_POOL_DIR,
                        storage.disk_volume(name, index, disk.format),
                    )
            held = dom.XMLDesc(binding().VIR_DOMAIN_XML_INACTIVE)
            wanted = _wanted_xml(conn, name, machine, self.source, media, [], pool)
            return list(
                difflib.unified_diff(
                    project(held), project(wanted), "libvirt", "definition", lineterm="", n=1
                )
            )

        return {"diff": self._call(name, diff), "host": self.uri}

    def status(self, name: str, machine: Machine) -> dict:
        row: dict[str, Any] = {
            "name": name,
            "state": "stopped",
            "reason": "",
            "pid": None,
            "supervisor": None,
            "uptime": None,
            "restarts": 0,
            "restart": machine.restart,
            "qmp": None,
            "ports": [],
            "accel": [],
            "host": self.uri,
        }
        try:
            conn = connect(self.uri)
        except Unreachable as exc:  # the row stays: a host that is down is a state, not an error
            row["state"], row["reason"] = f"unreachable: {exc.reason}", str(exc)
            return row

        def look() -> None:
            dom = lookup(conn, name)
            if dom is None:
                return
            record = owner(dom)
            if record is None or record.get("file") != os.path.abspath(self.source):
                row["state"] = "not ours"
                return
            row["state"] = _state(dom)
            if dom.isActive():
                row["ports"] = forwarded_ports(dom)
                row["accel"] = [
                    "kvm" if ET.fromstring(dom.XMLDesc(0)).get("type") == "kvm" else "tcg"
                ]

        self._call(name, look)
        return row

    def preflight(
        self,
        spec: File,
        source: str,
        names: list[str],
        allow_local_qemu: bool,
        allow_host_paths: bool,
        environ: dict[str, str],
        ports: bool = False,
        probe: bool = False,
    ) -> list[Problem]:
        """The files `up` uploads from this host must exist, and host paths outside the tree need the
        user's opt-in; the qemu binary, kvm, ports and capabilities are the libvirt host's, not ours."""
        from qemuspec.spec import preflight as checks

        return checks.missing_files(spec, names) + checks.host_path_problems(
            spec, source, names, allow_host_paths, environ
        )

    def refusal(self, name: str, machine: Machine, command: str) -> str | None:
        if command in (
            "events",
            "logs --events",
            "snapshot",
            "reset",
            "up --attach",
            "inspect",
            "provision",
        ):
            return unsupported(name, self.where, command)
        if machine.warm and command in ("up", "restart", "plan"):
            return (
                f"machine {name} runs through libvirt at {self.where}: warm start (warm = true, --warm) restores "
                "qemuspec's own saved state, which libvirt does not keep: drop it for this machine "
                "(through libvirt, `virsh managedsave` saves a running domain)"
            )
        guest_steps = [
            f
            for f, used in (
                ("provision", machine.provision),
                ("ready.command", machine.ready.command),
            )
            if used
        ]
        if guest_steps and command in ("up", "restart"):
            return (
                f"machine {name} runs through libvirt at {self.where}: {' and '.join(guest_steps)} run in the guest "
                "through qemuspec's local agent channel, which a libvirt domain does not give it yet: provision with "
                "cloud-init (cloud_init.user_data) and wait with ready.ssh or ready.tcp, or run this machine locally"
            )
        return None

    def purge(self, name: str) -> list[str]:
        """The machine's volumes and uploaded media no other qemuspec domain uses; then this host's part."""
        from qemuspec.runtime.purge import purge

        def volumes() -> list[str]:
            conn = connect(self.uri)
            return storage.purge(conn, name, _media_in_use(conn, name)) or []

        return self._call(name, volumes) + purge(self.root, name)

    def _domain(self, name: str) -> Any:
        dom = self._call(name, lambda: lookup(connect(self.uri), name))
        if dom is None or not dom.isActive():
            raise QemuspecError(
                f"machine {name} is not running on {self.uri}: start it with `qemuspec up {self.source}`"
            )
        _ours(dom, self.uri, name, self.source)
        return dom

    def monitor(self, name: str, machine: Machine) -> Monitor:
        return Monitor(self._domain(name))

    def agent(self, name: str, machine: Machine, timeout: float) -> LibvirtAgent:
        return LibvirtAgent(self._domain(name), timeout=timeout)

    def pause(self, name: str, machine: Machine, paused: bool) -> None:
        dom = self._domain(name)
        self._call(name, dom.suspend if paused else dom.resume)

    def console(self, name: str, machine: Machine, interactive: bool) -> socket.socket:
        """libvirt's console stream (like `virsh console --force` when interactive), bridged to a socket
        so the CLI reads every backend's console the same way; the socket ends when the stream does."""
        ours, theirs = socket.socketpair()

        def arrived(chunk: bytes) -> None:
            try:
                ours.sendall(chunk)
            except OSError:
                pass

        stream = Console(connect(self.uri), self._domain(name), force=interactive, on_data=arrived)

        def pump() -> None:  # keystrokes to the guest; the caller closing its end closes the stream
            try:
                while data := ours.recv(4096):
                    stream.send(data)
            except (OSError, QemuspecError):
                pass
            stream.close()

        def ended() -> None:  # the machine stopped: the caller reads the end of its console
            stream.wait_closed(None)
            try:
                ours.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=pump, name=f"console-{name}", daemon=True).start()
        threading.Thread(target=ended, name=f"console-end-{name}", daemon=True).start()
        return theirs

    def serial_log(self, name: str) -> str | None:
        """The serial log libvirt keeps in the pool, downloaded (so remote hosts work)."""
        data = self._call(name, lambda: storage.download(connect(self.uri), f"{name}-serial.log"))
        return None if data is None else data.decode(errors="replace").replace("\r", "")

    def ssh(self, name: str, machine: Machine, command: list[str]) -> dict:
        return {
            "machine": name,
            "host": self.uri,
            "argv": ssh_argv(self.uri, name, machine, self.root, command, dom=self._domain(name)),
        }

    def settle(self, spec: File, names: list[str]) -> None:
        return None  # private networks are local only (the export refuses them)

    def readopt(self, spec: File, names: list[str]) -> list[Outcome]:
        return []  # libvirtd supervises its domains itself
