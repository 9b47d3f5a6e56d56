"""Stop escalation and restart backoff as pure state machines, driven by a fake clock and a fake
process: every path through them, with the time each takes."""

from __future__ import annotations

import signal

import pytest

from qemuspec.runtime import policy
from qemuspec.runtime.policy import Ending, Restarts, ending, escalate, stop_budget, worst_case


class Clock:
    def __init__(self):
        self.now = 0.0


class FakeQemu:
    """A process that exits after a given step (or never), answering QMP as told; waiting advances
    the fake clock by the full timeout unless the process exits."""

    def __init__(
        self, clock: Clock, exits_on: str | None, running=True, answers=True, ignores_term=False
    ):
        self.clock = clock
        self.exits_on = exits_on
        self.running = running
        self.answers = answers
        self.ignores_term = ignores_term
        self.pending: str | None = None
        self.sent: list[str] = []
        self.dead = False

    def guest_running(self) -> bool:
        if not self.answers:
            self.clock.now += policy.QUERY_TIMEOUT
            return False
        return self.running

    def send(self, command: str) -> bool:
        self.sent.append(command)
        if not self.answers:
            self.clock.now += policy.COMMAND_TIMEOUT
            return False
        if command == self.exits_on:
            self.pending = command
        return True

    def signal(self, signum: int) -> None:
        self.sent.append(signal.Signals(signum).name)
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and not self.ignores_term):
            self.pending = "signal"

    def wait(self, timeout: float) -> bool:
        if self.pending:
            self.clock.now += 0.05
            self.dead = True
            return True
        self.clock.now += timeout
        return False


@pytest.mark.parametrize(
    "kwargs, step, sent",
    [
        ({"exits_on": "system_powerdown"}, "ACPI powerdown", ["system_powerdown"]),
        ({"exits_on": "quit"}, "QMP quit", ["system_powerdown", "quit"]),
        ({"exits_on": "quit", "running": False}, "QMP quit", ["quit"]),
        ({"exits_on": None}, "SIGTERM", ["system_powerdown", "quit", "SIGTERM"]),
        (
            {"exits_on": None, "ignores_term": True},
            "SIGKILL",
            ["system_powerdown", "quit", "SIGTERM", "SIGKILL"],
        ),
        (
            {"exits_on": None, "answers": False, "ignores_term": True},
            "SIGKILL",
            ["quit", "SIGTERM", "SIGKILL"],
        ),
    ],
)
def test_escalation_steps(kwargs, step, sent):
    clock = Clock()
    qemu = FakeQemu(clock, **kwargs)
    assert escalate(qemu, acpi_timeout=30.0) == step
    assert qemu.sent == sent
    assert qemu.dead or step == "SIGKILL"
    assert clock.now <= worst_case(30.0)


def test_a_stopped_process_gets_sigkill_at_once():
    """SIGSTOPped: no QMP answers and SIGTERM stays pending, so waiting out each step gains nothing."""
    clock = Clock()
    qemu = FakeQemu(clock, exits_on=None, answers=False, ignores_term=True)
    qemu.frozen = lambda: True
    assert escalate(qemu, acpi_timeout=30.0) == "SIGKILL"
    assert qemu.sent == ["SIGKILL"] and qemu.dead and clock.now < 1


def test_no_acpi_when_quitting_at_once():
    qemu = FakeQemu(Clock(), exits_on="quit")
    assert escalate(qemu, acpi_timeout=None) == "QMP quit"
    assert qemu.sent == ["quit"]


def test_worst_case_is_what_a_mute_qemu_really_costs_and_down_waits_longer():
    """A qemu that answers nothing and ignores SIGTERM: every step times out. The budget `down`
    gives the supervisor must cover that (the old 15 s margin did not)."""
    for acpi in (0.0, 5.0, 30.0, 300.0):
        clock = Clock()
        qemu = FakeQemu(clock, exits_on=None, running=True, answers=True, ignores_term=True)
        qemu.answers = True
        escalate(qemu, acpi_timeout=acpi)
        assert clock.now <= worst_case(acpi)
        mute = FakeQemu(Clock(), exits_on=None, answers=False, ignores_term=True)
        escalate(mute, acpi)
        assert mute.clock.now <= worst_case(acpi)
        assert stop_budget(acpi) > worst_case(acpi)
    assert worst_case(30.0) > 30.0 + 15.0, "more than the old prose margin"


