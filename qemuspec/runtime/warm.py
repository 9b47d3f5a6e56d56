"""Warm start: a machine's saved state, whether it may be restored, and the save and restore steps.

A boot costs seconds (tens under TCG); a restore of saved RAM and device state costs a fraction of
one. The state lives in the machine's state directory, under ``warm/``:

- ``memory``: qemu's migration stream (RAM and device state). qemu writes it to a file descriptor
  handed over with ``getfd`` and reads it back from one it inherits (``-incoming fd:N``): no shell,
  no helper process, no path on qemu's command line.
- ``key.json``: what the state is valid for, written last (no key, no saved state).
- ``live-diskN.qcow2``: the running machine's disk N, a fresh overlay on top of the frozen disk.

Disk and memory must agree. The save stops the CPUs and puts a new overlay on every writable disk
(``blockdev-snapshot-sync``), so each disk file is frozen at the instant the memory is saved and is
not written again while the saved state is valid; then it migrates to ``memory`` and resumes. Every
restore starts on new overlays on top of the frozen files: writes after the save last until `down`.

The key is everything that makes the state valid: the rendered command line (with the layout's
fixed paths, not fds or ports), the qemu binary's identity (path, device, inode, size, mtime: a new
version is a new file), and the identity of every file the machine reads (kernel, initrd, firmware,
cdroms, disks and their declared bases). Anything different means a cold boot and a fresh save.

A restored guest has the saved clock and RNG state. qemu gives the ``vmgenid`` device (render adds
one to warm machines) a new GUID on each start, and a Linux guest with CONFIG_VMGENID reseeds on that
change; the guest agent, when there is one, sets the clock and reports whether the driver is bound,
else host entropy is mixed into the guest's pool and the shared state is said plainly in the event.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qemuspec.errors import QemuspecError, QMPError

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance
    from qemuspec.spec.models import Machine

FORMAT = 1
FD_NAME = "qemuspec-warm"
SAVE_TIMEOUT = 300.0
VMGENID_BOUND = "/sys/bus/acpi/devices/QEMUVGID:00/driver"  # a directory only while the driver is bound


def warm_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "warm")


def memory_file(state_dir: str) -> str:
    return os.path.join(warm_dir(state_dir), "memory")


def key_file(state_dir: str) -> str:
    return os.path.join(warm_dir(state_dir), "key.json")


def live_disk(state_dir: str, index: int) -> str:
    return os.path.join(warm_dir(state_dir), f"live-disk{index}.qcow2")


@dataclass
class Verdict:
    warm: bool
    why: str

    @property
    def boot(self) -> str:
        return "warm" if self.warm else "cold"

    def as_dict(self) -> dict:
        return {"boot": self.boot, "why": self.why}


def _identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _qemu_identity(binary: str) -> dict:
    found = shutil.which(binary) or binary
    real = os.path.realpath(found)
    return {"path": real, "id": _identity(real)}


def _inputs(machine: "Machine") -> list[str]:
    """Every file the machine reads whose change makes saved state stale."""
    files = [machine.kernel, machine.initrd, machine.firmware.code, *machine.cdrom]
    for disk in machine.disks:
        files += [disk.file, disk.backing]
    return [os.path.abspath(f) for f in files if f]


def key_argv(name: str, machine: "Machine", state_dir: str, accels: tuple[str, ...]) -> list[str]:
    from qemuspec.render import render
    from qemuspec.runtime import paths

    return render(machine, name, paths.layout(state_dir, accel=accels))


def unsupported(machine: "Machine") -> str | None:
    """Why this machine cannot be warm-started at all, if it cannot."""
    if machine.firmware.type == "uefi":
        return "UEFI machines are not warm-started (the variable store is not frozen with the disks)"
    if machine.shares:
        return "machines with shares are not warm-started (9p and virtiofs state cannot be saved)"
    return None


def read(state_dir: str) -> dict | None:
    try:
        with open(key_file(state_dir), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def check(name: str, machine: "Machine", state_dir: str, accels: tuple[str, ...] | None = None) -> Verdict:
    """Would the next start of this machine restore its saved state, and why (not)."""
    if not machine.warm:
        return Verdict(False, "warm start is off (warm = true, or up --warm)")
    reason = unsupported(machine)
    if reason:
        return Verdict(False, reason)
    record = read(state_dir)
    if record is None:
        return Verdict(False, "no saved state yet: this start saves one once the machine is ready")
    if accels is None:
        from qemuspec.runtime import accel as accel_mod

        accels = accel_mod.resolve(machine.accel)
    if record.get("argv") != key_argv(name, machine, state_dir, accels):
        return Verdict(False, "the definition changed since the save (rendered command line differs)")
    if record.get("qemu") != _qemu_identity(machine.qemu):
        return Verdict(False, f"the qemu binary changed since the save (was {record.get('qemu_version') or 'another build'})")
    saved_files = record.get("files") or {}
    for path in _inputs(machine):
        if saved_files.get(path) != _identity(path):
            return Verdict(False, f"{path} changed since the save")
    if (_identity(memory_file(state_dir)) or [0, 0, -1])[2] != record.get("memory_bytes"):
        return Verdict(False, "the saved memory file is missing or truncated")
    age = time.time() - record.get("saved_at", time.time())
    return Verdict(True, f"restore the state saved {_ago(age)} ago")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def discard(state_dir: str) -> None:
    """Forget the saved state (the key first, so a half-removed state is never taken for valid)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(key_file(state_dir))
    shutil.rmtree(warm_dir(state_dir), ignore_errors=True)


