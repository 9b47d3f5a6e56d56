"""The QMP protocol without I/O: framing, greeting, command ids, replies, errors, events.

Both faces (:mod:`qemuspec.qmp.sync` and :mod:`qemuspec.qmp.aio`) feed received bytes in and send what
this returns, so the protocol rules live in one place.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from qemuspec.errors import QMPConnectionError, QMPError

NEGOTIATE = "qmp_capabilities"


class Protocol:
    def __init__(self) -> None:
        self._buffer = b""
        self._ids = itertools.count(1)
        self.greeting: dict | None = None

    def feed(self, data: bytes) -> list[dict]:
        """Complete messages in ``data`` (plus what was buffered). QMP frames are JSON objects per line."""
        self._buffer += data
        if b"\n" not in data:
            return []
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                raise QMPConnectionError(f"the peer sent something that is not QMP: {line[:200]!r}") from None
            if not isinstance(message, dict):
                raise QMPConnectionError(f"the peer sent something that is not QMP: {line[:200]!r}")
            if "QMP" in message and self.greeting is None:
                self.greeting = message["QMP"]
            out.append(message)
        return out

    def request(self, command: str, arguments: dict | None = None, oob: bool = False) -> tuple[str, bytes]:
        msg_id = f"q{next(self._ids)}"
        message: dict[str, Any] = {("exec-oob" if oob else "execute"): command, "id": msg_id}
        if arguments:
            message["arguments"] = arguments
        return msg_id, json.dumps(message, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def kind(message: dict) -> str:
        if "event" in message:
            return "event"
        if "QMP" in message:
            return "greeting"
        return "reply"

    @staticmethod
    def result(command: str, message: dict, source: str = "QMP") -> Any:
        """The return value of a reply, or the error raised as :class:`QMPError` (``source`` names who
        answered: QMP, or the guest agent, which speaks the same protocol)."""
        if "error" in message:
            error = message["error"]
            raise QMPError(command, error.get("class", "GenericError"), error.get("desc", ""), source=source)
        return message.get("return")

    @staticmethod
    def command_text(command: str, arguments: dict | None = None) -> str:
        """One command as JSON text, without an id (for peers that pair replies themselves: libvirt)."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        return json.dumps(message)


def event_name_matches(pattern: str, name: str) -> bool:
    return pattern == "*" or pattern == name


class EventLog:
    """Appends each event to a JSON-lines file (the machine's ``events.jsonl``), one write per line.

    A failed write (disk full, directory deleted) is remembered in ``error``, never raised: losing a
    log line must not cost the QMP connection it came from. Past ``limit`` bytes the file is moved to
    ``NAME.1`` (one generation kept), so the log stays bounded."""

    LIMIT = 8 * 1024 * 1024

    def __init__(self, path: str | None, limit: int = LIMIT):
        self.path = path
        self.limit = limit
        self.error: str | None = None
        self._fd: int | None = None
        self._size = 0

    def write(self, event: dict) -> None:
        if not self.path:
            return
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                self._size = os.fstat(self._fd).st_size
            if self._size + len(line) > self.limit:
                self.close()
                os.replace(self.path, self.path + ".1")
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                self._size = 0
            os.write(self._fd, line)
            self._size += len(line)
        except OSError as exc:
            self.error = f"cannot write {self.path}: {exc.strerror or exc}"
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def parse_address(address: str) -> tuple[str, Any]:
    """``unix:/path``, ``tcp:127.0.0.1:4444``, or a bare socket path."""
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return "tcp", (host or "127.0.0.1", int(port))
    return "unix", address.removeprefix("unix:")
