"""The machine commands for machines placed on libvirt hosts (``host =``, ``--connect``,
``$QEMUSPEC_CONNECT``): the same output and exit codes as the local commands, with libvirt's API
underneath. Each local command calls :func:`placed` first and hands over when it answers."""

from __future__ import annotations

import os
import sys
from typing import Any

from qemuspec.cli.common import emit_json, outcomes_exit_code
from qemuspec.errors import QemuspecError, UsageError


def _connect(ctx: Any) -> str | None:
    return getattr(ctx.extra.get("namespace"), "connect", None) or ctx.settings.connect


def placed(ctx: Any, spec: Any, names: list[str] | str) -> dict[str, str | None] | None:
    """Machine -> URI (None: local) when any of ``names`` runs through libvirt, else None."""
    from qemuspec.backends import placement

    hosts = placement(spec, [names] if isinstance(names, str) else list(names), _connect(ctx))
    return hosts if any(hosts.values()) else None


def local_only(ctx: Any, spec: Any, name: str) -> None:
    hosts = placed(ctx, spec, name)
    if hosts:
        command = getattr(ctx.extra.get("namespace"), "command", "this command")
        raise UsageError(f"machine {name} runs through libvirt at {hosts[name]}: `qemuspec {command}` works on local machines only "
                         "(docs/libvirt.md lists what works through libvirt)")


def _root(ctx: Any) -> str:
    return ctx.target.root


def _domain(ctx: Any, spec: Any, name: str, hosts: dict) -> Any:
    from qemuspec.backends import libvirt_domain as ld
    from qemuspec.backends.libvirt_conn import connect

    uri = hosts[name]
    dom = ld.lookup(connect(uri), name)
    if dom is None or not dom.isActive():
        raise QemuspecError(f"machine {name} is not running on {uri}: start it with `qemuspec up {ctx.target.path}`")
    ld._ours(dom, uri, name, ctx.target.path)
    return dom


def up(ctx: Any, spec: Any, names: list[str], hosts: dict, attach: bool = False) -> int:
    from qemuspec.backends import libvirt_domain as ld
    from qemuspec.cli.vm_commands import _print_outcomes

    if attach:
        raise UsageError("--attach streams local machines only: follow a machine on a libvirt host with `qemuspec logs -f NAME`")
    progress = ctx.out.progress(names)
    try:
        outcomes = ld.up(spec, ctx.target.path, _root(ctx), names, _all_hosts(ctx, spec), progress)
    finally:
        progress.close()
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def _all_hosts(ctx: Any, spec: Any) -> dict:
    from qemuspec.backends import placement

    return placement(spec, list(spec.machines), _connect(ctx))


def down(ctx: Any, spec: Any, names: list[str], hosts: dict, timeout: float | None, purge: bool) -> int:
    from qemuspec.backends import libvirt_domain as ld
    from qemuspec.cli.vm_commands import _print_outcomes

    progress = ctx.out.progress(names)
    try:
        outcomes = ld.down(spec, ctx.target.path, _root(ctx), names, hosts, timeout, progress, purge=purge)
    finally:
        progress.close()
    if purge:  # this host's part (local machines' disks, every machine's known_hosts): the one rule local purge keeps
        from qemuspec.api import purge as purge_files

        kept = {o.name for o in outcomes if o.action == "belongs to another file"}
        for path in purge_files(spec, _root(ctx), [n for n in names if n not in kept]):
            ctx.out.note(f"removed {path}")
    _print_outcomes(ctx.out, outcomes)
    return outcomes_exit_code(outcomes)


def status(ctx: Any, spec: Any, names: list[str], hosts: dict) -> int:
    from qemuspec.backends import libvirt_domain as ld
    from qemuspec.backends.libvirt_conn import label
    from qemuspec.runtime.status import machine_status

    rows = []
    for name in names:
        if hosts[name]:
            rows.append(ld.status(spec, ctx.target.path, name, hosts[name]))
        else:
            rows.append({**machine_status(name, spec.machines[name], ctx.target.state_dir(name)), "host": None})
    if ctx.out.json:
        emit_json(rows)
        return 0
    print(f"{'NAME':<16} {'STATE':<13} {'PID':>8} {'UPTIME':>8} {'RESTARTS':>8}  {'HOST':<24} PORTS")
    for r in rows:
        ports = " ".join(f"{p['host']}->{p['guest']}" for p in r["ports"])
        uptime = f"{r['uptime']:.0f}s" if r["uptime"] is not None else "-"
        host = label(r["host"]) if r["host"] else "local"
        print(f"{r['name']:<16} {r['state']:<13} {r['pid'] or '-':>8} {uptime:>8} {r['restarts']:>8}  {host:<24} {ports}")
    return 0


def plan(ctx: Any, spec: Any, names: list[str], hosts: dict) -> int:
    """Exit 3 (PENDING) when `up` would change anything, as the local plan."""
    from qemuspec.backends import libvirt_domain as ld
    from qemuspec.cli.main import PENDING

    steps = ld.plan(spec, ctx.target.path, _root(ctx), names, hosts)
    pending = any(step["action"] != "up to date" for step in steps)
    if ctx.out.json:
        emit_json(steps)
        return PENDING if pending else 0
    for step in steps:
        print(f"{step['name']}: {step['action']}")
        for change in step.get("changes", []):
            print(f"    {change['field']}: {change['old']} -> {change['new']}")
        for line in step["diff"][2:]:
            print(f"      {line}")
    if pending and not ctx.out.quiet:
        print(f"plan: changes pending (exit {PENDING}); `qemuspec up {ctx.target.path}` applies them", file=sys.stderr)
    return PENDING if pending else 0


