"""Getting into guests and managing their disks: exec, cp, ssh, reset, snapshot."""

from __future__ import annotations

import base64
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

from qemuspec.cli.common import Context, emit_json
from qemuspec.cli.vm_commands import _machine, monitor, refuse
from qemuspec.errors import QemuspecError, QMPConnectionError, UsageError

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent


def agent_for(ctx: Context, name: str, timeout: float = 30.0) -> "GuestAgent":
    """A guest-agent session through the machine's backend, or an error that says why not: no channel,
    machine paused, agent silent."""
    backend, machine = _machine(ctx, name)
    if not machine.agent:
        raise QemuspecError(
            f"machine {name} has no guest-agent channel: add agent = true to [machines.{name}] "
            "(and run qemu-guest-agent in the guest), or use `qemuspec ssh`"
        )
    return backend.agent(name, machine, timeout)


SHELLS = {"sh", "bash", "ash", "dash", "zsh", "ksh", "fish", "csh", "tcsh", "busybox"}


def exec_(ctx: Context, *, timeout: float, tty: bool = False) -> int:
    """Run a command in the guest through its agent, its output streamed as it comes. Standard input,
    when not a terminal, is passed to it (through a file in the guest: any size the guest's /tmp
    holds). Exit: the command's code; 127 for a command the guest does not have; 124 when
    ``--timeout`` passes (the command is killed). ``-t``: a terminal, through ssh."""
    command = ctx.tail or []
    if not command:
        raise UsageError(
            "exec needs a command: qemuspec exec [FILE] [MACHINE] -- COMMAND [ARGS...]"
        )
    name = ctx.target.machine()
    terminal = sys.stdin is not None and sys.stdin.isatty()
    if tty:
        return _exec_tty(ctx, name, command)
    if terminal and len(command) == 1 and os.path.basename(command[0]) in SHELLS:
        raise UsageError(
            f"exec runs `{command[0]}` without a terminal, so an interactive shell would only wait: "
            f"for a shell use `qemuspec ssh {ctx.target.path} {name}` (or `qemuspec console`), "
            "or `qemuspec exec -t` for a terminal through ssh"
        )
    stdin = None if sys.stdin is None or terminal else sys.stdin.buffer
    from qemuspec.runtime.guestrun import TIMED_OUT, streamed

    captured: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def on_output(stream: str, data: bytes) -> None:
        if ctx.out.json:
            captured[stream].append(data)
            return
        sink = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        sink.write(data)
        sink.flush()

    with agent_for(ctx, name) as agent:
        try:
            code = streamed(agent, command, on_output, stdin, time.monotonic() + timeout, kill=True)
        except QMPConnectionError as exc:
            from qemuspec.errors import GuestGone

            raise GuestGone(
                f"machine {name}: the guest went away before `{shlex.join(command)}` finished ({exc}): "
                "it powered off or rebooted, or its qemu exited; `qemuspec status` says whether it was "
                "started again (exit 255: the command's own exit code is unknown)"
            ) from None
    if code == TIMED_OUT:
        print(
            f"qemuspec exec: `{shlex.join(command)}` still ran after {timeout:g} s: killed in the "
            f"guest (exit {TIMED_OUT}; a longer --timeout lets it finish)",
            file=sys.stderr,
        )
    if ctx.out.json:
        out, err = b"".join(captured["stdout"]), b"".join(captured["stderr"])
        emit_json(
            {
                "machine": name,
                "exitcode": code,
                "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
                "stdout_b64": base64.b64encode(out).decode() if b"\0" in out else None,
            }
        )
        return 0
    return code if 0 <= code < 256 else 1


