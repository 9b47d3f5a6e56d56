"""The library face: a chainable builder over the same model, renderer and runtime as the files.

    from qemuspec import Qemu
    vm = Qemu().vm()
    vm.hda("disk.img").kernel("vmlinuz").initrd("initrd")
    vm.start()
    vm.quit()

Every setter validates at once (a bad value fails where it is written, with the same message a file
would get) and returns the machine, so calls chain. ``to_toml()`` writes the definition the builder
holds; :func:`load` turns a definition file into machines that start the same way.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, TypeVar

from qemuspec.errors import QemuspecError, QMPTimeout, SpecError

if TYPE_CHECKING:
    from qemuspec.backends.base import Backend, Monitor
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.instance import Instance
    from qemuspec.settings import Settings
    from qemuspec.spec.models import File, Machine

Callback = Callable[[dict], object]
T = TypeVar("T")


class Qemu:
    """Settings shared by the machines it makes: the qemu binary, QMP transport, where state goes.

    ``settings`` (a qemuspec.settings.Settings) are passed down to every machine, so a program runs
    with choices of its own (``Settings(accel="tcg")``) without touching the process environment;
    by default the process's (read from the environment once)."""

    def __init__(
        self,
        qemu: str = "qemu-system-x86_64",
        tcp: bool = False,
        port: int = 4444,
        state_dir: str | None = None,
        accel: str | list[str] | None = None,
        settings: Settings | None = None,
    ):
        from qemuspec.settings import current

        self.qemu = qemu
        self.tcp = tcp
        self.port = port
        self.settings = settings or current()
        self.state_dir = state_dir or self.settings.state_dir
        self.accel = accel
        self._count = 0

    def vm(self, name: str | None = None, **fields: object) -> "VM":
        self._count += 1
        defaults: dict[str, object] = {
            "qemu": self.qemu,
            "qmp": {"transport": "tcp" if self.tcp else "unix", "port": self.port},
        }
        if self.accel is not None:
            defaults["accel"] = self.accel
        name = name or f"vm{self._count}"
        state = os.path.join(self.state_dir, name) if self.state_dir else None
        return VM(name, {**defaults, **fields}, state_dir=state, settings=self.settings)


