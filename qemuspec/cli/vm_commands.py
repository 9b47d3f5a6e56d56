"""Commands that act on running machines: up, down, status, plan, inspect, logs, events, console, qmp,
pause, resume, restart."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from qemuspec.cli.common import (
    REFUSED,
    Context,
    Output,
    Target,
    emit_json,
    error_label,
    outcomes_exit_code,
)
from qemuspec.cli.commands import PENDING
from qemuspec.errors import QemuspecError, UsageError
from qemuspec.runtime import statedir

if TYPE_CHECKING:
    from qemuspec.backends.base import Backend, Monitor, Outcome
    from qemuspec.spec.models import File, Machine

DETACH = b"\x1d"  # Ctrl-]


def _owner(target: Target) -> str | None:
    """The definition file, recorded as the owner of the machines it starts."""
    return os.path.abspath(target.path) if getattr(target, "path", None) else None


def backends(ctx: Context) -> dict[str, "Backend"]:
    """Each machine's backend, chosen once for the command (backends.chosen)."""
    if "backends" not in ctx.extra:
        from qemuspec.backends import chosen

        target = ctx.target
        connect = getattr(ctx.extra.get("namespace"), "connect", None) or ctx.settings.connect
        ctx.extra["backends"] = chosen(
            target.spec, target.root, target.path, connect, _owner(target)
        )
    return cast("dict[str, Backend]", ctx.extra["backends"])


def refuse(ctx: Context, names: list[str], command: str) -> None:
    """One UsageError paragraph when a machine's backend cannot run ``command``."""
    chosen = backends(ctx)
    for name in names:
        why = chosen[name].refusal(name, ctx.target.spec.machines[name], command)
        if why:
            raise UsageError(why)


def _print_outcomes(out: Output, outcomes: list["Outcome"]) -> None:
    if out.json:
        emit_json([o.as_dict() for o in outcomes])
        return
    for o in outcomes:
        if o.action in REFUSED:
            continue
        ports = ", ".join(
            f"{p['address']}:{p['host']}->{p['guest']}/{p['protocol']}" for p in o.ports
        )
        extra = [f"pid {o.pid}"] if o.pid else []
        extra += [f"accel {','.join(o.accel)}"] if getattr(o, "accel", None) else []
        extra += [ports] if ports else []
        extra += (
            [f"qemu {o.qemu}"]
            if getattr(o, "qemu", "") and o.action in ("started", "restarted", "recreated")
            else []
        )
        extra += [o.detail] if o.detail else []
        extra += [f"{o.seconds:.1f} s"] if o.action == "stopped" else []
        out.say(f"{o.name}: {o.action}{' (' + ', '.join(extra) + ')' if extra else ''}")
    for o in outcomes:
        if o.action in REFUSED:  # the detail may quote the guest's console: escaped on a terminal
            print(f"{error_label()} {out.guest(o.detail or '', sys.stderr)}", file=sys.stderr)
        for warning in getattr(o, "warnings", ()):
            print(f"warning: {o.name}: {out.guest(warning, sys.stderr)}", file=sys.stderr)


def _checked(
    ctx: Context,
    names: list[str],
    allow_local_qemu: bool,
    allow_host_paths: bool,
    ports: bool,
    probe: bool = False,
    command: str = "up",
) -> None:
    """Preflight before anything starts (up, restart), each machine by its backend (reconcile.preflight):
    exit 2 with file:line. First lists the host paths outside the tree the machines can use."""
    from qemuspec import reconcile
    from qemuspec.cli.common import list_host_paths

    target = ctx.target
    spec, lines = target.load()
    list_host_paths(ctx.out, spec, target.path, names)
    problems = reconcile.preflight(
        spec,
        target.path,
        names,
        backends(ctx),
        command=command,
        allow_local_qemu=allow_local_qemu,
        allow_host_paths=allow_host_paths,
        environ=ctx.settings.var_environ(),
        ports=ports,
        probe=probe,
    )
    if problems:
        from qemuspec.errors import SpecError
        from qemuspec.spec.messages import located

        raise SpecError(located(target.path, lines, problems))


