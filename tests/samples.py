"""One sample per field of a machine, and what each layer does with it: the table a new option is
added to. tests/test_typed_options.py runs every entry through the renderer (argv), the libvirt export
and the projection libvirt's `plan` compares, both importers (argv and libvirt XML back to a
definition), plan's field diff and the definition hash, and the library's builder; a field of the
model without an entry fails there, and so does an entry a layer forgot. tests/test_libvirt_backend.py
checks the export against the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TYPED = "typed"  # the importer gives the field back with the sample's value


@dataclass(frozen=True)
class Sample:
    value: Any  # a non-default value (None: the test picks a path or a text)
    needs: dict = field(default_factory=dict)  # what the sample needs beside it to be valid
    argv: bool = True  # changes the rendered command line (False: a runtime-only field)
    from_argv: str = TYPED  # TYPED, or why the argv importer does not give it back
    from_libvirt: str = TYPED  # TYPED, or why the libvirt importer does not (refused: not asked)


QEMUSPEC_OWN = (
    "rendered as qemuspec's own pieces (ids under its prefix), which an import does not type"
)
RUNTIME = "not on the command line: the runtime acts on it"

SAMPLES: dict[str, Sample] = {
    "qemu": Sample("/usr/local/bin/qemu-system-x86_64"),
    "host": Sample("qemu:///system", argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME),
    "machine": Sample("pc"),
    "machine_options": Sample({"hpet": False}),
    "accel": Sample("kvm"),
    "accel_options": Sample({"thread": "single"}),
    "cpu": Sample("Haswell"),
    "cpu_options": Sample({"pmu": False}),
    "cpus": Sample(2),
    "memory": Sample(300),
    "kernel": Sample("/k2"),
    "initrd": Sample(None),
    "cmdline": Sample(None),
    "firmware": Sample(
        "uefi",
        from_argv="pflash drives: kept as qemu wrote them",
        from_libvirt="the code path is written out",
    ),
    "boot_order": Sample("n"),
    "serial": Sample("none"),
    "display": Sample(
        {"type": "vnc"},
        from_argv="a unix-socket -vnc stays in append",
        from_libvirt="libvirt's socket display has no path of qemuspec's",
    ),
    "paused": Sample(True, from_libvirt=RUNTIME),
    "defaults": Sample(True),
    "restart": Sample(
        "always", argv=False, from_argv=RUNTIME, from_libvirt="lifecycle actions are noted"
    ),  # every machine has the panic device
    "stop_timeout": Sample("5s", argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME),
    "warm": Sample(True, from_argv=QEMUSPEC_OWN),
    "depends_on": Sample(["db"], argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME),
    "qmp": Sample({"transport": "tcp"}, argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME),
    "ready": Sample({"serial": "login:"}, argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME),
    "provision": Sample(
        ["true"], needs={"agent": True}, argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME
    ),
    "setup": Sample(
        ["true"], needs={"agent": True}, argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME
    ),
    "disks": Sample(
        [{"file": "/d.img"}],
        from_argv="the drive gets qemu's format default",
        from_libvirt="the drive gets libvirt's format default",
    ),
    "cdrom": Sample(["/c.iso"], from_argv=QEMUSPEC_OWN),
    "nics": Sample(
        [{"type": "user"}], from_libvirt="the netdev rides in qemu:commandline under qemuspec's id"
    ),
    "shares": Sample([{"source": "/s", "tag": "s"}], from_argv=QEMUSPEC_OWN),
    "rng": Sample(True, from_argv=QEMUSPEC_OWN),
    "agent": Sample(True, from_argv=QEMUSPEC_OWN),
    "balloon": Sample(True),
    "cloud_init": Sample(
        {"user_data": "#cloud-config\n"},
        from_argv="a seed qemuspec builds",
        from_libvirt="a seed qemuspec builds",
    ),
    "ssh": Sample({"user": "ci"}, argv=False, from_argv=RUNTIME, from_libvirt=RUNTIME),
    "devices": Sample([{"driver": "virtio-tablet-pci"}]),
    "objects": Sample([{"type": "rng-random", "id": "r", "options": {"filename": "/dev/urandom"}}]),
    "append": Sample(["-no-reboot"]),
    "overrides": Sample(
        ["-cpu"],
        needs={"append": ["-cpu", "host"]},
        from_argv="the overriding switch is the only one rendered: it imports as the typed field",
    ),
}
