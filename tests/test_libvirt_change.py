"""The libvirt backend's live changes (LibvirtBackend.change) against a stand-in domain that records
libvirt's calls: the same table as the local backend decides the fields (spec/changes.py); memory
goes through setMemoryFlags and the restart policy through setLifecycleAction, both LIVE|CONFIG;
the owner record takes the new definition hash; what it cannot do live says restart and calls
nothing. The real-libvirtd lifecycle is tests/test_libvirt_backend.py's."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

libvirt = pytest.importorskip("libvirt")

from qemuspec.backends.libvirt_domain import LibvirtBackend  # noqa: E402
from qemuspec.errors import QemuspecError  # noqa: E402
from qemuspec.libvirt import OWNER_NS  # noqa: E402
from qemuspec.spec import loads  # noqa: E402
from qemuspec.spec.changes import classify  # noqa: E402
from qemuspec.spec.records import definition_hash  # noqa: E402

TEXT = """
[machines.vm]
machine = "pc"
memory = "{memory}"
balloon = true
restart = "{restart}"
disks = [{disks}]
"""


class Domain:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.meta = ET.tostring(
            ET.Element(f"{{{OWNER_NS}}}owner", {"file": "/src/a.toml", "hash": "old"}),
            encoding="unicode",
        )

    def isPersistent(self) -> int:
        return 1

    def isActive(self) -> int:
        return 1

    def metadata(self, kind, uri, flags):
        return self.meta

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            if name == "setMetadata":
                self.meta = args[1]
            return 0

        return call


def machine(memory="256M", restart="no", disks=""):
    return loads(TEXT.format(memory=memory, restart=restart, disks=disks), "toml").machines["vm"]


def fields(old, new) -> list[str]:
    return [c.field for c in classify(old.model_dump(mode="json"), new.model_dump(mode="json"))]


def test_memory_and_restart_live_through_libvirt(tmp_path, monkeypatch):
    backend = LibvirtBackend("qemu:///system", str(tmp_path), "/src/a.toml")
    dom = Domain()
    monkeypatch.setattr(backend, "_domain", lambda name: dom)
    old, new = machine(), machine(memory="128M", restart="always")
    outcome = backend.change("vm", old, new, fields(old, new))
    both = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    assert ("setMemoryFlags", 128 * 1024, both) in dom.calls
    assert (
        "setLifecycleAction",
        libvirt.VIR_DOMAIN_LIFECYCLE_POWEROFF,
        libvirt.VIR_DOMAIN_LIFECYCLE_ACTION_RESTART,
        both,
    ) in dom.calls
    record = ET.fromstring(dom.meta).attrib
    assert record["hash"] == definition_hash(new) and record["file"] == "/src/a.toml"
    assert outcome.action == "changed" and "setMemoryFlags" in outcome.detail


def test_what_libvirt_cannot_change_live_says_restart_and_calls_nothing(tmp_path, monkeypatch):
    backend = LibvirtBackend("qemu:///system", str(tmp_path), "/src/a.toml")
    dom = Domain()
    monkeypatch.setattr(backend, "_domain", lambda name: dom)
    old, new = machine(), machine(disks='{ file = "/d/b.qcow2", size = "64M" }')
    with pytest.raises(QemuspecError, match="takes a restart"):
        backend.change("vm", old, new, fields(old, new))
    assert dom.calls == []
