"""Template variables inside a parsed definition.

Definitions come from pull requests and other people's repositories, so templates are treated as
hostile: the file is parsed *first* and only string values are rendered, so a variable is always a
value and can never add a key (a ``--var`` holding ``"`` and a newline stays one string). Rendering
uses Jinja2's immutable sandbox, with bounds on what one file may cost. Checks in the sandbox give a
clear message for the usual ways to blow up (``*`` and ``**`` are costed before they run, ``range``
shares one budget per file, each value and the whole file's output are capped). They cannot be the
bound itself: a single C-level operation (``(10**64)**64**...``, a string method building gigabytes)
never returns to Python, so no trace hook or check in between can stop it. The bound is a process:
one file's templates render in a forked child with an address-space and a CPU limit, killed at a
wall-clock deadline; only the rendered strings come back. Every failure is a :class:`SpecError`
naming the file, the line and the key.
"""

from __future__ import annotations

import difflib
import os
import re
import time
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from qemuspec.errors import QemuspecWarning, SpecError

if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.runtime import Context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_MARK = re.compile(r"\{\{|\{%|\{#")
ENV_PREFIX = "QEMUSPEC_VAR_"
# Known only when a machine starts (cloud-init text): left as template text until then.
LATE_VARIABLES = ("ssh_public_key", "machine_name")
_WHOLE = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")

MAX_VALUE_CHARS = 1 << 20  # one rendered value
MAX_FILE_CHARS = 8 << 20  # every rendered value of one file together
MAX_ITEMS = 100_000  # range() items, and the length of a sequence an operator may build
MAX_INT_BITS = 4096  # the largest number an operator may build
MAX_SECONDS = 2.0  # the whole file, wall clock (the rendering child is killed then)
MAX_MEMORY = 256 << 20  # address space the rendering child may add to what it inherits


_STR_BLOCKED = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"}
)


class _Exhausted(Exception):
    """A template went over one of the bounds above."""


def _sandbox() -> ImmutableSandboxedEnvironment:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})
        intercepted_unops = frozenset()

        def call_binop(
            self, context: Context, operator: str, left: object, right: object
        ) -> object:
            if (
                operator == "**"
                and isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() * right > MAX_INT_BITS
            ):
                # costed by the bits of the result before it is built: (10**64)**64 never starts
                raise _Exhausted(
                    f"an exponent of {right} on a {left.bit_length()}-bit number: a number of up to "
                    f"{left.bit_length() * right} bits (templates allow {MAX_INT_BITS})"
                )
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if (
                        isinstance(seq, (str, bytes, list, tuple))
                        and isinstance(count, int)
                        and len(seq) * count > MAX_VALUE_CHARS
                    ):
                        raise _Exhausted(
                            f"a value of {len(seq) * count} items (at most {MAX_VALUE_CHARS})"
                        )
                if (
                    isinstance(left, int)
                    and isinstance(right, int)
                    and (left.bit_length() + right.bit_length()) > MAX_INT_BITS
                ):
                    raise _Exhausted(f"a number of more than {MAX_INT_BITS} bits")
            if operator == "%" and isinstance(left, (str, bytes)):
                raise _Exhausted('"%" formatting (use ~ to join text)')
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj: object, attribute: str) -> object:
            # String methods that pad or format to a size the template chooses (the sandbox would
            # otherwise hand out a "safe" str.format that still builds a string of any width).
            if isinstance(obj, str) and attribute in _STR_BLOCKED:
                return self.unsafe_undefined(obj, attribute)
            return super().getattr(obj, attribute)

        def getitem(self, obj: object, argument: object) -> object:
            if isinstance(obj, str) and argument in _STR_BLOCKED:
                return self.unsafe_undefined(obj, argument)
            return super().getitem(obj, argument)

    env = Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    for name in (
        "center",
        "indent",
        "wordwrap",
        "format",
        "truncate",
        "xmlattr",
        "tojson",
        "pprint",
        "urlize",
        "filesizeformat",
    ):
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


