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

from qemuspec.errors import LaunchError, QemuspecError, QMPTimeout, SpecError, UsageError
from qemuspec.spec.changes import field_changes as field_changes  # re-exported for callers

if TYPE_CHECKING:
    from qemuspec.backends.base import Backend, Monitor, Outcome
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.instance import Instance
    from qemuspec.runtime.watchdog import Guard
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
        self._guard: Guard | None = None  # kills qemu when this process dies (runtime/watchdog.py)
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
        """Launch; return once QMP answers and, when the machine has readiness probes, they pass.

        A machine that already runs in this state directory (``qemuspec up``, another VM) is refused
        with the reason and left alone. A start that fails leaves nothing: qemu is killed and a
        temporary state directory removed. qemu dies with this process (runtime/watchdog.py), so a
        killed test leaves no VM behind."""
        from qemuspec.runtime import watchdog
        from qemuspec.runtime.instance import Instance

        why = self._running_elsewhere()
        if why:
            raise LaunchError(why)
        instance = Instance(self.name, self.model, self.state_dir, self.layout())
        for event, cb in self._listeners:
            instance.on(event, cb)
        self._instance = instance
        try:
            instance.launch()
            if instance.process is not None:
                self._guard = watchdog.guard(instance.process.pid)
            if ready:
                instance.wait_ready()
        except BaseException:
            if instance.process is not None:
                instance.kill()
            self._finish(None)
            raise
        if callback is not None:
            callback(self)
        return self

    def _running_elsewhere(self) -> str | None:
        """Why this VM may not start in its state directory: a machine runs there already (the CLI's
        `up`, or another VM). Looked at before anything is touched, since a launch replaces the
        sockets and records of whatever ran there."""
        if self._state_dir is None or self._own_state_dir:
            return None
        from qemuspec.runtime import supervisor
        from qemuspec.runtime.instance import Instance, recorded

        state_dir = os.path.abspath(self._state_dir)
        sup = supervisor.read_supervisor(state_dir)
        live = Instance.find(self.name, self.model, state_dir)
        if sup is None and live is None:
            return None
        record = recorded(state_dir)
        owner = (sup.owner if sup else None) or (record.owner if record else None)
        pid = live.process.pid if live is not None and live.process is not None else None
        who = f"is run by {owner}" if owner else "is running"
        return (
            f"machine {self.name} in {state_dir} {who}"
            + (f" (qemu pid {pid})" if pid else "")
            + ": stop it with "
            + (f"`qemuspec down {owner}`" if owner else "its own stop()")
            + ", or give this VM its own state_dir; nothing was changed"
        )

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

    def wait_console(self, pattern: str, timeout: float, since: str | int = "boot") -> str:
        """Wait for a regex on the serial console; returns the matched text. ``since``: "boot" (what
        the console showed since qemu started counts, as far as the reader keeps it), "now" (only
        output from this call on: the next occurrence), or a position from :meth:`console_position`
        (taken before doing what should print it, so nothing is missed)."""
        console = self.instance.console
        if console is None:
            raise QemuspecError(
                f'machine {self.name} has serial = "{self.model.serial}": the console is readable with "log" or "socket"'
            )
        if since == "boot":
            start = None
        elif since == "now":
            start = console.position
        elif isinstance(since, int) and not isinstance(since, bool):
            start = since
        else:
            raise UsageError(
                f'wait_console(since={since!r}): write since="boot", since="now", or a position '
                "from console_position()"
            )
        return console.wait_for(pattern, timeout, since=start).group(0).decode(errors="replace")

    def console_position(self) -> int:
        """Where the console output is now, for ``wait_console(..., since=position)``."""
        console = self.instance.console
        return console.position if console is not None else 0

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
        if self._guard is not None and not self.running():
            self._guard.release()
            self._guard = None
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
    from qemuspec.runtime import statedir

    return statedir.recorded_definition(state_dir)


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
    """What `up` would do per machine: ``action`` (start, up to date, adopt, or for a running machine
    that changed its class: live, restart, recreate, also in ``class``), ``changes`` (each changed
    field with ``old``, ``new``, ``class``, ``by`` and ``why``) and the argv (or domain XML) diff; ``backends``: each machine's (backends.chosen; by default, where the definition places it)."""
    from qemuspec import reconcile

    if backends is None:
        from qemuspec.backends import chosen

        backends = chosen(spec, root, owner or "the definition file", None, owner)
    return reconcile.plan(spec, backends, names, owner=owner, root=root)


def apply(
    spec: File,
    root: str,
    names: list[str],
    owner: str | None = None,
    backends: dict[str, Backend] | None = None,
    no_restart: bool = False,
) -> list[Outcome]:
    """What `up` does, as a library call: start what is missing, change running machines live where
    every changed field allows it (spec/changes.py), else restart or recreate them; the definitions
    are recorded so the next :func:`plan` is empty. ``no_restart``: when any machine would need a
    restart or recreate, change nothing and return those machines as ``needs restart`` outcomes
    (``detail`` names the fields), as `up --no-restart` does. ``spec`` as :func:`load` returns it;
    ``owner``: the definition file recorded as the machines' owner."""
    from qemuspec import reconcile

    if backends is None:
        from qemuspec.backends import chosen

        backends = chosen(spec, root, owner or "the definition file", None, owner)
    return reconcile.up(spec, root, names, backends, owner=owner, no_restart=no_restart)


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
    definition's own disks are never written (runtime/fresh.py, shared with `run` and `test`)."""
    from qemuspec.runtime import fresh

    return fresh.throwaway(machine, workdir)


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
    fail_on: str = "panic",
    vmcore: str | None = None,
    on_warning: Callable[[dict], object] | None = None,
) -> int:
    """Boot ``machine`` on throwaway disks in ``workdir``, run ``argv`` in the guest, stream its output
    to ``on_output("stdout"|"stderr", data)``, stop qemu; return the command's exit code (128+N for a
    signal). The caller removes ``workdir``; qemu is stopped however this returns or raises.
    Crash-aware (runtime/crash.py): a guest kernel crash while booting or running the command raises
    GuestCrashed with the report at once (``vmcore``: an ELF core written first); kernel warnings go
    to ``on_warning`` and fail the run only with ``fail_on = "warn"``."""
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
    watch = None
    try:
        from qemuspec.runtime import crash

        watch = crash.Watch(instance, fail_on, vmcore, on_warning)
        deadline = time.monotonic() + (
            ready_timeout if ready_timeout is not None else machine.ready.timeout
        )
        try:
            instance.wait_ready(max(0.1, deadline - time.monotonic()))
            if via == "agent":
                from qemuspec.runtime import probes

                probes.wait_agent(instance.layout.qga, deadline, instance.running)
        except QemuspecError:
            watch.check()  # a crash before ready is the crash, not a readiness failure
            raise
        report(f"{name}: ready in {time.monotonic() - began:.1f} s")
        if instance.ports:
            report(
                f"{name}: ports "
                + ", ".join(f"{p['host']}->{p['guest']}/{p['protocol']}" for p in instance.ports)
            )
        from qemuspec.runtime import guestrun

        return watch.call(guestrun.run, instance, argv, on_output, stdin, how=via)
    finally:
        if watch is not None:
            watch.close()
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
