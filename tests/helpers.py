"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os

OPTION_SWITCHES = {"-drive", "-device", "-netdev", "-chardev", "-fsdev", "-object", "-machine", "-name", "-mon", "-boot", "-spice", "-cpu"}


def qemu_split(text: str) -> list[str]:
    """Split an option list exactly as qemu's get_opt_value does: ",," is a literal comma."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    return parts


def qemu_options(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(implied head, [(key, value)]) for an option list."""
    head, pairs = None, []
    for index, part in enumerate(qemu_split(text)):
        key, sep, value = part.partition("=")
        if not sep:
            if index == 0:
                head = part
                continue
            pairs.append((part, "on"))
        else:
            pairs.append((key, value))
    return head, pairs


def option_args(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(len(argv) - 1) if argv[i] in OPTION_SWITCHES]


def qemu_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if "(qemu-system-x86" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
                pids.add(int(entry))
    return pids
