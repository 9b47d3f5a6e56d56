"""The serial console: one reader per qemu, connected before qemu runs, for the machine's whole life.

Why one reader and not qemu's own ``logfile=``: qemu 7.2 repeats bytes in a socket chardev's log file
when the socket's reader is slow (qemu-facts.md), and qemu's log grows without bound while it runs.
So the reader writes serial.log itself from the bytes it receives (statedir.CappedLog: capped and
rotated while running), matches readiness patterns as they appear, and passes the bytes on to one
``qemuspec console`` at a time through a proxy socket in the private runtime directory
(:class:`ConsoleProxy`): qemu's chardev serves a single client, and that client stays ours.
Matching (``spec/patterns.py``: RE2, line by line) runs outside the reader's lock, and a waiter can be
interrupted (a stop request) without waiting for its deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from qemuspec.errors import ReadyTimeout, StopRequested
from qemuspec.spec.patterns import LineMatcher

if TYPE_CHECKING:
    from qemuspec.runtime.statedir import CappedLog

KEEP = 1 << 20  # bytes of console kept in memory for matching
CLIENT_SEND_TIMEOUT = 5.0  # a console client that takes no bytes for this long is dropped (it must not stall the guest)
SLICE = 0.5  # seconds a waiter sleeps at most before it looks at pending signals and stop requests
# The one detector of guest kernel trouble on the console (readiness waits, `run`, `test` and the
# pytest plugin all read what it found). Each kind: its pattern (on one console line), and how bad it
# is: "fatal" (the kernel stopped: panic), "error" (the kernel oopsed or found a bug; it may limp on)
# or "warning" (a WARN_ON, a lockup or stall, UBSAN). A readiness wait ends on fatal and error lines
# (``panics``) at once instead of waiting out its timeout; warnings are left out on purpose: under TCG on a
# loaded host a healthy guest prints lockup warnings, and it goes on booting. The first matching
# kind wins, so the more specific patterns come first.
CRASH_KINDS: tuple[tuple[str, str, re.Pattern[bytes]], ...] = (
    ("panic", "fatal", re.compile(rb"Kernel panic - not syncing")),
    ("kasan", "error", re.compile(rb"\bBUG: KASAN: |\bBUG: KFENCE: ")),
    ("soft lockup", "warning", re.compile(rb"\bBUG: soft lockup|\bBUG: workqueue lockup")),
    ("hung task", "warning", re.compile(rb"\bINFO: task \S.* blocked for more than \d+ seconds")),
    ("rcu stall", "warning", re.compile(rb"\brcu: INFO: \S+ (?:self-)?detected stalls?")),
    ("ubsan", "warning", re.compile(rb"\bUBSAN: ")),
    ("oops", "error", re.compile(rb"\bOops: ")),
    ("bug", "error", re.compile(rb"\bBUG: |kernel BUG at|Unable to handle (?:kernel|page fault)")),
    ("general protection fault", "error", re.compile(rb"general protection fault")),
    ("warning", "warning", re.compile(rb"\bWARNING: CPU: \d+ PID: \d+")),
)
SEVERITY = {"warning": 0, "error": 1, "fatal": 2}
# Within one severity, what a block is called once both appear in it: an Oops after a BUG line (a
# NULL dereference prints "BUG: kernel NULL pointer dereference" and then "Oops:") is an oops.
RANK = {"oops": 1}
# What ends a crash's block of lines (the kernel's own end markers), and how long a block may grow.
CRASH_END = re.compile(rb"---\[ end (?:trace|Kernel panic)")
CRASH_BLOCK_LINES = 80
KERNEL_TIME = re.compile(rb"^\s*(?:<\d>)?\[\s*(\d{1,9}\.\d{1,9})\]")
MAX_PANIC_LINES = 20
MAX_CRASHES = 20  # blocks kept per console (a guest can print warnings for ever)


def classify(line: bytes) -> tuple[str, str] | None:
    """The kind and severity of a console line that reports kernel trouble, or None."""
    for kind, severity, pattern in CRASH_KINDS:
        if pattern.search(line):
            return kind, severity
    return None


@dataclasses.dataclass
class Crash:
    """One report of kernel trouble on the console: its kind (the worst header seen in the block),
    its first line, the lines that followed up to the kernel's end marker (bounded), the kernel's
    own timestamp of the first line (seconds since the guest booted, when printk shows times) and
    the reader's clock when it was seen. Text from the guest: decoded, never trusted."""

    kind: str
    severity: str
    line: str
    lines: list[str]
    uptime: float | None
    seen_at: float  # time.time() when the first line arrived
    complete: bool = False  # the kernel's end marker arrived (or the block hit its bound)


