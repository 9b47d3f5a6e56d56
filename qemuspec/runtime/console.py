"""The serial console, read live from qemu's console socket.

qemu also writes everything to serial.log (chardev ``logfile``), which keeps the history and covers
anything printed before this reader connected; the reader is for waiting on a pattern the moment it
appears, not a second later.
"""

from __future__ import annotations

import re
import socket
import threading
import time

from qemuspec.errors import ReadyTimeout

KEEP = 1 << 20  # bytes of console kept in memory for matching


class ConsoleReader:
    def __init__(self, sock: socket.socket, log_path: str | None = None, log_offset: int = 0):
        self._sock = sock
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._eof = False
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
                        del self._buffer[: len(self._buffer) - KEEP]
                    self._cond.notify_all()
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _logged(self) -> str:
        """What qemu logged since this boot started (covers output before the socket connected)."""
        if not self._log_path:
            return ""
        from qemuspec.runtime.statedir import read_from

        return (read_from(self._log_path, self._log_offset) or b"").decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Block until ``pattern`` (a regex) shows on the console; raises TimeoutError, or EOFError when
        qemu closes the console first."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern, re.M)
        match = regex.search(self._logged().encode())
        if match:
            return match
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._buffer)
                if match:
                    return match
                if self._eof:
                    raise EOFError("the console closed (qemu exited)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReadyTimeout(f"no {pattern!r} on the console within {timeout:g} s")
                self._cond.wait(remaining)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)


def tail(path: str, lines: int = 20, offset: int = 0) -> str:
    """The last lines of a state file (through the state owner: never through a symlink)."""
    from qemuspec.runtime.statedir import read_from

    data = read_from(path, offset)
    if data is None:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").split("\n")[-lines:]) if text.strip() else ""
