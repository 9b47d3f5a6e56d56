"""qemu's command-line syntax, as qemu itself reads it: shell words, options and their arguments,
and option lists (``key=value,...`` with ``,,`` for a comma).

A leaf module (it imports nothing from the spec layer) because three layers read qemu's syntax: the
importer (argv -> definition), the passthrough checks on ``append`` that model validation runs, and
the renderer (dropping overridden switches). Living in the importer, it tied models, passthrough and
importer into an import cycle.
"""

from __future__ import annotations

import re
import shlex

from qemuspec.errors import SpecError

# qemu 7.2's options that take no argument (qemu-options.hx: DEF(..., 0, ...)), and older ones that
# real scripts still carry. Every other option takes one argument.
NO_ARG = {
    "h",
    "help",
    "version",
    "mem-prealloc",
    "audio-help",
    "snapshot",
    "usb",
    "nographic",
    "full-screen",
    "portrait",
    "win2k-hack",
    "no-fd-bootchk",
    "no-acpi",
    "no-hpet",
    "enable-kvm",
    "xen-attach",
    "xen-domid-restrict",
    "S",
    "s",
    "nodefaults",
    "no-reboot",
    "no-shutdown",
    "daemonize",
    "enable-fips",
    "only-migratable",
    "semihosting",
    "preconfig",
    "no-user-config",
    "nodefconfig",
    "old-param",
    "alt-grab",
    "ctrl-grab",
    "sdl",
    "curses",
    "no-quit",
    "no-frame",
    "singlestep",
    "rtc-td-hack",
    "localtime",
    "std-vga",
    "vmwarevga",
    "no-kvm",
    "no-kvm-irqchip",
    "no-kvm-pit",
    "no-kvm-pit-reinjection",
    "enable-nesting",
    "no-kqemu",
    "kernel-kqemu",
    "tdf",
    "async-teardown",
    "no-virtio-balloon",
}


def split_command(text: str) -> list[str]:
    """A shell command line as a file holds it (continuation backslashes, comments)."""
    text = re.sub(r"\\\n", " ", text)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    try:
        return shlex.split("\n".join(lines))
    except ValueError as exc:
        raise SpecError(
            f"the command line cannot be read as a shell command ({exc}): check its quotes"
        ) from None


def parse_argv(argv: list[str], strict: bool = False) -> list[tuple[str, str | None]]:
    """[(option without dash, argument or None)] in order; argv[0] (the binary) excluded. A bare
    word is qemu's -hda shorthand (option ""). ``strict``: an option missing its value is an error
    (else it is returned with None)."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            out.append(("", token))
            i += 1
            continue
        name = token[2:] if token.startswith("--") else token[1:]
        if i + 1 >= len(argv) and strict and name not in NO_ARG:
            raise SpecError(
                f"{token} needs a value (it is the last word of the command line): add it, or remove {token}"
            )
        if name in NO_ARG or i + 1 >= len(argv):
            out.append((name, None))
            i += 1
        else:
            out.append((name, argv[i + 1]))
            i += 2
    return out


def split_opts(text: str, implied: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """qemu's option-list syntax: ",," is a comma; a first item without "=" is the implied key."""
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
    head, pairs = None, []
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep and index == 0 and implied is not None:
            head = part
        elif not sep:
            pairs.append((part, "on"))
        else:
            pairs.append((key, value))
    return head, pairs
