"""The QMP protocol without I/O: framing, greeting, command ids, replies, errors, events.

Both faces (:mod:`qemuspec.qmp.sync` and :mod:`qemuspec.qmp.aio`) feed received bytes in and send what
this returns, so the protocol rules live in one place.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from qemuspec.errors import QMPError, QMPProtocolError

NEGOTIATE = "qmp_capabilities"
# One message at most: qemu-ga's largest reply (guest-exec-status with its 16 MiB output cap, as
# base64) fits; a peer that sends more without a newline is not speaking QMP, and memory stays bounded.
MAX_MESSAGE = 32 * 1024 * 1024
MISSING = object()


class Protocol:
    def __init__(self) -> None:
        self._buffer = b""
        self._ids = itertools.count(1)
        self.greeting: dict | None = None

    def feed(self, data: bytes) -> list[dict]:
        """Complete messages in ``data`` (plus what was buffered). QMP frames are JSON objects per line."""
        self._buffer += data
        if b"\n" not in data:
            check_size(self._buffer)
            return []
        *lines, self._buffer = self._buffer.split(b"\n")
        check_size(self._buffer)
        out = []
        for line in lines:
            if not line.strip():
                continue
            message = decode(line)
            if "QMP" in message and self.greeting is None:
                self.greeting = message["QMP"]
            out.append(message)
        return out

    def request(
        self, command: str, arguments: dict | None = None, oob: bool = False
    ) -> tuple[str, bytes]:
        msg_id = f"q{next(self._ids)}"
        message: dict[str, object] = {("exec-oob" if oob else "execute"): command, "id": msg_id}
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
            if not (
                isinstance(error, dict)
                and isinstance(error.get("class", ""), str)
                and isinstance(error.get("desc", ""), str)
            ):
                raise QMPProtocolError(
                    f"the {source} answered {command} with a malformed error: {_show(error)}"
                )
            raise QMPError(
                command, error.get("class", "GenericError"), error.get("desc", ""), source=source
            )
        return message.get("return")

    @staticmethod
    def field(
        command: str,
        result: Any,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = MISSING,
        source: str = "guest agent",
    ) -> Any:
        """``result[key]`` checked to be a ``kind`` (a bool is no int): a reply of another shape is a
        :class:`QMPProtocolError` naming the command, never a KeyError or TypeError later."""
        if not isinstance(result, dict):
            raise QMPProtocolError(
                f"the {source} answered {command} with {_show(result)} where an object belongs"
            )
        if key not in result and default is not MISSING:
            return default
        value = result.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise QMPProtocolError(
                f"the {source} answered {command} with {key} = {_show(value)}: "
                f"expected {' or '.join(k.__name__ for k in kinds)}"
            )
        return value

    @staticmethod
    def command_text(command: str, arguments: dict | None = None) -> str:
        """One command as JSON text, without an id (for peers that pair replies themselves: libvirt)."""
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        return json.dumps(message)


def check_size(buffered: bytes, source: str = "peer") -> None:
    """Refuse a message still growing past :data:`MAX_MESSAGE` (the caller keeps it buffered)."""
    if len(buffered) > MAX_MESSAGE:
        raise QMPProtocolError(
            f"the {source} sent a message over {MAX_MESSAGE >> 20} MiB without ending it: "
            "not QMP, or not a peer to trust"
        )


def decode(line: bytes, source: str = "peer") -> dict:
    """One QMP message: a JSON object, or :class:`QMPProtocolError` (bad JSON, nesting past Python's
    recursion limit, an array or number where an object belongs)."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        raise QMPProtocolError(
            f"the {source} sent something that is not QMP ({why}): {line[:200]!r}"
        ) from None
    if not isinstance(message, dict):
        raise QMPProtocolError(
            f"the {source} sent something that is not QMP (not an object): {line[:200]!r}"
        )
    return message


def _show(value: object) -> str:
    """A short, printable account of a value a peer sent."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


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
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                )
                self._size = os.fstat(self._fd).st_size
            if self._size + len(line) > self.limit:
                self.close()
                os.replace(self.path, self.path + ".1")
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                )
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
