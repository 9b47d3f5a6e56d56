"""Make the running machines match a definition file: plan what differs, then apply it.

``up`` goes level by level in ``depends_on`` order. In a level, it forks one supervisor per machine to
start (all at once, so they boot in parallel), then waits on their progress pipes until each reports
ready or failed; the next level starts only when the whole level is ready. ``down`` stops in the
reverse order, a level's machines in parallel. Both hold a lock on the state directory (flock on the
directory itself: nothing to leave behind), so concurrent invocations take turns and never start two
qemu for one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import selectors
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from qemuspec.errors import QemuspecError
from qemuspec.runtime import supervisor
from qemuspec.runtime.instance import Instance, forget
from qemuspec.spec import preflight
from qemuspec.spec.order import order_machines
from qemuspec.spec.records import definition_hash

if TYPE_CHECKING:
    from qemuspec.spec.models import File

Report = Callable[[str, str], None]


@dataclass
class Outcome:
    name: str
    action: str  # "started", "up to date", "adopted", "recreated", "stopped", "not running", "failed"
    seconds: float = 0.0
    pid: int | None = None
    detail: str = ""
    ports: list = field(default_factory=list)
    accel: list = field(default_factory=list)  # the accelerator qemu actually runs with
    qemu: str = ""  # the absolute binary started, so a user sees what a definition made them run
    forced: bool = False  # stopped without the guest's own shutdown (quit or a signal): libvirt's destroy
    warnings: list = field(default_factory=list)  # said on stderr, kept in --json: a failed warm save, a forced stop

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def locked(state_root: str) -> Iterator[None]:
    from qemuspec.runtime.statedir import ensure_private

    ensure_private(state_root)
    fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def with_dependencies(spec: File, names: list[str]) -> list[list[str]]:
    """Levels to start: the named machines and everything they depend on."""
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(spec.machines[name].depends_on)
    return [[n for n in level if n in wanted] for level in order_machines(spec.machines) if any(n in wanted for n in level)]


def needed(spec: File, names: list[str]) -> list[str]:
    """The machines `up` may start for these names: them and their dependencies."""
    return [n for level in with_dependencies(spec, names) for n in level]


def _state(root: str, name: str) -> str:
    return os.path.join(root, name)


def owner_of(root: str, name: str) -> str | None:
    """The definition file whose `up` runs the machine in this state directory, if one runs it."""
    sup = supervisor.read_supervisor(_state(root, name))
    if sup is not None and sup.owner:
        return sup.owner
    from qemuspec.runtime.instance import recorded

    record = recorded(_state(root, name))
    return record.owner if record is not None else None


def foreign(root: str, name: str, owner: str | None) -> str | None:
    """Why this file may not touch a machine another definition file runs (None: it may).

    A running machine belongs to the file that started it: two files in one directory that both
    declare `web` share `.qemuspec/web`, and the second file's up/down/plan must not stop, replace or
    recreate the first one's VM. (Give each file its own state directory to run both.)"""
    if owner is None:
        return None
    other = owner_of(root, name)
    live = supervisor.read_supervisor(_state(root, name)) is not None or _running(root, name)
    if other is None or not live or os.path.abspath(other) == os.path.abspath(owner):
        return None
    return (f"machine {name} in {_state(root, name)} is run by {other}, not {owner}: stop it with "
            f"`qemuspec down {other}`, or give this file its own state directory (--state-dir)")


def _running(root: str, name: str) -> bool:
    from qemuspec.runtime.instance import is_our_qemu, recorded
    from qemuspec.runtime import paths

    record = recorded(_state(root, name))
    return record is not None and is_our_qemu(record, paths.layout(_state(root, name)).pidfile)


def _decide(spec: File, root: str, name: str, owner: str | None = None) -> tuple[str, Instance | None]:
    """What `up` does with one machine: "start", "up to date", "adopt" (running, same definition, no
    supervisor), "wait" (its supervisor is starting or restarting it: another `up`, interrupted, began
    it), "recreate" (changed), or "foreign" (another definition file runs it); and the running qemu."""
    machine = spec.machines[name]
    if foreign(root, name, owner):
        return "foreign", None
    found = Instance.find(name, machine, _state(root, name))
    sup = supervisor.read_supervisor(_state(root, name))
    changed = found is not None and found.recorded_hash != definition_hash(machine)
    if sup is not None and sup.phase in ("starting", "restarting") and not changed:
        return "wait", found
    if found is not None and not changed:
        return ("up to date" if sup is not None else "adopt"), found
    return ("recreate" if found is not None or sup is not None else "start"), found


