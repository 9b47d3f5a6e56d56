"""Commands that act on running machines: up, down, status, qmp, logs."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from qemuspec.cli.common import emit_json, load_file, only_machine, select
from qemuspec.errors import QemuspecError, UsageError


def _root(args: Any) -> str:
    from qemuspec.runtime import paths

    return paths.state_root(args.file, args.state_dir)


def _reporter(args: Any):
    """Plain progress lines on stderr (stdout stays for results); nothing with --json."""
    lock = threading.Lock()

    def report(name: str, what: str) -> None:
        if args.json:
            return
        with lock:
            print(f"{name}: {what}", file=sys.stderr, flush=True)

    return report


def up(args: Any) -> int:
    from qemuspec import reconcile

    spec = load_file(args)
    names = select(spec, args.machine, args.file)
    outcomes = reconcile.up(spec, _root(args), names, _reporter(args))
    failed = [o for o in outcomes if o.action == "failed"]
    if args.json:
        emit_json([o.__dict__ for o in outcomes])
    else:
        for o in outcomes:
            ports = ", ".join(f"{p['address']}:{p['host']}->{p['guest']}/{p['protocol']}" for p in o.ports)
            if o.action != "failed":
                print(f"{o.name}: {o.action} (pid {o.pid}{', ' + ports if ports else ''})")
        for o in failed:
            print(f"error: {o.detail}", file=sys.stderr)
    return 1 if failed else 0


def down(args: Any) -> int:
    from qemuspec import reconcile

    spec = load_file(args)
    names = select(spec, args.machine, args.file)
    outcomes = reconcile.down(spec, _root(args), names, args.timeout, _reporter(args))
    if args.json:
        emit_json([o.__dict__ for o in outcomes])
    else:
        for o in outcomes:
            print(f"{o.name}: {o.action}{' (' + o.detail + ')' if o.detail else ''}")
    return 0


def status(args: Any) -> int:
    from qemuspec.runtime.instance import Instance

    spec = load_file(args)
    root = _root(args)
    rows = []
    for name in select(spec, args.machine, args.file):
        inst = Instance.find(name, spec.machines[name], os.path.join(root, name))
        row: dict[str, Any] = {"name": name, "state": "stopped", "pid": None, "uptime": None, "qmp": None, "ports": []}
        if inst is not None:
            row.update(pid=inst.process.pid, qmp=inst.qmp_address, ports=inst.ports,
                       uptime=round(time.time() - inst.started_at, 1) if inst.started_at else None)
            row["state"] = _run_state(inst)
        rows.append(row)
    if args.json:
        emit_json(rows)
        return 0
    print(f"{'NAME':<16} {'STATE':<10} {'PID':>8} {'UPTIME':>9}  PORTS")
    for r in rows:
        ports = " ".join(f"{p['host']}->{p['guest']}" for p in r["ports"])
        uptime = f"{r['uptime']:.0f}s" if r["uptime"] is not None else "-"
        print(f"{r['name']:<16} {r['state']:<10} {r['pid'] or '-':>8} {uptime:>9}  {ports}")
    return 0


def _run_state(inst: Any) -> str:
    """running or paused, asked on the client monitor (which stays free for tools like this one)."""
    from qemuspec.qmp.sync import QMPClient

    try:
        with QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=2) as client:
            return "paused" if client.command("query-status", timeout=2).get("status") in ("paused", "prelaunch") else "running"
    except QemuspecError:
        return "running"


def qmp(args: Any) -> int:
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.instance import Instance

    spec = load_file(args)
    name = only_machine(spec, args.machine, args.file)
    inst = Instance.find(name, spec.machines[name], os.path.join(_root(args), name))
    if inst is None:
        raise QemuspecError(f"machine {name} is not running: start it with `qemuspec up {args.file}`")
    arguments = None
    if args.arguments:
        try:
            arguments = json.loads(args.arguments)
        except ValueError as exc:
            raise UsageError(f"arguments must be a JSON object, for example '{{\"device\": \"disk0\"}}': {exc}") from None
        if not isinstance(arguments, dict):
            raise UsageError("arguments must be a JSON object, for example '{\"device\": \"disk0\"}'")
    with QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=5) as client:
        result = client.command(args.qmp_command, arguments)
    if isinstance(result, str) and not args.json:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        emit_json(result)
    return 0


def logs(args: Any) -> int:
    from qemuspec.runtime import paths
    from qemuspec.runtime.console import tail

    spec = load_file(args)
    name = only_machine(spec, args.machine, args.file)
    lay = paths.layout(os.path.join(_root(args), name))
    if not os.path.exists(lay.serial_log):
        raise QemuspecError(f"machine {name} has no console log yet ({lay.serial_log}): start it with `qemuspec up {args.file}`")
    if args.lines:
        print(tail(lay.serial_log, args.lines))
    else:
        with open(lay.serial_log, "rb") as f:
            sys.stdout.write(f.read().decode(errors="replace").replace("\r", ""))
    return 0
