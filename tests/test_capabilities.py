"""Capability-aware validation against the real qemu binary: misspellings get the right suggestion."""

from __future__ import annotations

import pytest

from qemuspec.runtime import capabilities
from qemuspec.spec import loads
from test_cli import cli

MISSPELT = [
    # (TOML fragment inside [machines.m], expected suggestion)
    ('machine = "q53"', 'no machine type "q53": did you mean "q35"?'),
    ('machine = "pc-q35-7.3"', 'did you mean "pc-q35-7.2"?'),
    ('machine = "microvn"', 'did you mean "microvm"?'),
    ('machine = "isapcc"', 'did you mean "isapc"?'),
    ('cpu = "Skylake-Clientt"', 'no CPU model "Skylake-Clientt": did you mean "Skylake-Client"?'),
    ('cpu = "EPYC-Romee"', 'did you mean "EPYC-Rome"?'),
    ('cpu = "qemu46"', 'did you mean "qemu64"?'),
    ('cpu = "Haswel"', 'did you mean "Haswell"?'),
    ('accel = "tgc"', None),  # not a valid literal: the model rejects it before the probe
    (
        'devices = [{ driver = "virtio-rng-pcie" }]',
        'no device "virtio-rng-pcie": did you mean "virtio-rng-pci"?',
    ),
    ('devices = [{ driver = "e1000ee" }]', 'did you mean "e1000e"?'),
    ('devices = [{ driver = "virtio-balloon-pic" }]', 'did you mean "virtio-balloon-pci"?'),
    ('devices = [{ driver = "qemu-xhcii" }]', 'did you mean "qemu-xhci"?'),
    ('devices = [{ driver = "usb-tablett" }]', 'did you mean "usb-tablet"?'),
    (
        'nics = [{ model = "virtio-net-pcie" }]',
        'no device "virtio-net-pcie": did you mean "virtio-net-pci"?',
    ),
    ('nics = [{ model = "rtl8193" }]', 'did you mean "rtl8139"?'),
    (
        'devices = [{ driver = "virtio-rng-pci", options = { max_bytes = 1 } }]',
        'no property "max_bytes": did you mean "max-bytes"?',
    ),
    (
        'devices = [{ driver = "e1000e", options = { macc = "52:54:00:00:00:01" } }]',
        'no property "macc": did you mean "mac"?',
    ),
    (
        'nics = [{ device_options = { romfil = "" } }]',
        'no property "romfil": did you mean "romfile"?',
    ),
    (
        'disks = [{ file = "d", device_options = { num-queue = 2 } }]',
        'no property "num-queue": did you mean "num-queues"?',
    ),
    (
        'objects = [{ type = "rng-randm", id = "r" }]',
        'no object type "rng-randm": did you mean "rng-random"?',
    ),
    ('append = ["-rtcc", "base=utc"]', 'no option "-rtcc": did you mean "-rtc"?'),
    ('append = ["-smpp", "2"]', 'no option "-smpp": did you mean "-smp"?'),
    ('append = ["-rtc", "bas=utc"]', 'option "-rtc" has no parameter "bas": did you mean "base"?'),
    (
        'append = ["-boot", "menu=on,splash-tme=0"]',
        'has no parameter "splash-tme": did you mean "splash-time"?',
    ),
]


@pytest.fixture(scope="module")
def caps(qemu_bin):
    return capabilities.probe(qemu_bin)


@pytest.mark.parametrize(
    "fragment,expected", [m for m in MISSPELT if m[1]], ids=[m[0][:40] for m in MISSPELT if m[1]]
)
def test_misspellings_get_the_right_suggestion(caps, fragment, expected):
    spec = loads(f"[machines.m]\n{fragment}\n", "toml")
    problems = capabilities.check("m", spec.machines["m"], caps)
    assert len(problems) == 1, problems
    assert expected in problems[0][1]


def test_at_least_twenty_misspellings_are_covered():
    assert len([m for m in MISSPELT if m[1]]) >= 20


def test_correct_definitions_pass(caps):
    spec = loads(
        '[machines.m]\nmachine = "pc"\ncpu = "qemu64"\nrng = true\nappend = ["-rtc", "base=utc", "-no-reboot"]\n'
        '[[machines.m.nics]]\ndevice_options = { romfile = "" }\n'
        '[[machines.m.devices]]\ndriver = "virtio-rng-pci"\noptions = { max-bytes = 1024, period = 1000 }\n',
        "toml",
    )
    assert capabilities.check("m", spec.machines["m"], caps) == []


def test_validate_probe_names_file_line_and_field(tmp_path, qemu_bin):
    path = tmp_path / "m.toml"
    path.write_text('[machines.web]\nmemory = "256M"\nmachine = "q53"\n')
    result = cli("validate", "--probe", str(path))
    assert result.returncode == 2
    assert (
        f"{path}:3: machines.web.machine: qemu-system-x86_64 7.2" in result.stderr
        and 'did you mean "q35"?' in result.stderr
    )
    assert cli("validate", str(path)).returncode == 0, "without --probe only the model is checked"


def test_up_refuses_before_starting_anything(tmp_path, qemu_bin):
    path = tmp_path / "m.toml"
    path.write_text(
        '[machines.web]\npaused = true\n[[machines.web.nics]]\nmodel = "virtio-net-pcie"\n'
    )
    result = cli("up", str(path))
    assert result.returncode == 2 and 'did you mean "virtio-net-pci"?' in result.stderr
    assert not (tmp_path / ".qemuspec" / "web" / "state.json").exists()


def test_the_answer_is_cached_per_binary(caps, qemu_bin):
    import os

    files = os.listdir(capabilities.cache_dir())
    assert capabilities.probe(qemu_bin) == caps
    assert os.listdir(capabilities.cache_dir()) == files
    assert "virtio-net-pci" in caps.devices and "q35" in caps.machines and "tcg" in caps.accels
