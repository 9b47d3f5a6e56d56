"""Commands that act on running machines: up, down, status, plan, inspect, logs, events, console, qmp,
pause, resume, restart."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from qemuspec.cli import libvirt_commands
from qemuspec.cli.common import REFUSED, Context, Output, Target, emit_json, outcomes_exit_code
from qemuspec.cli.main import PENDING
from qemuspec.errors import QemuspecError, UsageError

if TYPE_CHECKING:
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.reconcile import Outcome
    from qemuspec.runtime.instance import Instance

DETACH = b"\x1d"  # Ctrl-]


def _owner(target: Target) -> str | None:
    """The definition file, recorded as the owner of the machines it starts."""
    return os.path.abspath(target.path) if getattr(target, "path", None) else None


def _print_outcomes(out: Output, outcomes: list["Outcome"]) -> None:
    if out.json:
        emit_json([o.as_dict() for o in outcomes])
        return
    for o in outcomes:
        if o.action in REFUSED:
            continue
        ports = ", ".join(f"{p['address']}:{p['host']}->{p['guest']}/{p['protocol']}" for p in o.ports)
        extra = [f"pid {o.pid}"] if o.pid else []
        extra += [f"accel {','.join(o.accel)}"] if getattr(o, "accel", None) else []
        extra += [ports] if ports else []
        extra += [f"qemu {o.qemu}"] if getattr(o, "qemu", "") and o.action in ("started", "recreated") else []
        extra += [o.detail] if o.detail else []
        extra += [f"{o.seconds:.1f} s"] if o.action == "stopped" else []
        out.say(f"{o.name}: {o.action}{' (' + ', '.join(extra) + ')' if extra else ''}")
    for o in outcomes:
        if o.action in REFUSED:  # the detail may quote the guest's console: escaped on a terminal
            print(f"error: {out.guest(o.detail or '', sys.stderr)}", file=sys.stderr)
        for warning in getattr(o, "warnings", ()):
            print(f"warning: {o.name}: {out.guest(warning, sys.stderr)}", file=sys.stderr)


def _warm_flag(warm: bool, spec: Any, names: list[str]) -> None:
    """`--warm`: this run treats the selected machines (and what they depend on) as warm = true."""
    if warm:
        from qemuspec import reconcile

        for name in reconcile.needed(spec, names):
            spec.machines[name] = spec.machines[name].model_copy(update={"warm": True})


def _record(target: Target, outcomes: list["Outcome"], machines: dict[str, Any]) -> None:
    from qemuspec.runtime import statedir

    for o in outcomes:
        if o.action in ("started", "recreated", "adopted"):
            statedir.record_definition(target.state_dir(o.name), machines[o.name].model_dump(mode="json"))


def _checked(ctx: Context, names: list[str], allow_local_qemu: bool, allow_host_paths: bool, ports: bool) -> dict:
    """Preflight before anything starts (up, restart): local machines get every check, also in a file
    that places others on libvirt hosts, which get the host-path check; returns the libvirt placement."""
    from qemuspec.cli.common import preflight

    target = ctx.target
    spec, lines = target.load()
    hosts = libvirt_commands.placed(ctx, spec, names) or {}
    local = [n for n in names if not hosts.get(n)]
    remote = [n for n in names if hosts.get(n)]
    preflight(spec, lines, target.path, local, allow_local_qemu=allow_local_qemu,
              root=target.root if ports and not hosts else None, settings=ctx.settings,
              allow_host_paths=allow_host_paths, out=ctx.out, remote=remote)
    return hosts


def up(ctx: Context, *, no_probe: bool, attach: bool, timeout: float | None, allow_local_qemu: bool, warm: bool = False,
       allow_host_paths: bool = False) -> int:
    from qemuspec import reconcile

    target = ctx.target
    spec, lines = target.load()
    names = target.machines()
    hosts = _checked(ctx, reconcile.needed(spec, names), allow_local_qemu, allow_host_paths, ports=True)
    if hosts:  # libvirt backend
        return libvirt_commands.up(ctx, spec, names, hosts, attach)
    _warm_flag(warm, spec, names)
    if not no_probe:
        from qemuspec.cli.common import check_against_qemu

        check_against_qemu(spec, lines, target.path, reconcile.needed(spec, names))
    declared = dict(spec.machines)
    if timeout is not None:
        if timeout <= 0:
            raise UsageError(f"--timeout {timeout:g}: give a number of seconds above 0")
        for name in reconcile.needed(spec, names):  # readiness timeout for this run only (not in the definition hash)
            machine = spec.machines[name]
            spec.machines[name] = machine.model_copy(update={"ready": machine.ready.model_copy(update={"timeout": timeout})})
    deadline = max((spec.machines[n].ready.timeout for n in reconcile.needed(spec, names)), default=None)
    progress = ctx.out.progress(names, deadline)
    try:
        outcomes = reconcile.up(spec, target.root, names, progress, owner=_owner(target))
    finally:
        progress.close()
    _record(target, outcomes, declared)
    _print_outcomes(ctx.out, outcomes)
    if outcomes_exit_code(outcomes):
        return 1
    from qemuspec.cli.provision_command import after_up  # once per machine life (runtime/provision.py)

    after_up(ctx, spec, outcomes)
    if attach:
        return _attach(ctx, spec, names)
    return 0


def _attach(ctx: Context, spec: Any, names: list[str]) -> int:
    """Stream every machine's console and events until Ctrl-C, then bring the machines down."""
    from qemuspec import reconcile

    root = ctx.target.root
    sources = []
    for name in names:
        sources.append((f"{name} | ", os.path.join(root, name, "serial.log"), True))
        sources.append((f"{name} * ", os.path.join(root, name, "events.jsonl"), True))
    print("attached: Ctrl-C stops the machines", file=sys.stderr, flush=True)
    try:
        _follow(sources, follow=True, clean=ctx.out.guest)
    except KeyboardInterrupt:
        pass
    print("\nstopping...", file=sys.stderr)
    _print_outcomes(ctx.out, reconcile.down(spec, root, names, None, ctx.out.progress(names), owner=_owner(ctx.target)))
    return 0


