"""Stopping and restarting as pure state machines: no processes, no clock of their own.

Why pure: the two questions "how long can a stop take?" and "when is the next restart?" decide
whether `down` waits long enough and whether a crashing machine spins; they are answered here from
named timeouts, and unit-tested with a fake clock and a fake process (tests/test_policy.py). The
supervisor and the library's Instance drive real processes through the same functions.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Protocol

# -- stop ----------------------------------------------------------------------------------------
QUERY_TIMEOUT = 5.0  # query-status before powerdown (a paused guest skips ACPI)
COMMAND_TIMEOUT = 5.0  # the reply to system_powerdown, and to quit
QUIT_WAIT = 5.0  # qemu's exit after quit was answered
TERM_GRACE = 3.0  # after SIGTERM
KILL_WAIT = 10.0  # after SIGKILL (a large guest's memory is freed before the process goes)
SUPERVISOR_SLACK = 5.0  # the supervisor's bookkeeping around a stop (records, clean-up)
AGENT_REPLY = 5.0  # the guest agent's answer to guest-shutdown (an error, or silence: it was taken)
AGENT_SYNC = 15.0  # guest-fsfreeze-freeze (or guest-exec sync) before a forced quit, sync included


class Stoppable(Protocol):
    """What the escalation needs from a machine; Instance and the tests' fake both provide it."""

    def guest_running(self) -> bool: ...  # within QUERY_TIMEOUT
    def send(self, command: str) -> bool: ...  # within COMMAND_TIMEOUT; True when answered
    def wait(self, timeout: float) -> bool: ...  # True when the process ended
    def signal(self, signum: int) -> None: ...

    # Optional, for a machine with a guest agent (found with getattr, so a target may lack them):
    #   has_agent() -> bool; agent_shutdown() -> bool (within AGENT_REPLY; True when the agent took it);
    #   agent_sync() -> str | None (within AGENT_SYNC; what was done to the guest's file systems).


AGENT_SHUTDOWN = "guest-agent shutdown"


def escalate(target: Stoppable, acpi_timeout: float | None, quit_wait: float = QUIT_WAIT) -> str:
    """ACPI powerdown (running guests only; ``acpi_timeout`` None skips it), QMP quit, SIGTERM,
    SIGKILL. Returns the step that ended the process.

    With a guest agent (libvirt's `shutdown --mode acpi,agent`): half the ACPI wait, then
    `guest-shutdown` through the agent for a guest whose power button nothing handles (no logind),
    then the other half; and before a forced quit the guest's file systems are frozen (or synced)
    through the agent, so what the guest wrote before the stop is on its disks. The total wait for
    the guest stays ``acpi_timeout``: a second shutdown request to a guest already shutting down is
    harmless.

    A stopped process (SIGSTOP, a debugger) answers no QMP and acts on no SIGTERM until continued, so
    every earlier step would only wait out its timeout: it gets SIGKILL at once."""
    if getattr(target, "frozen", lambda: False)():
        target.signal(signal.SIGKILL)
        target.wait(KILL_WAIT)
        return "SIGKILL"
    skipped = None
    running = acpi_timeout is not None and target.guest_running()
    agent = running and getattr(target, "has_agent", lambda: False)()
    if running:
        assert acpi_timeout is not None
        # qemu can tell when nothing will answer the power button (no ACPI, or not enabled yet)
        skipped = getattr(target, "acpi_unanswered", lambda: None)()
        if skipped is None and target.send("system_powerdown"):
            first = acpi_timeout / 2 if agent else acpi_timeout
            if target.wait(first):
                return "ACPI powerdown"
            if agent:
                asked = target.agent_shutdown()  # type: ignore[attr-defined]
                if target.wait(acpi_timeout - first):
                    return AGENT_SHUTDOWN if asked else "ACPI powerdown"
    synced = target.agent_sync() if agent else None  # type: ignore[attr-defined]
    if target.send("quit") and target.wait(quit_wait):
        why = "; ".join(w for w in (skipped, synced and f"after {synced}") if w)
        return f"QMP quit: {why}" if why else "QMP quit"
    target.signal(signal.SIGTERM)
    if target.wait(TERM_GRACE):
        return "SIGTERM"
    target.signal(signal.SIGKILL)
    target.wait(KILL_WAIT)
    return "SIGKILL"


