"""Getting into guests and managing their disks: exec, cp, ssh, reset, snapshot."""

from __future__ import annotations

import base64
import os
import sys
from typing import Any

from qemuspec.cli import libvirt_commands
from qemuspec.cli.common import emit_json, load_file, select
from qemuspec.cli.vm_commands import _client, _machine, _root, _running
from qemuspec.errors import QemuspecError, UsageError


def _command(argv: list[str]) -> list[str]:
    argv = argv[1:] if argv and argv[0] == "--" else argv
    return argv


def _agent(args: Any, name: str):
    from qemuspec.runtime.agent import GuestAgent

    spec, _ = _machine(args, name)
    if (hosts := libvirt_commands.placed(args, spec, name)):  # libvirt backend
        return libvirt_commands.agent(args, spec, name, hosts)
    inst = _running(args, name)
    if not inst.machine.agent:
        raise QemuspecError(f"machine {name} has no guest-agent channel: add agent = true (and run qemu-guest-agent in the guest)")
    return GuestAgent(inst.layout.qga, timeout=30)


def exec_(args: Any) -> int:
    command = _command(args.argv)
    if not command:
        raise UsageError("exec needs a command: qemuspec exec NAME -- COMMAND [ARGS...]")
    with _agent(args, args.name) as agent:
        code, out, err = agent.exec(command, timeout=args.timeout)
    if args.json:
        emit_json({"exitcode": code, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
                   "stdout_b64": base64.b64encode(out).decode() if b"\0" in out else None})
        return 0
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.flush()
    return code if 0 <= code < 256 else 1


def _split(spec: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition(":")
    if sep and name and "/" not in name and path.startswith("/"):
        return name, path
    return None, spec


def cp(args: Any) -> int:
    src_machine, src = _split(args.source)
    dst_machine, dst = _split(args.target)
    if (src_machine is None) == (dst_machine is None):
        raise UsageError("cp copies between this host and one guest: write NAME:/path on exactly one side")
    if dst_machine:
        with open(src, "rb") as f:
            data = f.read()
        with _agent(args, dst_machine) as agent:
            agent.write_file(dst, data)
    else:
        with _agent(args, src_machine) as agent:
            data = agent.read_file(src)
        target = os.path.join(dst, os.path.basename(src)) if os.path.isdir(dst) else dst
        with open(target + ".qemuspec-tmp", "wb") as f:
            f.write(data)
        os.replace(target + ".qemuspec-tmp", target)
    if args.json:
        emit_json({"source": args.source, "target": args.target, "bytes": len(data)})
    return 0


def ssh(args: Any) -> int:
    from qemuspec.runtime import sshkeys

    spec, _ = _machine(args, args.name)
    if (hosts := libvirt_commands.placed(args, spec, args.name)):  # libvirt backend
        argv = libvirt_commands.ssh_argv(args, spec, hosts, _command(args.argv))
        sys.stdout.flush()
        os.execvp(argv[0], argv)
    inst = _running(args, args.name)
    key, _ = sshkeys.ensure_key(os.path.dirname(inst.state_dir))
    port = inst.host_port(inst.machine.ssh.port)
    argv = sshkeys.ssh_argv(key, inst.state_dir, inst.machine.ssh.user, port, _command(args.argv))
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise QemuspecError("ssh not found: install it (Debian: apt-get install openssh-client)") from None
    return 1


def reset(args: Any) -> int:
    from qemuspec.runtime.images import reset_overlay
    from qemuspec.runtime.instance import Instance

    spec = load_file(args)
    results = []
    for name in select(spec, args.names, args.file):
        if Instance.find(name, spec.machines[name], os.path.join(_root(args), name)) is not None:
            raise QemuspecError(f"machine {name} is running: `qemuspec down --machine {name}` first, then reset")
        disks = [d.file for d in spec.machines[name].disks if reset_overlay(d)]
        results.append({"name": name, "reset": disks})
    if args.json:
        emit_json(results)
    else:
        for r in results:
            print(f"{r['name']}: " + (f"fresh overlay{'s' if len(r['reset']) > 1 else ''} {', '.join(r['reset'])}" if r["reset"] else "no overlay disks"))
    return 0


def snapshot(args: Any) -> int:
    """VM snapshots (disks and memory, in the machine's qcow2 images) through the monitor."""
    if args.action != "list" and not args.tag:
        raise UsageError(f"snapshot {args.action} needs a TAG")
    command = {"save": f"savevm {args.tag}", "load": f"loadvm {args.tag}", "delete": f"delvm {args.tag}", "list": "info snapshots"}[args.action]
    with _client(_running(args, args.name)) as client:
        out = client.command("human-monitor-command", {"command-line": command}, timeout=600)
    if args.action != "list" and out.strip():
        raise QemuspecError(f"snapshot {args.action} {args.tag} on {args.name}: {out.strip()}")
    if args.action == "list":
        tags = [line.split()[1] for line in out.splitlines() if len(line.split()) > 1 and (line.split()[0].isdigit() or line.split()[0] == "--")]
        if args.json:
            emit_json(tags)
        else:
            print(out.rstrip() if out.strip() else "no snapshots")
    elif args.json:
        emit_json({"name": args.name, "action": args.action, "tag": args.tag})
    else:
        print(f"{args.name}: snapshot {args.tag} {args.action}d" if args.action != "save" else f"{args.name}: snapshot {args.tag} saved")
    return 0