def down(ctx: Context, *, timeout: float | None, purge: bool) -> int:
    from qemuspec import reconcile

    target = ctx.target
    spec = target.spec
    names = target.machines()
    if (hosts := libvirt_commands.placed(ctx, spec, names)):  # libvirt backend
        return libvirt_commands.down(ctx, spec, names, hosts, timeout, purge)
    outcomes = reconcile.down(spec, target.root, names, timeout, ctx.out.progress(names), owner=_owner(target))
    if purge:
        from qemuspec.api import purge as purge_files

        kept = {o.name for o in outcomes if o.action == "belongs to another file"}
        for path in purge_files(spec, target.root, [n for n in names if n not in kept]):
            ctx.out.note(f"removed {path}")
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def status(ctx: Context) -> int:
    from qemuspec.runtime.status import machine_status

    target = ctx.target
    spec = target.spec
    if (hosts := libvirt_commands.placed(ctx, spec, target.machines())):  # libvirt backend
        return libvirt_commands.status(ctx, spec, target.machines(), hosts)
    owner = _owner(target)
    rows = []
    readopted = _readopt(ctx, target.machines())
    for name in target.machines():
        row = machine_status(name, spec.machines[name], target.state_dir(name))
        if name in readopted:
            row["readopted"] = True
        if owner and row.get("file") and row["state"] != "stopped" and os.path.abspath(row["file"]) != owner:
            row["reason"] = f"run by {row['file']}" + (f"; {row['reason']}" if row["reason"] else "")
        rows.append(row)
    if ctx.out.json:
        emit_json(rows)
        return 0
    _table(rows, with_file=False)
    for r in rows:  # warm machines: how the next start goes, and what a restore shares
        if r.get("next_boot"):
            print(f"{r['name']}: next start {r['next_boot']['boot']}: {r['next_boot']['why']}")
            if r["next_boot"].get("disk_writes"):
                print(f"{r['name']}: {r['next_boot']['disk_writes']}")
        if r.get("restored") and "reseeded" not in r["restored"].get("rng", ""):
            print(f"{r['name']}: RNG {r['restored']['rng']}")
        if r.get("display") and r["state"] not in ("stopped", "crashed", "failed", "lost"):
            print(f"{r['name']}: display {display_text(r['name'], r['display'])}")
    return 0