def _exec_tty(ctx: Context, name: str, command: list[str]) -> int:
    """``exec -t``: the agent has no terminal, so the command runs through ssh with one (``ssh -t``)."""
    backend, machine = _machine(ctx, name)
    try:
        reach = backend.ssh(name, machine, command)
    except QemuspecError as exc:
        raise QemuspecError(
            f"exec -t runs the command through ssh, and machine {name} cannot be reached that way "
            f"({exc}); without -t, exec runs it through the guest agent with no terminal"
        ) from None
    argv = list(reach["argv"])
    argv.insert(1, "-t")
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise QemuspecError(
            "ssh not found: install it (Debian: apt-get install openssh-client)"
        ) from None
    return 1


def split_guest_path(spec: str) -> tuple[str | None, str]:
    """``NAME:/path`` (or ``:/path`` for the only machine) -> (NAME or "", /path); a local path -> (None, path)."""
    name, sep, path = spec.partition(":")
    if sep and "/" not in name and path.startswith("/"):
        return name, path
    return None, spec


def cp(ctx: Context, *, recursive: bool, dereference: bool = False, via: str = "auto") -> int:
    """``cp [FILE] SOURCE TARGET``: one side is NAME:/guest/path. Streams in fixed-size chunks, so
    memory stays flat whatever the file size; keeps modes; -r for directories (host symlinks stay
    symlinks unless -L). ``--via ssh`` (auto: when the machine has no agent) streams a file over
    ssh instead of the agent."""
    from qemuspec.guestfiles import copy_from_guest, copy_to_guest

    target = ctx.target
    if len(target.rest) != 2:
        raise UsageError(
            "cp takes a SOURCE and a TARGET: qemuspec cp [FILE] ./local NAME:/guest/path (or the reverse)"
        )
    source, dest = target.rest
    src_machine, src = split_guest_path(source)
    dst_machine, dst = split_guest_path(dest)
    if (src_machine is None) == (dst_machine is None):
        raise UsageError(
            "cp copies between this host and one guest: write NAME:/path (or :/path) on exactly one side"
        )
    name = target.machine(
        (src_machine if src_machine is not None else dst_machine) or None, operands=False
    )
    show = None if (ctx.out.json or ctx.out.quiet or not sys.stderr.isatty()) else _bar()
    if _cp_via(ctx, name, via, recursive) == "ssh":
        from qemuspec import sshfiles

        ssh = _ssh_argv(ctx, name)
        if dst_machine is not None:
            copied = sshfiles.copy_to_guest(ssh, src, dst, progress=show)
        else:
            copied = sshfiles.copy_from_guest(ssh, src, dst, progress=show)
        return _copied(ctx, source, dest, copied)
    with agent_for(ctx, name) as agent:
        if dst_machine is not None:
            if os.path.isdir(src) and not recursive:
                raise UsageError(f"{src} is a directory: add -r to copy it")
            copied = copy_to_guest(
                agent, src, dst, recursive=recursive, progress=show, dereference=dereference
            )
        else:
            copied = copy_from_guest(agent, src, dst, recursive=recursive, progress=show)
    return _copied(ctx, source, dest, copied)


def _cp_via(ctx: Context, name: str, via: str, recursive: bool) -> str:
    """agent or ssh: as asked; auto takes the agent when the machine has one, else ssh."""
    _, machine = _machine(ctx, name)
    if via == "auto":
        via = "agent" if machine.agent else "ssh"
    if via == "ssh" and recursive:
        raise UsageError(
            "cp -r copies through the guest agent (it checks every name the guest lists): "
            "leave out --via ssh, or copy one file at a time over ssh"
        )
    return via


def _ssh_argv(ctx: Context, name: str) -> list[str]:
    """What `qemuspec ssh` runs, up to the destination, never asking for a password."""
    backend, machine = _machine(ctx, name)
    argv = list(backend.ssh(name, machine, [])["argv"])
    return [argv[0], "-o", "BatchMode=yes", *argv[1:]]


