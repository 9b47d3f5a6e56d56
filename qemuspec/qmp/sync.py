"""Blocking QMP client: usable from plain code, no event loop needed.

One reader thread owns the socket's receiving side: replies are handed to the waiting caller, events to
listeners and waiters. The thread sees EOF the moment qemu goes away, so every pending wait fails at
once instead of at its timeout.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Any, Callable, Iterator

from qemuspec.errors import QMPConnectionError, QMPTimeout
from qemuspec.qmp.protocol import NEGOTIATE, EventLog, Protocol, event_name_matches, parse_address

Listener = Callable[[dict], object]


class _Pending:
    """A reply slot. A bare lock, held until the reply arrives, is the cheapest cross-thread wake-up
    (threading.Event costs a Condition round on top); it keeps the sync face near the socket floor."""

    __slots__ = ("lock", "message")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.message: dict | None = None

    def wait(self, timeout: float) -> bool:
        return self.lock.acquire(timeout=timeout)

    def set(self) -> None:
        self.lock.release()


class QMPClient:
    """``QMPClient.connect("unix:/run/x/qmp.sock")``; then ``command()``, ``on()``, ``wait_for()``."""

    def __init__(self, sock: socket.socket, event_log: str | None = None, history: int = 1000):
        self._sock = sock
        self._protocol = Protocol()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listeners: list[tuple[str, Listener]] = []
        self._close_callbacks: list[Callable[[], object]] = []
        self._events: collections.deque[dict] = collections.deque(maxlen=history)
        self._event_count = 0
        self._log = EventLog(event_log)
        self._closed: str | None = None
        self._greeted = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)

    # -- connection -------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: str | socket.socket,
        timeout: float = 10.0,
        event_log: str | None = None,
        retry_until: float | None = None,
    ) -> "QMPClient":
        """Connect, read the greeting and negotiate. ``retry_until`` (a monotonic deadline) keeps trying
        while the socket is not there yet (qemu still starting)."""
        sock = address if isinstance(address, socket.socket) else _open(address, retry_until)
        client = cls(sock, event_log=event_log)
        client._reader.start()
        try:
            if not client._greeted.wait(timeout):
                raise QMPTimeout(
                    f"no QMP greeting within {timeout:g} s from {address}: is another client connected to this monitor?"
                )
            client._raise_if_closed()
            client.command(NEGOTIATE, timeout=timeout)
        except BaseException:
            client.close()
            raise
        return client

    @property
    def greeting(self) -> dict | None:
        return self._protocol.greeting

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = "closed by this client"
            self._cond.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join(timeout=2)
        self._log.close()

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------------------

    def command(
        self,
        name: str,
        arguments: dict | None = None,
        timeout: float = 30.0,
        fds: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> Any:
        """Run a QMP command and return its ``return`` value; QMP errors raise :class:`QMPError`.
        ``fds`` go along with the command (SCM_RIGHTS, unix sockets only), as ``getfd`` wants."""
        if kwargs:  # names with "-" go in ``arguments``
            arguments = {**(arguments or {}), **kwargs}
        msg_id, data = self._protocol.request(name, arguments)
        pending = _Pending()
        with self._lock:
            self._raise_if_closed()
            self._pending[msg_id] = pending
        try:
            with self._send_lock:
                if fds:
                    sent = socket.send_fds(self._sock, [data], list(fds))
                    self._sock.sendall(data[sent:])
                else:
                    self._sock.sendall(data)
        except OSError as exc:
            self._pending.pop(msg_id, None)
            raise QMPConnectionError(f"QMP {name}: cannot send: {exc}") from None
        if not pending.wait(timeout):
            with self._lock:
                still_pending = self._pending.pop(msg_id, None) is not None
            if still_pending:
                raise QMPTimeout(f"QMP {name}: no reply within {timeout:g} s")
            pending.wait(1.0)  # the reply raced the timeout: the reader is handing it over now
        if pending.message is None:
            raise QMPConnectionError(
                f"QMP {name}: the connection closed before the reply ({self._closed})"
            )
        return Protocol.result(name, pending.message)

    __call__ = command

    # -- events -----------------------------------------------------------------------------------

    def on(self, name: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` for each event called ``name`` ("*" for all); returns an unsubscribe.
        Callbacks run on the reader thread: keep them short, and do not send commands from them."""
        entry = (name, callback)
        with self._lock:
            self._listeners.append(entry)

        def off() -> None:
            with self._lock:
                if entry in self._listeners:
                    self._listeners.remove(entry)

        return off

    def on_close(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback()`` once when the connection ends (EOF, error, or close())."""
        with self._lock:
            if self._closed is None or self._reader.is_alive():
                self._close_callbacks.append(callback)
                return lambda: (
                    self._close_callbacks.remove(callback)
                    if callback in self._close_callbacks
                    else None
                )
        callback()
        return lambda: None

    def wait_for(
        self,
        name: str,
        timeout: float,
        predicate: Callable[[dict], bool] | None = None,
        since: int | None = None,
    ) -> dict:
        """The first event called ``name`` received after event number ``since`` (default: from now)."""
        return self._next(name, timeout, predicate, since)[1]

    @property
    def event_count(self) -> int:
        """A mark to pass to ``wait_for(since=...)`` so an event that comes before the wait starts counts."""
        with self._lock:
            return self._event_count

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Events from the moment of this call, as they arrive; ends when the connection closes or
        ``timeout`` passes with no event."""
        mark = self.event_count  # taken now, not at the first next()

        def generate(mark: int) -> Iterator[dict]:
            while True:
                try:
                    mark, event = self._next("*", 1e9 if timeout is None else timeout, None, mark)
                except (QMPConnectionError, QMPTimeout):
                    return
                yield event

        return generate(mark)

    def _next(
        self, name: str, timeout: float, predicate: Callable[[dict], bool] | None, since: int | None
    ) -> tuple[int, dict]:
        deadline = time.monotonic() + timeout
        with self._lock:
            mark = self._event_count if since is None else since
            while True:
                first = self._event_count - len(self._events)  # number of the oldest event kept
                for number in range(max(mark, first), self._event_count):
                    event = self._events[number - first]
                    if event_name_matches(name, event["event"]) and (
                        predicate is None or predicate(event)
                    ):
                        return number + 1, event
                mark = self._event_count
                self._raise_if_closed(f"waiting for event {name}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QMPTimeout(f"no {name} event within {timeout:g} s")
                self._cond.wait(remaining)

    # -- reader thread ----------------------------------------------------------------------------

    def _raise_if_closed(self, doing: str = "") -> None:
        if self._closed is not None:
            raise QMPConnectionError(
                f"QMP connection closed{' while ' + doing if doing else ''}: {self._closed}"
            )

    def _read_loop(self) -> None:
        reason = "qemu closed the connection (EOF)"
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                for message in self._protocol.feed(data):
                    self._dispatch(message)
        except OSError as exc:
            reason = f"connection error: {exc}"
        except QMPConnectionError as exc:
            reason = str(exc)
        with self._lock:
            if self._closed is None:
                self._closed = reason
            pending, self._pending = self._pending, {}
            self._cond.notify_all()
            callbacks, self._close_callbacks = self._close_callbacks, []
        self._greeted.set()
        for slot in pending.values():
            slot.set()
        for callback in callbacks:
            try:
                callback()
            except Exception:
                pass

    def _dispatch(self, message: dict) -> None:
        kind = Protocol.kind(message)
        if kind == "greeting":
            self._greeted.set()
        elif kind == "event":
            self._log.write(message)
            with self._lock:
                self._events.append(message)
                self._event_count += 1
                listeners = [
                    cb
                    for pattern, cb in self._listeners
                    if event_name_matches(pattern, message["event"])
                ]
                self._cond.notify_all()
            for callback in listeners:
                try:
                    callback(message)
                except Exception:  # a listener's bug must not kill the connection
                    pass
        else:
            with self._lock:
                slot = self._pending.pop(message.get("id", ""), None)
            if slot is not None:
                slot.message = message
                slot.set()


def _open(address: str, retry_until: float | None) -> socket.socket:
    family, target = parse_address(address)
    while True:
        sock = socket.socket(
            socket.AF_UNIX if family == "unix" else socket.AF_INET,
            socket.SOCK_STREAM | socket.SOCK_CLOEXEC,
        )
        try:
            sock.connect(target)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if retry_until is None or time.monotonic() >= retry_until:
                raise QMPConnectionError(
                    f"cannot connect to QMP at {address}: {exc.strerror}"
                ) from None
            time.sleep(0.002)
        except OSError as exc:
            sock.close()
            raise QMPConnectionError(f"cannot connect to QMP at {address}: {exc}") from None
