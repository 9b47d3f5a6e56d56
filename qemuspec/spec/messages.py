"""Pydantic validation errors rewritten as one paragraph each, for the person editing the file.

A paragraph says: file and line, the field path as the user writes it (``machines.web.disks[0].size``),
what was wrong, and what to write instead. Union branches that pydantic reports separately are merged,
since the user wrote one value, not one per branch.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from qemuspec.spec.models import File

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

_PATH_IN_MESSAGE = re.compile(r"^(machines\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_]+)*): ")
# A machine-level check that points inside the machine: "append.3: ...", "disks.0.options.id: ..."
_SUBPATH_IN_MESSAGE = re.compile(
    r"^((?:append|overrides|devices|objects|disks|nics|shares|ready)"
    r"(?:\.[A-Za-z0-9_-]+)*): "
)


def explain(
    exc: ValidationError,
    data: object,
    source: str,
    lines: dict[tuple, int],
    root: type[BaseModel] = File,
) -> list[str]:
    problems: list[tuple[int, str]] = []
    seen: set[tuple] = set()
    # Of a union's branches, a value error is the one that says what is wrong with the text as given.
    errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "value_error")
    explained = _misspelt(errors, data, root)
    for error in errors:
        loc = _user_loc(error["loc"], data)
        if error["type"] == "missing" and loc in explained:
            continue  # the unknown key next to it is this one misspelt: one message says both
        message = error["msg"].removeprefix("Value error, ")
        sub = _SUBPATH_IN_MESSAGE.match(message)
        if sub and loc:
            loc = loc + tuple(int(p) if p.isdigit() else p for p in sub.group(1).split("."))
            message = message[sub.end() :]
        found = _PATH_IN_MESSAGE.match(message)
        if found and not loc:
            loc = tuple(int(p) if p.isdigit() else p for p in found.group(1).split("."))
            message = message[found.end() :]
        if loc in seen:
            continue  # another branch of a union: the first says it
        seen.add(loc)
        what = _describe(error, message, loc, root)
        yaml11 = getattr(lines, "yaml11", {})
        if loc in yaml11:
            what = _yaml11(yaml11[loc], error, loc)
        elif (habit := _habit(error, loc, data, source, yaml11)) is not None:
            what = habit
        path = dotted(loc)
        where = _line(lines, loc)
        head = f"{source}:{where}" if where else source
        problems.append((where or 0, f"{head}: {path}: {what}" if path else f"{head}: {what}"))
    return [text for _, text in sorted(problems, key=lambda p: p[0])]


def _misspelt(errors: list, data: object, root: type[BaseModel]) -> set[tuple]:
    """Locations of required keys that an unknown key beside them probably meant."""
    out = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            loc = _user_loc(error["loc"], data)
            model = _model_at(root, loc[:-1])
            close = difflib.get_close_matches(
                str(loc[-1]), list(model.model_fields) if model else [], n=1, cutoff=0.6
            )
            if close:
                out.add(loc[:-1] + (close[0],))
    return out


def located(source: str, lines: dict[tuple, int], problems: list[tuple[tuple, str]]) -> list[str]:
    """Paragraphs for problems found after validation (e.g. against the qemu binary), same format."""
    out = []
    for loc, message in problems:
        line = _line(lines, loc)
        out.append(
            (
                line or 0,
                f"{source}:{line}: {dotted(loc)}: {message}"
                if line
                else f"{source}: {dotted(loc)}: {message}",
            )
        )
    return [text for _, text in sorted(out, key=lambda p: p[0])]


def dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _user_loc(loc: tuple, data: object) -> tuple:
    """Keep only the parts of pydantic's location that exist in the user's data (drop union tags)."""
    out: list = []
    current = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
        elif (
            isinstance(current, dict)
            and isinstance(part, str)
            and last
            and "[" not in part
            and "(" not in part
        ):
            out.append(part)  # a missing key or an unknown one
            current = None
        elif part == "[key]":
            continue
        else:
            continue
    return tuple(out)


def _line(lines: dict[tuple, int], loc: tuple) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: type[BaseModel] | None = root
    for part in loc:
        if current is not None and isinstance(part, str) and part in current.model_fields:
            current = _submodel(current.model_fields[part].annotation)
    return current


def _submodel(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _describe(error: ErrorDetails, message: str, loc: tuple, root: type[BaseModel]) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
        model = _model_at(root, loc[:-1])
        allowed = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = (
            f'did you mean "{close[0]}"?'
            if close
            else f"the keys allowed here are: {', '.join(allowed)}"
        )
        return f'unknown key "{key}": {hint}'
    if kind == "missing":
        return f'"{loc[-1] if loc else "value"}" is required here: add it'
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        close = difflib.get_close_matches(str(value), expected, n=1, cutoff=0.5)
        hint = (
            f'did you mean "{close[0]}"?'
            if close
            else "use one of: " + ", ".join(f'"{e}"' for e in expected)
        )
        return f'"{value}" is not allowed here: {hint}'
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return (
            f"expected a whole number, got {_show(value)}: write it without quotes, for example 2"
        )
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {_show(value)}"
    if kind in ("string_type",):
        return f'expected text, got {_show(value)}: put the value in quotes, for example "{value}"'
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {_show(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a table of settings, got {_show(value)}: write it as a [section] or {{ key = value }}"
    if kind == "list_type":
        return f"expected a list, got {_show(value)}: write it in [brackets]"
    if kind == "string_pattern_mismatch":
        if len(loc) == 2 and loc[0] == "machines":
            return f'"{loc[1]}" is not a valid machine name: use up to 63 letters, digits, "-" and "_", starting with a letter or digit'
        return f"{_show(value)} has the wrong form (it must match {ctx.get('pattern')})"
    if kind == "too_short" and loc == ("machines",):
        return "no machines are declared: add at least one [machines.NAME] table"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{_show(value)} is out of range: {message[0].lower() + message[1:]}"
    return message[0].lower() + message[1:] if message else kind


def _yaml11(raw: str, error: ErrorDetails, loc: tuple) -> str:
    """A YAML 1.1 trap: say what the unquoted text became and how to write what was meant."""
    value = error.get("input")
    key = loc[-1] if loc and isinstance(loc[-1], str) else None
    quoted = f'{key}: "{raw}"' if key else f'"{raw}"'
    if isinstance(value, bool):
        became = f"the boolean {'true' if value else 'false'}"
    elif ":" in raw:
        became = f"the base-60 number {value}"
    else:
        became = f"the octal number {value}"
    fix = f"write it in quotes ({quoted})"
    if error["type"] in ("dict_type", "model_type", "model_attributes_type") and ":" in raw:
        host, _, guest = raw.rpartition(":")
        fix = f"a forward is a table here: write {{host: {host}, guest: {guest}}}"
    return f"YAML 1.1 reads the unquoted {raw} as {became}, not as the text you wrote: {fix}"


_COMPOSE_RESTART = {
    "unless-stopped": "always",
    "on_failure": "on-failure",
    "never": "no",
    "false": "no",
}


def _habit(error: ErrorDetails, loc: tuple, data: object, source: str, yaml11: dict) -> str | None:
    """What a docker compose, Lima or Vagrant habit is called here, with the fix written out (in the
    file's own syntax)."""
    yaml = source.endswith((".yaml", ".yml"))
    value = error.get("input")

    def table(**fields: object) -> str:
        if yaml:
            return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"
        return "{ " + ", ".join(f"{k} = {v}" for k, v in fields.items()) + " }"

    if len(loc) == 3 and loc[0] == "machines" and error["type"] == "extra_forbidden":
        key, name = loc[2], loc[1]
        if key == "ports":
            forwards = []
            for index, item in enumerate(value if isinstance(value, list) else [value]):
                text = yaml11.get(loc + (index,), str(item))
                spec, _, proto = text.partition("/")
                parts = spec.split(":")
                if len(parts) >= 2 and parts[-1].isdigit() and parts[-2].isdigit():
                    fields: dict[str, object] = {"host": parts[-2], "guest": parts[-1]}
                    if proto:
                        fields["protocol"] = f'"{proto}"'
                    if len(parts) == 3 and parts[0] not in ("", "127.0.0.1"):
                        fields["address"] = f'"{parts[0]}"'
                    forwards.append(table(**fields))
            listed = ", ".join(forwards) or table(host=8080, guest=80)
            fix = (
                f"nics: [{{forwards: [{listed}]}}]"
                if yaml
                else f"[[machines.{name}.nics]] with forwards = [{listed}]"
            )
            return (
                f'unknown key "ports" (docker compose\'s): qemuspec forwards host ports on a user-mode NIC: '
                f"write {fix} "
                "(host 0 picks a free port; a forward binds 127.0.0.1 unless its address says otherwise)"
            )
        if key in ("image", "images"):
            url = value if isinstance(value, str) else "https://..."
            image = table(url=f'"{url}"', digest='"sha256:..."')
            fix = (
                f"disks: [{{image: {image}}}]"
                if yaml
                else f"[[machines.{name}.disks]] with image = {image}"
            )
            return (
                f"unknown key \"{key}\" (Lima's and compose's): a machine boots from its disks: write {fix} "
                "(downloaded and checked once, then cached), or give the disk the file of a downloaded image"
            )
        if key in ("mounts", "volumes"):
            fix = table(source='"path"', tag='"NAME"')
            return (
                f"unknown key \"{key}\" (Lima's and compose's): host directories are shares here: write "
                + (f"shares: [{fix}]" if yaml else f"[[machines.{name}.shares]] with {fix[2:-2]}")
                + " (mounted in the guest by its tag)"
            )
    if loc[-1:] == ("cmdline",) and isinstance(value, list):
        joined = " ".join(str(v) for v in value)
        return f'the kernel command line is one text, not a list: write cmdline{":" if yaml else " ="} "{joined}"'
    if loc[-1:] == ("restart",) and str(value) in _COMPOSE_RESTART:
        return (
            f'"{value}" is not a restart policy here (docker\'s words): use "{_COMPOSE_RESTART[str(value)]}" '
            '(one of "no", "on-failure", "always")'
        )
    return None


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "a list"
    return repr(value)
