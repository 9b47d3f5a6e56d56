"""The per-machine supervisor: a detached process that owns one machine's qemu.

It launches (or adopts) qemu, reports progress to whoever started it over a pipe until the machine
is ready, then stays behind: it holds the main QMP monitor (every event goes to events.jsonl),
applies the restart policy with backoff, and stops the machine when asked (SIGTERM). qemu runs in its
own session, so killing the supervisor leaves the VM running ("unsupervised" until adopted again).

The supervisor is forked from the CLI, not spawned as a new interpreter: the CLI has already
imported everything, so a fork costs about a millisecond where a fresh Python costs ~150 ms per
machine. Forks happen from the CLI's main thread while it runs no other threads.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback
from typing import Any

from qemuspec.errors import QemuspecError
from qemuspec.qmp.protocol import EventLog
from qemuspec.runtime.instance import Instance, write_json_atomic
from qemuspec.runtime.process import alive
from qemuspec.spec.models import Machine

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # seconds of uptime after which the backoff starts from the beginning again


def exit_file(state_dir: str) -> str:
    return os.path.join(state_dir, "exit.json")


def stop_file(state_dir: str) -> str:
    return os.path.join(state_dir, "stop.json")


def record(state_dir: str, event: str, **data: Any) -> None:
    """A qemuspec lifecycle event in the machine's events.jsonl, in QMP's own event format."""
    now = time.time()
    log = EventLog(os.path.join(state_dir, "events.jsonl"))
    log.write({"event": event, "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)}, "data": data})
    log.close()


def supervisor_file(state_dir: str) -> str:
    return os.path.join(state_dir, "supervisor.json")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process: with the pid, an identity that a recycled pid cannot fake."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def read_supervisor(state_dir: str) -> dict | None:
    """The live supervisor of this state directory: its record, or None when there is none."""
    try:
        with open(supervisor_file(state_dir), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if isinstance(pid, int) and alive(pid) and _start_time(pid) == info.get("started"):
        return info
    return None


def spawn(name: str, machine: Machine, state_dir: str, adopt: bool) -> tuple[int, int]:
    """Fork a detached supervisor; returns (pid, fd of the progress pipe to read)."""
    os.makedirs(state_dir, exist_ok=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os.waitpid(pid, 0)  # the intermediate child exits at once; the grandchild is the supervisor
        return _grandchild_pid(read_end), read_end
    # first child: new session, then fork again so the supervisor is not our child (no zombie)
    code = 1
    try:
        os.close(read_end)
        # Drop every inherited descriptor but the progress pipe: above all the CLI's state lock,
        # which would otherwise stay held for as long as the supervisor lives.
        os.closerange(3, write_end)
        os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
        os.setsid()
        grandchild = os.fork()
        if grandchild:
            os.write(write_end, f"{grandchild}\n".encode())
            code = 0
        else:
            code = _run(name, machine, state_dir, adopt, write_end)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _grandchild_pid(fd: int) -> int:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            raise QemuspecError("the supervisor could not be started")
        line += chunk
    return int(line)


def _run(name: str, machine: Machine, state_dir: str, adopt: bool, progress_fd: int) -> int:
    """In the supervisor process."""
    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(state_dir, "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    return Supervisor(name, machine, state_dir, progress_fd).run(adopt)


class Supervisor:
    def __init__(self, name: str, machine: Machine, state_dir: str, progress_fd: int | None):
        self.name = name
        self.machine = machine
        self.state_dir = state_dir
        self.progress_fd = progress_fd
        self.restarts = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stop_requested = False
        self.panicked = False
        self.stop_step: str | None = None
        self.instance: Instance | None = None

    # -- progress to the CLI ----------------------------------------------------------------------

    def tell(self, status: str, **data: Any) -> None:
        if self.progress_fd is None:
            return
        try:
            os.write(self.progress_fd, (json.dumps({"name": self.name, "status": status, **data}) + "\n").encode())
        except OSError:
            pass
        if status in ("ready", "failed"):
            os.close(self.progress_fd)  # the CLI may exit now; the machine is ours
            self.progress_fd = None

    def _wake(self, *_: Any) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _on_term(self, *_: Any) -> None:
        self.stop_requested = True
        self._wake()

    # -- main loop --------------------------------------------------------------------------------

    def run(self, adopt: bool) -> int:
        # A process-directed signal may land on the QMP reader thread; the wakeup fd makes the C-level
        # handler wake our select() whichever thread takes it, so the Python handler runs at once.
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.phase("starting")
        try:
            os.unlink(exit_file(self.state_dir))
        except FileNotFoundError:
            pass
        backoff = BACKOFF_FIRST
        first = True
        while True:
            began = time.monotonic()
            started = self._adopt() if (first and adopt) else self._start()
            if not started and first:
                return self._finish("crashed", "never became ready")  # `up` reports it; no retry loop
            first = False
            outcome = self._watch() if started else "failure"
            if self.stop_requested:
                return self._finish("stopped", "stop requested")
            if not self._should_restart(outcome):
                return self._finish("crashed" if outcome == "failure" else "stopped", outcome)
            if time.monotonic() - began > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            record(self.state_dir, "QEMUSPEC_RESTART", reason=outcome, delay=backoff, restarts=self.restarts + 1)
            self.phase("restarting")
            if self._sleep(backoff):
                return self._finish("stopped", "stop requested")
            backoff = min(backoff * 2, BACKOFF_MAX)
            self.restarts += 1

    def _should_restart(self, outcome: str) -> bool:
        policy = self.machine.restart
        return policy == "always" or (policy == "on-failure" and outcome == "failure")

    def _sleep(self, seconds: float) -> bool:
        """Wait, unless a stop is requested first (returns True then)."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self.wake_r], [], [], remaining)
            self._drain()
        return True

    def _drain(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def phase(self, phase: str) -> None:
        """What `status` shows while this supervisor lives: starting, running, restarting."""
        write_json_atomic(supervisor_file(self.state_dir), {
            "pid": os.getpid(), "started": _start_time(os.getpid()), "phase": phase,
            "restarts": self.restarts, "restart": self.machine.restart})

    def _start(self) -> bool:
        verdict = None
        if self.machine.warm:
            from qemuspec.runtime import warm

            verdict = warm.check(self.name, self.machine, self.state_dir)
        cold_why = verdict.why if verdict is not None else None
        if verdict is not None and verdict.warm:
            if self._start_one(restore=True):
                return True
            warm.discard(self.state_dir)  # a state that does not load is never tried again
            cold_why = "the saved state did not load (see QEMUSPEC_RESTORE_FAILED)"
        return self._start_one(restore=False, cold_why=cold_why)

    def _start_one(self, restore: bool, cold_why: str | None = None) -> bool:
        inst = Instance(self.name, self.machine, self.state_dir)
        self.phase("starting")
        self.instance = inst
        self.panicked = False
        inst.on("GUEST_PANICKED", self._on_panic)
        began = time.monotonic()
        try:
            self.tell("starting")
            inst.launch(restore=restore)
            assert inst.process is not None
            record(self.state_dir, "QEMUSPEC_LAUNCHED", pid=inst.process.pid, restarts=self.restarts, accel=list(inst.layout.accel),
                   boot=inst.boot, **({"why": cold_why} if cold_why else {}),
                   **({"kvm_failed": inst.kvm_failure.split("\n", 1)[0]} if inst.kvm_failure else {}))
            self.tell("waiting", pid=inst.process.pid, boot=inst.boot)
            inst.wait_ready()
            if restore:
                from qemuspec.runtime import warm

                done = warm.after_restore(inst)
                inst.restored = done
                inst.write_state()
                record(self.state_dir, "QEMUSPEC_RESTORED", pid=inst.process.pid, seconds=round(time.monotonic() - began, 3), **done)
        except Exception as exc:  # a bug must reach the user as a failure, not a silent exit
            if restore:
                detail = str(exc).split("\n", 1)[0]
                record(self.state_dir, "QEMUSPEC_RESTORE_FAILED", error=detail, then="cold boot")
                self.tell("restore failed", detail=detail)
                inst.kill()
                return False
            detail = str(exc) if isinstance(exc, QemuspecError) else f"machine {self.name}: internal error: {type(exc).__name__}: {exc} (details in supervisor.log)"
            if not isinstance(exc, QemuspecError):
                traceback.print_exc()
            record(self.state_dir, "QEMUSPEC_FAILED", error=detail.split("\n", 1)[0])
            self.tell("failed", detail=detail)
            inst.kill()
            return False
        if inst.console is not None:
            inst.console.close()  # free the console socket for `qemuspec console`
            inst.console = None
        seconds = time.monotonic() - began
        saved = None
        if self.machine.warm and not restore:
            saved = self._save(inst)
        self.phase("running")
        assert inst.process is not None
        record(self.state_dir, "QEMUSPEC_READY", pid=inst.process.pid, seconds=round(seconds, 3), restarts=self.restarts, boot=inst.boot)
        self.tell("ready", pid=inst.process.pid, seconds=seconds, ports=inst.ports, boot=inst.boot, saved=saved)
        return True

    def _save(self, inst: Instance) -> dict | None:
        """Save a warm machine's state after its cold boot; a failure leaves it running, cold next time."""
        from qemuspec.runtime import warm

        reason = warm.unsupported(self.machine)
        if reason:
            record(self.state_dir, "QEMUSPEC_SAVE_SKIPPED", reason=reason)
            return None
        self.tell("saving")
        try:
            saved = warm.save(inst)
        except Exception as exc:
            if not isinstance(exc, QemuspecError):
                traceback.print_exc()
            record(self.state_dir, "QEMUSPEC_SAVE_FAILED", error=str(exc).split("\n", 1)[0])
            warm.discard(self.state_dir)
            return None
        record(self.state_dir, "QEMUSPEC_SAVED", **saved)
        return saved

    def _adopt(self) -> bool:
        inst = Instance.find(self.name, self.machine, self.state_dir)
        if inst is None:
            return self._start()
        self.instance = inst
        inst.on("GUEST_PANICKED", self._on_panic)
        try:
            inst.connect()
        except QemuspecError as exc:
            self.tell("failed", detail=f"cannot adopt machine {self.name}: {exc}")
            raise SystemExit(1)
        self.phase("running")
        assert inst.process is not None
        record(self.state_dir, "QEMUSPEC_ADOPTED", pid=inst.process.pid)
        self.tell("ready", pid=inst.process.pid, seconds=0.0, ports=inst.ports, adopted=True)
        return True

    def _on_panic(self, event: dict) -> None:
        self.panicked = True
        self._wake()

    def _watch(self) -> str:
        """Wait until qemu exits, a panic is reported, or a stop is requested; return "failure" or
        "clean" for an exit on its own."""
        inst = self.instance
        assert inst is not None and inst.process is not None
        pidfd = os.pidfd_open(inst.process.pid)
        try:
            while True:
                ready, _, _ = select.select([pidfd, self.wake_r], [], [])
                self._drain()
                if self.stop_requested:
                    record(self.state_dir, "QEMUSPEC_STOPPING", pid=inst.process.pid)
                    result = inst.stop(self._requested_timeout())
                    self.stop_step = result.step
                    record(self.state_dir, "QEMUSPEC_STOPPED", step=result.step, seconds=round(result.seconds, 3))
                    return "clean"
                if self.panicked:
                    inst.quit()
                    return "failure"
                if pidfd in ready:
                    break
        finally:
            os.close(pidfd)
        code = inst.wait(5)
        reason = self._shutdown_reason()
        record(self.state_dir, "QEMUSPEC_EXITED", code=code, reason=reason)
        if reason in ("guest-shutdown", "host-qmp-quit", "host-ui") and code in (0, -1):
            return "clean"
        return "failure"

    def _shutdown_reason(self) -> str | None:
        """The reason of the last SHUTDOWN event of this qemu, if it sent one before exiting."""
        qmp = self.instance.qmp if self.instance else None
        if qmp is None:
            return None
        try:
            return qmp.wait_for("SHUTDOWN", 0.01, since=0)["data"].get("reason")
        except QemuspecError:
            return None

    def _requested_timeout(self) -> float | None:
        try:
            with open(stop_file(self.state_dir)) as f:
                return json.load(f).get("timeout")
        except (OSError, ValueError):
            return None

    def _finish(self, phase: str, why: str) -> int:
        inst = self.instance
        if inst is not None and inst.running():
            self.stop_step = inst.stop(self._requested_timeout()).step
        write_json_atomic(exit_file(self.state_dir), {"phase": phase, "why": why, "step": self.stop_step, "restarts": self.restarts, "at": time.time()})
        for path in (stop_file(self.state_dir), supervisor_file(self.state_dir)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.progress_fd is not None:  # never became ready
            self.tell("failed", detail=why)
        return 0
