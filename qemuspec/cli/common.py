"""What every command shares: the one grammar (FILE, then machines), output modes (--json, --quiet,
colour), and turning errors into paragraphs or JSON objects."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence, TextIO

from qemuspec.cli.escape import printable
from qemuspec.errors import QemuspecError, UsageError
from qemuspec.settings import Settings, current

if TYPE_CHECKING:
    import argparse

    from qemuspec.cli.progress import DownloadProgress, Progress
    from qemuspec.spec.models import File

DEFAULT_FILES = ("qemuspec.toml", "qemuspec.yaml", "qemuspec.yml", "machines/dev.toml")
DEFINITION_SUFFIXES = (".toml", ".yaml", ".yml")


def parse_vars(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(
                f'--var "{pair}" is not NAME=VALUE: write for example --var memory=512M'
            )
        out[name] = value
    return out


def resolve_file(given: str | None, settings: Settings | None = None) -> str:
    """The definition file: as given, else $QEMUSPEC_FILE, else the first default that exists."""
    if given:
        return given
    env_file = (settings or current()).file
    if env_file:
        return env_file
    for candidate in DEFAULT_FILES:
        if os.path.exists(candidate):
            return candidate
    raise UsageError(
        f"no definition file given and none of {', '.join(DEFAULT_FILES)} exists here: "
        "pass one, set QEMUSPEC_FILE, or create one with `qemuspec init`"
    )


def looks_like_file(operand: str) -> bool:
    """A first operand names the definition file, not a machine, when it could only be a path."""
    return operand.endswith(DEFINITION_SUFFIXES) or os.sep in operand or os.path.isfile(operand)


def escaping(stream: TextIO, raw: bool = False) -> bool:
    """Whether guest text bound for ``stream`` is escaped: on a terminal, unless --raw."""
    try:
        return not raw and stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class Output:
    """How a command prints: JSON, quiet, colour and live progress only on a terminal; guest text
    (consoles, events, error tails) escaped on a terminal unless ``raw``."""

    json: bool = False
    quiet: bool = False
    colour: bool = False
    live: bool = False
    raw: bool = False

    def guest(self, text: str, stream: TextIO | None = None) -> str:
        """``text`` that came from a guest, ready for ``stream`` (stdout by default)."""
        return printable(text) if escaping(stream or sys.stdout, self.raw) else text

    def say(self, text: str) -> None:
        """A confirmation or summary for people: nothing with --json or --quiet."""
        if not (self.json or self.quiet):
            print(text, flush=True)

    def note(self, text: str) -> None:
        """A remark on stderr (hints, 'wrote FILE'): nothing with --quiet."""
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def data(self, value: object) -> None:
        emit_json(value)

    def states(self, results: list[dict]) -> None:
        """What pause/resume did to each machine: JSON, or "NAME: STATE" lines."""
        if self.json:
            emit_json(results)
        else:
            for r in results:
                self.say(f"{r['name']}: {r['state']}")

    def line(self, value: object) -> None:
        """One JSON line of a stream (logs, events)."""
        sys.stdout.write(json.dumps(value, default=str) + "\n")
        sys.stdout.flush()

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def downloads(self) -> "DownloadProgress":
        """Progress of image downloads: a bar on a terminal, lines elsewhere, JSON events with --json."""
        from qemuspec.cli.progress import DownloadProgress

        return DownloadProgress(
            "quiet" if self.quiet else "json" if self.json else "live" if self.live else "lines"
        )

    def progress(
        self,
        names: list[str],
        deadline: float | None = None,
        consoles: dict[str, str] | None = None,
    ) -> "Progress":
        """Progress on stderr while it is live (cli/progress.py); ``consoles``: machine -> console
        log, whose last line (escaped) the live line shows."""
        from qemuspec.cli.progress import Progress

        return Progress(
            names,
            enabled=not (self.json or self.quiet),
            live=self.live,
            colour=self.colour and self.live,
            deadline=deadline,
            consoles=consoles,
        )


class Target:
    """The definition file and machines a command line names, in the one grammar:
    ``[FILE] [MACHINE...]`` as operands, or ``--file``/``--machine`` anywhere."""

    def __init__(
        self,
        operands: list[str],
        file_option: str | None = None,
        machine_option: list[str] | None = None,
        variables: dict[str, str] | None = None,
        state_dir: str | None = None,
        settings: Settings | None = None,
        kind: str = "machines",
    ):
        self.settings = settings or current()
        self.variables = variables or {}
        self.state_dir_option = state_dir
        self.machine_option = list(machine_option or [])
        rest = list(operands)
        given = file_option
        if given is None and rest:
            if kind == "cp":
                if len(rest) == 3:
                    given = rest.pop(0)
            elif looks_like_file(rest[0]):
                given = rest.pop(0)
        self.given = given
        self.rest = rest
        self._loaded: tuple[File, dict] | None = None

    @property
    def path(self) -> str:
        if not hasattr(self, "_path"):
            self._path = resolve_file(self.given, self.settings)
        return self._path

    def load(self) -> tuple["File", dict]:
        if self._loaded is None:
            from qemuspec.spec import cache

            self._loaded = cache.load(
                self.path, self.variables, self.settings.var_environ(), self.settings.cache
            )
        return self._loaded

    @property
    def spec(self) -> "File":
        return self.load()[0]

    @property
    def root(self) -> str:
        from qemuspec.runtime import paths

        return paths.state_root(self.path, self.state_dir_option or self.settings.state_dir)

    def state_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def machines(self, names: list[str] | None = None) -> list[str]:
        """Named machines (operands and --machine), or every machine, in dependency order."""
        wanted = list(names) if names is not None else self.rest + self.machine_option
        return select(self.spec, wanted, self.path)

    def machine(self, name: str | None = None, operands: bool = True) -> str:
        """The one machine a command acts on: named, or the only one in the file."""
        if name is None and operands:
            if len(self.rest) > 1:
                raise UsageError(f"one machine, please: got {', '.join(self.rest)}")
            name = (
                self.rest[0]
                if self.rest
                else (self.machine_option[0] if self.machine_option else None)
            )
        elif name is None and self.machine_option:
            name = self.machine_option[0]
        spec = self.spec
        if name is None:
            if len(spec.machines) == 1:
                return next(iter(spec.machines))
            raise UsageError(
                f"{self.path} declares machines {', '.join(spec.machines)}: name one after the file"
            )
        select(spec, [name], self.path)
        return name


@dataclass
class Context:
    """What a command gets besides its own options: output modes, the target, settings, the ``--`` tail."""

    out: Output
    target: Target
    settings: Settings
    tail: list[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)  # the namespace, backends chosen once

    @classmethod
    def from_args(
        cls, args: "argparse.Namespace", tail: list[str] | None, settings: Settings
    ) -> "Context":
        from qemuspec.cli.commands import FILE_COMMANDS

        terminal = sys.stderr.isatty() and settings.term != "dumb" and not settings.ci
        out = Output(
            json=getattr(args, "json", False),
            quiet=getattr(args, "quiet", False),
            colour=sys.stdout.isatty() and not settings.no_color and settings.term != "dumb",
            live=terminal,
            raw=getattr(args, "raw", False),
        )
        variables = parse_vars(getattr(args, "var", []) or [])
        target = Target(
            getattr(args, "operands", []) or [],
            getattr(args, "file_option", None),
            getattr(args, "machine_option", None),
            variables,
            getattr(args, "state_dir", None),
            settings,
            kind=FILE_COMMANDS.get(args.command, "machines"),
        )
        words = getattr(args, "words", None)
        if words:
            tail = guest_command(target, words, args.command)
        return cls(out, target, settings, tail, {"namespace": args})


def guest_command(target: Target, words: list[str], command: str) -> list[str]:
    """``exec FILE [MACHINE] COMMAND...`` without ``--``: the first word is the machine when the file
    has a machine of that name, else the command's own (the machine then is the only one, or
    ``--machine``). Sets the machine on ``target``; returns the guest's command."""
    machines = target.spec.machines
    if words[0] in machines:
        target.rest = [words[0]]
        return words[1:]
    if target.machine_option or len(machines) == 1:
        return words
    import shlex

    raise UsageError(
        f"{target.path} declares machines {', '.join(machines)} and none is named "
        f'"{words[0]}": name the machine before the command, e.g. qemuspec {command} '
        f"{target.path} {next(iter(machines))} {shlex.join(words)} (or put the command after --)"
    )


