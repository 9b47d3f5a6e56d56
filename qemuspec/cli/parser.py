"""The argument parser of every command, built from the command table (cli/commands.py).

Only the parsed command's arguments are filled in: adding them is most of the parser's build time,
and ``qemuspec --help`` must start fast. Imports argparse and the command table only.
"""

from __future__ import annotations

import argparse
import json

from qemuspec.cli.commands import COMMANDS, EXAMPLES, EXIT_CODES, IMG_EXAMPLES

FILE_HELP = "definition file, also accepted as the first operand (default: $QEMUSPEC_FILE, else qemuspec.toml, qemuspec.yaml or machines/dev.toml)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def duration(text: str) -> float:
    """A CLI duration as definitions write them: seconds (``90``, ``1.5``) or with a unit (``500ms``,
    ``30s``, ``5m``, ``1h``)."""
    from qemuspec.spec.units import parse_seconds

    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _epilog(name: str, examples: list[str] | None = None) -> str:
    examples = EXAMPLES.get(name, []) if examples is None else examples
    text = ("examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n") if examples else ""
    return text + EXIT_CODES


def _count(text: str) -> int | None:
    """A number of lines: 0 or more, or "all" (None: every line)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f'"{text}" is not a number of lines: write 20, 0 or all')
    return int(text)


def _environment() -> str:
    """Every environment variable qemuspec reads (settings.VARIABLES, the one list)."""
    from qemuspec.settings import VARIABLES

    width = max(len(name) for name in VARIABLES)
    return "environment:\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, what in VARIABLES.items()
    )


def _commands_help() -> str:
    width = max(len(name) for name in COMMANDS)
    return "commands:\n" + "\n".join(
        f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output: JSON (JSON lines for streams)"
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only errors and the data asked for; no progress",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="print what guests sent (consoles, events, error tails) as it is, "
        "terminal control characters included (default: escaped on a terminal)",
    )


def _target(parser: argparse.ArgumentParser, operands: str, machine_flag: bool = True) -> None:
    action = "ACTION " if parser.prog.split()[-1] in ("snapshot", "warm") else ""
    after = " [-- COMMAND...]" if parser.prog.split()[-1] in ("run", "exec", "ssh") else ""
    parser.usage = f"{parser.prog} {action}{operands} [options]{after}"
    parser.add_argument("operands", nargs="*", metavar="OPERAND", help=operands)
    parser.add_argument("--file", "-F", dest="file_option", metavar="FILE", help=FILE_HELP)
    if machine_flag:
        parser.add_argument(
            "--machine",
            "-m",
            dest="machine_option",
            action="append",
            default=[],
            metavar="NAME",
            help="machine (repeatable), also accepted as operands after FILE",
        )
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="template variable (repeatable)",
    )
    parser.add_argument(
        "--state-dir",
        help="state directory (default: .qemuspec beside the file; env QEMUSPEC_STATE_DIR)",
    )
    parser.add_argument(
        "--connect",
        metavar="URI",
        help="run machines through libvirt at this URI, e.g. qemu+ssh://user@host/system "
        "(default: $QEMUSPEC_CONNECT, else locally; a machine's own host = wins)",
    )


class _Skip:
    """Stands in for the parsers of commands not being run: adding their arguments is most of the
    parser's build time, and `qemuspec --help` must start fast."""

    prog = "qemuspec -"
    usage: str | None = None
    epilog: str | None = None

    def add_argument(self, *args: object, **kw: object) -> None:
        return None

    def add_subparsers(self, *args: object, **kw: object) -> "_Skip":
        return self

    def add_parser(self, *args: object, **kw: object) -> "_Skip":
        return self