def _copied(ctx: Context, source: str, dest: str, copied: list[dict]) -> int:
    total = sum(c["bytes"] for c in copied)
    if ctx.out.json:
        emit_json({"source": source, "target": dest, "bytes": total, "files": copied})
    else:
        ctx.out.say(f"copied {len(copied)} file{'s' if len(copied) != 1 else ''}, {total} bytes")
    return 0


def _bar():
    """Progress for large files on a terminal: bytes done, total, rate."""
    import time

    began = time.monotonic()

    def show(path: str, done: int, total: int | None) -> None:
        rate = done / max(time.monotonic() - began, 1e-3) / 2**20
        size = f"/{total / 2**20:.0f}" if total else ""
        sys.stderr.write(
            f"\r\x1b[2K{os.path.basename(path)}: {done / 2**20:.0f}{size} MiB ({rate:.1f} MiB/s)"
        )
        if total is not None and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


# ssh(1)'s options that take a value (its getopt string), so `-L 8080:localhost:80` stays one option
SSH_VALUE_OPTIONS = set("BbcDEeFIiJLlmOoPpQRSWw")


def split_ssh_options(words: list[str]) -> tuple[list[str], list[str]]:
    """What follows ``--``, as ssh reads it: its options first (``-L 8080:localhost:80``, ``-o X=y``,
    ``-A``), then the remote command. ``--`` ends the options, as for ssh."""
    options: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--":
            return options, words[index + 1 :]
        if not word.startswith("-") or word == "-":
            break
        options.append(word)
        index += 1
        # -L8080:x:80 carries its value; -L alone takes the next word; in -tL, the L takes it
        letters = word[1:]
        for at, letter in enumerate(letters):
            if letter in SSH_VALUE_OPTIONS:
                if at == len(letters) - 1 and index < len(words):
                    options.append(words[index])
                    index += 1
                break
    return options, words[index:]


def ssh(ctx: Context) -> int:
    """``ssh [FILE] [MACHINE] [-- [SSH OPTIONS] [COMMAND...]]``: ssh options after ``--`` go to ssh
    (``-- -L 8080:localhost:80``), the rest is the remote command."""
    name = ctx.target.machine()
    backend, machine = _machine(ctx, name)
    options, command = split_ssh_options(list(ctx.tail or []))
    reach = backend.ssh(name, machine, command)
    reach["argv"] = [reach["argv"][0], *options, *reach["argv"][1:]]
    if ctx.out.json:  # nothing to run interactively: say how to reach the guest
        emit_json(reach)
        return 0
    sys.stdout.flush()
    try:
        os.execvp(reach["argv"][0], reach["argv"])
    except FileNotFoundError:
        raise QemuspecError(
            "ssh not found: install it (Debian: apt-get install openssh-client)"
        ) from None
    return 1


def ssh_config(ctx: Context) -> int:
    """``ssh-config [FILE] [MACHINE...]``: an OpenSSH ``Host`` block per running machine (as
    ``vagrant ssh-config``), for ``ssh -F``, an ``Include``, scp, rsync or an editor's remote mode."""
    target = ctx.target
    blocks = []
    for name in target.machines():
        backend, machine = _machine(ctx, name)
        blocks.append(ssh_block(name, backend.ssh(name, machine, [])))
    if ctx.out.json:
        emit_json(blocks)
        return 0
    for block in blocks:
        print(block["text"])
    return 0


def ssh_block(name: str, reach: dict) -> dict:
    """One ``Host`` block from what ``ssh`` would run: its -i, -p and -o options, user and host."""
    argv = list(reach["argv"])
    if "--" in argv:
        argv = argv[: argv.index("--")]
    user, _, host = argv[-1].rpartition("@")
    settings: list[tuple[str, str]] = [("HostName", host), ("User", user)]
    words = iter(argv[1:-1])
    for word in words:
        if word == "-i":
            settings.append(("IdentityFile", next(words)))
        elif word == "-p":
            settings.append(("Port", next(words)))
        elif word == "-o":
            key, _, value = next(words).partition("=")
            settings.append((key, value))
        elif word == "-J":
            settings.append(("ProxyJump", next(words)))
    text = "\n".join([f"Host {name}"] + [f"  {key} {_quoted(value)}" for key, value in settings])
    return {"machine": name, "text": text, **{key: value for key, value in settings}}


