"""The one interface a machine's backend offers, and the values that cross it.

A backend runs one machine at a time: it says what runs now (:class:`Seen`), starts, stops, compares
and reports one machine, and opens its guest channel, monitor and console. Everything decided across
machines (levels, the lock, ownership, preflight, ``--timeout``, ``--warm``, the definition record)
is reconcile's, above every backend, so both backends get it the same way. Like httpx's transports,
the backend is chosen once per machine (``backends.placement``) and the rest of the code only asks it.

This module is a leaf (it imports nothing of qemuspec at load time): reconcile, the CLI and every
backend import it, and it must not pull pydantic, jinja2 or libvirt into a cached ``status``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent
    from qemuspec.spec.models import File, Machine

Report = Callable[[str, str], None]
Problem = tuple[tuple, str]


@dataclass
class Outcome:
    name: str
    action: (
        str  # "started", "up to date", "adopted", "changed" (live), "restarted", "recreated",
        # "needs restart" (up --no-restart), "stopped", "not running", "failed"
    )
    seconds: float = 0.0
    pid: int | None = None
    detail: str = ""
    ports: list = field(default_factory=list)
    accel: list = field(default_factory=list)  # the accelerator qemu actually runs with
    qemu: str = ""  # the absolute binary started, so a user sees what a definition made them run
    forced: bool = (
        False  # stopped without the guest's own shutdown (quit or a signal): libvirt's destroy
    )
    warnings: list = field(
        default_factory=list
    )  # said on stderr, kept in --json: a failed warm save, a forced stop

    def as_dict(self) -> dict:
        return asdict(self)


def stopped(name: str, seconds: float, step: str) -> Outcome:
    """A stop's outcome; a forced one (quit, a signal, libvirt's destroy: not the guest's own shutdown)
    says so, as a field and a warning."""
    from qemuspec.runtime.policy import forced, synced

    if not forced(step):
        return Outcome(name, "stopped", seconds, detail=step)
    return Outcome(
        name,
        "stopped",
        seconds,
        detail=step,
        forced=True,
        warnings=[
            f"forced stop ({step}): the guest did not shut down by itself and was powered off; "
            + (
                "its file systems were written out through the guest agent first"
                if synced(step)
                else "writes it had not synced are lost"
            )
        ],
    )


@dataclass
class Seen:
    """What a backend finds of one machine now; reconcile decides from it (``reconcile.decide``).

    ``claimed``: something of the machine exists that its recorded ``owner`` holds (a live supervisor
    or qemu; a defined domain), so another definition file must leave it alone. ``refusal``: the
    backend's own reason to touch nothing (a domain of that name qemuspec did not define)."""

    running: bool = False
    hash: str | None = None  # the definition hash the running machine was started from
    owner: str | None = None  # the definition file recorded as its owner
    claimed: bool = False
    adoptable: bool = False  # running without its supervisor (local): `up` adopts it
    busy: bool = False  # something acts on it (a local supervisor, maybe restarting it): a change recreates it
    starting: bool = (
        False  # a start another `up` began is in progress (local: a supervisor starting it)
    )
    refusal: str | None = None
    place: str = ""  # where it is, for messages: "in STATE_DIR", "on URI"
    pid: int | None = None
    ports: list = field(default_factory=list)
    accel: list = field(default_factory=list)
    booted_memory: int | None = None  # MiB qemu started with: a balloon can give back up to it


class Monitor(Protocol):
    """A QMP connection to one machine, as a context manager (local: the client monitor socket;
    libvirt: its monitor passthrough)."""

    def command(
        self, name: str, arguments: dict | None = None, timeout: float = 30.0
    ) -> object: ...

    def __enter__(self) -> Monitor: ...

    def __exit__(self, *exc: object) -> None: ...


