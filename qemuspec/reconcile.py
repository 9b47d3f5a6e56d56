"""Make the running machines match a definition file: plan what differs, then apply it, through each
machine's backend (backends/base.py: chosen once per machine by ``backends.placement``).

What is decided across machines is decided here, once, for every backend: ``up`` goes level by level
in ``depends_on`` order (a level's machines start in parallel; the next level only when the whole
level is ready, so a failed dependency stops its dependants); ``down`` stops in the reverse order;
both hold the state root's lock, so concurrent invocations take turns and never start a machine
twice. Here too: ownership (a machine another definition file runs is left alone), ``--timeout``
and ``--warm``, preflight, and the definition record (``definition.json``) of every machine started.
A backend does only one machine's part: look, start, stop, compare.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Mapping

from qemuspec.backends.base import Outcome, Problem, Report, Seen, locked, stopped
from qemuspec.errors import QemuspecError
from qemuspec.spec.order import order_machines

if TYPE_CHECKING:
    from qemuspec.backends.base import Backend
    from qemuspec.spec.changes import Change
    from qemuspec.spec.models import File, Machine

__all__ = [
    "Outcome",
    "stopped",
    "up",
    "down",
    "plan",
    "preflight",
    "overridden",
    "decide",
    "classed",
    "refusals",
    "needed",
]

Backends = Mapping[str, "Backend"]


def with_dependencies(spec: File, names: list[str]) -> list[list[str]]:
    """Levels to start: the named machines and everything they depend on."""
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(spec.machines[name].depends_on)
    return [
        [n for n in level if n in wanted]
        for level in order_machines(spec.machines)
        if any(n in wanted for n in level)
    ]


def needed(spec: File, names: list[str]) -> list[str]:
    """The machines `up` may start for these names: them and their dependencies."""
    return [n for level in with_dependencies(spec, names) for n in level]


def foreign(seen: Seen, name: str, backend: Backend, owner: str | None) -> str | None:
    """Why this file may not touch a machine (None: it may): the backend's own refusal, or another
    definition file runs it. Two files that both declare `web` share `.qemuspec/web` (or the domain
    `web` on a host): the second file's up/down/plan must not stop, replace or recreate the first
    one's machine."""
    if seen.refusal:
        return seen.refusal
    if (
        owner is None
        or seen.owner is None
        or not seen.claimed
        or os.path.abspath(seen.owner) == os.path.abspath(owner)
    ):
        return None
    fix = (
        "give this file its own state directory (--state-dir)"
        if backend.kind == "local"
        else "rename the machine"
    )
    return (
        f"machine {name} {seen.place} is run by {seen.owner}, not {owner}: stop it with "
        f"`qemuspec down {seen.owner}`, or {fix}"
    )


def decide(seen: Seen, machine: Machine) -> str:
    """What `up` does with one machine, from what its backend sees: "start", "up to date", "adopt"
    (running, same definition, no supervisor), "wait" (a start another `up` began is in progress),
    or "recreate" (changed). Ownership is checked before (:func:`foreign`)."""
    from qemuspec.spec.records import definition_hash

    changed = seen.running and seen.hash != definition_hash(machine)
    if seen.starting and not changed:
        return "wait"
    if seen.running and not changed:
        return "adopt" if seen.adoptable else "up to date"
    return "recreate" if seen.running or seen.busy else "start"


def overridden(
    spec: File, names: list[str], timeout: float | None = None, warm: bool = False
) -> dict[str, Machine]:
    """This run's options on ``names`` (the machines `up` starts): ``--warm`` (warm = true, hashed and
    recorded like the file's own) and ``--timeout`` (readiness for this run only: neither in the
    definition hash nor recorded). ``spec.machines`` gets the machines to run; returned: the ones to record."""
    from qemuspec.errors import UsageError

    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout:g}: give a number of seconds above 0")
    if warm:
        for name in names:
            spec.machines[name] = spec.machines[name].model_copy(update={"warm": True})
    declared = dict(spec.machines)
    if timeout is not None:
        for name in names:
            machine = spec.machines[name]
            spec.machines[name] = machine.model_copy(
                update={"ready": machine.ready.model_copy(update={"timeout": timeout})}
            )
    return declared


