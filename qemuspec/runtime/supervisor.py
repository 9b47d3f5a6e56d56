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

import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from qemuspec.errors import QemuspecError
from qemuspec.qmp.protocol import EventLog
from qemuspec.runtime import paths, statedir
from qemuspec.runtime.instance import Instance
from qemuspec.runtime.policy import Ending, Restarts, ending
from qemuspec.runtime.process import start_time

if TYPE_CHECKING:
    from qemuspec.runtime.console import ConsoleProxy
    from qemuspec.spec.models import Machine

HEARTBEAT = 1.0  # seconds between the supervisor's heartbeats (and checks that its runtime directory is still there)
HUNG_AFTER = (
    5.0  # a supervisor whose heartbeat is older than this does not answer: status says hung
)


def exit_file(state_dir: str) -> str:
    return os.path.join(state_dir, statedir.EXIT)


def supervisor_file(state_dir: str) -> str:
    return os.path.join(paths.run_dir(state_dir), statedir.SUPERVISOR)


def record(state_dir: str, event: str, **data: object) -> str | None:
    """A qemuspec lifecycle event in the machine's events.jsonl, in QMP's own event format. A failed
    write is returned (not raised): a full disk must not take the supervisor down."""
    now = time.time()
    log = EventLog(os.path.join(state_dir, statedir.EVENTS))
    log.write(
        {
            "event": event,
            "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)},
            "data": data,
        }
    )
    log.close()
    return log.error


def read_supervisor(state_dir: str) -> statedir.SupervisorRecord | None:
    """The live supervisor of this state directory, or None. Its record lives in the runtime
    directory (only this user writes there) and counts only while the recorded pid holds the
    supervisor lock and has the recorded start time: a forged or stale record names nobody.

    When the runtime directory was removed under a live supervisor (tmpfiles, logind), the supervisor
    makes it again within a heartbeat; if the state directory's copy names a live process of ours
    with the recorded start time, this waits that long for it, trusting nothing the copy says."""
    state_dir = os.path.abspath(state_dir)
    run = paths.run_dir(state_dir)
    info = _registered(run)
    copy = _re_registering(state_dir, run) if info is None else None
    if copy is not None and copy not in _WAITED:
        deadline = time.monotonic() + 3 * HEARTBEAT
        while info is None and time.monotonic() < deadline:
            time.sleep(HEARTBEAT / 10)  # the supervisor makes a directory we cannot be told about
            info = _registered(run)
        if (
            info is None
        ):  # that copy named no supervisor: a command looks again, but waits for it once
            _WAITED.add(copy)
    return info


_WAITED: set[tuple[str, int, str | None]] = (
    set()
)  # (runtime directory, pid, start time) waited for in vain


def _registered(run: str) -> statedir.SupervisorRecord | None:
    info = statedir.read(run, statedir.SUPERVISOR, statedir.SupervisorRecord)
    if (
        info is None
        or info.pid not in statedir.lock_holders(run)
        or start_time(info.pid) != info.started
    ):
        return None
    return info


def _re_registering(state_dir: str, run: str) -> tuple[str, int, str | None] | None:
    """A supervisor whose runtime registry vanished may still live: its record's copy names a live
    process of this user with the start time recorded, and the registry has no lock file. That copy
    as (runtime directory, pid, start time), or None."""
    if os.path.exists(os.path.join(run, statedir.LOCK)):
        return None
    copy = statedir.read(state_dir, statedir.SUPERVISOR, statedir.SupervisorRecord)
    if (
        copy is None
        or not isinstance(copy.pid, int)
        or copy.pid <= 1
        or start_time(copy.pid) != copy.started
    ):
        return None
    try:
        return (
            (run, copy.pid, copy.started)
            if os.stat(f"/proc/{copy.pid}").st_uid == os.getuid()
            else None
        )
    except OSError:
        return None


