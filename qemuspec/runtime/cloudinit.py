"""The NoCloud seed: user-data, meta-data and network-config in an ISO 9660 image labelled cidata.

Built in Python with pycdlib (no genisoimage/xorriso on the host), rendered with Jinja2 (``name``,
``ssh_public_key``), and rebuilt only when what goes into it changes, so an unchanged machine keeps
its instance-id and cloud-init does not run its first-boot work again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import io
import json
import os

from qemuspec.errors import LaunchError
from qemuspec.render import nic_mac

if TYPE_CHECKING:
    from qemuspec.runtime.paths import Layout
    from qemuspec.spec.models import Machine


def _template(text: str, context: dict, what: str) -> str:
    from qemuspec.errors import SpecError
    from qemuspec.spec.templates import render_text

    try:
        return render_text(text, context, f"cloud_init {what}")
    except SpecError as exc:
        raise LaunchError(str(exc)) from None


def network_config(name: str, machine: Machine) -> str | None:
    """network-config v2 for the NICs that have a static address, matched by their MAC."""
    entries = []
    for index, nic in enumerate(machine.nics):
        if nic.address:
            mac = nic_mac(name, index, nic)
            entries.append(
                f'  nic{index}:\n    match:\n      macaddress: "{mac}"\n    addresses:\n      - "{nic.address}"\n'
            )
    return ("version: 2\nethernets:\n" + "".join(entries)) if entries else None


def read_text(name: str, ci, key: str) -> str | None:
    """Inline text, or the named file's content (``key`` or ``key_file``)."""
    path = getattr(ci, f"{key}_file")
    if path is None:
        return getattr(ci, key)
    from qemuspec.spec.limits import read_source_text

    try:
        return read_source_text(path)
    except ValueError as exc:
        raise LaunchError(f"machine {name}: cloud_init.{key}_file: {exc}") from None


def seed_files(name: str, machine: Machine, ssh_public_key: str) -> dict[str, bytes]:
    ci = machine.cloud_init
    context = {"name": name, "machine_name": name, "ssh_public_key": ssh_public_key}
    user_data = read_text(name, ci, "user_data") if ci else None
    files = {
        "user-data": _template(
            user_data if user_data is not None else "#cloud-config\n", context, "user_data"
        ).encode()
    }
    meta = {"local-hostname": name, **(ci.meta_data if ci else {})}
    net_text = read_text(name, ci, "network_config") if ci else None
    net = (
        _template(net_text, context, "network_config")
        if net_text is not None
        else network_config(name, machine)
    )
    if net:
        files["network-config"] = net.encode()
    digest = hashlib.sha256(
        json.dumps({k: v.decode() for k, v in files.items()}, sort_keys=True).encode()
        + json.dumps(meta, sort_keys=True, default=str).encode()
    )
    meta.setdefault("instance-id", f"{name}-{digest.hexdigest()[:12]}")
    files["meta-data"] = json.dumps(
        meta, indent=2, sort_keys=True, default=str
    ).encode()  # JSON is YAML
    return files


def build_iso(files: dict[str, bytes]) -> bytes:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for number, (name, data) in enumerate(sorted(files.items())):
        iso.add_fp(
            io.BytesIO(data), len(data), f"/FILE{number}.;1", rr_name=name, joliet_path=f"/{name}"
        )
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def ensure_seed(name: str, machine: Machine, layout: Layout, ssh_public_key: str) -> bool:
    """Write the cidata ISO if its inputs changed; True when it was (re)built."""
    files = seed_files(name, machine, ssh_public_key)
    digest = hashlib.sha256(
        b"".join(k.encode() + b"\0" + v + b"\0" for k, v in sorted(files.items()))
    ).hexdigest()
    from qemuspec.runtime import statedir

    directory = os.path.dirname(layout.cidata)
    recorded = statedir.read_bytes(directory, statedir.CIDATA_STAMP, 4096) or b""
    if recorded.strip() == digest.encode() and os.path.exists(layout.cidata):
        return False

    data = build_iso(files)  # the seed carries user data (secrets, keys): 0600, atomic, no symlinks
    statedir.write_bytes(directory, os.path.basename(layout.cidata), data)
    statedir.write_bytes(directory, statedir.CIDATA_STAMP, (digest + "\n").encode())
    return True
