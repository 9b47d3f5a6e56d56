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
    "up": ("vm_commands", "up", "start what is missing or changed, wait until every machine is ready"),
    "down": ("vm_commands", "down", "stop machines in reverse dependency order"),
    "status": ("vm_commands", "status", "show each machine's state, pid, uptime, restarts and ports"),
    "ps": ("vm_commands", "status", "same as status"),
    "plan": ("vm_commands", "plan", "show what `up` would do, with the argv diff of changed machines"),
    "logs": ("vm_commands", "logs", "print serial console logs (or events with --events)"),
    "events": ("vm_commands", "events", "print a machine's QMP and lifecycle events (JSON lines)"),
    "console": ("vm_commands", "console", "attach to a machine's serial console (detach: Ctrl-])"),
    "qmp": ("vm_commands", "qmp", "send one QMP command to a running machine"),
    "pause": ("vm_commands", "pause", "pause machines' CPUs"),
    "resume": ("vm_commands", "resume", "resume paused machines"),
    "restart": ("vm_commands", "restart", "stop and start machines again"),
    "exec": ("guest_commands", "exec_", "run a command in a guest through its guest agent"),
    "cp": ("guest_commands", "cp", "copy a file to or from a guest (NAME:/path) through its guest agent"),
    "ssh": ("guest_commands", "ssh", "ssh into a guest with the state directory's key"),
    "reset": ("guest_commands", "reset", "recreate a stopped machine's overlay disks from their base"),
    "snapshot": ("guest_commands", "snapshot", "save, load, list or delete snapshots of a running machine"),
    "import": ("spec_commands", "import_", "turn a qemu command line into a definition (nothing dropped)"),
    "img": ("img_commands", "img", "disk images: create, info, convert, resize, snapshot, check, rebase"),
}

FILE_HELP = "definition file (default: $QEMUSPEC_FILE, else qemuspec.toml, qemuspec.yaml or machines/dev.toml)"


