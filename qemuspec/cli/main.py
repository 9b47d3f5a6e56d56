"""The `qemuspec` command: argument parsing and dispatch only.

Start-up must stay fast (`--help` in a few tens of milliseconds), so this module imports nothing but
argparse; each command's module, and pydantic, Jinja2 and friends behind it, load on dispatch.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_CODES = """exit codes:
  0  success
  1  runtime failure (qemu failed, a machine did not become ready, QMP error)
  2  invalid input or usage (bad definition file, unknown machine, bad arguments)"""

# command -> (module in qemuspec.cli, function, help)
COMMANDS = {
    "validate": ("spec_commands", "validate", "check definition files; exit 2 with the errors when one is invalid"),
    "render": ("spec_commands", "render", "print the qemu command line of a machine"),
    "schema": ("spec_commands", "schema", "print the JSON Schema of definition files"),
    "init": ("spec_commands", "init", "write a commented starter definition"),
    "up": ("vm_commands", "up", "start the machines of a definition file and wait until they are ready"),
    "down": ("vm_commands", "down", "stop the machines of a definition file"),
    "status": ("vm_commands", "status", "show the machines of a definition file and their state"),
    "qmp": ("vm_commands", "qmp", "send one QMP command to a running machine"),
    "logs": ("vm_commands", "logs", "print a machine's serial console log"),
}


def _add_common(parser: argparse.ArgumentParser, file_nargs: str = "?") -> None:
    parser.add_argument("file", nargs=file_nargs, default="machines/dev.toml" if file_nargs == "?" else None,
                        help="definition file (default: machines/dev.toml)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="template variable (repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qemuspec",
        description="Declarative QEMU virtual machines: definitions in TOML or YAML, validated, rendered, run through QMP.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="qemuspec 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = {name: sub.add_parser(name, help=help_, description=help_, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
         for name, (_, _, help_) in COMMANDS.items()}

    _add_common(p["validate"], file_nargs="+")
    _add_common(p["render"])
    p["render"].add_argument("--machine", "-m", help="machine name (default: every machine)")
    p["render"].add_argument("--shell", action="store_true", help="one shell-quoted line per machine, ready to paste")
    p["render"].add_argument("--state-dir", help="state directory the paths point into (default: .qemuspec beside the file)")
    p["schema"].add_argument("-o", "--output", help="write to this file instead of standard output")
    p["init"].add_argument("file", nargs="?", default="qemuspec.toml", help="file to write (default: qemuspec.toml)")
    p["init"].add_argument("--force", action="store_true", help="overwrite an existing file")

    for name in ("up", "down", "status", "logs", "qmp"):
        _add_common(p[name])
        p[name].add_argument("--state-dir", help="state directory (default: .qemuspec beside the file; env QEMUSPEC_STATE_DIR)")
    for name in ("up", "down", "status"):
        p[name].add_argument("--machine", "-m", action="append", default=[], help="only this machine (repeatable)")
    p["down"].add_argument("--timeout", type=float, help="seconds for ACPI powerdown before escalating (default: the machine's stop_timeout)")
    p["logs"].add_argument("--machine", "-m", help="machine name (default: the only machine)")
    p["logs"].add_argument("--lines", "-n", type=int, default=0, help="only the last N lines")
    p["qmp"].add_argument("--machine", "-m", help="machine name (default: the only machine)")
    p["qmp"].add_argument("qmp_command", metavar="COMMAND", help="QMP command, e.g. query-status")
    p["qmp"].add_argument("arguments", nargs="?", default=None, metavar="JSON", help="arguments as a JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module_name, func_name, _ = COMMANDS[args.command]
    try:
        import importlib

        module = importlib.import_module(f"qemuspec.cli.{module_name}")
        return int(getattr(module, func_name)(args) or 0)
    except KeyboardInterrupt:
        print("qemuspec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # every error ends as a paragraph and an exit code, never a traceback
        from qemuspec.errors import QemuspecError

        if os.environ.get("QEMUSPEC_DEBUG"):
            raise
        if isinstance(exc, QemuspecError):
            problems = getattr(exc, "problems", None) or [str(exc)]
            for number, problem in enumerate(problems):
                print(("\n" if number else "") + f"error: {problem}", file=sys.stderr)
            return exc.exit_code
        print(f"qemuspec: internal error: {type(exc).__name__}: {exc} (set QEMUSPEC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