def up(
    ctx: Context,
    *,
    no_probe: bool,
    attach: bool,
    timeout: float | None,
    allow_local_qemu: bool,
    warm: bool = False,
    allow_host_paths: bool = False,
    no_restart: bool = False,
) -> int:
    from qemuspec import reconcile

    target = ctx.target
    spec = target.spec
    names = target.machines()
    started = reconcile.needed(spec, names)
    if attach:
        refuse(ctx, names, "up --attach")
    declared = reconcile.overridden(spec, started, timeout, warm)
    pulls = any(disk.image is not None for n in started for disk in spec.machines[n].disks)
    _checked(
        ctx,
        started,
        allow_local_qemu,
        allow_host_paths,
        ports=True,
        probe=not no_probe and not pulls,
    )
    if pulls:  # base images cached and checked after the definition's checks, before any qemu runs (the probe too)
        from qemuspec.cli.img_commands import ensure_images

        ensure_images(ctx, spec, started)
        if not no_probe:
            _checked(ctx, started, allow_local_qemu, allow_host_paths, ports=True, probe=True)
    deadline = max((spec.machines[n].ready.timeout for n in started), default=None)
    chosen = backends(ctx)
    # what this `up` starts: a Ctrl-C stops these again (compose does for a foreground up), not the
    # others (a machine changed live keeps running)
    starting = [
        s["name"]
        for s in reconcile.plan(spec, chosen, names, _owner(target), target.root)
        if s["action"] in ("start", "restart", "recreate", "starting")
    ]
    progress = ctx.out.progress(names, deadline, _consoles(ctx, names))
    try:
        outcomes = reconcile.up(
            spec,
            target.root,
            names,
            chosen,
            progress,
            owner=_owner(target),
            record=declared,
            no_restart=no_restart,
        )
    except KeyboardInterrupt:
        progress.close()
        return _interrupted(ctx, spec, starting)
    finally:
        progress.close()
    _print_outcomes(ctx.out, outcomes)
    code = outcomes_exit_code(outcomes)
    if code:
        return code
    from qemuspec.cli.provision_command import (
        after_up,
    )  # once per machine life (runtime/provision.py)

    after_up(ctx, spec, outcomes)
    if attach:
        return _attach(ctx, spec, names)
    return 0


def _consoles(ctx: Context, names: list[str]) -> dict[str, str]:
    """Each machine's console log here, for the last console line of the live progress line."""
    return {n: os.path.join(ctx.target.state_dir(n), statedir.SERIAL_LOG) for n in names}


def _interrupted(ctx: Context, spec: "File", starting: list[str]) -> int:
    """Ctrl-C during `up`: stop the machines it was starting (their supervisors would boot them on
    without anyone waiting), say so, and leave machines that were running before alone."""
    from qemuspec import reconcile

    others = [n for n in ctx.target.machines() if n not in starting]
    print(
        f"qemuspec up: interrupted: stopping {', '.join(starting) or 'nothing'}"
        + (f" (left running as before: {', '.join(others)})" if others else ""),
        file=sys.stderr,
        flush=True,
    )
    if starting:
        progress = ctx.out.progress(starting)
        try:
            stopped = reconcile.down(
                spec, ctx.target.root, starting, backends(ctx), None, progress, _owner(ctx.target)
            )
        finally:
            progress.close()
        _print_outcomes(ctx.out, stopped)
    return 130


def _attach(ctx: Context, spec: "File", names: list[str]) -> int:
    """Stream every machine's console and events until Ctrl-C, then bring the machines down."""
    from qemuspec import reconcile

    root = ctx.target.root
    sources = []
    for name in names:
        sources.append((f"{name} | ", os.path.join(root, name, statedir.SERIAL_LOG), True))
        sources.append((f"{name} * ", os.path.join(root, name, statedir.EVENTS), True))
    print("attached: Ctrl-C stops the machines", file=sys.stderr, flush=True)
    try:
        _follow(sources, follow=True, clean=ctx.out.guest)
    except KeyboardInterrupt:
        pass
    print("\nstopping...", file=sys.stderr)
    progress = ctx.out.progress(names)
    try:
        stopped = reconcile.down(
            spec, root, names, backends(ctx), None, progress, _owner(ctx.target)
        )
    finally:
        progress.close()
    _print_outcomes(ctx.out, stopped)
    return 0


def down(ctx: Context, *, timeout: float | None, purge: bool) -> int:
    from qemuspec import reconcile

    target = ctx.target
    if _file_gone(target):
        return _down_recorded(ctx, timeout, purge)
    spec = target.spec
    names = target.machines()
    progress = ctx.out.progress(names)
    try:
        outcomes = reconcile.down(
            spec, target.root, names, backends(ctx), timeout, progress, owner=_owner(target)
        )
    finally:
        progress.close()  # the live lines go: each outcome is printed once, below
    if purge:  # what qemuspec made for each stopped machine, by its backend (a host's volumes; this host's files)
        kept = {o.name for o in outcomes if o.action in REFUSED}
        for name in [n for n in names if n not in kept]:
            for path in backends(ctx)[name].purge(name):
                ctx.out.note(f"removed {path}")
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def _file_gone(target: Target) -> bool:
    """No definition file to read: the one named does not exist, or none was named and no default
    exists. `down` then finds machines by their records (``qemuspec ls``), not the file."""
    try:
        return not os.path.exists(target.path)
    except UsageError:
        return True


