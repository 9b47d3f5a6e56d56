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
