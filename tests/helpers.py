"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os

OPTION_SWITCHES = {"-drive", "-device", "-netdev", "-chardev", "-fsdev", "-object", "-machine", "-name", "-mon", "-boot", "-spice", "-cpu"}


def qemu_options(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(implied head, [(key, value)]) for an option list, parsed the way qemu parses it."""
    from qemuspec.spec.importer import split_opts

    return split_opts(text, implied="")


def option_args(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(len(argv) - 1) if argv[i] in OPTION_SWITCHES]


def _stat(pid) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read()
    except OSError:
        return None


def alive(pid) -> bool:
    """The process exists and is not a zombie (read from /proc, not through qemuspec's own helpers)."""
    stat = _stat(pid)
    return stat is not None and stat.rsplit(")", 1)[1].split()[0] != "Z"


def qemu_pids() -> set[int]:
    return {int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and "(qemu-system-x86" in (_stat(entry) or "") and alive(entry)}
