"""libvirt connection URIs a definition (``host =``) or the user (``--connect``) may name.

libvirt runs programs a URI names (the ``ext`` transport, ``?command=``, ``?netcat=``), hands the
host to ssh, splits the query on ``&`` *and* ``;``, percent-decodes names and values and compares
names without regard to case. So the URI is parsed the way libvirt parses it, and every decoded
parameter must be on a short allowlist with a strict value; anything else is refused. No pydantic
here: the model, ``--connect`` and the connection itself (a cached record too) use the same check.
"""

from __future__ import annotations

import re
import urllib.parse

_BASE = re.compile(
    r"^qemu(\+(ssh|libssh|libssh2|tls|tcp|unix))?://"
    r"(?:(?:[A-Za-z0-9_][A-Za-z0-9._-]*)@)?(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])?(?::\d{1,5})?"
    r"/(system|session)(\?(?P<query>.*))?$",
    re.DOTALL,
)
_PATH = r"[A-Za-z0-9_./~+][A-Za-z0-9_./~+-]*"
# Parameter -> its decoded value. Left out on purpose: command, netcat, proxy (programs and how they
# are run), socket (a path libvirt puts into a command run on the remote host), name.
PARAMS = {
    "keyfile": _PATH,
    "pkipath": _PATH,
    "known_hosts": _PATH,
    "no_verify": r"[01]",
    "no_tty": r"[01]",
    "known_hosts_verify": r"normal|auto|ignore",
    "sshauth": r"(agent|privkey|password|keyboard-interactive)(,(agent|privkey|password|keyboard-interactive))*",
    "mode": r"auto|legacy|direct",
    "tls_priority": r"[A-Za-z0-9_.+:!%][A-Za-z0-9_.+:!%-]*",
}
EXAMPLE = (
    'write for example "qemu:///system" or "qemu+ssh://user@host/system?keyfile=/path/key" '
    f"(transports ssh, libssh, tls, tcp, unix; options {', '.join(PARAMS)})"
)


def _decode(part: str) -> str | None:
    try:
        return urllib.parse.unquote_to_bytes(part).decode("ascii")
    except UnicodeDecodeError:
        return None


def check_libvirt_uri(value: str) -> str:
    """``value`` when it is a libvirt QEMU URI that names no program; else ValueError saying what is refused."""
    params(value)
    return value


def params(value: str) -> dict[str, str]:
    """The URI's decoded query parameters, read as libvirt reads them (ValueError as for check_libvirt_uri)."""
    base = _BASE.match(value) if isinstance(value, str) else None
    if base is None:
        raise ValueError(f'"{value}" is not a libvirt QEMU URI qemuspec accepts: {EXAMPLE}')
    query = base.group("query")
    found: dict[str, str] = {}
    if query is None:
        return found
    for part in re.split(r"[&;]", query):
        raw_name, eq, raw_value = part.partition("=")
        name, decoded = _decode(raw_name), _decode(raw_value)
        if not eq or name not in PARAMS:
            shown = name if name is not None else raw_name
            raise ValueError(
                f'"{value}" is not a libvirt QEMU URI qemuspec accepts: the parameter "{shown}" is not '
                "allowed (libvirt splits on & and ;, decodes %XX and ignores case; command, netcat, proxy "
                f"and socket run or name programs): {EXAMPLE}"
            )
        if decoded is None or not re.fullmatch(PARAMS[name], decoded):
            raise ValueError(
                f'"{value}" is not a libvirt QEMU URI qemuspec accepts: the value of "{name}" '
                f"({decoded if decoded is not None else raw_value!r}) may hold only letters, digits and "
                f'"_./~+-" (paths) or the documented words: {EXAMPLE}'
            )
        found[name] = decoded  # libvirt keeps the last one too
    return found
