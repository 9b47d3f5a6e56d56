"""Which accelerator a machine gets. "auto" means KVM only when /dev/kvm really answers."""

from __future__ import annotations

import os
from typing import Sequence

ACCEL_ENV = "QEMUSPEC_ACCEL"
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


def resolve(accel: str | Sequence[str]) -> tuple[str, ...]:
    """The -accel list for qemu. ``QEMUSPEC_ACCEL`` (e.g. "tcg") overrides every machine of a run."""
    from qemuspec.settings import Settings

    override = Settings.from_env().accel
    wanted = [a.strip() for a in override.split(",") if a.strip()] if override else ([accel] if isinstance(accel, str) else list(accel))
    out: list[str] = []
    for one in wanted:
        if one == "auto":
            one = "kvm" if kvm_usable() else "tcg"
        if one not in out:
            out.append(one)
    return tuple(out)


def fallback(wanted: str | Sequence[str], tried: tuple[str, ...]) -> tuple[str, ...] | None:
    """TCG to retry with when KVM was chosen but qemu could not start on it: only for "auto" (or a
    list that names tcg after kvm), never against an explicit choice or QEMUSPEC_ACCEL."""
    from qemuspec.settings import Settings

    if Settings.from_env().accel or "kvm" not in tried or "tcg" in tried:
        return None
    listed = [wanted] if isinstance(wanted, str) else list(wanted)
    if "auto" in listed or ("tcg" in listed and listed.index("tcg") > listed.index("kvm")):
        return ("tcg",)
    return None
