"""Commands that act on running machines: up, down, status, plan, logs, events, console, qmp,
pause, resume, restart."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

from qemuspec.cli.common import emit_json, load_file, select
from qemuspec.errors import QemuspecError, UsageError

DETACH = b"\x1d"  # Ctrl-]


def _root(args: Any) -> str:
    from qemuspec.runtime import paths

    return paths.state_root(args.file, args.state_dir)


def _progress(args: Any, names: list[str]):
    from qemuspec.cli.progress import Progress

    return Progress(names, enabled=not args.json)


def _print_outcomes(args: Any, outcomes: list) -> None:
    if args.json:
        emit_json([o.as_dict() for o in outcomes])
        return
    for o in outcomes:
        if o.action == "failed":
            continue
        ports = ", ".join(f"{p['address']}:{p['host']}->{p['guest']}/{p['protocol']}" for p in o.ports)
        extra = [f"pid {o.pid}"] if o.pid else []
        extra += [ports] if ports else []
        extra += [f"qemu {o.qemu}"] if getattr(o, "qemu", "") and o.action in ("started", "recreated") else []
        extra += [o.detail] if o.detail else []
        print(f"{o.name}: {o.action}{' (' + ', '.join(extra) + ')' if extra else ''}")
    for o in outcomes:
        if o.action == "failed":
            print(f"error: {o.detail}", file=sys.stderr)


def up(args: Any) -> int:
    from qemuspec import reconcile

    spec, lines = load_file(args, with_lines=True)
    names = select(spec, args.machine, args.file)
    from qemuspec.cli.common import preflight

    preflight(spec, lines, args.file, reconcile.needed(spec, names), args, ports=True)
    if not args.no_probe:
        from qemuspec.cli.common import check_against_qemu

        check_against_qemu(spec, lines, args.file, reconcile.needed(spec, names))
    outcomes = reconcile.up(spec, _root(args), names, _progress(args, names))
    _print_outcomes(args, outcomes)
    if any(o.action == "failed" for o in outcomes):
        return 1
    if args.attach:
        return _attach(args, spec, names)
    return 0


def _attach(args: Any, spec: Any, names: list[str]) -> int:
    """Stream every machine's console and events until Ctrl-C, then bring the machines down."""
    from qemuspec import reconcile

    root = _root(args)
    sources = []
    for name in names:
        sources.append((f"{name} | ", os.path.join(root, name, "serial.log"), True))
        sources.append((f"{name} * ", os.path.join(root, name, "events.jsonl"), True))
    print("attached: Ctrl-C stops the machines", file=sys.stderr)
    try:
        _follow(sources, follow=True)
    except KeyboardInterrupt:
        pass
    print("\nstopping...", file=sys.stderr)
    _print_outcomes(args, reconcile.down(spec, root, names, None, _progress(args, names)))
    return 0


def down(args: Any) -> int:
    from qemuspec import reconcile

    spec = load_file(args)
    names = select(spec, args.machine, args.file)
    root = _root(args)
    outcomes = reconcile.down(spec, root, names, args.timeout, _progress(args, names))
    if args.purge:
        for name in names:
            for disk in spec.machines[name].disks:
                if (disk.size is not None or disk.backing) and os.path.exists(disk.file):
                    os.unlink(disk.file)  # only images qemuspec creates; user-supplied ones stay
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
    _print_outcomes(args, outcomes)
    return 0


def status(args: Any) -> int:
    from qemuspec.runtime.status import machine_status

    spec = load_file(args)
    root = _root(args)
    rows = [machine_status(name, spec.machines[name], os.path.join(root, name)) for name in select(spec, args.machine, args.file)]
    if args.json:
        emit_json(rows)
        return 0
    print(f"{'NAME':<16} {'STATE':<13} {'PID':>8} {'UPTIME':>8} {'RESTARTS':>8}  PORTS")
    for r in rows:
        ports = " ".join(f"{p['host']}->{p['guest']}" for p in r["ports"])
        uptime = f"{r['uptime']:.0f}s" if r["uptime"] is not None else "-"
        print(f"{r['name']:<16} {r['state']:<13} {r['pid'] or '-':>8} {uptime:>8} {r['restarts']:>8}  {ports}")
    return 0


def plan(args: Any) -> int:
    from qemuspec import reconcile

    spec = load_file(args)
    steps = reconcile.plan(spec, _root(args), select(spec, args.machine, args.file))
    if args.json:
        emit_json(steps)
        return 0
    for step in steps:
        print(f"{step['name']}: {step['action']}")
        for line in step["diff"][2:]:
            print(f"    {line}")
    return 0


def _machine(args: Any, name: str) -> tuple[Any, str]:
    spec = load_file(args)
    select(spec, name, args.file)
    return spec, os.path.join(_root(args), name)


def _running(args: Any, name: str):
    from qemuspec.runtime.instance import Instance

    spec, state_dir = _machine(args, name)
    inst = Instance.find(name, spec.machines[name], state_dir)
    if inst is None:
        raise QemuspecError(f"machine {name} is not running: start it with `qemuspec up {args.file}`")
    return inst


