"""The declarative layer: models, loading (templating, parsing), error messages, schema.

Names are resolved on first use: commands served from the definition cache never import pydantic."""

from typing import Any

__all__ = ["File", "Machine", "load", "loads"]


def __getattr__(name: str) -> Any:
    if name in ("load", "loads"):
        from qemuspec.spec import loader

        return getattr(loader, name)
    if name in ("File", "Machine"):
        from qemuspec.spec import models

        return getattr(models, name)
    raise AttributeError(f"module 'qemuspec.spec' has no attribute {name!r}")
