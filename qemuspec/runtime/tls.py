"""Credentials for the TCP monitor: a private CA, a server certificate for qemu and a client
certificate for the user's tools, generated for each run of a machine.

Why: QMP has no authentication of its own, and whoever reaches a monitor can run host commands as
qemu's user (`migrate exec:...`). A TCP port on 127.0.0.1 is reachable by every local user, so the
TCP monitor is served only with TLS and `verify-peer=on`: a client must present a certificate signed
by this machine's CA, whose files are 0600 in a 0700 directory. The CA's key is deleted once
both certificates are signed, so even a later reader of the directory cannot mint new ones. The
directory is the machine's runtime directory (``tls/``), never the state directory: a repository
can commit a ``.qemuspec/NAME/tls/`` with credentials its author holds, and those must never be
what qemu verifies clients against. The credentials go when the machine stops (runtime/instance.forget).

Why the `openssl` command (argv, never a shell) rather than a Python library: it is on every Debian
system qemu runs on (installed by scripts/bootstrap), costs no compiled dependency, and this is a
one-time step per state directory (~0.1 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from qemuspec.errors import LaunchError
from qemuspec.runtime import statedir

FILES = statedir.TLS_FILES
CA_CERT, CA_KEY = statedir.TLS_CA_CERT, statedir.TLS_CA_KEY
CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
DAYS = "3650"
EXTENSIONS = {
    "ca": "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    "server": "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    "client": "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n",
}


def ensure(path: str) -> str:
    """The credentials in ``path`` (a machine's runtime directory's ``tls/``), made when missing."""
    if all(os.path.isfile(os.path.join(path, f)) for f in FILES):
        return path
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LaunchError(
            'qmp.transport = "tcp" needs the openssl command to make the monitor\'s TLS certificates: '
            "install it (Debian: apt-get install openssl), or use the default unix transport"
        )
    statedir.ensure_private(path)
    old = os.umask(0o077)
    try:
        for name in os.listdir(path):  # a half-made set from an interrupted run
            os.unlink(os.path.join(path, name))
        for kind, text in EXTENSIONS.items():
            with open(os.path.join(path, statedir.tls_scratch(kind)[1]), "x") as f:
                f.write(text)
        _run(
            openssl,
            path,
            "req",
            "-x509",
            *CURVE,
            "-keyout",
            CA_KEY,
            "-out",
            CA_CERT,
            "-days",
            DAYS,
            "-subj",
            "/CN=qemuspec monitor CA",
            "-config",
            "/dev/null",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        for kind, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=qemuspec client")):
            csr, ext = statedir.tls_scratch(kind)
            _run(
                openssl,
                path,
                "req",
                "-new",
                *CURVE,
                "-keyout",
                statedir.tls_key(kind),
                "-out",
                csr,
                "-subj",
                subject,
                "-config",
                "/dev/null",
            )
            _run(
                openssl,
                path,
                "x509",
                "-req",
                "-in",
                csr,
                "-CA",
                CA_CERT,
                "-CAkey",
                CA_KEY,
                "-set_serial",
                str(int.from_bytes(os.urandom(8), "big")),
                "-days",
                DAYS,
                "-out",
                statedir.tls_cert(kind),
                "-extfile",
                ext,
            )
    finally:
        os.umask(old)
        for name in (CA_KEY, *(n for kind in EXTENSIONS for n in statedir.tls_scratch(kind))):
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass
    return path


def _run(openssl: str, cwd: str, *args: str) -> None:
    result = subprocess.run(
        [openssl, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise LaunchError(
            f"openssl {args[0]} failed making the TCP monitor's certificates: {result.stderr.strip()[-500:]}"
        )


def client_context(tls_dir: str):
    """An ssl context that presents the client certificate and trusts only this directory's CA."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(tls_dir, CA_CERT))
    ctx.load_cert_chain(
        os.path.join(tls_dir, statedir.tls_cert("client")),
        os.path.join(tls_dir, statedir.tls_key("client")),
    )
    return ctx
