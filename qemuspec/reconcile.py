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
import difflib
import fcntl
import json
import os
import select
import selectors
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from qemuspec.errors import QemuspecError
from qemuspec.runtime import supervisor
from qemuspec.runtime.instance import Instance, definition_hash, forget
from qemuspec.spec import preflight
from qemuspec.spec.models import File, order_machines

Report = Callable[[str, str], None]
STOP_MARGIN = 15.0  # beyond the stop timeout: quit (5 s) and signals (3 s) plus slack


@dataclass
class Outcome:
    name: str
    action: str  # "started", "up to date", "adopted", "recreated", "stopped", "not running", "failed"
    seconds: float = 0.0
    pid: int | None = None
    detail: str = ""
    ports: list = field(default_factory=list)
    qemu: str = ""  # the absolute binary started, so a user sees what a definition made them run

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def locked(state_root: str) -> Iterator[None]:
    os.makedirs(state_root, exist_ok=True)
    fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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


def _decide(spec: File, root: str, name: str) -> tuple[str, Instance | None]:
    """What `up` does with one machine: "start", "up to date", "adopt" (running, same definition, no
    supervisor) or "recreate" (changed, or a supervisor between restarts); and the running qemu."""
    machine = spec.machines[name]
    found = Instance.find(name, machine, _state(root, name))
    supervised = supervisor.read_supervisor(_state(root, name)) is not None
    if found is not None and found.recorded_hash == definition_hash(machine):
        return ("up to date" if supervised else "adopt"), found
    return ("recreate" if found is not None or supervised else "start"), found


def plan(spec: File, root: str, names: list[str]) -> list[dict]:
    """Per machine: what `up` would do, and for a changed machine the argv lines that differ."""
    from qemuspec.render import render

    out = []
    for level in with_dependencies(spec, names):
        for name in level:
            action, found = _decide(spec, root, name)
            diff = []
            if action == "recreate" and found is not None:
                wanted = render(spec.machines[name], name, found.layout)
                diff = list(difflib.unified_diff(found.argv, wanted, "running", "definition", lineterm="", n=1))
            out.append({"name": name, "action": action, "diff": diff})
    return out


def up(spec: File, root: str, names: list[str], report: Report = lambda n, s: None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with locked(root):
        for level in with_dependencies(spec, names):
            results = _up_level(spec, root, level, report)
            outcomes += results
            if any(r.action == "failed" for r in results):
                break
    return outcomes


def _up_level(spec: File, root: str, level: list[str], report: Report) -> list[Outcome]:
    outcomes: dict[str, Outcome] = {}
    pending: dict[int, tuple[str, str, float]] = {}  # fd -> (name, action, began)
    for name in level:
        machine = spec.machines[name]
        state_dir = _state(root, name)
        began = time.monotonic()
        decision, found = _decide(spec, root, name)
        if decision == "up to date":
            report(name, "up to date")
            outcomes[name] = Outcome(name, "up to date", 0.0, found.process.pid, ports=found.ports)
            continue
        action, adopt = "started", False
        if decision == "adopt":
            action, adopt = "adopted", True
            report(name, "adopting the running machine")
        elif decision == "recreate":
            report(name, "definition changed: stopping" if found is not None else "replacing a restarting machine")
            _stop_one(spec, root, name, None)
            action = "recreated"
        try:
            _, fd = supervisor.spawn(name, machine, state_dir, adopt)
        except (OSError, QemuspecError) as exc:
            outcomes[name] = Outcome(name, "failed", detail=f"cannot start the supervisor of {name}: {exc}")
            continue
        pending[fd] = (name, action, began)
        report(name, "starting")
    _collect(spec, pending, outcomes, report)
    return [outcomes[n] for n in level if n in outcomes]


def _collect(spec: File, pending: dict[int, tuple[str, str, float]], outcomes: dict[str, Outcome], report: Report) -> None:
    """Read supervisors' progress lines until each machine is ready or failed."""
    sel = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    deadlines: dict[int, float] = {}
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
                            report(name, "waiting for ready")
                        elif status == "ready":
                            seconds = time.monotonic() - began
                            report(name, f"ready in {seconds:.1f} s" if not message.get("adopted") else "adopted")
                            done = Outcome(name, action, seconds, message.get("pid"), ports=message.get("ports", []),
                                           qemu=preflight.qemu_path(spec.machines[name].qemu) or spec.machines[name].qemu)
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


def down(spec: File, root: str, names: list[str], timeout: float | None = None, report: Report = lambda n, s: None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    selected = set(names)
    with locked(root):
        for level in reversed(order_machines(spec.machines)):
            level = [n for n in level if n in selected]
            if not level:
                continue
            with ThreadPoolExecutor(max_workers=len(level)) as pool:
                outcomes += list(pool.map(lambda n: _down_one(spec, root, n, timeout, report), level))
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


def _down_one(spec: File, root: str, name: str, timeout: float | None, report: Report) -> Outcome:
    state_dir = _state(root, name)
    if Instance.find(name, spec.machines[name], state_dir) is None and supervisor.read_supervisor(state_dir) is None:
        forget(state_dir)
        return Outcome(name, "not running")
    report(name, "stopping")
    began = time.monotonic()
    step = _stop_one(spec, root, name, timeout)
    seconds = time.monotonic() - began
    report(name, f"stopped ({step}, {seconds:.1f} s)")
    supervisor.record(state_dir, "QEMUSPEC_DOWN", step=step)
    return Outcome(name, "stopped", seconds, detail=step)


def _stop_one(spec: File, root: str, name: str, timeout: float | None) -> str:
    """Stop a machine: through its supervisor when it has one (so it is not restarted), else
    directly. Returns the step that stopped qemu."""
    machine = spec.machines[name]
    state_dir = _state(root, name)
    sup = supervisor.read_supervisor(state_dir)
    step = "already stopped"
    if sup is not None:
        with open(supervisor.stop_file(state_dir), "w") as f:
            json.dump({"timeout": timeout}, f)
        budget = (machine.stop_timeout if timeout is None else timeout) + STOP_MARGIN
        if _signal_and_wait(sup["pid"], signal.SIGTERM, budget):
            try:
                with open(supervisor.exit_file(state_dir)) as f:
                    step = json.load(f).get("step") or step
            except (OSError, ValueError):
                pass
        else:
            _signal_and_wait(sup["pid"], signal.SIGKILL, 5)
    found = Instance.find(name, machine, state_dir)
    if found is not None:  # unsupervised, or the supervisor failed to stop it
        try:
            found.connect()
        except QemuspecError:
            pass  # stop() escalates to signals without QMP
        step = found.stop(timeout).step
    forget(state_dir)
    for path in (supervisor.supervisor_file(state_dir), supervisor.stop_file(state_dir)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return step


def _signal_and_wait(pid: int, signum: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        os.kill(pid, signum)
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    except ProcessLookupError:
        return True
    finally:
        os.close(fd)
