"""Progress of several machines at once: on a terminal, one live line per machine with the time spent
and the deadline, redrawn in place; elsewhere (CI, pipes) one plain line per change and nothing else;
nothing with --json or --quiet. Colour only on a terminal and never with NO_COLOR set."""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from qemuspec.settings import Settings

_COLOURS = {"ready": "32", "up to date": "32", "adopted": "32", "stopped": "32", "failed": "31"}
_DONE = ("ready", "up to date", "adopted", "stopped", "failed", "not running", "started", "recreated")


class Progress:
    def __init__(self, names: list[str], enabled: bool = True, stream: TextIO = sys.stderr,
                 live: bool | None = None, colour: bool | None = None, deadline: float | None = None,
                 settings: Settings | None = None):
        """``live``/``colour`` unset: decided from the stream and ``settings`` (TERM, NO_COLOR; by
        default the process's)."""
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
            self.status[name] = status
            if self.live:
                self._redraw()
                if self._ticker is None:
                    self._ticker = threading.Thread(target=self._tick, daemon=True)
                    self._ticker.start()
            else:
                print(f"{name}: {status}", file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        """Keep the elapsed time moving while something is still pending."""
        while not self._stop.wait(1.0):
            with self._lock:
                if all(s.startswith(_DONE) for s in self.status.values()):
                    return
                self._redraw()

    def _paint(self, status: str) -> str:
        if not self.colour:
            return status
        code = next((c for key, c in _COLOURS.items() if status.startswith(key)), None)
        return f"\x1b[{code}m{status}\x1b[0m" if code else status

    def _clock(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"  [{elapsed:.0f} s" + (f" of {self.deadline:.0f} s]" if self.deadline else "]")

    def _redraw(self) -> None:
        out = [f"\x1b[{self._drawn}A"] if self._drawn else []
        for name in self.names:
            status = self.status[name]
            clock = "" if status.startswith(_DONE) else self._clock()
            out.append(f"\r\x1b[2K{name:<{self.width}}  {self._paint(status)}{clock}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self.names)
