"""Template variables inside a parsed definition.

Definitions come from pull requests and other people's repositories, so templates are treated as
hostile: the file is parsed *first* and only string values are rendered, so a variable is always a
value and can never add a key (a ``--var`` holding ``"`` and a newline stays one string). Rendering
uses Jinja2's immutable sandbox, with bounds on what one file may cost: operators that multiply sizes
are checked before they run, ``range`` shares one budget per file, the output of each value is
capped, and the whole file's rendering has a deadline enforced from a trace hook, which works in any
thread. Every failure is a :class:`SpecError` naming the file, the line and the key.
"""

from __future__ import annotations

import difflib
import re
import sys
import time
import warnings
from typing import Any, Iterator, Mapping

from qemuspec.errors import QemuspecWarning, SpecError

TEMPLATE_MARK = re.compile(r"\{\{|\{%|\{#")
ENV_PREFIX = "QEMUSPEC_VAR_"
# Known only when a machine starts (cloud-init text): left as template text until then.
LATE_VARIABLES = ("ssh_public_key", "machine_name")
_WHOLE = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")

MAX_VALUE_CHARS = 1 << 20  # one rendered value
MAX_ITEMS = 100_000  # range() items, and the length of a sequence an operator may build
MAX_SECONDS = 2.0  # the whole file


_STR_BLOCKED = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"})


class _Exhausted(Exception):
    """A template went over one of the bounds above."""


def _sandbox() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})
        intercepted_unops = frozenset()

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and not isinstance(right, bool) and abs(right) > 64:
                raise _Exhausted(f"an exponent of {right} (templates allow at most 64)")
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_VALUE_CHARS:
                        raise _Exhausted(f"a value of {len(seq) * count} items (at most {MAX_VALUE_CHARS})")
                if isinstance(left, int) and isinstance(right, int) and (left.bit_length() + right.bit_length()) > 4096:
                    raise _Exhausted("a number of more than 4096 bits")
            if operator == "%" and isinstance(left, str):
                raise _Exhausted('"%" formatting (use ~ to join text)')
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj: Any, attribute: str) -> Any:
            # String methods that pad or format to a size the template chooses (the sandbox would
            # otherwise hand out a "safe" str.format that still builds a string of any width).
            if isinstance(obj, str) and attribute in _STR_BLOCKED:
                return self.unsafe_undefined(obj, attribute)
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            if isinstance(obj, str) and argument in _STR_BLOCKED:
                return self.unsafe_undefined(obj, argument)
            return super().getitem(obj, argument)

    env = Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    for name in ("center", "indent", "wordwrap", "format", "truncate", "xmlattr", "tojson", "pprint", "urlize", "filesizeformat"):
        env.filters.pop(name, None)  # size-amplifying or pointless in a definition
    budget = [MAX_ITEMS]

    def bounded_range(*args: int) -> range:
        items = range(*args)
        budget[0] -= len(items)
        if budget[0] < 0:
            raise _Exhausted(f"range() over more than {MAX_ITEMS} items in one file")
        return items

    env.globals = {"range": bounded_range, "dict": dict}  # no cycler, joiner, namespace or lipsum
    return env