def preflight(
    spec: File,
    source: str,
    names: list[str],
    backends: Backends,
    *,
    command: str = "up",
    allow_local_qemu: bool = False,
    allow_host_paths: bool = False,
    environ: dict[str, str] | None = None,
    ports: bool = False,
    probe: bool = False,
) -> list[Problem]:
    """What `up` would fail on, found before anything starts, each backend checking its own machines
    (the local one: files, kvm, the qemu binary, free ports, qemu's capabilities; libvirt: the files it
    would upload and the host paths). A backend that cannot run a machine at all (a field it refuses,
    ``--warm`` on libvirt) says so here too."""
    from qemuspec.errors import UsageError

    for name in names:
        why = backends[name].refusal(name, spec.machines[name], command)
        if why:
            raise UsageError(why)
    problems: list[Problem] = []
    for backend in _distinct(backends, names):
        mine = [n for n in names if backends[n] is backend]
        problems += backend.preflight(
            spec,
            source,
            mine,
            allow_local_qemu,
            allow_host_paths,
            dict(environ or {}),
            ports=ports,
            probe=probe,
        )
    return problems


def _distinct(backends: Backends, names: list[str]) -> list[Backend]:
    out: list[Backend] = []
    for name in names:
        if not any(b is backends[name] for b in out):
            out.append(backends[name])
    return out


def classed(seen: Seen, machine: Machine, recorded: dict | None) -> tuple[str, list[Change]]:
    """The class of a changed machine (``decide`` said "recreate") and of each changed field, from the
    definition it runs (``recorded``: its ``definition.json``) against ``machine`` (spec/changes.py,
    the one table). A machine not running (a supervisor between restarts) or without a record is
    restarted: nothing is known to apply live."""
    from qemuspec.spec.changes import LIVE, RESTART, classify, strongest

    if recorded is None:
        return RESTART, []
    changes = classify(recorded, machine.model_dump(mode="json"), seen.booted_memory)
    cls = strongest([c.cls for c in changes])
    if cls == LIVE and (not seen.running or not changes):
        cls = RESTART  # between restarts, or a hash that differs in nothing the record shows
    return cls, changes


def _recorded(root: str | None, name: str) -> dict | None:
    if root is None:
        return None
    from qemuspec.runtime import statedir

    return statedir.recorded_definition(os.path.join(root, name))


def plan(
    spec: File,
    backends: Backends,
    names: list[str],
    owner: str | None = None,
    root: str | None = None,
) -> list[dict]:
    """Per machine: what `up` would do, and for a changed machine its class (``live``, ``restart``,
    ``recreate``; also the action), each changed field with its class (``changes``; from the
    definition recorded under ``root``) and the lines that differ."""
    out: list[dict] = []
    for level in with_dependencies(spec, names):
        for name in level:
            backend, machine = backends[name], spec.machines[name]
            seen = backend.look(name, machine)
            why = foreign(seen, name, backend, owner)
            if why:
                out.append(
                    {
                        "name": name,
                        "action": "belongs to another file",
                        "diff": [],
                        "changes": [],
                        "detail": why,
                    }
                )
                continue
            action = decide(seen, machine)
            step: dict = {
                "name": name,
                "action": "starting" if action == "wait" else action,
                "diff": [],
                "changes": [],
            }
            if action == "recreate":
                cls, changes = classed(seen, machine, _recorded(root, name))
                step.update(action=cls, changes=[c.as_dict() for c in changes])
                step["class"] = cls
            step.update(backend.plan_step(name, machine, seen, action))
            out.append(step)
    return out


def refusals(steps: list[dict]) -> list[Outcome]:
    """``up --no-restart``: the machines a plan would restart or recreate, as outcomes naming the
    fields (``needs restart``); none when every change is live."""
    from qemuspec.spec.changes import RESTART, RECREATE

    out = []
    for step in steps:
        if step.get("class") in (RESTART, RECREATE):
            fields = [c["field"] for c in step["changes"] if c["class"] != "live"]
            out.append(
                Outcome(
                    step["name"],
                    "needs restart",
                    detail=f"machine {step['name']}: {step['class']} needed"
                    + (f" for {', '.join(fields)}" if fields else " (what runs is not recorded)")
                    + ": nothing was changed; run `up` without --no-restart to apply it",
                )
            )
    return out


