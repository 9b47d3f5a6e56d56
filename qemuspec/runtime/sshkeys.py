"""The ssh identity of a state directory and each machine's known_hosts.

One ed25519 key per state directory (``.qemuspec``), made once with ssh-keygen (0600). The key does
not live in the state directory: a repository can commit anything there (an ``id_ed25519.pub``
symlink to a host file would go into the guest's cloud-init seed, a planted key pair would let its
author log in), so it lives in the user's keep base (runtime/paths.keep_dir), named by a hash of
the state directory, and is read through the state owner without following symlinks. Host keys
are pinned per machine in its own known_hosts, which is emptied whenever the machine is
(re)launched: a recreated guest has a new host key, and that must not break `qemuspec ssh`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

from qemuspec.errors import QemuspecError
from qemuspec.runtime import statedir

KEY_NAME = statedir.SSH_KEY


def key_path(state_root: str) -> str:
    from qemuspec.runtime import paths

    digest = hashlib.sha256(os.path.abspath(state_root).encode()).hexdigest()[:16]
    return os.path.join(paths.keep_dir(statedir.KEEP_SSH), digest, KEY_NAME)


def ensure_key(state_root: str) -> tuple[str, str]:
    """(private key path, public key text); generated on first use."""
    path = key_path(state_root)
    directory = os.path.dirname(path)
    statedir.ensure_private(directory)
    public = statedir.read_bytes(directory, KEY_NAME + statedir.PUB_SUFFIX, 4096)
    if public is None or statedir.read_bytes(directory, KEY_NAME, 65536) is None:
        tmp = path + statedir.TMP_SUFFIX
        statedir.remove(
            directory,
            KEY_NAME + statedir.TMP_SUFFIX,
            KEY_NAME + statedir.TMP_SUFFIX + statedir.PUB_SUFFIX,
        )
        try:
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qemuspec", "-f", tmp],
                check=True,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                umask=0o077,
            )
        except FileNotFoundError:
            raise QemuspecError(
                "ssh-keygen not found: install it (Debian: apt-get install openssh-client)"
            ) from None
        os.replace(tmp + statedir.PUB_SUFFIX, path + statedir.PUB_SUFFIX)
        os.replace(tmp, path)
        public = statedir.read_bytes(directory, KEY_NAME + statedir.PUB_SUFFIX, 4096)
        if public is None:
            raise QemuspecError(f"cannot read the ssh key qemuspec just made in {directory}")
    return path, public.decode(errors="replace").strip()


def known_hosts(state_dir: str) -> str:
    return os.path.join(state_dir, statedir.KNOWN_HOSTS)


def ssh_argv(
    key: str, state_dir: str, user: str, port: int, command: list[str], batch: bool = False
) -> list[str]:
    argv = [
        "ssh",
        "-i",
        key,
        "-p",
        str(port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts(state_dir)}",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
    ]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    argv.append(f"{user}@127.0.0.1")
    return argv + (["--", *command] if command else [])
