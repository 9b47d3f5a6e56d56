"""Run a command in a running guest with its output streamed: through the guest agent, or ssh when the
machine has no agent. `run -- CMD`, `ready.command` and provisioning all go through here.

Why files in the guest for the agent: `guest-exec` returns a command's output only once it has exited,
so the command appends to two files in the guest that are read while they grow. Nothing the guest
sends is trusted: the agent session caps and type-checks every reply (runtime/agent.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, BinaryIO, Callable

from qemuspec.errors import QemuspecError, QMPTimeout

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent
    from qemuspec.runtime.instance import Instance

Output = Callable[[str, bytes], object]  # ("stdout" | "stderr", bytes)


def via(instance: Instance) -> str:
    """The agent when the machine has the channel, else ssh."""
    return "agent" if instance.machine.agent else "ssh"


def shell(command: str, how: str) -> list[str]:
    """One command line as argv: the agent runs /bin/sh -c; ssh hands one word to the login shell."""
    return ["/bin/sh", "-c", command] if how == "agent" else [command]


def run(
    instance: Instance,
    argv: list[str],
    on_output: Output,
    stdin: bytes | None = None,
    how: str | None = None,
    deadline: float | None = None,
) -> int:
    """Run ``argv`` in the guest, streaming its output; the exit code (128+N for a signal). QMPTimeout
    when ``deadline`` (time.monotonic) passes first (the guest command is left running)."""
    if (how or via(instance)) == "agent":
        return _agent(instance, argv, on_output, stdin, deadline)
    return _ssh(instance, argv, on_output, stdin, deadline)


def _agent(
    instance: Instance,
    argv: list[str],
    on_output: Output,
    stdin: bytes | None,
    deadline: float | None,
) -> int:
    from qemuspec.runtime.agent import GuestAgent

    timeout = 30.0 if deadline is None else max(1.0, min(30.0, deadline - time.monotonic()))
    with GuestAgent(instance.layout.qga, timeout=timeout) as agent:
        agent.sync(
            timeout=min(timeout, 5.0)
        )  # an agent not up yet: fail soon (ready.command tries again)
        return streamed(agent, argv, on_output, stdin, deadline)


Stdin = bytes | BinaryIO | None


def streamed(
    agent: GuestAgent,
    argv: list[str],
    on_output: Output,
    stdin: Stdin = None,
    deadline: float | None = None,
    kill: bool = False,
) -> int:
    """Run ``argv`` through an open agent session, its output passed to ``on_output`` as it grows; the
    exit code (127 when the guest has no such command, 128+N for a signal). Standard input (bytes or a
    binary file, read 48 KiB at a time) goes to a file in the guest first, so its size is bounded by
    the guest's /tmp, not by one agent message. When ``deadline`` passes: QMPTimeout, the command left
    running, or with ``kill`` the command is killed (SIGKILL) and the result is 124, as timeout(1)."""
    import uuid

    stem = f"/tmp/.qemuspec-run-{uuid.uuid4().hex[:8]}"
    names = [f"{stem}.out", f"{stem}.err"]
    handles = {}
    for stream in ("out", "err"):
        agent.file_close(agent.file_open(f"{stem}.{stream}", "w"))
        handles[stream] = agent.file_open(f"{stem}.{stream}", "r")
    script = 'o=$1; e=$2; shift 2; exec "$@" >>"$o" 2>>"$e"'
    if stdin is not None:
        names.append(f"{stem}.in")
        _upload(agent, f"{stem}.in", stdin)
        script = 'o=$1; e=$2; i=$3; shift 3; exec "$@" <"$i" >>"$o" 2>>"$e"'
    pid = agent.spawn(["/bin/sh", "-c", script, "sh", *names, *argv])

    def drain() -> None:
        for stream, handle in handles.items():
            while True:
                data, _ = agent.file_read(handle, 65536)
                if data:
                    on_output("stdout" if stream == "out" else "stderr", data)
                if len(data) < 65536:
                    break

    def tidy() -> None:
        for handle in handles.values():
            agent.file_close(handle)
        with contextlib.suppress(
            QemuspecError
        ):  # a guest powering off (`run -- poweroff`) may not answer
            agent.spawn(["rm", "-f", *names])

    delay = 0.02
    while True:
        done = agent.poll(pid)
        drain()
        if done is not None:
            drain()
            tidy()
            code, signal, _, err = done
            if err:  # the shell itself failed: its message, as stderr
                on_output("stderr", err)
            if signal is not None:
                return 128 + signal
            return code if code is not None else 1
        if deadline is not None and time.monotonic() >= deadline:
            if kill:
                _kill(agent, pid)
                drain()
                tidy()
                return TIMED_OUT
            tidy()
            raise QMPTimeout(f"`{argv[-1]}` was still running")
        time.sleep(delay)  # the agent has no completion event: guest-exec-status is the protocol
        delay = min(delay * 2, 0.2)


TIMED_OUT = 124  # timeout(1)'s exit code: the command was killed at its deadline


def _upload(agent: GuestAgent, path: str, stdin: bytes | BinaryIO) -> None:
    handle = agent.file_open(path, "w")
    try:
        if isinstance(stdin, bytes):
            for offset in range(0, len(stdin), agent.CHUNK):
                agent.file_write(handle, stdin[offset : offset + agent.CHUNK])
        else:
            while chunk := stdin.read(agent.CHUNK):
                agent.file_write(handle, chunk)
    finally:
        agent.file_close(handle)


def _kill(agent: GuestAgent, pid: int) -> None:
    """SIGKILL the command (the shell exec'd it, so it has the pid guest-exec gave) and wait until the
    agent reports it gone."""
    agent.spawn(["/bin/sh", "-c", 'kill -KILL "$1"', "sh", str(pid)])
    until = time.monotonic() + 10.0
    while agent.poll(pid) is None and time.monotonic() < until:
        time.sleep(0.05)  # guest-exec-status is the only way to learn it ended


def _ssh(
    instance: Instance,
    argv: list[str],
    on_output: Output,
    stdin: bytes | None,
    deadline: float | None,
) -> int:
    import selectors
    import subprocess

    from qemuspec.runtime import sshkeys

    key, _ = sshkeys.ensure_key(os.path.dirname(instance.state_dir))
    port = instance.host_port(instance.machine.ssh.port)
    ssh = sshkeys.ssh_argv(
        key, instance.state_dir, instance.machine.ssh.user, port, argv, batch=True
    )
    try:
        proc = subprocess.Popen(
            ssh,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise QemuspecError(
            "ssh not found: install it (Debian: apt-get install openssh-client)"
        ) from None
    try:
        if stdin and proc.stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        assert proc.stdout is not None and proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        open_streams = 2
        while open_streams:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise QMPTimeout(f"`{argv[-1]}` was still running")
            for key_, _ in sel.select(wait):
                data = os.read(key_.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if data:
                    on_output(key_.data, data)
                else:
                    sel.unregister(key_.fileobj)
                    open_streams -= 1
        code = proc.wait()
        return code if code >= 0 else 128 - code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def capture(instance: Instance, command: str, deadline: float) -> tuple[int, str]:
    """One shell command line, its exit code and combined output (for probes and error messages)."""
    chunks: list[bytes] = []
    how = via(instance)
    code = run(
        instance,
        shell(command, how),
        lambda _, data: chunks.append(data),
        how=how,
        deadline=deadline,
    )
    return code, b"".join(chunks).decode(errors="replace")
