"""asyncio QMP client: the same protocol core as the blocking client, on asyncio streams.

Events come as an async iterator (``async for event in client.events()``), as callbacks, or one at a
time through ``wait_for``. A reader task sees EOF at once and fails every pending wait.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, AsyncIterator, Callable

from qemuspec.errors import QMPConnectionError, QMPTimeout
from qemuspec.qmp.protocol import NEGOTIATE, EventLog, Protocol, event_name_matches, parse_address


class AsyncQMPClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        event_log: str | None = None,
        history: int = 1000,
    ):
        self._reader = reader
        self._writer = writer
        self._protocol = Protocol()
        self._pending: dict[str, asyncio.Future] = {}
        self._listeners: list[tuple[str, Callable[[dict], object]]] = []
        self._events: collections.deque[dict] = collections.deque(maxlen=history)
        self._event_count = 0
        self._changed = asyncio.Condition()
        self._log = EventLog(event_log)
        self._closed: str | None = None
        self._greeted = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    async def connect(
        cls,
        address: str,
        timeout: float = 10.0,
        event_log: str | None = None,
        retry_until: float | None = None,
    ) -> "AsyncQMPClient":
        loop = asyncio.get_running_loop()
        family, target = parse_address(address)
        while True:
            try:
                if family == "unix":
                    reader, writer = await asyncio.open_unix_connection(target, limit=1 << 24)
                else:
                    reader, writer = await asyncio.open_connection(*target, limit=1 << 24)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if retry_until is None or loop.time() >= retry_until:
                    raise QMPConnectionError(
                        f"cannot connect to QMP at {address}: {exc.strerror}"
                    ) from None
                await asyncio.sleep(0.002)
            except OSError as exc:
                raise QMPConnectionError(f"cannot connect to QMP at {address}: {exc}") from None
        client = cls(reader, writer, event_log=event_log)
        client._task = asyncio.create_task(client._read_loop())
        try:
            try:
                await asyncio.wait_for(client._greeted.wait(), timeout)
            except asyncio.TimeoutError:
                raise QMPTimeout(
                    f"no QMP greeting within {timeout:g} s from {address}: is another client connected to this monitor?"
                ) from None
            client._raise_if_closed()
            await client.command(NEGOTIATE, timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def greeting(self) -> dict | None:
        return self._protocol.greeting

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self) -> None:
        if self._closed is None:
            self._closed = "closed by this client"
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._log.close()

    async def __aenter__(self) -> "AsyncQMPClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def command(
        self, name: str, arguments: dict | None = None, timeout: float = 30.0, **kwargs: Any
    ) -> Any:
        if kwargs:
            arguments = {**(arguments or {}), **kwargs}
        self._raise_if_closed()
        msg_id, data = self._protocol.request(name, arguments)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            self._writer.write(data)
            await self._writer.drain()
            message = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise QMPTimeout(f"QMP {name}: no reply within {timeout:g} s") from None
        except OSError as exc:
            raise QMPConnectionError(f"QMP {name}: {exc}") from None
        finally:
            self._pending.pop(msg_id, None)
        return Protocol.result(name, message)

    def on(self, name: str, callback: Callable[[dict], object]) -> Callable[[], None]:
        """Call ``callback(event)`` (a function or a coroutine function) for each ``name`` event."""
        entry = (name, callback)
        self._listeners.append(entry)
        return lambda: self._listeners.remove(entry) if entry in self._listeners else None

    @property
    def event_count(self) -> int:
        return self._event_count

    async def wait_for(
        self,
        name: str,
        timeout: float,
        predicate: Callable[[dict], bool] | None = None,
        since: int | None = None,
    ) -> dict:
        try:
            return (await asyncio.wait_for(self._next(name, predicate, since), timeout))[1]
        except asyncio.TimeoutError:
            raise QMPTimeout(f"no {name} event within {timeout:g} s") from None

    def events(self) -> AsyncIterator[dict]:
        """Every event from the moment of this call; ends when the connection closes."""
        mark = self._event_count

        async def generate(mark: int) -> AsyncIterator[dict]:
            while True:
                try:
                    mark, event = await self._next("*", None, mark)
                except QMPConnectionError:
                    return
                yield event

        return generate(mark)

    async def _next(
        self, name: str, predicate: Callable[[dict], bool] | None, since: int | None
    ) -> tuple[int, dict]:
        mark = self._event_count if since is None else since
        async with self._changed:
            while True:
                first = self._event_count - len(self._events)
                for number in range(max(mark, first), self._event_count):
                    event = self._events[number - first]
                    if event_name_matches(name, event["event"]) and (
                        predicate is None or predicate(event)
                    ):
                        return number + 1, event
                mark = self._event_count
                self._raise_if_closed(f"waiting for event {name}")
                await self._changed.wait()

    def _raise_if_closed(self, doing: str = "") -> None:
        if self._closed is not None:
            raise QMPConnectionError(
                f"QMP connection closed{' while ' + doing if doing else ''}: {self._closed}"
            )

    async def _read_loop(self) -> None:
        reason = "qemu closed the connection (EOF)"
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for message in self._protocol.feed(data):
                    await self._dispatch(message)
        except OSError as exc:
            reason = f"connection error: {exc}"
        except QMPConnectionError as exc:
            reason = str(exc)
        finally:
            if self._closed is None:
                self._closed = reason
            self._greeted.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(
                        QMPConnectionError(
                            f"the connection closed before the reply ({self._closed})"
                        )
                    )
            async with self._changed:
                self._changed.notify_all()

    async def _dispatch(self, message: dict) -> None:
        kind = Protocol.kind(message)
        if kind == "greeting":
            self._greeted.set()
        elif kind == "event":
            self._log.write(message)
            self._events.append(message)
            self._event_count += 1
            async with self._changed:
                self._changed.notify_all()
            for pattern, callback in list(self._listeners):
                if event_name_matches(pattern, message["event"]):
                    try:
                        result = callback(message)
                        if asyncio.iscoroutine(result):
                            asyncio.ensure_future(result)
                    except Exception:
                        pass
        else:
            future = self._pending.get(message.get("id", ""))
            if future is not None and not future.done():
                future.set_result(message)