def _down_recorded(ctx: Context, timeout: float | None, purge: bool) -> int:
    """`down` of machines whose definition file is gone (deleted, renamed, another checkout): found
    in the runtime registry by name (as `qemuspec ls` shows them), by ``--state-dir``, or by the
    file they were started from, and stopped by their supervisor as ever. A machine whose file
    still exists is left to that file (its `down` knows its dependencies and networks)."""
    from qemuspec.backends.base import stopped
    from qemuspec.backends.local import LocalBackend
    from qemuspec.runtime.status import registered

    target = ctx.target
    given = os.path.abspath(target.given) if target.given else None
    names = target.rest + target.machine_option
    where = target.state_dir_option
    where = os.path.abspath(where) if where else None
    rows = [
        r
        for r in registered()
        if r["state"] != "stopped"
        and (not names or r["name"] in names)
        and (where is None or where in (r["state_dir"], os.path.dirname(r["state_dir"])))
        and (given is None or r.get("file") == given)
    ]
    if not names and where is None and given is None:
        raise UsageError(
            "down needs a definition file, and none was given and none of the defaults exists here: "
            "name the machines as `qemuspec ls` shows them (qemuspec down NAME), or give "
            "--state-dir DIR"
        )
    if not rows:
        what = ", ".join(names) if names else (where or given or "")
        raise UsageError(
            f"{target.given or 'no definition file'}: no such file, and no machine qemuspec runs "
            f"matches {what}: `qemuspec ls` lists the machines that run"
        )
    for name in names:
        if sum(r["name"] == name for r in rows) > 1:
            dirs = ", ".join(r["state_dir"] for r in rows if r["name"] == name)
            raise UsageError(
                f"more than one machine named {name} runs ({dirs}): say which with "
                f"--state-dir DIR (qemuspec down {name} --state-dir {dirs.split(', ')[0]})"
            )
    for r in rows:
        if r.get("file") and os.path.exists(r["file"]) and r["file"] != given:
            raise UsageError(
                f"machine {r['name']} in {r['state_dir']} belongs to {r['file']}, which exists: "
                f"stop it with `qemuspec down {r['file']} {r['name']}`"
            )
    outcomes = []
    for r in rows:
        name, state_dir = r["name"], r["state_dir"]
        backend = LocalBackend(os.path.dirname(state_dir), r.get("file") or state_dir)
        began = time.monotonic()
        step = backend.stop(name, _recorded_machine(state_dir), timeout)
        outcomes.append(stopped(name, time.monotonic() - began, step))
        if purge:
            for path in backend.purge(name):
                ctx.out.note(f"removed {path}")
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def _recorded_machine(state_dir: str) -> "Machine":
    """The machine as `up` recorded it (definition.json, in a proven state directory), else the
    defaults: enough to stop it (its stop_timeout; the supervisor knows the rest)."""
    from qemuspec.api import recorded_definition
    from qemuspec.spec.models import Machine

    data = recorded_definition(state_dir) if statedir.proven(state_dir) else None
    if data is not None:
        try:
            return Machine.model_validate(data, context={"base_dir": state_dir})
        except ValueError:
            pass
    return Machine.model_construct()


def status(ctx: Context) -> int:
    target = ctx.target
    spec = target.spec
    owner = _owner(target)
    rows = []
    readopted = _readopt(ctx, target.machines())
    chosen = backends(ctx)
    for name in target.machines():
        row = chosen[name].status(name, spec.machines[name])
        if name in readopted:
            row["readopted"] = True
        if (
            owner
            and row.get("file")
            and row["state"] != "stopped"
            and os.path.abspath(row["file"]) != owner
        ):
            row["reason"] = f"run by {row['file']}" + (
                f"; {row['reason']}" if row["reason"] else ""
            )
        rows.append(row)
    if ctx.out.json:
        emit_json(rows)
        return 0
    _table(rows, with_file=False, with_host=any(r.get("host") for r in rows), out=ctx.out)
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
        viewer = (
            f"vncviewer {where['socket']}"
            if kind == "vnc"
            else f"remote-viewer spice+unix://{where['socket']}"
        )
        return (
            f"{kind} on the unix socket {where['socket']} (only you can open it; connect: {viewer})"
        )
    text = f"{kind} on {where['address']}:{where['port']}"
    if where["auth"] == "none":
        return (
            text + " with no authentication (unauthenticated = true: every local user can connect)"
        )
    return text + (
        f" (refuses every client until you set a password: qemuspec qmp {name} set_password "
        f'\'{{"protocol": "{kind}", "password": "..."}}\')'
    )


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
    chosen = backends(ctx)
    names = [
        n
        for n in names
        if machines[n].restart != "no"
        and chosen[n].kind == "local"
        and _unsupervised(ctx.target.state_dir(n))
    ]
    if not names:
        return set()
    done = set()
    for o in [o for n in names for o in chosen[n].readopt(ctx.target.spec, [n])]:
        if o.action == "adopted":
            done.add(o.name)
            policy = ctx.target.spec.machines[o.name].restart
            ctx.out.note(
                f'{o.name}: its supervisor was gone: adopted again (restart = "{policy}" is enforced again)'
            )
        else:
            ctx.out.note(f"{o.name}: could not be adopted again: {o.detail}")
    return done