def build_parser(
    command: str | None = None,
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one parser per command; with ``command``, only that command's
    arguments are filled in ("" for none: enough for the top-level help)."""
    parser = argparse.ArgumentParser(
        prog="qemuspec",
        usage="qemuspec [--version] COMMAND [ACTION] [FILE] [MACHINE...] [OPTIONS] [-- COMMAND...]",
        description="Declarative QEMU virtual machines: definitions in TOML or YAML, validated, rendered, run through QMP.\n"
        "FILE is optional everywhere (also --file FILE); MACHINE may be left out when the file has one machine.",
        epilog=_commands_help() + "\n\n" + _epilog("") + "\n\n" + _environment(),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version="qemuspec 0.1.0")
    parser.add_argument(
        "command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS
    )
    wanted = list(COMMANDS) if command is None else [command] if command else []
    real = {
        name: argparse.ArgumentParser(
            prog=f"qemuspec {name}",
            description=COMMANDS[name][2],
            epilog=_epilog(name),
            formatter_class=_Formatter,
        )
        for name in wanted
    }
    p: dict[str, argparse.ArgumentParser] = {name: real.get(name) or _Skip() for name in COMMANDS}  # type: ignore[misc]

    p["validate"].usage = "qemuspec validate [FILE...] [options]"
    p["validate"].add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="definition files (default: --file, else $QEMUSPEC_FILE, else qemuspec.toml, "
        "qemuspec.yaml or machines/dev.toml)",
    )
    p["validate"].add_argument("--file", "-F", dest="file_option", metavar="FILE", help=FILE_HELP)
    p["validate"].add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="template variable (repeatable)",
    )
    p["validate"].add_argument(
        "--probe",
        action="store_true",
        help="also check machine types, CPUs, devices, properties and options against the qemu binary (cached)",
    )
    _target(p["render"], "[FILE] [MACHINE...]")
    p["render"].add_argument(
        "--shell", action="store_true", help="one shell-quoted line per machine, ready to paste"
    )
    p["render"].add_argument(
        "--format",
        choices=["argv", "libvirt"],
        default="argv",
        help="argv (default), or libvirt domain XML",
    )
    _target(p["config"], "[FILE] [MACHINE...]")
    p["config"].add_argument(
        "--format",
        choices=["toml", "yaml", "json"],
        default=None,
        help="output format (default: toml; json with --json)",
    )
    p["schema"].add_argument("-o", "--output", help="write to this file instead of standard output")
    p["init"].add_argument(
        "target_file",
        nargs="?",
        default="qemuspec.toml",
        metavar="FILE",
        help="file to write (default: qemuspec.toml)",
    )
    p["init"].add_argument("--force", action="store_true", help="overwrite an existing file")
    p["init"].add_argument(
        "--template",
        metavar="NAME",
        help="a distribution's cloud image with cloud-init, ssh and "
        "provisioning readiness (see --list)",
    )
    p["init"].add_argument(
        "--list", dest="list_templates", action="store_true", help="name the templates and exit"
    )

    for name in (
        "up",
        "down",
        "status",
        "ps",
        "plan",
        "restart",
        "pause",
        "resume",
        "reset",
        "logs",
        "provision",
    ):
        _target(p[name], "[FILE] [MACHINE...]")
    p["up"].add_argument(
        "--no-probe",
        action="store_true",
        help="skip checking the definition against the qemu binary",
    )
    for name in ("up", "plan"):
        p[name].add_argument(
            "--warm",
            action="store_true",
            help="warm start for this run, as if the machines said warm = true",
        )
    p["up"].add_argument(
        "--attach",
        action="store_true",
        help="stay in the foreground streaming consoles and events; Ctrl-C brings the machines down",
    )
    p["up"].add_argument(
        "--no-restart",
        action="store_true",
        help="apply only live changes: when a machine would be restarted or recreated, change nothing, "
        "name the fields and exit 4",
    )
    p["up"].add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="readiness timeout for this run, instead of each machine's ready.timeout "
        "(seconds, or 30s, 5m, 1h)",
    )
    for name in ("up", "run"):
        p[name].add_argument(
            "--offline",
            action="store_true",
            help="never download a base image: one missing from the "
            "cache is an error (env QEMUSPEC_OFFLINE=1)",
        )
    for name in ("up", "validate", "restart", "run"):
        p[name].add_argument(
            "--allow-local-qemu",
            action="store_true",
            help="run a qemu binary that lives inside the definition's own tree (only for a qemu you built)",
        )
        p[name].add_argument(
            "--allow-host-paths",
            action="store_true",
            help="let the VM use shares and writable disks outside the definition's tree, "
            "and device nodes",
        )
    p["down"].add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="time for ACPI powerdown before escalating, e.g. 30s or 2m "
        "(default: each machine's stop_timeout)",
    )
    p["down"].add_argument(
        "--purge",
        action="store_true",
        help="also delete disks qemuspec created and the state directory",
    )
    p["logs"].add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing as the log grows (rotation followed), from its end unless -n is "
        "given, until the machines stop",
    )
    p["logs"].add_argument(
        "--events", action="store_true", help="print events instead of the console"
    )
    p["logs"].add_argument(
        "--lines",
        "-n",
        "--tail",
        type=_count,
        default=None,
        metavar="N",
        help="only the last N lines (0: none; default: all, or none with -f)",
    )
    p["logs"].add_argument(
        "--since",
        metavar="WHEN",
        help="only lines since WHEN: a duration ago (10m, 2h) or a time "
        "(2026-12-02T05:00:00, UTC unless an offset is given; or unix seconds)",
    )
    p["logs"].add_argument(
        "--timestamps",
        "-t",
        action="store_true",
        help="prefix each line with the time it arrived (UTC, to the millisecond)",
    )

    for name in ("events", "console", "inspect", "exec", "ssh", "run"):
        _target(p[name], "[FILE] [MACHINE]")
    p["events"].add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    _target(p["qmp"], "[FILE] [MACHINE] COMMAND [JSON]")
    _target(p["ssh-config"], "[FILE] [MACHINE...]")
    p["ls"].add_argument(
        "--all",
        "-a",
        action="store_true",
        help="also list stopped machines (every state directory qemuspec claimed)",
    )
    p["ls"].add_argument(
        "--prune",
        action="store_true",
        help="first forget stale entries: gone state directories, machines whose qemu and "
        "supervisor both died",
    )
    p["exec"].add_argument(
        "--timeout",
        type=duration,
        default=300.0,
        metavar="DURATION",
        help="how long the command may run: seconds, or 30s, 5m, 1h (default 300)",
    )
    p["exec"].add_argument(
        "--tty",
        "-t",
        action="store_true",
        help="give the command a terminal: it runs through ssh (ssh -t) instead of the guest agent",
    )
    p["run"].add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="readiness timeout: seconds, or 30s, 5m (default: the machine's ready.timeout)",
    )
    p["run"].add_argument(
        "--via",
        choices=["auto", "agent", "ssh"],
        default="auto",
        help="how to reach the guest (auto: ssh when the machine forwards its ssh port, else the agent)",
    )
    p["run"].add_argument(
        "--fail-on",
        choices=["panic", "warn"],
        default="panic",
        help="what guest kernel trouble fails the run (exit 250): panic (panic, oops, BUG, KASAN; "
        "the default) or warn (also WARNING:, soft lockups, hung tasks, RCU stalls, UBSAN)",
    )
    p["run"].add_argument(
        "--vmcore",
        metavar="PATH",
        help="on a guest kernel crash, write a dump-guest-memory ELF core of the paused guest to PATH",
    )
    _target(p["test"], "[FILE]", machine_flag=False)
    p["test"].add_argument(
        "-k",
        dest="keyword",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only cases whose name contains PATTERN (a glob with * ? [...]); repeatable",
    )
    p["test"].add_argument(
        "-j",
        "--jobs",
        type=int,
        metavar="N",
        help="cases at a time (default: what the host's CPUs and free memory carry)",
    )
    p["test"].add_argument("--junit", metavar="PATH", help="write JUnit XML here")
    p["test"].add_argument(
        "--keep-failed",
        metavar="DIR",
        help="keep each failed case's console, events, qemu log and output in DIR/CASE/",
    )
    for flag, text in (
        ("--allow-local-qemu", "run a qemu binary that lives inside the definition's own tree"),
        ("--allow-host-paths", "let the VM use shares and writable disks outside the tree"),
    ):
        p["test"].add_argument(flag, action="store_true", help=text)
    p["warm"].add_argument("action", choices=["key"], help="key: print the checkpoint key")
    _target(p["warm"], "[FILE] [MACHINE...]")
    _target(p["cp"], "[FILE] SOURCE TARGET", machine_flag=False)
    p["cp"].add_argument("--recursive", "-r", action="store_true", help="copy directories")
    p["cp"].add_argument(
        "--via",
        choices=["auto", "agent", "ssh"],
        default="auto",
        help="how files travel (auto: the guest agent when the machine has one, else ssh); "
        "ssh streams one file, into the guest faster than the agent",
    )
    p["cp"].add_argument(
        "--dereference",
        "-L",
        action="store_true",
        help="into the guest: copy what host symlinks point to (default: symlinks stay symlinks)",
    )
    p["snapshot"].add_argument(
        "action", choices=["save", "load", "list", "delete"], help="what to do with TAG"
    )
    _target(p["snapshot"], "[FILE] [MACHINE] [TAG]")

    p["import"].add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="read the command line from a file (a shell command)",
    )
    p["import"].add_argument("--name", help="machine name (default: -name, else the binary's name)")
    p["import"].add_argument(
        "-o", "--output", help="write this definition file (default: standard output)"
    )
    p["import"].add_argument("--force", action="store_true", help="overwrite --output")
    p["import"].add_argument(
        "--from-libvirt", metavar="XML", help="read a libvirt domain (what `virsh dumpxml` prints)"
    )
    p["import"].add_argument(
        "--check",
        action="store_true",
        help="start the original and the rendered machine paused (-S) and let qemu compare them",
    )
    p["completion"].add_argument("shell", choices=["bash", "zsh", "fish"], help="which shell")
    p["help"].add_argument(
        "topic", nargs="*", metavar="COMMAND", help="a command, and for img an action"
    )
    p["man"].add_argument(
        "-o", "--output", help="write the page to this file instead of standard output"
    )
    img = p["img"].add_subparsers(dest="img_command", metavar="ACTION", required=True)
    i = {
        a: img.add_parser(
            a,
            help=h,
            description=h,
            epilog=_epilog("img", IMG_EXAMPLES.get(a, [])),
            formatter_class=_Formatter,
        )
        for a, h in (
            ("create", "create an image (never overwrites)"),
            ("info", "show an image's format, sizes, backing, snapshots"),
            ("convert", "convert an image to another format (progress on a terminal)"),
            ("resize", "grow (or --shrink) an image"),
            ("snapshot", "internal snapshots of an image not in use: list, create, apply, delete"),
            ("check", "check an image for errors"),
            ("rebase", "point an overlay at another backing file"),
            (
                "pull",
                "download the base images a definition's disks name into the cache (checked against their digests)",
            ),
            ("ls", "list the base images in the cache (digest, format, size, last use, URL)"),
            (
                "prune",
                "remove cached base images not used for a while (--older-than, default 30d), or --all",
            ),
        )
    }
    _target(i["pull"], "[FILE] [MACHINE...]")
    i["pull"].add_argument(
        "--offline",
        action="store_true",
        help="never download: an image missing from the cache is an error",
    )
    i["pull"].add_argument(
        "--allow-host-paths",
        action="store_true",
        help="allow file:// images outside the definition's tree",
    )
    i["prune"].add_argument(
        "--older-than",
        metavar="AGE",
        help="remove images not used for this long: 30d (default), 12h, 90m",
    )
    i["prune"].add_argument(
        "--all", dest="everything", action="store_true", help="remove every cached image"
    )
    i["create"].add_argument("file", help="image to create (never overwritten)")
    i["create"].add_argument("size", nargs="?", help="e.g. 10G (optional with --backing)")
    i["create"].add_argument(
        "-f", "--format", default="qcow2", help="image format: qcow2 (default), raw, ..."
    )
    i["create"].add_argument("-b", "--backing", help="backing file: create an overlay on it")
    i["create"].add_argument(
        "-F", "--backing-format", help="the backing file's format (never probed when given)"
    )
    i["info"].add_argument("file", help="image to describe")
    i["convert"].add_argument("source", help="image to read")
    i["convert"].add_argument("target", help="image to write")
    i["convert"].add_argument(
        "-O", "--format", default="qcow2", help="target format: qcow2 (default), raw, ..."
    )
    i["convert"].add_argument(
        "-c", "--compress", action="store_true", help="compress the target (qcow2)"
    )
    i["resize"].add_argument("file", help="image to resize (not in use)")
    i["resize"].add_argument("size", help="new size, e.g. 20G, or +5G")
    i["resize"].add_argument(
        "--shrink", action="store_true", help="allow making it smaller (data past the end is lost)"
    )
    i["snapshot"].add_argument(
        "action", choices=["list", "create", "apply", "delete"], help="what to do"
    )
    i["snapshot"].add_argument("file", help="qcow2 image (not in use)")
    i["snapshot"].add_argument("tag", nargs="?", help="snapshot name (create, apply, delete)")
    i["check"].add_argument("file", help="image to check")
    i["rebase"].add_argument("file", help="overlay to point elsewhere")
    i["rebase"].add_argument("-b", "--backing", required=True, help="the new backing file")
    i["rebase"].add_argument("-F", "--backing-format", help="the new backing file's format")
    i["rebase"].add_argument(
        "-u",
        "--unsafe",
        action="store_true",
        help="only rewrite the header (the new backing holds the same data)",
    )
    for name, parser_ in p.items():
        if name != "img":
            _common(parser_)
    for parser_ in i.values():
        _common(parser_)
    return parser, real


def _unknown_command(word: str) -> None:
    """An unknown command: the closest one by name, as git does; exit 2."""
    import difflib
    import sys

    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    print(
        f'qemuspec: unknown command "{word}": {hint}(`qemuspec help` lists every command)',
        file=sys.stderr,
    )
    raise SystemExit(2)


def _guest_words(sub: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """`exec [FILE] [MACHINE] COMMAND...` written without ``--``: (qemuspec's own words, the rest,
    MACHINE first when one is named). Options before the first word that is neither an option, its
    value, nor the FILE are qemuspec's; from that word on everything is the guest's, unless a word
    there is one of qemuspec's own options too: then nobody can tell whose it is, and it says to add
    ``--``."""
    from qemuspec.cli.common import looks_like_file

    takes_value = {s: action.nargs != 0 for action in sub._actions for s in action.option_strings}
    i, file_seen = 0, False
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and len(word) > 1:
            name = word.split("=", 1)[0]
            i += 2 if takes_value.get(name) and "=" not in word else 1
            continue
        if not file_seen and looks_like_file(word):
            file_seen = True
            i += 1
            continue
        break
    own, rest = argv[:i], argv[i:]
    clash = [w for w in rest[1:] if w.split("=", 1)[0] in takes_value]
    if clash:
        sub.error(
            f"{clash[0]} after the command: is it qemuspec's option or the command's? Put "
            f"qemuspec's options first and the command after --: {sub.prog} [FILE] [MACHINE] "
            f"[OPTIONS] -- {' '.join(rest[1:] if len(rest) > 1 else rest)}"
        )
    return own, rest


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str] | None]:
    """The namespace of one command line, and what followed ``--`` (a guest or qemu command)."""
    tail: list[str] | None = None
    if argv[:1] == ["help"] and not {"-h", "--help"} & set(argv[1:]):
        # `qemuspec help COMMAND [ACTION]` is `qemuspec COMMAND [ACTION] --help`
        asked = [w for w in argv[1:] if w != "--json"]
        if asked[:1] and asked[0] not in COMMANDS:
            _unknown_command(asked[0])
        if "--json" in argv[1:]:  # the help text as one JSON object, as every command's --json
            _top, subs = build_parser(asked[0] if asked else "")
            chosen = subs[asked[0]] if asked else _top
            if asked[1:2] and asked[0] == "img":
                chosen = chosen._subparsers._group_actions[0].choices.get(asked[1], chosen)  # type: ignore[union-attr]
            print(json.dumps({"command": " ".join(asked[:2]), "text": chosen.format_help()}))
            raise SystemExit(0)
        argv = [*argv[1:], "--help"]
    if (
        "--" in argv
    ):  # everything after "--" is the guest command (run, exec, ssh, import), never our options
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        _unknown_command(argv[0])
    parser, subs = build_parser(argv[0] if argv and argv[0] in COMMANDS else "")
    words = None
    if argv[:1] == ["exec"] and tail is None and "--help" not in argv and "-h" not in argv:
        own, words = _guest_words(subs["exec"], argv[1:])
        argv = ["exec", *own]
    if not argv or argv[0].startswith("-") or argv[0] not in subs:
        args = parser.parse_args(argv)  # --help, --version, or an unknown command (exit 2)
        parser.print_help()
        raise SystemExit(2)
    command = argv[0]
    sub = subs[command]
    # intermixed: operands may stand on either side of options (`logs box -n 3 --file x`)
    args = sub.parse_args(argv[1:]) if command == "img" else sub.parse_intermixed_args(argv[1:])
    args.command = command
    args.words = words  # exec without --: [MACHINE] COMMAND..., told apart once the file is read
    if tail is not None and command not in ("run", "exec", "ssh", "import"):
        sub.error(f"{command} takes no command after --")
    return args, tail