def up(
    spec: File,
    root: str,
    names: list[str],
    backends: Backends,
    report: Report = lambda n, s: None,
    owner: str | None = None,
    record: Mapping[str, Machine] | None = None,
    no_restart: bool = False,
) -> list[Outcome]:
    """Start what is missing, change what changed (live in place, else a restart or a recreate: the
    class of its fields), level by level; ``record``: the machines as this run records them
    (``overridden``), written as each machine's ``definition.json`` once it started or changed.
    ``no_restart``: when any machine would be restarted or recreated, change nothing and return
    those machines as ``needs restart`` outcomes."""
    from qemuspec.runtime import statedir

    outcomes: list[Outcome] = []
    records = record or spec.machines
    with locked(root):
        if no_restart:
            refused = refusals(plan(spec, backends, names, owner, root))
            if refused:
                for o in refused:
                    report(o.name, "needs restart")
                return refused
        for level in with_dependencies(spec, names):
            results = _up_level(spec, level, backends, report, owner, root, records, no_restart)
            for o in results:
                if o.action in (
                    "started",
                    "recreated",
                    "restarted",
                    "adopted",
                    "changed",
                ):  # claimed, so plan trusts the record
                    statedir.claim(os.path.join(root, o.name))
                    statedir.record_definition(
                        os.path.join(root, o.name),
                        records[o.name].model_dump(mode="json"),
                    )
            outcomes += results
            if any(r.action == "failed" for r in results):
                break
    return outcomes


def _up_level(
    spec: File,
    level: list[str],
    backends: Backends,
    report: Report,
    owner: str | None,
    root: str | None = None,
    records: Mapping[str, Machine] | None = None,
    no_restart: bool = False,
) -> list[Outcome]:
    outcomes: dict[str, Outcome] = {}
    waits: dict[str, Callable[[], Outcome]] = {}
    for name in level:
        backend, machine = backends[name], spec.machines[name]
        began = time.monotonic()
        try:
            seen = backend.look(name, machine)
            why = foreign(seen, name, backend, owner)
        except QemuspecError as exc:  # a host that cannot be reached: this machine failed
            why = str(exc)
        if why:
            report(name, "failed")
            outcomes[name] = Outcome(name, "failed", time.monotonic() - began, detail=why)
            continue
        decision = decide(seen, machine)
        if decision == "wait":
            report(name, "waiting for the start in progress")
            waited = backend.join(name, machine, began)
            if waited is not None:
                outcomes[name] = waited
                report(
                    name,
                    "failed" if waited.action == "failed" else f"ready in {waited.seconds:.1f} s",
                )
                continue
            seen = backend.look(name, machine)  # it ended on its own (stopped): decide again
            decision = decide(seen, machine)
        if decision == "up to date":
            report(name, "up to date")
            outcomes[name] = Outcome(
                name, "up to date", 0.0, seen.pid, ports=seen.ports, accel=seen.accel
            )
            continue
        action = {"adopt": "adopted", "recreate": "recreated"}.get(decision, "started")
        why = ""
        if decision == "recreate":
            recorded = _recorded(root, name)
            declared = (records or spec.machines)[name]
            cls, changes = classed(seen, declared, recorded)
            if cls == "live" and recorded is not None:
                done = _live(name, backend, machine, declared, recorded, changes, root, report)
                if isinstance(done, Outcome):
                    outcomes[name] = done
                    continue
                why = done  # the live change failed and was undone: restart with the reason
                cls = "restart"
            if no_restart:  # a live change qemu refused (undone), or a change since the check
                report(name, "needs restart")
                outcomes[name] = Outcome(
                    name,
                    "needs restart",
                    time.monotonic() - began,
                    seen.pid,
                    detail=f"machine {name}: {why or cls + ' needed'}: left as it was; "
                    "run `up` without --no-restart to restart it",
                )
                continue
            action = "restarted" if cls == "restart" else "recreated"
        if decision == "adopt":
            report(name, "adopting the running machine")
        elif decision == "recreate":
            report(
                name,
                (f"{why}: restarting" if why else f"definition changed: {action[:-2]}ing")
                if seen.running
                else "replacing a restarting machine",
            )
            backend.stop(name, machine, None)
        waits[name] = backend.start(name, machine, action, report)
        if why:
            waits[name] = _noting(waits[name], why)
    outcomes.update(_parallel(waits))
    return [outcomes[n] for n in level if n in outcomes]


