"""Validated models as plain records, for commands that must not pay for pydantic.

Importing pydantic and building the models costs 150-250 ms on a small box, several times the
interpreter's own start. A definition read back from the cache (spec/cache.py) was validated when
the entry was written; its models come back as :class:`Record` objects that answer attribute reads
the way the models do, carry the dumps and hashes pydantic computed at that time, and turn into the
real model (``model_construct``, no validation: the values already passed it) the first time
anything else is asked of them. So code written against the models works unchanged, and only the
paths that need pydantic pay for it.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any, Union, cast

if TYPE_CHECKING:
    from pydantic import BaseModel

    from qemuspec.spec.models import Machine

# What encode() makes and decode() reads: JSON data
Encoded = Union[None, bool, int, float, str, list["Encoded"], dict[str, "Encoded"]]

# The model classes a record may name (spec/models.py): an entry naming anything else is not ours.
KINDS = frozenset(
    {
        "QMP",
        "Ready",
        "Disk",
        "Forward",
        "NIC",
        "Share",
        "Display",
        "Firmware",
        "Device",
        "QomObject",
        "DeviceOption",
        "CloudInit",
        "SSH",
        "Network",
        "Machine",
        "File",
        "ProvisionScript",
        "Case",
        "Image",
    }
)


class Record:
    """One model's validated values; reads like the model, becomes the model on demand."""

    __slots__ = ("_kind", "_values", "_set", "_dump", "_hash")

    def __init__(
        self,
        kind: str,
        values: dict[str, object],
        fields_set: frozenset[str] | set[str],
        dump: dict[str, object] | None = None,
        definition_hash: str | None = None,
    ):
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_set", frozenset(fields_set))
        object.__setattr__(self, "_dump", dump)
        object.__setattr__(self, "_hash", definition_hash)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name.startswith(("model_", "__pydantic")):
            return getattr(self.materialize(), name)
        raise AttributeError(f"{object.__getattribute__(self, '_kind')} has no field {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._values:
            raise AttributeError(f"{self._kind} has no field {name!r}")
        self._values[name] = value
        object.__setattr__(self, "_dump", None)
        object.__setattr__(self, "_hash", None)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record):
            return self._kind == other._kind and self._values == other._values
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like the models: mutable, so unhashable

    def __reduce__(self) -> tuple:
        """copy, deepcopy and pickle rebuild through __init__ (slots and __setattr__ would refuse otherwise)."""
        return (Record, (self._kind, self._values, self._set, self._dump, self._hash))

    def __repr__(self) -> str:
        return f"{self._kind}({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    @property
    def model_fields_set(self) -> set[str]:
        return set(self._set)

    def model_dump(self, **options: Any) -> dict[str, Any]:
        if options == {"mode": "json"} and self._dump is not None:
            return copy.deepcopy(self._dump)
        return self.materialize().model_dump(**options)

    def model_copy(self, update: dict[str, object] | None = None, deep: bool = False) -> "Record":
        values = copy.deepcopy(self._values) if deep else dict(self._values)
        values.update(update or {})
        return Record(self._kind, values, self._set | set(update or {}))

    def materialize(self) -> BaseModel:
        """The pydantic model with these values (imports pydantic: only for what records cannot answer)."""
        from qemuspec.spec import models

        cls = getattr(models, self._kind)
        values = {name: _real(value) for name, value in self._values.items()}
        return cls.model_construct(_fields_set=set(self._set), **values)


def _real(value: object) -> object:
    if isinstance(value, Record):
        return value.materialize()
    if isinstance(value, list):
        return [_real(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_real(v) for v in value)
    if isinstance(value, dict):
        return {k: _real(v) for k, v in value.items()}
    return value


HASH_PREFIX = "d2-"  # hashes of what the user wrote; older qemuspec hashed every default too


def definition_hash(machine: Machine | Record) -> str:
    """Identifies what a machine was started from, so `up` can tell "unchanged" from "changed".

    It hashes what the definition says, not what qemuspec fills in: values equal to their default
    are left out, so a qemuspec that gains a field with a default (an upgrade) keeps every machine's
    hash, and `plan` does not offer to recreate a machine whose command line is the same. The
    readiness timeout and command and the provision steps are left out too: they say how long to wait
    and what to do in a ready guest, not what runs (`up --timeout`)."""
    if isinstance(machine, Record) and machine._hash is not None:
        return machine._hash
    text = machine.model_dump_json(
        exclude_defaults=True,
        exclude={"ready": {"timeout", "command"}, "provision": True, "setup": True},
    )
    return HASH_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def older_hash(recorded: str | None) -> bool:
    """A hash an older qemuspec recorded (every default included): it cannot be compared with
    :func:`definition_hash`, so the runtime compares the recorded command line instead."""
    return recorded is not None and not recorded.startswith(HASH_PREFIX)


class NotCacheable(Exception):
    """A value the encoding does not know; the definition is simply not cached."""


def encode(value: object) -> Encoded:
    """A validated model tree as JSON-safe data that :func:`decode` turns back into records.
    Containers are tagged, so a model, a list, a tuple and a dict never read as one another."""
    from pydantic import BaseModel  # imported already: only freshly validated models are encoded

    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        kind = type(value).__name__
        if kind not in KINDS:
            raise NotCacheable(kind)
        node: dict[str, Encoded] = {
            "m": kind,
            "v": {name: encode(getattr(value, name)) for name in fields},
            "s": [name for name in sorted(value.model_fields_set)],
        }
        if kind in ("Machine", "File"):
            node["j"] = value.model_dump(mode="json")
        if kind == "Machine":
            node["h"] = definition_hash(cast("Machine", value))
        return node
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return {"l": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"t": [encode(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"d": {k: encode(v) for k, v in value.items()}}
    raise NotCacheable(type(value).__name__)


def decode(data: object) -> object:
    if not isinstance(data, dict):
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        raise ValueError("not an encoded value")
    if "m" in data:
        kind = data["m"]
        if kind not in KINDS:
            raise ValueError(f"unknown model {kind!r}")
        values = {name: decode(v) for name, v in data["v"].items()}
        return Record(kind, values, set(data["s"]), data.get("j"), data.get("h"))
    if "l" in data:
        return [decode(v) for v in data["l"]]
    if "t" in data:
        return tuple(decode(v) for v in data["t"])
    if "d" in data:
        return {k: decode(v) for k, v in data["d"].items()}
    raise ValueError("not an encoded value")
