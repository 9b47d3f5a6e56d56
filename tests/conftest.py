"""Shared fixtures. Real-qemu tests need qemu-system-x86_64: outside CI they skip without it, with
CI=true a missing qemu fails them. Every guest runs under TCG (KVM can exist and still hang)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

os.environ["QEMUSPEC_ACCEL"] = "tcg"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (Debian: apt-get install qemu-system-x86 qemu-utils)"
        if IN_CI:
            pytest.fail(message + " - required when CI=true")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def qemu_bin() -> str:
    return need("qemu-system-x86_64")


@pytest.fixture(scope="session")
def guest(qemu_bin) -> dict:
    """The real test guest (Debian cloud kernel + initramfs), built once and cached in guest/out."""
    sys.path.insert(0, os.path.join(ROOT, "guest"))
    try:
        import build
    finally:
        sys.path.pop(0)
    try:
        stamp = build.build(os.path.join(ROOT, "guest", "out"), os.path.join(ROOT, "guest", "cache"))
    except (SystemExit, Exception) as exc:  # no apt, no network to the Debian archive
        if IN_CI:
            pytest.fail(f"cannot build the test guest: {exc}")
        pytest.skip(f"cannot build the test guest: {exc}")
    out = os.path.join(ROOT, "guest", "out")
    return {"kernel": os.path.join(out, "vmlinuz"), "initrd": os.path.join(out, "initrd.gz"), "marker": stamp["marker"], "extras": stamp["extras"]}


@pytest.fixture
def state_dir(tmp_path) -> str:
    path = tmp_path / "state"
    path.mkdir()
    return str(path)
