"""Guest text made inert for a terminal: a leaf (it imports only re), so the grammar (cli/common.py)
and the progress lines (cli/progress.py) escape the guest the same way without importing each other."""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, and C1 controls (CSI, OSC... as single characters)
_CONTROLS = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"


def printable(text: str) -> str:
    """Guest-controlled text made inert for a terminal: every control character but tab and newline
    (ESC of ``ESC[2J``, BEL ending an OSC title, C1 CSI) as ``\\xNN``, so a guest can neither query,
    retitle nor clear the terminal of whoever reads its console."""
    return re.sub(_CONTROLS, lambda m: f"\\x{ord(m.group()):02x}", text)
