"""The pytest plugin (registered through the ``pytest11`` entry point, so installing qemuspec makes it
available): a fixture factory giving machine handles from a definition file, each test on its own
fresh restore of the machine's checkpoint (runtime/fresh.py ``started``: the first test makes the
checkpoint, every later one restores it on throwaway overlays; ``warm = false`` machines boot cold).

    def test_web_serves(qemuspec_machines):
        vm = qemuspec_machines("machines/dev.toml")["dev"]
        vm.wait_for_open_port(80)
        assert "ok" in vm.succeed("wget -qO- http://127.0.0.1/")

The handles' methods are named like the NixOS test driver's (``succeed``, ``fail``, ``execute``,
``wait_until_succeeds``, ``wait_for_console_text``, ``wait_for_open_port``, ``copy_from_host``,
``copy_from_vm``, ``screenshot``, ``send_key``, ``block``/``unblock``, ``crash``, ``qmp``), which
users already know. A call gives all machines of the file, started in dependency order under one
state root, so they share their private networks; two calls are two isolated groups.

Crash-aware: every machine is watched (runtime/crash.py) while the test runs; a guest kernel crash
ends the waiting call at once with the crash report (GuestCrashed), and a test that passed although a
guest crashed is turned into a failure. ``--qemuspec-fail-on warn`` fails on kernel warnings too,
``--qemuspec-vmcore DIR`` keeps an ELF core of a crashed guest. A failing test's report carries each
machine's console and events (sections "qemuspec console NAME", "qemuspec events NAME" of its failure
text, so in JUnit's <failure> too). Nothing is shared between tests but the checkpoint, so ``-k``, ``-x``,
``--junitxml`` and pytest-xdist (each worker restores its own) work as usual.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import time
import zlib
from typing import TYPE_CHECKING, Generator, Iterator

import pytest

from qemuspec.errors import QemuspecError, QMPTimeout, StopRequested

if TYPE_CHECKING:
    from qemuspec.runtime.crash import Watch
    from qemuspec.runtime.instance import Instance
    from qemuspec.settings import Settings

DEFAULT_TIMEOUT = 900.0  # the NixOS driver's default for waits
RETRY = 1.0  # seconds between attempts of wait_until_*: a retry pace, not a synchronisation
REPORT_BYTES = 64 * 1024  # of console and events attached to a failing test's report
ITEM_KEY = "_qemuspec_handles"


class CommandFailed(QemuspecError, AssertionError):
    """``succeed`` saw a non-zero exit (``fail``: a zero one): the command, its code and output. An
    AssertionError too, so pytest shows it as a test failure, not an error in the harness."""


def _now() -> float:
    return time.monotonic()


class Machine:
    """One running machine of a test (a fresh restore, or a cold boot on throwaway disks)."""

    def __init__(self, name: str, instance: Instance, watch: Watch):
        self.name = name
        self.instance = instance
        self.watch = watch

    def __repr__(self) -> str:
        return f"<qemuspec machine {self.name} ({self.instance.boot})>"

    # -- commands ---------------------------------------------------------------------------------

    def _run(self, command: str, timeout: float | None) -> tuple[int, str, str]:
        from qemuspec.runtime import guestrun

        self.watch.check()
        how = guestrun.via(self.instance)
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = None if timeout is None else _now() + timeout
        code = self.watch.call(
            guestrun.run,
            self.instance,
            guestrun.shell(command, how),
            lambda stream, data: (out if stream == "stdout" else err).append(data),
            how=how,
            deadline=deadline,
        )
        return code, _text(out), _text(err)

    def execute(self, command: str, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, str]:
        """Run ``command`` with the guest's /bin/sh: (exit code, stdout). QMPTimeout after ``timeout``."""
        code, out, _ = self._run(command, timeout)
        return code, out

    def succeed(self, *commands: str, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """Run each command; all must exit 0 (else CommandFailed with the code and output). Their
        stdout, joined."""
        output = ""
        for command in commands:
            code, out, err = self._run(command, timeout)
            if code != 0:
                raise CommandFailed(
                    f"machine {self.name}: command `{command}` exited {code} (expected 0)"
                    + _streams(out, err)
                )
            output += out
        return output

    def fail(self, *commands: str, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """Run each command; all must exit non-zero (else CommandFailed). Their stdout, joined."""
        output = ""
        for command in commands:
            code, out, err = self._run(command, timeout)
            if code == 0:
                raise CommandFailed(
                    f"machine {self.name}: command `{command}` exited 0 (expected a failure)"
                    + _streams(out, err)
                )
            output += out
        return output

    def _until(self, command: str, timeout: float, want_success: bool) -> str:
        deadline = _now() + timeout
        last = ""
        while True:
            remaining = deadline - _now()
            try:
                code, out, err = self._run(command, max(1.0, remaining))
            except QMPTimeout:
                code, out, err = -1, "", "(timed out)"
            if (code == 0) == want_success:
                return out
            last = f"exit {code}" + _streams(out, err)
            if _now() + RETRY >= deadline:
                wanted = "succeed" if want_success else "fail"
                raise QMPTimeout(
                    f"machine {self.name}: `{command}` did not {wanted} within {timeout:g} s; last: {last}"
                )
            self.watch.tripped.wait(RETRY)  # wakes at once on a crash, which the next call raises

    def wait_until_succeeds(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run ``command`` until it exits 0 (stdout of that run), at most ``timeout`` seconds."""
        return self._until(command, timeout, True)

    def wait_until_fails(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run ``command`` until it exits non-zero, at most ``timeout`` seconds."""
        return self._until(command, timeout, False)

    # -- waits ------------------------------------------------------------------------------------

    def wait_for_console_text(self, regex: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until a console line since this machine started matches ``regex`` (RE2); the line's
        match. A crash ends the wait with its report."""
        console = self.instance.console
        if console is None:
            raise QemuspecError(
                f'machine {self.name}: wait_for_console_text needs serial = "log" or "socket"'
            )
        try:
            match = console.wait_for(regex, timeout, self.watch.tripped.is_set)
        except StopRequested:
            self.watch.check()
            raise
        except EOFError:
            self.watch.check()
            raise QemuspecError(
                f"machine {self.name}: qemu exited before the console showed {regex!r}"
            ) from None
        found = match.group(0) if hasattr(match, "group") else match
        return found.decode(errors="replace") if isinstance(found, bytes) else str(found)

    def wait_for_open_port(self, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until something in the guest listens on TCP ``port`` (any address), read from the
        guest's /proc/net/tcp and tcp6: no tool in the guest is needed."""
        deadline = _now() + timeout
        while True:
            code, out, _ = self._run(
                "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", max(1.0, deadline - _now())
            )
            if port in listening(out):
                return
            if _now() + RETRY >= deadline:
                raise QMPTimeout(
                    f"machine {self.name}: nothing listened on guest port {port} within {timeout:g} s"
                )
            self.watch.tripped.wait(RETRY)

    def wait_for_closed_port(self, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until nothing in the guest listens on TCP ``port``."""
        deadline = _now() + timeout
        while True:
            _, out, _ = self._run("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", timeout)
            if port not in listening(out):
                return
            if _now() + RETRY >= deadline:
                raise QMPTimeout(
                    f"machine {self.name}: guest port {port} still listened after {timeout:g} s"
                )
            self.watch.tripped.wait(RETRY)

    # -- files ------------------------------------------------------------------------------------

    def _agent(self):  # -> GuestAgent
        from qemuspec.runtime.agent import GuestAgent

        if not self.instance.machine.agent:
            raise QemuspecError(
                f"machine {self.name}: copying files needs the guest agent: add agent = true"
            )
        agent = GuestAgent(self.instance.layout.qga, timeout=60.0)
        agent.sync(timeout=10.0)
        return agent

    def copy_from_host(self, source: str, target: str) -> None:
        """Copy a host file or directory tree to ``target`` in the guest (through the agent)."""
        from qemuspec.guestfiles import copy_to_guest

        with self._agent() as agent:
            self.watch.call(copy_to_guest, agent, source, target, recursive=os.path.isdir(source))

    def copy_from_vm(self, source: str, target: str) -> None:
        """Copy a guest file or directory tree to ``target`` here (the guest's names and listing are
        hostile input: guestfiles.copy_from_guest)."""
        from qemuspec.guestfiles import copy_from_guest

        with self._agent() as agent:
            self.watch.call(copy_from_guest, agent, source, target, recursive=True)

    # -- screen, keys, links, power ---------------------------------------------------------------

    def screenshot(self, path: str) -> str:
        """The guest's screen as a PNG at ``path`` (".png" added when missing): QMP ``screendump``
        (PPM, into this machine's private directory), converted here. The PNG's path."""
        if not path.endswith(".png"):
            path += ".png"
        with tempfile.TemporaryDirectory(dir=self.instance.state_dir) as scratch:
            ppm = os.path.join(scratch, "screen.ppm")
            self.qmp("screendump", filename=ppm)
            with open(ppm, "rb") as f:
                width, height, pixels = read_ppm(f.read())
        with open(path, "wb") as out:
            out.write(png(width, height, pixels))
        return path

    def send_key(self, keys: str) -> None:
        """Press keys together, NixOS style: ``"ctrl-alt-delete"``, ``"ret"``, ``"shift-a"`` (QMP
        ``send-key`` qcodes; ``ctrl``, ``alt``, ``shift``, ``enter``, ``esc`` and ``del`` aliases)."""
        codes = [KEY_ALIASES.get(key, key) for key in keys.split("-") if key]
        self.qmp("send-key", keys=[{"type": "qcode", "data": code} for code in codes])

    def block(self) -> None:
        """Take every NIC's link down (QMP ``set_link``): the guest sees its cable pulled."""
        self._links(False)

    def unblock(self) -> None:
        """Bring every NIC's link up again."""
        self._links(True)

    def _links(self, up: bool) -> None:
        from qemuspec.render import OWN_ID_PREFIX

        for index in range(len(self.instance.machine.nics)):
            self.qmp("set_link", name=f"{OWN_ID_PREFIX}net{index}", up=up)

    def crash(self) -> None:
        """Simulate a sudden power failure: qemu quits at once, as the NixOS driver's ``crash``."""
        self.watch.close()
        self.instance.quit(5.0)

    def qmp(self, command: str, arguments: dict | None = None, **args: object) -> object:
        """One QMP command on this machine's monitor; its ``return``. Names with "-" go in
        ``arguments``: ``vm.qmp("human-monitor-command", {"command-line": "info status"})``."""
        if self.instance.qmp is None:
            raise QemuspecError(f"machine {self.name}: qemu is not running")
        return self.instance.qmp.command(command, {**(arguments or {}), **args})

    # -- what the report attaches -----------------------------------------------------------------

    def console_text(self, limit: int = REPORT_BYTES) -> str:
        """The end of this machine's console since it started (its serial.log)."""
        return _tail(self.instance.layout.serial_log, limit)

    def events_text(self, limit: int = REPORT_BYTES) -> str:
        """The end of this machine's QMP events (events.jsonl)."""
        return _tail(self.instance.layout.events_log, limit)


KEY_ALIASES = {
    "ctrl": "ctrl",
    "control": "ctrl",
    "enter": "ret",
    "return": "ret",
    "esc": "esc",
    "escape": "esc",
    "del": "delete",
    "space": "spc",
    "backspace": "backspace",
}


def listening(proc_net_tcp: str) -> set[int]:
    """TCP ports in LISTEN state (0A) in the text of /proc/net/tcp and tcp6."""
    ports = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            try:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return ports


def read_ppm(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of a binary PPM (P6, maxval 255: what qemu's screendump writes)."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        match = re.compile(rb"\s*(?:#[^\n]*\n\s*)*(\S+)").match(data, pos)
        if match is None:
            raise QemuspecError("screendump wrote no PPM header")
        tokens.append(match.group(1))
        pos = match.end()
    if tokens[0] != b"P6" or tokens[3] != b"255":
        raise QemuspecError(f"screendump wrote {tokens[0]!r} with maxval {tokens[3]!r}, not P6/255")
    width, height = int(tokens[1]), int(tokens[2])
    pixels = data[pos + 1 : pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise QemuspecError("screendump's PPM is truncated")
    return width, height, pixels


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (rows top to bottom), with zlib only."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    stride = width * 3
    raw = b"".join(b"\0" + rgb[row * stride : (row + 1) * stride] for row in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode(errors="replace")


def _streams(out: str, err: str) -> str:
    return (f"\n--- stdout ---\n{out.rstrip()}" if out.strip() else "") + (
        f"\n--- stderr ---\n{err.rstrip()}" if err.strip() else ""
    )


def _tail(path: str, limit: int) -> str:
    from qemuspec.runtime.statedir import read_from

    try:
        size = os.path.getsize(path)
    except OSError:
        return ""
    data = read_from(path, max(0, size - limit))
    return data.decode(errors="replace") if data else ""


# -- the fixture ------------------------------------------------------------------------------------


class Machines:
    """What ``qemuspec_machines`` is: call it with a definition file for its machines."""

    def __init__(self, item: pytest.Item, settings: Settings, fail_on: str, vmcore: str | None):
        import contextlib

        self.item, self.settings, self.fail_on, self.vmcore = item, settings, fail_on, vmcore
        self.stack = contextlib.ExitStack()
        self.handles: list[Machine] = []
        setattr(item, ITEM_KEY, self.handles)

    def __call__(
        self,
        path: str,
        *,
        warm: bool | None = None,
        ready_timeout: float | None = None,
        machines: list[str] | None = None,
    ) -> dict[str, Machine]:
        """Every machine of the definition at ``path`` (or those named in ``machines``), running and
        ready, in dependency order, on one fresh state root (their private networks shared). ``warm``:
        True/False forces restore or cold boot (None: each machine's own ``warm``)."""
        from qemuspec.runtime import crash, fresh
        from qemuspec.spec import cache
        from qemuspec.spec.order import order_machines

        path = os.path.abspath(path)
        spec = cache.load(
            path, self.settings.variables, self.settings.var_environ(), where=self.settings.cache
        )[0]
        wanted = machines or list(spec.machines)
        unknown = [name for name in wanted if name not in spec.machines]
        if unknown:
            raise QemuspecError(
                f"{path}: no machine {', '.join(unknown)} (it declares {', '.join(spec.machines)})"
            )
        root = tempfile.mkdtemp(prefix="qemuspec-test-")
        self.stack.callback(_remove_root, root)
        group: dict[str, Machine] = {}
        for level in order_machines({n: spec.machines[n] for n in wanted}):
            for name in level:
                instance = self.stack.enter_context(
                    fresh.started(
                        path,
                        name,
                        self.settings,
                        spec=spec,
                        root=root,
                        warm=warm,
                        ready_timeout=ready_timeout,
                    )
                )
                vmcore = (
                    os.path.join(self.vmcore, f"{_slug(self.item.nodeid)}-{name}.vmcore")
                    if self.vmcore
                    else None
                )
                watch = crash.Watch(instance, self.fail_on, vmcore)
                self.stack.callback(watch.close)
                handle = Machine(name, instance, watch)
                group[name] = handle
                self.handles.append(handle)
        return group

    def close(self) -> None:
        self.stack.close()


def _remove_root(root: str) -> None:
    import shutil

    from qemuspec.runtime.statedir import disown

    for entry in os.listdir(root) if os.path.isdir(root) else []:
        disown(os.path.join(root, entry))
    shutil.rmtree(root, ignore_errors=True)


def _slug(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qemuspec", "qemuspec machines (the qemuspec_machines fixture)")
    group.addoption(
        "--qemuspec-fail-on",
        choices=["panic", "warn"],
        default="panic",
        help="what guest kernel trouble fails a test: panic (panic, oops, BUG, KASAN) or warn "
        "(also kernel warnings, lockups, hung tasks, UBSAN)",
    )
    group.addoption(
        "--qemuspec-vmcore",
        metavar="DIR",
        default=None,
        help="keep an ELF core (dump-guest-memory) of every guest that crashes, in DIR",
    )


@pytest.fixture
def qemuspec_machines(request: pytest.FixtureRequest) -> Iterator[Machines]:
    """A factory: ``qemuspec_machines(path)`` -> {name: Machine} of that definition, each machine a
    fresh restore for this test, stopped and thrown away after it."""
    from qemuspec.settings import current

    vmcore = request.config.getoption("--qemuspec-vmcore")
    if vmcore:
        os.makedirs(vmcore, exist_ok=True)
    factory = Machines(
        request.node, current(), request.config.getoption("--qemuspec-fail-on"), vmcore
    )
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test whose guest crashed fails with the crash report; a failing test carries each machine's
    console and events in its failure text (so on the terminal and in JUnit's <failure>)."""
    report = yield
    handles: list[Machine] = getattr(item, ITEM_KEY, [])
    if not handles or report.when != "call":
        return report
    for handle in handles:
        if handle.watch.tripped.is_set() and report.passed:
            from qemuspec.runtime.crash import text

            report.outcome = "failed"
            report.longrepr = text(handle.watch.report())
    if report.failed:
        for handle in handles:
            for title, body in (
                (f"qemuspec console {handle.name}", handle.console_text()),
                (f"qemuspec events {handle.name}", handle.events_text()),
            ):
                add = getattr(report.longrepr, "addsection", None)
                if add is not None:  # in the failure's own text: the terminal and JUnit's <failure>
                    add(title, body)
                elif isinstance(report.longrepr, str):
                    report.longrepr += f"\n--- {title} ---\n{body}"
                else:
                    report.sections.append((title, body))
    return report


__all__ = ["CommandFailed", "Machine", "Machines", "qemuspec_machines"]
