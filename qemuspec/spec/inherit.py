"""Sharing settings between machines, so a three-machine file does not repeat itself.

Two ways, one for each format's habits:

- ``x-*`` top-level keys are ignored, as in docker compose: in YAML they hold anchors
  (``x-base: &base {...}`` then ``<<: *base``), which the YAML parser has resolved already.
- ``extends = "NAME"`` (or a list, merged in order) in a machine takes the settings of a
  ``[templates.NAME]`` table (a partial machine, never started) or of another machine; TOML has no
  anchors. Tables merge key by key, deeper tables too; a list or a value the machine sets replaces
  the inherited one (so ``disks`` are not appended to: say them all). Templates may extend others.

Runs on the parsed data, before templates are rendered and the models validate it: what comes out
is an ordinary file, so every later check (and its line numbers: an inherited key points at the
line it was written on) is the same.
"""

from __future__ import annotations

import copy
import difflib

from qemuspec.errors import SpecError

TEMPLATES = "templates"
EXTENDS = "extends"
MAX_DEPTH = 16  # a chain of extends this long is a mistake (and bounds the work)


def expand(data: dict, lines: dict[tuple, int], source: str) -> dict:
    """``data`` without ``x-*`` keys and templates, every ``extends`` merged in; ``lines`` gains the
    inherited keys' line numbers."""
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    templates = data.pop(TEMPLATES, None)
    if templates is None:
        templates = {}
    if not isinstance(templates, dict) or not all(isinstance(t, dict) for t in templates.values()):
        _fail(
            source,
            lines,
            (TEMPLATES,),
            "each template is a table of machine settings: [templates.NAME]",
        )
    machines = data.get("machines")
    if not isinstance(machines, dict) or not any(
        isinstance(m, dict) and EXTENDS in m for m in machines.values()
    ):
        if templates and isinstance(machines, dict):
            _check_template_extends(templates, source, lines)
        return data
    done: dict[tuple, dict] = {}

    def resolved(kind: str, name: str, chain: tuple) -> dict:
        key = (kind, name)
        if key in done:
            return done[key]
        table = (templates if kind == TEMPLATES else machines)[name]
        if not isinstance(table, dict):
            return {}
        parents = table.get(EXTENDS)
        if parents is None:
            done[key] = table
            return table
        where = (kind, name, EXTENDS)
        names = [parents] if isinstance(parents, str) else parents
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            _fail(source, lines, where, 'write extends = "NAME" or extends = ["NAME", ...]')
        merged: dict = {}
        for parent in names:
            if parent in templates:
                pkind = TEMPLATES
            elif parent in machines and kind == "machines":
                pkind = "machines"
            else:
                known = list(templates) + (list(machines) if kind == "machines" else [])
                close = difflib.get_close_matches(parent, known, n=1)
                hint = (
                    f'did you mean "{close[0]}"?'
                    if close
                    else f"declare [templates.{parent}] (known: {', '.join(known) or 'none'})"
                )
                _fail(source, lines, where, f'no template or machine named "{parent}": {hint}')
            if (pkind, parent) in chain or len(chain) >= MAX_DEPTH:
                cycle = " -> ".join(n for _, n in (*chain, (pkind, parent)))
                _fail(source, lines, where, f"extends goes round in a circle ({cycle}): break it")
            merged = _merge(merged, resolved(pkind, parent, (*chain, (pkind, parent))))
            _inherit_lines(lines, (pkind, parent), (kind, name))
        own = {k: v for k, v in table.items() if k != EXTENDS}
        result = _merge(merged, own)
        done[key] = result
        return result

    data["machines"] = {
        name: resolved("machines", name, (("machines", name),)) if isinstance(m, dict) else m
        for name, m in machines.items()
    }
    return data


def _check_template_extends(templates: dict, source: str, lines: dict[tuple, int]) -> None:
    for name, table in templates.items():
        parent = table.get(EXTENDS)
        for p in [parent] if isinstance(parent, str) else parent or []:
            if p not in templates:
                _fail(
                    source,
                    lines,
                    (TEMPLATES, name, EXTENDS),
                    f'no template named "{p}": templates extend only templates',
                )


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: tables merged key by key, anything else replaced; copies only."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _inherit_lines(lines: dict[tuple, int], parent: tuple, child: tuple) -> None:
    """An inherited key's line is the line it was written on, unless the child writes it."""
    for path, line in list(lines.items()):
        if path[: len(parent)] == parent and len(path) > len(parent):
            lines.setdefault(child + path[len(parent) :], line)


def _fail(source: str, lines: dict[tuple, int], where: tuple, why: str) -> None:
    from qemuspec.spec.messages import located

    raise SpecError(located(source, lines, [(where, why)]))
