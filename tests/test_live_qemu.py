"""Live changes to a running qemu (runtime/live.py) with the real test guest under TCG: forwards,
disks, the balloon and the run state change while the guest keeps running, each judged by qemu and
by the guest itself, and each proving the guest did not reboot (the same qemu pid, /proc/uptime
still growing, a file in the guest's RAM-backed root still there). One guest serves the module;
every test puts the machine back as it found it."""

from __future__ import annotations

import socket
import time

import pytest

from qemuspec import Qemu
from qemuspec.errors import QMPError
from qemuspec.runtime import live
from qemuspec.spec.models import Machine

READY_TIMEOUT = 90
MARK = "/tmp/qemuspec-live-mark"


class Guest:
    """The running machine and what it looked like when it booted."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.pid = vm.pid
        self.machine: Machine = vm.model  # what the running qemu is now (tests update it)
        self.uptime = self.read_uptime()

    @property
    def qmp(self):
        return self.vm.instance.qmp

    @property
    def layout(self):
        return self.vm.instance.layout

    def sh(self, script: str, timeout: float = 30.0) -> str:
        code, out, err = self.vm.exec("/bin/sh", "-c", script, timeout=timeout)
        assert code == 0, f"{script!r} exited {code}: {out!r} {err!r}"
        return out.decode()

    def read_uptime(self) -> float:
        return float(self.sh("cat /proc/uptime").split()[0])

    def assert_not_rebooted(self) -> None:
        """Same qemu process, the guest's clock still counting from the same boot, its RAM intact."""
        assert self.vm.pid == self.pid and self.vm.running()
        now = self.read_uptime()
        assert now > self.uptime, f"guest uptime went from {self.uptime} to {now}: it rebooted"
        self.uptime = now
        assert self.sh(f"cat {MARK}").strip() == "still here"

    def change(self, fields: list[str], **update: object) -> list[str]:
        """live.apply from the current machine to one with ``update``; the new one becomes current."""
        new = changed(self.machine, **update)
        steps = live.apply(self.qmp, "live", self.machine, new, self.layout, fields)
        self.machine = new
        return steps

    def wait_guest(self, script: str, timeout: float = 30.0) -> str:
        """Run ``script`` in the guest until it exits 0 (the guest reacts to a hot-plug in its own
        time); its output."""
        deadline = time.monotonic() + timeout
        while True:
            code, out, err = self.vm.exec("/bin/sh", "-c", script, timeout=timeout)
            if code == 0:
                return out.decode()
            if time.monotonic() > deadline:
                raise AssertionError(f"{script!r} still exits {code} after {timeout} s: {err!r}")
            time.sleep(0.2)


def changed(machine: Machine, **update: object) -> Machine:
    data = machine.model_dump(mode="json")
    data.update(update)
    return Machine.model_validate(data)


@pytest.fixture(scope="module")
def running(guest, tmp_path_factory):
    state = tmp_path_factory.mktemp("live-state")
    media = tmp_path_factory.mktemp("live-media")
    for disc in ("one.iso", "two.iso"):
        (media / disc).write_bytes(disc.encode().ljust(2048, b"\0"))
    vm = Qemu(state_dir=str(state)).vm("live")
    vm.kernel(guest["kernel"]).initrd(guest["initrd"]).cmdline("console=ttyS0 quiet")
    vm.memory("256M").rng().agent().nic("user")
    vm.device("pcie-root-port", id="hp0", chassis=1)  # q35 hot-plugs only into a root port
    vm.set(balloon=True, accel="tcg", cdrom=[str(media / "one.iso")])
    vm.ready(serial=guest["marker"], timeout=READY_TIMEOUT)
    vm.start()
    try:
        g = Guest(vm)
        g.sh(f"echo 'still here' > {MARK}")
        yield g
    finally:
        vm.quit()


def _http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.settimeout(10)
        return sock.recv(64)


