"""QMP client: one protocol core (:mod:`.protocol`) with a blocking face and an asyncio face."""

from qemuspec.qmp.sync import QMPClient

__all__ = ["QMPClient"]
