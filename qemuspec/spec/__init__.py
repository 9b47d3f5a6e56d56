"""The declarative layer: models, loading (templating, parsing), error messages, schema."""

from qemuspec.spec.loader import load, loads
from qemuspec.spec.models import File, Machine

__all__ = ["File", "Machine", "load", "loads"]