def check_against_qemu(spec: File, lines: dict, source: str, names: list[str]) -> None:
    """Ask each machine's qemu binary (cached) whether it supports what the machine uses."""
    from qemuspec.errors import SpecError
    from qemuspec.runtime import capabilities

    problems = [
        p for name in names for p in capabilities.machine_problems(name, spec.machines[name])
    ]
    if problems:
        from qemuspec.spec.messages import located

        raise SpecError(located(source, lines, problems))


def preflight(
    spec: File,
    lines: dict,
    source: str,
    names: list[str],
    allow_local_qemu: bool = False,
    settings: Settings | None = None,
    allow_host_paths: bool = False,
    out: Output | None = None,
) -> None:
    """What starting these machines here would fail on (validate, run; `up` asks each machine's backend:
    reconcile.preflight): exit 2 with file:line. With ``out``, first lists the host paths outside the
    tree the machines can use."""
    from qemuspec.errors import SpecError
    from qemuspec.spec import preflight as checks

    if out is not None:
        list_host_paths(out, spec, source, names)
    environ = (settings or current()).var_environ()
    problems = checks.host_problems(
        spec,
        source,
        names,
        allow_local_qemu=allow_local_qemu,
        environ=environ,
        allow_host_paths=allow_host_paths,
    )
    if problems:
        from qemuspec.spec.messages import located

        raise SpecError(located(source, lines, problems))


