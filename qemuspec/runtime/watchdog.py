"""A library VM dies with the process that started it: a killed test (SIGKILL, an OOM kill, a CI
timeout) leaves no qemu behind.

Why a watchdog process, not PR_SET_PDEATHSIG in qemu: the parent-death signal fires when the *thread*
that forked qemu exits, and a library VM is often started from a thread that ends long before the VM
(``start_async`` runs ``start`` in the event loop's executor; a fixture's helper thread). So a small
watchdog holds the read end of a pipe whose write end only this process has; it reads until EOF,
which the kernel delivers when this process dies however it dies (or when :meth:`Guard.release`
closes the pipe after a normal stop). On EOF the watchdog kills qemu's process group, but only a
qemu that is still the one started (same pid and kernel start time), so a recycled pid is never hit.

The supervisor's qemu (``qemuspec up``) has none: it must outlive the CLI and even its supervisor.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Run with -I -S: no site, no user paths, nothing of qemuspec imported, so it starts in ~15 ms.
_WATCH = """
import os, signal, sys
pid, started = int(sys.argv[1]), sys.argv[2]
try:
    while os.read(0, 4096):
        pass
except OSError:
    pass
def start_time():
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None
if start_time() == started:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except OSError:
            pass
"""


class Guard:
    """The write end of the watchdog's pipe and the watchdog itself, for one qemu."""

    def __init__(self, pid: int, started: str):
        read_end, self._write_end = os.pipe()  # both non-inheritable: no other child keeps it open
        try:
            self._watchdog: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCH, str(pid), started],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the test, not the watchdog
                close_fds=True,
            )
        finally:
            os.close(read_end)

    def release(self) -> None:
        """The VM was stopped on purpose: let the watchdog go (it finds qemu gone and exits)."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        if self._watchdog is not None:
            try:
                self._watchdog.wait(5.0)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None


def guard(pid: int) -> Guard | None:
    """Kill qemu ``pid`` (and its process group) when this process dies; None when the process is
    already gone (nothing to guard)."""
    from qemuspec.runtime.process import start_time

    started = start_time(pid)
    return Guard(pid, started) if started is not None else None
