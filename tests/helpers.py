"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os

OPTION_SWITCHES = {"-drive", "-device", "-netdev", "-chardev", "-fsdev", "-object", "-machine", "-name", "-mon", "-boot", "-spice", "-cpu"}


def qemu_options(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(implied head, [(key, value)]) for an option list, parsed the way qemu parses it."""
    from qemuspec.spec.qemuopts import split_opts

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


def _cmdline(pid) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def qemu_pids(scope) -> set[int]:
    """The live qemu processes whose command line names a path inside ``scope`` (the test's tmp_path or
    project directory: every qemu qemuspec starts gets ``-pidfile`` under its state directory), so a
    test counts its own qemu and never the demo's or another run's on the same host."""
    root = os.path.abspath(os.fspath(scope)).rstrip(os.sep)
    inside = root + os.sep

    def names_scope(arg: str) -> bool:
        return inside in arg or arg == root or arg.endswith("=" + root)

    return {int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and "(qemu-system-x86" in (_stat(entry) or "") and alive(entry)
            and any(names_scope(arg) for arg in _cmdline(entry))}


def shipped_definitions() -> list[str]:
    """The definition files shipped in machines/ (not what running them leaves there, such as the
    demo's .qemuspec/ state directory)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "machines")
    return [os.path.join(root, name) for name in sorted(os.listdir(root))
            if name.endswith((".toml", ".yaml", ".yml")) and os.path.isfile(os.path.join(root, name))]