def plan(spec: File, root: str, names: list[str], owner: str | None = None) -> list[dict]:
    """Per machine: what `up` would do, and for a changed machine the argv lines that differ."""
    from qemuspec.render import render

    out: list[dict] = []
    for level in with_dependencies(spec, names):
        for name in level:
            action, found = _decide(spec, root, name, owner)
            if action == "foreign":
                out.append({"name": name, "action": "belongs to another file", "diff": [], "detail": foreign(root, name, owner)})
                continue
            diff = []
            if action == "recreate" and found is not None:
                wanted = render(spec.machines[name], name, found.layout)
                import difflib

                diff = list(difflib.unified_diff(found.argv, wanted, "running", "definition", lineterm="", n=1))
            if action == "wait":  # a supervisor is starting it (an `up` was interrupted): `up` waits for it
                action = "starting"
            step: dict[str, Any] = {"name": name, "action": action, "diff": diff}
            machine = spec.machines[name]
            if machine.warm:
                from qemuspec.runtime import warm

                step["warm"] = warm.check(name, machine, _state(root, name)).as_dict()
            out.append(step)
    return out


def up(spec: File, root: str, names: list[str], report: Report = lambda n, s: None, owner: str | None = None) -> list[Outcome]:
    """``owner``: the definition file (recorded, so another file's commands leave the machine alone)."""
    outcomes: list[Outcome] = []
    with locked(root):
        for level in with_dependencies(spec, names):
            results = _up_level(spec, root, level, report, owner)
            outcomes += results
            if any(r.action == "failed" for r in results):
                break
    return outcomes


def _up_level(spec: File, root: str, level: list[str], report: Report, owner: str | None = None) -> list[Outcome]:
    outcomes: dict[str, Outcome] = {}
    pending: dict[int, tuple[str, str, float]] = {}  # fd -> (name, action, began)
    for name in level:
        machine = spec.machines[name]
        state_dir = _state(root, name)
        began = time.monotonic()
        decision, found = _decide(spec, root, name, owner)
        if decision == "foreign":
            report(name, "failed")
            outcomes[name] = Outcome(name, "failed", detail=foreign(root, name, owner) or "")
            continue
        if decision == "wait":
            report(name, "waiting for the start in progress")
            waited = _wait_started(spec, root, name, began)
            if waited is not None:
                outcomes[name] = waited
                report(name, "failed" if waited.action == "failed" else f"ready in {waited.seconds:.1f} s")
                continue
            decision, found = _decide(spec, root, name, owner)  # it ended on its own (stopped): decide again
        if decision == "up to date":
            report(name, "up to date")
            assert found is not None and found.process is not None
            outcomes[name] = Outcome(name, "up to date", 0.0, found.process.pid, ports=found.ports, accel=list(found.layout.accel))
            continue
        action, adopt, restarts = "started", False, 0
        if decision == "adopt":
            action, adopt = "adopted", True
            stale = supervisor.stale_supervisor(state_dir)
            restarts = stale.restarts if stale else 0  # the count carries on
            report(name, "adopting the running machine")
        elif decision == "recreate":
            report(name, "definition changed: stopping" if found is not None else "replacing a restarting machine")
            _stop_one(spec, root, name, None)
            action = "recreated"
        elif decision == "start":
            _clean_stale(state_dir)
        try:
            _, fd = supervisor.spawn(name, machine, state_dir, adopt, owner, restarts)
        except (OSError, QemuspecError) as exc:
            outcomes[name] = Outcome(name, "failed", detail=f"cannot start the supervisor of {name}: {exc}")
            continue
        pending[fd] = (name, action, began)
        report(name, "starting")
    _collect(spec, pending, outcomes, report)
    return [outcomes[n] for n in level if n in outcomes]


