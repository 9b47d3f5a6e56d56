"""`qemuspec help COMMAND` and `qemuspec man`: the manual page, written from the parser itself (the
commands, their options and help texts, the examples, the environment and the exit codes), so it can
never say something `--help` does not. `man/qemuspec.1` is this output, shipped (a test keeps it
equal)."""

from __future__ import annotations

import argparse
import sys

from qemuspec.cli.common import Context


def help_(ctx: Context, *, topic: list[str]) -> int:
    """Help on a command (`qemuspec help up` is `qemuspec up --help`); parse() answers it first, this
    is the same for a caller that dispatches here."""
    from qemuspec.cli.parser import parse

    parse([*topic, "--help"])
    return 0


def _roff(text: str) -> str:
    """Text as roff reads it: backslashes doubled, a leading dot or quote guarded, dashes literal."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        ("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            head = ", ".join(f"\\fB{_roff(s)}\\fR{_roff(value)}" for s in action.option_strings)
        else:
            head = f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
        out += [".TP", head, _roff(action.help or "")]
    return out


def _section(name: str, parser: argparse.ArgumentParser) -> list[str]:
    from qemuspec.cli.commands import COMMANDS, EXAMPLES, IMG_EXAMPLES

    lines = [f".SS {_roff(name)}", _roff(COMMANDS.get(name, ("", "", parser.description or ""))[2])]
    lines += [".PP", f"\\fB{_roff(parser.format_usage().strip().removeprefix('usage: '))}\\fR"]
    lines += _options(parser)
    action = name.split(" ", 1)[1] if name.startswith("img ") else None
    examples = IMG_EXAMPLES.get(action, []) if action else EXAMPLES.get(name, [])
    if examples:
        lines += [".PP", "Examples:", ".RS", ".nf", *(_roff(e) for e in examples), ".fi", ".RE"]
    return lines


def page() -> str:
    """The whole manual page, in roff (man(7))."""
    from qemuspec.cli.commands import COMMANDS, EXAMPLES, EXIT_CODES
    from qemuspec.cli.parser import build_parser
    from qemuspec.settings import VARIABLES

    top, subs = build_parser()
    lines = [
        '.TH QEMUSPEC 1 "" "qemuspec 0.1.0" "User Commands"',
        ".SH NAME",
        "qemuspec \\- declarative QEMU virtual machines",
        ".SH SYNOPSIS",
        f"\\fB{_roff(top.usage or 'qemuspec')}\\fR",
        ".SH DESCRIPTION",
        _roff(top.description or ""),
        ".SH COMMANDS",
    ]
    for name in COMMANDS:
        lines += _section(name, subs[name])
        if name == "img":
            for action in subs["img"]._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
                lines += _section(f"img {action[0]}", action[1])
    lines += [".SH EXAMPLES", ".nf", *(_roff(e) for e in EXAMPLES[""]), ".fi"]
    lines += [".SH ENVIRONMENT"]
    for var, what in VARIABLES.items():
        lines += [".TP", f"\\fB{_roff(var)}\\fR", _roff(what)]
    lines += [".SH EXIT STATUS", ".nf", _roff(EXIT_CODES.split("\n", 1)[1]), ".fi"]
    lines += [".SH SEE ALSO", "\\fBqemu\\-system\\-x86_64\\fR(1), \\fBqemu\\-img\\fR(1)"]
    return "\n".join(lines) + "\n"


def man(ctx: Context, *, output: str | None) -> int:
    text = page()
    if output:
        with open(output, "w") as f:
            f.write(text)
        if ctx.out.json:
            ctx.out.line({"wrote": output})
        else:
            ctx.out.note(f"wrote {output}")
        return 0
    if ctx.out.json:
        ctx.out.line({"page": text})
        return 0
    sys.stdout.write(text)
    return 0
