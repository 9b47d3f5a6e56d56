"""libvirt export: the XML passes libvirt's own validator, and a real libvirtd runs an exported machine."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import IN_CI
from qemuspec.libvirt import domain_xml
from qemuspec.spec import load, loads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "uefi-vnc": '[machines.m]\nfirmware = "uefi"\ndisplay = { type = "vnc", port = 5901, unauthenticated = true }\nboot_order = "cd"\ncdrom = "/tmp/x.iso"\n'
    '[[machines.m.disks]]\nfile = "/tmp/a.qcow2"\nformat = "qcow2"\nreadonly = true\nserial = "S1"\n',
    "shares-agent-rng": '[machines.m]\nagent = true\nrng = true\ncpu = "Haswell"\ncpu_options = { pmu = false }\n'
    'shares = [{ source = "/srv", tag = "srv", readonly = true }, { type = "virtiofs", source = "/data", tag = "data" }]\n',
    "nics": '[machines.m]\nnics = [{ model = "e1000", outbound = true }, {}, { type = "bridge", bridge = "br0" }, { type = "socket", listen = "127.0.0.1:4000" }]\n'
    'devices = [{ driver = "virtio-balloon-pci", id = "b0" }]\nobjects = [{ type = "rng-random", id = "r0", options = { filename = "/dev/urandom" } }]\n'
    'machine_options = { kernel-irqchip = "split" }\n[[machines.m.disks]]\nfile = "/tmp/n.img"\ninterface = "nvme"\n'
    '[[machines.m.disks]]\nfile = "/tmp/s.img"\ninterface = "scsi"\n',
    "spice-socket": '[machines.m]\ndisplay = "spice"\n',
    "host-kvm": '[machines.m]\naccel = "kvm"\ncpu = "host"\nserial = "none"\n',
}


def validator() -> str:
    path = shutil.which("virt-xml-validate")
    if path is None:
        if IN_CI:
            pytest.fail("virt-xml-validate is missing (Debian: libvirt-clients)")
        pytest.skip("virt-xml-validate is missing (Debian: libvirt-clients)")
    return path


def validates(xml: str, tmp_path) -> None:
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    result = subprocess.run([validator(), str(path), "domain"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + xml


@pytest.mark.parametrize("name", ["example.toml", "example.yaml", "dev.toml"])
def test_shipped_definitions_export_valid_xml(name, tmp_path):
    spec = load(os.path.join(ROOT, "machines", name))
    for machine_name, machine in spec.machines.items():
        validates(domain_xml(machine, machine_name), tmp_path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_export_valid_xml(variant, tmp_path):
    machine = loads(VARIANTS[variant], "toml").machines["m"]
    xml = domain_xml(machine, "m")
    validates(xml, tmp_path)
    if variant == "nics":
        assert '<qemu:arg value="socket,id=qemuspec-net3,listen=127.0.0.1:4000" />' in xml, (
            "untyped parts ride on qemu:commandline"
        )
        assert '<qemu:arg value="user,id=qemuspec-net1,restrict=on" />' in xml, (
            "libvirt's own user NIC has no restrict=on"
        )
        assert xml.count('interface type="user"') == 1, (
            "only the outbound NIC is libvirt's user networking"
        )
        assert 'source bridge="br0"' in xml and 'model type="e1000"' in xml
    if variant == "spice-socket":
        assert '<listen type="socket" />' in xml, (
            "a unix socket in libvirt's private directory, not TCP"
        )


def test_render_command_emits_libvirt_xml(tmp_path):
    from test_cli import cli

    result = cli("render", os.path.join(ROOT, "machines", "dev.toml"), "--format", "libvirt")
    assert result.returncode == 0 and result.stdout.startswith("<domain")
    validates(result.stdout, tmp_path)


def test_libvirtd_defines_and_starts_an_exported_machine(system_libvirtd, guest, tmp_path):
    text = open(os.path.join(ROOT, "machines", "dev.toml")).read()
    text = (
        text.replace("../guest/out/vmlinuz", guest["kernel"])
        .replace("../guest/out/initrd.gz", guest["initrd"])
        .replace('accel = "auto"', 'accel = "tcg"')
    )
    path = tmp_path / "dev.toml"
    path.write_text(text.replace("host = 8080", "host = 0"))
    machine = load(path).machines["dev"]
    name = f"qemuspec-test-{os.getpid()}"
    xml = tmp_path / "dev.xml"
    xml.write_text(domain_xml(machine, name))
    virsh = ["virsh", "-c", "qemu:///system"]
    subprocess.run(virsh + ["define", str(xml)], check=True, capture_output=True)
    try:
        started = subprocess.run(virsh + ["start", name], capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
        state = subprocess.run(
            virsh + ["domstate", name], capture_output=True, text=True
        ).stdout.strip()
        assert state == "running"
        status = subprocess.run(
            virsh + ["qemu-monitor-command", name, "--hmp", "info status"],
            capture_output=True,
            text=True,
        ).stdout
        assert "running" in status
        cmdline = subprocess.run(
            virsh + ["qemu-monitor-command", name, "--hmp", "info usernet"],
            capture_output=True,
            text=True,
        ).stdout
        assert "HOST_FORWARD" in cmdline, "the forwards rode through qemu:commandline"
        balloon = subprocess.run(
            virsh + ["qemu-monitor-command", name, "--hmp", "info balloon"],
            capture_output=True,
            text=True,
        )
        assert "No balloon device" in balloon.stdout + balloon.stderr, (
            "no balloon the local argv lacks (<memballoon model=none>)"
        )
    finally:
        subprocess.run(virsh + ["destroy", name], capture_output=True)
        subprocess.run(virsh + ["undefine", name, "--nvram"], capture_output=True)