def readopt(spec: File, root: str, names: list[str], owner: str | None = None) -> list[Outcome]:
    """Give unsupervised machines with a restart policy a supervisor again (libvirtd and PID 1 re-find
    their children; so does any qemuspec command that sees one): only a machine this file started,
    still of this definition (same hash), and only when no other qemuspec command holds the state
    lock (it is acting on the machines; never wait for it). The restart count carries on."""
    wanted = [n for n in names if spec.machines[n].restart != "no" and _unsupervised(spec, root, n, owner)]
    if not wanted:
        return []
    from qemuspec.runtime.statedir import ensure_private

    ensure_private(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        pending: dict[int, tuple[str, str, float]] = {}
        outcomes: dict[str, Outcome] = {}
        for name in wanted:
            if not _unsupervised(spec, root, name, owner):  # checked again under the lock
                continue
            stale = supervisor.stale_supervisor(_state(root, name))
            try:
                _, progress = supervisor.spawn(name, spec.machines[name], _state(root, name), True, owner,
                                               stale.restarts if stale else 0)
            except (OSError, QemuspecError) as exc:
                outcomes[name] = Outcome(name, "failed", detail=f"cannot start the supervisor of {name}: {exc}")
                continue
            pending[progress] = (name, "adopted", time.monotonic())
        _collect(spec, pending, outcomes, lambda n, s: None)
        return list(outcomes.values())
    finally:
        os.close(fd)


def _unsupervised(spec: File, root: str, name: str, owner: str | None) -> bool:
    machine = spec.machines[name]
    state_dir = _state(root, name)
    if supervisor.read_supervisor(state_dir) is not None or foreign(root, name, owner):
        return False
    found = Instance.find(name, machine, state_dir)
    return found is not None and found.recorded_hash == definition_hash(machine)


def _wait_started(spec: File, root: str, name: str, began: float) -> Outcome | None:
    """Wait for a start another `up` began (the supervisor lives on when that `up` is interrupted):
    its outcome is ours. Ready: "started"; failed, or a failed attempt of a restarting machine: "failed"
    with the supervisor's reason; no answer within the readiness timeout (after a pending restart's
    delay): "failed". None when the supervisor ended without a failure (then `up` decides again)."""
    from qemuspec.runtime import statedir

    machine = spec.machines[name]
    state_dir = _state(root, name)
    sup = supervisor.read_supervisor(state_dir)
    if sup is None:
        return None
    delay = max(0.0, (sup.next_at or time.time()) - time.time()) if sup.phase == "restarting" else 0.0
    deadline = time.monotonic() + delay + machine.ready.timeout + 10.0
    seen_failure = sup.last_exit if sup.phase == "restarting" else None
    try:
        pidfd = os.pidfd_open(sup.pid)
    except ProcessLookupError:
        pidfd = None
    try:
        while True:
            current = supervisor.read_supervisor(state_dir) if pidfd is not None else None
            if current is None:  # the supervisor ended: how, its exit record says
                end = statedir.read(state_dir, statedir.EXIT, statedir.ExitRecord)
                if end is not None and end.phase in ("failed", "crashed"):
                    return Outcome(name, "failed", time.monotonic() - began,
                                   detail=f"machine {name}: the start another `up` began failed: "
                                          f"{end.reason or end.why}")
                return None
            if current.phase == "running":
                found = Instance.find(name, machine, state_dir)
                if found is not None and found.process is not None:
                    return Outcome(name, "started", time.monotonic() - began, found.process.pid,
                                   detail="start begun by another `up`", ports=found.ports,
                                   accel=list(found.layout.accel),
                                   qemu=preflight.qemu_path(machine.qemu) or machine.qemu)
            if current.phase == "restarting" and current.last_exit and current.last_exit != seen_failure:
                return Outcome(name, "failed", time.monotonic() - began,
                               detail=f"machine {name}: the start another `up` began failed: {current.last_exit} "
                                      f"(restart = \"{current.restart}\": attempt {current.attempt} follows)")
            if current.phase == "stopping":
                return Outcome(name, "failed", time.monotonic() - began,
                               detail=f"machine {name} is being stopped (`down` runs)")
            if time.monotonic() > deadline:
                return Outcome(name, "failed", time.monotonic() - began,
                               detail=f"machine {name} was not ready within {machine.ready.timeout:g} s of the start "
                                      f"another `up` began (its supervisor, pid {current.pid}, says {current.phase})")
            # the supervisor's record changes without a notification we can wait on; its exit wakes us at once
            select.select([pidfd] if pidfd is not None else [], [], [], 0.1)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _collect(spec: File, pending: dict[int, tuple[str, str, float]], outcomes: dict[str, Outcome], report: Report) -> None:
    """Read supervisors' progress lines until each machine is ready or failed."""
    sel = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    deadlines: dict[int, float] = {}
    discarded: dict[int, str] = {}  # fd -> why its saved state was not restored
    for fd, (name, _, _) in pending.items():
        sel.register(fd, selectors.EVENT_READ)
        buffers[fd] = b""
        deadlines[fd] = time.monotonic() + spec.machines[name].ready.timeout + 30.0
    try:
        while pending:
            timeout = max(0.0, min(deadlines[fd] for fd in pending) - time.monotonic())
            events = sel.select(timeout)
            if not events:
                for fd in [fd for fd in pending if deadlines[fd] <= time.monotonic()]:
                    name, _, began = pending.pop(fd)
                    sel.unregister(fd)
                    os.close(fd)
                    outcomes[name] = Outcome(name, "failed", time.monotonic() - began, detail=f"machine {name}: its supervisor gave no answer in time")
                continue
            for key, _ in events:
                fd = key.fd
                name, action, began = pending[fd]
                chunk = os.read(fd, 65536)
                if chunk:
                    buffers[fd] += chunk
                    *lines, buffers[fd] = buffers[fd].split(b"\n")
                    done = None
                    for line in lines:
                        message = json.loads(line)
                        status = message["status"]
                        if status == "waiting":
                            report(name, "restoring saved state" if message.get("boot") == "warm" else "waiting for ready")
                        elif status == "saving":
                            report(name, "saving warm state")
                        elif status == "restore failed":
                            discarded[fd] = message.get("detail", "")
                            report(name, "saved state did not load: booting cold")
                        elif status == "ready":
                            seconds = time.monotonic() - began
                            how = " (warm)" if message.get("boot") == "warm" else ""
                            report(name, f"ready in {seconds:.1f} s{how}" if not message.get("adopted") else "adopted")
                            detail = f"boot {message['boot']}" if message.get("boot") and spec.machines[name].warm else ""
                            warnings = []
                            if fd in discarded:
                                warnings.append(f"the saved state was not restored: {discarded[fd]}")
                                detail += f" (saved state discarded: {discarded[fd]})"
                            if message.get("kvm_failed"):  # said on up's line, not only in status --json
                                detail += ("; " if detail else "") + f"kvm failed, fell back to tcg: {message['kvm_failed']}"
                            if message.get("saved"):
                                saved = message["saved"]
                                detail += f", state saved in {saved['seconds']:.2f} s ({saved['bytes'] / 2**20:.0f} MiB)"
                            if message.get("save_failed"):  # running, its data safe: exit 0, said plainly
                                detail += f", warm save failed: {message['save_failed']}"
                                warnings.append(f"warm save failed, the next start is cold: {message['save_failed']}")
                            if message.get("boot") and spec.machines[name].warm and not message.get("save_failed"):
                                from qemuspec.runtime.warm import disk_writes

                                if (note := disk_writes(spec.machines[name])):
                                    detail += f"; {note.split(':', 1)[0]}"
                            if message.get("recovered"):
                                detail += ("; " if detail else "") + message["recovered"]
                            done = Outcome(name, action, seconds, message.get("pid"), detail=detail, ports=message.get("ports", []), accel=message.get("accel", []),
                                           qemu=preflight.qemu_path(spec.machines[name].qemu) or spec.machines[name].qemu,
                                           warnings=warnings)
                        elif status == "failed":
                            report(name, "failed")
                            done = Outcome(name, "failed", time.monotonic() - began, detail=message.get("detail", ""))
                    if done is None:
                        continue
                    outcomes[name] = done
                else:
                    outcomes.setdefault(name, Outcome(name, "failed", time.monotonic() - began, detail=f"machine {name}: its supervisor exited unexpectedly (see supervisor.log)"))
                pending.pop(fd)
                sel.unregister(fd)
                os.close(fd)
    finally:
        sel.close()


def down(spec: File, root: str, names: list[str], timeout: float | None = None, report: Report = lambda n, s: None,
         owner: str | None = None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    selected = set(names)
    with locked(root):
        for level in reversed(order_machines(spec.machines)):
            level = [n for n in level if n in selected]
            if not level:
                continue
            if len(level) == 1:  # no pool for one machine (its import is a tenth of a quick `down`)
                outcomes.append(_down_one(spec, root, level[0], timeout, report, owner))
                continue
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(level)) as pool:
                outcomes += list(pool.map(lambda n: _down_one(spec, root, n, timeout, report, owner), level))
        _stop_idle_networks(spec, root)
    return outcomes


def _stop_idle_networks(spec: File, root: str) -> None:
    """A network's switch goes when no machine of the file that uses it still runs."""
    from qemuspec.runtime import paths
    from qemuspec.runtime.network import stop_switch

    for network in spec.networks:
        users = [n for n, m in spec.machines.items() if any(nic.network == network for nic in m.nics)]
        if users and not any(Instance.find(n, spec.machines[n], _state(root, n)) for n in users):
            stop_switch(paths.layout(_state(root, users[0])).network(network))


def _down_one(spec: File, root: str, name: str, timeout: float | None, report: Report, owner: str | None = None) -> Outcome:
    state_dir = _state(root, name)
    why = foreign(root, name, owner)
    if why:
        return Outcome(name, "belongs to another file", detail=why)
    if Instance.find(name, spec.machines[name], state_dir) is None and supervisor.read_supervisor(state_dir) is None:
        _clean_stale(state_dir)
        return Outcome(name, "not running")
    report(name, "stopping")
    began = time.monotonic()
    step = _stop_one(spec, root, name, timeout)
    seconds = time.monotonic() - began
    report(name, f"stopped ({step}, {seconds:.1f} s)")
    done = stopped(name, seconds, step)
    supervisor.record(state_dir, "QEMUSPEC_DOWN", step=step, forced=done.forced)
    return done


def stopped(name: str, seconds: float, step: str) -> Outcome:
    """A stop's outcome; a forced one (quit, a signal, libvirt's destroy: not the guest's own shutdown)
    says so, as a field and a warning."""
    from qemuspec.runtime.policy import forced, synced

    if not forced(step):
        return Outcome(name, "stopped", seconds, detail=step)
    return Outcome(name, "stopped", seconds, detail=step, forced=True, warnings=[
        f"forced stop ({step}): the guest did not shut down by itself and was powered off; "
        + ("its file systems were written out through the guest agent first" if synced(step) else
           "writes it had not synced are lost")])


def _stop_one(spec: File, root: str, name: str, timeout: float | None) -> str:
    """Stop a machine. One owner for stopping: a live supervisor stops its own machine (so it is not
    restarted, and its escalation is never cut short); we wait for it as long as that escalation can
    take (policy.stop_budget, from the named timeouts) and act ourselves only when there is no
    supervisor, or it did not finish within that budget (hung: then it is killed first).
    Returns the step that stopped qemu."""
    from qemuspec.runtime import statedir
    from qemuspec.runtime.policy import stop_budget

    machine = spec.machines[name]
    state_dir = _state(root, name)
    sup = supervisor.read_supervisor(state_dir)
    step = "already stopped"
    acpi = machine.stop_timeout if timeout is None else timeout
    if sup is not None:
        supervisor.request_stop(state_dir, timeout)
        if _signal_and_wait(sup.pid, signal.SIGTERM, stop_budget(acpi), lambda: supervisor.hung(state_dir, sup)):
            end = statedir.read(state_dir, statedir.EXIT, statedir.ExitRecord)
            step = (end.step if end else None) or step
        else:  # hung (HUNG_GRACE without an answer) or over its budget: we act ourselves
            _signal_and_wait(sup.pid, signal.SIGKILL, 5)
    found = Instance.find(name, machine, state_dir)
    if found is not None:  # unsupervised, or its supervisor hung
        try:
            found.connect()
        except QemuspecError:
            pass  # stop() escalates to signals without QMP
        step = found.stop(timeout).step
    _clean_stale(state_dir)
    return step


def _clean_stale(state_dir: str) -> None:
    """What a killed supervisor and qemu left: records, sockets, the runtime directory. Only called
    when neither lives (checked through the lock and the process identity)."""
    if supervisor.read_supervisor(state_dir) is None:
        forget(state_dir)
        supervisor.clear(state_dir)


HUNG_GRACE = 3.0  # seconds a supervisor that does not answer gets to come back before `down` acts itself


def _signal_and_wait(pid: int, signum: int, timeout: float, hung: Callable[[], str | None] | None = None) -> bool:
    """Signal and wait for the exit (True) within ``timeout``; with ``hung``, give up (False) once the
    process has not answered for HUNG_GRACE (a SIGSTOPped supervisor never handles the SIGTERM)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        silent_since: float | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if select.select([fd], [], [], min(remaining, 0.5) if hung else remaining)[0]:
                return True
            if hung is not None:
                now = time.monotonic()
                if hung() is None:
                    silent_since = None
                elif silent_since is None:
                    silent_since = now
                elif now - silent_since >= HUNG_GRACE:
                    return False
    except ProcessLookupError:
        return True
    finally:
        os.close(fd)