def display_text(name: str, where: dict) -> str:
    """Where a vnc/spice display is and how its owner connects (render.display_endpoint's record)."""
    kind = where["type"]
    if "socket" in where:
        viewer = f"vncviewer {where['socket']}" if kind == "vnc" else f"remote-viewer spice+unix://{where['socket']}"
        return f"{kind} on the unix socket {where['socket']} (only you can open it; connect: {viewer})"
    text = f"{kind} on {where['address']}:{where['port']}"
    if where["auth"] == "none":
        return text + " with no authentication (unauthenticated = true: every local user can connect)"
    return text + (f" (refuses every client until you set a password: qemuspec qmp {name} set_password "
                   f"'{{\"protocol\": \"{kind}\", \"password\": \"...\"}}')")


def _unsupervised(state_dir: str) -> bool:
    """Cheap first look: a qemu is recorded and no supervisor lives (reconcile.readopt checks it all)."""
    from qemuspec.runtime.instance import recorded
    from qemuspec.runtime.supervisor import read_supervisor

    return recorded(state_dir) is not None and read_supervisor(state_dir) is None


def _readopt(ctx: Context, names: list[str]) -> set[str]:
    """Machines with a restart policy whose supervisor is gone get one again (reconcile.readopt), said
    on stderr: a command that sees such a machine does not leave its policy unenforced. The cheap
    look first, so a command with nothing to adopt never imports reconcile."""
    machines = ctx.target.spec.machines
    names = [n for n in names if machines[n].restart != "no" and _unsupervised(ctx.target.state_dir(n))]
    if not names:
        return set()
    from qemuspec import reconcile

    done = set()
    for o in reconcile.readopt(ctx.target.spec, ctx.target.root, names, owner=_owner(ctx.target)):
        if o.action == "adopted":
            done.add(o.name)
            policy = ctx.target.spec.machines[o.name].restart
            ctx.out.note(f"{o.name}: its supervisor was gone: adopted again (restart = \"{policy}\" is enforced again)")
        else:
            ctx.out.note(f"{o.name}: could not be adopted again: {o.detail}")
    return done


def _table(rows: list[dict], with_file: bool) -> None:
    head = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "BOOT", "ACCEL", "PORTS"] + (["FILE"] if with_file else []) + ["REASON"]
    table = [head]
    for r in rows:
        ports = " ".join(f"{p['host']}->{p['guest']}" for p in r["ports"])
        uptime = f"{r['uptime']:.0f}s" if r["uptime"] is not None else "-"
        cells = [r["name"], r["state"], str(r["pid"] or "-"), uptime, str(r["restarts"]), r.get("boot") or "-",
                 ",".join(r["accel"]) or "-", ports or "-"]
        cells += [str(r.get("file") or r.get("state_dir"))] if with_file else []
        table.append(cells + [r["reason"] or ""])
    for line in format_table(table, right={2, 3, 4}):
        print(line)


def ls(ctx: Context) -> int:
    """Every machine this user's qemuspec runs here, found through the runtime registry (so a deleted
    state directory or another project's file does not hide it)."""
    from qemuspec.runtime.status import registered

    rows = registered()
    if ctx.out.json:
        emit_json(rows)
        return 0
    if not rows:
        print("no machines running")
        return 0
    _table(rows, with_file=True)
    return 0


def format_table(rows: list[list[str]], right: set[int] = set()) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        cells[-1] = row[-1]
        out.append("  ".join(cells).rstrip())
    return out


