"""Changing a running qemu to match a changed definition, without rebooting the guest.

# stand-in: lane live-qmp owns this module. The integrator takes lane live-qmp's live.py; this stub
# keeps the signature the local backend calls (``apply`` and ``LiveChangeFailed``) and makes every
# qemu-side change fail, so `up` falls back to a restart with the reason.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from qemuspec.errors import QemuspecError

if TYPE_CHECKING:
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.paths import Layout
    from qemuspec.spec.models import Machine

SUPERVISOR_FIELDS = frozenset(
    {"restart", "stop_timeout", "ready", "depends_on", "provision", "warm", "ssh"}
)


class LiveChangeFailed(QemuspecError):
    """A change could not be made to the running qemu; whatever was done is undone. ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def apply(
    qmp: QMPClient,
    name: str,
    old: Machine,
    new: Machine,
    layout: Layout,
    fields: Sequence[str],
) -> list[str]:
    """Make the running machine ``name`` what ``new`` says for ``fields``; the steps done, in words."""
    for field in fields:
        top = re.split(r"[.\[]", field, maxsplit=1)[0]
        if top not in SUPERVISOR_FIELDS:
            raise LiveChangeFailed(
                f"machine {name}: {top} cannot change in a running qemu here; it takes a restart"
            )
    return []
