"""The serial console, read live from qemu's console socket.

qemu also writes everything to serial.log (chardev ``logfile``), which keeps the history and covers
anything printed before this reader connected; the reader is for waiting on a pattern the moment it
appears, not a second later. Matching (``spec/patterns.py``: RE2, line by line) runs outside the
reader's lock, and a waiter can be interrupted (a stop request) without waiting for its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

from qemuspec.errors import ReadyTimeout, StopRequested
from qemuspec.spec.patterns import LineMatcher

KEEP = 1 << 20  # bytes of console kept in memory for matching
SLICE = 0.5  # seconds a waiter sleeps at most before it looks at pending signals and stop requests


class ConsoleReader:
    def __init__(self, sock: socket.socket, log_path: str | None = None, log_offset: int = 0):
        self._sock = sock
        self._buffer = bytearray()
        self._dropped = 0  # bytes cut from the front of the buffer: positions stay absolute
        self._cond = threading.Condition()
        self._eof = False
        self._interrupted = False
        self._log_path = log_path
        self._log_offset = log_offset
        self._thread = threading.Thread(target=self._read, name="console-reader", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, path: str, log_path: str | None = None, log_offset: int = 0) -> "ConsoleReader":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        return cls(sock, log_path, log_offset)

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
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

    def _logged(self) -> bytes:
        """What qemu logged since this boot started (covers output before the socket connected)."""
        if not self._log_path:
            return b""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read()
        except OSError:
            return b""

    def interrupt(self) -> None:
        """Wake a waiter at once (a stop was requested); it raises StopRequested if ``stopping`` says so.
        Safe from a signal handler: the waiter holds the lock only between its waits."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, stopping: Callable[[], bool] | None = None) -> Any:
        """Block until ``pattern`` (a regex, RE2) shows in a console line; raises ReadyTimeout, EOFError
        when qemu closes the console first, or StopRequested when ``stopping()`` turns true."""
        history = LineMatcher(pattern)
        match = history.feed(self._logged())
        if match:
            return match
        live = LineMatcher(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._cond:
                while self._dropped + len(self._buffer) == seen and not self._eof and not self._interrupted:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ReadyTimeout(f"no {pattern!r} on the console within {timeout:g} s")
                    # bounded: a signal that lands on another thread runs its Python handler (the
                    # supervisor's SIGTERM) only once this thread runs bytecode again
                    self._cond.wait(min(remaining, SLICE))
                data = bytes(self._buffer[max(0, seen - self._dropped):])
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


def tail(path: str, lines: int = 20, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").split("\n")[-lines:]) if text.strip() else ""
