"""A definition's hash is what the user wrote that changes the machine, not qemuspec's defaults: a
qemuspec that gains a defaulted field (an upgrade) must not make `plan` recreate a running machine
whose command line is the same. The running machine is a real qemu; plan reads its real record."""

from __future__ import annotations

import dataclasses
import hashlib
import os

from qemuspec import reconcile
from qemuspec.backends import chosen
from qemuspec.runtime import paths, statedir
from qemuspec.spec import load, records
from qemuspec.spec.models import Machine
from test_lifecycle import cli


class Upgraded(Machine):
    """The model as a later qemuspec has it: one more field, with a default."""

    future_option: bool = False


def _older_hash(machine: Machine) -> str:
    """What qemuspec before this change recorded: every field, defaults included."""
    return hashlib.sha256(
        machine.model_dump_json(exclude={"ready": {"timeout"}}).encode()
    ).hexdigest()[:16]


def test_a_defaulted_new_field_keeps_the_hash():
    machine = Machine.model_validate(
        {"memory": "256M", "nics": [{"forwards": [{"host": 0, "guest": 22}]}], "rng": True}
    )
    upgraded = Upgraded.model_validate(machine.model_dump())
    assert records.definition_hash(upgraded) == records.definition_hash(machine)
    assert records.definition_hash(
        Machine.model_validate({"memory": "256M", "cpus": 1})
    ) == records.definition_hash(Machine.model_validate({"memory": 256})), (
        "writing a default changes nothing"
    )
    changed = Upgraded.model_validate({**machine.model_dump(), "future_option": True})
    assert records.definition_hash(changed) != records.definition_hash(machine), (
        "a value the user wrote counts"
    )
    assert records.definition_hash(
        machine.model_copy(update={"cpus": 2})
    ) != records.definition_hash(machine)


def test_a_cached_record_hashes_like_the_model(tmp_path):
    record = records.decode(
        records.encode(Machine.model_validate({"memory": "128M", "agent": True}))
    )
    assert records.definition_hash(record) == records.definition_hash(record.materialize())
    assert not records.older_hash(records.definition_hash(record))


def _record_hash(state_dir: str, value: str) -> None:
    run = paths.run_dir(state_dir)
    record = statedir.read(run, statedir.MACHINE, statedir.QemuRecord)
    assert record is not None
    statedir.write(run, statedir.MACHINE, dataclasses.replace(record, hash=value))


def test_plan_of_a_running_machine_is_empty_after_the_model_gains_a_field(qemu_bin, tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\npaused = true\nmemory = "64M"\naccel = "tcg"\n')
    root = str(tmp_path / ".qemuspec")
    cli("up", str(path))
    try:
        spec = load(str(path))
        old = spec.machines["m"]
        spec.machines["m"] = Upgraded.model_validate(
            old.model_dump()
        )  # the same file, read by a later qemuspec
        [step] = reconcile.plan(spec, chosen(spec, root, str(path)), ["m"])
        assert step["action"] == "up to date", step

        _record_hash(
            os.path.join(root, "m"), _older_hash(old)
        )  # started by the qemuspec before this change
        [step] = reconcile.plan(spec, chosen(spec, root, str(path)), ["m"])
        assert step["action"] == "up to date" and step["diff"] == [], step

        spec.machines["m"] = Upgraded.model_validate({**old.model_dump(), "memory": 96})
        [step] = reconcile.plan(spec, chosen(spec, root, str(path)), ["m"])
        assert step["action"] == "restart" and "+96M" in step["diff"], (
            "an older record still sees a real change"
        )
    finally:
        cli("down", str(path))
