"""qemu decides whether two command lines ask for the same machine.

``qemuspec import`` promises that the rendered definition gives qemu the machine the original line
gave it. Comparing the two lines as text would share the importer's blind spots (defaults qemu adds,
shorthands it expands, ids it wires), so both lines are started, stopped before any guest code runs
(``-S``), and asked what qemu built: the device tree, the block backends, memory, CPUs, networks,
character devices and the machine's properties. Backend ids (``drive=disk0``) are replaced by what
they point at, so a renamed backend is the same machine and a changed one is not.

Only what qemuspec owns by design may differ: its monitors, its serial console, its guest-agent
channel, its pidfile and the process name; :class:`Verdict` lists those in words as well.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from qemuspec.errors import LaunchError, QemuspecError

if TYPE_CHECKING:
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.spec.models import Machine

# Chardevs qemuspec creates for its own plumbing, and those qemu creates for the options qemuspec
# manages (-serial, -monitor, -qmp, -nographic) in an original line.
_OWNED_CHARDEV = re.compile(r"^(qemuspec-.*|serial0|serial0-base|compat_monitor\d+|judge-\d+)$")
# What qemu built, by section: a repr, a sorted list of descriptions, or a map of name -> description.
Observation = dict[str, "str | None | list[str] | Mapping[str, object]"]
_BACKEND_REFS = ("drive", "netdev", "chardev")
_SKIP_MACHINE_PROPS = {
    "rtc-time",
    "type",
    "unattached",
    "peripheral",
    "peripheral-anon",
    "fw_cfg",
    "q35",
    "i440fx",
}


@dataclass
class Difference:
    section: str
    words: str
    owned: bool  # True: qemuspec owns this by design (monitors, console, agent channel, name)

    def __str__(self) -> str:
        return f"{self.section}: {self.words}" + (
            " (qemuspec's own, allowed)" if self.owned else ""
        )


@dataclass
class Verdict:
    differences: list[Difference] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not any(not d.owned for d in self.differences)

    @property
    def owned(self) -> list[Difference]:
        return [d for d in self.differences if d.owned]

    @property
    def unexpected(self) -> list[Difference]:
        return [d for d in self.differences if not d.owned]

    def report(self) -> str:
        head = (
            "qemu builds the same machine from both lines"
            if self.same
            else "qemu builds a DIFFERENT machine from the rendered line"
        )
        return "\n".join([head] + [f"  - {d}" for d in self.differences])


def runnable(argv: list[str]) -> list[str]:
    """The line as the judge starts it: TCG (this check never needs a real accelerator, and a host
    without KVM must still judge a KVM line), no daemonizing, no window. The same rewrite is
    applied to both lines, so it cannot hide a difference between them."""
    out = [argv[0]]
    headless = False
    i = 1
    while i < len(argv):
        token = argv[i]
        name = token.lstrip("-") if token.startswith("-") else None
        value = argv[i + 1] if i + 1 < len(argv) else None
        if name in ("enable-kvm", "daemonize", "no-kvm"):
            i += 1
            continue
        if name == "accel" and value is not None:
            i += 2
            continue
        if name == "display" and value is not None:
            out += [token, "none"]
            headless = True
            i += 2
            continue
        if name in ("nographic", "sdl", "curses"):
            headless = True
        if name in ("machine", "M") and value is not None and not value.lstrip().startswith("{"):
            value = ",".join(
                p for p in re.split(r"(?<!,),(?!,)", value) if not p.startswith("accel=")
            )
            out += [token, value or "pc"]
            i += 2
            continue
        if name == "cpu" and value is not None and value.split(",")[0] == "host":
            out += [token, "max" + value[4:]]
            i += 2
            continue
        out.append(token)
        i += 1
    return out + ["-accel", "tcg"] + ([] if headless else ["-display", "none"])


def observe(argv: list[str], timeout: float = 30.0) -> Observation:
    """Start ``argv`` stopped (-S), read what qemu built, and quit. Raises LaunchError with qemu's
    own message when qemu refuses the line."""
    from qemuspec.qmp.sync import QMPClient

    ours, theirs = socket.socketpair()
    label = f"judge-{os.getpid()}"
    line = runnable(argv) + [
        "-S",
        "-chardev",
        f"socket,id={label},fd={theirs.fileno()}",
        "-mon",
        f"chardev={label},mode=control",
    ]
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                line,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start {argv[0]}: {exc.strerror}") from None
        finally:
            theirs.close()
        client = None
        try:
            ready = threading.Event()

            def watch() -> None:  # qemu exiting before its greeting must end the wait at once
                proc.wait()
                if not ready.is_set():
                    try:
                        ours.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            threading.Thread(target=watch, daemon=True).start()
            try:
                client = QMPClient.connect(ours, timeout=timeout)
            except QemuspecError:
                proc.wait(timeout=timeout)
                err.seek(0)
                message = err.read().decode(errors="replace").strip()
                raise LaunchError(
                    f"qemu refused the line: {message or 'exit status %s' % proc.returncode}"
                ) from None
            ready.set()
            return _collect(client, label)
        finally:
            if client is not None:
                try:
                    client.command("quit", timeout=timeout)
                except QemuspecError:
                    pass
                client.close()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            ours.close()


def _collect(qmp: QMPClient, label: str) -> Observation:
    hmp = lambda line: qmp.command("human-monitor-command", {"command-line": line})
    blocks = qmp.command("query-block")
    backends: dict[str, str] = {}
    drives = []
    for block in blocks:
        record = _drive_record(block)
        for key in (block.get("device"), (block.get("inserted") or {}).get("node-name")):
            if key:
                backends[key] = record
        if block.get("qdev") is None:
            drives.append(record)  # a backend no device uses: still part of the machine
    networks, netrefs, forwards = _networks(hmp("info network"), hmp("info usernet"))
    chardevs = {
        c["label"]: re.sub(r"^pty:/dev/pts/\d+$", "pty", c["filename"])
        for c in qmp.command("query-chardev")
        if c["label"] != label
    }
    tree = _qtree(hmp("info qtree"), backends, netrefs, chardevs)
    cpus = qmp.command("query-cpus-fast")
    machine = {}
    for prop in qmp.command("qom-list", {"path": "/machine"}):
        if prop["name"] in _SKIP_MACHINE_PROPS or prop["type"].startswith(
            ("child<", "link<memory-region", "link<hotplug", "link<isa")
        ):
            continue
        try:
            got = qmp.command("qom-get", {"path": "/machine", "property": prop["name"]})
            machine[prop["name"]] = (
                backends.get(got, repr(got)) if isinstance(got, str) else repr(got)
            )
        except QemuspecError:
            continue
    cpu_props = {}
    if cpus:
        path = cpus[0]["qom-path"]
        for prop in qmp.command("qom-list", {"path": path}):
            if prop["type"] in (
                "bool",
                "string",
                "uint32",
                "int32",
                "uint64",
                "int64",
                "uint8",
                "uint16",
                "str",
            ):
                try:
                    cpu_props[prop["name"]] = repr(
                        qmp.command("qom-get", {"path": path, "property": prop["name"]})
                    )
                except QemuspecError:
                    continue
    memdevs = [repr(sorted(m.items())) for m in qmp.command("query-memdev")]
    return {
        "name": repr(qmp.command("query-name").get("name")),
        "machine": machine,
        "memory": repr(qmp.command("query-memory-size-summary")),
        "memdevs": sorted(memdevs),
        "cpus": repr(
            sorted(
                (
                    c.get("props", {}).get("socket-id"),
                    c.get("props", {}).get("core-id"),
                    c.get("props", {}).get("thread-id"),
                    c["target"],
                )
                for c in cpus
            )
        ),
        "cpu-model": _cpu_type(qmp, cpus[0]["qom-path"]) if cpus else None,
        "cpu-properties": cpu_props,
        "devices": tree,
        "drives": sorted(drives),
        "networks": sorted(networks),
        "forwards": sorted(forwards),
        "chardevs": {k: v for k, v in chardevs.items() if not _OWNED_CHARDEV.match(k)},
        "owned-chardevs": {k: v for k, v in chardevs.items() if _OWNED_CHARDEV.match(k)},
    }


def _cpu_type(qmp, path: str) -> str:
    return str(qmp.command("qom-get", {"path": path, "property": "type"}))


def _drive_record(block: dict) -> str:
    inserted = block.get("inserted")
    if not inserted:
        return f"<empty {block.get('type', '')} drive, removable={block.get('removable')}>"
    image = inserted.get("image", {})
    chain = []
    while image:
        chain.append(
            f"{image.get('filename')} ({image.get('format')}, {image.get('virtual-size')} bytes)"
        )
        image = image.get("backing-image")
    cache = inserted.get("cache", {})
    extra = {
        k: inserted[k] for k in ("detect_zeroes", "bps", "iops", "encrypted") if inserted.get(k)
    }
    text = (
        f"<drive {' on '.join(chain)} driver={inserted.get('drv')} read-only={inserted.get('ro')} "
        f"cache=writeback:{cache.get('writeback')},direct:{cache.get('direct')},no-flush:{cache.get('no-flush')}"
        + (f" {extra}" if extra else "")
        + ">"
    )
    return re.sub(r"/var/tmp/vl\.\w+", "<-snapshot's temporary overlay>", text)


def _networks(info: str, usernet: str) -> tuple[list[str], dict[str, str], list[str]]:
    """``info network`` as records without qemu's generated names: each NIC with what it is wired to."""
    strip = lambda desc: re.sub(r"^(?:\S+: )+", "", re.sub(r"\bindex=\d+,?", "", desc)).strip()
    entries: list[tuple[int, str, str]] = []  # (indent, name, description)
    for raw in info.splitlines():
        match = re.match(r"^(\s*)(?:\\\s*)?(\S+): (.*)$", raw)
        if match:
            entries.append((len(match.group(1)), match.group(2), strip(match.group(3))))
        elif raw.startswith("hub "):
            entries.append((0, raw.strip(), "hub"))
    describe = {name: desc for _, name, desc in entries}
    records, refs = [], {}
    current = None
    for indent, name, desc in entries:
        if indent == 0:
            current = (name, desc)
            if desc != "hub":
                records.append(desc)
        else:
            records.append(f"{current[1]} -> {desc}")  # type: ignore[index]
            refs[name] = f"<{current[1]}>" if current[1] == "hub" else desc  # type: ignore[index]
    for name, desc in describe.items():
        refs.setdefault(name, f"<{desc}>")
    forwards = []
    for raw in usernet.splitlines():
        cols = raw.split()
        if cols and "HOST_FORWARD" in cols[0]:
            forwards.append(
                " ".join([cols[0]] + cols[2:6])
            )  # protocol, host addr/port, guest addr/port (not the fd)
    return records, refs, forwards