def _client(inst: Any):
    """A connection on the client monitor, which stays free while the supervisor holds the main one."""
    from qemuspec.qmp.sync import QMPClient

    return QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=5)


def qmp(args: Any) -> int:
    arguments = None
    if args.arguments:
        try:
            arguments = json.loads(args.arguments)
        except ValueError as exc:
            raise UsageError(f"arguments must be a JSON object, for example '{{\"device\": \"disk0\"}}': {exc}") from None
        if not isinstance(arguments, dict):
            raise UsageError("arguments must be a JSON object, for example '{\"device\": \"disk0\"}'")
    with _client(_running(args, args.name)) as client:
        result = client.command(args.qmp_command, arguments)
    if isinstance(result, str) and not args.json:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    else:
        emit_json(result)
    return 0


def _each(args: Any, command: str, done: str) -> int:
    results = []
    for name in args.names:
        with _client(_running(args, name)) as client:
            client.command(command)
            results.append({"name": name, "state": done})
    if args.json:
        emit_json(results)
    else:
        for r in results:
            print(f"{r['name']}: {r['state']}")
    return 0


def pause(args: Any) -> int:
    return _each(args, "stop", "paused")


def resume(args: Any) -> int:
    return _each(args, "cont", "running")


def restart(args: Any) -> int:
    from qemuspec import reconcile

    spec = load_file(args)
    names = select(spec, args.names, args.file)
    root = _root(args)
    progress = _progress(args, names)
    reconcile.down(spec, root, names, None, progress)
    outcomes = reconcile.up(spec, root, names, progress)
    _print_outcomes(args, outcomes)
    return 1 if any(o.action == "failed" for o in outcomes) else 0


def logs(args: Any) -> int:
    spec = load_file(args)
    names = select(spec, args.name, args.file) if args.name else list(spec.machines)
    root = _root(args)
    filename = "events.jsonl" if args.events else "serial.log"
    sources = [((f"{n} | " if len(names) > 1 else ""), os.path.join(root, n, filename), False) for n in names]
    if not args.follow and not any(os.path.exists(path) for _, path, _ in sources):
        raise QemuspecError(f"no {'events' if args.events else 'console log'} yet for {', '.join(names)}: start with `qemuspec up {args.file}`")
    _follow(sources, follow=args.follow, last=args.lines)
    return 0


def events(args: Any) -> int:
    _, state_dir = _machine(args, args.name)
    path = os.path.join(state_dir, "events.jsonl")
    if not args.follow and not os.path.exists(path):
        raise QemuspecError(f"machine {args.name} has no events yet")
    _follow([("", path, False)], follow=args.follow)
    return 0


def _follow(sources: list[tuple[str, str, bool]], follow: bool, last: int = 0) -> None:
    """Print files line by line with a prefix; with ``follow``, keep printing what is appended.
    (A log file has no change notification short of inotify; a 0.1 s re-read is what tail -f does.)"""
    offsets: dict[str, int] = {}
    partial: dict[str, str] = {}
    for prefix, path, from_end in sources:
        offsets[path] = os.path.getsize(path) if (from_end and os.path.exists(path)) else 0
        partial[path] = ""
        if last and os.path.exists(path):
            from qemuspec.runtime.console import tail

            text = tail(path, last)
            for line in text.split("\n") if text else []:
                print(prefix + line)
            offsets[path] = os.path.getsize(path)
    while True:
        for prefix, path, _ in sources:
            try:
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            offsets[path] += len(data)
            text = partial[path] + data.decode(errors="replace").replace("\r", "")
            *lines, partial[path] = text.split("\n")
            for line in lines:
                sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()
        if not follow:
            for prefix, path, _ in sources:
                if partial[path]:
                    sys.stdout.write(prefix + partial[path] + "\n")
            return
        time.sleep(0.1)


def console(args: Any) -> int:
    """Interactive serial console. Ctrl-] detaches; the machine keeps running."""
    import select as select_mod
    import socket

    inst = _running(args, args.name)
    if not os.path.exists(inst.layout.console):
        raise QemuspecError(f"machine {args.name} has no console socket: set serial = \"log\" or \"socket\"")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(inst.layout.console)
    stdin = sys.stdin.fileno()
    interactive = os.isatty(stdin)
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
        sys.stderr.write(f"connected to {args.name}'s console; detach with Ctrl-]\r\n")
    out = sys.stdout.buffer
    stdin_open = True
    try:
        while True:
            watch = [sock] + ([stdin] if stdin_open else [])
            ready, _, _ = select_mod.select(watch, [], [], None if stdin_open else 0.5)
            if not ready:
                return 0  # input ended and the guest has gone quiet
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    sys.stderr.write("\r\nthe console closed (the machine stopped)\r\n")
                    return 1
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
            sys.stderr.write("\r\ndetached\n")
        sock.close()
