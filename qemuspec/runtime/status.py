"""What state a declared machine is in, from its state directory and the live processes."""

from __future__ import annotations

import json
import time
from typing import Any

from qemuspec.errors import QemuspecError
from qemuspec.runtime.instance import Instance
from qemuspec.runtime.supervisor import exit_file, read_supervisor
from qemuspec.spec.models import Machine

def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def machine_status(name: str, machine: Machine, state_dir: str, ask_qemu: bool = True) -> dict[str, Any]:
    inst = Instance.find(name, machine, state_dir)
    sup = read_supervisor(state_dir)
    last = _read(exit_file(state_dir))
    row: dict[str, Any] = {
        "name": name, "state": "stopped", "pid": None, "supervisor": sup["pid"] if sup else None,
        "uptime": None, "restarts": (sup or last).get("restarts", 0), "restart": machine.restart,
        "qmp": None, "ports": [], "accel": [], "boot": None,
    }
    if machine.warm:
        from qemuspec.runtime import warm

        row["next_boot"] = warm.check(name, machine, state_dir).as_dict()
    if inst is not None and inst.process is not None:
        row.update(pid=inst.process.pid, qmp=inst.qmp_address, ports=inst.ports, accel=list(inst.layout.accel), boot=inst.boot,
                   **({"restored": inst.restored} if inst.restored else {}),
                   uptime=round(time.time() - inst.started_at, 1) if inst.started_at else None)
        if sup is None:
            row["state"] = "unsupervised"
        elif sup.get("phase") == "starting":
            row["state"] = "starting"
        else:
            row["state"] = run_state(inst) if ask_qemu else "running"
    elif sup is not None:
        row["state"] = "starting"  # launching, or waiting out a restart backoff
    elif last.get("phase") == "crashed":
        row["state"] = "crashed"
    return row


def run_state(inst: Instance) -> str:
    """running or paused, asked on the client monitor (free for tools while a supervisor holds the main one)."""
    from qemuspec.qmp.sync import QMPClient

    try:
        with QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=2) as client:
            status = client.command("query-status", timeout=2).get("status")
    except QemuspecError:
        return "running"
    return "paused" if status in ("paused", "prelaunch", "suspended") else "running"