def hung(state_dir: str, sup: statedir.SupervisorRecord) -> str | None:
    """Why a live supervisor does not answer (None: it does): stopped (SIGSTOP, a debugger), or no
    heartbeat for HUNG_AFTER seconds."""
    from qemuspec.runtime.process import state as process_state

    if (process_state(sup.pid) or "") in ("T", "t"):
        return (
            f"its supervisor (pid {sup.pid}) is stopped (SIGSTOP or a debugger): `kill -CONT {sup.pid}`, "
            "or `down` stops the machine itself"
        )
    age = statedir.heartbeat_age(paths.run_dir(os.path.abspath(state_dir)))
    if age is not None and age > HUNG_AFTER:
        return f"its supervisor (pid {sup.pid}) has not answered for {age:.0f} s: `down` stops the machine itself"
    return None


def stale_supervisor(state_dir: str) -> statedir.SupervisorRecord | None:
    """A supervisor record whose supervisor is gone without finishing (killed): for status."""
    run = paths.run_dir(os.path.abspath(state_dir))
    info = statedir.read(run, statedir.SUPERVISOR, statedir.SupervisorRecord)
    if info is None or read_supervisor(state_dir) is not None:
        return None
    return info


def request_stop(state_dir: str, timeout: float | None) -> None:
    """Tell the supervisor how long ACPI may take (read when it gets SIGTERM)."""
    statedir.write(
        paths.run_dir(os.path.abspath(state_dir)), statedir.STOP, statedir.StopRequest(timeout)
    )


def clear(state_dir: str) -> None:
    """Remove a dead supervisor's records (and the runtime directory if nothing else is in it)."""
    run = paths.run_dir(os.path.abspath(state_dir))
    statedir.remove(
        state_dir, statedir.SUPERVISOR, statedir.STOP
    )  # first: a copy without a lock is "re-registering"
    statedir.remove(run, statedir.SUPERVISOR, statedir.STOP, statedir.LOCK)
    with contextlib.suppress(OSError):
        os.rmdir(run)


def spawn(
    name: str,
    machine: Machine,
    state_dir: str,
    adopt: bool,
    owner: str | None = None,
    restarts: int = 0,
) -> tuple[int, int]:
    """Fork a detached supervisor; returns (pid, fd of the progress pipe to read). ``restarts``: the
    count a re-adopting supervisor carries on from its dead predecessor's."""
    statedir.claim(state_dir)  # proven ours before anything is written there
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
            code = _run(name, machine, state_dir, adopt, write_end, owner, restarts)
    except BaseException:
        import traceback

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