def plan(ctx: Context, *, warm: bool = False) -> int:
    """What `up` would do; exit 3 (PENDING) when it would change anything, so CI can gate on drift."""
    from qemuspec.api import plan as plan_steps, show_value

    target = ctx.target
    spec = target.spec
    if (hosts := libvirt_commands.placed(ctx, spec, target.machines())):  # libvirt backend
        return libvirt_commands.plan(ctx, spec, target.machines(), hosts)
    names = target.machines()
    _warm_flag(warm, spec, names)
    steps = plan_steps(spec, target.root, names, owner=_owner(target))
    pending = any(step["action"] != "up to date" for step in steps)
    if ctx.out.json:
        emit_json(steps)
        return PENDING if pending else 0
    out = ctx.out
    colour = {"up to date": "32", "start": "33", "adopt": "33", "recreate": "33"}
    for step in steps:
        boot = f" ({step['warm']['boot']}: {step['warm']['why']})" if step.get("warm") else ""
        detail = f" ({step['detail']})" if step.get("detail") else ""
        print(f"{step['name']}: {out.paint(step['action'], colour.get(step['action'], '0'))}{boot}{detail}")
        if step.get("warm", {}).get("disk_writes"):
            print(f"    {step['warm']['disk_writes']}")
        for change in step["changes"]:
            old, new = show_value(change["field"], change["old"]), show_value(change["field"], change["new"])
            print(f"    {change['field']}: {out.paint(old, '31')} -> {out.paint(new, '32')}")
        for line in step["diff"][2:]:
            code = "31" if line.startswith("-") else "32" if line.startswith("+") else "36" if line.startswith("@") else ""
            print(f"      {out.paint(line, code) if code else line}")
    if pending and not out.quiet:
        print(f"plan: changes pending (exit {PENDING}); `qemuspec up {target.path}` applies them", file=sys.stderr)
    return PENDING if pending else 0


def inspect(ctx: Context) -> int:
    from qemuspec.api import machine_info

    target = ctx.target
    name = target.machine()
    info = machine_info(target.spec, target.root, name)
    if ctx.out.json:
        emit_json(info)
        return 0
    import shlex

    for key in ("name", "state", "pid", "supervisor", "uptime", "restarts", "restart", "accel", "qmp", "state_dir"):
        value = info.get(key)
        print(f"{key + ':':<12} {', '.join(value) if isinstance(value, list) else ('-' if value is None else value)}")
    for p in info["ports"]:
        print(f"{'port:':<12} {p['address']}:{p['host']} -> {p['guest']}/{p['protocol']}")
    if info.get("display"):
        print(f"{'display:':<12} {display_text(name, info['display'])}")
    for d in info["disks"]:
        print(f"{'disk:':<12} {d['file']} ({d['format'] or '?'}{', backing ' + d['backing'] if d['backing'] else ''}{'' if d['exists'] else ', not created yet'})")
    if "last_exit" in info:
        print(f"{'last exit:':<12} {json.dumps(info['last_exit'])}")
    print(f"{'argv:':<12} {shlex.join(info['argv'])}")
    for event in info["events"][-5:]:
        print(f"{'event:':<12} {json.dumps(event)}")
    return 0


def _running(ctx: Context, name: str) -> "Instance":
    from qemuspec.runtime.instance import Instance

    target = ctx.target
    spec = target.spec
    libvirt_commands.local_only(ctx, spec, name)  # libvirt backend: commands without a libvirt path
    inst = Instance.find(name, spec.machines[name], target.state_dir(name))
    if inst is None:
        raise QemuspecError(f"machine {name} is not running: start it with `qemuspec up {target.path}`")
    _readopt(ctx, [name])
    return inst


def _client(inst: "Instance") -> "QMPClient":
    """A connection on the client monitor, which stays free while the supervisor holds the main one."""
    from qemuspec.qmp.sync import QMPClient

    return QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=5)


def qmp(ctx: Context) -> int:
    """``qmp [FILE] [MACHINE] COMMAND [JSON]``: the machine may be left out of a one-machine file."""
    target = ctx.target
    rest = list(target.rest)
    if not rest:
        raise UsageError("qmp needs a QMP command: qemuspec qmp [FILE] [MACHINE] COMMAND [JSON], e.g. qemuspec qmp machines/dev.toml query-status")
    if len(rest) > 3:
        raise UsageError(f"qmp takes [MACHINE] COMMAND [JSON], got {len(rest)} operands: quote the JSON arguments")
    name: str | None = target.machine_option[0] if target.machine_option else None
    if len(rest) == 3 or (len(rest) == 2 and not rest[1].lstrip().startswith("{")):
        name = rest.pop(0)
    elif len(rest) == 1 and rest[0] in target.spec.machines and len(target.spec.machines) > 1:
        raise UsageError(f"qmp {rest[0]}: which QMP command? e.g. qemuspec qmp {target.path} {rest[0]} query-status")
    name = target.machine(name, operands=False)
    command, raw = rest[0], (rest[1] if len(rest) > 1 else None)
    arguments = None
    if raw:
        try:
            arguments = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"arguments must be a JSON object, for example '{{\"device\": \"disk0\"}}': {exc}") from None
        if not isinstance(arguments, dict):
            raise UsageError("arguments must be a JSON object, for example '{\"device\": \"disk0\"}'")
    if (hosts := libvirt_commands.placed(ctx, target.spec, name)):  # libvirt backend
        return libvirt_commands.qmp(ctx, target.spec, hosts, name, command, arguments)
    with _client(_running(ctx, name)) as client:
        result = client.command(command, arguments)
    if isinstance(result, str) and not ctx.out.json:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        emit_json(result)
    return 0