# -- save ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _monitor(inst: "Instance"):
    """A monitor on a unix socket (getfd needs SCM_RIGHTS): the main one, or the client one when
    the main monitor is on TCP."""
    if inst.qmp is not None and inst.qmp_address and inst.qmp_address.startswith("unix:"):
        yield inst.qmp
        return
    from qemuspec.qmp.sync import QMPClient

    with QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=5) as client:
        yield client


def save(inst: "Instance") -> dict:
    """Freeze a ready machine's disks and save its RAM and devices; resume it. Returns what was saved."""
    machine, state_dir = inst.machine, inst.state_dir
    discard(state_dir)
    os.makedirs(warm_dir(state_dir), mode=0o700, exist_ok=True)
    began = time.monotonic()
    tmp = memory_file(state_dir) + ".tmp"
    with _monitor(inst) as qmp:
        version = qmp.command("query-version").get("qemu", {})
        qemu_version = f"{version.get('major')}.{version.get('minor')}.{version.get('micro')}"
        qmp.command("stop")
        try:
            from qemuspec.render import own

            for index, disk in enumerate(machine.disks):
                if not disk.readonly:
                    qmp.command("blockdev-snapshot-sync", {"device": own(f"disk{index}"), "snapshot-file": live_disk(state_dir, index), "format": "qcow2"})
            qmp.command("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            qmp.command("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                qmp.command("getfd", {"fdname": FD_NAME}, fds=(fd,))
            finally:
                os.close(fd)
            mark = qmp.event_count
            qmp.command("migrate", {"uri": f"fd:{FD_NAME}"})
            event = qmp.wait_for("MIGRATION", SAVE_TIMEOUT, lambda e: e["data"].get("status") in ("completed", "failed", "cancelled"), since=mark)
            if event["data"]["status"] != "completed":
                error = qmp.command("query-migrate").get("error-desc", event["data"]["status"])
                raise QemuspecError(f"qemu could not save machine {inst.name}: {error}")
            os.replace(tmp, memory_file(state_dir))
            files = {path: _identity(path) for path in _inputs(machine)}  # disks are flushed and frozen now
            size = os.path.getsize(memory_file(state_dir))
            record = {
                "format": FORMAT, "saved_at": time.time(), "argv": key_argv(inst.name, machine, state_dir, inst.layout.accel),
                "qemu": _qemu_identity(machine.qemu), "qemu_version": qemu_version, "files": files,
                "memory_bytes": size, "memory_mib": machine.memory,
            }
            from qemuspec.runtime import statedir

            statedir.write(os.path.dirname(key_file(state_dir)), os.path.basename(key_file(state_dir)), record)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            with contextlib.suppress(QemuspecError):
                if not machine.paused:
                    qmp.command("cont")
    return {"seconds": round(time.monotonic() - began, 3), "bytes": size}


# -- restore ------------------------------------------------------------------------------------


def restore_machine(machine: "Machine", state_dir: str) -> "Machine":
    """The machine as a restore runs it: every writable disk on a fresh overlay of its frozen file."""
    from qemuspec import img

    disks = []
    for index, disk in enumerate(machine.disks):
        if disk.readonly:
            disks.append(disk)
            continue
        live = live_disk(state_dir, index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(live)
        img.create(live, format="qcow2", backing=os.path.abspath(disk.file), backing_format=disk.format)
        disks.append(disk.model_copy(update={"file": live, "format": "qcow2", "backing": None, "backing_format": None, "size": None}))
    return machine.model_copy(update={"disks": disks}) if disks else machine


def wait_restored(inst: "Instance", mark: int, timeout: float) -> None:
    """Until qemu has loaded the saved state (it runs by itself afterwards, unless paused)."""
    assert inst.qmp is not None
    try:
        event = inst.qmp.wait_for("MIGRATION", timeout, lambda e: e["data"].get("status") in ("completed", "failed"), since=mark)
    except QemuspecError as exc:
        raise QemuspecError(f"the saved state did not load: {exc}") from None
    if event["data"]["status"] != "completed":
        raise QemuspecError("qemu could not load the saved state")
    if not inst.machine.paused:
        inst.qmp.command("cont")  # the state was saved with the CPUs stopped, so it loads paused


def after_restore(inst: "Instance") -> dict[str, Any]:
    """Make a restored guest its own: clock from the host, RNG reseeded. Returns what was done."""
    from qemuspec.render import wants_vmgenid

    machine = inst.machine
    vmgenid = wants_vmgenid(machine) or any(d.driver == "vmgenid" for d in machine.devices)
    info: dict[str, Any] = {}
    if not machine.agent:
        info["clock"] = "not set (no guest agent): the guest clock runs from the time of the save"
        info["rng"] = ("new vmgenid: reseeded if the guest has a vmgenid driver (Linux CONFIG_VMGENID), "
                       "else restores share RNG state" if vmgenid else
                       "shared between restores (no vmgenid device on this machine type, no guest agent)")
        return info
    from qemuspec.runtime.agent import GuestAgent

    try:
        with GuestAgent(inst.layout.qga, timeout=5.0) as agent:
            agent.sync()
            info["clock"] = _set_clock(agent)
            bound = vmgenid and _exists(agent, VMGENID_BOUND)
            if bound:
                info["rng"] = "reseeded by the guest's vmgenid driver"
            else:
                agent.write_file("/dev/urandom", os.urandom(64))
                info["rng"] = ("shared until the guest reseeds (it has no vmgenid driver): "
                               "host entropy was mixed into its pool through the agent")
    except QemuspecError as exc:
        info.setdefault("clock", f"not set: {exc}")
        info.setdefault("rng", f"unknown: the guest agent did not answer ({exc})")
    return info


def _set_clock(agent: Any) -> str:
    try:
        agent.command("guest-set-time", {"time": time.time_ns()})
    except QMPError as exc:
        if "hwclock" not in exc.desc:
            raise
        return "set from the host (the guest's hardware clock was not updated)"
    return "set from the host"


def _exists(agent: Any, path: str) -> bool:
    try:
        handle = agent.file_open(path, "r")
    except QMPError:
        return False
    agent.file_close(handle)
    return True
