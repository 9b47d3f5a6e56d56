"""`qemuspec provision` and the provisioning `up` does once its machines are ready (runtime/provision.py)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from qemuspec.cli.common import Context
from qemuspec.errors import QemuspecError

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance
    from qemuspec.spec.models import File

READY = ("started", "recreated", "adopted", "up to date")


def _stream(ctx: Context) -> Any:
    """Guest output as it comes, on our stdout/stderr (escaped on a terminal); kept back with --json/--quiet,
    where only a failure shows it (in its error)."""
    def write(stream: str, data: bytes) -> None:
        if ctx.out.json or ctx.out.quiet:
            return
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.flush()
        text = ctx.out.guest(data.decode(errors="replace"), out)
        out.buffer.write(text.encode())
        out.buffer.flush()

    return write


def _run(ctx: Context, inst: Instance) -> float:
    from qemuspec.runtime import provision

    return provision.run(inst, _stream(ctx), ctx.out.say)


def after_up(ctx: Context, spec: File, outcomes: list) -> None:
    """Provision every ready machine whose current life has not been (a plain `up` repeats nothing)."""
    from qemuspec.runtime import provision
    from qemuspec.runtime.instance import Instance

    for outcome in outcomes:
        machine = spec.machines.get(outcome.name)
        if outcome.action not in READY or machine is None or not machine.provision:
            continue
        inst = Instance.find(outcome.name, machine, ctx.target.state_dir(outcome.name))
        if inst is None or provision.done(inst):
            continue
        seconds = _run(ctx, inst)
        ctx.out.say(f"{outcome.name}: provisioned in {seconds:.1f} s")


def provision(ctx: Context) -> int:
    """``provision [FILE] [MACHINE...]``: run the provision steps again on running machines."""
    from qemuspec.cli.vm_commands import _readopt, refuse
    from qemuspec.runtime.instance import Instance

    def _running(ctx: Context, name: str) -> Instance:
        refuse(ctx, [name], "provision")
        inst = Instance.find(name, ctx.target.spec.machines[name], ctx.target.state_dir(name))
        if inst is None:
            raise QemuspecError(f"machine {name} is not running: start it with `qemuspec up {ctx.target.path}`")
        _readopt(ctx, [name])
        return inst

    target = ctx.target
    names = [n for n in target.machines() if target.spec.machines[n].provision]
    if not names:
        raise QemuspecError(f"{target.path}: no machine named has provision steps: add provision = [\"COMMAND\", ...] "
                            "(or provision = { script = \"path\" }) to the machine")
    results = []
    for name in names:
        seconds = _run(ctx, _running(ctx, name))
        results.append({"name": name, "provisioned": True, "seconds": round(seconds, 3)})
        ctx.out.say(f"{name}: provisioned in {seconds:.1f} s")
    if ctx.out.json:
        ctx.out.data(results)
    return 0