def _qtree(
    text: str, backends: dict[str, str], netrefs: dict[str, str], chardevs: dict[str, str]
) -> list[str]:
    """The device tree as one line per device: its place (bus path), type, id and properties, with
    backend references replaced by what they refer to."""
    out = []
    stack: list[tuple[int, str]] = []
    device: dict | None = None

    def flush():
        if device is not None:
            out.append(
                f"{device['bus']} {device['type']} id={device['id']!r} "
                + ", ".join(device["props"])
            )

    for raw in text.splitlines():
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if line.startswith("bus: "):
            stack.append((indent, line[5:]))
        elif line.startswith("dev: "):
            flush()
            match = re.match(r"dev: (\S+), id \"(.*)\"", line)
            bus = "/".join(b for _, b in stack)
            device = {"bus": bus, "type": match.group(1), "id": match.group(2), "props": []}  # type: ignore[union-attr]
            stack.append((indent, f"{match.group(1)}"))  # type: ignore[union-attr]
        elif device is not None and " = " in line:
            key, _, value = line.partition(" = ")
            value = value.strip()
            name = value.strip('"')
            if key in _BACKEND_REFS and name:
                if key == "drive":
                    value = backends.get(name, f"<drive {name}?>")
                elif key == "netdev":
                    value = netrefs.get(name, f"<netdev {name}?>")
                elif key == "chardev":
                    value = (
                        "<qemuspec's own chardev>"
                        if _OWNED_CHARDEV.match(name)
                        else f"<chardev {chardevs.get(name)}>"
                    )
            device["props"].append(f"{key}={value}")
        elif device is not None and line.startswith(
            ("class ", "bar ", "mmio ", "gpio-", "irq ", "dev-prop", "port ")
        ):
            continue
    flush()
    return sorted(out)


