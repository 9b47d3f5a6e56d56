"""A qemu process: spawning it, waiting for it without polling, signalling it only if it is ours.

Waiting uses a pidfd, so it works for a child and for an adopted qemu alike, and returns the moment
the process ends.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from qemuspec.errors import LaunchError

KILL_WAIT = (
    10.0  # after SIGKILL: the kernel frees a large guest's memory before the process is gone
)


def spawn(argv: list[str], log_fd: int, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start qemu with no shell, in its own session and process group (a Ctrl-C in the terminal does
    not reach it, and whatever it forks can be signalled with it). Its umask is 077: what qemu itself
    creates (a display's unix socket, overlays, its pidfile) is the owner's alone."""
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=pass_fds,
            start_new_session=True,
            close_fds=True,
            umask=0o077,
        )
    except FileNotFoundError:
        raise LaunchError(
            f'qemu binary {argv[0]!r} not found: install it (Debian: apt-get install qemu-system-x86) or set qemu = "/path/to/qemu-system-x86_64"'
        ) from None
    except PermissionError as exc:
        raise LaunchError(f"cannot run {argv[0]!r}: {exc}") from None


def start_time(pid: int) -> str | None:
    """The kernel's start time of a process: with the pid, an identity that a recycled pid cannot fake."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str | None:
    """The kernel's one-letter process state (R, S, D, T for stopped, Z), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


class Process:
    """A running qemu: our child (``popen``) or one found by pid."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.popen = popen
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.popen is not None:
            self.returncode = self.popen.poll()
        elif not alive(self.pid):
            self.returncode = -1  # not our child: the exit status is not ours to read
        return self.returncode

    def wait(self, timeout: float | None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        if self.poll() is not None:
            return self.returncode
        if self.popen is not None:
            try:
                self.returncode = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
            return self.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.returncode = -1
            return self.returncode
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.poll() is None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([fd], [], [], remaining)
                if not ready and remaining == 0:
                    return None
        finally:
            os.close(fd)
        return self.returncode

    def signal(self, signum: int) -> None:
        """Signal the process, and its whole process group when it leads one (qemu runs in a session
        of its own, so a wrapper script's children go with it)."""
        if self.poll() is None:
            try:
                if os.getpgid(self.pid) == self.pid:
                    os.killpg(self.pid, signum)
                else:
                    os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the process group (children of a wrapper that exited)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate_and_kill(self, grace: float) -> str:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the step that ended it."""
        self.signal(signal.SIGTERM)
        if self.wait(grace) is not None:
            return "SIGTERM"
        self.signal(signal.SIGKILL)
        self.wait(KILL_WAIT)
        return "SIGKILL"