# state -> colour of the STATE column on a terminal (green: running, yellow: on its way, red: trouble)
STATE_COLOURS = {
    "running": "32",
    "stopped": "2",
    "paused": "33",
    "starting": "33",
    "restarting": "33",
    "stopping": "33",
    "unsupervised": "33",
    "failed": "31",
    "crashed": "31",
    "lost": "31",
    "hung": "31",
}


def _table(
    rows: list[dict], with_file: bool, with_host: bool = False, out: Output | None = None
) -> None:
    """The one status table; HOST (where each machine runs) when a machine runs through libvirt; the
    STATE column coloured on a terminal (``out.colour``: never with NO_COLOR)."""
    head = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "BOOT", "ACCEL", "PORTS"] + (
        ["FILE"] if with_file else []
    )
    head += (["HOST"] if with_host else []) + ["REASON"]
    table = [head]
    for r in rows:
        ports = " ".join(f"{p['host']}->{p['guest']}" for p in r["ports"])
        uptime = f"{r['uptime']:.0f}s" if r["uptime"] is not None else "-"
        cells = [
            r["name"],
            r["state"],
            str(r["pid"] or "-"),
            uptime,
            str(r["restarts"]),
            r.get("boot") or "-",
            ",".join(r["accel"]) or "-",
            ports or "-",
        ]
        cells += [str(r.get("file") or r.get("state_dir"))] if with_file else []
        cells += [_host_label(r.get("host"))] if with_host else []
        reason = r["reason"] or ""  # may quote the guest's console (a panic line): escaped
        table.append(cells + [out.guest(reason) if out is not None else reason])
    paint = None
    if out is not None and out.colour:
        paint = {
            1: lambda cell: out.paint(cell, STATE_COLOURS[cell]) if cell in STATE_COLOURS else cell
        }
    for line in format_table(table, right={2, 3, 4}, paint=paint):
        print(line)


def _host_label(uri: str | None) -> str:
    if not uri:
        return "local"
    from qemuspec.backends.libvirt_conn import label

    return label(uri)


def ls(ctx: Context) -> int:
    """Every machine this user's qemuspec runs here, found through the runtime registry (so a deleted
    state directory or another project's file does not hide it)."""
    from qemuspec.runtime.status import registered

    namespace = ctx.extra.get("namespace")
    prune = bool(getattr(namespace, "prune", False))
    pruned = _prune() if prune else []
    rows = registered()
    if getattr(namespace, "all", False):
        rows += _stopped_rows({r["state_dir"] for r in rows})
    if ctx.out.json:
        emit_json({"pruned": pruned, "machines": rows} if prune else rows)
        return 0
    for entry in pruned:
        print(f"pruned {entry['path']}: {entry['why']}")
    if not rows:
        print("no machines" if getattr(namespace, "all", False) else "no machines running")
        return 0
    _table(rows, with_file=True, out=ctx.out)
    return 0


def _stopped_rows(listed: set[str]) -> list[dict]:
    """`ls --all`: the machines of every state directory qemuspec claimed (the keep base's proofs)
    that no runtime directory lists: stopped, crashed, failed."""
    from qemuspec.runtime.status import machine_status

    rows = []
    for state_dir in statedir.claimed():
        if state_dir not in listed and statedir.proven(state_dir):
            rows.append(machine_status(os.path.basename(state_dir), None, state_dir))
    return rows


def _prune() -> list[dict]:
    """`ls --prune`: forget what names nothing any more: proofs of state directories that are gone
    (or were replaced: another inode), and the records of machines whose qemu and supervisor are
    both dead (`lost`), as `down` would clear them. Nothing running is touched; no disk or log."""
    from qemuspec.backends.local import LocalBackend
    from qemuspec.runtime.status import registered

    pruned = []
    for row in registered():
        if row["state"] == "lost":
            LocalBackend(os.path.dirname(row["state_dir"]), row["state_dir"]).clean(row["name"])
            pruned.append({"path": row["state_dir"], "why": "qemu and its supervisor are gone"})
    for state_dir in statedir.claimed():
        if not statedir.proven(state_dir):
            statedir.disown(state_dir)
            why = "no longer exists" if not os.path.lexists(state_dir) else "is not the one claimed"
            pruned.append({"path": state_dir, "why": f"the state directory {why}"})
    return pruned


