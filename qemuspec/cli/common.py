"""What several commands share: reading --var, loading the file, choosing machines, printing JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

from qemuspec.errors import UsageError


def parse_vars(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f'--var "{pair}" is not NAME=VALUE: write for example --var memory=512M')
        out[name] = value
    return out


DEFAULT_FILES = ("qemuspec.toml", "qemuspec.yaml", "qemuspec.yml", "machines/dev.toml")


def resolve_file(given: str | None) -> str:
    """The definition file: as given, else $QEMUSPEC_FILE, else the first default that exists."""
    import os

    if given:
        return given
    if os.environ.get("QEMUSPEC_FILE"):
        return os.environ["QEMUSPEC_FILE"]
    for candidate in DEFAULT_FILES:
        if os.path.exists(candidate):
            return candidate
    raise UsageError(f"no definition file given and none of {', '.join(DEFAULT_FILES)} exists here: "
                     "pass one, set QEMUSPEC_FILE, or create one with `qemuspec init`")


def load_file(args: Any, with_lines: bool = False):
    """Load the command's definition file; sets ``args.file`` to the path used."""
    from qemuspec.spec.loader import load_located

    args.file = resolve_file(getattr(args, "file", None))
    spec, lines = load_located(args.file, variables=parse_vars(getattr(args, "var", [])))
    return (spec, lines) if with_lines else spec


def check_against_qemu(spec: Any, lines: dict, source: str, names: list[str]) -> None:
    """Ask each machine's qemu binary (cached) whether it supports what the machine uses."""
    from qemuspec.errors import SpecError
    from qemuspec.runtime import capabilities
    from qemuspec.spec.messages import located

    problems = []
    for name in names:
        machine = spec.machines[name]
        problems += capabilities.check(name, machine, capabilities.probe(machine.qemu))
    if problems:
        raise SpecError(located(source, lines, problems))


def preflight(spec: Any, lines: dict, source: str, names: list[str], args: Any, ports: bool = False) -> None:
    """What `up` would fail on, found before anything starts (spec/preflight.py): exit 2 with file:line."""
    from qemuspec.errors import SpecError
    from qemuspec.spec import preflight as checks
    from qemuspec.spec.messages import located

    problems = checks.host_problems(spec, source, names, allow_local_qemu=getattr(args, "allow_local_qemu", False))
    if ports and not problems:
        from qemuspec import reconcile
        from qemuspec.runtime import paths

        root = paths.state_root(source, getattr(args, "state_dir", None))
        starting = [step["name"] for step in reconcile.plan(spec, root, names) if step["action"] == "start"]
        problems = checks.busy_ports(spec, starting)
    if problems:
        raise SpecError(located(source, lines, problems))


def select(spec: Any, names: list[str] | str | None, source: str) -> list[str]:
    """Machine names to act on, in dependency order; unknown names are usage errors with a suggestion."""
    from qemuspec.spec.models import order_machines

    wanted = [names] if isinstance(names, str) else list(names or [])
    for name in wanted:
        if name not in spec.machines:
            import difflib

            close = difflib.get_close_matches(name, list(spec.machines), n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"machines in the file: {', '.join(spec.machines)}"
            raise UsageError(f'{source}: no machine named "{name}": {hint}')
    ordered = [n for level in order_machines(spec.machines) for n in level]
    return [n for n in ordered if not wanted or n in wanted]


def emit_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