class VM:
    """One machine: builder while stopped, controller while running."""

    def __init__(
        self,
        name: str = "vm",
        fields: dict | Machine | None = None,
        state_dir: str | None = None,
        settings: Settings | None = None,
    ):
        from qemuspec.settings import current

        self.name = name
        self.settings = settings or current()
        self._fields: dict[str, object] = {}
        self._model: Machine | None = None
        self._instance: Instance | None = None  # the runtime Instance once started
        from qemuspec.spec.models import Machine

        if isinstance(fields, Machine):
            self._model = fields
            self._fields = fields.model_dump(exclude_unset=True)
        else:
            self._set(**(fields or {}))
        self._state_dir = state_dir
        self._own_state_dir = False
        self._listeners: list[tuple[str, Callback]] = []
        self._async_turn: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    # -- building ---------------------------------------------------------------------------------

    @property
    def model(self) -> Machine:
        """The whole machine, validated including the rules that tie fields together."""
        if self._model is None:
            self._model = self._validate(self._fields, partial=False)
        return self._model

    def _validate(self, fields: dict, partial: bool) -> Machine:
        from pydantic import ValidationError

        from qemuspec.spec.models import Machine

        try:
            return Machine.model_validate(
                fields, context={"base_dir": os.getcwd(), "partial": partial}
            )
        except ValidationError as exc:
            from qemuspec.spec.messages import explain

            raise SpecError(
                explain(exc, fields, f"machine {self.name}", {}, root=Machine)
            ) from None

    def _set(self, **fields: builtins.object) -> "VM":
        """Each value is checked as it is set; rules between fields (ready.agent needs agent) wait for
        ``model``, so setters can come in any order."""
        if self._instance is not None and self._instance.running():
            raise QemuspecError(
                f"machine {self.name} is running: change it after stop(), or use qmp() on the live machine"
            )
        merged = {**self._fields, **fields}
        self._validate(merged, partial=True)
        self._fields = merged
        self._model = None
        return self

    def _list(self, key: str) -> list[builtins.object]:
        value = self._fields.get(key)
        return list(value) if isinstance(value, list) else []

    def _add(self, key: str, item: builtins.object) -> "VM":
        return self._set(**{key: [*self._list(key), item]})

    def hda(self, file: str, format: str | None = None) -> "VM":
        """The first IDE disk, as qemu's -hda."""
        return self.drive(file, format=format, interface="ide")

    def hdb(self, file: str, format: str | None = None) -> "VM":
        return self.drive(file, format=format, interface="ide")

    def drive(
        self,
        file: str,
        format: str | None = None,
        interface: str = "virtio",
        size: str | int | None = None,
        backing: str | None = None,
        readonly: bool = False,
        image: dict[str, str] | None = None,
        **options: builtins.object,
    ) -> "VM":
        """A disk; ``image={"url": ..., "digest": "sha256:..."}`` makes ``file`` an overlay on that base
        image, fetched into the user's image cache on start."""
        disk = {"file": file, "interface": interface, "readonly": readonly, "options": options}
        disk.update(
            {
                k: v
                for k, v in (
                    ("format", format),
                    ("size", size),
                    ("backing", backing),
                    ("image", image),
                )
                if v is not None
            }
        )
        return self._add("disks", disk)

    def cdrom(self, iso: str) -> "VM":
        return self._add("cdrom", iso)

    def kernel(self, path: str) -> "VM":
        return self._set(kernel=path)

    def initrd(self, path: str) -> "VM":
        return self._set(initrd=path)

    def cmdline(self, text: str) -> "VM":
        """The kernel command line (qemu's -append)."""
        return self._set(cmdline=text)

    def append(self, *switches: str) -> "VM":
        """Raw qemu switches, passed through verbatim (``append("-rtc", "base=utc")``)."""
        return self._set(append=[*self._list("append"), *switches])

    def memory(self, size: str | int) -> "VM":
        return self._set(memory=size)

    def cpus(self, count: int) -> "VM":
        return self._set(cpus=count)

    def cpu(self, model: str, **options: builtins.object) -> "VM":
        return self._set(cpu=model, cpu_options=options)

    def machine(self, type: str, **options: builtins.object) -> "VM":
        return self._set(machine=type, machine_options=options)

    def accel(self, accel: str | list[str]) -> "VM":
        return self._set(accel=accel)

    def firmware(
        self, type: str = "bios", code: str | None = None, vars: str | None = None
    ) -> "VM":
        return self._set(
            firmware={
                k: v for k, v in (("type", type), ("code", code), ("vars", vars)) if v is not None
            }
        )

    def boot(self, order: str) -> "VM":
        return self._set(boot_order=order)

    def nic(
        self, type: str = "user", model: str = "virtio-net-pci", **fields: builtins.object
    ) -> "VM":
        return self._add("nics", {"type": type, "model": model, **fields})

    def forward(self, host: int, guest: int, protocol: str = "tcp") -> "VM":
        """Forward a host port (0: a free one) to a guest port, on the first user-mode NIC (made if none)."""
        nics = [dict(n) for n in self._list("nics") if isinstance(n, dict)]
        user = next((n for n in nics if n.get("type", "user") == "user"), None)
        if user is None:
            user = {"type": "user"}
            nics.append(user)
        user["forwards"] = [
            *user.get("forwards", []),
            {"host": host, "guest": guest, "protocol": protocol},
        ]
        return self._set(nics=nics)

    def share(self, source: str, tag: str, type: str = "9p", readonly: bool = False) -> "VM":
        return self._add(
            "shares", {"source": source, "tag": tag, "type": type, "readonly": readonly}
        )

    def serial(self, mode: str) -> "VM":
        return self._set(serial=mode)

    def display(self, type: str = "none", **fields: builtins.object) -> "VM":
        return self._set(display={"type": type, **fields})

    def ready(
        self,
        serial: str | None = None,
        tcp: int | None = None,
        agent: bool = False,
        ssh: bool = False,
        timeout: float | str = 60,
    ) -> "VM":
        return self._set(
            ready={"serial": serial, "tcp": tcp, "agent": agent, "ssh": ssh, "timeout": timeout}
        )

    def agent(self, on: bool = True) -> "VM":
        return self._set(agent=on)

    def rng(self, on: bool = True) -> "VM":
        return self._set(rng=on)

    def device(self, driver: str, id: str | None = None, **options: builtins.object) -> "VM":
        return self._add("devices", {"driver": driver, "id": id, "options": options})

    def object(self, type: str, id: str, **options: builtins.object) -> "VM":
        return self._add("objects", {"type": type, "id": id, "options": options})

    def paused(self, on: bool = True) -> "VM":
        return self._set(paused=on)

    def restart(self, policy: str) -> "VM":
        return self._set(restart=policy)

    def stop_timeout(self, seconds: float | str) -> "VM":
        return self._set(stop_timeout=seconds)

    def qmp_over(self, transport: str, port: int = 4444) -> "VM":
        return self._set(qmp={"transport": transport, "port": port})

    def set(self, **fields: builtins.object) -> "VM":
        """Any field of the model by its definition-file name (``vm.set(stop_timeout="5s")``)."""
        return self._set(**fields)

    def __getattr__(self, name: str) -> Callable[..., "VM"]:
        """A setter for each field of the model without a method of its own (``vm.balloon()``,
        ``vm.warm(True)``, ``vm.disks([...])``): every option the model declares is reachable, with
        no builder code per option. Called with no value, a setter turns the option on."""
        from qemuspec.spec.models import Machine

        if name.startswith("_") or name not in Machine.model_fields:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def setter(value: Any = True) -> "VM":
            return self._set(**{name: value})

        setter.__name__, setter.__doc__ = name, Machine.model_fields[name].description
        return setter

    # -- definitions ------------------------------------------------------------------------------

    def definition(self) -> dict:
        return {
            "machines": {
                self.name: self.model.model_dump(
                    mode="json", exclude_defaults=True, exclude_none=True
                )
            }
        }

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.definition())

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.definition(), sort_keys=False)

    def argv(self) -> list[str]:
        """The qemu command line (paths point into the state directory): the one ``qemuspec render``
        prints for the same machine, from the same Layout constructor."""
        from qemuspec.render import render

        return render(self.model, self.name, self.layout())

    def layout(self) -> Any:
        """Where the machine's files go, accelerators and monitor resolved (runtime/paths.machine_layout)."""
        from qemuspec.runtime import paths

        return paths.machine_layout(self.model, self.state_dir, self.settings)

    # -- running ----------------------------------------------------------------------------------

    @property
    def state_dir(self) -> str:
        if self._state_dir is None:
            self._state_dir = tempfile.mkdtemp(prefix=f"qemuspec-{self.name}-")
            self._own_state_dir = True
        return self._state_dir

    def on(self, event: str, callback: Callback) -> "VM":
        """Call ``callback(event)`` for each QMP event named ``event`` ("*" for all)."""
        self._listeners.append((event, callback))
        if self._instance is not None:
            self._instance.on(event, callback)
        return self

    def start(
        self, callback: Callable[["VM"], builtins.object] | None = None, ready: bool = True
    ) -> "VM":
        """Launch; return once QMP answers and, when the machine has readiness probes, they pass."""
        from qemuspec.runtime.instance import Instance

        instance = Instance(self.name, self.model, self.state_dir, self.layout())
        for event, cb in self._listeners:
            instance.on(event, cb)
        self._instance = instance
        instance.launch()
        try:
            if ready:
                instance.wait_ready()
        except BaseException:
            instance.kill()
            raise
        if callback is not None:
            callback(self)
        return self

    @property
    def instance(self) -> Instance:
        if self._instance is None or self._instance.process is None:
            raise QemuspecError(f"machine {self.name} has not been started: call start() first")
        return self._instance

    @property
    def _client(self) -> QMPClient:
        """The controller's QMP connection of the running machine."""
        client = self.instance.qmp
        if client is None:
            raise QemuspecError(
                f"machine {self.name} has no QMP connection (it is starting or stopping)"
            )
        return client

    def qmp(
        self, command: str, arguments: dict | None = None, timeout: float = 30.0, **kwargs: Any
    ) -> Any:
        """Run a QMP command on the running machine; returns its value."""
        return self._client.command(command, arguments, timeout=timeout, **kwargs)

    def wait_for(self, event: str, timeout: float) -> dict:
        return self._client.wait_for(event, timeout)

    def wait_console(self, pattern: str, timeout: float) -> str:
        """Wait for a regex on the serial console; returns the matched text."""
        if self.instance.console is None:
            raise QemuspecError(
                f'machine {self.name} has serial = "{self.model.serial}": the console is readable with "log" or "socket"'
            )
        return self.instance.console.wait_for(pattern, timeout).group(0).decode(errors="replace")

    def exec(self, *argv: str, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run a command in the guest through the guest agent: (exit code, stdout, stderr)."""
        from qemuspec.runtime.agent import GuestAgent

        with GuestAgent(self.instance.layout.qga) as agent:
            return agent.exec(list(argv), timeout=timeout)

    def host_port(self, guest: int, protocol: str = "tcp") -> int:
        return self.instance.host_port(guest, protocol)

    @property
    def pid(self) -> int:
        process = self.instance.process
        assert process is not None  # instance says so
        return process.pid

    def running(self) -> bool:
        return self._instance is not None and self._instance.running()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for qemu to exit; its exit code, or None when still running after ``timeout``."""
        return self.instance.wait(timeout)

    def quit(self, timeout: float = 10.0):
        """Stop at once with QMP quit (signals if qemu does not go); returns what stopped it."""
        return self._finish(self.instance.quit(timeout))

    def stop(self, timeout: float | None = None):
        """Graceful stop: ACPI powerdown, then quit, SIGTERM, SIGKILL; returns which step stopped it."""
        return self._finish(self.instance.stop(timeout))

    def kill(self) -> None:
        self.instance.kill()
        self._finish(None)

    def _finish(self, result: T) -> T:
        if self._own_state_dir and self._state_dir and not self.running():
            from qemuspec.runtime.statedir import disown

            disown(self._state_dir)
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None
            self._own_state_dir = False
        return result

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: builtins.object) -> None:
        if self.running():
            self.stop()

    # -- asyncio face -----------------------------------------------------------------------------

    async def start_async(self, ready: bool = True) -> "VM":
        return await asyncio.to_thread(self.start, None, ready)

    async def qmp_async(
        self, command: str, arguments: dict | None = None, timeout: float = 30.0
    ) -> Any:
        """A QMP command from asyncio without a thread: the asyncio client (qmp/aio.py) on the machine's
        tools monitor, connected for this one command. The controller's monitor belongs to the blocking
        client, and a monitor serves one client at a time (qemu drops a second one), so this machine's
        calls take turns on a lock and ``timeout`` covers the wait; cancelling one cancels a wait, never
        a command left running in a thread."""
        from qemuspec.qmp.aio import AsyncQMPClient

        address = f"unix:{self.instance.layout.qmp_client}"
        try:
            async with asyncio.timeout(timeout), self._turn():
                async with await AsyncQMPClient.connect(address, timeout=timeout) as client:
                    return await client.command(command, arguments, timeout=timeout)
        except TimeoutError:
            raise QMPTimeout(
                f"QMP {command}: no reply within {timeout:g} s (another client holds the machine's "
                "tools monitor, or qemu does not answer)"
            ) from None

    def _turn(self) -> asyncio.Lock:
        """The tools monitor's lock for the running event loop (an asyncio lock belongs to one loop)."""
        loop = asyncio.get_running_loop()
        if self._async_turn is None or self._async_turn[0] is not loop:
            self._async_turn = (loop, asyncio.Lock())
        return self._async_turn[1]

    async def stop_async(self, timeout: float | None = None):
        return await asyncio.to_thread(self.stop, timeout)

    async def quit_async(self, timeout: float = 10.0):
        return await asyncio.to_thread(self.quit, timeout)

    async def events_async(self) -> AsyncIterator[dict]:
        """QMP events as an async iterator; ends when the machine's QMP connection closes."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        client = self._client
        off = client.on("*", lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        off_close = client.on_close(lambda: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            off()
            off_close()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<VM {self.name} {state}>"


def load(
    path: str,
    variables: dict | None = None,
    state_dir: str | None = None,
    settings: Settings | None = None,
) -> dict[str, VM]:
    """The machines of a definition file, ready to ``start()``, in dependency order. ``settings``
    (default: the process's) give QEMUSPEC_VAR_* values, the state directory and the accelerator."""
    from qemuspec.runtime import paths
    from qemuspec.settings import current
    from qemuspec.spec import load as load_spec
    from qemuspec.spec.order import order_machines

    settings = settings or current()
    spec = load_spec(path, variables=variables, environ=settings.var_environ())
    root = paths.state_root(path, state_dir or settings.state_dir)
    return {
        name: VM(name, spec.machines[name], state_dir=os.path.join(root, name), settings=settings)
        for level in order_machines(spec.machines)
        for name in level
    }


# -- what the command line does, for programs too ------------------------------------------------
#
# The CLI is a thin layer over these: each takes plain values (a loaded definition, a state root,
# machine names) and returns data; printing is the caller's business.


def definition_record(state_dir: str) -> str:
    """Where the resolved definition of the machine last started from ``state_dir`` is kept."""
    from qemuspec.runtime import statedir

    return os.path.join(state_dir, statedir.DEFINITION)


def record_definition(machine: Machine, state_dir: str) -> None:
    """Keep what a machine was started from, so `plan` can say which fields changed."""
    from qemuspec.runtime import statedir

    statedir.record_definition(state_dir, machine.model_dump(mode="json"))


def recorded_definition(state_dir: str) -> dict | None:
    """What the machine was last started from, when a directory proven qemuspec's says so."""
    import json

    from qemuspec.runtime import statedir

    if not statedir.proven(state_dir):
        return None
    data = statedir.read_bytes(state_dir, statedir.DEFINITION, statedir.RECORD_LIMIT)
    try:
        found = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def field_changes(old: object, new: object, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, old value, new value) for every leaf that differs between two definitions."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, object, object]] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += field_changes(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            c for i, (a, b) in enumerate(zip(old, new)) for c in field_changes(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [(path, old, new)]


def show_value(field: str, value: object) -> str:
    """A definition value as the user writes it (memory in MiB shows as 256M)."""
    if value is None:
        return "(unset)"
    if field.rsplit(".", 1)[-1] == "memory" and isinstance(value, int):
        return f"{value}M"
    if isinstance(value, str):
        return value
    import json

    return json.dumps(value)


def plan(
    spec: File,
    root: str,
    names: list[str],
    owner: str | None = None,
    backends: dict[str, Backend] | None = None,
) -> list[dict]:
    """What `up` would do per machine, with the changed definition fields and the argv (or domain XML)
    diff; ``backends``: each machine's (backends.chosen; by default, where the definition places it)."""
    from qemuspec import reconcile

    if backends is None:
        from qemuspec.backends import chosen

        backends = chosen(spec, root, owner or "the definition file", None, owner)
    steps = reconcile.plan(spec, backends, names, owner=owner)
    for step in steps:
        old = recorded_definition(os.path.join(root, step["name"]))
        changes = []
        if step["action"] == "recreate" and old is not None:
            new = spec.machines[step["name"]].model_dump(mode="json")
            changes = [{"field": f, "old": o, "new": n} for f, o, n in field_changes(old, new)]
        step["changes"] = changes
    return steps


def purge(spec: File, root: str, names: list[str]) -> list[str]:
    """Delete what qemuspec made for stopped machines: disks it recorded creating (never a user's own
    image, nor one that existed before), and their state directories (never through a symlink); the
    state root too once empty. Returns the paths removed (runtime/purge.py)."""
    from qemuspec.runtime.purge import purge as purge_one

    removed = []
    for name in names:
        removed += purge_one(root, name)
    return removed


def snapshot(client: QMPClient | Monitor, action: str, tag: str | None = None) -> list[str]:
    """VM snapshots (disks and memory, in the machine's qcow2 images) through a QMP client: save,
    load, delete a tag, or list the tags. QMP has no snapshot listing in 7.2, so this parses the
    monitor's `info snapshots` table; errors come back as monitor text and are raised."""
    if action not in ("save", "load", "delete", "list"):
        raise QemuspecError(f'snapshot action "{action}": use save, load, delete or list')
    if action != "list" and not tag:
        raise QemuspecError(f"snapshot {action} needs a tag")
    command = {
        "save": f"savevm {tag}",
        "load": f"loadvm {tag}",
        "delete": f"delvm {tag}",
        "list": "info snapshots",
    }[action]
    out = str(
        client.command("human-monitor-command", {"command-line": command}, timeout=600) or ""
    )  # HMP: text
    if action != "list":
        if out.strip():
            raise QemuspecError(f"snapshot {action} {tag}: {out.strip()}")
        return [tag] if tag else []
    tags = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 1 and (parts[0].isdigit() or parts[0] == "--"):
            tags.append(parts[1])
    return tags


def resolved(spec: File, names: list[str] | None = None) -> dict:
    """The definition after templates and defaults: what `up` would start."""
    data = spec.model_dump(mode="json")
    if names:
        data["machines"] = {n: data["machines"][n] for n in names}
    return data


def throwaway(machine: Machine, workdir: str) -> Machine:
    """The same machine on disks that are thrown away: each writable disk becomes a qcow2 overlay in
    ``workdir`` over the declared image (created there when the image does not exist yet), so the
    definition's own disks are never written."""
    disks = []
    for index, disk in enumerate(machine.disks):
        if disk.readonly:
            disks.append(disk)
            continue
        overlay = os.path.join(workdir, f"disk{index}.qcow2")
        if os.path.exists(disk.file):
            base_format = disk.format
            if base_format is None:
                from qemuspec import img

                base_format = img.info(disk.file).format
            disks.append(
                disk.model_copy(
                    update={
                        "file": overlay,
                        "format": "qcow2",
                        "size": None,
                        "image": None,
                        "backing": os.path.abspath(disk.file),
                        "backing_format": base_format,
                    }
                )
            )
        else:  # made fresh by `up` (an image's overlay too): make it in the throwaway directory instead
            disks.append(
                disk.model_copy(
                    update={
                        "file": overlay
                        if disk.backing or (disk.format or "raw") == "qcow2"
                        else overlay[:-6] + ".img"
                    }
                )
            )
    return machine.model_copy(update={"disks": disks, "restart": "no"})


def machine_info(spec: File, root: str, name: str, events: int = 20) -> dict:
    """Everything known about one machine: definition, argv, state, ports, disks, accel, QMP address,
    last events."""
    import json

    from qemuspec.runtime.instance import Instance
    from qemuspec.runtime.status import machine_status

    machine = spec.machines[name]
    state_dir = os.path.join(root, name)
    info: dict[str, object] = dict(machine_status(name, machine, state_dir))
    inst = Instance.find(name, machine, state_dir)
    if inst is not None:
        info["argv"] = inst.argv
    else:
        from qemuspec.render import render
        from qemuspec.runtime import paths

        info["argv"] = render(machine, name, paths.machine_layout(machine, state_dir))
    info["state_dir"] = state_dir
    info["disks"] = [
        {
            "file": d.file,
            "format": d.format,
            "backing": d.backing,
            "exists": os.path.exists(d.file),
            "image": d.image.url if d.image is not None else None,
        }
        for d in machine.disks
    ]
    info["definition"] = machine.model_dump(mode="json")
    from qemuspec.runtime import statedir

    last: list[
        dict
    ] = []  # never through a symlink: a planted `events.jsonl -> secret` shows nothing
    for line in (statedir.read_from(os.path.join(state_dir, statedir.EVENTS)) or b"").splitlines():
        try:
            event = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(event, dict):
            last.append(event)
            del last[:-events]
    info["events"] = last
    exit_record = statedir.read(state_dir, statedir.EXIT, statedir.ExitRecord)
    if exit_record is not None:
        info["last_exit"] = exit_record.as_dict()
    return info


def run_in_guest(
    machine: Machine,
    name: str,
    argv: list[str],
    workdir: str,
    *,
    on_output: Callable[[str, bytes], object],
    via: str = "auto",
    ready_timeout: float | None = None,
    report: Callable[[str], object] = lambda message: None,
    stdin: bytes | None = None,
) -> int:
    """Boot ``machine`` on throwaway disks in ``workdir``, run ``argv`` in the guest, stream its output
    to ``on_output("stdout"|"stderr", data)``, stop qemu; return the command's exit code (128+N for a
    signal). The caller removes ``workdir``; qemu is stopped however this returns or raises."""
    import time

    from qemuspec.runtime.instance import Instance

    if via == "auto":
        via = "agent" if machine.agent else "ssh"
    if via == "agent" and not machine.agent:
        raise QemuspecError(
            f"machine {name} has no guest-agent channel: add agent = true, or use --via ssh"
        )
    instance = Instance(name, throwaway(machine, workdir), os.path.join(workdir, name))
    instance.on_probe = lambda probe: report(f"{name}: waiting for {probe}")
    began = time.monotonic()
    report(f"{name}: booting on throwaway disks")
    instance.launch()
    try:
        deadline = time.monotonic() + (
            ready_timeout if ready_timeout is not None else machine.ready.timeout
        )
        instance.wait_ready(max(0.1, deadline - time.monotonic()))
        if via == "agent":
            from qemuspec.runtime import probes

            probes.wait_agent(instance.layout.qga, deadline, instance.running)
        report(f"{name}: ready in {time.monotonic() - began:.1f} s")
        from qemuspec.runtime import guestrun

        return guestrun.run(instance, argv, on_output, stdin, how=via)
    finally:
        import signal

        # a second Ctrl-C or SIGTERM must not cut the teardown short: hold them until qemu is gone
        held = signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        )
        try:
            instance.quit(5.0)
        except QemuspecError:
            instance.kill()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