def forced(step: str) -> bool:
    """Whether a stop ended the guest without its own shutdown (quit, SIGTERM, SIGKILL): what libvirt
    calls destroy rather than shutdown. `down` says so, since unsynced guest writes are lost."""
    return step not in ("ACPI powerdown", AGENT_SHUTDOWN, "already stopped")


def synced(step: str) -> bool:
    """Whether a forced stop wrote the guest's file systems out through its agent first."""
    return "through the guest agent" in step


def worst_case(acpi_timeout: float | None, quit_wait: float = QUIT_WAIT) -> float:
    """The longest :func:`escalate` can take when every step times out (the agent's steps included)."""
    acpi = (
        0.0
        if acpi_timeout is None
        else QUERY_TIMEOUT + COMMAND_TIMEOUT + acpi_timeout + AGENT_REPLY + AGENT_SYNC
    )
    return acpi + COMMAND_TIMEOUT + quit_wait + TERM_GRACE + KILL_WAIT


def stop_budget(acpi_timeout: float | None) -> float:
    """How long `down` waits for a supervisor to stop its machine before it acts itself."""
    return worst_case(acpi_timeout) + SUPERVISOR_SLACK


# -- restart -------------------------------------------------------------------------------------
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # seconds of uptime after which the backoff starts from the beginning again


@dataclass(frozen=True)
class Ending:
    """How one run of qemu ended, in the words status uses."""

    failure: bool  # counts for restart = "on-failure"
    reason: str  # "exited (code 1)", "killed (signal 9)", "guest panic", "guest powered off", ...
    code: int | None = None
    signal: int | None = None


def ending(
    code: int | None, shutdown_reason: str | None, panicked: bool = False, stopped: bool = False
) -> Ending:
    """Classify an exit. ``code`` is the wait status as Popen gives it (negative: killed by that
    signal; None or -1 with no other knowledge: an adopted qemu whose status we cannot read)."""
    if stopped:
        return Ending(False, "stopped on request", code)
    if panicked:
        return Ending(True, "guest panic", code)
    if code is not None and code < -1:
        return Ending(True, f"killed (signal {-code})", code, -code)
    if shutdown_reason in (
        "guest-shutdown",
        "host-qmp-quit",
        "host-ui",
        "host-signal",
    ) and code in (0, -1, None):
        what = (
            "guest powered off"
            if shutdown_reason == "guest-shutdown"
            else f"shut down ({shutdown_reason})"
        )
        return Ending(False, what, code)
    if code is None or code == -1:
        return Ending(True, "exited (status unknown: not our child)", code)
    return Ending(code != 0, f"exited (code {code})", code)


@dataclass
class Decision:
    delay: float  # seconds until the next start
    attempt: int  # 1 for the first restart


class Restarts:
    """The restart policy with exponential backoff: 1 s doubling to 30 s, back to 1 s after 60 s up."""

    def __init__(
        self,
        policy: str,
        first: float = BACKOFF_FIRST,
        maximum: float = BACKOFF_MAX,
        stable_after: float = STABLE_AFTER,
    ):
        self.policy = policy
        self.first, self.maximum, self.stable_after = first, maximum, stable_after
        self.count = 0
        self._next = first

    def wants(self, end: Ending) -> bool:
        return self.policy == "always" or (self.policy == "on-failure" and end.failure)

    def decide(self, end: Ending, uptime: float) -> Decision | None:
        """None: stay down. Otherwise when to start again (launch failures count as failures, so a
        machine that cannot start, a busy port say, is retried with backoff, never in a tight loop)."""
        if end.reason == "stopped on request" or not self.wants(end):
            return None
        if uptime > self.stable_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        self.count += 1
        return Decision(delay, self.count)