def _run(
    name: str,
    machine: Machine,
    state_dir: str,
    adopt: bool,
    progress_fd: int,
    owner: str | None,
    restarts: int = 0,
) -> int:
    """In the supervisor process."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        log = statedir.open_log(state_dir, statedir.SUPERVISOR_LOG)
    except OSError:
        log = os.dup(devnull)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)
    sys.stdout = _Tolerant(os.fdopen(1, "w", buffering=1))
    sys.stderr = _Tolerant(os.fdopen(2, "w", buffering=1))
    sup = Supervisor(name, machine, state_dir, progress_fd, owner)
    sup.policy.count = restarts
    return sup.run(adopt)


class _Tolerant:
    """The supervisor's stdout/stderr (supervisor.log): a full disk or a deleted directory makes a
    log line fail, never the supervisor."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Supervisor:
    def __init__(
        self,
        name: str,
        machine: Machine,
        state_dir: str,
        progress_fd: int | None,
        owner: str | None = None,
    ):
        self.name = name
        self.machine = machine
        self.state_dir = os.path.abspath(state_dir)
        self.run_dir = paths.run_dir(self.state_dir)
        self.progress_fd = progress_fd
        self.owner = owner
        self.policy = Restarts(machine.restart)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stop_requested = False
        self.reload_requested = False  # SIGHUP: the recorded definition changed live (reload)
        self.panicked = False
        self.stop_step: str | None = None
        self.instance: Instance | None = None
        self.lock_fd: int | None = None
        self.error: str | None = None  # the last write that failed, shown by status
        self.last: Ending | None = None
        self.next_at: float | None = None
        self.current_phase = "starting"
        self.restore_error: str | None = None  # why the last restore failed (the cold boot says it)
        self.attempt = 0
        self.proxy: ConsoleProxy | None = None
        self._registry_lock = threading.Lock()
        self.finishing = (
            False  # set once _finish clears the registry: nothing is made again after that
        )

    @property
    def restarts(self) -> int:
        return self.policy.count

    # -- progress to the CLI ----------------------------------------------------------------------

    def tell(self, status: str, **data: object) -> None:
        if self.progress_fd is None:
            return
        try:
            os.write(
                self.progress_fd,
                (json.dumps({"name": self.name, "status": status, **data}) + "\n").encode(),
            )
        except OSError:
            pass
        if status in ("ready", "failed"):
            os.close(self.progress_fd)  # the CLI may exit now; the machine is ours
            self.progress_fd = None

    def _wake(self, *_: object) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _on_term(self, *_: object) -> None:
        self.stop_requested = True
        self._wake()
        inst = self.instance
        if inst is not None and inst.console is not None:
            inst.console.interrupt()  # a readiness wait on the console ends now, not at its deadline

    def _on_hup(self, *_: object) -> None:
        self.reload_requested = True
        self._wake()

    def _reload(self) -> None:
        """`up` changed this machine live (reconcile._live): take the definition it recorded as the
        machine from now on — the restart policy, the stop timeout, the readiness of a later restart,
        and everything a restart starts — without touching qemu beyond reading its forwards again.
        The records then carry the new definition hash, which is what `up` waits for."""
        from qemuspec.spec.models import Machine

        self.reload_requested = False
        data = statedir.recorded_definition(self.state_dir)
        try:
            machine = Machine.model_validate(data)
        except ValueError as exc:
            print(f"supervisor: the changed definition does not load: {exc}", file=sys.stderr)
            self.event("QEMUSPEC_CHANGE_FAILED", why=str(exc).splitlines()[0])
            return
        self.machine = machine
        self.policy.policy = machine.restart  # the count and backoff carry on
        inst = self.instance
        if inst is not None and inst.running():
            inst.machine = machine
            if inst.qmp is not None:
                with contextlib.suppress(QemuspecError):
                    inst.ports = _forwarded_ports(inst)
            with self._registry_lock:
                inst.write_state()
        self.phase(self.current_phase, self.attempt)
        from qemuspec.spec.records import definition_hash

        self.event(
            "QEMUSPEC_CHANGED",
            hash=definition_hash(machine),
            pid=inst.process.pid if inst is not None and inst.process is not None else None,
        )

    def event(self, name: str, **data: object) -> None:
        failed = record(self.state_dir, name, **data)
        if failed and failed != self.error:
            self.error = failed
            print(f"supervisor: {failed}", file=sys.stderr)
            self.phase(self.current_phase)

    # -- main loop --------------------------------------------------------------------------------

    def run(self, adopt: bool) -> int:
        # A process-directed signal may land on the QMP reader thread; the wakeup fd makes the C-level
        # handler wake our select() whichever thread takes it, so the Python handler runs at once.
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, self._on_hup)
        paths.private_dir(os.path.dirname(self.run_dir))
        paths.private_dir(self.run_dir)
        self.lock_fd = statedir.hold_lock(
            self.run_dir
        )  # held until this process ends, whatever ends it
        self.phase("starting")
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        statedir.remove(self.state_dir, statedir.EXIT)
        first = True
        while True:
            began = time.monotonic()
            started = self._adopt() if (first and adopt) else self._start()
            if (
                not started and self.stop_requested
            ):  # `down` during the start: a stop, not a failure
                return self._finish("stopped", ending(None, None, stopped=True))
            if not started and first:
                return self._finish(
                    "failed", self.last or Ending(True, "never became ready")
                )  # `up` reports it; no retry loop
            first = False
            end = self._watch() if started else (self.last or Ending(True, "launch failed"))
            self.last = end
            if self.stop_requested:
                return self._finish("stopped", ending(None, None, stopped=True))
            decision = self.policy.decide(end, time.monotonic() - began)
            if decision is None:
                return self._finish("crashed" if end.failure else "stopped", end)
            self.next_at = time.time() + decision.delay
            self.event(
                "QEMUSPEC_RESTART",
                reason="failure" if end.failure else "clean",
                why=end.reason,
                delay=decision.delay,
                restarts=decision.attempt,
            )
            self.phase("restarting", attempt=decision.attempt)
            if self._sleep(decision.delay):
                return self._finish("stopped", ending(None, None, stopped=True))
            self.next_at = None

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

    # -- liveness and the runtime registry ---------------------------------------------------------

    def _heartbeat(self) -> None:
        """Every HEARTBEAT: touch the lock (status tells a hung supervisor by its age) and check that the
        runtime directory still holds our lock; a thread, so it goes on while the main loop waits on a
        probe or a stop. A SIGSTOPped supervisor stops beating with everything else."""
        while True:
            time.sleep(HEARTBEAT)  # a clock, not a synchronisation: nothing tells us of an unlink
            if self.lock_fd is None or self.finishing:
                continue
            if not statedir.same_file(self.lock_fd, self.run_dir, statedir.LOCK):
                try:
                    self._re_register()
                except Exception as exc:  # the next beat tries again
                    print(
                        f"supervisor: cannot make its runtime directory again: {exc}",
                        file=sys.stderr,
                    )
                    continue
            statedir.beat(self.lock_fd)

    def _re_register(self) -> None:
        """The runtime directory was removed under us (tmpfiles cleaning /tmp, logind removing
        /run/user/UID, a user): make it again with the lock, our record and qemu's, and the console
        proxy, so status, down and up find this machine again. qemu's own listening sockets in it
        (tool monitor, agent) are gone until qemu is started again: status says so."""
        with self._registry_lock:
            if self.finishing:
                return
            paths.private_dir(os.path.dirname(self.run_dir))
            paths.private_dir(self.run_dir)
            fd = statedir.hold_lock(
                self.run_dir, wait=False
            )  # BlockingIOError: another took it; retried
            old, self.lock_fd = self.lock_fd, fd
            if old is not None:
                os.close(old)
            inst = self.instance
            if inst is not None and inst.running():
                inst.write_state()
            if self.proxy is not None:
                self.proxy.rebind()
            self.error = (
                f"its runtime directory {self.run_dir} was removed at {time.strftime('%H:%M:%S')} and made "
                "again; the tool monitor and agent sockets qemu had there are gone until it restarts "
                "(`qemuspec restart`)"
            )
            print(f"supervisor: {self.error}", file=sys.stderr)
            self.phase(self.current_phase, self.attempt)
            self.event("QEMUSPEC_REREGISTERED", run_dir=self.run_dir)

    def _serve_console(self, inst: Instance) -> None:
        """`qemuspec console` goes through us (runtime/console.py): the reader stays ours for qemu's life."""
        self._unserve_console()
        if inst.console is None:
            return
        from qemuspec.runtime.console import ConsoleProxy

        try:
            self.proxy = ConsoleProxy(inst.layout.console_client, inst.console, self.name)
        except (OSError, QemuspecError) as exc:
            print(f"supervisor: cannot serve the console: {exc}", file=sys.stderr)

    def _unserve_console(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None

    def phase(self, phase: str, attempt: int = 0) -> None:
        """What `status` shows while this supervisor lives: starting, running, restarting, stopping. The record
        goes to the runtime directory (tmpfs, private); the copy in the state directory may fail
        (disk full, read-only, deleted) without taking the supervisor down: the failure is kept
        and shown by status."""
        self.current_phase, self.attempt = phase, attempt
        rec = statedir.SupervisorRecord(
            pid=os.getpid(),
            started=start_time(os.getpid()),
            phase=phase,
            restarts=self.restarts,
            restart=self.machine.restart,
            attempt=attempt,
            next_at=self.next_at,
            last_exit=self.last.reason if self.last else None,
            error=self.error,
            owner=self.owner,
            state_dir=self.state_dir,
        )
        try:  # the copy first, so the authoritative record below already says whether it failed
            statedir.ensure_private(self.state_dir)
            statedir.write(self.state_dir, statedir.SUPERVISOR, rec)
        except (OSError, QemuspecError) as exc:
            failed = f"cannot write {os.path.join(self.state_dir, statedir.SUPERVISOR)}: {getattr(exc, 'strerror', None) or exc}"
            if failed != self.error:
                self.error = rec.error = failed
                print(f"supervisor: {failed}", file=sys.stderr)
        try:
            statedir.write(self.run_dir, statedir.SUPERVISOR, rec)
        except OSError as exc:
            print(f"supervisor: cannot write its record in {self.run_dir}: {exc}", file=sys.stderr)

    def _start(self) -> bool:
        from qemuspec.runtime import warm

        try:  # qemu died in a warm save: its overlays hold the disks' newest writes, committed first
            recovered = warm.recover(self.name, self.machine, self.state_dir)
        except QemuspecError as exc:
            self.event("QEMUSPEC_FAILED", error=str(exc))
            self.last = Ending(True, f"failed to start: {exc}")
            self.tell("failed", detail=str(exc))
            return False
        if recovered:
            self.event("QEMUSPEC_SAVE_RECOVERED", done=recovered)
        verdict = warm.check(self.name, self.machine, self.state_dir) if self.machine.warm else None
        cold_why = verdict.why if verdict is not None else None
        if verdict is not None and verdict.warm:
            if self._start_one(restore=True):
                return True
            warm.discard(self.state_dir)  # a state that does not load is never tried again
            cold_why = f"the saved state was discarded: {self.restore_error}"
        return self._start_one(restore=False, cold_why=cold_why)

    def _start_one(self, restore: bool, cold_why: str | None = None) -> bool:
        inst = Instance(self.name, self.machine, self.state_dir)
        inst.owner = self.owner
        inst.stopping = lambda: self.stop_requested
        inst.on_probe = lambda probe: self.tell("probe", probe=probe)  # `up`'s live line
        self.phase("starting")
        self.instance = inst
        self.panicked = False
        inst.on("GUEST_PANICKED", self._on_panic)
        began = time.monotonic()
        try:
            self.tell("starting")
            inst.launch(restore=restore)
            assert inst.process is not None
            self.event(
                "QEMUSPEC_LAUNCHED",
                pid=inst.process.pid,
                restarts=self.restarts,
                accel=list(inst.layout.accel),
                boot=inst.boot,
                **({"why": cold_why} if cold_why else {}),
                **({"kvm_failed": inst.kvm_failure.split("\n", 1)[0]} if inst.kvm_failure else {}),
            )
            self._serve_console(inst)
            self.tell(
                "waiting", pid=inst.process.pid, boot=inst.boot, accel=list(inst.layout.accel)
            )
            owning = None
            if (
                restore
            ):  # clock and RNG through the agent, while the probes run (ready waits for both)
                from concurrent.futures import ThreadPoolExecutor

                from qemuspec.runtime import warm

                pool = ThreadPoolExecutor(1, thread_name_prefix="after-restore")
                owning = pool.submit(warm.after_restore, inst)
                pool.shutdown(wait=False)
            inst.wait_ready()
            if owning is not None:
                done = owning.result()
                inst.restored = done
                inst.write_state()
                self.event(
                    "QEMUSPEC_RESTORED",
                    pid=inst.process.pid,
                    seconds=round(time.monotonic() - began, 3),
                    **done,
                )
        except Exception as exc:  # a bug must reach the user as a failure, not a silent exit
            if restore:
                detail = self.restore_error = str(exc).split("\n", 1)[0]
                self.event("QEMUSPEC_RESTORE_FAILED", error=detail, then="cold boot")
                self.tell("restore failed", detail=detail)
                self._unserve_console()
                inst.kill()
                return False
            if isinstance(exc, QemuspecError):
                detail = str(exc)
            elif isinstance(
                exc, OSError
            ):  # a state directory made read-only or full under a restart
                where = f" {exc.filename}" if exc.filename else ""
                detail = (
                    f"machine {self.name} cannot start: cannot write{where}: {exc.strerror or exc}: "
                    f"make {self.state_dir} writable (or choose another state directory with --state-dir)"
                )
            else:
                detail = f"machine {self.name}: internal error: {type(exc).__name__}: {exc} (details in supervisor.log)"
            if not isinstance(exc, (QemuspecError, OSError)):
                import traceback

                traceback.print_exc()
            first_line = detail.split("\n", 1)[0]
            self.event("QEMUSPEC_FAILED", error=first_line)
            probe, why = getattr(exc, "probe", None), getattr(exc, "why", None)
            self.last = Ending(
                True,
                f"never became ready ({why + '; ' if why else ''}probe {probe}, after "
                f"{time.monotonic() - began:.1f} s)"
                if probe
                else f"failed to start: {first_line}",
            )
            self.tell("failed", detail=detail)
            self._unserve_console()
            inst.kill()
            return False
        if inst.write_error:
            self.error = inst.write_error
        seconds = time.monotonic() - began
        saved = save_failed = None
        if self.machine.warm and not restore:
            saved, save_failed = self._save(inst)
        assert inst.process is not None
        if not inst.running():  # died during the save: a failure, never "started"
            code = inst.wait(5)
            why = f"qemu exited during the warm save ({ending(code, None).reason})"
            detail = f"machine {self.name}: {why}" + (
                f"; the save: {save_failed}" if save_failed else ""
            )
            self.event("QEMUSPEC_FAILED", error=detail)
            self.last = Ending(True, why, code)
            self.tell("failed", detail=detail)
            return False
        self.phase("running")
        self.event(
            "QEMUSPEC_READY",
            pid=inst.process.pid,
            seconds=round(seconds, 3),
            restarts=self.restarts,
            boot=inst.boot,
        )
        self.tell(
            "ready",
            pid=inst.process.pid,
            seconds=seconds,
            ports=inst.ports,
            boot=inst.boot,
            saved=saved,
            accel=list(inst.layout.accel),
            **({"save_failed": save_failed} if save_failed else {}),
            **({"kvm_failed": inst.kvm_failure.split("\n", 1)[0]} if inst.kvm_failure else {}),
        )
        return True

    def _save(self, inst: Instance) -> tuple[dict | None, str | None]:
        """Save a warm machine's state after its cold boot: (what was saved, why it failed). A failure
        leaves it running on its own disks (warm.save moves them back), cold next time."""
        from qemuspec.runtime import warm

        reason = warm.unsupported(self.machine)
        if reason:
            self.event("QEMUSPEC_SAVE_SKIPPED", reason=reason)
            return None, None
        self.tell("saving")
        try:
            saved = warm.save(inst)
        except Exception as exc:
            if not isinstance(exc, QemuspecError):
                import traceback

                traceback.print_exc()
            error = str(exc).split("\n", 1)[0]
            self.event("QEMUSPEC_SAVE_FAILED", error=error)
            warm.discard(self.state_dir)  # keeps an interrupted save's overlays: they may be in use
            return None, error
        self.event("QEMUSPEC_SAVED", **saved)
        return saved, None

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
        inst.attach_console()  # serial.log goes on from the adopted qemu's console
        self._serve_console(inst)
        if self.owner and inst.owner != self.owner:
            inst.owner = self.owner
            with contextlib.suppress(OSError):
                inst.write_state()
        from qemuspec.runtime import warm

        try:  # its last supervisor died in a warm save: the guest is stopped, the disks on overlays
            finished = warm.finish_interrupted(inst)
        except QemuspecError as exc:
            finished = f"the interrupted save could not be finished or undone: {exc}"
        if finished:
            self.event("QEMUSPEC_SAVE_RECOVERED", done=[finished])
        self.phase("running")
        assert inst.process is not None
        self.event("QEMUSPEC_ADOPTED", pid=inst.process.pid)
        self.tell(
            "ready",
            pid=inst.process.pid,
            seconds=0.0,
            ports=inst.ports,
            adopted=True,
            accel=list(inst.layout.accel),
            **({"recovered": finished} if finished else {}),
        )
        return True

    def _on_panic(self, event: dict) -> None:
        self.panicked = True
        self._wake()

    def _watch(self) -> Ending:
        """Wait until qemu exits, a panic is reported, or a stop is requested; say how it ended."""
        inst = self.instance
        assert inst is not None and inst.process is not None
        pidfd = os.pidfd_open(inst.process.pid)
        try:
            while True:
                ready, _, _ = select.select([pidfd, self.wake_r], [], [])
                self._drain()
                if self.reload_requested and not self.stop_requested:
                    self._reload()
                if self.stop_requested:
                    self.phase("stopping")
                    self.event("QEMUSPEC_STOPPING", pid=inst.process.pid)
                    result = inst.stop(self._requested_timeout())
                    self.stop_step = result.step
                    self.event(
                        "QEMUSPEC_STOPPED", step=result.step, seconds=round(result.seconds, 3)
                    )
                    return ending(result.returncode, None, stopped=True)
                if self.panicked:
                    inst.quit()
                    self.event(
                        "QEMUSPEC_EXITED", code=inst.process.returncode, reason="guest-panic"
                    )
                    return ending(inst.process.returncode, None, panicked=True)
                if pidfd in ready:
                    break
        finally:
            os.close(pidfd)
            if inst.process.poll() is not None:
                self._unserve_console()
        code = inst.wait(5)
        reason = self._shutdown_reason()
        end = ending(code, reason)
        self.event("QEMUSPEC_EXITED", code=code, reason=reason, why=end.reason)
        return end

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
        request = statedir.read(self.run_dir, statedir.STOP, statedir.StopRequest)
        return request.timeout if request else None

    def _finish(self, phase: str, end: Ending) -> int:
        inst = self.instance
        if inst is not None and inst.running():
            self.phase("stopping")
            self.stop_step = inst.stop(self._requested_timeout()).step
        self._unserve_console()
        try:
            statedir.ensure_private(self.state_dir)
            statedir.write(
                self.state_dir,
                statedir.EXIT,
                statedir.ExitRecord(
                    phase=phase,
                    why=end.reason,
                    reason=end.reason,
                    step=self.stop_step,
                    code=end.code,
                    signal=end.signal,
                    restarts=self.restarts,
                    at=time.time(),
                ),
            )
        except (OSError, QemuspecError) as exc:
            print(f"supervisor: cannot record how the machine ended: {exc}", file=sys.stderr)
        with self._registry_lock:
            self.finishing = True
        clear(self.state_dir)
        if self.progress_fd is not None:  # never became ready
            self.tell("failed", detail=end.reason)
        return 0


def _forwarded_ports(inst: Instance) -> list[dict]:
    """The forwards qemu has now, asked over the supervisor's monitor (a live change adds or drops them)."""
    from qemuspec.runtime.probes import forwarded_ports

    assert inst.qmp is not None
    return forwarded_ports(inst.qmp)