def format_table(
    rows: list[list[str]],
    right: set[int] = set(),
    paint: dict[int, Callable[[str], str]] | None = None,
) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart; the last column is not padded.
    ``paint``: column -> colouring of its cells below the header, applied after the padding (escape
    codes take no room on the screen)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for number, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        cells[-1] = row[-1]
        for i, colour in (paint or {}).items() if number else ():
            stripped = cells[i].rstrip()
            cells[i] = colour(stripped) + cells[i][len(stripped) :]
        out.append("  ".join(cells).rstrip())
    return out


_CLASS_GLOSS = {
    "live": ": changed in place, no reboot",
    "restart": ": qemu restarted, disks kept",
    "recreate": ": disks or seeds rebuilt, then started",
}


def plan(ctx: Context, *, warm: bool = False) -> int:
    """What `up` would do; exit 3 (PENDING) when it would change anything, so CI can gate on drift."""
    from qemuspec.api import plan as plan_steps, show_value

    from qemuspec import reconcile

    target = ctx.target
    spec = target.spec
    names = target.machines()
    reconcile.overridden(spec, reconcile.needed(spec, names), warm=warm)
    if warm:
        refuse(ctx, reconcile.needed(spec, names), "plan")
    steps = plan_steps(spec, target.root, names, owner=_owner(target), backends=backends(ctx))
    pending = any(step["action"] != "up to date" for step in steps)
    if ctx.out.json:
        emit_json(steps)
        return PENDING if pending else 0
    out = ctx.out
    colour = {
        "up to date": "32",
        "start": "33",
        "adopt": "33",
        "live": "32",
        "restart": "33",
        "recreate": "31",
    }
    for step in steps:
        boot = f" ({step['warm']['boot']}: {step['warm']['why']})" if step.get("warm") else ""
        detail = f" ({step['detail']})" if step.get("detail") else ""
        detail += _CLASS_GLOSS.get(step.get("class", ""), "")
        print(
            f"{step['name']}: {out.paint(step['action'], colour.get(step['action'], '0'))}{boot}{detail}"
        )
        if step.get("warm", {}).get("disk_writes"):
            print(f"    {step['warm']['disk_writes']}")
        for change in step["changes"]:
            old, new = (
                show_value(change["field"], change["old"]),
                show_value(change["field"], change["new"]),
            )
            cls = change.get("class")
            tag = f"  [{out.paint(cls, colour.get(cls, '0'))}: {change['why']}]" if cls else ""
            print(f"    {change['field']}: {out.paint(old, '31')} -> {out.paint(new, '32')}{tag}")
        for line in step["diff"][2:]:
            code = (
                "31"
                if line.startswith("-")
                else "32"
                if line.startswith("+")
                else "36"
                if line.startswith("@")
                else ""
            )
            print(f"      {out.paint(line, code) if code else line}")
    if pending and not out.quiet:
        print(
            f"plan: changes pending (exit {PENDING}); `{_up_line(ctx, warm)}` applies them",
            file=sys.stderr,
        )
    return PENDING if pending else 0


def _up_line(ctx: Context, warm: bool) -> str:
    """The `up` that applies this plan: the same file, machines and flags the plan was given (--var,
    --warm, --state-dir, --connect), so pasting it does what the plan showed."""
    import shlex

    target, namespace = ctx.target, ctx.extra.get("namespace")
    words = ["qemuspec", "up", target.path, *target.rest]
    words += [w for name in target.machine_option for w in ("--machine", name)]
    words += [w for pair in getattr(namespace, "var", None) or [] for w in ("--var", pair)]
    words += ["--warm"] if warm else []
    for flag in ("state_dir", "connect"):
        value = getattr(namespace, flag, None)
        words += [f"--{flag.replace('_', '-')}", value] if value else []
    return shlex.join(words)


def inspect(ctx: Context) -> int:
    from qemuspec.api import machine_info

    target = ctx.target
    name = target.machine()
    refuse(ctx, [name], "inspect")
    info = machine_info(target.spec, target.root, name)
    if ctx.out.json:
        emit_json(info)
        return 0
    import shlex

    for key in (
        "name",
        "state",
        "pid",
        "supervisor",
        "uptime",
        "restarts",
        "restart",
        "accel",
        "qmp",
        "state_dir",
    ):
        value = info.get(key)
        print(
            f"{key + ':':<12} {', '.join(value) if isinstance(value, list) else ('-' if value is None else value)}"
        )
    for p in info["ports"]:
        print(f"{'port:':<12} {p['address']}:{p['host']} -> {p['guest']}/{p['protocol']}")
    if info.get("display"):
        print(f"{'display:':<12} {display_text(name, info['display'])}")
    for d in info["disks"]:
        print(
            f"{'disk:':<12} {d['file']} ({d['format'] or '?'}{', backing ' + d['backing'] if d['backing'] else ''}{'' if d['exists'] else ', not created yet'})"
        )
    if "last_exit" in info:
        print(f"{'last exit:':<12} {json.dumps(info['last_exit'])}")
    print(f"{'argv:':<12} {shlex.join(info['argv'])}")
    for event in info["events"][-5:]:
        print(f"{'event:':<12} {json.dumps(event)}")
    return 0


