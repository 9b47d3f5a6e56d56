"""From a definition file on disk to a validated :class:`File`.

Order of work: read, template (Jinja2, only when the text has template syntax), parse (TOML or YAML),
validate. Each stage turns its failures into :class:`SpecError` paragraphs that name the file and line,
because the people reading them are editing that file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from qemuspec.errors import SpecError
from qemuspec.spec import limits
from qemuspec.spec.models import File

_TEMPLATE_MARK = re.compile(r"\{\{|\{%|\{#")
ENV_PREFIX = "QEMUSPEC_VAR_"
LATE_VARIABLES = ("ssh_public_key", "machine_name")


def format_of(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise SpecError(
        f"{path}: cannot tell the format from the name: a definition file ends in .toml, .yaml or .yml"
    )


def load(
    path: str | os.PathLike[str],
    variables: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> File:
    """Load and validate one definition file. ``variables`` are the command line's --var values."""
    return load_located(path, variables, environ)[0]


def load_located(
    path: str | os.PathLike[str],
    variables: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[File, dict[tuple, int]]:
    """Like :func:`load`, with the map from key paths to line numbers (for later checks' messages)."""
    fmt = format_of(path)
    try:
        text = limits.read_text(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file: check the path, or create one with `qemuspec init {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the file: {exc}") from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return _load_text(text, fmt, str(path), base_dir, variables, environ)


def loads(
    text: str,
    fmt: str,
    source: str = "<string>",
    base_dir: str | None = None,
    variables: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> File:
    return _load_text(text, fmt, source, base_dir, variables, environ)[0]


def _load_text(
    text: str,
    fmt: str,
    source: str,
    base_dir: str | None,
    variables: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
) -> tuple[File, dict[tuple, int]]:
    limits.check_text(source, text)
    if _TEMPLATE_MARK.search(text):
        merged = dict(_file_vars(text, fmt, source))
        env = os.environ if environ is None else environ
        merged.update({k[len(ENV_PREFIX):]: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        merged.update(variables or {})
        for late in LATE_VARIABLES:  # known only at start: kept as template text for cloud-init
            merged.setdefault(late, "{{ %s }}" % late)
        text = _template(text, merged, source)
    data, lines = parse(text, fmt, source)
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the file must be a table of settings with a [machines.NAME] section, not {type(data).__name__}")
    from pydantic import ValidationError

    try:
        return File.model_validate(data, context={"base_dir": base_dir or os.getcwd()}), lines
    except ValidationError as exc:
        from qemuspec.spec.messages import explain

        raise SpecError(explain(exc, data, source, lines)) from None


def parse(text: str, fmt: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse text; return the data and a map from key paths to 1-based line numbers."""
    if fmt == "toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(_toml_syntax(str(exc), source)) from None
        except RecursionError:
            raise SpecError(f"{source}: values are nested more than {limits.MAX_DEPTH} levels deep: check the brackets") from None
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
    return f"{where}: TOML syntax error{col}: {what}. Fix the syntax on that line; text values need quotes, for example memory = \"256M\""


def toml_lines(text: str) -> dict[tuple, int]:
    """Where each table and key of a TOML text starts: tomllib keeps no positions, so scan the lines."""
    lines: dict[tuple, int] = {}
    header: tuple = ()
    counts: dict[tuple, int] = {}
    key_re = re.compile(r'^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\'))*)\s*=')
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


def _yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    import yaml

    try:
        loader = yaml.SafeLoader(text)  # checks the characters: a NUL is a ReaderError here
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML syntax error: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[tuple, int] = {}
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
        raise SpecError(f"{source}: values are nested more than {limits.MAX_DEPTH} levels deep: check the brackets and indentation") from None
    except (ValueError, OverflowError, AttributeError, TypeError) as exc:  # "\U7fffffff", a bad !!timestamp, deep nesting
        raise SpecError(f"{source}: YAML error: {exc}: check escapes in quoted text and the nesting") from None
    finally:
        loader.dispose()
    return data, lines


def _yaml_walk(node: Any, path: tuple, lines: dict[tuple, int], source: str, budget: "limits.NodeBudget") -> None:
    import yaml

    budget.visit(node, len(path))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(f"{source}:{key_node.start_mark.line + 1}: a key must be a plain name, not a list or table")
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                if path == ("machines",):
                    what = f'duplicate machine name "{key}" (first at line {seen[key]}): each machine name may appear once; rename one of them'
                else:
                    dotted = ".".join(str(p) for p in path + (key,))
                    what = f'{dotted} is defined twice (first at line {seen[key]}): keep one of the definitions'
                raise SpecError(f"{source}:{line}: {what}")
            seen[key] = line
            lines[path + (key,)] = line
            _yaml_walk(value_node, path + (key,), lines, source, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_walk(item, path + (index,), lines, source, budget)


def _file_vars(text: str, fmt: str, source: str) -> dict[str, Any]:
    """The file's own [vars], read before templating: the rest of the file may not parse until then."""
    if fmt == "toml":
        match = re.search(r"^\[vars\][^\n]*\n(.*?)(?=^\s*\[|\Z)", text, re.M | re.S)
        section = "[vars]\n" + match.group(1) if match else ""
    else:
        match = re.search(r"^vars:[^\n]*\n((?:[ \t]+[^\n]*\n?|\s*\n)*)", text, re.M)
        section = "vars:\n" + match.group(1) if match else ""
    if not section or _TEMPLATE_MARK.search(section):
        return {}
    data, _ = parse(section, fmt, source)
    found = (data or {}).get("vars") or {}
    if not isinstance(found, dict):
        raise SpecError(f"{source}: vars must be a table of names and values, for example [vars] memory = \"256M\"")
    return found


def _template(text: str, variables: Mapping[str, Any], source: str) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        template = env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(f"{source}:{exc.lineno}: template syntax error: {exc.message}. Check the {{{{ }}}} and {{% %}} on that line") from None
    except (RecursionError, MemoryError, SyntaxError):
        raise SpecError(f"{source}: template nested too deeply: check the {{{{ }}}} and {{% %}} brackets") from None
    try:
        return template.render(**variables)
    except jinja2.UndefinedError as exc:
        line = _template_line(exc)
        where = f"{source}:{line}" if line else source
        name = re.search(r"'([^']+)' is undefined", str(exc))
        if name:
            var = name.group(1)
            raise SpecError(
                f'{where}: template variable "{var}" is not defined: define it under [vars], '
                f"set the environment variable {ENV_PREFIX}{var}, or pass --var {var}=VALUE"
            ) from None
        raise SpecError(f"{where}: template error: {exc}") from None
    except jinja2.TemplateError as exc:
        line = _template_line(exc)
        raise SpecError(f"{source}{':' + str(line) if line else ''}: template error: {exc}") from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError, MemoryError) as exc:
        line = _template_line(exc)  # {{ 1/0 }}, {{ "a" + 1 }}, {{ [][0] }}: the file's mistake, said as one
        raise SpecError(f"{source}{':' + str(line) if line else ''}: template error: {type(exc).__name__}: {exc}. Fix the expression on that line") from None


def _template_line(exc: BaseException) -> int | None:
    """Jinja rewrites tracebacks so template frames carry template line numbers; take the last."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