def variables_for(file_vars: Any, source: str, environ: Mapping[str, str], given: Mapping[str, Any]) -> tuple[dict[str, Any], set[str], set[str]]:
    """Merged variables ([vars] < QEMUSPEC_VAR_* < --var) and the names that came from env and --var."""
    if file_vars is None:
        file_vars = {}
    if not isinstance(file_vars, dict):
        raise SpecError(f'{source}: vars must be a table of names and values, for example [vars] memory = "256M"')
    merged: dict[str, Any] = dict(file_vars)
    from_env = {k[len(ENV_PREFIX):]: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    merged.update(from_env)
    merged.update(given)
    for late in LATE_VARIABLES:
        merged.setdefault(late, "{{ %s }}" % late)
    return merged, set(from_env), set(given)


def render_values(data: dict[str, Any], lines: dict[tuple, int], source: str, given: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Render every template string in ``data`` (but ``vars`` itself); check every --var is used."""
    merged, from_env, from_cli = variables_for(data.get("vars"), source, environ, given)
    strings = list(_template_strings(data, ()))
    used: set[str] = set()
    if strings:
        env = _sandbox()
        from jinja2 import meta

        with _deadline(MAX_SECONDS):
            for path, text in strings:
                where = _where(source, lines, path)
                template, names = _compile(env, meta, text, where, path)
                used |= names
                _set(data, path, _render(template, text, names, merged, where, path))
    unused = sorted(from_cli - used)
    if unused:
        known = sorted(used | set(data.get("vars") or {}))
        close = difflib.get_close_matches(unused[0], known, n=1)
        hint = f'did you mean "{close[0]}"?' if close else (f"the file's templates use: {', '.join(known)}" if known else "the file uses no template variables")
        raise SpecError(f'{source}: --var {unused[0]} is not used by any template in this file: {hint} (remove the --var, or fix its name)')
    for name in sorted(from_env - used):
        close = difflib.get_close_matches(name, sorted(used), n=1)
        if close:
            warnings.warn(f'{source}: {ENV_PREFIX}{name} is set but not used; the file uses "{close[0]}" (did you mean {ENV_PREFIX}{close[0]}?)', QemuspecWarning, stacklevel=2)
    return data


def _template_strings(value: Any, path: tuple) -> Iterator[tuple[tuple, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if path == () and key == "vars":
                continue  # variables are values, not templates
            yield from _template_strings(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _template_strings(item, path + (index,))
    elif isinstance(value, str) and TEMPLATE_MARK.search(value):
        yield path, value


def _where(source: str, lines: dict[tuple, int], path: tuple) -> str:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return f"{source}:{lines[path[:cut]]}"
    return source


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _compile(env: Any, meta: Any, text: str, where: str, path: tuple) -> tuple[Any, set[str]]:
    import jinja2

    try:
        tree = env.parse(text)
        return env.from_string(tree), set(meta.find_undeclared_variables(tree))
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(f"{where}: {_dotted(path)}: template syntax error: {exc.message}. Check the {{{{ }}}} and {{% %}} in this value") from None
    except (_Exhausted, RecursionError, MemoryError) as exc:
        raise SpecError(f"{where}: {_dotted(path)}: the template is too large or too deep ({exc}): simplify it") from None


def _render(template: Any, text: str, names: set[str], variables: Mapping[str, Any], where: str, path: tuple) -> Any:
    import jinja2
    from jinja2.exceptions import SecurityError

    whole = _WHOLE.match(text)
    if whole and whole.group(1) in variables and not isinstance(variables[whole.group(1)], str):
        return variables[whole.group(1)]  # "{{ cpus }}" with cpus = 2 stays the number 2
    field = _dotted(path)
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_VALUE_CHARS:
                raise _Exhausted(f"a value over {MAX_VALUE_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    except jinja2.UndefinedError as exc:
        missing = sorted(n for n in names if n not in variables)
        if missing:
            var = missing[0]
            close = difflib.get_close_matches(var, sorted(variables), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise SpecError(
                f'{where}: {field}: template variable "{var}" is not defined{hint}: define it under [vars], '
                f"set the environment variable {ENV_PREFIX}{var}, or pass --var {var}=VALUE"
            ) from None
        raise SpecError(f"{where}: {field}: template error: {exc.message or exc}. Templates may only use variables and filters") from None
    except SecurityError as exc:
        raise SpecError(f"{where}: {field}: the template tried something a definition may not do ({exc}): templates may only use variables, filters and simple expressions") from None
    except _Exhausted as exc:
        raise SpecError(f"{where}: {field}: the template went over a limit: {exc}. Simplify the template") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise SpecError(f"{where}: {field}: the template is too large or too deep ({type(exc).__name__}): simplify it") from None
    except Exception as exc:  # any runtime error of the template's own expressions: 1/0, int("x"), ...
        raise SpecError(f"{where}: {field}: template error: {type(exc).__name__}: {exc}. Fix the expression in this value") from None


def _set(data: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


class _deadline:
    """Stop template code that runs longer than ``seconds``: a trace hook counts lines (any thread)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> None:
        self.previous = sys.gettrace()
        end = time.monotonic() + self.seconds
        count = [0]

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            count[0] += 1
            if count[0] % 1000 == 0 and time.monotonic() > end:
                raise _Exhausted(f"template rendering took more than {self.seconds:g} s")
            return tracer if frame.f_code.co_filename == "<template>" else None

        sys.settrace(tracer)

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self.previous)


def render_text(text: str, variables: Mapping[str, Any], what: str) -> str:
    """One whole text (cloud-init data read at start) through the same sandbox and bounds."""
    env = _sandbox()
    with _deadline(MAX_SECONDS):
        from jinja2 import meta

        template, names = _compile(env, meta, text, what, ())
        return _render(template, "", names, variables, what, ())
