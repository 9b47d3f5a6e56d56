"""The renderer: deterministic argv, every typed field rendered, and no value able to add an option."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import option_args, qemu_options
from qemuspec.errors import SpecError
from qemuspec.render import escape, render
from qemuspec.runtime.paths import Layout
from qemuspec.spec import load, loads
from qemuspec.spec.models import Machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = Layout("/state/web", "/run/q/abc", ("tcg",))


def argv_of(**fields) -> list[str]:
    return render(Machine.model_validate(fields, context={"base_dir": "/defs"}), "web", LAYOUT)


def test_example_renders_the_same_from_toml_and_yaml():
    a = load(os.path.join(ROOT, "machines", "example.toml")).machines["web"]
    b = load(os.path.join(ROOT, "machines", "example.yaml")).machines["web"]
    assert render(a, "web", LAYOUT) == render(b, "web", LAYOUT)


def test_render_is_deterministic_and_pure():
    machine = load(os.path.join(ROOT, "machines", "example.toml")).machines["web"]
    before = machine.model_dump()
    assert render(machine, "web", LAYOUT) == render(machine, "web", LAYOUT)
    assert machine.model_dump() == before


def test_example_argv_in_detail():
    argv = render(
        load(os.path.join(ROOT, "machines", "example.toml")).machines["web"], "web", LAYOUT
    )
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert (
        "-machine type=q35" in joined
        and "-accel tcg" in joined
        and "-smp 2" in joined
        and "-m 256M" in joined
    )
    assert "-nodefaults -no-user-config" in joined
    assert "-pidfile /state/web/qemu.pid" in joined
    assert "socket,id=qemuspec-qmp,path=/run/q/abc/qmp.sock,server=on,wait=off" in argv
    assert "socket,id=qemuspec-serial0,path=/run/q/abc/console.sock,server=on,wait=off" in argv
    assert (
        f"if=none,id=qemuspec-disk0,file={ROOT}/machines/web.qcow2,format=qcow2,cache=unsafe"
        in argv
    )
    assert (
        "user,id=qemuspec-net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:0-:22"
        in argv
    )
    assert argv[-2:] == ["-rtc", "base=utc"], "append goes last, verbatim"


def test_commas_in_values_are_doubled():
    argv = argv_of(disks=[{"file": "/a,b=c d'\"e.img", "format": "raw"}])
    drive = argv[argv.index("-drive") + 1]
    assert "file=/a,,b=c d'\"e.img" in drive
    head, pairs = qemu_options(drive)
    assert dict(pairs)["file"] == "/a,b=c d'\"e.img"
    assert [k for k, _ in pairs] == ["if", "id", "file", "format"]


def test_escape():
    assert escape(True) == "on" and escape(False) == "off"
    assert escape(3) == "3" and escape("a,b") == "a,,b" and escape(",,") == ",,,,"


def test_options_maps_pass_through_and_override_typed_keys():
    argv = argv_of(
        disks=[
            {
                "file": "d.img",
                "format": "raw",
                "options": {"cache": "none", "aio": "native", "format": "qcow2"},
            }
        ]
    )
    _, pairs = qemu_options(argv[argv.index("-drive") + 1])
    assert dict(pairs) == {
        "if": "none",
        "id": "qemuspec-disk0",
        "file": "/defs/d.img",
        "format": "qcow2",
        "cache": "none",
        "aio": "native",
    }


def test_a_layout_without_resolved_accelerators_is_refused():
    """ "auto" is resolved once (runtime/paths.machine_layout), never guessed by the renderer."""
    with pytest.raises(ValueError, match="machine_layout"):
        render(Machine(accel="auto"), "x", Layout("/s", "/r"))
    machine = Machine(accel=["kvm", "tcg"])
    argv = render(machine, "x", Layout("/s", "/r", ("tcg",)))
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-accel"] == ["tcg"]


def test_pre_opened_sockets_render_as_fds_and_tcp_qmp_binds_loopback():
    machine = Machine(qmp={"transport": "tcp", "port": 5000}, agent=True)
    argv = render(
        machine,
        "x",
        Layout("/s", "/r", ("tcg",), qmp_port=5001, fds={"console": 7, "qga": 8, "qmp-client": 9}),
    )
    assert (
        "socket,id=qemuspec-qmp-tcp,host=127.0.0.1,port=5001,server=on,wait=off,tls-creds=qemuspec-qmp-tls"
        in argv
    )
    assert "tls-creds-x509,id=qemuspec-qmp-tls,dir=/r/tls,endpoint=server,verify-peer=on" in argv
    assert "socket,id=qemuspec-qmp,path=/r/qmp.sock,server=on,wait=off" in argv, (
        "the controller keeps its unix monitor"
    )
    assert "socket,id=qemuspec-qmp-client,fd=9,server=on,wait=off" in argv
    assert "socket,id=qemuspec-serial0,fd=7,server=on,wait=off" in argv
    assert "socket,id=qemuspec-qga0,fd=8,server=on,wait=off" in argv
    assert (
        "virtserialport,bus=qemuspec-vser0.0,chardev=qemuspec-qga0,name=org.qemu.guest_agent.0"
        in argv
    )


TYPED = [
    (
        {"kernel": "k", "initrd": "i", "cmdline": "console=ttyS0 a,b"},
        ["-kernel", "/defs/k", "-initrd", "/defs/i", "-append", "console=ttyS0 a,b"],
    ),
    (
        {"firmware": "uefi"},
        [
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive",
            "if=pflash,format=raw,unit=1,file=/state/web/efivars.fd",
        ],
    ),
    ({"firmware": {"type": "bios", "code": "/fw/bios.bin"}}, ["-bios", "/fw/bios.bin"]),
    (
        {"cdrom": "boot.iso", "boot_order": "dc"},
        [
            "-boot",
            "order=dc",
            "-drive",
            "if=none,id=qemuspec-cd0,media=cdrom,readonly=on,format=raw,file=/defs/boot.iso",
            "-device",
            "ide-cd,drive=qemuspec-cd0",
        ],
    ),
    (
        {"shares": [{"source": "/srv", "tag": "srv", "readonly": True}]},
        [
            "-fsdev",
            "local,id=qemuspec-fs0,path=/srv,security_model=mapped-xattr,readonly=on",
            "-device",
            "virtio-9p-pci,fsdev=qemuspec-fs0,mount_tag=srv",
        ],
    ),
    (
        {"shares": [{"type": "virtiofs", "source": "/srv", "tag": "srv"}], "memory": "1G"},
        [
            "-machine",
            "type=q35,memory-backend=qemuspec-mem0",
            "-object",
            "memory-backend-memfd,id=qemuspec-mem0,size=1024M,share=on",
            "-chardev",
            "socket,id=qemuspec-vfs0,path=/run/q/abc/virtiofs0.sock",
            "-device",
            "vhost-user-fs-pci,chardev=qemuspec-vfs0,tag=srv",
        ],
    ),
    (
        {"display": "vnc"},
        ["-vga", "std", "-display", "none", "-vnc", "unix:/run/q/abc/display.sock"],
    ),
    (
        {"display": {"type": "vnc", "port": 5905, "options": {"lossy": True}}},
        ["-vnc", "127.0.0.1:5,password=on,lossy=on"],
    ),
    (
        {"display": {"type": "vnc", "listen": "127.0.0.1", "unauthenticated": True}},
        ["-vnc", "127.0.0.1:0"],
    ),
    (
        {"display": {"type": "spice"}},
        ["-spice", "unix=on,addr=/run/q/abc/display.sock,disable-ticketing=on"],
    ),
    ({"display": {"type": "spice", "port": 5931}}, ["-spice", "addr=127.0.0.1,port=5931"]),
    (
        {"display": {"type": "spice", "port": 5931, "unauthenticated": True}},
        ["-spice", "addr=127.0.0.1,port=5931,disable-ticketing=on"],
    ),
    ({"display": "gtk"}, ["-vga", "std", "-display", "gtk"]),
    (
        {"rng": True},
        [
            "-object",
            "rng-random,id=qemuspec-rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-pci,rng=qemuspec-rng0",
        ],
    ),
    (
        {
            "devices": [
                {"driver": "virtio-balloon-pci", "id": "b0", "options": {"deflate-on-oom": True}}
            ]
        },
        ["-device", "virtio-balloon-pci,id=b0,deflate-on-oom=on"],
    ),
    (
        {"objects": [{"type": "memory-backend-ram", "id": "m0", "options": {"size": "1G"}}]},
        ["-object", "memory-backend-ram,id=m0,size=1G"],
    ),
    (
        {
            "disks": [
                {"file": "a", "interface": "scsi"},
                {"file": "b", "interface": "nvme"},
                {"file": "c", "interface": "ide", "serial": "S1"},
            ]
        },
        [
            "-device",
            "virtio-scsi-pci,id=qemuspec-scsi0",
            "-device",
            "scsi-hd,drive=qemuspec-disk0,bus=qemuspec-scsi0.0",
            "-device",
            "nvme,drive=qemuspec-disk1,serial=qemuspec-disk1",
            "-device",
            "ide-hd,drive=qemuspec-disk2,serial=S1",
        ],
    ),
    (
        {"nics": [{"type": "socket", "listen": "127.0.0.1:5555", "mac": "52:54:00:12:34:56"}]},
        [
            "-netdev",
            "socket,id=qemuspec-net0,listen=127.0.0.1:5555",
            "-device",
            "virtio-net-pci,netdev=qemuspec-net0,mac=52:54:00:12:34:56",
        ],
    ),
    (
        {"nics": [{"type": "stream", "connect": "127.0.0.1:5555"}]},
        [
            "-netdev",
            "stream,id=qemuspec-net0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=5555",
        ],
    ),
    (
        {"nics": [{"type": "stream", "listen": "/tmp/lan.sock"}]},
        ["-netdev", "stream,id=qemuspec-net0,server=on,addr.type=unix,addr.path=/tmp/lan.sock"],
    ),
    (
        {"nics": [{"type": "tap", "ifname": "tap0"}]},
        ["-netdev", "tap,id=qemuspec-net0,ifname=tap0,script=no,downscript=no"],
    ),
    (
        {"nics": [{"type": "bridge", "bridge": "br0", "model": "e1000"}]},
        ["-netdev", "bridge,id=qemuspec-net0,br=br0", "-device", "e1000,netdev=qemuspec-net0"],
    ),
    (
        {"nics": [{"forwards": [{"host": 0, "guest": 53, "protocol": "udp"}]}]},
        ["-netdev", "user,id=qemuspec-net0,restrict=on,hostfwd=udp:127.0.0.1:0-:53"],
    ),
    (
        {"nics": [{"outbound": True}]},
        ["-netdev", "user,id=qemuspec-net0", "-device", "virtio-net-pci,netdev=qemuspec-net0"],
    ),
    (
        {"serial": "pty"},
        [
            "-chardev",
            "pty,id=qemuspec-serial0,logfile=/state/web/serial.log,logappend=on",
            "-serial",
            "chardev:qemuspec-serial0",
        ],
    ),
    ({"serial": "none"}, ["-serial", "none"]),
    (
        {"paused": True, "cpu": "host", "cpu_options": {"pmu": False}},
        ["-cpu", "host,pmu=off", "-S", "-chardev"],
    ),
    (
        {"machine": "pc", "machine_options": {"kernel-irqchip": "split"}},
        ["-machine", "type=pc,kernel-irqchip=split"],
    ),
]


@pytest.mark.parametrize("fields,expected", TYPED, ids=[",".join(f) for f, _ in TYPED])
def test_typed_fields_render(fields, expected):
    argv = argv_of(**fields)
    for i in range(0, len(expected), 2):
        pair = expected[i : i + 2]
        assert any(argv[j : j + 2] == pair for j in range(len(argv))), f"{pair} not in {argv}"


# -- property: no value can add an option -------------------------------------------------------

nasty = st.text(alphabet=st.sampled_from(list("ab,=\"' \\:-/.x\n\t%$;|&")), min_size=1, max_size=20)
value = st.one_of(nasty, st.integers(-5, 10**6), st.booleans())
ident = st.from_regex(r"\A[a-z][a-z0-9-]{0,8}\Z")


@st.composite
def raw_machine(draw):
    """Machine dicts with hostile strings; some invalid on purpose (bad types, bad keys)."""
    machine = {}
    if draw(st.booleans()):
        machine["disks"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"file": st.one_of(nasty, st.integers())},
                    optional={
                        "format": st.sampled_from(["raw", "qcow2", "bad fmt"]),
                        "options": st.dictionaries(st.one_of(ident, nasty), value, max_size=3),
                        "interface": st.sampled_from(["virtio", "ide", "nvme", "scsi", "floppy"]),
                    },
                ),
                max_size=3,
            )
        )
    if draw(st.booleans()):
        machine["shares"] = draw(
            st.lists(
                st.fixed_dictionaries({"source": nasty, "tag": st.one_of(ident, nasty)}), max_size=2
            )
        )
    if draw(st.booleans()):
        machine["cdrom"] = draw(st.lists(nasty, max_size=2))
    if draw(st.booleans()):
        machine["devices"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"driver": st.one_of(ident, nasty)},
                    optional={"options": st.dictionaries(ident, value, max_size=3)},
                ),
                max_size=2,
            )
        )
    if draw(st.booleans()):
        machine["kernel"] = draw(nasty)
        machine["cmdline"] = draw(nasty)
    if draw(st.booleans()):
        machine["memory"] = draw(
            st.one_of(st.integers(-1, 4096), nasty, st.sampled_from(["1G", "256M", "1.5G"]))
        )
    if draw(st.booleans()):
        machine["nics"] = [
            {
                "forwards": [
                    {"host": draw(st.integers(-1, 70000)), "guest": draw(st.integers(0, 70000))}
                ]
            }
        ]
    return machine


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_machine())
def test_generated_specs_validate_or_fail_cleanly_and_never_split(raw):
    import json

    try:
        spec = loads(
            json.dumps({"machines": {"m": raw}}), "yaml", source="gen.yaml", base_dir="/defs"
        )
    except SpecError as exc:
        event("invalid spec")
        assert exc.problems and all(p.startswith("gen.yaml") for p in exc.problems)
        return
    event("valid spec")
    machine = spec.machines["m"]
    argv = render(machine, "m", LAYOUT)
    options = option_args(argv)
    drives = [qemu_options(v)[1] for s, v in options if s == "-drive" and "id=qemuspec-disk" in v]
    assert len(drives) == len(machine.disks)
    for disk, pairs in zip(machine.disks, drives):
        parsed = dict(pairs)
        assert parsed["file"] == disk.options.get("file", disk.file)
        expected_keys = (
            {"if", "id", "file"} | ({"format"} if disk.format else set()) | set(disk.options)
        )
        assert set(parsed) == expected_keys
        for key, val in disk.options.items():
            assert parsed[key] == escape(val).replace(",,", ",")
    for share, (_, text) in zip(machine.shares, [o for o in options if o[0] == "-fsdev"]):
        assert dict(qemu_options(text)[1])["path"] == share.source
    for iso, (_, text) in zip(
        machine.cdrom, [o for o in options if o[0] == "-drive" and "media=cdrom" in o[1]]
    ):
        assert dict(qemu_options(text)[1])["file"] == iso
    for switch, text in options:
        head, pairs = qemu_options(text)
        for key, _ in pairs:
            assert key and all(c.isalnum() or c in "_.+-" for c in key), (
                f"injected key {key!r} in {switch} {text!r}"
            )
    if machine.kernel:
        assert argv[argv.index("-kernel") + 1] == machine.kernel
        assert argv[argv.index("-append") + 1] == machine.cmdline


def test_qemu_option_parsing_reference():
    assert qemu_options("a,,b,c=d,,e,readonly") == ("a,b", [("c", "d,e"), ("readonly", "on")])
