"""A machine's files on its libvirt host, as storage volumes in one directory pool named "qemuspec".

Read-only inputs that live on this host (kernel, initrd, cdroms, read-only disks, overlay bases, the
cloud-init seed) are uploaded once, under a name made from their content hash, so every machine on a
host shares one copy and a changed file is a new volume. Disks that qemuspec creates (``size``,
``backing``) become volumes named after the machine; like local overlays they survive ``down`` and
go with ``down --purge``. The serial log lives in the pool too, so ``logs`` can download it from a
remote host through the same API.
"""

from __future__ import annotations

import hashlib
import os
import threading
import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from qemuspec.backends.libvirt_conn import binding, message
from qemuspec.errors import QemuspecError
from qemuspec.spec.models import Machine

POOL = "qemuspec"
SYSTEM_POOL_DIR = "/var/lib/libvirt/images/qemuspec"
_upload_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_lock = threading.Lock()


_pool_lock = threading.Lock()


def pool(conn: Any, create: bool = True) -> Any | None:
    with (
        _pool_lock
    ):  # machines of one level start in parallel threads: one of them creates the pool
        return _pool(conn, create)


def _pool(conn: Any, create: bool) -> Any | None:
    libvirt = binding()
    try:
        found = conn.storagePoolLookupByName(POOL)
    except libvirt.libvirtError:
        if not create:
            return None
        if not conn.getURI().rstrip("/").endswith("/system"):
            raise QemuspecError(
                f'libvirt at {conn.getURI()} has no storage pool "{POOL}" and qemuspec only creates one on a system daemon: '
                f"create it once as that user: virsh -c {conn.getURI()} pool-define-as {POOL} dir --target DIR && "
                f"virsh -c {conn.getURI()} pool-build {POOL} && virsh -c {conn.getURI()} pool-start {POOL}"
            ) from None
        xml = f"<pool type='dir'><name>{POOL}</name><target><path>{SYSTEM_POOL_DIR}</path></target></pool>"
        try:
            found = conn.storagePoolDefineXML(xml, 0)
            found.build(0)
            found.setAutostart(1)
        except libvirt.libvirtError as exc:
            try:  # another qemuspec made it meanwhile
                found = conn.storagePoolLookupByName(POOL)
            except libvirt.libvirtError:
                raise QemuspecError(
                    f"cannot create the storage pool {POOL} at {conn.getURI()}: {message(exc)}"
                ) from None
    try:
        if not found.isActive():
            found.create(0)
        found.refresh(0)
    except libvirt.libvirtError as exc:
        raise QemuspecError(
            f"the storage pool {POOL} at {conn.getURI()} cannot be used: {message(exc)}"
        ) from None
    return found


def pool_dir(found: Any) -> str:
    return ET.fromstring(found.XMLDesc(0)).findtext("target/path") or SYSTEM_POOL_DIR


def content_name(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise QemuspecError(
            f"cannot read {path} to send it to the libvirt host: {exc.strerror}"
        ) from None
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in os.path.basename(path))[:40]
    return f"media-{digest.hexdigest()[:16]}-{base}"


def _lookup(found: Any, name: str) -> Any | None:
    libvirt = binding()
    try:
        return found.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def upload(conn: Any, found: Any, path: str, name: str | None = None) -> str:
    """The host path of ``path``'s content in the pool, sending it when the host lacks it."""
    libvirt = binding()
    name = name or content_name(path)
    with _locks_lock:
        lock = _upload_locks.setdefault((conn.getURI(), name), threading.Lock())
    with lock:
        vol = _lookup(found, name)
        if vol is not None:
            return vol.path()
        size = os.path.getsize(path)
        xml = f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{max(size, 1)}</capacity><allocation>0</allocation><target><format type='raw'/></target></volume>"
        try:
            vol = found.createXML(xml, 0)
            stream = conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            with open(path, "rb") as f:
                stream.sendAll(lambda _st, n, fh: fh.read(n), f)
            stream.finish()
        except libvirt.libvirtError as exc:
            if vol is not None:
                vol.delete(0)
            raise QemuspecError(
                f"cannot upload {path} to {conn.getURI()}: {message(exc)}"
            ) from None
        return vol.path()


def predicted(found: Any | None, path: str) -> str:
    """Where ``upload`` puts ``path`` (for plan, which changes nothing)."""
    return os.path.join(
        pool_dir(found) if found is not None else SYSTEM_POOL_DIR, content_name(path)
    )