def _machine(ctx: Context, name: str) -> tuple["Backend", "Machine"]:
    """The backend and model of a machine a command acts on while it runs; an unsupervised local
    machine gets its supervisor again first (_readopt)."""
    _readopt(ctx, [name])
    return backends(ctx)[name], ctx.target.spec.machines[name]


def monitor(ctx: Context, name: str) -> "Monitor":
    """A QMP connection to a running machine, through its backend (local: the client monitor, free
    while the supervisor holds the main one; libvirt: its monitor passthrough)."""
    backend, machine = _machine(ctx, name)
    return backend.monitor(name, machine)


def qmp(ctx: Context) -> int:
    """``qmp [FILE] [MACHINE] COMMAND [JSON]``: the machine may be left out of a one-machine file."""
    target = ctx.target
    rest = list(target.rest)
    if not rest:
        raise UsageError(
            "qmp needs a QMP command: qemuspec qmp [FILE] [MACHINE] COMMAND [JSON], e.g. qemuspec qmp machines/dev.toml query-status"
        )
    if len(rest) > 3:
        raise UsageError(
            f"qmp takes [MACHINE] COMMAND [JSON], got {len(rest)} operands: quote the JSON arguments"
        )
    name: str | None = target.machine_option[0] if target.machine_option else None
    if (
        len(rest) == 2
        and not rest[1].lstrip().startswith("{")
        and rest[0] not in target.spec.machines
        and not _json_object(rest[1])
        and not _close_machine(rest[0], list(target.spec.machines))  # a typo: did-you-mean below
    ):
        raise UsageError(
            f"qmp {rest[0]} {rest[1]}: {rest[1]!r} is not JSON, and {target.path} has no machine "
            f'"{rest[0]}" (machines: {", ".join(target.spec.machines)}): QMP arguments are one JSON '
            f'object, e.g. qemuspec qmp {target.path} {rest[0]} \'{{"device": "disk0"}}\', and a '
            "machine comes before the command"
        )
    if len(rest) == 3 or (len(rest) == 2 and not rest[1].lstrip().startswith("{")):
        name = rest.pop(0)
    elif len(rest) == 1 and rest[0] in target.spec.machines and len(target.spec.machines) > 1:
        raise UsageError(
            f"qmp {rest[0]}: which QMP command? e.g. qemuspec qmp {target.path} {rest[0]} query-status"
        )
    name = target.machine(name, operands=False)
    command, raw = rest[0], (rest[1] if len(rest) > 1 else None)
    arguments = None
    if raw:
        try:
            arguments = json.loads(raw)
        except ValueError as exc:
            raise UsageError(
                f"qmp {command}: {raw!r} is not JSON ({exc}): arguments must be one JSON object, "
                f'for example \'{{"device": "disk0"}}\''
            ) from None
        if not isinstance(arguments, dict):
            raise UsageError(
                f"qmp {command}: {raw!r} is JSON but not one JSON object: arguments must be one "
                'JSON object, for example \'{"device": "disk0"}\''
            )
    with monitor(ctx, name) as client:
        result = client.command(command, arguments)
    if isinstance(result, str) and not ctx.out.json:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        emit_json(result)
    return 0


def _close_machine(word: str, machines: list[str]) -> bool:
    import difflib

    return bool(difflib.get_close_matches(word, machines, n=1))


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _each(ctx: Context, paused: bool) -> int:
    results = []
    for name in ctx.target.machines():
        backend, machine = _machine(ctx, name)
        backend.pause(name, machine, paused)
        results.append({"name": name, "state": "paused" if paused else "running"})
    ctx.out.states(results)
    return 0


def pause(ctx: Context) -> int:
    return _each(ctx, True)


def resume(ctx: Context) -> int:
    return _each(ctx, False)


