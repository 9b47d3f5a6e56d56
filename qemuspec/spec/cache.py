"""Validated definitions kept between runs: `status`, `down` and an `up` with nothing to do skip
templates, validation and pydantic itself when the file has not changed.

An entry is keyed by everything loading reads: the file's absolute path and bytes, the --var values,
the environment the templates see, HOME (paths may start with ~), and the code that validates
(qemuspec's spec package and pydantic, by file identity). Change any of them and the key changes;
the entry for the old key is never looked at again. Entries hold data only (spec/records.py
decodes it into records of known model kinds), live in a 0700 directory of the user's cache, are
written whole and renamed into place, and any entry that does not read back cleanly is a miss.
Invalid definitions are never cached, so every error is found and explained by the real loader.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Mapping, cast

if TYPE_CHECKING:
    from qemuspec.spec.models import File

FORMAT = 1
KEEP = 256  # entries kept; the oldest go when a write finds more


def _code_identity() -> list[object]:
    """What validates: qemuspec's spec package and the installed pydantic, by file identity."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, n) for n in sorted(os.listdir(here)) if n.endswith(".py")]
    files.append(os.path.join(os.path.dirname(here), "errors.py"))
    import importlib.util

    for package in ("pydantic", "pydantic_core"):
        found = importlib.util.find_spec(package)
        if found is not None and found.origin:
            files.append(found.origin)
    out: list[object] = []
    for path in files:
        st = os.stat(path)
        out.append([path, st.st_size, st.st_mtime_ns])
    return out


def key(path: str, text: bytes, variables: Mapping[str, object], environ: Mapping[str, str]) -> str:
    material = json.dumps(
        [
            FORMAT,
            os.path.abspath(path),
            hashlib.sha256(text).hexdigest(),
            sorted((str(k), str(v)) for k, v in variables.items()),
            sorted((str(k), str(v)) for k, v in environ.items()),
            os.path.expanduser("~"),
            _code_identity(),
        ]
    )  # what the models' `~` expands to
    return hashlib.sha256(material.encode()).hexdigest()


ENTRY_LIMIT = 64 * 1024 * 1024  # an entry larger than this is not ours


def read(where: str, entry_key: str) -> dict[str, Any] | None:
    """The entry for this key, or None: absent, damaged, not a regular file of ours, or in a
    directory that is not private (it, or an ancestor, writable by another user: privdir)."""
    from qemuspec import privdir

    with privdir.private(where, create=False) as dfd:
        if dfd is None:
            return None
        body = privdir.read(dfd, entry_key + ".json", ENTRY_LIMIT)
    if body is None:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != entry_key:
        return None
    return data


def write(where: str, entry_key: str, entry: dict[str, object]) -> None:
    """Best effort: a cache that cannot be written (or is not private) only costs the next run its speed."""
    from qemuspec import privdir

    body = json.dumps({"format": FORMAT, "key": entry_key, **entry}, separators=(",", ":")).encode()
    try:
        with privdir.private(where) as dfd:
            if dfd is None:
                return
            privdir.write(dfd, entry_key + ".json", body, sync=False)
            _prune(dfd)
    except OSError:
        pass


def _prune(dfd: int) -> None:
    names = [n for n in os.listdir(dfd) if n.endswith(".json")]
    if len(names) <= KEEP:
        return
    aged = sorted(names, key=lambda n: os.stat(n, dir_fd=dfd, follow_symlinks=False).st_mtime)
    for name in aged[: len(names) - KEEP]:
        try:
            os.unlink(name, dir_fd=dfd)
        except OSError:
            pass


def _plausible(spec: File, lines: dict, text: str) -> None:
    """A decoded entry still passes the cheap rules the loader enforces, so even an entry that got
    past the directory checks cannot name another program as qemu or point errors off the file."""
    import re

    from qemuspec.spec.limits import QEMU_NAME

    for machine in spec.machines.values():
        if not isinstance(machine.qemu, str) or not re.match(
            QEMU_NAME, os.path.basename(machine.qemu)
        ):
            raise ValueError("cached qemu binary breaks the name rule")
    last = text.count("\n") + 1
    if any(not 1 <= line <= last for line in lines.values()):
        raise ValueError("cached line numbers outside the file")


def load(
    path: str, variables: Mapping[str, object], environ: Mapping[str, str], where: str | None
) -> tuple[File, dict]:
    """Like loader.load_located, from the cache in ``where`` when the key matches (``where`` None:
    always afresh). Warnings the loader gave are given again, so a cached read says everything a
    fresh one says."""
    import warnings

    from qemuspec.errors import QemuspecWarning
    from qemuspec.spec import limits, records

    if where is None:
        from qemuspec.spec.loader import load_located

        return load_located(path, variables, environ)
    limits.format_of(path)  # a name that is no definition fails before any cache work
    text = limits.read_definition(path)
    entry_key = key(path, text.encode(), variables, environ)
    entry = read(where, entry_key)
    if entry is not None:
        try:
            # the one place a record stands for the model: records answer like File (spec/records.py)
            spec = cast("File", records.decode(entry["file"]))
            lines = {tuple(k): int(v) for k, v in entry["lines"]}
            said = [str(w) for w in entry["warnings"]]
            _plausible(spec, lines, text)
        except (KeyError, TypeError, ValueError, AttributeError):
            entry = None
        else:
            for message in said:
                warnings.warn(message, QemuspecWarning, stacklevel=2)
            return spec, lines
    from qemuspec.spec.loader import load_located

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QemuspecWarning)
        spec, lines = load_located(path, variables, environ, text=text)
    said = []
    for w in caught:
        if issubclass(w.category, QemuspecWarning):
            said.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        encoded = records.encode(spec)
    except records.NotCacheable:
        return spec, lines
    write(
        where,
        entry_key,
        {"file": encoded, "lines": [[list(k), v] for k, v in lines.items()], "warnings": said},
    )
    return spec, lines