def _file_arg(parser: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        parser.add_argument("file", nargs="?", help=FILE_HELP)
    else:
        parser.add_argument("--file", "-F", dest="file", help=FILE_HELP)
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="template variable (repeatable)")
    parser.add_argument("--state-dir", help="state directory (default: .qemuspec beside the file; env QEMUSPEC_STATE_DIR)")


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
    for name in p:
        if name not in ("schema", "init", "ssh", "img", "import"):
            p[name].add_argument("--json", action="store_true", help="machine-readable output")

    p["validate"].add_argument("file", nargs="+", help="definition files")
    p["validate"].add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="template variable (repeatable)")
    p["validate"].add_argument("--probe", action="store_true", help="also check machine types, CPUs, devices, properties and options against the qemu binary (cached)")
    _file_arg(p["render"], positional=True)
    p["render"].add_argument("--machine", "-m", help="machine name (default: every machine)")
    p["render"].add_argument("--shell", action="store_true", help="one shell-quoted line per machine, ready to paste")
    p["render"].add_argument("--format", choices=["argv", "libvirt"], default="argv", help="argv (default), or libvirt domain XML")
    p["schema"].add_argument("-o", "--output", help="write to this file instead of standard output")
    p["init"].add_argument("file", nargs="?", default="qemuspec.toml", help="file to write (default: qemuspec.toml)")
    p["init"].add_argument("--force", action="store_true", help="overwrite an existing file")

    for name in ("up", "down", "status", "ps", "plan"):
        _file_arg(p[name], positional=True)
        p[name].add_argument("--machine", "-m", action="append", default=[], help="only this machine (repeatable)")
    p["up"].add_argument("--no-probe", action="store_true", help="skip checking the definition against the qemu binary")
    p["up"].add_argument("--attach", action="store_true", help="stay in the foreground streaming consoles and events; Ctrl-C brings the machines down")
    for name in ("up", "validate"):
        p[name].add_argument("--allow-local-qemu", action="store_true",
                             help="run a qemu binary that lives inside the definition's own tree (only for a qemu you built)")
    p["down"].add_argument("--timeout", type=float, help="seconds for ACPI powerdown before escalating (default: each machine's stop_timeout)")
    p["down"].add_argument("--purge", action="store_true", help="also delete disks qemuspec created and the state directory")

    for name in ("logs", "events", "console", "qmp", "pause", "resume", "restart"):
        _file_arg(p[name], positional=False)
    p["logs"].add_argument("name", nargs="?", help="machine (default: all)")
    p["logs"].add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows")
    p["logs"].add_argument("--events", action="store_true", help="print events instead of the console")
    p["logs"].add_argument("--lines", "-n", type=int, default=0, help="only the last N lines")
    p["events"].add_argument("name", help="machine")
    p["events"].add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p["console"].add_argument("name", help="machine")
    p["qmp"].add_argument("name", help="machine")
    p["qmp"].add_argument("qmp_command", metavar="COMMAND", help="QMP command, e.g. query-status")
    p["qmp"].add_argument("arguments", nargs="?", default=None, metavar="JSON", help="arguments as a JSON object")
    for name in ("pause", "resume", "restart"):
        p[name].add_argument("names", nargs="+", metavar="NAME", help="machines")
    for name in ("exec", "cp", "ssh", "reset", "snapshot"):
        _file_arg(p[name], positional=False)
    p["exec"].add_argument("name", help="machine")
    p["exec"].add_argument("argv", nargs="*", metavar="-- COMMAND", help="command and arguments")
    p["exec"].add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p["cp"].add_argument("source", help="LOCAL or NAME:/guest/path")
    p["cp"].add_argument("target", help="LOCAL or NAME:/guest/path")
    p["ssh"].add_argument("name", help="machine")
    p["ssh"].add_argument("argv", nargs="*", metavar="-- COMMAND", help="remote command (default: a shell)")
    p["reset"].add_argument("names", nargs="+", metavar="NAME", help="machines (stopped)")
    p["snapshot"].add_argument("action", choices=["save", "load", "list", "delete"])
    p["snapshot"].add_argument("name", help="machine")
    p["snapshot"].add_argument("tag", nargs="?", help="snapshot name (save, load, delete)")

    p["import"].add_argument("argv", nargs="*", metavar="-- QEMU ARGS", help="the command line, after --")
    p["import"].add_argument("--from", dest="source", metavar="FILE", help="read the command line from a file (a shell command)")
    p["import"].add_argument("--name", help="machine name (default: -name, else the binary's name)")
    p["import"].add_argument("-o", "--output", help="write this definition file (default: standard output)")
    p["import"].add_argument("--force", action="store_true", help="overwrite --output")
    p["import"].add_argument("--from-libvirt", metavar="XML", help="read a libvirt domain (what `virsh dumpxml` prints)")
    p["import"].add_argument("--check", action="store_true", help="start the original and the rendered machine paused (-S) and let qemu compare them")
    img = p["img"].add_subparsers(dest="img_command", metavar="ACTION", required=True)
    i = {a: img.add_parser(a, help=h) for a, h in (
        ("create", "create an image (never overwrites)"), ("info", "show an image's format, sizes, backing, snapshots"),
        ("convert", "convert an image to another format (progress on a terminal)"), ("resize", "grow (or --shrink) an image"),
        ("snapshot", "internal snapshots of an image not in use: list, create, apply, delete"),
        ("check", "check an image for errors"), ("rebase", "point an overlay at another backing file"))}
    i["create"].add_argument("file")
    i["create"].add_argument("size", nargs="?", help="e.g. 10G (optional with --backing)")
    i["create"].add_argument("-f", "--format", default="qcow2")
    i["create"].add_argument("-b", "--backing")
    i["create"].add_argument("-F", "--backing-format")
    i["info"].add_argument("file")
    i["info"].add_argument("--json", action="store_true")
    i["convert"].add_argument("source")
    i["convert"].add_argument("target")
    i["convert"].add_argument("-O", "--format", default="qcow2")
    i["convert"].add_argument("-c", "--compress", action="store_true")
    i["resize"].add_argument("file")
    i["resize"].add_argument("size")
    i["resize"].add_argument("--shrink", action="store_true")
    i["snapshot"].add_argument("action", choices=["list", "create", "apply", "delete"])
    i["snapshot"].add_argument("file")
    i["snapshot"].add_argument("tag", nargs="?")
    i["snapshot"].add_argument("--json", action="store_true")
    i["check"].add_argument("file")
    i["check"].add_argument("--json", action="store_true")
    i["rebase"].add_argument("file")
    i["rebase"].add_argument("-b", "--backing", required=True)
    i["rebase"].add_argument("-F", "--backing-format")
    i["rebase"].add_argument("-u", "--unsafe", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] | None = None
    if "--" in argv:  # everything after "--" is the guest command (exec, ssh), never our options
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if tail is not None:
        if not hasattr(args, "argv"):
            parser.error(f"{args.command} takes no command after --")
        args.argv = tail
    if not args.command:
        parser.print_help()
        return 2
    module_name, func_name, _ = COMMANDS[args.command]
    import warnings

    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
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
