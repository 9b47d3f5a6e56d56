"""Bounds on what reading a definition may cost, so a hostile or broken file is a clear error and
never a hang, a memory blow-up or a traceback.

Documented limits (docs/architecture.md, "Loading limits"):

* a definition file is at most ``MAX_FILE_BYTES`` (1 MiB);
* YAML aliases may not expand the document beyond ``MAX_NODES`` nodes (a 600-byte "billion laughs"
  file otherwise becomes millions of nodes);
* nesting is at most ``MAX_DEPTH`` levels (TOML and YAML);
* a file a definition names for its text (cloud-init ``user_data_file``, ``network_config_file``) is
  a regular file of at most ``MAX_SOURCE_BYTES`` (a FIFO would hang ``up``, ``/dev/zero`` fill memory).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from qemuspec.errors import SpecError

if TYPE_CHECKING:
    import yaml

QEMU_NAME = (
    r"^(qemu-system-[A-Za-z0-9_]+|qemu-kvm|kvm)$"  # the binaries a definition may name (basename)
)

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_SOURCE_BYTES = 1024 * 1024


def check_size(source: str, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise SpecError(
            f"{source}: the file is {size} bytes; definition files may be at most {MAX_FILE_BYTES} bytes (1 MiB): "
            "split it, or move large text (cloud-init user data) into files it names"
        )


def check_text(source: str, text: str) -> None:
    """Text given to the loader directly (not read from a file): size, and valid Unicode."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise SpecError(
            f"{source}: the text is not valid Unicode (character {exc.start}: {exc.reason}): save the file as UTF-8"
        ) from None
    check_size(source, size)


def format_of(path: str | os.PathLike[str]) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise SpecError(
        f"{path}: cannot tell the format from the name: a definition file ends in .toml, .yaml or .yml"
    )


def read_definition(path: str | os.PathLike[str]) -> str:
    """A definition file's text, or a :class:`SpecError` that says why it cannot be read."""
    try:
        return read_text(path)
    except FileNotFoundError:
        raise SpecError(
            f"{path}: no such file: check the path, or create one with `qemuspec init {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the file: {exc}") from None


def read_text(path: str | os.PathLike[str]) -> str:
    """The file's text, refusing oversized files before reading them."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        check_size(str(path), size)
        data = f.read(MAX_FILE_BYTES + 1)
    check_size(str(path), len(data))
    return data.decode("utf-8")


def source_file_problem(path: str) -> str | None:
    """Why a file named for its text cannot be used (not a regular file, too large), or None. Only
    ``stat``: checking never opens a FIFO or a device."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    return _source_problem(path, info)


def _source_problem(path: str, info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(info.st_mode)
            else "a directory"
            if stat.S_ISDIR(info.st_mode)
            else "a device or socket"
        )
        return f"{path} is {kind}, not a regular file: name a file (its whole text is read)"
    if info.st_size > MAX_SOURCE_BYTES:
        return f"{path} is {info.st_size} bytes; such files may be at most {MAX_SOURCE_BYTES} bytes (1 MiB)"
    return None


def read_source_text(path: str) -> str:
    """The text of a file named for its text, checked again on the open file (it may have changed
    since ``validate``): opened non-blocking (a FIFO put there since cannot hang), regular, capped.
    ValueError says what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        problem = _source_problem(path, os.fstat(fd))
        if problem:
            raise ValueError(problem)
        data = f.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise ValueError(f"{path} grew past {MAX_SOURCE_BYTES} bytes (1 MiB) while being read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None


class NodeBudget:
    """Counts YAML nodes as a walk visits them, aliases expanded; raises past the limits."""

    def __init__(self, source: str):
        self.source = source
        self.nodes = 0

    def visit(self, node: yaml.Node, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SpecError(
                f"{self.source}:{node.start_mark.line + 1}: the document expands to more than {MAX_NODES} values "
                "(YAML aliases such as *name repeat what they point to): use fewer aliases"
            )
        if depth > MAX_DEPTH:
            raise SpecError(
                f"{self.source}:{node.start_mark.line + 1}: values are nested more than {MAX_DEPTH} levels deep: "
                "a definition needs only a few levels; check the brackets and indentation"
            )


def check_depth(data: object, source: str) -> None:
    """Nesting of parsed data (TOML): iterative, so a deep document cannot exhaust the stack here."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(
                f"{source}: values are nested more than {MAX_DEPTH} levels deep: "
                "a definition needs only a few levels; check the brackets"
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
