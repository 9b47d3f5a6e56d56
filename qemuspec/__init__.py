"""qemuspec: declarative QEMU virtual machines.

The package root stays import-light (the CLI imports it on every call); the public names load on
first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Qemu", "VM", "load", "QemuspecError", "SpecError", "QMPError"]

_LAZY = {
    "Qemu": "qemuspec.api",
    "VM": "qemuspec.api",
    "load": "qemuspec.api",
    "QemuspecError": "qemuspec.errors",
    "SpecError": "qemuspec.errors",
    "QMPError": "qemuspec.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qemuspec' has no attribute {name!r}")
