"""Readiness probes: does the guest actually do what the definition says "ready" means?

A user-mode forward accepts a host connection even when nothing listens in the guest (slirp answers
first), so the TCP and ssh probes only pass on real bytes from the guest.
"""

from __future__ import annotations

import re
import socket
import time

from qemuspec.errors import QemuspecError, ReadyTimeout


def forwarded_ports(qmp) -> list[dict]:
    """Host ports of the user-mode forwards as qemu really bound them (port 0 becomes a real port)."""
    text = qmp.command("human-monitor-command", {"command-line": "info usernet"})
    ports = []
    for match in re.finditer(
        r"^\s*(TCP|UDP)\[HOST_FORWARD\]\s+\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)", text, re.M
    ):
        proto, host_addr, host_port, _, guest_port = match.groups()
        ports.append(
            {
                "protocol": proto.lower(),
                "address": host_addr,
                "host": int(host_port),
                "guest": int(guest_port),
            }
        )
    return ports


def _exchange(port: int, expect: bytes | None, deadline: float) -> bool:
    """One attempt: True when the guest side sent data (starting with ``expect`` if given)."""
    remaining = max(0.05, deadline - time.monotonic())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=min(2.0, remaining)) as sock:
            if expect is None:
                # Any data counts: a service that talks first (a banner) still does, and a silent one
                # may be HTTP, so ask at once rather than wait to see whether it speaks first.
                sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            sock.settimeout(min(2.0, remaining))
            try:
                data = sock.recv(256)
            except socket.timeout:
                return False
            return bool(data) and (expect is None or data.startswith(expect))
    except OSError:
        return False


def wait_tcp(port: int, deadline: float, alive, expect: bytes | None = None) -> None:
    delay = 0.05
    while True:
        if _exchange(port, expect, deadline):
            return
        if not alive():
            raise QemuspecError("qemu exited while waiting for the guest port")
        if time.monotonic() >= deadline:
            raise ReadyTimeout(f"host port {port} gave no data from the guest")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)


def wait_agent(path: str, deadline: float, alive) -> None:
    from qemuspec.runtime.agent import GuestAgent

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReadyTimeout("the guest agent did not answer guest-ping")
        with GuestAgent(path, timeout=min(remaining, 2.0)) as agent:
            try:
                agent.sync()
                agent.command("guest-ping")
                return
            except QemuspecError:
                if not alive():
                    raise QemuspecError("qemu exited while waiting for the guest agent") from None


def wait_ssh_login(argv: list[str], deadline: float, alive) -> None:
    """Log in with the state directory's key and run `true`: the same path `qemuspec ssh` takes."""
    import subprocess

    delay = 0.2
    last = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReadyTimeout(f"ssh login did not succeed: {last or 'no answer'}")
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=min(remaining, 15),
            )
            if result.returncode == 0:
                return
            last = (
                result.stderr.strip().splitlines()[-1]
                if result.stderr.strip()
                else f"exit {result.returncode}"
            )
        except subprocess.TimeoutExpired:
            last = "ssh timed out"
        except FileNotFoundError:
            raise QemuspecError(
                "ssh not found: install it (Debian: apt-get install openssh-client)"
            ) from None
        if not alive():
            raise QemuspecError("qemu exited while waiting for ssh")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 1.0)


def wait_command(instance, commands: list[str], deadline: float, alive) -> None:
    """ready.command: each guest command in order, retried until it exits 0 (through the agent, or ssh
    without one). A command such as `cloud-init status --wait` may itself block: it gets what is left
    of the deadline. On timeout the error carries the command's last exit code and output."""
    from qemuspec.runtime import guestrun

    for command in commands:
        delay = 0.5
        last = "it never ran: the guest did not answer"
        while True:
            try:
                code, output = guestrun.capture(instance, command, deadline)
                if code == 0:
                    break
                lines = output.strip().splitlines()[-10:]
                last = f"exit {code}" + (": " + "\n".join(lines) if lines else " (no output)")
            except (
                QemuspecError
            ) as exc:  # the agent or sshd not up yet, or still running at the deadline
                if not last.startswith(
                    "exit"
                ):  # an earlier attempt's exit code and output say more
                    last = str(exc)
            if not alive():
                raise QemuspecError(f"qemu exited while waiting for `{command}` to succeed")
            if time.monotonic() >= deadline:
                raise ReadyTimeout(f"`{command}` did not exit 0 in the guest; last: {last}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