class Backend(Protocol):
    """One machine's runtime: the local supervisor (``backends/local.py``) or a libvirt host
    (``backends/libvirt_domain.py``). Methods take the machine's name and its model; a command that
    cannot work through a backend raises one UsageError paragraph saying so (``unsupported``)."""

    @property
    def kind(self) -> str:
        """ "local" or "libvirt": the registry's name (backends.REGISTRY)."""
        ...

    @property
    def uri(self) -> str | None:
        """The libvirt URI; None for the local supervisor."""
        ...

    @property
    def where(self) -> str:
        """How status and errors name where it runs: "local", or the host."""
        ...

    def look(self, name: str, machine: Machine) -> Seen: ...

    def start(
        self, name: str, machine: Machine, action: str, report: Report
    ) -> Callable[[], Outcome]:
        """Begin to start (``action == "adopted"``: adopt) one machine; the returned call waits until it
        is ready or failed. Beginning happens in the caller's thread (the local backend forks there,
        before any thread waits); reconcile runs a level's waits in parallel."""
        ...

    def change(self, name: str, old: Machine, new: Machine, fields: list[str]) -> Outcome:
        """Make the running machine (started from ``old``) what ``new`` says, without restarting it:
        the ``fields`` are the changed ones the table (spec/changes.py) calls live. Reconcile has
        recorded ``new`` as the machine's definition before the call. Returns the outcome
        (``changed``, the steps done in ``detail``); raises a QemuspecError after undoing what it
        half-did, so reconcile restarts the machine with the reason."""
        ...

    def join(self, name: str, machine: Machine, began: float) -> Outcome | None:
        """Wait for a start in progress (``Seen.starting``); None when it ended without an outcome."""
        ...

    def stop(self, name: str, machine: Machine, timeout: float | None) -> str:
        """Stop one running machine; the step that stopped it."""
        ...

    def clean(self, name: str) -> None:
        """What a stopped machine left behind (records, sockets; an undefined domain)."""
        ...

    def plan_step(self, name: str, machine: Machine, seen: Seen, action: str) -> dict:
        """What plan adds to a machine's step: ``diff`` (running against the definition, for a recreate),
        and what else the backend knows (the local warm check, the host)."""
        ...

    def settle(self, spec: File, names: list[str]) -> None:
        """After a `down`: what the file's machines share and none uses any more (local: network switches)."""
        ...

    def readopt(self, spec: File, names: list[str]) -> list[Outcome]:
        """Give running machines whose supervisor is gone one again (libvirt's daemon is its own)."""
        ...

    def status(self, name: str, machine: Machine) -> dict:
        """One row of `status`; a host that cannot be reached is a row saying so, never an error."""
        ...

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
        """What `up` would fail on for these machines, found before anything starts."""
        ...

    def refusal(self, name: str, machine: Machine, command: str) -> str | None:
        """Why this backend cannot run ``command`` (or a field of ``machine``) at all, or None."""
        ...

    def purge(self, name: str) -> list[str]: ...

    def monitor(self, name: str, machine: Machine) -> Monitor: ...

    def agent(self, name: str, machine: Machine, timeout: float) -> GuestAgent: ...

    def pause(self, name: str, machine: Machine, paused: bool) -> None: ...

    def console(self, name: str, machine: Machine, interactive: bool) -> socket.socket:
        """The serial console as a socket: bytes from the guest to read, keystrokes to send."""
        ...

    def serial_log(self, name: str) -> str | None:
        """The console log so far, or None when there is none yet."""
        ...

    def ssh(self, name: str, machine: Machine, command: list[str]) -> dict:
        """How to reach the guest's sshd with the state root's key: ``argv`` to run (and where it goes)."""
        ...


def unsupported(name: str, where: str, command: str) -> str:
    """The one paragraph for a command a backend cannot run."""
    return (
        f"machine {name} runs through libvirt at {where}: `qemuspec {command}` works on local machines only "
        "(docs/libvirt.md lists what works through libvirt)"
    )


@contextlib.contextmanager
def locked(state_root: str, wait: bool = True) -> Iterator[bool]:
    """The state root's lock (flock on the directory itself: nothing to leave behind), so concurrent
    commands take turns. ``wait=False`` yields False at once when another command holds it."""
    from qemuspec.runtime.statedir import ensure_private

    ensure_private(state_root)
    fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