def restart(ctx: Context, *, allow_local_qemu: bool = False, allow_host_paths: bool = False) -> int:
    from qemuspec import reconcile

    target = ctx.target
    spec = target.spec
    names = target.machines()
    # The machines are stopped first, so their own ports are not checked.
    _checked(ctx, names, allow_local_qemu, allow_host_paths, ports=False, command="restart")
    progress = ctx.out.progress(names)
    try:
        down = reconcile.down(
            spec, target.root, names, backends(ctx), None, progress, owner=_owner(target)
        )
        refused = [o for o in down if o.action in REFUSED]
        outcomes = refused or reconcile.up(
            spec, target.root, names, backends(ctx), progress, owner=_owner(target)
        )
    finally:
        progress.close()
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def logs(
    ctx: Context,
    *,
    follow: bool,
    events: bool,
    lines: int | None,
    since: str | None = None,
    timestamps: bool = False,
) -> int:
    """Like `docker logs`/`journalctl`: every line, or the last ``lines`` (0: none); ``follow`` from
    the end (or the last ``lines``), rotation followed, until the machines stop; ``since`` and
    ``timestamps`` from the console's time index (events carry their own times)."""
    target = ctx.target
    names = target.machines()
    chosen = backends(ctx)
    after = _since(since) if since else None
    if any(chosen[n].kind != "local" for n in names):
        if after is not None or timestamps:
            raise UsageError(
                "logs --since and --timestamps read the console's time index, which only machines "
                "run here keep: leave them out for machines on libvirt hosts"
            )
        if not follow and not events:
            return _print_logs(ctx, names, lines)
        if events:
            refuse(ctx, names, "logs --events")
        return _follow_console(ctx, names, lines)
    if not follow and not events and after is None and not timestamps:
        return _print_logs(ctx, names, lines)  # every backend's console log, printed one way
    filename = statedir.EVENTS if events else statedir.SERIAL_LOG
    files = [_LogFile(n, target.state_dir(n), filename, events) for n in names]
    if not follow and not any(os.path.exists(f.path) for f in files):
        what = "events" if events else "console log"
        raise QemuspecError(
            f"no {what} yet for {', '.join(names)}: start with `qemuspec up {target.path}`"
        )
    for f in files:
        f.start(0 if follow and lines is None else lines)
    many = len(names) > 1
    out = ctx.out

    def running() -> bool:
        for n in names:
            with contextlib.suppress(QemuspecError):
                seen = chosen[n].look(n, target.spec.machines[n])
                if seen.running or seen.busy:
                    return True
        return False

    checked, live = 0.0, follow and running()
    while True:
        for f in files:
            for line, when in f.poll():
                if after is not None and (when is None or when < after):
                    continue
                if out.json:
                    record = _log_record(f.machine, line, events)
                    out.line({**record, **({"time": _stamp(when)} if when else {})})
                    continue
                stamp = (_stamp(when) or "-") + " " if timestamps else ""
                sys.stdout.write(
                    (f"{f.machine} | " if many else "") + stamp + out.guest(line) + "\n"
                )
            sys.stdout.flush()
        if not live:
            for f in files:
                for line, when in f.rest():
                    if after is None or (when is not None and when >= after):
                        stamp = (_stamp(when) or "-") + " " if timestamps else ""
                        prefix = f"{f.machine} | " if many else ""
                        sys.stdout.write(prefix + stamp + out.guest(line) + "\n")
            sys.stdout.flush()
            return 0
        time.sleep(0.1)  # a log has no change notification short of inotify; tail -f re-reads too
        if time.monotonic() - checked > 1.0:
            checked = time.monotonic()
            live = running()  # one more pass after the machines stopped: their last lines