def test_restart_backoff_doubles_caps_and_resets_after_a_stable_run():
    r = Restarts("always")
    crash = ending(1, None)
    delays = [r.decide(crash, uptime=0.5).delay for _ in range(8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert r.count == 8
    again = r.decide(crash, uptime=policy.STABLE_AFTER + 1)
    assert again.delay == 1 and again.attempt == 9


def test_restart_policies():
    crash, clean, panic = (
        ending(1, None),
        ending(0, "guest-shutdown"),
        ending(None, None, panicked=True),
    )
    killed = ending(-9, None)
    assert killed == Ending(True, "killed (signal 9)", -9, 9)
    assert panic.reason == "guest panic" and panic.failure
    assert clean.reason == "guest powered off" and not clean.failure
    assert ending(3, None).reason == "exited (code 3)"
    assert Restarts("no").decide(crash, 0) is None
    assert Restarts("on-failure").decide(clean, 0) is None
    assert Restarts("on-failure").decide(panic, 0).attempt == 1
    assert Restarts("on-failure").decide(killed, 0).delay == 1
    assert Restarts("always").decide(clean, 0).delay == 1
    assert Restarts("always").decide(ending(None, None, stopped=True), 0) is None, (
        "a requested stop is never restarted"
    )


def test_a_machine_that_cannot_start_is_retried_with_backoff_not_in_a_tight_loop():
    """A busy port makes every launch fail at once: the delays still grow, so n failures cost
    at least 1+2+4+... seconds, not a loop."""
    r = Restarts("always")
    failed = Ending(True, "failed to start: port 2222 is in use")
    total = sum(r.decide(failed, uptime=0.0).delay for _ in range(6))
    assert total == 1 + 2 + 4 + 8 + 16 + 30


class FakeAgentQemu(FakeQemu):
    """A guest with an agent: ``takes_shutdown`` says whether the agent can power it off; what was
    asked of the agent is in ``sent`` too."""

    def __init__(
        self, clock: Clock, exits_on: str | None, takes_shutdown: bool, agent_answers: bool = True
    ):
        super().__init__(clock, exits_on)
        self.takes_shutdown = takes_shutdown
        self.agent_answers = agent_answers

    def has_agent(self) -> bool:
        return True

    def agent_shutdown(self) -> bool:
        self.sent.append("guest-shutdown")
        if not self.agent_answers:
            self.clock.now += policy.AGENT_REPLY
            return False
        if self.takes_shutdown:
            self.pending = "guest-shutdown"
        return self.takes_shutdown

    def agent_sync(self) -> str | None:
        self.sent.append("guest-fsfreeze-freeze")
        if not self.agent_answers:
            self.clock.now += policy.AGENT_SYNC
            return None
        return "1 guest file system frozen through the guest agent"


@pytest.mark.parametrize(
    "kwargs, step, sent",
    [
        (
            {"exits_on": "system_powerdown", "takes_shutdown": True},
            "ACPI powerdown",
            ["system_powerdown"],
        ),
        (
            {"exits_on": None, "takes_shutdown": True},
            "guest-agent shutdown",
            ["system_powerdown", "guest-shutdown"],
        ),
        (
            {"exits_on": "quit", "takes_shutdown": False},
            "QMP quit: after 1 guest file system frozen through the guest agent",
            ["system_powerdown", "guest-shutdown", "guest-fsfreeze-freeze", "quit"],
        ),
        (
            {"exits_on": "quit", "takes_shutdown": False, "agent_answers": False},
            "QMP quit",
            ["system_powerdown", "guest-shutdown", "guest-fsfreeze-freeze", "quit"],
        ),
    ],
)
def test_agent_steps_come_after_half_the_acpi_wait_and_sync_before_quit(kwargs, step, sent):
    """libvirt's acpi,agent: the power button first, the agent's shutdown after half the ACPI wait; a
    forced quit only after the guest's file systems were frozen. The guest's total wait stays the timeout."""
    clock = Clock()
    qemu = FakeAgentQemu(clock, **kwargs)
    assert escalate(qemu, acpi_timeout=30.0) == step
    assert qemu.sent == sent
    assert clock.now <= worst_case(30.0)
    if "guest-shutdown" in sent:
        assert clock.now >= 15.0, "the power button had half the stop timeout first"
    assert policy.forced(step) == step.startswith("QMP quit")
    assert policy.synced(step) == ("frozen" in step)


def test_quit_at_once_never_asks_the_agent():
    qemu = FakeAgentQemu(Clock(), exits_on="quit", takes_shutdown=True)
    assert escalate(qemu, acpi_timeout=None) == "QMP quit"
    assert qemu.sent == ["quit"]