def media_paths(machine: Machine) -> list[str]:
    """Files of this host the machine reads but never writes: sent to the libvirt host."""
    paths = [p for p in (machine.kernel, machine.initrd) if p]
    paths += list(machine.cdrom)
    paths += [d.file for d in machine.disks if d.readonly and d.size is None and not d.backing]
    return paths


def disk_volume(name: str, index: int, fmt: str | None) -> str:
    return f"{name}-disk{index}.{fmt or 'raw'}"


def serial_log(found: Any | None, name: str) -> str:
    return os.path.join(
        pool_dir(found) if found is not None else SYSTEM_POOL_DIR, f"{name}-serial.log"
    )


def prepare(
    conn: Any, name: str, machine: Machine, seed: bytes | None
) -> tuple[dict[str, str], list[str]]:
    """Upload media and create the disks the machine declares; returns (this host's path -> the
    libvirt host's path, the volumes the machine owns)."""
    libvirt = binding()
    found = pool(conn)
    assert found is not None  # created when missing
    media = {path: upload(conn, found, path) for path in media_paths(machine)}
    owned: list[str] = []
    if seed is not None:
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="qemuspec-cidata-") as f:
            f.write(seed)
            f.flush()
            media["cidata"] = upload(
                conn, found, f.name, f"{name}-cidata-{hashlib.sha256(seed).hexdigest()[:16]}.iso"
            )
        owned.append(os.path.basename(media["cidata"]))
        for stale in found.listVolumes():  # the seed of an earlier definition
            if stale.startswith(f"{name}-cidata-") and stale != os.path.basename(media["cidata"]):
                found.storageVolLookupByName(stale).delete(0)
    for index, disk in enumerate(machine.disks):
        if disk.size is None and not disk.backing:
            continue  # a file the host already has: used where the definition says
        vol_name = disk_volume(name, index, disk.format)
        owned.append(vol_name)
        vol = _lookup(found, vol_name)
        if vol is None:
            capacity = disk.size
            backing = ""
            if disk.backing:
                from qemuspec import img

                base = img.info(disk.backing)
                capacity = capacity or base.virtual_size
                base_path = upload(conn, found, disk.backing)
                backing = (
                    f"<backingStore><path>{escape(base_path)}</path>"
                    f"<format type={quoteattr(disk.backing_format or base.format)}/></backingStore>"
                )
            xml = (
                f"<volume><name>{escape(vol_name)}</name><capacity unit='bytes'>{capacity}</capacity>"
                f"<target><format type={quoteattr(disk.format or 'raw')}/></target>{backing}</volume>"
            )
            try:
                vol = found.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                raise QemuspecError(
                    f"machine {name}: cannot create disk {index} as volume {vol_name} on {conn.getURI()}: {message(exc)}"
                ) from None
        media[disk.file] = vol.path()
    owned.append(f"{name}-serial.log")
    return media, owned


def purge(conn: Any, name: str, still_used: set[str]) -> list[str]:
    """Delete the machine's volumes and the uploaded media no remaining qemuspec domain uses."""
    libvirt = binding()
    found = pool(conn, create=False)
    if found is None:
        return []
    found.refresh(0)
    deleted = []
    for vol_name in found.listVolumes():
        mine = (
            vol_name.startswith(f"{name}-disk")
            or vol_name.startswith(f"{name}-cidata-")
            or vol_name == f"{name}-serial.log"
        )
        orphan = vol_name.startswith("media-") and vol_name not in still_used
        if mine or orphan:
            try:
                found.storageVolLookupByName(vol_name).delete(0)
                deleted.append(vol_name)
            except libvirt.libvirtError:
                pass
    if not found.listVolumes() and pool_dir(found) == SYSTEM_POOL_DIR:
        try:  # the pool qemuspec made itself goes with its last volume
            found.destroy()
            found.delete(0)
            found.undefine()
        except libvirt.libvirtError:
            pass
    return deleted


def download(conn: Any, vol_name: str) -> bytes | None:
    libvirt = binding()
    found = pool(conn, create=False)
    if found is None:
        return None
    found.refresh(0)
    vol = _lookup(found, vol_name)
    if vol is None:
        return None
    out = bytearray()
    stream = conn.newStream(0)
    try:
        vol.download(stream, 0, 0, 0)
        stream.recvAll(lambda _st, data, buf: buf.extend(data) or len(data), out)
        stream.finish()
    except libvirt.libvirtError as exc:
        raise QemuspecError(
            f"cannot read {vol_name} from {conn.getURI()}: {message(exc)}"
        ) from None
    return bytes(out)