_DESCRIBE = {
    "name": "the process name (-name)",
    "machine": "machine property",
    "memory": "memory size",
    "memdevs": "memory backend",
    "cpus": "CPU topology",
    "cpu-model": "CPU model",
    "cpu-properties": "CPU property",
    "devices": "device",
    "drives": "block backend without a device",
    "networks": "network",
    "forwards": "user-mode port forward",
    "chardevs": "character device",
    "owned-chardevs": "qemuspec's own character device (monitor, console, agent)",
}


def compare(original: Observation, rendered: Observation) -> Verdict:
    verdict = Verdict()
    for section, words in _DESCRIBE.items():
        a, b = original.get(section), rendered.get(section)
        owned = section in ("owned-chardevs", "name")
        if isinstance(a, dict):
            b_map = b if isinstance(b, dict) else {}
            for key in sorted(set(a) | set(b_map)):
                if a.get(key) != b_map.get(key):
                    verdict.differences.append(
                        Difference(
                            section,
                            f"{words} {key}: {_shown(a.get(key))} in the original, {_shown(b_map.get(key))} rendered",
                            owned,
                        )
                    )
        elif isinstance(a, list):
            b_list = b if isinstance(b, list) else []
            missing, extra = _multiset_minus(a, b_list), _multiset_minus(b_list, a)
            for item in missing:
                verdict.differences.append(
                    Difference(
                        section,
                        f"{words} only in the original: {item}",
                        owned or _owned_device(item),
                    )
                )
            for item in extra:
                verdict.differences.append(
                    Difference(
                        section,
                        f"{words} only in the rendered line: {item}",
                        owned or _owned_device(item),
                    )
                )
        elif a != b:
            verdict.differences.append(
                Difference(section, f"{words}: {a} in the original, {b} rendered", owned)
            )
    return verdict


