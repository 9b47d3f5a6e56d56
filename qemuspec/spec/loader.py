"""From a definition file on disk to a validated :class:`File`.

Order of work: read, parse (TOML or YAML), render templates inside string values (spec/templates.py:
a variable is a value and can never add a key), validate. Each stage turns its failures into :class:`SpecError` paragraphs that name the file and line,
because the people reading them are editing that file.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Mapping

from qemuspec.errors import SpecError
from qemuspec.spec import limits
from qemuspec.spec.limits import format_of
from qemuspec.spec.models import File

if TYPE_CHECKING:
    import yaml


def load(
    path: str | os.PathLike[str],
    variables: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> File:
    """Load and validate one definition file. ``variables`` are the command line's --var values."""
    return load_located(path, variables, environ)[0]


def load_located(
    path: str | os.PathLike[str],
    variables: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    text: str | None = None,
) -> tuple[File, dict[tuple, int]]:
    """Like :func:`load`, with the map from key paths to line numbers (for later checks' messages).
    ``text``: the file's content when the caller has read it already (spec/cache.py)."""
    fmt = format_of(path)
    text = limits.read_definition(path) if text is None else text
    base_dir = os.path.dirname(os.path.abspath(path))
    return _load_text(text, fmt, str(path), base_dir, variables, environ)


def loads(
    text: str,
    fmt: str,
    source: str = "<string>",
    base_dir: str | None = None,
    variables: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> File:
    return _load_text(text, fmt, source, base_dir, variables, environ)[0]


def _load_text(
    text: str,
    fmt: str,
    source: str,
    base_dir: str | None,
    variables: Mapping[str, object] | None,
    environ: Mapping[str, str] | None,
) -> tuple[File, dict[tuple, int]]:
    limits.check_text(source, text)
    try:
        data, lines = parse(text, fmt, source)
    except SpecError as exc:
        from qemuspec.spec.templates import TEMPLATE_MARK

        if TEMPLATE_MARK.search(text):
            raise SpecError(
                exc.problems[0]
                + ". Templates are rendered inside quoted text values only, after the file "
                'is parsed, so they cannot add keys or tables: write for example memory = "{{ mem }}"'
            ) from None
        raise
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: the file must be a table of settings with a [machines.NAME] section, not {type(data).__name__}"
        )
    from qemuspec.spec.inherit import expand
    from qemuspec.spec.templates import render_values

    data = expand(data, lines, source)  # x-* keys dropped, templates and extends merged in
    data = render_values(data, lines, source, variables or {}, environ or {})
    from pydantic import ValidationError

    try:
        spec = File.model_validate(data, context={"base_dir": base_dir or os.getcwd()})
    except ValidationError as exc:
        from qemuspec.spec.messages import explain

        raise SpecError(explain(exc, data, source, lines)) from None
    for name, machine in spec.machines.items():
        if machine.overrides:  # allowed on purpose, and said every time the file is read
            import warnings

            from qemuspec.errors import QemuspecWarning
            from qemuspec.spec.passthrough import RULES, switch

            fields = ", ".join(f"{o} (not {RULES[switch(o)][1]})" for o in machine.overrides)
            line = lines.get(("machines", name, "overrides"))
            warnings.warn(
                f"{source}{':' + str(line) if line else ''}: machines.{name}: append overrides {fields}",
                QemuspecWarning,
                stacklevel=2,
            )
    return spec, lines


def parse(text: str, fmt: str, source: str) -> tuple[object, dict[tuple, int]]:
    """Parse text; return the data and a map from key paths to 1-based line numbers."""
    if fmt == "toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(_toml_syntax(str(exc), source)) from None
        except RecursionError:
            raise SpecError(
                f"{source}: values are nested more than {limits.MAX_DEPTH} levels deep: check the brackets"
            ) from None
        limits.check_depth(data, source)
        return data, toml_lines(text)
    if fmt == "yaml":
        return _yaml(text, source)
    raise SpecError(f"{source}: unknown format {fmt!r}: use toml or yaml")


