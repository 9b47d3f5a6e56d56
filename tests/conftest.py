"""Shared fixtures. Real-qemu tests need qemu-system-x86_64: outside CI they skip without it, with
CI=true a missing qemu fails them. Every guest runs under TCG (KVM can exist and still hang)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# In-process qemuspec (the library, Instance, paths) gets its settings passed, not read from the
# environment: installed once here as the process's settings. The qemuspec commands that tests run as
# child processes read their environment (the CLI's interface), so it says TCG for them too.
from qemuspec import settings as _settings  # noqa: E402

TEST_SETTINGS = _settings.install(
    _settings.Settings.from_env({**os.environ, "QEMUSPEC_ACCEL": "tcg"})
)
os.environ["QEMUSPEC_ACCEL"] = "tcg"  # for child processes only


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (Debian: apt-get install qemu-system-x86 qemu-utils)"
        if IN_CI:
            pytest.fail(message + " - required when CI=true")
        pytest.skip(message)
    return path


# Fixtures that boot the real test guest; a test using one (directly or through another fixture) is
# marked `guest`, and a test that needs qemu-system-x86_64 at all is marked `qemu`, so that
# `pytest -m "not guest"` is the fast lane that boots no guest.
GUEST_FIXTURES = {"guest", "generic_guest"}
QEMU_FIXTURES = {"qemu_bin", "system_libvirtd"}


def pytest_collection_modifyitems(items) -> None:
    """Apply the declared markers from the fixtures a test uses, so no test has to be marked by hand."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & GUEST_FIXTURES:
            item.add_marker(pytest.mark.guest)
        if used & (GUEST_FIXTURES | QEMU_FIXTURES) or item.get_closest_marker("guest"):
            item.add_marker(pytest.mark.qemu)


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
        stamp = build.build(
            os.path.join(ROOT, "guest", "out"), os.path.join(ROOT, "guest", "cache")
        )
    except (SystemExit, Exception) as exc:  # no apt, no network to the Debian archive
        if IN_CI:
            pytest.fail(f"cannot build the test guest: {exc}")
        pytest.skip(f"cannot build the test guest: {exc}")
    out = os.path.join(ROOT, "guest", "out")
    return {
        "kernel": os.path.join(out, "vmlinuz"),
        "initrd": os.path.join(out, "initrd.gz"),
        "marker": stamp["marker"],
        "extras": stamp["extras"],
    }


@pytest.fixture
def image_server():
    """A real HTTP server on 127.0.0.1 serving base images (tests/helpers.py ImageServer)."""
    from helpers import ImageServer

    with ImageServer() as server:
        yield server


@pytest.fixture
def state_dir(tmp_path) -> str:
    path = tmp_path / "state"
    path.mkdir()
    return str(path)


def fail_or_skip(reason: str) -> None:
    """A missing prerequisite: a failure when CI=true, a skip elsewhere."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def pids(name: str) -> list[int]:
    import subprocess

    return [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-x", name], capture_output=True, text=True
        ).stdout.split()
    ]


def terminate(pid: int) -> None:
    """SIGTERM and wait for the exit (a pidfd turns readable), so the next test never meets a daemon
    that is still shutting down."""
    import select
    import signal

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([fd], [], [], 15)[0]:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def system_libvirtd():
    """The system libvirtd and virtlogd, started when not running and stopped after the module (kept no
    longer: libvirtd runs qemu to probe it, and other tests count qemu processes); its URI."""
    import subprocess
    import time

    if os.geteuid() != 0:
        fail_or_skip("a system libvirtd needs root (this test starts one)")
    if not (shutil.which("libvirtd") and shutil.which("virtlogd") and shutil.which("virsh")):
        fail_or_skip("libvirt is not installed (Debian: libvirt-daemon-system libvirt-clients)")
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if not pids(daemon):
            subprocess.run([daemon, "-d"], check=True)
            started.append(daemon)
    deadline = time.monotonic() + 30
    while (
        subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode
        != 0
    ):
        if time.monotonic() > deadline:
            pytest.fail("libvirtd did not answer within 30 s")
        time.sleep(0.1)  # the daemon's socket appears with no notification we can wait on
    yield "qemu:///system"
    for daemon in reversed(started):
        for pid in pids(daemon):
            terminate(pid)