def _forward(g: Guest, guest_port: int) -> int:
    ports = [
        f["host"] for f in live.usernet(g.qmp).get("qemuspec-net0", []) if f["guest"] == guest_port
    ]
    assert len(ports) == 1, ports
    return ports[0]


def test_added_forward_serves_http_and_removed_one_is_closed(running):
    g = running
    nic = g.machine.model_dump(mode="json")["nics"][0]
    with_forward = {**nic, "forwards": [{"host": 0, "guest": 80}]}
    steps = g.change(["nics[0].forwards"], nics=[with_forward])
    port = _forward(g, 80)
    assert steps == [f"forward 127.0.0.1:{port}->80/tcp added"]
    assert _http(port).startswith(b"HTTP/1."), "the guest's httpd answers through the new forward"
    g.assert_not_rebooted()

    g.change(["nics"], nics=[{**nic, "forwards": []}])
    assert live.usernet(g.qmp).get("qemuspec-net0") == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    g.assert_not_rebooted()


def test_forward_on_a_taken_port_is_refused_naming_the_holder_and_nothing_is_done(running):
    g = running
    nic = g.machine.model_dump(mode="json")["nics"][0]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        forwards = [{"host": 0, "guest": 7777}, {"host": taken, "guest": 80}]
        with pytest.raises(live.LiveChangeFailed) as failed:
            g.change(["nics"], nics=[{**nic, "forwards": forwards}])
    assert (
        f"127.0.0.1:{taken}/tcp" in failed.value.reason and "in use by pid" in failed.value.reason
    )
    assert live.usernet(g.qmp).get("qemuspec-net0") == [], "nor the other forward added"
    g.assert_not_rebooted()


def test_hot_added_disk_is_written_and_hot_removed_one_is_gone(running, tmp_path):
    g = running
    image = tmp_path / "extra.raw"
    disk = {"file": str(image), "format": "raw", "size": "8M", "serial": "livedisk"}
    steps = g.change(["disks"], disks=[disk])
    assert steps == [f"disk {image} added (virtio-blk-pci)"]
    assert image.exists(), "created the way up creates a disk"
    blocks = [
        b for b in g.qmp.command("query-block") if b.get("inserted", {}).get("file") == str(image)
    ]
    assert blocks and "qemuspec-hd" in blocks[0]["qdev"]
    dev = g.wait_guest(
        "for b in /sys/block/vd*; do grep -qx livedisk $b/serial && echo ${b##*/}; done | grep ."
    )
    dev = dev.strip()
    g.sh(f"echo qemuspec-live-write | dd of=/dev/{dev} conv=fsync 2>/dev/null")
    g.assert_not_rebooted()

    steps = g.change(["disks"], disks=[])
    assert steps == [f"disk {image} removed"]
    assert not [
        b for b in g.qmp.command("query-block") if b.get("inserted", {}).get("file") == str(image)
    ]
    g.wait_guest(f"test ! -e /sys/block/{dev}")
    with open(image, "rb") as f:
        assert f.read(20) == b"qemuspec-live-write\n", "the guest's write reached the image"
    g.assert_not_rebooted()


def test_balloon_takes_memory_from_the_guest(running):
    g = running

    def mem_total() -> int:
        line = g.sh("grep MemTotal /proc/meminfo")
        return int(line.split()[1]) * 1024

    before = mem_total()
    steps = g.change(["memory"], memory="160M")
    assert steps == ["memory 160M (balloon)"]
    assert abs(g.qmp.command("query-balloon")["actual"] - 160 * 2**20) < 2**20
    after = mem_total()
    assert before - after >= 90 * 2**20, (before, after)
    g.assert_not_rebooted()

    with pytest.raises(live.LiveChangeFailed, match="more than the 256M"):
        g.change(["memory"], memory="512M")
    g.change(["memory"], memory="256M")
    assert mem_total() >= before - 2**20
    g.assert_not_rebooted()


