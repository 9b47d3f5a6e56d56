"""Progress of several machines at once, on stderr and only while it is live; each outcome is printed
once, on stdout, by the command (the output contract: `down >f 2>&1` shows "dev: stopped" once).

On a terminal: one live line per machine with what it waits on (the readiness probe), the time spent
and the deadline, and the machine's last console line (escaped), redrawn in place and erased when the
command ends. Elsewhere (CI, pipes): one plain line per change of what a machine waits on, nothing for
outcomes, and a heartbeat every 30 s while something is still waiting, so a long wait is never silent.
Nothing with --json or --quiet. Colour only on a terminal and never with NO_COLOR set."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from qemuspec.settings import Settings

HEARTBEAT = 30.0  # seconds between "still waiting" lines off a terminal
_COLOURS = {"ready": "32", "up to date": "32", "adopted": "32", "stopped": "32", "failed": "31"}
_DONE = (
    "ready",
    "up to date",
    "adopted",
    "stopped",
    "failed",
    "not running",
    "started",
    "recreated",
    "restarted",
    "changed live",
    "needs restart",
)


def done(status: str) -> bool:
    """Whether ``status`` is an outcome (the command prints those on stdout) rather than progress."""
    return status.startswith(_DONE)


class Progress:
    def __init__(
        self,
        names: list[str],
        enabled: bool = True,
        stream: TextIO = sys.stderr,
        live: bool | None = None,
        colour: bool | None = None,
        deadline: float | None = None,
        settings: Settings | None = None,
        consoles: dict[str, str] | None = None,
        heartbeat: float = HEARTBEAT,
    ):
        """``live``/``colour`` unset: decided from the stream and ``settings`` (TERM, NO_COLOR; by
        default the process's). ``consoles``: machine -> its console log, whose last line the live
        line and the heartbeat show."""
        self.stream = stream
        self.enabled = enabled
        if live is None or colour is None:
            from qemuspec.settings import current

            settings = settings or current()
            live = stream.isatty() and settings.term != "dumb" if live is None else live
            colour = not settings.no_color if colour is None else colour
        self.live = enabled and live
        self.colour = self.live and colour
        self.deadline = deadline
        self.names = list(names)
        self.status = {name: "pending" for name in names}
        self.width = max((len(n) for n in names), default=4)
        self.started = time.monotonic()
        self.consoles = dict(consoles or {})
        self.heartbeat = heartbeat
        self._lock = threading.Lock()
        self._drawn = 0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    def __call__(self, name: str, status: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if name not in self.status:
                self.names.append(name)
                self.width = max(self.width, len(name))
            changed = self.status.get(name) != status
            self.status[name] = status
            if self.live:
                self._redraw()
            elif changed and not done(status):  # outcomes are the command's, on stdout
                print(f"{name}: {status}", file=self.stream, flush=True)
            if self._ticker is None and not done(status):
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()

    def close(self) -> None:
        """The command is done waiting: stop the clock and erase the live lines (the outcomes follow
        on stdout, once)."""
        self._stop.set()
        with self._lock:
            if self.live and self._drawn:
                self.stream.write(f"\x1b[{self._drawn}A\r\x1b[J")
                self.stream.flush()
                self._drawn = 0
            self.live = False
            self.enabled = False

    def _tick(self) -> None:
        """Keep the elapsed time moving on a terminal (every second); off a terminal, a heartbeat line
        every ``heartbeat`` seconds while something is still waiting."""
        interval = 1.0 if self.live else self.heartbeat
        while not self._stop.wait(interval):
            with self._lock:
                if not self.enabled or all(done(s) for s in self.status.values()):
                    self._ticker = None
                    return
                if self.live:
                    self._redraw()
                else:
                    for name in self.names:
                        status = self.status[name]
                        if done(status) or status == "pending":
                            continue
                        last = self._last_line(name)
                        seen = f"; last console line: {last}" if last else ""
                        print(
                            f"{name}: still {status} ({self._elapsed()}){seen}",
                            file=self.stream,
                            flush=True,
                        )

    def _last_line(self, name: str) -> str:
        """The last non-empty console line of a machine, escaped (it is the guest's), or ""."""
        path = self.consoles.get(name)
        if not path:
            return ""
        from qemuspec.cli.escape import printable
        from qemuspec.runtime.statedir import read_from

        try:
            import os

            size = os.path.getsize(path)
            data = read_from(path, max(0, size - 4096)) or b""
        except OSError:
            return ""
        lines = [
            line.strip()
            for line in data.decode(errors="replace").replace("\r", "\n").split("\n")
            if line.strip()
        ]
        return printable(lines[-1])[:400] if lines else ""

    def _paint(self, status: str) -> str:
        if not self.colour:
            return status
        code = next((c for key, c in _COLOURS.items() if status.startswith(key)), None)
        return f"\x1b[{code}m{status}\x1b[0m" if code else status

    def _elapsed(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{elapsed:.0f} s" + (f" of {self.deadline:.0f} s" if self.deadline else "")

    def _clock(self) -> str:
        return f"  [{self._elapsed()}]"

    def _redraw(self) -> None:
        columns = shutil.get_terminal_size((100, 24)).columns
        out = [f"\x1b[{self._drawn}A"] if self._drawn else []
        for name in self.names:
            status = self.status[name]
            finished = done(status)
            clock = "" if finished else self._clock()
            text = f"{name:<{self.width}}  {status}{clock}"
            last = "" if finished else self._last_line(name)
            if last:
                text += f"  | {last}"
            text = text[: max(20, columns - 1)]  # one screen line each, or the redraw goes astray
            if self.colour and text.startswith(f"{name:<{self.width}}  {status}"):
                head = f"{name:<{self.width}}  "
                text = head + self._paint(status) + text[len(head) + len(status) :]
            out.append(f"\r\x1b[2K{text}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self.names)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class DownloadProgress:
    """Image downloads (imagecache events): on a terminal a bar with bytes, rate and ETA redrawn in
    place on stderr; elsewhere one line when a download starts and one when it ends; with --json one
    JSON object per event on stderr (stdout keeps the command's own result); nothing with --quiet."""

    def __init__(self, mode: str, stream: TextIO | None = None, width: int = 30):
        self.mode = mode  # "live", "lines", "json" or "quiet"
        self.stream = stream or sys.stderr
        self.width = width
        self._open = False

    def __call__(self, event: dict) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "json":
            import json

            self.stream.write(json.dumps(event) + "\n")
            self.stream.flush()
            return
        kind = event["event"]
        name = event["url"].rsplit("/", 1)[-1] or event["url"]
        if kind == "image-download":
            if self.mode == "live":
                self._bar(name, event)
            elif event["bytes"] == (event.get("resumed_at") or 0) and not event.get("finished"):
                total = f" ({_size(event['total'])})" if event.get("total") else ""
                resumed = (
                    f", resuming at {_size(event['resumed_at'])}" if event.get("resumed_at") else ""
                )
                self._line(f"downloading {event['url']}{total}{resumed}")
            elif event.get("finished"):
                self._line(
                    f"downloaded {name}: {_size(event['bytes'])} at {_size(event['rate'])}/s"
                )
        elif kind == "image-waiting":
            self._line(f"{name}: waiting for another qemuspec downloading it")
        elif kind == "image-unpack":
            self._line(f"unpacking {name} ({event['compression']})")
        elif kind == "image-done":
            self._line(f"{name}: in the cache ({event['digest'][:19]}...)")

    def _line(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def _bar(self, name: str, event: dict) -> None:
        done, total, rate = event["bytes"], event.get("total"), event.get("rate") or 0.0
        if total:
            filled = int(self.width * min(done / total, 1.0))
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {_size(done)} / {_size(total)}"
            left = (total - done) / rate if rate > 0 else None
            eta = (
                ""
                if event.get("finished")
                else f"  ETA {left:.0f} s"
                if left is not None
                else "  ETA ?"
            )
        else:
            bar, eta = _size(done), ""
        self.stream.write(f"\r\x1b[2K{name}  {bar}  {_size(rate)}/s{eta}")
        self.stream.flush()
        self._open = True
        if event.get("finished"):
            self.stream.write("\n")
            self._open = False
