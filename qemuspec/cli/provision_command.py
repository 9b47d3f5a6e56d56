"""The provisioning `up` does once its machines are ready, and the steps `qemuspec provision` (cli/guest_commands.py) runs again (runtime/provision.py)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from qemuspec.cli.common import Context

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance
    from qemuspec.spec.models import File

READY = ("started", "recreated", "restarted", "changed", "adopted", "up to date")


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


def run_steps(ctx: Context, inst: Instance) -> float:
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
        seconds = run_steps(ctx, inst)
        ctx.out.say(f"{outcome.name}: provisioned in {seconds:.1f} s")
