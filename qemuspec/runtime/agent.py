"""The qemu guest agent, spoken over the machine's virtio-serial channel (a unix socket on the host).

The agent has no greeting and may have stale bytes in the channel, so every session starts with
``guest-sync-delimited``: the 0xFF it echoes marks where our replies begin.

The agent runs inside the guest, so every reply is hostile input: replies are size-capped, decoded by
the QMP core (an object or a protocol error) and each field is checked for its type before use.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import socket
import time
from typing import Any

from qemuspec.errors import QMPConnectionError, QMPProtocolError, QMPTimeout
from qemuspec.qmp.protocol import MISSING, Protocol, check_size, decode

SOURCE = "guest agent"


class GuestAgent:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self.broken: str | None = None  # set by a protocol error: this session says nothing more

    def __enter__(self) -> "GuestAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def sync(self, timeout: float | None = None) -> None:
        """Open the channel and resynchronise; raises QMPTimeout while the agent is not up."""
        self.close()
        self._buffer = b""
        self.broken = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise QMPConnectionError(
                f"cannot reach the guest agent channel {self.path}: {exc}"
            ) from None
        self._sock = sock
        token = random.randint(1, 2**31)
        sock.sendall(
            b"\xff"
            + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
            + b"\n"
        )
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if b"\xff" in self._buffer:
                self._buffer = self._buffer[self._buffer.rindex(b"\xff") + 1 :]
                reply = self._line(deadline)
                if reply.get("return") == token:
                    return
            else:
                self._fill(deadline)

    def _fill(self, deadline: float) -> None:
        assert self._sock is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QMPTimeout("the guest agent did not answer in time")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise QMPTimeout("the guest agent did not answer in time") from None
        except OSError as exc:  # reset: qemu exited or the guest went away under us
            raise QMPConnectionError(
                f"the guest agent channel closed ({exc.strerror or exc})"
            ) from None
        if not data:
            raise QMPConnectionError("the guest agent channel closed")
        self._buffer += data
        check_size(self._buffer, SOURCE)  # stale bytes before the sync mark count too

    def _line(self, deadline: float) -> dict:
        while True:
            while b"\n" not in self._buffer:
                self._fill(deadline)
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.strip().lstrip(b"\xff")
            if line:
                check_size(line, SOURCE)
                return decode(line, SOURCE)

    def command(
        self, name: str, arguments: dict | None = None, timeout: float | None = None
    ) -> Any:
        if self.broken:
            raise QMPProtocolError(self.broken)
        if self._sock is None:
            self.sync()
        assert self._sock is not None
        try:
            self._sock.sendall(Protocol.command_text(name, arguments).encode() + b"\n")
        except OSError as exc:
            raise QMPConnectionError(
                f"the guest agent channel closed ({exc.strerror or exc})"
            ) from None
        try:
            reply = self._line(time.monotonic() + (timeout or self.timeout))
            return Protocol.result(name, reply, source=SOURCE)
        except QMPProtocolError as exc:
            raise self._broke(exc) from None

    def _broke(self, exc: QMPProtocolError) -> QMPProtocolError:
        """End the session: what follows a broken message cannot be paired with our commands."""
        self.close()
        self.broken = str(exc)
        return exc

    def field(
        self,
        command: str,
        result: Any,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = MISSING,
    ) -> Any:
        """A reply field of the expected type (absent: ``default``, when given), else a protocol error."""
        try:
            return Protocol.field(command, result, key, kind, default, source=SOURCE)
        except QMPProtocolError as exc:
            raise self._broke(exc) from None

    def data(self, command: str, result: Any, key: str) -> bytes:
        """A base64 field of a reply, decoded; anything but base64 is a protocol error."""
        try:
            return base64.b64decode(self.field(command, result, key, str, ""), validate=True)
        except binascii.Error:
            error = QMPProtocolError(
                f"the {SOURCE} answered {command} with {key} that is not base64"
            )
            raise self._broke(error) from None

    def spawn(self, argv: list[str], stdin: bytes | None = None) -> int:
        """Start a command in the guest (output captured); its pid for :meth:`poll`."""
        args: dict[str, object] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        return self.field("guest-exec", self.command("guest-exec", args), "pid", int)

    def poll(self, pid: int) -> tuple[int | None, int | None, bytes, bytes] | None:
        """(exit code, signal, stdout, stderr) once the command has exited, else None."""
        status = self.command("guest-exec-status", {"pid": pid})
        if not self.field("guest-exec-status", status, "exited", bool, False):
            return None
        return (
            self.field("guest-exec-status", status, "exitcode", int, None),
            self.field("guest-exec-status", status, "signal", int, None),
            self.data("guest-exec-status", status, "out-data"),
            self.data("guest-exec-status", status, "err-data"),
        )

    def exec(
        self, argv: list[str], stdin: bytes | None = None, timeout: float = 60.0
    ) -> tuple[int, bytes, bytes]:
        """Run a command in the guest; returns (exit code, stdout, stderr)."""
        pid = self.spawn(argv, stdin)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            done = self.poll(pid)
            if done is not None:
                code, signal, out, err = done
                return (code if code is not None else -(signal or 0)), out, err
            if time.monotonic() >= deadline:
                raise QMPTimeout(f"guest command {argv[0]} did not finish within {timeout:g} s")
            time.sleep(
                delay
            )  # the agent has no completion event: guest-exec-status is the protocol
            delay = min(delay * 2, 0.2)

    CHUNK = 48 * 1024

    def file_open(self, path: str, mode: str) -> int:
        handle = self.command("guest-file-open", {"path": path, "mode": mode})
        return self.field("guest-file-open", {"handle": handle}, "handle", int)

    def file_read(
        self, handle: int, count: int, timeout: float | None = None
    ) -> tuple[bytes, bool]:
        """One chunk of an open guest file: (bytes, at the end). A reply with more than ``count`` bytes,
        or one that says it ends nowhere (no data, no eof), is a protocol error."""
        result = self.command(
            "guest-file-read", {"handle": handle, "count": count}, timeout=timeout
        )
        data = self.data("guest-file-read", result, "buf-b64")
        if len(data) > count:
            raise self._broke(
                QMPProtocolError(
                    f"the {SOURCE} answered guest-file-read with {len(data)} bytes "
                    f"for a read of {count}"
                )
            )
        eof = self.field("guest-file-read", result, "eof", bool, False)
        return data, eof or not data

    def file_write(self, handle: int, data: bytes, timeout: float | None = None) -> None:
        arguments = {"handle": handle, "buf-b64": base64.b64encode(data).decode()}
        self.command("guest-file-write", arguments, timeout=timeout)

    def file_close(self, handle: int) -> None:
        """Close a guest file handle; nothing to close once the session broke (the error says why)."""
        if not self.broken:
            self.command("guest-file-close", {"handle": handle})

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace ``path`` in the guest with ``data`` (guest-file-* calls, 48 KiB at a time)."""
        handle = self.file_open(path, "w")
        try:
            for offset in range(0, len(data), self.CHUNK) or [0]:
                self.file_write(handle, data[offset : offset + self.CHUNK])
        finally:
            self.file_close(handle)

    def read_file(self, path: str) -> bytes:
        handle = self.file_open(path, "r")
        out = bytearray()
        try:
            while True:
                data, eof = self.file_read(handle, self.CHUNK)
                out += data
                if eof:
                    return bytes(out)
        finally:
            self.file_close(handle)
