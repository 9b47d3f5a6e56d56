"""The ssh identity of a state directory and each machine's known_hosts.

One ed25519 key per state directory, made once with ssh-keygen (0600). Host keys are pinned per
machine in its own known_hosts, which is emptied whenever the machine is (re)launched: a recreated
guest has a new host key, and that must not break `qemuspec ssh`.
"""

from __future__ import annotations

import os
import subprocess

from qemuspec.errors import QemuspecError

KEY_NAME = "id_ed25519"


def key_path(state_root: str) -> str:
    return os.path.join(state_root, "ssh", KEY_NAME)


def ensure_key(state_root: str) -> tuple[str, str]:
    """(private key path, public key text); generated on first use."""
    path = key_path(state_root)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + ".tmp"
        for stale in (tmp, tmp + ".pub"):
            if os.path.exists(stale):
                os.unlink(stale)
        try:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qemuspec", "-f", tmp], check=True, capture_output=True)
        except FileNotFoundError:
            raise QemuspecError("ssh-keygen not found: install it (Debian: apt-get install openssh-client)") from None
        os.chmod(tmp, 0o600)
        os.chmod(tmp + ".pub", 0o600)  # nothing in a state directory is for other users
        os.replace(tmp + ".pub", path + ".pub")
        os.replace(tmp, path)
    with open(path + ".pub", encoding="utf-8") as f:
        return path, f.read().strip()


def known_hosts(state_dir: str) -> str:
    return os.path.join(state_dir, "known_hosts")


def ssh_argv(key: str, state_dir: str, user: str, port: int, command: list[str], batch: bool = False) -> list[str]:
    argv = ["ssh", "-i", key, "-p", str(port),
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts(state_dir)}",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    argv.append(f"{user}@127.0.0.1")
    return argv + (["--", *command] if command else [])