def _since(text: str) -> float:
    """``--since``: a duration ago (``10m``), an ISO time (UTC unless it names an offset), or unix
    seconds; as unix time."""
    import datetime

    from qemuspec.spec.units import parse_seconds

    if text[-1:].isalpha():  # 30s, 10m, 2h: that long ago
        with contextlib.suppress(ValueError):
            return time.time() - parse_seconds(text)
    with contextlib.suppress(ValueError):
        return float(text)  # unix seconds, as docker takes them
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f'--since "{text}": write a duration ago (30s, 10m, 2h), a time such as '
            "2026-12-02T05:00:00 (UTC unless it names an offset), or unix seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _stamp(when: float | None) -> str | None:
    """A line's time as docker prints it: RFC 3339 in UTC, to the millisecond."""
    if when is None:
        return None
    import datetime

    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _LogFile:
    """One machine's log followed by offset: a rotation (NAME moved to NAME.1, a new NAME begun)
    read to its end before the new file; each line dated from the time index (console) or its own
    timestamp (events). Read through the state owner (never a symlink)."""

    def __init__(self, machine: str, directory: str, name: str, events: bool):
        self.machine, self.path, self.events = machine, os.path.join(directory, name), events
        self.times = os.path.join(directory, statedir.SERIAL_TIMES)
        self.index = statedir.TimeIndex(self.times)
        self.offset, self.inode, self.partial, self.partial_at = 0, self._inode(), b"", 0

    def _inode(self) -> int | None:
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino
        except OSError:
            return None

    def start(self, last: int | None) -> None:
        """From the beginning (``last`` None), the end (0) or the start of the last ``last`` lines."""
        if last is None:
            return
        data = statedir.read_from(self.path, 0) or b""
        end, start = len(data) - (1 if data.endswith(b"\n") else 0), len(data)
        for _ in range(last):
            newline = data.rfind(b"\n", 0, end)
            start = newline + 1
            if newline < 0:
                break
            end = newline
        self.offset = start

    def _lines(self, data: bytes, base: int) -> list[tuple[str, float | None]]:
        """Complete lines of ``data`` (read at ``base``), each with its time; the rest kept."""
        out = []
        text, start = self.partial + data, self.partial_at if self.partial else base
        at = start
        *whole, self.partial = text.split(b"\n")
        for raw in whole:
            out.append(self._dated(raw, at))
            at += len(raw) + 1
        self.partial_at = at
        return out

    def _dated(self, raw: bytes, at: int) -> tuple[str, float | None]:
        line = raw.decode(errors="replace").replace("\r", "")
        if self.events:
            try:
                stamp = json.loads(line).get("timestamp") or {}
                return line, stamp["seconds"] + stamp.get("microseconds", 0) / 1e6
            except (ValueError, KeyError, TypeError, AttributeError):
                return line, None
        self.index.refresh()
        return line, self.index.at(at)

    def poll(self) -> list[tuple[str, float | None]]:
        out: list[tuple[str, float | None]] = []
        inode = self._inode()
        if inode != self.inode and self.inode is not None:  # rotated: the old file's end first
            old = statedir.rotated(self.path)
            with contextlib.suppress(OSError):
                if os.stat(old, follow_symlinks=False).st_ino == self.inode:
                    self.index.path = statedir.rotated(self.times)
                    out += self._lines(statedir.read_from(old, self.offset) or b"", self.offset)
            out += self.rest()
            self.offset, self.index = 0, statedir.TimeIndex(self.times)
        self.inode = inode
        data = statedir.read_from(self.path, self.offset)
        if data:
            out += self._lines(data, self.offset)
            self.offset += len(data)
        return out

    def rest(self) -> list[tuple[str, float | None]]:
        """A last line without its newline (the end of a log that stopped growing)."""
        if not self.partial:
            return []
        line = self._dated(self.partial, self.partial_at)
        self.partial = b""
        return [line]


def _print_logs(ctx: Context, names: list[str], lines: int | None) -> int:
    """The console log each machine's backend keeps (local: serial.log; libvirt: the host's pool,
    downloaded), the last ``lines`` of it (None: all; 0: none), prefixed by the machine when there
    are several."""
    chosen = backends(ctx)
    found = False
    for name in names:
        text = chosen[name].serial_log(name)
        if text is None:
            continue
        found = True
        shown = text.removesuffix("\n").split("\n") if text else []
        for line in shown if lines is None else shown[len(shown) - lines :]:
            if ctx.out.json:
                ctx.out.line({"machine": name, "line": line})
            else:
                print((f"{name} | " if len(names) > 1 else "") + ctx.out.guest(line))
    sys.stdout.flush()
    if not found:
        raise QemuspecError(
            f"no console log yet for {', '.join(names)}: start with `qemuspec up {ctx.target.path}`"
        )
    return 0


def _follow_console(ctx: Context, names: list[str], lines: int | None) -> int:
    """`logs -f` of a machine whose backend keeps no log file here: the last ``lines`` of the log so
    far (none unless -n is given, as locally), then the live console, until the machine stops."""
    if len(names) != 1:
        raise UsageError("logs --follow of machines on libvirt hosts follows one machine: name it")
    _print_logs(ctx, names, 0 if lines is None else lines)  # -f begins at the end
    backend, machine = _machine(ctx, names[0])
    with backend.console(names[0], machine, interactive=False) as sock:
        while data := sock.recv(65536):
            sys.stdout.write(ctx.out.guest(data.decode(errors="replace").replace("\r", "")))
            sys.stdout.flush()
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
    refuse(ctx, [name], "events")
    path = os.path.join(target.state_dir(name), statedir.EVENTS)
    if not follow and not os.path.exists(path):
        raise QemuspecError(f"machine {name} has no events yet")
    _follow(
        [("", path, False)], follow=follow, clean=ctx.out.guest
    )  # already JSON lines, with or without --json
    return 0


def _follow(
    sources: list[tuple[str, str, bool]],
    follow: bool,
    last: int = 0,
    emit: Any = None,
    clean: Any = lambda line: line,
) -> None:
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


def console(ctx: Context) -> int:
    """Interactive serial console. Ctrl-] detaches; the machine keeps running. With --json, the
    console's output as JSON lines ({"machine", "data"}) until the console closes or input ends."""
    import select as select_mod

    name = ctx.target.machine()
    backend, machine = _machine(ctx, name)
    sock = backend.console(name, machine, interactive=True)
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
