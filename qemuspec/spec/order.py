"""Start order of a file's machines, from their ``depends_on`` (pydantic-free: `down` and `status`
served from the definition cache use it too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from qemuspec.spec.models import Machine


def order_machines(machines: Mapping[str, Machine]) -> list[list[str]]:
    """Dependency levels: every machine of a level depends only on earlier levels (start in parallel)."""
    remaining = {name: set(m.depends_on) for name, m in machines.items()}
    levels: list[list[str]] = []
    done: set[str] = set()
    while remaining:
        level = sorted(n for n, deps in remaining.items() if deps <= done)
        if not level:
            cycle = " -> ".join(sorted(remaining))
            raise ValueError(
                f"depends_on has a cycle among: {cycle}: remove one of the dependencies"
            )
        levels.append(level)
        done.update(level)
        for n in level:
            del remaining[n]
    return levels