def list_host_paths(out: Output, spec: File, source: str, names: list[str]) -> None:
    """On stderr: every host path outside the definition's tree each machine's VM can read or write
    (validate, render, up), so a file from someone else shows what it reaches before it runs."""
    from qemuspec.spec.preflight import host_paths, project_root

    root = project_root(source)
    for name in names:
        paths = host_paths(spec.machines[name], root)
        if paths:
            out.note(f"{name}: host paths outside {root} the VM can use:")
            for p in paths:
                field = ".".join(str(k) for k in p.key)
                flag = ", needs --allow-host-paths" if p.needs_opt_in else ""
                out.note(f"  {field:<28} {p.path} ({p.access}, {p.kind}{flag})")


def select(spec: File, names: list[str] | str | None, source: str) -> list[str]:
    """Machine names to act on, in dependency order; unknown names are usage errors with a suggestion."""
    from qemuspec.spec.order import order_machines

    wanted = [names] if isinstance(names, str) else list(names or [])
    for name in wanted:
        if name not in spec.machines:
            import difflib

            close = difflib.get_close_matches(name, list(spec.machines), n=1)
            hint = (
                f'did you mean "{close[0]}"?'
                if close
                else f"machines in the file: {', '.join(spec.machines)}"
            )
            raise UsageError(f'{source}: no machine named "{name}": {hint}')
    ordered = [n for level in order_machines(spec.machines) for n in level]
    return [n for n in ordered if not wanted or n in wanted]


def emit_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


# patterns compiled on first use (re caches them): only error output needs them
_WHERE = r"^(?P<file>.+?)(?::(?P<line>\d+))?: (?P<rest>.*)$"
_FIELD = r"^(?P<field>(?:machines|networks|vars)(?:[.\[][^\s:]*)?): (?P<rest>.*)$"
_COLUMN = r"\(column (\d+)\)|column (\d+)"