def test_paused_stops_and_continues_the_cpus(running):
    g = running
    assert g.change(["paused"], paused=True) == ["paused"]
    assert g.qmp.command("query-status")["status"] == "paused"
    assert g.change(["paused"], paused=False) == ["resumed"]
    assert g.qmp.command("query-status")["status"] == "running"
    g.assert_not_rebooted()


def test_link_down_and_up_reaches_the_guest_as_carrier(running):
    """set_link is what a NIC's link field applies (the model has no such field yet): the guest is
    the judge here, since qemu 7.2 reads no link state back."""
    g = running
    live.set_link(g.qmp, 0, False)
    g.wait_guest("test $(cat /sys/class/net/eth0/carrier) = 0")
    live.set_link(g.qmp, 0, True)
    g.wait_guest("test $(cat /sys/class/net/eth0/carrier) = 1")
    with pytest.raises(QMPError, match="qemuspec-net5"):
        live.set_link(g.qmp, 5, True)
    g.assert_not_rebooted()


def test_cdrom_medium_changes_in_place(running):
    g = running
    one = g.machine.cdrom[0]
    two = one.replace("one.iso", "two.iso")

    def medium() -> str:
        (block,) = [b for b in g.qmp.command("query-block") if b["device"] == "qemuspec-cd0"]
        return block["inserted"]["image"]["filename"]

    assert g.change(["cdrom"], cdrom=[two]) == [f"cdrom[0]: medium {two}"]
    assert medium() == two
    with pytest.raises(live.LiveChangeFailed, match="is not a file"):
        g.change(["cdrom"], cdrom=[two + ".missing"])
    assert medium() == two
    g.change(["cdrom[0]"], cdrom=[one])
    assert medium() == one
    g.assert_not_rebooted()


def test_a_change_qemu_cannot_make_live_is_refused_before_anything_is_done(running, tmp_path):
    g = running
    nic = g.machine.model_dump(mode="json")["nics"][0]
    before = g.machine
    with pytest.raises(live.LiveChangeFailed, match="ide disk is not hot-plugged"):
        g.change(
            ["nics", "disks"],
            nics=[{**nic, "forwards": [{"host": 0, "guest": 22}]}],
            disks=[{"file": str(tmp_path / "ide.raw"), "size": "1M", "interface": "ide"}],
        )
    assert g.machine is before
    assert live.usernet(g.qmp).get("qemuspec-net0") == []
    assert not (tmp_path / "ide.raw").exists()
    with pytest.raises(live.LiveChangeFailed, match="cpus cannot change in a running qemu"):
        g.change(["cpus"], cpus=2)
    assert (
        g.change(["stop_timeout"], stop_timeout="9s") == []
    )  # the supervisor's field: nothing here
    g.assert_not_rebooted()


def test_a_change_failing_half_way_is_undone(running, tmp_path):
    g = running
    nic = g.machine.model_dump(mode="json")["nics"][0]
    missing = tmp_path / "missing.raw"  # no size: up would not create it either
    with pytest.raises(live.LiveChangeFailed, match=f"disk {missing} does not exist"):
        g.change(
            ["nics", "disks"],
            nics=[{**nic, "forwards": [{"host": 0, "guest": 22}]}],
            disks=[{"file": str(missing), "format": "raw"}],
        )
    assert live.usernet(g.qmp).get("qemuspec-net0") == [], "the forward it had added is removed"
    assert not [b for b in g.qmp.command("query-block") if b["device"] != "qemuspec-cd0"]
    g.assert_not_rebooted()