def _each(ctx: Context, command: str, done: str) -> int:
    if (hosts := libvirt_commands.placed(ctx, ctx.target.spec, ctx.target.machines())):  # libvirt backend
        return libvirt_commands.each(ctx, ctx.target.spec, hosts, command, done)
    results = []
    for name in ctx.target.machines():
        with _client(_running(ctx, name)) as client:
            client.command(command)
            results.append({"name": name, "state": done})
    ctx.out.states(results)
    return 0


def pause(ctx: Context) -> int:
    return _each(ctx, "stop", "paused")


def resume(ctx: Context) -> int:
    return _each(ctx, "cont", "running")


def restart(ctx: Context, *, allow_local_qemu: bool = False, allow_host_paths: bool = False) -> int:
    from qemuspec import reconcile

    target = ctx.target
    spec = target.spec
    names = target.machines()
    # The machines are stopped first, so their own ports are not checked.
    if (hosts := _checked(ctx, names, allow_local_qemu, allow_host_paths, ports=False)):  # libvirt backend
        libvirt_commands.down(ctx, spec, names, hosts, None, False)
        return libvirt_commands.up(ctx, spec, names, hosts)
    progress = ctx.out.progress(names)
    reconcile.down(spec, target.root, names, None, progress, owner=_owner(target))
    outcomes = reconcile.up(spec, target.root, names, progress, owner=_owner(target))
    progress.close()
    _record(target, outcomes, spec.machines)
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def logs(ctx: Context, *, follow: bool, events: bool, lines: int) -> int:
    target = ctx.target
    names = target.machines()
    if not events and (hosts := libvirt_commands.placed(ctx, target.spec, names)):  # libvirt backend
        return libvirt_commands.logs(ctx, target.spec, names, hosts, follow, lines)
    filename = "events.jsonl" if events else "serial.log"
    many = len(names) > 1
    sources = [((f"{n} | " if many else ""), target.state_dir(n) + "/" + filename, False) for n in names]
    if not follow and not any(os.path.exists(path) for _, path, _ in sources):
        raise QemuspecError(f"no {'events' if events else 'console log'} yet for {', '.join(names)}: start with `qemuspec up {target.path}`")
    if ctx.out.json:  # JSON lines: {"machine", "line"} for the console, {"machine", "event"} for events
        json_sources = [(n, path) for n, (_, path, _) in zip(names, sources)]
        _follow([("", path, False) for _, path in json_sources], follow=follow, last=lines,
                emit=lambda path, line: ctx.out.line(_log_record(dict((p, n) for n, p in json_sources)[path], line, events)))
        return 0
    _follow(sources, follow=follow, last=lines, clean=ctx.out.guest)
    return 0


def _log_record(name: str, line: str, events: bool) -> dict:
    if events:
        try:
            return {"machine": name, "event": json.loads(line)}
        except ValueError:
            pass
    return {"machine": name, "line": line}


def events(ctx: Context, *, follow: bool) -> int:
    target = ctx.target
    name = target.machine()
    libvirt_commands.local_only(ctx, target.spec, name)  # libvirt backend
    path = os.path.join(target.state_dir(name), "events.jsonl")
    if not follow and not os.path.exists(path):
        raise QemuspecError(f"machine {name} has no events yet")
    _follow([("", path, False)], follow=follow, clean=ctx.out.guest)  # already JSON lines, with or without --json
    return 0


