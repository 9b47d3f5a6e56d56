"""Make the running machines match a definition file: plan what differs, then apply it.

Machines start level by level in ``depends_on`` order, each level in parallel, each machine only after
its dependencies are ready; they stop in the reverse order. A lock file per state directory makes two
invocations on one file take turns, so they never start two qemu for one machine.

No supervisor yet: machines run detached once ready (they outlive the CLI); restart policies are
recorded but not acted on.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from qemuspec.errors import QemuspecError
from qemuspec.runtime.instance import definition_hash
from qemuspec.spec.models import File, order_machines

Report = Callable[[str, str], None]


@dataclass
class Outcome:
    name: str
    action: str  # "started", "up to date", "recreated", "stopped", "not running", "failed"
    seconds: float = 0.0
    pid: int | None = None
    detail: str = ""
    ports: list = field(default_factory=list)


@contextlib.contextmanager
def locked(state_root: str) -> Iterator[None]:
    os.makedirs(state_root, exist_ok=True)
    fd = os.open(os.path.join(state_root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
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


def _instance(spec: File, root: str, name: str):
    from qemuspec.runtime.instance import Instance

    return Instance(name, spec.machines[name], os.path.join(root, name))


def _find(spec: File, root: str, name: str):
    from qemuspec.runtime.instance import Instance

    return Instance.find(name, spec.machines[name], os.path.join(root, name))


def plan(spec: File, root: str, names: list[str]) -> list[dict]:
    """Per machine: what `up` would do, and for a changed machine the argv lines that differ."""
    from qemuspec.render import render

    out = []
    for level in with_dependencies(spec, names):
        for name in level:
            found = _find(spec, root, name)
            if found is None:
                out.append({"name": name, "action": "start", "diff": []})
                continue
            if found.recorded_hash == definition_hash(spec.machines[name]):
                out.append({"name": name, "action": "up to date", "diff": []})
                continue
            wanted = render(spec.machines[name], name, found.layout)
            diff = list(difflib.unified_diff(found.argv, wanted, "running", "definition", lineterm="", n=1))
            out.append({"name": name, "action": "recreate", "diff": diff})
    return out


def up(spec: File, root: str, names: list[str], report: Report = lambda n, s: None) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with locked(root):
        for level in with_dependencies(spec, names):
            with ThreadPoolExecutor(max_workers=max(1, len(level))) as pool:
                results = list(pool.map(lambda n: _up_one(spec, root, n, report), level))
            outcomes += results
            if any(r.action == "failed" for r in results):
                break
    return outcomes


def _up_one(spec: File, root: str, name: str, report: Report) -> Outcome:
    began = time.monotonic()
    found = _find(spec, root, name)
    action = "started"
    try:
        if found is not None:
            if found.recorded_hash == definition_hash(spec.machines[name]):
                report(name, "up to date")
                return Outcome(name, "up to date", 0.0, found.process.pid, ports=found.ports)
            report(name, "definition changed: stopping")
            found.connect()
            found.stop()
            action = "recreated"
        inst = _instance(spec, root, name)
        report(name, "starting")
        inst.launch()
        report(name, "waiting for ready")
        try:
            inst.wait_ready()
        except BaseException:
            inst.kill()
            raise
        inst.close()
        seconds = time.monotonic() - began
        report(name, f"ready in {seconds:.1f} s")
        return Outcome(name, action, seconds, inst.process.pid if inst.process else None, ports=inst.ports)
    except QemuspecError as exc:
        report(name, "failed")
        return Outcome(name, "failed", time.monotonic() - began, detail=str(exc))


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
    return outcomes


def _down_one(spec: File, root: str, name: str, timeout: float | None, report: Report) -> Outcome:
    from qemuspec.runtime.instance import forget

    found = _find(spec, root, name)
    if found is None:
        forget(os.path.join(root, name))
        return Outcome(name, "not running")
    report(name, "stopping")
    try:
        found.connect()
    except QemuspecError:
        pass  # stop() escalates to signals without QMP
    result = found.stop(timeout)
    report(name, f"stopped ({result.step}, {result.seconds:.1f} s)")
    return Outcome(name, "stopped", result.seconds, found.process.pid if found.process else None, detail=result.step)
