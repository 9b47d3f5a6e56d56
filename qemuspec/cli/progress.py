"""Progress of several machines at once: one live line per machine on a terminal, plain lines
otherwise, nothing with --json. Colour only on a terminal and never with NO_COLOR set."""

from __future__ import annotations

import os
import sys
import threading
from typing import TextIO

_COLOURS = {"ready": "32", "up to date": "32", "adopted": "32", "stopped": "32", "failed": "31"}


class Progress:
    def __init__(self, names: list[str], enabled: bool = True, stream: TextIO = sys.stderr):
        self.stream = stream
        self.enabled = enabled
        self.live = enabled and stream.isatty() and os.environ.get("TERM") != "dumb"
        self.colour = self.live and "NO_COLOR" not in os.environ
        self.names = list(names)
        self.status = {name: "pending" for name in names}
        self.width = max((len(n) for n in names), default=4)
        self._lock = threading.Lock()
        self._drawn = 0

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
            else:
                print(f"{name}: {status}", file=self.stream, flush=True)

    def _paint(self, status: str) -> str:
        if not self.colour:
            return status
        code = next((c for key, c in _COLOURS.items() if status.startswith(key)), None)
        return f"\x1b[{code}m{status}\x1b[0m" if code else status

    def _redraw(self) -> None:
        out = [f"\x1b[{self._drawn}A"] if self._drawn else []
        for name in self.names:
            out.append(f"\r\x1b[2K{name:<{self.width}}  {self._paint(self.status[name])}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self.names)