def _follow(sources: list[tuple[str, str, bool]], follow: bool, last: int = 0, emit: Any = None,
            clean: Any = lambda line: line) -> None:
    """Print files line by line with a prefix; with ``follow``, keep printing what is appended; each
    line through ``clean`` (Output.guest: the guest's bytes escaped on a terminal).
    (A log file has no change notification short of inotify; a 0.1 s re-read is what tail -f does.)"""
    def write(prefix: str, path: str, line: str) -> None:
        if emit is not None:
            emit(path, line)
        else:
            sys.stdout.write(prefix + clean(line) + "\n")

    offsets: dict[str, int] = {}
    partial: dict[str, str] = {}
    for prefix, path, from_end in sources:
        offsets[path] = os.path.getsize(path) if (from_end and os.path.exists(path)) else 0
        partial[path] = ""
        if last and os.path.exists(path):
            from qemuspec.runtime.console import tail

            text = tail(path, last)
            for line in text.split("\n") if text else []:
                write(prefix, path, line)
            offsets[path] = os.path.getsize(path)
    from qemuspec.runtime.statedir import read_from

    while True:
        for prefix, path, _ in sources:
            data = read_from(path, offsets[path])  # never through a planted symlink
            if not data:
                continue
            offsets[path] += len(data)
            text = partial[path] + data.decode(errors="replace").replace("\r", "")
            *lines, partial[path] = text.split("\n")
            for line in lines:
                write(prefix, path, line)
            sys.stdout.flush()
        if not follow:
            for prefix, path, _ in sources:
                if partial[path]:
                    write(prefix, path, partial[path])
            sys.stdout.flush()
            return
        time.sleep(0.1)


def _console_session(name: str, path: str) -> Any:
    """A session on the supervisor's console proxy (runtime/console.py): it answers ``ok`` or why not."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        sock.settimeout(5)
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 4096:
            chunk = sock.recv(1)
            if not chunk:
                break
            answer += chunk
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise QemuspecError(f"the console of machine {name} is not served ({path}: {exc.strerror or exc}): its "
                            "supervisor serves it; `qemuspec status` says whether it runs (an unsupervised machine "
                            "is adopted by `qemuspec up`)") from None
    if answer != b"ok\n":
        sock.close()
        why = answer.decode(errors="replace").strip().removeprefix("busy: ") or "the proxy closed the connection"
        raise QemuspecError(why)
    return sock


def console(ctx: Context) -> int:
    """Interactive serial console. Ctrl-] detaches; the machine keeps running. With --json, the
    console's output as JSON lines ({"machine", "data"}) until the console closes or input ends."""
    import select as select_mod

    name = ctx.target.machine()
    if (hosts := libvirt_commands.placed(ctx, ctx.target.spec, name)):  # libvirt backend
        return libvirt_commands.console(ctx, ctx.target.spec, hosts, name)
    inst = _running(ctx, name)
    if inst.machine.serial not in ("log", "socket"):
        raise QemuspecError(f"machine {name} has no console socket: set serial = \"log\" or \"socket\"")
    sock = _console_session(name, inst.layout.console_client)
    stdin = sys.stdin.fileno()
    interactive = os.isatty(stdin) and not ctx.out.json
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
        if not ctx.out.quiet:
            sys.stderr.write(f"connected to {name}'s console; detach with Ctrl-]\r\n")
    out = sys.stdout.buffer
    stdin_open = True
    try:
        while True:
            watch: list[Any] = [sock] + ([stdin] if stdin_open else [])
            ready, _, _ = select_mod.select(watch, [], [], None if stdin_open else 0.5)
            if not ready:
                return 0  # input ended and the guest has gone quiet
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    sys.stderr.write("\r\nthe console closed (the machine stopped)\r\n")
                    return 1
                if ctx.out.json:
                    ctx.out.line({"machine": name, "data": data.decode(errors="replace")})
                else:
                    out.write(data)
                    out.flush()
            if stdin_open and stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    stdin_open = False
                    continue
                if DETACH in data:
                    sock.sendall(data[: data.index(DETACH)])
                    return 0
                sock.sendall(data if not interactive else data.replace(b"\n", b"\r"))
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            if not ctx.out.quiet:
                sys.stderr.write("\r\ndetached\n")
        sock.close()
