"""The one table of field -> class (spec/changes.py), on definitions as `definition.json` records
them: what `plan` shows and what `up` does with a running machine."""

from __future__ import annotations

import pytest

from qemuspec.spec import loads
from qemuspec.spec.changes import classify, strongest, table

BASE = """
[machines.vm]
memory = "256M"
balloon = true
kernel = "/boot/vmlinuz"
disks = [{ file = "/data/a.qcow2", size = "1G" }]
cdrom = ["/isos/one.iso"]
nics = [{ forwards = [{ host = 8080, guest = 80 }] }]
"""


def dump(text: str) -> dict:
    return loads(text, "toml").machines["vm"].model_dump(mode="json")


def classes(before: str, after: str) -> dict[str, str]:
    return {c.field: c.cls for c in classify(dump(before), dump(after))}


@pytest.mark.parametrize(
    "edit, expected",
    [
        ('stop_timeout = 5\nrestart = "always"', {"stop_timeout": "live", "restart": "live"}),
        ('ready = { serial = "login:" }', {"ready.serial": "live"}),
        ("paused = true", {"paused": "live"}),
        ('memory = "128M"', {"memory": "live"}),  # down through the balloon
        ('memory = "512M"', {"memory": "restart"}),  # more than it booted with
        ("cpus = 2", {"cpus": "restart"}),
        ('cloud_init = { user_data = "#cloud-config" }', {"cloud_init": "recreate"}),
    ],
)
def test_top_level_fields(edit, expected):
    if edit.startswith("memory"):
        changed = BASE.replace('memory = "256M"', edit)
    else:
        changed = BASE.replace("[machines.vm]", "[machines.vm]\n" + edit)
    assert classes(BASE, changed) == expected


def test_forwards_cdrom_and_disks_by_what_they_are():
    forwards = BASE.replace(
        "{ host = 8080, guest = 80 }", "{ host = 8080, guest = 80 }, { host = 2222, guest = 22 }"
    )
    assert classes(BASE, forwards) == {"nics[0].forwards": "live"}
    assert classes(BASE, BASE.replace("nics = [{", 'nics = [{ model = "e1000",')) == {
        "nics[0].model": "restart"
    }
    assert classes(BASE, BASE.replace("one.iso", "two.iso")) == {"cdrom[0]": "live"}
    assert classes(
        BASE, BASE.replace('["/isos/one.iso"]', '["/isos/one.iso", "/isos/two.iso"]')
    ) == {"cdrom": "restart"}
    added = BASE.replace('size = "1G" }', 'size = "1G" }, { file = "/data/b.qcow2", size = "64M" }')
    assert classes(BASE, added) == {"disks[1]": "restart"}, "q35's root bus takes no hot-plug"
    ports = '[machines.vm]\ndevices = [{ driver = "pcie-root-port", id = "hp0", options = { chassis = 1 } }]'
    base, added = (t.replace("[machines.vm]", ports) for t in (BASE, added))
    assert classes(base, added) == {"disks[1]": "live"}
    assert classes(added, base) == {"disks[1]": "live"}, "a removed disk is unplugged live"
    ide = added.replace('size = "64M" }', 'size = "64M", interface = "ide" }')
    assert classes(base, ide) == {"disks[1]": "restart"}, "ide is not hot-plugged"
    pc = [t.replace("[machines.vm]", '[machines.vm]\nmachine = "pc"') for t in (base, added)]
    assert classes(*pc) == {"disks[1]": "live"}, "i440fx's root bus takes hot-plug"
    assert classes(BASE, BASE.replace('"1G"', '"2G"')) == {"disks[0].size": "recreate"}
    assert classes(BASE, BASE.replace('size = "1G" }', 'size = "1G", readonly = true }')) == {
        "disks[0].readonly": "restart"
    }


def test_memory_goes_back_up_through_the_balloon_to_what_qemu_booted_with():
    less = BASE.replace('memory = "256M"', 'memory = "128M"')
    assert {c.field: c.cls for c in classify(dump(less), dump(BASE), 256)} == {"memory": "live"}
    more = BASE.replace('memory = "256M"', 'memory = "512M"')
    assert {c.field: c.cls for c in classify(dump(less), dump(more), 256)} == {"memory": "restart"}
    assert {c.field: c.cls for c in classify(dump(less), dump(BASE))} == {"memory": "restart"}, (
        "without the boot size, the recorded one is the bound"
    )


def test_a_machine_takes_its_strongest_class_and_the_table_names_every_class():
    mixed = BASE.replace("[machines.vm]", "[machines.vm]\nstop_timeout = 5\ncpus = 2").replace(
        '"1G"', '"2G"'
    )
    found = classify(dump(BASE), dump(mixed))
    assert strongest([c.cls for c in found]) == "recreate"
    assert strongest([]) == "live"
    assert {cls for _, cls, _ in table()} == {"live", "restart", "recreate"}


def test_the_no_restart_exit_code_is_documented_where_help_reads_it():
    from qemuspec.cli.commands import EXIT_CODES
    from qemuspec.cli.common import NO_RESTART, outcomes_exit_code
    from qemuspec.backends.base import Outcome

    assert f"  {NO_RESTART}  up --no-restart" in EXIT_CODES
    assert (
        outcomes_exit_code([Outcome("a", "changed"), Outcome("b", "needs restart")]) == NO_RESTART
    )
    assert outcomes_exit_code([Outcome("a", "failed"), Outcome("b", "needs restart")]) == 1