def _shown(value: object) -> str:
    return "absent" if value is None else str(value)


def _owned_device(item: str) -> bool:
    """The devices of qemuspec's own channels: its agent port and the console's serial port wiring, and
    the panic device it adds (render.py, _wants_pvpanic)."""
    return (
        "org.qemu.guest_agent.0" in item and "<qemuspec's own chardev>" in item
    ) or "id='qemuspec-pvpanic'" in item


def _multiset_minus(a: Iterable[str], b: Iterable[str]) -> list[str]:
    rest = list(b)
    out = []
    for item in a:
        if item in rest:
            rest.remove(item)
        else:
            out.append(item)
    return out


def check(
    original: list[str],
    rendered: list[str],
    timeout: float = 30.0,
    before: Callable[[], Callable[[], object]] | None = None,
) -> Verdict:
    """Start both lines (one after the other: they may bind the same sockets and ports) and compare.
    ``before`` starts what a line needs outside qemu (a swtpm, a virtiofsd) and returns its cleanup;
    it runs before each of the two starts, since such helpers serve one qemu and exit."""
    seen = []
    for argv in (original, rendered):
        cleanup = before() if before else None
        try:
            seen.append(observe(argv, timeout))
        finally:
            if cleanup:
                cleanup()
    return compare(*seen)


def _render_scratch(machine: Machine, name: str, scratch: str, index: int) -> list[str]:
    """The machine's argv with its own files (sockets, pidfile, UEFI variables) in a scratch directory,
    built by the one Layout constructor on TCG (the judge never runs KVM: it can exist and hang)."""
    from qemuspec.render import OVMF_VARS, render
    from qemuspec.runtime import images, paths
    from qemuspec.settings import Settings

    layout = paths.machine_layout(
        machine,
        os.path.join(scratch, f"state{index}"),
        Settings(accel="tcg"),
        run_dir=os.path.join(scratch, f"run{index}"),
    )
    # qemuspec's own monitors are not compared; a TCP one would need the per-run TLS credentials
    layout = dataclasses.replace(layout, qmp_port=None)
    os.makedirs(layout.state_dir, mode=0o700, exist_ok=True)
    os.makedirs(layout.run_dir, mode=0o700, exist_ok=True)
    if machine.firmware.type == "uefi":
        images.ensure_efivars(machine.firmware.vars or OVMF_VARS, layout.efivars)
    return render(machine, name, layout)


def check_definition(
    argv: list[str],
    machine: Machine,
    name: str,
    timeout: float = 30.0,
    before: Callable[[], Callable[[], object]] | None = None,
) -> Verdict:
    """Whether ``machine`` (a model), rendered, is the machine ``argv`` asks for. The rendered line's
    own files go to a scratch directory that is removed afterwards."""
    import shutil

    scratch = tempfile.mkdtemp(prefix="qemuspec-check-")
    try:
        return check(argv, _render_scratch(machine, name, scratch, 0), timeout, before)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_models(first: Machine, second: Machine, name: str, timeout: float = 30.0) -> Verdict:
    """Whether two definitions (models) render to the same machine, qemu judging: the libvirt round
    trip (definition -> domain XML -> definition) is checked this way."""
    import shutil

    scratch = tempfile.mkdtemp(prefix="qemuspec-check-")
    try:
        # one layout for both: they run one after the other, and qemuspec's own files are then the same
        return check(
            _render_scratch(first, name, scratch, 0),
            _render_scratch(second, name, scratch, 0),
            timeout,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