def _toml_syntax(message: str, source: str) -> str:
    match = re.search(r"\(at line (\d+), column (\d+)\)", message)
    where = f"{source}:{match.group(1)}" if match else source
    what = re.sub(r"\s*\(at line \d+, column \d+\)|\s*\(at end of document\)", "", message)
    dup = re.match(r"Cannot (?:declare|overwrite a value) (?:\(([^)]*)\)|(.*)) twice", what)
    if dup or what.startswith("Cannot overwrite"):
        names = re.findall(r"'([^']*)'", what)
        path = ".".join(names)
        if len(names) == 2 and names[0] == "machines":
            return f'{where}: duplicate machine name "{names[1]}": each [machines.NAME] table may appear once; rename one of them'
        return f"{where}: {path or 'a key'} is defined twice: keep one of the definitions"
    col = f" (column {match.group(2)})" if match else ""
    return f'{where}: TOML syntax error{col}: {what}. Fix the syntax on that line; text values need quotes, for example memory = "256M"'


def toml_lines(text: str) -> dict[tuple, int]:
    """Where each table and key of a TOML text starts: tomllib keeps no positions, so scan the lines."""
    lines: dict[tuple, int] = {}
    header: tuple = ()
    counts: dict[tuple, int] = {}
    key_re = re.compile(
        r'^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\'))*)\s*='
    )
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[["):
            path = _toml_key(stripped[2 : stripped.find("]]")])
            index = counts.get(path, 0)
            counts[path] = index + 1
            header = path + (index,)
            lines.setdefault(path, number)
            lines[header] = number
        elif stripped.startswith("["):
            header = _toml_key(stripped[1 : stripped.find("]")])
            lines.setdefault(header, number)
        else:
            match = key_re.match(line)
            if match:
                lines.setdefault(header + _toml_key(match.group(1)), number)
    return lines


def _toml_key(raw: str) -> tuple:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([^.\s]+)', raw)
    return tuple(next(p for p in part if p) if any(part) else "" for part in parts)


class Lines(dict):
    """Key paths to 1-based line numbers; for YAML also ``yaml11``: the plain values YAML 1.1 reads as
    something other than what was typed (``no`` as false, ``22:22`` as the base-60 number 1342, ``010``
    as 8), path -> the text as written, so an error about such a value can say what happened."""

    def __init__(self) -> None:
        super().__init__()
        self.yaml11: dict[tuple, str] = {}


_BOOL = "tag:yaml.org,2002:bool"
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _yaml11_trap(node: yaml.ScalarNode) -> bool:
    """A plain scalar that YAML 1.1 (PyYAML) turns into a bool or a number people rarely mean by it."""
    if node.style is not None:
        return False
    if node.tag == _BOOL:
        return node.value.lower() not in ("true", "false")
    return node.tag in _NUMBERS and (
        ":" in node.value or re.match(r"^[-+]?0[0-7_]+$", node.value) is not None
    )


def _yaml(text: str, source: str) -> tuple[object, dict[tuple, int]]:
    import yaml

    try:
        loader = yaml.SafeLoader(text)  # checks the characters: a NUL is a ReaderError here
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML syntax error: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines = Lines()
        _yaml_walk(node, (), lines, source, limits.NodeBudget(source))
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        what = exc.problem or exc.context or "invalid YAML"
        raise SpecError(
            f"{where}: YAML syntax error (column {mark.column + 1 if mark else '?'}): {what}. "
            "Check the indentation and quoting on that line"
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML syntax error: {exc}") from None
    except RecursionError:
        raise SpecError(
            f"{source}: values are nested more than {limits.MAX_DEPTH} levels deep: check the brackets and indentation"
        ) from None
    except (
        ValueError,
        OverflowError,
        AttributeError,
        TypeError,
    ) as exc:  # "\U7fffffff", a bad !!timestamp, deep nesting
        raise SpecError(
            f"{source}: YAML error: {exc}: check escapes in quoted text and the nesting"
        ) from None
    finally:
        loader.dispose()
    return data, lines


def _yaml_walk(
    node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str, budget: "limits.NodeBudget"
) -> None:
    import yaml

    budget.visit(node, len(path))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(
                    f"{source}:{key_node.start_mark.line + 1}: a key must be a plain name, not a list or table"
                )
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                if path == ("machines",):
                    what = f'duplicate machine name "{key}" (first at line {seen[key]}): each machine name may appear once; rename one of them'
                else:
                    dotted = ".".join(str(p) for p in path + (key,))
                    what = f"{dotted} is defined twice (first at line {seen[key]}): keep one of the definitions"
                raise SpecError(f"{source}:{line}: {what}")
            seen[key] = line
            lines[path + (key,)] = line
            _yaml_walk(value_node, path + (key,), lines, source, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_walk(item, path + (index,), lines, source, budget)
    elif isinstance(node, yaml.ScalarNode) and isinstance(lines, Lines) and _yaml11_trap(node):
        lines.yaml11[path] = node.value