def qmp(ctx: Any, spec: Any, hosts: dict, name: str, command: str, arguments: dict | None) -> int:
    from qemuspec.backends.libvirt_guest import Monitor

    result = Monitor(_domain(ctx, spec, name, hosts)).command(command, arguments)
    if isinstance(result, str) and not ctx.out.json:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        emit_json(result)
    return 0


def each(ctx: Any, spec: Any, hosts: dict, action: str, done: str) -> int:
    from qemuspec.backends.libvirt_conn import binding, message

    libvirt = binding()
    results = []
    for name in ctx.target.machines():
        dom = _domain(ctx, spec, name, hosts)
        try:
            dom.suspend() if action == "stop" else dom.resume()
        except libvirt.libvirtError as exc:
            raise QemuspecError(f"machine {name}: {message(exc)}") from None
        results.append({"name": name, "state": done})
    ctx.out.states(results)
    return 0


def agent(ctx: Any, spec: Any, name: str, hosts: dict, timeout: float = 30.0) -> Any:
    from qemuspec.backends.libvirt_guest import LibvirtAgent

    if not spec.machines[name].agent:
        raise QemuspecError(f"machine {name} has no guest-agent channel: add agent = true (and run qemu-guest-agent in the guest)")
    return LibvirtAgent(_domain(ctx, spec, name, hosts), timeout=timeout)


def ssh_argv(ctx: Any, spec: Any, hosts: dict, name: str, command: list[str]) -> list[str]:
    from qemuspec.backends import libvirt_domain as ld

    return ld.ssh_argv(hosts[name], name, spec.machines[name], _root(ctx), command, dom=_domain(ctx, spec, name, hosts))


def logs(ctx: Any, spec: Any, names: list[str], hosts: dict, follow: bool, lines: int) -> int:
    """The serial log libvirt keeps in the pool (downloaded, so remote hosts work); with --follow,
    the live console stream after it."""
    from qemuspec.backends import libvirt_storage as storage
    from qemuspec.backends.libvirt_conn import connect

    if not all(hosts[n] for n in names):
        raise UsageError("logs of machines on libvirt hosts and local machines at once: name one machine")
    prefix = len(names) > 1
    found = False
    for name in names:
        data = storage.download(connect(hosts[name]), f"{name}-serial.log")
        if data is None:
            continue
        found = True
        text = data.decode(errors="replace").replace("\r", "")
        text_lines = text.split("\n")
        if text_lines and text_lines[-1] == "":
            text_lines.pop()
        shown = text_lines[-lines:] if lines else text_lines
        for line in shown:
            if ctx.out.json:
                ctx.out.line({"machine": name, "line": line})
            else:
                print((f"{name} | " if prefix else "") + ctx.out.guest(line))
    if not follow:
        if not found:
            raise QemuspecError(f"no console log yet for {', '.join(names)}: start with `qemuspec up {ctx.target.path}`")
        return 0
    if len(names) != 1:
        raise UsageError("logs --follow of machines on libvirt hosts follows one machine: name it")
    return _stream(ctx, spec, names[0], hosts, interactive=False)


def console(ctx: Any, spec: Any, hosts: dict, name: str) -> int:
    return _stream(ctx, spec, name, hosts, interactive=True)


def _stream(ctx: Any, spec: Any, name: str, hosts: dict, interactive: bool) -> int:
    import select as select_mod

    from qemuspec.backends.libvirt_conn import connect
    from qemuspec.backends.libvirt_guest import Console
    from qemuspec.cli.vm_commands import DETACH

    dom = _domain(ctx, spec, name, hosts)
    out = sys.stdout.buffer

    def write(chunk: bytes) -> None:  # `logs -f`: the guest's bytes escaped on a terminal (the console is raw by nature)
        out.write(chunk if interactive else ctx.out.guest(chunk.replace(b"\r", b"").decode(errors="replace")).encode())
        out.flush()

    stream = Console(connect(hosts[name]), dom, force=interactive, on_data=write)
    stdin = sys.stdin.fileno()
    tty_mode = interactive and os.isatty(stdin)
    saved = None
    if tty_mode:
        import termios
        import tty

        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
        sys.stderr.write(f"connected to {name}'s console; detach with Ctrl-]\r\n")
    stdin_open = interactive
    try:
        while True:
            if stdin_open:
                ready, _, _ = select_mod.select([stdin], [], [], 0.5)
                if ready:
                    data = os.read(stdin, 4096)
                    if not data:
                        stdin_open = False
                    elif DETACH in data:
                        stream.send(data[: data.index(DETACH)])
                        return 0
                    else:
                        stream.send(data if not tty_mode else data.replace(b"\n", b"\r"))
                if stream.closed:
                    sys.stderr.write("\r\nthe console closed (the machine stopped)\r\n")
                    return 1
            elif stream.wait_closed(None if not interactive else 0.5):
                if interactive:
                    sys.stderr.write("\r\nthe console closed (the machine stopped)\r\n")
                return 1 if interactive else 0
            elif interactive:
                return 0  # input ended and the guest has gone quiet
    finally:
        stream.close()
        if saved is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            sys.stderr.write("\r\ndetached\n")
