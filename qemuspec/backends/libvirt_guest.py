"""Talking to a machine libvirt runs: its guest agent and monitor through libvirt's QEMU calls, and
its serial console as a libvirt stream. These work the same over a remote URI, which is the point:
nothing here needs a socket on the machine's host."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from qemuspec.backends.libvirt_conn import binding, message
from qemuspec.errors import QemuspecError, QMPTimeout, ReadyTimeout
from qemuspec.qmp.protocol import Protocol, decode
from qemuspec.runtime.agent import GuestAgent


class LibvirtAgent(GuestAgent):
    """The guest agent through ``virDomainQemuAgentCommand``: libvirt owns the channel and does the
    resynchronisation, so only :meth:`command` differs from the socket agent."""

    def __init__(self, dom: Any, timeout: float = 10.0):
        super().__init__(path=f"libvirt:{dom.name()}", timeout=timeout)
        self.dom = dom

    def sync(self, timeout: float | None = None) -> None:
        self.command("guest-ping", timeout=timeout)

    def close(self) -> None:
        pass

    def command(
        self, name: str, arguments: dict | None = None, timeout: float | None = None
    ) -> Any:
        import libvirt_qemu

        libvirt = binding()
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self.dom,
                Protocol.command_text(name, arguments),
                max(1, int(timeout or self.timeout)),
                0,
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
                raise QMPTimeout(
                    f"the guest agent of {self.dom.name()} did not answer: {message(exc)}"
                ) from None
            raise QemuspecError(
                f"guest agent {name} on {self.dom.name()}: {message(exc)}"
            ) from None
        return Protocol.result(
            name, decode(reply.encode(), "guest agent") if reply else {}, source="guest agent"
        )


class Monitor:
    """QMP through libvirt's monitor passthrough (``virsh qemu-monitor-command``), shaped like our
    QMP client so the probes' helpers take it."""

    def __init__(self, dom: Any):
        self.dom = dom

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        return None  # libvirt owns the monitor connection

    def command(self, name: str, arguments: dict | None = None, timeout: float = 30.0) -> Any:
        import libvirt_qemu

        libvirt = binding()
        try:
            reply = json.loads(
                libvirt_qemu.qemuMonitorCommand(self.dom, Protocol.command_text(name, arguments), 0)
            )
        except libvirt.libvirtError as exc:
            raise QemuspecError(f"QMP {name} on {self.dom.name()}: {message(exc)}") from None
        return Protocol.result(name, reply)


def forwarded_ports(dom: Any) -> list[dict]:
    from qemuspec.runtime.probes import forwarded_ports as ports

    try:
        return ports(Monitor(dom))
    except QemuspecError:
        return []


class Console:
    """The domain's serial console as a libvirt stream, read by libvirt's event loop into a buffer
    that waiters are woken on (no polling). Opened before the CPUs run, nothing the guest prints is
    missed."""

    def __init__(self, conn: Any, dom: Any, force: bool = False, on_data=None):
        libvirt = binding()
        self._libvirt = libvirt
        self.data = bytearray()
        self.closed = False
        self._cond = threading.Condition()
        self._on_data = on_data
        self.stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0)
        except libvirt.libvirtError as exc:
            raise QemuspecError(
                f"cannot open the console of {dom.name()}: {message(exc)}"
            ) from None
        events = (
            libvirt.VIR_STREAM_EVENT_READABLE
            | libvirt.VIR_STREAM_EVENT_ERROR
            | libvirt.VIR_STREAM_EVENT_HANGUP
        )
        self.stream.eventAddCallback(events, self._readable, None)

    def _readable(self, stream: Any, events: int, _opaque: Any) -> None:
        try:
            chunk = stream.recv(65536) if events & self._libvirt.VIR_STREAM_EVENT_READABLE else b""
        except self._libvirt.libvirtError:
            chunk = b""
        if chunk == -2:
            return
        with self._cond:
            if chunk:
                self.data += chunk
            else:
                self.closed = True
                try:
                    stream.eventRemoveCallback()
                except self._libvirt.libvirtError:
                    pass
            self._cond.notify_all()
        if chunk and self._on_data is not None:
            self._on_data(chunk)

    def send(self, data: bytes) -> None:
        try:
            self.stream.send(data)
        except self._libvirt.libvirtError as exc:
            raise QemuspecError(f"console write failed: {message(exc)}") from None

    def wait_for(self, pattern: str, deadline: float, alive) -> None:
        """Each console line matched once, outside the lock, with the linear-time matcher of
        ``spec/patterns.py`` (the guest's output is hostile, the pattern is the definition's)."""
        from qemuspec.spec.patterns import LineMatcher

        matcher = LineMatcher(pattern)
        seen = 0
        while True:
            with self._cond:
                data = bytes(self.data[seen:])
                seen += len(data)
            if matcher.feed(data):
                return
            with self._cond:
                if len(self.data) > seen:
                    continue
                if self.closed or not alive():
                    raise QemuspecError("the machine stopped while waiting for its console")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReadyTimeout(f"the console did not show /{pattern}/")
                self._cond.wait(
                    min(remaining, 1.0)
                )  # woken by data; the 1 s bound re-checks alive()

    def wait_closed(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.closed, timeout)

    def tail(self, lines: int = 10) -> str:
        with self._cond:
            text = bytes(self.data).decode(errors="replace").replace("\r", "")
        return "\n".join(text.rstrip("\n").split("\n")[-lines:])

    def close(self) -> None:
        try:
            self.stream.eventRemoveCallback()
        except self._libvirt.libvirtError:
            pass
        try:
            self.stream.abort()
        except self._libvirt.libvirtError:
            pass


def wait_agent(dom: Any, deadline: float, alive) -> None:
    agent = LibvirtAgent(dom, timeout=2)
    delay = 0.1
    while True:
        try:
            agent.command("guest-ping", timeout=2)
            return
        except QemuspecError as exc:
            if not alive():
                raise QemuspecError(
                    "the machine stopped while waiting for its guest agent"
                ) from None
            if time.monotonic() >= deadline:
                raise ReadyTimeout(f"the guest agent did not answer guest-ping: {exc}") from None
        time.sleep(
            min(delay, max(0.0, deadline - time.monotonic()))
        )  # libvirt has no agent-up event for us to wait on
        delay = min(delay * 2, 1.0)
