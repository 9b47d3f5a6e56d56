"""Which accelerator a machine gets on this host: "auto" means KVM only when /dev/kvm really answers.

Called once per machine, by runtime/paths.machine_layout; the meaning of the values is render.accelerators'."""

from __future__ import annotations

import os
from typing import Sequence

_KVM_GET_API_VERSION = 0xAE00


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        import fcntl

        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def choose(
    wanted: str | Sequence[str], forced: str | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A machine's accelerators on this host and what to retry with when qemu cannot start on them
    (render.accelerators says what the values mean; this host's probe answers "is there a KVM").
    ``forced`` (Settings.accel, from QEMUSPEC_ACCEL, e.g. "tcg") replaces every machine's choice
    for a run, and is obeyed as given: no fallback."""
    from qemuspec.render import accel_fallback, accelerators

    listed = forced.split(",") if forced else wanted
    names = [listed] if isinstance(listed, str) else list(listed)
    chosen = accelerators(listed, kvm="auto" in names and kvm_usable())
    return chosen, () if forced else accel_fallback(wanted, chosen)