def variables_for(
    file_vars: object, source: str, environ: Mapping[str, str], given: Mapping[str, object]
) -> tuple[dict[str, object], set[str], set[str]]:
    """Merged variables ([vars] < QEMUSPEC_VAR_* < --var) and the names that came from env and --var."""
    if file_vars is None:
        file_vars = {}
    if not isinstance(file_vars, dict):
        raise SpecError(
            f'{source}: vars must be a table of names and values, for example [vars] memory = "256M"'
        )
    merged: dict[str, object] = dict(file_vars)
    from_env = {k[len(ENV_PREFIX) :]: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    merged.update(from_env)
    merged.update(given)
    for late in LATE_VARIABLES:
        merged.setdefault(late, "{{ %s }}" % late)
    return merged, set(from_env), set(given)


def render_values(
    data: dict[str, Any],
    lines: dict[tuple, int],
    source: str,
    given: Mapping[str, object],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """Render every template string in ``data`` (but ``vars`` itself); check every --var is used."""
    merged, from_env, from_cli = variables_for(data.get("vars"), source, environ, given)
    strings = list(_template_strings(data, ()))
    used: set[str] = set()
    jobs = [(text, _where(source, lines, path), path) for path, text in strings]
    for (path, _), (value, names) in zip(strings, _bounded(jobs, merged)):
        used |= names
        _set(data, path, value)
    unused = sorted(from_cli - used)
    if unused:
        known = sorted(used | set(data.get("vars") or {}))
        close = difflib.get_close_matches(unused[0], known, n=1)
        hint = (
            f'did you mean "{close[0]}"?'
            if close
            else (
                f"the file's templates use: {', '.join(known)}"
                if known
                else "the file uses no template variables"
            )
        )
        raise SpecError(
            f"{source}: --var {unused[0]} is not used by any template in this file: {hint} (remove the --var, or fix its name)"
        )
    for name in sorted(from_env - used):
        close = difflib.get_close_matches(name, sorted(used), n=1)
        if close:
            warnings.warn(
                f'{source}: {ENV_PREFIX}{name} is set but not used; the file uses "{close[0]}" (did you mean {ENV_PREFIX}{close[0]}?)',
                QemuspecWarning,
                stacklevel=2,
            )
    return data


def _template_strings(value: object, path: tuple) -> Iterator[tuple[tuple, str]]:
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


def _compile(
    env: ImmutableSandboxedEnvironment, meta: ModuleType, text: str, where: str, path: tuple
) -> tuple[Template, set[str]]:
    import jinja2

    try:
        tree = env.parse(text)
        return env.from_string(tree), set(meta.find_undeclared_variables(tree))
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(
            f"{where}: {_dotted(path)}: template syntax error: {exc.message}. Check the {{{{ }}}} and {{% %}} in this value"
        ) from None
    except (_Exhausted, RecursionError, MemoryError) as exc:
        raise SpecError(
            f"{where}: {_dotted(path)}: the template is too large or too deep ({exc}): simplify it"
        ) from None


def _render(
    template: Template,
    names: set[str],
    variables: Mapping[str, object],
    where: str,
    path: tuple,
    budget: list[int],
) -> str:
    import jinja2
    from jinja2.exceptions import SecurityError

    field = _dotted(path)
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_VALUE_CHARS:
                raise _Exhausted(f"a value over {MAX_VALUE_CHARS} characters")
            out.append(chunk)
        budget[0] -= size
        if budget[0] < 0:
            raise _Exhausted(
                f"more than {MAX_FILE_CHARS} characters of rendered values in one file"
            )
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
        raise SpecError(
            f"{where}: {field}: template error: {exc.message or exc}. Templates may only use variables and filters"
        ) from None
    except SecurityError as exc:
        raise SpecError(
            f"{where}: {field}: the template tried something a definition may not do ({exc}): templates may only use variables, filters and simple expressions"
        ) from None
    except _Exhausted as exc:
        raise SpecError(
            f"{where}: {field}: the template went over a limit: {exc}. Simplify the template"
        ) from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise SpecError(
            f"{where}: {field}: the template is too large or too deep ({type(exc).__name__}): simplify it"
        ) from None
    except (
        Exception
    ) as exc:  # any runtime error of the template's own expressions: 1/0, int("x"), ...
        raise SpecError(
            f"{where}: {field}: template error: {type(exc).__name__}: {exc}. Fix the expression in this value"
        ) from None


def _set(data: dict | list, path: tuple, value: object) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _bounded(
    jobs: Sequence[tuple[str, str, tuple]], variables: Mapping[str, object]
) -> list[tuple[object, set[str]]]:
    """(value, variable names) for each (text, where, key path) of one file, rendered within the bounds.

    A whole-value ``"{{ cpus }}"`` of a non-string variable is that value (the number 2 stays 2) and
    needs no rendering. The rest render in a forked child: RLIMIT_AS caps what it may allocate,
    RLIMIT_CPU ends it if this process dies, and it is killed ``MAX_SECONDS`` after the fork. It sends
    one JSON line per value (``{"at": i}`` first, so a timeout names the value); nothing else of the
    child's comes back, and a child that dies or says anything malformed is a limit, not a result.
    """
    out: list[tuple[object, set[str]] | None] = []
    todo: list[int] = []
    for index, (text, _, _) in enumerate(jobs):
        whole = _WHOLE.match(text)
        if whole and whole.group(1) in variables and not isinstance(variables[whole.group(1)], str):
            out.append((variables[whole.group(1)], {whole.group(1)}))
        else:
            out.append(None)
            todo.append(index)
    if todo:
        env = _sandbox()  # jinja2 is imported here, once, not in every child
        env.from_string(
            "{{ x }}{% if x %}{% endif %}"
        )  # builds the lexer and compiler state once, before the fork
        for index, value, names in _in_child(env, [jobs[i] for i in todo], variables):
            out[todo[index]] = (value, names)
    return out  # type: ignore[return-value]


def _in_child(
    env: ImmutableSandboxedEnvironment,
    jobs: Sequence[tuple[str, str, tuple]],
    variables: Mapping[str, object],
) -> Iterator[tuple[int, str, set[str]]]:
    import json
    import select
    import signal

    read_end, write_end = os.pipe()
    try:
        with (
            warnings.catch_warnings()
        ):  # Python 3.12 warns about fork in a threaded process; the child runs no thread's code
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise SpecError(
            f"{jobs[0][1]}: cannot start a process to render the templates in ({exc}): "
            "free memory or processes (ulimit -u) and try again"
        ) from None
    if pid == 0:  # pragma: no cover - the child; it never returns into the caller's code
        code = 1
        try:
            os.close(read_end)
            _child(env, jobs, variables, write_end)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + MAX_SECONDS
    buffer = bytearray()
    reaped = False
    timed_out = False
    poller = select.poll()  # not select(): a library caller may hold more than 1024 descriptors
    poller.register(read_end, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                timed_out = True
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            if (
                len(buffer) > 8 * MAX_FILE_CHARS
            ):  # more than the child may say: it is not ours any more
                break
        if timed_out or len(buffer) > 8 * MAX_FILE_CHARS:
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        reaped = True
    finally:
        os.close(read_end)
        if not reaped:  # interrupted (Ctrl-C): the child goes too
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    current = 0
    results: list[tuple[int, str, set[str]]] = []
    for line in bytes(buffer).split(b"\n"):
        try:
            message = json.loads(line.decode("utf-8", "surrogatepass")) if line else None
        except ValueError:
            message = None
        if (
            isinstance(message, dict)
            and isinstance(message.get("at"), int)
            and 0 <= message["at"] < len(jobs)
        ):
            current = message["at"]
        elif (
            isinstance(message, dict)
            and isinstance(message.get("value"), str)
            and isinstance(message.get("names"), list)
        ):
            results.append((current, message["value"], {str(n) for n in message["names"]}))
        elif isinstance(message, dict) and isinstance(message.get("error"), str):
            raise SpecError(message["error"])
    if (
        len(results) == len(jobs)
        and os.WIFEXITED(status)
        and os.WEXITSTATUS(status) == 0
        and not timed_out
    ):
        return iter(results)
    _, where, path = jobs[current]
    if timed_out:
        raise SpecError(
            f"{where}: {_dotted(path)}: template rendering took more than {MAX_SECONDS:g} s: simplify the template"
        )
    raise SpecError(
        f"{where}: {_dotted(path)}: the template went over a limit ({MAX_MEMORY >> 20} MiB of memory, or CPU time): "
        "simplify the template"
    )


def _child(
    env: ImmutableSandboxedEnvironment,
    jobs: Sequence[tuple[str, str, tuple]],
    variables: Mapping[str, object],
    write_end: int,
) -> None:
    """The forked child's work: limits first, then each value; errors go back as their paragraph."""
    import json
    import math
    import resource

    os.closerange(
        3, write_end
    )  # the caller's files, sockets and locks are none of the templates' business
    os.closerange(write_end + 1, 1 << 16)
    with open("/proc/self/statm", "rb") as f:
        inherited = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (inherited + MAX_MEMORY, inherited + MAX_MEMORY))
    seconds = math.ceil(MAX_SECONDS) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    from jinja2 import meta

    def send(message: dict) -> None:
        data = (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view) :]

    budget = [MAX_FILE_CHARS]
    try:
        for index, (text, where, path) in enumerate(jobs):
            send({"at": index})
            template, names = _compile(env, meta, text, where, path)
            send(
                {
                    "value": _render(template, names, variables, where, path, budget),
                    "names": sorted(names),
                }
            )
    except SpecError as exc:
        send({"error": str(exc)})


def render_text(text: str, variables: Mapping[str, object], what: str) -> str:
    """One whole text (cloud-init data read at start) through the same sandbox and bounds."""
    return str(_bounded([(text, what, ())], variables)[0][0])