def _live(
    name: str,
    backend: Backend,
    machine: Machine,
    declared: Machine,
    recorded: dict,
    changes: list[Change],
    root: str | None,
    report: Report,
) -> Outcome | str:
    """Apply a machine's live changes in place: the new definition is recorded first (the supervisor
    re-reads it), then the backend changes the running machine. Returns the outcome, or why it
    failed (the backend undid what it half-did; the old record is put back and the caller restarts)."""
    from qemuspec.runtime import statedir
    from qemuspec.spec.models import Machine as Model

    began = time.monotonic()
    report(name, "changing live: " + ", ".join(c.field for c in changes))
    try:
        old = Model.model_validate(recorded)
    except ValueError as exc:
        return f"the recorded definition of {name} does not load ({exc.__class__.__name__})"
    state_dir = os.path.join(root, name) if root else None
    if state_dir:
        statedir.record_definition(state_dir, declared.model_dump(mode="json"))
    try:
        outcome = backend.change(name, old, machine, [c.field for c in changes])
    except QemuspecError as exc:
        if state_dir:
            statedir.record_definition(state_dir, recorded)
        report(name, f"live change failed: {exc}")
        return f"live change failed ({exc})"
    outcome.seconds = time.monotonic() - began
    report(name, f"changed live in {outcome.seconds:.1f} s")
    return outcome


def _noting(wait: Callable[[], Outcome], why: str) -> Callable[[], Outcome]:
    """A restart's wait whose outcome says why it was not a live change."""

    def noted() -> Outcome:
        outcome = wait()
        outcome.warnings.append(f"restarted instead of a live change: {why}")
        return outcome

    return noted


def _parallel(calls: Mapping[str, Callable[[], Outcome]]) -> dict[str, Outcome]:
    """Run a level's waits at once (no pool for one: its import is a tenth of a quick `down`)."""
    if len(calls) <= 1:
        return {name: call() for name, call in calls.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def down(
    spec: File,
    root: str,
    names: list[str],
    backends: Backends,
    timeout: float | None = None,
    report: Report = lambda n, s: None,
    owner: str | None = None,
) -> list[Outcome]:
    """Stop in reverse dependency order, a level's machines in parallel."""
    outcomes: list[Outcome] = []
    selected = set(names)
    with locked(root):
        for level in reversed(order_machines(spec.machines)):
            level = [n for n in level if n in selected]
            done = _parallel(
                {n: _stopping(spec, n, backends[n], timeout, report, owner) for n in level}
            )
            outcomes += [done[n] for n in level]
        for backend in _distinct(backends, names):
            backend.settle(spec, names)
    return outcomes


def _stopping(
    spec: File,
    name: str,
    backend: Backend,
    timeout: float | None,
    report: Report,
    owner: str | None,
) -> Callable[[], Outcome]:
    return lambda: _down_one(spec, name, backend, timeout, report, owner)


def _down_one(
    spec: File,
    name: str,
    backend: Backend,
    timeout: float | None,
    report: Report,
    owner: str | None,
) -> Outcome:
    machine = spec.machines[name]
    try:
        seen = backend.look(name, machine)
        why = foreign(seen, name, backend, owner)
        if why:
            return Outcome(name, "belongs to another file", detail=why)
        if not seen.running and not seen.busy:
            backend.clean(name)
            return Outcome(name, "not running")
        report(name, "stopping")
        began = time.monotonic()
        step = backend.stop(name, machine, timeout)
    except (
        QemuspecError
    ) as exc:  # a host that cannot be reached: this machine failed, the others go on
        report(name, "failed")
        return Outcome(name, "failed", detail=str(exc))
    seconds = time.monotonic() - began
    report(name, f"stopped ({step}, {seconds:.1f} s)")
    return stopped(name, seconds, step)