def _quoted(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def reset(ctx: Context) -> int:
    from qemuspec.runtime.images import reset_overlays
    from qemuspec.runtime.instance import Instance

    target = ctx.target
    spec = target.spec
    refuse(ctx, target.machines(), "reset")
    results = []
    for name in target.machines():
        if Instance.find(name, spec.machines[name], target.state_dir(name)) is not None:
            raise QemuspecError(
                f"machine {name} is running: `qemuspec down {target.path} {name}` first, then reset"
            )
        disks = reset_overlays(
            spec.machines[name].disks, target.state_dir(name), f"{target.path}: machines.{name}"
        )
        results.append({"name": name, "reset": disks})
    if ctx.out.json:
        emit_json(results)
    else:
        for r in results:
            ctx.out.say(
                f"{r['name']}: "
                + (
                    f"fresh overlay{'s' if len(r['reset']) > 1 else ''} {', '.join(r['reset'])}"
                    if r["reset"]
                    else "no overlay disks"
                )
            )
    return 0


def snapshot(ctx: Context, *, action: str) -> int:
    """``snapshot ACTION [FILE] [MACHINE] [TAG]``: VM snapshots (disks and memory) of a running machine."""
    from qemuspec.api import snapshot as vm_snapshot

    target = ctx.target
    rest = list(target.rest)
    tag: str | None = None
    if action == "list":
        name = target.machine()
    else:
        if not rest:
            raise UsageError(
                f"snapshot {action} needs a TAG: qemuspec snapshot {action} [FILE] [MACHINE] TAG"
            )
        tag = rest.pop()
        if len(rest) > 1:
            raise UsageError(
                f"snapshot {action} takes [MACHINE] TAG, got {', '.join(rest + [tag])}"
            )
        name = target.machine(rest[0] if rest else None, operands=False)
    refuse(ctx, [name], "snapshot")
    with monitor(ctx, name) as client:
        tags = vm_snapshot(client, action, tag)
    if action == "list":
        if ctx.out.json:
            emit_json(tags)
        else:
            print("\n".join(tags) if tags else "no snapshots")
    elif ctx.out.json:
        emit_json({"name": name, "action": action, "tag": tag})
    else:
        ctx.out.say(
            f"{name}: snapshot {tag} {dict(save='saved', load='loaded', delete='deleted')[action]}"
        )
    return 0


def provision(ctx: Context) -> int:
    """``provision [FILE] [MACHINE...]``: run the provision steps again on running machines."""
    from qemuspec.cli.provision_command import run_steps
    from qemuspec.cli.vm_commands import _readopt
    from qemuspec.runtime.instance import Instance

    def _running(ctx: Context, name: str) -> Instance:
        refuse(ctx, [name], "provision")
        inst = Instance.find(name, ctx.target.spec.machines[name], ctx.target.state_dir(name))
        if inst is None:
            raise QemuspecError(
                f"machine {name} is not running: start it with `qemuspec up {ctx.target.path}`"
            )
        _readopt(ctx, [name])
        return inst

    target = ctx.target
    names = [n for n in target.machines() if target.spec.machines[n].provision]
    if not names:
        raise QemuspecError(
            f'{target.path}: no machine named has provision steps: add provision = ["COMMAND", ...] '
            '(or provision = { script = "path" }) to the machine'
        )
    results = []
    for name in names:
        seconds = run_steps(ctx, _running(ctx, name))
        results.append({"name": name, "provisioned": True, "seconds": round(seconds, 3)})
        ctx.out.say(f"{name}: provisioned in {seconds:.1f} s")
    if ctx.out.json:
        ctx.out.data(results)
    return 0
