"""``ready.serial`` patterns, matched against what a guest prints on its console.

The console is hostile input and the pattern comes from a definition: with a backtracking engine a
pattern like ``(a+)+$`` against a long line of ``a`` runs for hours inside one C call, where no
deadline and no signal handler can run (the audit hung a supervisor past its timeout and past
SIGTERM). So patterns compile with RE2 (PyPI ``google-re2``), whose matching time is linear in the
text, and are matched line by line as lines arrive (each line once, cut at :data:`LINE` bytes), so
the work per console byte is bounded whatever the pattern. RE2 has no backreferences or lookaround;
``validate`` says so for a pattern that needs them.
"""

from __future__ import annotations

from typing import Any

LINE = 4096  # bytes of one console line matched at once; longer lines are matched in pieces


def compile_serial(pattern: str) -> Any:
    """The compiled pattern (``^``/``$`` match at each line), or ValueError saying why not."""
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(b"(?m)" + pattern.encode(), options)
    except re2.error as exc:
        why = (
            exc.args[0].decode(errors="replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        raise ValueError(
            f"not a valid regular expression ({why}; patterns are RE2, matched in linear time, "
            "so backreferences and lookaround are not available)"
        ) from None


class LineMatcher:
    """Feed console bytes in; :meth:`feed` returns the first match in a line, each complete line
    searched once and the line still arriving searched as it grows (a prompt has no newline)."""

    def __init__(self, pattern: str):
        self.regex = compile_serial(pattern)
        self._partial = b""

    def feed(self, data: bytes) -> Any:
        *lines, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) > LINE:
            lines.append(self._partial[:LINE])
            self._partial = self._partial[LINE:]
        for line in lines:
            for start in range(0, max(len(line), 1), LINE):
                match = self.regex.search(line[start : start + LINE].removesuffix(b"\r"))
                if match:
                    return match
        return self.regex.search(self._partial.removesuffix(b"\r")) if self._partial else None
