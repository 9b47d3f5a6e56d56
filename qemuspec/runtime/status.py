"""What state a machine is in, and why: from its records and the live processes.

States: starting, running, paused, unresponsive (qemu alive but its monitor does not answer, or the
process is stopped), restarting (attempt n, next in s), stopping (a stop is in progress), hung (its
supervisor does not answer: stopped, or no heartbeat), unsupervised (qemu runs, its supervisor is
gone: a restart policy is not enforced until it is adopted again), stopped, crashed / failed (with
the reason: never became ready, exited (code), killed (signal), guest panic), lost (supervisor and
qemu both killed without a word).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from qemuspec.errors import QemuspecError
from qemuspec.runtime import paths, statedir
from qemuspec.runtime.instance import Instance, recorded
from qemuspec.runtime.process import state as process_state
from qemuspec.runtime.supervisor import hung, read_supervisor, stale_supervisor

if TYPE_CHECKING:
    from qemuspec.spec.models import Machine

UNRESPONSIVE_AFTER = 2.0  # seconds the client monitor may take to answer query-status


def machine_status(
    name: str, machine: Machine | None, state_dir: str, ask_qemu: bool = True
) -> dict[str, Any]:
    """One row of `status` / `ls`. ``machine`` may be None (ls: the definition is not loaded)."""
    state_dir = os.path.abspath(state_dir)
    inst = _find(name, machine, state_dir)
    sup = read_supervisor(state_dir)
    last = statedir.read(state_dir, statedir.EXIT, statedir.ExitRecord)
    rec = recorded(state_dir)
    registry_rec = statedir.read(
        paths.run_dir(state_dir), statedir.MACHINE, statedir.QemuRecord
    )  # trusted, unlike a copy
    row: dict[str, Any] = {
        "name": name,
        "state": "stopped",
        "reason": "",
        "pid": None,
        "supervisor": sup.pid if sup else None,
        "uptime": None,
        "restarts": sup.restarts if sup else (last.restarts if last else 0),
        "restart": machine.restart if machine is not None else (sup.restart if sup else None),
        "qmp": None,
        "ports": [],
        "accel": [],
        "file": (sup.owner if sup else None) or (rec.owner if rec else None),
        "state_dir": state_dir,
        "error": sup.error if sup else None,
        "boot": None,
    }
    if machine is not None and machine.display.type in ("vnc", "spice"):
        from qemuspec.render import display_endpoint

        row["display"] = display_endpoint(machine, paths.layout(state_dir))
    if machine is not None and machine.warm:
        from qemuspec.runtime import warm

        row["next_boot"] = warm.check(name, machine, state_dir).as_dict()
    if inst is not None and inst.process is not None:
        row.update(
            pid=inst.process.pid,
            qmp=inst.qmp_address,
            ports=inst.ports,
            accel=list(inst.layout.accel),
            boot=inst.boot,
            **({"restored": inst.restored} if inst.restored else {}),
            uptime=round(time.time() - inst.started_at, 1) if inst.started_at else None,
        )
        if sup is None:
            stale = stale_supervisor(state_dir)
            policy = row["restart"] or (stale.restart if stale else None)
            row["state"], row["reason"] = "unsupervised", "its supervisor is gone: `up` adopts it"
            if policy and policy != "no":
                row["reason"] = (
                    f'its supervisor is gone, so restart = "{policy}" is not enforced: `up` adopts it'
                )
                row["policy_enforced"] = False
            if stale is not None:
                row["restarts"] = stale.restarts
            from qemuspec.runtime import warm

            if warm.interrupted(state_dir) is not None:
                row["reason"] = (
                    "its supervisor died during a warm save (the guest is stopped, its disks on live "
                    "overlays): `up` adopts it, finishes or undoes the save and resumes it"
                )
        elif (why := hung(state_dir, sup)) is not None:
            row["state"], row["reason"] = "hung", why
        elif sup.phase == "stopping":
            row["state"], row["reason"] = "stopping", "a stop is in progress"
        elif sup.phase == "starting":
            row["state"] = "starting"
        elif (
            not os.path.exists(inst.layout.qmp_client) and sup.error
        ):  # runtime directory removed and made again
            row["state"] = "running"
        else:
            row["state"], row["reason"] = run_state(inst) if ask_qemu else ("running", "")
    elif sup is not None and (why := hung(state_dir, sup)) is not None:
        row["state"], row["reason"] = "hung", why
    elif sup is not None:
        if sup.phase == "restarting":
            wait = max(0.0, (sup.next_at or time.time()) - time.time())
            row["state"] = "restarting"
            row["reason"] = f"attempt {sup.attempt}, next in {wait:.1f} s" + (
                f"; last run: {sup.last_exit}" if sup.last_exit else ""
            )
            row["attempt"], row["next_in"] = sup.attempt, round(wait, 1)
        elif sup.phase == "stopping":
            row["state"], row["reason"] = "stopping", "a stop is in progress"
        else:
            row["state"] = "starting"
    elif stale_supervisor(state_dir) is not None or (registry_rec is not None and last is None):
        dead = stale_supervisor(state_dir)
        row["state"] = "lost"
        row["reason"] = (
            "its supervisor and qemu were killed"
            if dead
            else "qemu is gone and left no exit record"
        ) + ": `up` starts it again, `down` clears the records"
        if dead:
            row["restarts"] = dead.restarts
    elif last is not None and last.phase in ("crashed", "failed"):
        row["state"] = last.phase
        row["reason"] = last.reason or last.why
    elif last is not None:
        row["reason"] = last.reason or last.why
    if row["error"]:
        row["reason"] = (row["reason"] + "; " if row["reason"] else "") + row["error"]
    return row


def _find(name: str, machine: Machine | None, state_dir: str) -> Instance | None:
    if machine is None:  # find() only reads records; `ls` has no definition and needs no pydantic
        from typing import cast

        from qemuspec.spec.records import Record

        return Instance.find(name, cast("Machine", Record("Machine", {}, set())), state_dir)
    return Instance.find(name, machine, state_dir)


def run_state(inst: Instance) -> tuple[str, str]:
    """running, paused or unresponsive, asked on the client monitor (free for tools while a
    supervisor holds the main one). A stopped process (SIGSTOP) or a monitor that does not answer
    within UNRESPONSIVE_AFTER is unresponsive, not running."""
    from qemuspec.qmp.sync import QMPClient

    assert inst.process is not None
    if (process_state(inst.process.pid) or "") in ("T", "t"):
        return (
            "unresponsive",
            "qemu is stopped (SIGSTOP or a debugger): `kill -CONT` it, or `down` kills it",
        )
    began = time.monotonic()
    try:
        with QMPClient.connect(
            f"unix:{inst.layout.qmp_client}", timeout=UNRESPONSIVE_AFTER
        ) as client:
            status = client.command("query-status", timeout=UNRESPONSIVE_AFTER).get("status")
    except QemuspecError as exc:
        return (
            "unresponsive",
            f"its monitor did not answer within {time.monotonic() - began:.1f} s ({exc})",
        )
    if status in ("paused", "prelaunch", "suspended"):
        return "paused", status
    if status in ("guest-panicked", "internal-error", "io-error", "shutdown"):
        return "unresponsive", f"qemu reports {status}"
    return "running", ""


def registered() -> list[dict[str, Any]]:
    """Every machine this user's qemuspec runs on this host, from the runtime registry, whatever the
    definition file or state directory (`qemuspec ls`)."""
    rows = []
    for run in paths.registry():
        rec = statedir.read(run, statedir.MACHINE, statedir.QemuRecord)
        sup = statedir.read(run, statedir.SUPERVISOR, statedir.SupervisorRecord)
        state_dir = (rec.state_dir if rec else None) or (sup.state_dir if sup else None)
        name = rec.name if rec else None
        if not state_dir or paths.run_dir(state_dir) != run:
            continue
        if name is None:  # a supervisor between restarts: the name is the state directory's
            name = os.path.basename(state_dir)
        rows.append(machine_status(name, None, state_dir))
    return rows
