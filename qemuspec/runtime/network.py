"""Private networks between machines, without root: one vde_switch per network (Debian's vde2),
started before the first machine that uses it and stopped after the last one."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from typing import Iterator

from qemuspec.errors import LaunchError
from qemuspec.runtime import statedir
from qemuspec.runtime.process import Process, alive, cmdline

VDE_SWITCH = "vde_switch"


def _pidfile(switch_dir: str) -> str:
    return switch_dir + statedir.SWITCH_PID


def switch_pid(switch_dir: str) -> int | None:
    """The running switch of this directory (checked by its command line, not just the pid)."""
    data = statedir.read_bytes(
        os.path.dirname(switch_dir), os.path.basename(_pidfile(switch_dir)), 64
    )
    try:
        pid = int((data or b"").strip())
    except ValueError:
        return None
    return pid if alive(pid) and switch_dir in cmdline(pid) else None


@contextlib.contextmanager
def _locked(switch_dir: str) -> Iterator[None]:
    """Starting and stopping one network's switch take turns (machines start and stop in parallel)."""
    os.makedirs(os.path.dirname(switch_dir), mode=0o700, exist_ok=True)
    with statedir.exclusive(switch_dir + statedir.SWITCH_LOCK):
        yield


def ensure_switch(switch_dir: str) -> int:
    """Start the network's switch unless it runs."""
    with _locked(switch_dir):
        return _start(switch_dir)


def _start(switch_dir: str) -> int:
    pid = switch_pid(switch_dir)
    if pid:
        return pid
    if shutil.which(VDE_SWITCH) is None:
        raise LaunchError(
            "private networks need vde_switch: install it (Debian: apt-get install vde2)"
        )
    shutil.rmtree(switch_dir, ignore_errors=True)
    result = subprocess.run(
        [VDE_SWITCH, "-s", switch_dir, "-m", "700", "-d", "-p", _pidfile(switch_dir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    # The daemon writes its pidfile after the launcher has returned: give it a moment.
    deadline = time.monotonic() + 5
    pid = switch_pid(switch_dir)
    while (
        result.returncode == 0
        and (pid is None or not os.path.exists(os.path.join(switch_dir, "ctl")))
        and time.monotonic() < deadline
    ):
        time.sleep(0.002)
        pid = switch_pid(switch_dir)
    if result.returncode != 0 or pid is None:
        raise LaunchError(
            f"vde_switch did not start for {switch_dir}: {result.stderr.strip() or 'no pid'}"
        )
    return pid


def stop_switch(switch_dir: str) -> None:
    """Stop the switch and remove what it leaves. vde_switch removes its own pidfile as it exits, so
    every removal here tolerates a file that is already gone."""
    with _locked(switch_dir):
        pid = switch_pid(switch_dir)
        if pid:
            Process(pid).terminate_and_kill(2.0)
        shutil.rmtree(switch_dir, ignore_errors=True)
        for path in (_pidfile(switch_dir), switch_dir + statedir.SWITCH_LOCK):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
