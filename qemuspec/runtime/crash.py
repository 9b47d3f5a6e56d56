"""Crash-awareness for one running machine: `run`, `test` and the pytest plugin watch the guest kernel
while a command runs, and a crash ends the wait at once with a report instead of an agent timeout.

What is watched is what the one detector finds (runtime/console.py: ``CRASH_KINDS``, the same lines a
readiness wait ends on, plus warnings) and qemu's own word, QMP ``GUEST_PANICKED`` from the pvpanic
device every pc/q35 machine gets (render.py). The watch asks qemu to *pause* a panicked guest
(``set-action panic=pause``) instead of shutting it down, so its memory can still be dumped:
``--vmcore PATH`` is a ``dump-guest-memory`` ELF core taken while the guest is stopped, written
through a descriptor handed over with ``getfd`` (no path in a QMP argument).

Severity decides what ends the run: a fatal or error crash (panic, oops, BUG, KASAN) always does;
warnings (WARN_ON, soft lockup, hung task, RCU stall, UBSAN) are reported and end it only with
``fail_on = "warn"``. The exit code is the CLI's (cli/common.py ``GUEST_CRASHED``).

    with crash.Watch(instance, fail_on="panic", vmcore=None) as watch:
        code = watch.call(guestrun.run, instance, argv, on_output)   # GuestCrashed on a crash
    watch.warnings()  # what was seen and did not fail the run

Everything in a report comes from the guest: lines are bounded (console.py) and printed escaped by
the CLI; nothing in them is acted on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from qemuspec.errors import GuestCrashed, QemuspecError
from qemuspec.runtime.console import SEVERITY, Crash

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance

T = TypeVar("T")
FAIL_ON = ("panic", "warn")  # the values of --fail-on: what severity of crash fails a run
TRACE_WAIT = 3.0  # seconds a crash's block may take to finish printing before the report is made
TRACE_LINES = 24  # lines of call trace a report quotes
SLICE = 0.25  # how often a waiting caller looks up from its wait (signals run in between)
VMCORE_TIMEOUT = 120.0  # dump-guest-memory of a paused guest (its memory size, at disk speed)
VMCORE_FD = "qemuspec-vmcore"


def fails(severity: str, fail_on: str) -> bool:
    """Whether a crash of ``severity`` fails a run under ``--fail-on``."""
    return SEVERITY[severity] >= (SEVERITY["warning"] if fail_on == "warn" else SEVERITY["error"])


class Watch:
    """Watches one launched instance (console and QMP) from construction until ``close``. Make it right
    after ``launch``: crashes printed before it are in the console's list and count too."""

    def __init__(
        self,
        instance: Instance,
        fail_on: str = "panic",
        vmcore: str | None = None,
        on_warning: Callable[[dict], object] | None = None,
    ):
        if fail_on not in FAIL_ON:
            raise QemuspecError(f"fail_on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
        self.instance, self.fail_on, self.vmcore = instance, fail_on, vmcore
        self.on_warning = on_warning
        self.tripped = threading.Event()  # a crash that fails the run was seen
        self.qmp_panic: dict | None = None  # the GUEST_PANICKED event, when qemu heard one
        self._report: dict | None = None
        self._told: set[int] = set()  # warnings already passed to on_warning (by id of the crash)
        self._lock = threading.Lock()
        self._off: list[Callable[[], None]] = []
        self.started_at = instance.started_at or time.time()
        qmp = instance.qmp
        if qmp is not None:
            try:  # a panicked guest stays paused for the report and the core, not shut down
                qmp.command("set-action", {"panic": "pause"}, timeout=5)
            except QemuspecError:
                pass  # an older qemu: it shuts down as before, and the report still comes
            self._off.append(qmp.on("GUEST_PANICKED", self._heard_qmp))
            for_before = _earlier(qmp, "GUEST_PANICKED")
            if for_before is not None:
                self._heard_qmp(for_before)
        console = instance.console
        if console is not None:
            self._off.append(console.on_crash(self._heard_console))
            for seen in list(console.crashes):
                self._heard_console(seen)

    # -- what the guest said (on the console's and QMP's reader threads) -------------------------

    def _heard_console(self, crash: Crash) -> None:
        if fails(crash.severity, self.fail_on):
            self.tripped.set()
        elif crash.complete and self.on_warning is not None and id(crash) not in self._told:
            self._told.add(id(crash))
            self.on_warning(self._entry(crash))

    def _heard_qmp(self, event: dict) -> None:
        self.qmp_panic = event
        self.tripped.set()

    # -- waiting ----------------------------------------------------------------------------------

    def call(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        """``function(*args, **kwargs)`` on a worker thread; its result, or GuestCrashed as soon as the
        guest crashes first (the worker is left to fail when qemu goes). A crash seen while the
        function failed (the agent lost, qemu gone) is the error, not the function's own."""
        result: list[T] = []
        failure: list[BaseException] = []
        done = threading.Event()

        def work() -> None:
            try:
                result.append(function(*args, **kwargs))
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=work, name="qemuspec-guest-command", daemon=True)
        worker.start()
        while not done.is_set() and not self.tripped.is_set():
            done.wait(SLICE)
        if self.tripped.is_set():
            self.check()
        if failure:
            if self._crashed_meanwhile():
                self.check()
            raise failure[0]
        return result[0]

    def _crashed_meanwhile(self) -> bool:
        """After a command failed: give a crash that killed it a moment to be heard."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not self.tripped.is_set():
            if self.instance.process is not None and self.instance.process.poll() is not None:
                self.tripped.wait(
                    0.2
                )  # qemu exited: its last console bytes and events are in flight
                break
            self.tripped.wait(0.05)
        return self.tripped.is_set()

    def check(self) -> None:
        """Raise GuestCrashed (with the report) when a crash that fails the run was seen."""
        if self.tripped.is_set():
            report = self.report()
            raise GuestCrashed(text(report), report)

    # -- the report -------------------------------------------------------------------------------

    def report(self) -> dict:
        """The crash report (made once: the first call waits for the block to finish printing, takes
        the core when asked, and leaves the guest paused): machine, kind, severity, first line, call
        trace excerpt, seconds since boot (the kernel's clock) and since launch, the QMP event, the
        other crashes, warnings, the core's path."""
        with self._lock:
            if self._report is None:
                self._report = self._make()
            return self._report

    def _make(self) -> dict:
        console = self.instance.console
        deadline = time.monotonic() + TRACE_WAIT
        while console is not None and time.monotonic() < deadline:
            worst = _worst(list(console.crashes), self.fail_on)
            if (worst is not None and worst.complete) or console.closed:
                break
            if worst is None and self.qmp_panic is None:
                break
            time.sleep(0.05)  # the kernel is still printing the trace; it ends with a marker
        self._pause()
        crashes = list(console.crashes) if console is not None else []
        worst = _worst(crashes, self.fail_on)
        report: dict = {"machine": self.instance.name}
        if worst is not None:
            report.update(self._entry(worst))
        else:
            report.update(
                kind="panic",
                severity="fatal",
                line="the guest kernel panicked (QMP GUEST_PANICKED from the pvpanic device; "
                "nothing on the console)",
                trace=[],
                uptime=None,
                seconds_since_launch=round(time.time() - self.started_at, 2),
            )
        if self.qmp_panic is not None:
            data = self.qmp_panic.get("data")
            report["qmp_event"] = {
                "event": "GUEST_PANICKED",
                "action": data.get("action") if isinstance(data, dict) else None,
            }
        report["others"] = [
            self._entry(c) for c in crashes if c is not worst and c.severity != "warning"
        ]
        report["warnings"] = [
            self._entry(c) for c in crashes if c.severity == "warning" and c is not worst
        ]
        report["vmcore"] = None
        if self.vmcore is not None:
            try:
                report["vmcore"] = dump(self.instance, self.vmcore)
            except QemuspecError as exc:
                report["vmcore_error"] = str(exc)
        return report

    def _entry(self, crash: Crash) -> dict:
        return {
            "kind": crash.kind,
            "severity": crash.severity,
            "line": crash.line,
            "trace": trace(crash.lines),
            "uptime": crash.uptime,
            "seconds_since_launch": round(crash.seen_at - self.started_at, 2),
        }

    def _pause(self) -> None:
        """Stop the guest's CPUs (a panicked one is paused already): the report and core see one state."""
        if self.instance.qmp is not None and self.instance.running():
            try:
                self.instance.qmp.command("stop", timeout=5)
            except QemuspecError:
                pass

    def warnings(self) -> list[dict]:
        """The warnings seen that did not fail the run (under ``fail_on = "panic"``)."""
        console = self.instance.console
        crashes = list(console.crashes) if console is not None else []
        return [self._entry(c) for c in crashes if not fails(c.severity, self.fail_on)]

    def close(self) -> None:
        for off in self._off:
            off()
        self._off = []

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _earlier(qmp: object, name: str) -> dict | None:
    """An event this qemu sent before the watch began (the client keeps a history)."""
    wait_for = getattr(qmp, "wait_for", None)
    if wait_for is None:
        return None
    try:
        event = wait_for(name, 0, since=0)
    except QemuspecError:
        return None
    return event if isinstance(event, dict) else None


def _worst(crashes: list[Crash], fail_on: str) -> Crash | None:
    """The first crash of the highest severity that fails the run."""
    failing = [c for c in crashes if fails(c.severity, fail_on)]
    if not failing:
        return None
    top = max(SEVERITY[c.severity] for c in failing)
    return next(c for c in failing if SEVERITY[c.severity] == top)


def trace(lines: list[str]) -> list[str]:
    """The call-trace excerpt of a crash block: from "Call Trace:" (else the block after its first
    line), at most TRACE_LINES lines."""
    for index, line in enumerate(lines):
        if "Call Trace:" in line:
            excerpt = lines[index : index + TRACE_LINES]
            ends = [n for n, text in enumerate(excerpt) if "</TASK>" in text]
            return excerpt[: ends[0] + 1] if ends else excerpt
    return lines[1 : 1 + TRACE_LINES]


def text(report: dict) -> str:
    """The report as the paragraphs a person reads (guest text in it: the CLI escapes it)."""
    when = []
    if report.get("uptime") is not None:
        when.append(f"{report['uptime']:.1f} s after the guest booted")
    if report.get("seconds_since_launch") is not None:
        when.append(f"{report['seconds_since_launch']:.1f} s after launch")
    head = (
        f"machine {report['machine']}: the guest kernel crashed ({report['kind']}"
        + (f", {', '.join(when)}" if when else "")
        + f"): {report['line']}"
    )
    if report.get("qmp_event"):
        head += " (qemu heard GUEST_PANICKED from the pvpanic device)"
    parts = [head]
    if report.get("before_ready"):
        parts.append(report.get("detail") or "it crashed before it was ready")
    if report.get("trace"):
        parts.append("--- call trace ---\n" + "\n".join(report["trace"]))
    for other in report.get("others") or []:
        parts.append(f"also: {other['kind']}: {other['line']}")
    for warning in report.get("warnings") or []:
        parts.append(f"warning seen: {warning['kind']}: {warning['line']}")
    if report.get("vmcore"):
        parts.append(f"vmcore: {report['vmcore']} (ELF core of the paused guest: crash(8), gdb)")
    elif report.get("vmcore_error"):
        parts.append(f"vmcore not written: {report['vmcore_error']}")
    return "\n".join(parts)


def warning_text(machine: str, entry: dict) -> str:
    """One warning that did not fail the run, for stderr."""
    return (
        f"machine {machine}: the guest kernel warned ({entry['kind']}): {entry['line']} "
        "(reported only; --fail-on warn fails the run on it)"
    )


def dump(instance: Instance, path: str) -> str:
    """``dump-guest-memory`` of the (paused) guest into ``path`` as an ELF core; the absolute path.
    The file is opened here (O_NOFOLLOW, 0600, a new file or an existing regular one truncated) and
    handed to qemu with getfd, so qemu opens nothing by name."""
    if instance.qmp is None or not instance.running():
        raise QemuspecError(f"machine {instance.name}: qemu is gone, no core can be taken")
    path = os.path.abspath(path)
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        raise QemuspecError(
            f"--vmcore {path}: cannot write it ({exc.strerror}): name a file in a writable directory"
        ) from None
    try:
        qmp = instance.qmp
        if not (instance.control_address or "").startswith("unix:"):
            raise QemuspecError(f"machine {instance.name}: getfd needs the unix monitor")
        qmp.command("getfd", {"fdname": VMCORE_FD}, fds=(fd,))
    finally:
        os.close(fd)
    instance.qmp.command(
        "dump-guest-memory",
        {"paging": False, "protocol": f"fd:{VMCORE_FD}", "format": "elf"},
        timeout=VMCORE_TIMEOUT,
    )
    return path


@contextlib.contextmanager
def before_ready(name: str) -> Iterator[None]:
    """Around a start (``fresh.started``, a boot): a guest whose kernel crashed before it was ready
    is a crash (GuestCrashed, a report from the readiness failure's account), not a readiness failure."""
    from qemuspec.errors import ReadyTimeout

    try:
        yield
    except ReadyTimeout as exc:
        why = exc.why or ""
        if "panicked" not in why:
            raise
        line = why.split(": ", 1)[1] if why.startswith("the guest kernel panicked: ") else why
        report: dict[str, object] = {
            "machine": name,
            "kind": "oops" if "Oops" in line else "panic",
            "severity": "fatal",
            "line": line,
            "trace": [],
            "uptime": None,
            "seconds_since_launch": None,
            "before_ready": True,
            "qmp_event": None,
            "others": [],
            "warnings": [],
            "vmcore": None,
            "detail": str(exc),
        }
        raise GuestCrashed(text(report), report) from None
