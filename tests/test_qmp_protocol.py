"""QMP client edge cases against a scripted fake peer (protocol behaviour only; lifecycle tests use
real qemu)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from qemuspec.errors import QMPConnectionError, QMPError, QMPTimeout
from qemuspec.qmp.aio import AsyncQMPClient
from qemuspec.qmp.protocol import Protocol
from qemuspec.qmp.sync import QMPClient

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


class FakeQemu:
    """Accepts one client on a unix socket and answers from a script: a function(message) -> list of
    messages to send back (or None to hang up)."""

    def __init__(self, path: str, script):
        self.path = path
        self.script = script
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen(1)
        self.received: list[dict] = []
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, message: dict) -> None:
        assert self.conn is not None
        self.conn.sendall(json.dumps(message).encode() + b"\r\n")

    def _run(self) -> None:
        self.conn, _ = self.server.accept()
        self.send(GREETING)
        buffer = b""
        while True:
            data = self.conn.recv(65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                self.received.append(message)
                replies = self.script(message)
                if replies is None:
                    self.conn.shutdown(socket.SHUT_RDWR)
                    self.conn.close()
                    return
                for reply in replies:
                    self.send(reply)

    def close(self) -> None:
        self.server.close()
        if self.conn:
            self.conn.close()


def answer(message: dict, value=None):
    return [{"return": {} if value is None else value, "id": message.get("id")}]


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "qmp.sock")


def test_commands_return_values_and_errors_carry_class_and_desc(sock_path):
    def script(m):
        if m["execute"] == "query-status":
            return answer(m, {"status": "running", "running": True})
        if m["execute"] == "bad":
            return [
                {
                    "error": {
                        "class": "CommandNotFound",
                        "desc": "The command bad has not been found",
                    },
                    "id": m["id"],
                }
            ]
        return answer(m)

    peer = FakeQemu(sock_path, script)
    with QMPClient.connect(f"unix:{sock_path}", timeout=5) as client:
        assert client.greeting["version"]["qemu"]["major"] == 7
        assert client.command("query-status") == {"status": "running", "running": True}
        with pytest.raises(QMPError) as info:
            client.command("bad")
        assert (
            info.value.error_class == "CommandNotFound" and "has not been found" in info.value.desc
        )
    assert peer.received[0]["execute"] == "qmp_capabilities"
    peer.close()


def test_replies_are_matched_by_id_even_out_of_order(sock_path):
    held = []

    def script(m):
        if m["execute"] == "slow":
            held.append(m)
            return []
        replies = answer(m, "fast")
        if held:
            replies += answer(held.pop(), "slow")
        return replies

    peer = FakeQemu(sock_path, script)
    with QMPClient.connect(f"unix:{sock_path}", timeout=5) as client:
        results = {}
        t = threading.Thread(
            target=lambda: results.setdefault("slow", client.command("slow", timeout=5))
        )
        t.start()
        while not held:
            threading.Event().wait(0.001)
        assert client.command("fast", timeout=5) == "fast"
        t.join(5)
        assert results["slow"] == "slow"
    peer.close()


def test_eof_fails_a_pending_command_at_once_not_at_its_timeout(sock_path):
    peer = FakeQemu(sock_path, lambda m: answer(m) if m["execute"] == "qmp_capabilities" else None)
    client = QMPClient.connect(f"unix:{sock_path}", timeout=5)
    closed = threading.Event()
    client.on_close(closed.set)
    with pytest.raises(QMPConnectionError, match="EOF|closed"):
        client.command("query-status", timeout=3600)  # a timeout would raise QMPTimeout instead
    assert closed.wait(5)
    with pytest.raises(QMPConnectionError):
        client.wait_for("SHUTDOWN", timeout=3600)
    client.close()
    peer.close()


def test_reply_timeout(sock_path):
    peer = FakeQemu(sock_path, lambda m: answer(m) if m["execute"] == "qmp_capabilities" else [])
    with QMPClient.connect(f"unix:{sock_path}", timeout=5) as client:
        with pytest.raises(QMPTimeout):
            client.command("never", timeout=0.05)
    peer.close()


def test_no_greeting_times_out(tmp_path):
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    with pytest.raises(QMPTimeout, match="greeting"):
        QMPClient.connect(f"unix:{path}", timeout=0.2)
    server.close()


def test_garbage_is_a_connection_error(sock_path):
    peer = FakeQemu(sock_path, lambda m: answer(m))
    client = QMPClient.connect(f"unix:{sock_path}", timeout=5)
    closed = threading.Event()
    client.on_close(closed.set)
    peer.conn.sendall(b"this is not json\n")
    assert closed.wait(5)
    with pytest.raises(QMPConnectionError, match="not QMP"):
        client.command("query-status")
    client.close()
    peer.close()


def test_events_listeners_waiters_iterator_and_log(sock_path, tmp_path):
    log = str(tmp_path / "events.jsonl")

    def script(m):
        if m["execute"] == "emit":
            return [
                {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}},
                {"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 0}},
            ] + answer(m)
        return answer(m)

    peer = FakeQemu(sock_path, script)
    seen, all_seen = [], []
    with QMPClient.connect(f"unix:{sock_path}", timeout=5, event_log=log) as client:
        client.on("STOP", seen.append)
        client.on("*", all_seen.append)
        mark = client.event_count
        client.command("emit")
        assert client.wait_for("RESUME", timeout=5, since=mark)["event"] == "RESUME"
        assert client.wait_for("STOP", timeout=5, since=mark)["event"] == "STOP", (
            "events before the wait count with since="
        )
        iterator = client.events(timeout=5)
        client.command("emit")
        assert [next(iterator)["event"], next(iterator)["event"]] == ["STOP", "RESUME"]
    assert [e["event"] for e in seen] == ["STOP", "STOP"]
    assert [e["event"] for e in all_seen] == ["STOP", "RESUME", "STOP", "RESUME"]
    with open(log) as f:
        assert [json.loads(line)["event"] for line in f] == ["STOP", "RESUME", "STOP", "RESUME"]
    peer.close()


def test_async_face_same_behaviour(sock_path):
    def script(m):
        if m["execute"] == "emit":
            return [
                {"event": "POWERDOWN", "timestamp": {"seconds": 1, "microseconds": 0}}
            ] + answer(m, 7)
        if m["execute"] == "bad":
            return [{"error": {"class": "GenericError", "desc": "nope"}, "id": m["id"]}]
        if m["execute"] == "die":
            return None
        return answer(m)

    peer = FakeQemu(sock_path, script)

    async def main():
        client = await AsyncQMPClient.connect(f"unix:{sock_path}", timeout=5)
        received = []
        client.on("POWERDOWN", received.append)
        events = client.events()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0)
        assert await client.command("emit") == 7
        assert (await asyncio.wait_for(first, 5))["event"] == "POWERDOWN"
        assert received and received[0]["event"] == "POWERDOWN"
        with pytest.raises(QMPError, match="nope"):
            await client.command("bad")
        with pytest.raises(QMPConnectionError):
            await client.command("die", timeout=3600)
        await client.close()

    asyncio.run(main())
    peer.close()


def test_protocol_frames_split_across_reads():
    protocol = Protocol()
    assert protocol.feed(b'{"QMP": {"version": {}, "capa') == []
    assert protocol.feed(b'bilities": []}}\r\n{"return": {}, "id": "q1"}\n') == [
        {"QMP": {"version": {}, "capabilities": []}},
        {"return": {}, "id": "q1"},
    ]
    assert protocol.greeting == {"version": {}, "capabilities": []}
    msg_id, data = protocol.request("query-status")
    assert json.loads(data) == {"execute": "query-status", "id": msg_id}
