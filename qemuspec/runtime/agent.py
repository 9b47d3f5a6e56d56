"""The qemu guest agent, spoken over the machine's virtio-serial channel (a unix socket on the host).

The agent has no greeting and may have stale bytes in the channel, so every session starts with
``guest-sync-delimited``: the 0xFF it echoes marks where our replies begin.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from typing import Any

from qemuspec.errors import QMPConnectionError, QMPTimeout
from qemuspec.qmp.protocol import Protocol


class GuestAgent:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise QMPConnectionError(f"cannot reach the guest agent channel {self.path}: {exc}") from None
        self._sock = sock
        token = random.randint(1, 2**31)
        sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode() + b"\n")
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
            raise QMPConnectionError(f"the guest agent channel closed ({exc.strerror or exc})") from None
        if not data:
            raise QMPConnectionError("the guest agent channel closed")
        self._buffer += data

    def _line(self, deadline: float) -> dict:
        while b"\n" not in self._buffer:
            self._fill(deadline)
        line, self._buffer = self._buffer.split(b"\n", 1)
        line = line.strip().lstrip(b"\xff")
        return json.loads(line) if line else self._line(deadline)

    def command(self, name: str, arguments: dict | None = None, timeout: float | None = None) -> Any:
        if self._sock is None:
            self.sync()
        assert self._sock is not None
        try:
            self._sock.sendall(Protocol.command_text(name, arguments).encode() + b"\n")
        except OSError as exc:
            raise QMPConnectionError(f"the guest agent channel closed ({exc.strerror or exc})") from None
        reply = self._line(time.monotonic() + (timeout or self.timeout))
        return Protocol.result(name, reply, source="guest agent")

    def exec(self, argv: list[str], stdin: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run a command in the guest; returns (exit code, stdout, stderr)."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.command("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            status = self.command("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data", ""))
                err = base64.b64decode(status.get("err-data", ""))
                code = status.get("exitcode", -status.get("signal", 0) or 0)
                return code, out, err
            if time.monotonic() >= deadline:
                raise QMPTimeout(f"guest command {argv[0]} did not finish within {timeout:g} s")
            time.sleep(delay)  # the agent has no completion event: guest-exec-status is the protocol
            delay = min(delay * 2, 0.2)

    CHUNK = 48 * 1024

    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace ``path`` in the guest with ``data`` (guest-file-* calls, 48 KiB at a time)."""
        handle = self.command("guest-file-open", {"path": path, "mode": "w"})
        try:
            for offset in range(0, len(data), self.CHUNK) or [0]:
                chunk = data[offset : offset + self.CHUNK]
                self.command("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()})
        finally:
            self.command("guest-file-close", {"handle": handle})

    def read_file(self, path: str) -> bytes:
        handle = self.command("guest-file-open", {"path": path, "mode": "r"})
        out = bytearray()
        try:
            while True:
                result = self.command("guest-file-read", {"handle": handle, "count": self.CHUNK})
                out += base64.b64decode(result.get("buf-b64", ""))
                if result.get("eof") or not result.get("count"):
                    return bytes(out)
        finally:
            self.command("guest-file-close", {"handle": handle})

