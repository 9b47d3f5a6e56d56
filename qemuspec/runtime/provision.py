"""Provisioning: the definition's `provision` steps, run in a ready guest once per machine life.

Why "once per machine life" and what that life is: a provisioned change lives where the guest wrote
it. A machine with writable disks of its own keeps it on them, so the record in the state directory
(``provisioned.json``) names those disks by device and inode: a plain `up` after `down` does not run
the steps again, while `reset` or `down --purge` (new disk files) does. A machine without such disks
(a kernel+initrd guest, or a warm machine, whose every start restores the disks of its save) loses
the change when qemu ends, so its record names that qemu (pid and kernel start time). `qemuspec
provision` runs the steps again on demand.

Steps go through the guest agent (as root, /bin/sh -c) or, without one, ssh as ``ssh.user``; a
script is sent to /bin/sh on standard input. Output is streamed as it comes; a failing step stops
the rest and raises ProvisionFailed with its last lines (exit 1), and records nothing, so the next
`up` tries again.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Callable

from qemuspec.errors import QemuspecError
from qemuspec.runtime import guestrun, statedir
from qemuspec.runtime.process import start_time

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance

TAIL_LINES = 30


class ProvisionFailed(QemuspecError):
    """A provisioning step exited non-zero or could not run."""


def steps(instance: Instance) -> list[tuple[str, list[str], bytes | None]]:
    """(label, argv, stdin) of each step, for the way this machine is reached."""
    provision = instance.machine.provision
    how = guestrun.via(instance)
    script = getattr(provision, "script", None)
    if script is not None:
        from qemuspec.spec.limits import read_source_text

        try:
            text = read_source_text(script)
        except ValueError as exc:
            raise ProvisionFailed(f"machine {instance.name}: provision.script: {exc}") from None
        argv = ["/bin/sh", "-s"] if how == "agent" else ["sh -s"]
        return [(f"script {script}", argv, text.encode())]
    return [
        (step, guestrun.shell(step, how), None)
        for step in (provision if isinstance(provision, list) else [])
    ]


def life(instance: Instance) -> str:
    """What a provisioning lasts as long as (see the module's docstring), as a key."""
    machine = instance.machine
    parts = []
    if not machine.warm:
        for disk in machine.disks:
            if disk.readonly:
                continue
            try:
                info = os.stat(disk.file)
            except OSError:
                continue
            parts.append(f"disk {info.st_dev}:{info.st_ino}")
    if not parts:
        assert instance.process is not None
        parts.append(f"qemu {instance.process.pid}:{start_time(instance.process.pid)}")
    return ";".join(parts)


def _digest(instance: Instance) -> str:
    return hashlib.sha256(repr(steps(instance)).encode()).hexdigest()[:16]


def done(instance: Instance) -> bool:
    """Whether this machine life has been provisioned (with any steps: a changed step list does not
    by itself run again; `qemuspec provision` does)."""
    record = statedir.read(instance.state_dir, statedir.PROVISIONED, statedir.ProvisionRecord)
    return record is not None and record.life == life(instance)


def run(
    instance: Instance, on_output: Callable[[str, bytes], object], say: Callable[[str], object]
) -> float:
    """Run every step in order (streamed), then record the machine life; the seconds it took."""
    began = time.monotonic()
    todo = steps(instance)
    for number, (label, argv, stdin) in enumerate(todo, 1):
        say(f"{instance.name}: provision {number}/{len(todo)}: {label}")
        tail: list[bytes] = []

        def output(stream: str, data: bytes) -> None:
            tail.append(data)
            del tail[:-TAIL_LINES]
            on_output(stream, data)

        try:
            code = guestrun.run(instance, argv, output, stdin)
        except QemuspecError as exc:
            raise ProvisionFailed(
                f"machine {instance.name}: provision step {number}/{len(todo)} `{label}` could not "
                f"run: {exc}"
            ) from None
        if code != 0:
            lines = b"".join(tail).decode(errors="replace").rstrip().splitlines()[-TAIL_LINES:]
            shown = "\n".join(lines) if lines else "(no output)"
            raise ProvisionFailed(
                f"machine {instance.name}: provision step {number}/{len(todo)} `{label}` exited {code}; the machine "
                f"is running but not provisioned: fix the step, then `qemuspec provision` runs the steps again "
                f"(and so does the next `up`).\n--- last output ---\n{shown}"
            )
    statedir.write(
        instance.state_dir,
        statedir.PROVISIONED,
        statedir.ProvisionRecord(life=life(instance), steps=_digest(instance), at=time.time()),
    )
    return time.monotonic() - began