def test_disks_declared_at_boot_are_unplugged_on_pc_and_scsi_ones_plugged(guest, tmp_path):
    """i440fx's root bus takes ACPI hot-plug, so a virtio disk from the command line (-drive) goes
    too, its drive with it; a scsi disk goes onto (and off) render's SCSI controller; a forward on
    every address goes in the same change."""
    boot, scsi, extra = (tmp_path / n for n in ("boot.raw", "scsi.raw", "extra.qcow2"))
    for image in (boot, scsi):
        image.write_bytes(b"\0" * 2**20)
    vm = Qemu(state_dir=str(tmp_path / "state")).vm("pc")
    vm.kernel(guest["kernel"]).initrd(guest["initrd"]).cmdline("console=ttyS0 quiet")
    vm.memory("256M").rng().agent()
    vm.nic("user", forwards=[{"host": 0, "guest": 80, "address": "0.0.0.0"}])
    disks = [
        {"file": str(boot), "format": "raw"},
        {"file": str(scsi), "format": "raw", "interface": "scsi"},
    ]
    vm.set(machine="pc", accel="tcg", disks=disks)
    vm.ready(serial=guest["marker"], timeout=READY_TIMEOUT)
    vm.start()
    try:
        g = Guest(vm)
        g.sh(f"echo 'still here' > {MARK}")
        g.wait_guest("test -e /sys/block/vda")
        port = _forward(g, 80)
        nic = g.machine.model_dump(mode="json")["nics"][0]
        added = {"file": str(extra), "format": "qcow2", "size": "4M", "interface": "scsi"}
        steps = g.change(
            ["disks", "nics[0].forwards"],
            disks=[disks[1], added],
            nics=[{**nic, "forwards": []}],
        )
        assert steps == [
            f"disk {boot} removed",
            f"disk {extra} added (scsi-hd)",
            f"forward 0.0.0.0:{port}->80/tcp removed",
        ]
        files = {b["inserted"]["file"]: b for b in g.qmp.command("query-block")}
        assert set(files) == {str(scsi), str(extra)}
        assert "qemuspec-hd" in files[str(extra)]["qdev"]
        assert live.usernet(g.qmp) == {"qemuspec-net0": []}
        g.wait_guest("test ! -e /sys/block/vda")
        g.assert_not_rebooted()

        assert g.change(["disks"], disks=[]) == [f"disk {scsi} removed", f"disk {extra} removed"]
        assert g.qmp.command("query-block") == []
        g.assert_not_rebooted()
    finally:
        vm.quit()


def test_a_boot_disk_on_q35s_root_bus_is_refused_before_anything_is_done():
    """qemu says "Bus 'pcie.0' does not support hotplugging" to that device_del: refused up front."""
    machine = Machine.model_validate({"disks": [{"file": "/images/root.raw", "format": "raw"}]})
    block = {
        "device": "qemuspec-disk0",
        "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
        "inserted": {"file": "/images/root.raw", "image": {"filename": "/images/root.raw"}},
    }
    with pytest.raises(live.LiveChangeFailed, match="q35's root bus takes no hot-unplug"):
        live._removable("web", machine, machine.disks[0], [block], {"hp0": []})


class FakeMonitor:
    """Answers ``info usernet`` as qemu 7.2 prints it (two user netdevs)."""

    def command(self, name: str, arguments: dict | None = None) -> object:
        assert name == "human-monitor-command" and arguments == {"command-line": "info usernet"}
        return (
            "Hub -1 (qemuspec-net0):\r\n"
            "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
            "  TCP[HOST_FORWARD]  14       127.0.0.1 35715       10.0.2.15    22     0     0\r\n"
            "  UDP[HOST_FORWARD]  15               * 5353       10.0.2.15    53     0     0\r\n"
            "Hub -1 (qemuspec-net1):\r\n"
            "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
        )


def test_usernet_reads_each_netdevs_forwards():
    assert live.usernet(FakeMonitor()) == {
        "qemuspec-net0": [
            {"protocol": "tcp", "address": "127.0.0.1", "host": 35715, "guest": 22},
            {"protocol": "udp", "address": "0.0.0.0", "host": 5353, "guest": 53},
        ],
        "qemuspec-net1": [],
    }
