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
_SUBPATH_IN_MESSAGE = re.compile(r"^((?:append|overrides|devices|objects|disks|nics|shares)(?:\.[A-Za-z0-9_-]+)*): ")


def explain(exc: ValidationError, data: object, source: str, lines: dict[tuple, int], root: type[BaseModel] = File) -> list[str]:
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
            message = message[sub.end():]
        found = _PATH_IN_MESSAGE.match(message)
        if found and not loc:
            loc = tuple(int(p) if p.isdigit() else p for p in found.group(1).split("."))
            message = message[found.end():]
        if loc in seen:
            continue  # another branch of a union: the first says it
        seen.add(loc)
        what = _describe(error, message, loc, root)
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
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [], n=1, cutoff=0.6)
            if close:
                out.add(loc[:-1] + (close[0],))
    return out


def located(source: str, lines: dict[tuple, int], problems: list[tuple[tuple, str]]) -> list[str]:
    """Paragraphs for problems found after validation (e.g. against the qemu binary), same format."""
    out = []
    for loc, message in problems:
        line = _line(lines, loc)
        out.append((line or 0, f"{source}:{line}: {dotted(loc)}: {message}" if line else f"{source}: {dotted(loc)}: {message}"))
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
        elif isinstance(current, dict) and isinstance(part, str) and last and "[" not in part and "(" not in part:
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
        hint = f'did you mean "{close[0]}"?' if close else f"the keys allowed here are: {', '.join(allowed)}"
        return f'unknown key "{key}": {hint}'
    if kind == "missing":
        return f'"{loc[-1] if loc else "value"}" is required here: add it'
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        close = difflib.get_close_matches(str(value), expected, n=1, cutoff=0.5)
        hint = f'did you mean "{close[0]}"?' if close else "use one of: " + ", ".join(f'"{e}"' for e in expected)
        return f'"{value}" is not allowed here: {hint}'
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number, got {_show(value)}: write it without quotes, for example 2"
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


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "a list"
    return repr(value)