class ConsoleReader:
    def __init__(self, sock: socket.socket, log: CappedLog | None = None):
        self._sock = sock
        self._buffer = bytearray()
        self._dropped = 0  # bytes cut from the front of the buffer: positions stay absolute
        self._cond = threading.Condition()
        self._eof = False
        self._interrupted = False
        self.log = log
        self._client: socket.socket | None = None  # the console proxy's attached client, if any
        self._client_lock = threading.Lock()
        self.panics: list[
            str
        ] = []  # console lines that say the guest kernel panicked or oopsed (fatal, error)
        self._partial = b""  # the console line being received, for classify
        self.crashes: list[Crash] = []  # every kind of kernel trouble, warnings too (CRASH_KINDS)
        self._block: Crash | None = None  # the crash whose following lines are being collected
        self._crash_listeners: list[Callable[[Crash], object]] = []
        self._thread = threading.Thread(target=self._read, name="console-reader", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, path: str, log: CappedLog | None = None) -> "ConsoleReader":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        return cls(sock, log)

    @property
    def closed(self) -> bool:
        return self._eof

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                if self.log is not None:
                    self.log.write(data)  # first: the log holds every byte a client is shown
                self._pass_on(data)
                self._scan(data)
                with self._cond:
                    self._buffer += data
                    if len(self._buffer) > KEEP:
                        self._dropped += len(self._buffer) - KEEP
                        del self._buffer[: len(self._buffer) - KEEP]
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        self.detach()
        if self.log is not None:
            self.log.close()

    def _scan(self, data: bytes) -> None:
        """Keep the fatal and error lines (``panics``), and every crash block (CRASH_KINDS, with the lines
        that follow it); listeners hear of a crash when it starts, when it gets worse (an Oops that
        becomes a panic) and when its block is complete. The waiter is woken with the data right after."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for line in lines:
            found = classify(line)
            if found is not None and found[1] != "warning" and len(self.panics) < MAX_PANIC_LINES:
                self.panics.append(line.decode(errors="replace").strip())
            self._collect(line, found)

    def _collect(self, line: bytes, found: tuple[str, str] | None) -> None:
        text = line.decode(errors="replace").strip()[:512]
        block, changed = self._block, False
        if block is not None:
            block.lines.append(text)
            if found is not None and (SEVERITY[found[1]], RANK.get(found[0], 0)) > (
                SEVERITY[block.severity],
                RANK.get(block.kind, 0),
            ):
                block.kind, block.severity, changed = found[0], found[1], True
            if CRASH_END.search(line) or len(block.lines) >= CRASH_BLOCK_LINES:
                block.complete, changed, self._block = True, True, None
        elif found is not None and len(self.crashes) < MAX_CRASHES:
            stamp = KERNEL_TIME.search(line)
            block = Crash(
                found[0],
                found[1],
                text,
                [text],
                float(stamp.group(1)) if stamp else None,
                time.time(),
            )
            self.crashes.append(block)
            self._block, changed = block, True
        if changed and block is not None:
            for listener in list(self._crash_listeners):
                with contextlib.suppress(Exception):  # a listener must never stop the reader
                    listener(block)

    def on_crash(self, listener: Callable[[Crash], object]) -> Callable[[], None]:
        """Call ``listener(crash)`` on the reader thread whenever a crash starts, gets worse or is
        complete (crashes seen before are not replayed: read ``crashes``); returns the unsubscriber."""
        self._crash_listeners.append(listener)

        def off() -> None:
            with contextlib.suppress(ValueError):
                self._crash_listeners.remove(listener)

        return off

    def _pass_on(self, data: bytes) -> None:
        with self._client_lock:
            client = self._client
            if client is None:
                return
            try:
                client.sendall(data)
            except (
                OSError
            ):  # gone, or too slow (CLIENT_SEND_TIMEOUT): the guest is never held up by it
                self._drop(client)

    def attach(self, client: socket.socket) -> bool:
        """Make ``client`` the one receiver of console output (False when another one is attached)."""
        with self._client_lock:
            if self._client is not None or self._eof:
                return False
            client.settimeout(CLIENT_SEND_TIMEOUT)
            self._client = client
            return True

    def detach(self, client: socket.socket | None = None) -> None:
        with self._client_lock:
            if self._client is not None and (client is None or client is self._client):
                self._drop(self._client)

    def _drop(self, client: socket.socket) -> None:
        if client is self._client:
            self._client = None
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        client.close()

    def send(self, data: bytes) -> None:
        """Input for the guest's console."""
        self._sock.sendall(data)

    def interrupt(self) -> None:
        """Wake a waiter at once (a stop was requested); it raises StopRequested if ``stopping`` says so.
        Safe from a signal handler: the waiter holds the lock only between its waits."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    @property
    def position(self) -> int:
        """How many console bytes this reader has received: a mark for ``wait_for(since=)``."""
        with self._cond:
            return self._dropped + len(self._buffer)

    def wait_for(
        self,
        pattern: str,
        timeout: float,
        stopping: Callable[[], bool] | None = None,
        since: int | None = None,
    ) -> Any:
        """Block until ``pattern`` (a regex, RE2) shows in a console line since this reader connected
        (before qemu ran, for a launch), or since ``since`` (a :attr:`position`: only what came
        after it counts); raises ReadyTimeout, EOFError when qemu closes the console first, or
        StopRequested when ``stopping()`` turns true."""
        live = LineMatcher(pattern)
        deadline = time.monotonic() + timeout
        seen = -1 if since is None else since  # -1: the first round feeds what the buffer holds
        while True:
            with self._cond:
                while (
                    self._dropped + len(self._buffer) == seen
                    and not self._eof
                    and not self._interrupted
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ReadyTimeout(f"no {pattern!r} on the console within {timeout:g} s")
                    # bounded: a signal that lands on another thread runs its Python handler (the
                    # supervisor's SIGTERM) only once this thread runs bytecode again
                    self._cond.wait(min(remaining, SLICE))
                data = bytes(self._buffer[max(0, seen - self._dropped) :])
                seen = self._dropped + len(self._buffer)
                eof, self._interrupted = self._eof, False
            if stopping is not None and stopping():
                raise StopRequested("a stop was requested while waiting for the console")
            match = live.feed(data)  # outside the lock: the reader keeps reading meanwhile
            if match:
                return match
            if eof:
                raise EOFError("the console closed (qemu exited)")
            if time.monotonic() >= deadline:
                raise ReadyTimeout(f"no {pattern!r} on the console within {timeout:g} s")

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)


class ConsoleProxy:
    """``qemuspec console``'s socket (0600, in the private runtime directory), served by whoever holds
    the console reader (the supervisor). One client at a time: each connection first reads one line,
    ``ok`` or ``busy: <why>``, then raw console bytes both ways. ``rebind`` makes the socket again
    when the runtime directory was removed under us."""

    def __init__(self, path: str, reader: ConsoleReader, name: str):
        self.path, self.reader, self.name = path, reader, name
        self._holder: int | None = None  # pid of the attached client, for the refusal
        self._closed = False
        self._sock = self._listen()
        self._thread = threading.Thread(target=self._serve, name="console-proxy", daemon=True)
        self._thread.start()

    def _listen(self) -> socket.socket:
        from qemuspec.runtime.sockets import listen_unix

        sock = listen_unix(self.path)
        sock.settimeout(0.5)  # so that close() and rebind() are noticed
        return sock

    def rebind(self) -> None:
        old, self._sock = self._sock, self._listen()
        old.close()

    def _serve(self) -> None:
        while not self._closed and not self.reader.closed:
            sock = self._sock
            try:
                client, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed:
                    return
                continue
            client.settimeout(None)
            pid = _peer_pid(client)
            if self._holder is not None or not self.reader.attach(client):
                who = f" (pid {self._holder})" if self._holder else ""
                with contextlib.suppress(OSError):
                    client.sendall(
                        f"busy: the console of machine {self.name} is in use by another "
                        f"`qemuspec console`{who}; detach that one first (Ctrl-])\n".encode()
                    )
                client.close()
                continue
            try:
                client.sendall(b"ok\n")
            except OSError:
                self.reader.detach(client)
                continue
            self._holder = pid
            threading.Thread(
                target=self._input, args=(client,), name="console-input", daemon=True
            ).start()

    def _input(self, client: socket.socket) -> None:
        """What the client types goes to the guest, until it detaches."""
        try:
            while True:
                data = client.recv(4096)
                if not data:
                    break
                self.reader.send(data)
        except OSError:
            pass
        self._holder = None
        self.reader.detach(client)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self.reader.detach()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        return struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )[0]
    except OSError:
        return None


def tail(path: str, lines: int = 20, offset: int = 0) -> str:
    """The last lines of a state file (through the state owner: never through a symlink)."""
    from qemuspec.runtime.statedir import read_from

    data = read_from(path, offset)
    if data is None:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").split("\n")[-lines:]) if text.strip() else ""
