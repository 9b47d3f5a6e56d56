"""A recreate on the local backend (backends/local.py ``_rebuild``): a disk whose image changed is
deleted before the start makes it again, only when qemuspec recorded creating it (created.json, same
device and inode); a disk the user supplied is never deleted, and the error says what to do."""

from __future__ import annotations

import pytest

from qemuspec.backends.local import _rebuild
from qemuspec.errors import QemuspecError
from qemuspec.runtime import statedir
from qemuspec.spec import loads

TEXT = """
[machines.vm]
disks = [{{ file = "{disk}", size = "{size}" }}, {{ file = "{kept}", size = "1M" }}]
"""


def machine(tmp_path, size):
    text = TEXT.format(disk=tmp_path / "a.qcow2", kept=tmp_path / "b.qcow2", size=size)
    return loads(text, "toml").machines["vm"]


def test_a_recreate_deletes_only_the_changed_disks_qemuspec_made(tmp_path):
    state = str(tmp_path / "state")
    statedir.claim(state)
    for name in ("a.qcow2", "b.qcow2"):
        (tmp_path / name).write_bytes(b"x")
        statedir.note_created(state, str(tmp_path / name))
    statedir.record_definition(state, machine(tmp_path, "1M").model_dump(mode="json"))
    _rebuild("vm", machine(tmp_path, "2M"), state)
    assert not (tmp_path / "a.qcow2").exists(), "made again by the start"
    assert (tmp_path / "b.qcow2").exists(), "an unchanged disk is kept"


def test_a_users_own_disk_is_never_deleted(tmp_path):
    state = str(tmp_path / "state")
    statedir.claim(state)
    (tmp_path / "a.qcow2").write_bytes(b"mine")
    statedir.record_definition(state, machine(tmp_path, "1M").model_dump(mode="json"))
    with pytest.raises(QemuspecError, match="did not create it.*img resize"):
        _rebuild("vm", machine(tmp_path, "2M"), state)
    assert (tmp_path / "a.qcow2").read_bytes() == b"mine"