def problem_object(text: str, source: str | None = None) -> dict[str, str | int | None]:
    """A problem paragraph ("FILE:LINE: FIELD: what: fix") as {file, line, column, field, message, fix}."""
    obj: dict[str, str | int | None] = {
        "file": None,
        "line": None,
        "column": None,
        "field": None,
        "message": text,
        "fix": None,
    }
    rest = text
    if source and text.startswith(source + ":"):
        obj["file"] = source
        after = text[len(source) + 1 :]
        m = re.match(r"(\d+): (.*)$", after, re.S)
        obj["line"], rest = (int(m.group(1)), m.group(2)) if m else (None, after.lstrip())
    else:
        m = re.match(_WHERE, text, re.S)
        if m and (m.group("line") or os.path.splitext(m.group("file"))[1] in DEFINITION_SUFFIXES):
            obj["file"], rest = m.group("file"), m.group("rest")
            obj["line"] = int(m.group("line")) if m.group("line") else None
    m = re.match(_FIELD, rest, re.S)
    if m:
        obj["field"], rest = m.group("field"), m.group("rest")
    col = re.search(_COLUMN, rest)
    if col:
        obj["column"] = int(col.group(1) or col.group(2))
        rest = rest.replace(col.group(0), "").replace("  ", " ").replace(" :", ":")
    what, sep, fix = rest.partition(": ")
    if sep and fix[:1].isupper() and ". " in fix:  # "kind: Detail. Fix it so."
        detail, _, fix = fix.partition(". ")
        what = f"{what}: {detail}"
    if sep:
        obj["message"], obj["fix"] = what, fix
    else:
        obj["message"] = rest
    return obj


class Outcome(Protocol):
    """What the exit code rule reads of an outcome (reconcile's, or the libvirt path's)."""

    action: str


REFUSED = (
    "failed",
    "belongs to another file",
    "needs restart",
)  # machine outcomes that are not a success
NO_RESTART = 4  # `up --no-restart` when a machine would be restarted or recreated: nothing changed


def outcomes_exit_code(outcomes: Sequence[Outcome]) -> int:
    """The one rule for up, down and restart (local or libvirt): 1 when any machine failed or was
    refused (another file's machine: a runtime conflict, not bad usage); NO_RESTART (4) when
    `up --no-restart` changed nothing because a machine needs a restart or recreate; else 0."""
    if any(o.action in ("failed", "belongs to another file") for o in outcomes):
        return 1
    return NO_RESTART if any(o.action == "needs restart" for o in outcomes) else 0


# Exit codes beyond an error's own (errors.py: 1 runtime, 2 input or usage), decided here.
GUEST_CRASHED = (
    250  # run (and test): the guest kernel crashed (runtime/crash.py, errors.GuestCrashed)
)


def exit_code(exc: BaseException) -> int:
    """The exit code of an error: the one place that maps errors to codes."""
    from qemuspec.errors import GuestCrashed

    if isinstance(exc, GuestCrashed):
        return GUEST_CRASHED
    return exc.exit_code if isinstance(exc, QemuspecError) else 1


def error_label(stream: TextIO | None = None) -> str:
    """``error:``, red on a terminal (never with NO_COLOR or TERM=dumb)."""
    settings = current()
    stream = stream or sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if terminal and not settings.no_color and settings.term != "dumb":
        return "\x1b[31merror:\x1b[0m"
    return "error:"


def report_error(
    exc: BaseException, json_output: bool = False, source: str | None = None, raw: bool = False
) -> int:
    """Print an error as paragraphs on stderr (and, with --json, as an object on stdout); its exit code.
    Paragraphs may quote a guest (console tails, agent replies): escaped on a terminal unless ``raw``."""
    if isinstance(exc, QemuspecError):
        problems = getattr(exc, "problems", None) or [str(exc)]
        code = exit_code(exc)
    else:
        problems = [
            f"internal error: {type(exc).__name__}: {exc} (set QEMUSPEC_DEBUG=1 for the traceback)"
        ]
        code = 1
    escape = escaping(sys.stderr, raw)
    label = error_label()
    for number, problem in enumerate(problems):
        print(
            ("\n" if number else "") + f"{label} {printable(problem) if escape else problem}",
            file=sys.stderr,
        )
    if json_output:
        emit_json(
            {
                "error": problems[0],
                "exit_code": code,
                "problems": [problem_object(p, source) for p in problems],
            }
        )
    return code
