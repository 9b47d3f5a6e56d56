"""`qemuspec run [FILE] [MACHINE] -- COMMAND...`: the one-command test flow.

Boot the machine on throwaway overlays (its own disks are never written), wait until it is ready,
run the command in the guest (agent or ssh), stream its output, tear everything down, and exit with
the command's exit code. Ctrl-C, SIGTERM (a CI timeout) and SIGHUP tear down the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from types import FrameType
from typing import TYPE_CHECKING, Callable

from qemuspec.cli.common import Context
from qemuspec.errors import GuestCrashed, QemuspecError, UsageError

if TYPE_CHECKING:
    from qemuspec.cli.progress import Progress
    from qemuspec.spec.models import Machine


class Stopped(BaseException):
    """A termination signal arrived: unwind through every ``finally`` and tear down."""

    def __init__(self, signum: int):
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def _reachable(machine: Machine, name: str, via: str, source: str, lines: dict) -> None:
    """`run` needs a way into the guest: the agent channel, or a user-mode forward to its ssh port. Said
    before anything boots, not after the guest is up."""
    ssh = any(
        n.type == "user" and any(f.guest == machine.ssh.port for f in n.forwards)
        for n in machine.nics
    )
    if via == "agent" and not machine.agent:
        why = "--via agent needs the guest-agent channel: add agent = true (the guest runs qemu-guest-agent)"
    elif via == "ssh" and not ssh:
        why = (
            f"--via ssh needs a user NIC with a forward to the guest's ssh port {machine.ssh.port}: add "
            f"forwards = [{{ host = 0, guest = {machine.ssh.port} }}] (the guest runs an ssh server)"
        )
    elif via == "auto" and not (machine.agent or ssh):
        why = (
            f"run cannot reach machine {name}: it has no guest agent and no forward to its ssh port "
            f"{machine.ssh.port}: add agent = true (the guest runs qemu-guest-agent), or a user NIC with "
            f"forwards = [{{ host = 0, guest = {machine.ssh.port} }}] (the guest runs an ssh server)"
        )
    else:
        return
    from qemuspec.errors import SpecError
    from qemuspec.spec.messages import located

    raise SpecError(located(source, lines, [(("machines", name), why)]))


def _live_line(
    ctx: Context, name: str, machine: Machine, timeout: float | None, workdir: str
) -> tuple[Callable[[str], None], Progress]:
    """`run`'s progress as `up`'s: the live line (probe, clock, last console line) on a terminal, a
    line per probe and a heartbeat elsewhere; "ready in" stays on stderr (stdout is the command's)."""
    from qemuspec.cli.progress import done
    from qemuspec.runtime import statedir

    out = ctx.out
    deadline = timeout if timeout is not None else machine.ready.timeout
    log = os.path.join(workdir, name, statedir.SERIAL_LOG)
    progress = out.progress([name], deadline, {name: log})

    def report(message: str) -> None:
        status = message.removeprefix(f"{name}: ")
        if not done(status):
            progress(name, status)
            return
        progress.close()  # the live line goes before the command's output begins
        if not (out.json or out.quiet):
            print(message, file=sys.stderr, flush=True)

    return report, progress


def run(
    ctx: Context,
    *,
    timeout: float | None,
    via: str,
    allow_local_qemu: bool = False,
    allow_host_paths: bool = False,
    fail_on: str = "panic",
    vmcore: str | None = None,
) -> int:
    command = ctx.tail or []
    if not command:
        raise UsageError(
            "run needs a command after --: qemuspec run [FILE] [MACHINE] -- COMMAND [ARGS...]"
        )
    target = ctx.target
    name = target.machine()
    machine = target.spec.machines[name]
    if machine.depends_on:
        raise UsageError(
            f"machine {name} depends on {', '.join(machine.depends_on)}: run boots one machine; use `qemuspec up` for a group"
        )
    from qemuspec.cli.common import preflight

    spec, lines = (
        target.load()
    )  # the same checks as `up`: the local-qemu rule, host paths outside the tree
    preflight(
        spec,
        lines,
        target.path,
        [name],
        allow_local_qemu=allow_local_qemu,
        settings=ctx.settings,
        allow_host_paths=allow_host_paths,
        out=ctx.out,
    )
    _reachable(machine, name, via, target.path, lines)
    from qemuspec.cli.img_commands import ensure_images

    ensure_images(
        ctx, spec, [name]
    )  # base images cached and checked before qemu starts (the probe's too)
    from qemuspec.cli.common import check_against_qemu

    check_against_qemu(
        spec, lines, target.path, [name]
    )  # as `up` does: qemu supports it, KVM works if demanded
    writable = [d.file for d in machine.disks if not d.readonly and os.path.exists(d.file)]
    if writable:
        from qemuspec.runtime.instance import Instance

        if Instance.find(name, machine, target.state_dir(name)) is not None:
            raise QemuspecError(
                f"machine {name} is running (`qemuspec up`), and qemu holds its disk {writable[0]} for writing: "
                f"`qemuspec down {target.path} {name}` first, or use `qemuspec exec` on the running machine"
            )
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    out = ctx.out

    def on_output(stream: str, data: bytes) -> None:
        if out.json:
            out.line({"stream": stream, "data": data.decode(errors="replace")})
            return
        sink = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        sink.write(data)
        sink.flush()

    warned: list[dict] = []  # kernel warnings that did not fail the run, said after it
    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    workdir = tempfile.mkdtemp(prefix="qemuspec-run-")
    started: dict[str, object] = {}
    report, progress = _live_line(ctx, name, machine, timeout, workdir)
    try:
        code = _on_fresh_machine(
            ctx,
            name,
            command,
            workdir,
            on_output,
            via,
            timeout,
            report,
            stdin,
            started,
            fail_on=fail_on,
            vmcore=vmcore,
            on_warning=warned.append,
        )
    except GuestCrashed as crashed:
        return crash_report(ctx, crashed)
    except Stopped as stop:
        print(
            f"qemuspec run: {signal.Signals(stop.signum).name}: the machine is stopped and its files removed",
            file=sys.stderr,
        )
        return 128 + stop.signum
    finally:
        progress.close()
        # signals stay on a raising handler until the directory is gone, so a second one cannot cut this short
        from qemuspec.runtime.statedir import disown

        disown(os.path.join(workdir, name))
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for entry in warned:  # after the live line has gone: plain lines on stderr
        if not out.json:
            print(crash_warning(name, entry), file=sys.stderr, flush=True)
    if out.json:
        out.line({"machine": name, "exitcode": code, **started, "warnings": warned})
    return code


def _on_fresh_machine(
    ctx: Context,
    name: str,
    command: list[str],
    workdir: str,
    on_output: Callable[[str, bytes], object],
    via: str,
    timeout: float | None,
    report: Callable[[str], object],
    stdin: bytes | None,
    started: dict[str, object],
    *,
    fail_on: str = "panic",
    vmcore: str | None = None,
    on_warning: Callable[[dict], object] | None = None,
) -> int:
    """The command on a fresh machine in ``workdir``: a restore of its checkpoint when the machine is
    warm (runtime/fresh.py: made by this run when none fits, the reason said), else a cold boot on
    throwaway disks. ``started`` gets how it started (boot, and why not warm or which checkpoint).
    Crash-aware (runtime/crash.py): a guest kernel crash raises GuestCrashed with the report at once
    (``vmcore``: a core first), a panic before ready too; warnings go to ``on_warning``."""
    from qemuspec.runtime import crash, fresh, guestrun

    target = ctx.target
    how = via if via != "auto" else ("agent" if target.spec.machines[name].agent else "ssh")

    def setup_output(stream: str, data: bytes) -> None:
        report(f"{name}: setup: {data.decode(errors='replace').rstrip()}")

    with (
        crash.before_ready(name),
        fresh.started(
            target.path,
            name,
            ctx.settings,
            spec=target.spec,
            root=workdir,
            ready_timeout=timeout,
            report=report,
            prepare=lambda instance: setattr(
                instance, "on_probe", lambda probe: report(f"{name}: waiting for {probe}")
            ),
            on_setup_output=setup_output,
        ) as instance,
    ):
        started["boot"] = instance.boot
        started.update(instance.restored or {})
        if instance.ports and not (ctx.out.json or ctx.out.quiet):
            # fixed forwards were mapped to free ports (fresh.free_forwards): a plain stderr line, the
            # live line having gone at "ready"
            print(
                f"{name}: ports "
                + ", ".join(f"{p['host']}->{p['guest']}/{p['protocol']}" for p in instance.ports),
                file=sys.stderr,
                flush=True,
            )
        with crash.Watch(instance, fail_on, vmcore, on_warning) as watch:
            return watch.call(guestrun.run, instance, command, on_output, stdin, how=how)


def crash_report(ctx: Context, crashed: GuestCrashed) -> int:
    """A guest kernel crash ended the run: the report as text on stderr (escaped on a terminal) and,
    with --json, as one object on stdout; the crash's own exit code. Shared with `qemuspec test`."""
    from qemuspec.cli.common import GUEST_CRASHED, escaping, printable
    from qemuspec.runtime.crash import text

    body = text(crashed.report)
    print(
        f"error: {printable(body) if escaping(sys.stderr, False) else body}",
        file=sys.stderr,
        flush=True,
    )
    if ctx.out.json:
        ctx.out.line(
            {
                "machine": crashed.report.get("machine"),
                "exitcode": GUEST_CRASHED,
                "crash": crashed.report,
            }
        )
    return GUEST_CRASHED


def crash_warning(machine: str, entry: dict) -> str:
    from qemuspec.runtime.crash import warning_text

    return "warning: " + warning_text(machine, entry)
