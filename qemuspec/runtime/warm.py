"""Warm start: a machine's saved state, whether it may be restored, and the save and restore steps.

A boot costs seconds (tens under TCG); a restore of saved RAM and device state costs a fraction of
one. The state lives in the machine's state directory, under ``warm/``:

- ``memory``: qemu's migration stream (RAM and device state). qemu writes it to a file descriptor
  handed over with ``getfd`` and reads it back from one it inherits (``-incoming fd:N``): no shell,
  no helper process, no path on qemu's command line.
- ``key.json``: what the state is valid for, with the sha256 of ``memory``; written last (no key, no
  saved state). A restore checks the digest on the descriptor qemu then reads; a mismatch discards
  the state and the machine boots cold.
- ``live-diskN.qcow2``: the running machine's disk N, a fresh overlay on top of the frozen disk.
- ``saving.json``: a save under way. Until the save is done or undone, the overlays it names may hold
  the disks' newest writes, so nothing deletes them: a failed save commits them back into the disks
  (active ``block-commit``) before the guest runs again, adopting a machine whose supervisor died in
  the save finishes or undoes it the same way, and a start with the record still there (qemu died
  too) commits them with ``qemu-img commit`` before qemu runs.

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
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from qemuspec.errors import QemuspecError, QMPError
from qemuspec.runtime import statedir

if TYPE_CHECKING:
    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.agent import GuestAgent
    from qemuspec.runtime.instance import Instance
    from qemuspec.spec.models import Disk, Machine

FORMAT = 2  # 2: the key carries the memory file's sha256
FD_NAME = "qemuspec-warm"
SAVE_TIMEOUT = 300.0
COMMIT_TIMEOUT = 120.0  # an active commit of a live overlay back into its disk
VMGENID_BOUND = (
    "/sys/bus/acpi/devices/QEMUVGID:00/driver"  # a directory only while the driver is bound
)


def warm_dir(state_dir: str) -> str:
    return os.path.join(state_dir, statedir.WARM_DIR)


def memory_file(state_dir: str) -> str:
    return os.path.join(warm_dir(state_dir), statedir.WARM_MEMORY)


def key_file(state_dir: str) -> str:
    return os.path.join(warm_dir(state_dir), statedir.WARM_KEY)


def live_disk(state_dir: str, index: int) -> str:
    return os.path.join(warm_dir(state_dir), statedir.live_disk(index))


def interrupted(state_dir: str) -> "statedir.SaveRecord | None":
    """The record of a save that was neither finished nor undone (its overlays may hold data)."""
    from qemuspec.runtime import statedir

    return statedir.read(warm_dir(state_dir), statedir.SAVING, statedir.SaveRecord)


DISK_WRITES = (
    "writes to its disks last only until `down`: every start restores the disks as they were at the save "
    "(keep data on a machine without warm = true)"
)


def disk_writes(machine: "Machine") -> str | None:
    """What a warm machine does with disk writes, said by validate, plan, up and status (None: no
    writable disk, or not warm)."""
    if not machine.warm or unsupported(machine) or not any(not d.readonly for d in machine.disks):
        return None
    return DISK_WRITES


@dataclass
class Verdict:
    warm: bool
    why: str
    disk_writes: str | None = None

    @property
    def boot(self) -> str:
        return "warm" if self.warm else "cold"

    def as_dict(self) -> dict:
        return {
            "boot": self.boot,
            "why": self.why,
            **({"disk_writes": self.disk_writes} if self.disk_writes else {}),
        }


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


def key_argv(
    name: str, machine: "Machine", state_dir: str, accels: tuple[str, ...] | None = None
) -> list[str]:
    """The command line saved state is valid for: the machine's own layout (paths.machine_layout), on
    the accelerators it ran with (``accels``) or would start with now (None)."""
    from qemuspec.render import render
    from qemuspec.runtime import paths

    lay = paths.machine_layout(machine, state_dir)
    return render(machine, name, paths.with_accel(lay, accels) if accels else lay)


def unsupported(machine: "Machine") -> str | None:
    """Why this machine cannot be warm-started at all, if it cannot."""
    if machine.firmware.type == "uefi":
        return (
            "UEFI machines are not warm-started (the variable store is not frozen with the disks)"
        )
    if machine.shares:
        return "machines with shares are not warm-started (9p and virtiofs state cannot be saved)"
    return None


def read(state_dir: str) -> dict | None:
    """The key, from a state directory proven qemuspec's and never through a symlink (a committed
    `warm/` is not saved state of ours)."""
    from qemuspec.runtime import statedir

    proven = statedir.proven(state_dir)
    data = (
        statedir.read_bytes(warm_dir(state_dir), statedir.WARM_KEY, statedir.RECORD_LIMIT)
        if proven
        else None
    )
    try:
        record = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def check(
    name: str, machine: "Machine", state_dir: str, accels: tuple[str, ...] | None = None
) -> Verdict:
    """Would the next start of this machine restore its saved state, and why (not)."""
    verdict = _check(name, machine, state_dir, accels)
    verdict.disk_writes = disk_writes(machine)
    return verdict


def _check(
    name: str, machine: "Machine", state_dir: str, accels: tuple[str, ...] | None
) -> Verdict:
    if not machine.warm:
        return Verdict(False, "warm start is off (warm = true, or up --warm)")
    reason = unsupported(machine)
    if reason:
        return Verdict(False, reason)
    if interrupted(state_dir) is not None:
        return Verdict(
            False,
            "a save was interrupted: the next start commits its live overlays into the disks "
            "and boots cold",
        )
    record = read(state_dir)
    if record is None:
        return Verdict(False, "no saved state yet: this start saves one once the machine is ready")
    if record.get("argv") != key_argv(name, machine, state_dir, accels):
        return Verdict(
            False, "the definition changed since the save (rendered command line differs)"
        )
    if record.get("qemu") != _qemu_identity(machine.qemu):
        return Verdict(
            False,
            f"the qemu binary changed since the save (was {record.get('qemu_version') or 'another build'})",
        )
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
    """Forget the saved state (the key first, so a half-removed state is never taken for valid). The
    overlays of an interrupted save stay, with its record: they may hold the disks' newest writes and
    may still be open in qemu (``recover`` or ``finish_interrupted`` deals with them). Every removal is
    relative to the directory, never through a symlink."""
    from qemuspec.runtime import statedir

    statedir.remove(warm_dir(state_dir), statedir.WARM_KEY)
    if interrupted(state_dir) is None:
        shutil.rmtree(warm_dir(state_dir), ignore_errors=True)  # refuses a symlink; fd-based inside
        return
    statedir.remove(
        warm_dir(state_dir), statedir.WARM_MEMORY, statedir.WARM_MEMORY + statedir.TMP_SUFFIX
    )


def digest(fd: int) -> str:
    """sha256 of a whole file, streamed with pread (the descriptor's offset is left alone)."""
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        offset += len(chunk)


def verify(state_dir: str, fd: int) -> None:
    """The memory file open on ``fd`` (the descriptor qemu then reads) is the one the key was written
    for; else the state is refused (the caller discards it and boots cold)."""
    record = read(state_dir) or {}
    if digest(fd) != record.get("memory_sha256"):
        raise QemuspecError(
            f"{memory_file(state_dir)} does not match the sha256 digest saved with its key "
            "(changed or damaged since the save)"
        )


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


def _hold(point: str) -> None:
    """For fault tests only: stop this process (SIGSTOP) at a named point of the save when
    QEMUSPEC_TEST_HOLD_SAVE names it, so a test can kill it, or qemu, at exactly that point."""
    from qemuspec.settings import current

    if current().test_hold_save == point:
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)


def _drive(index: int, disk: Disk) -> str:
    from qemuspec.render import own

    return disk.id or own(f"disk{index}")


def _file_identity(path: str) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def send_state(
    qmp: "QMPClient", fd: int, name: str, started: Callable[[], object] = lambda: None
) -> None:
    """Migrate a stopped qemu's memory and devices into ``fd`` (handed to qemu with ``getfd``, closed
    here) and wait for qemu to say it is done: the one save of `up`'s warm state and of a run/test
    checkpoint. ``started`` runs once the migration has begun (the fault tests' hold point)."""
    qmp.command(
        "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
    )
    qmp.command("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    try:
        qmp.command("getfd", {"fdname": FD_NAME}, fds=(fd,))
    finally:
        os.close(fd)
    mark = qmp.event_count
    qmp.command("migrate", {"uri": f"fd:{FD_NAME}"})
    started()
    event = qmp.wait_for(
        "MIGRATION",
        SAVE_TIMEOUT,
        lambda e: e["data"].get("status") in ("completed", "failed", "cancelled"),
        since=mark,
    )
    if event["data"]["status"] != "completed":
        error = qmp.command("query-migrate").get("error-desc", event["data"]["status"])
        raise QemuspecError(f"qemu could not save machine {name}: {error}")


def save(inst: "Instance") -> dict:
    """Freeze a ready machine's disks and save its RAM and devices; resume it. Returns what was saved.
    On failure the disks are moved back onto their files before the guest runs again (the error says
    so, or names the overlay that still holds a disk's writes), and nothing qemu has open is deleted."""
    from qemuspec.runtime import statedir

    machine, state_dir = inst.machine, inst.state_dir
    if (
        interrupted(state_dir) is not None
    ):  # its overlays may hold writes: a new snapshot would overwrite them
        raise QemuspecError(
            f"machine {inst.name}: an earlier save was interrupted and its overlays were not "
            "committed yet (the next start does that); no state saved"
        )
    discard(state_dir)
    statedir.ensure_private(
        warm_dir(state_dir)
    )  # a planted `warm -> elsewhere` is refused, not written through
    began = time.monotonic()
    tmp = memory_file(state_dir) + statedir.TMP_SUFFIX
    saving = statedir.SaveRecord(overlays=[], at=time.time())
    with _monitor(inst) as qmp:
        version = qmp.command("query-version").get("qemu", {})
        qemu_version = f"{version.get('major')}.{version.get('minor')}.{version.get('micro')}"
        try:  # before any disk moves
            statedir.write(warm_dir(state_dir), statedir.SAVING, saving)
        except OSError as exc:
            where = os.path.join(warm_dir(state_dir), statedir.SAVING)
            raise QemuspecError(f"cannot write {where}: {exc.strerror or exc}") from None
        qmp.command("stop")
        try:
            for index, disk in enumerate(machine.disks):
                if not disk.readonly:
                    overlay = live_disk(state_dir, index)
                    qmp.command(
                        "blockdev-snapshot-sync",
                        {
                            "device": _drive(index, disk),
                            "snapshot-file": overlay,
                            "format": "qcow2",
                        },
                    )
                    saving.overlays.append(
                        {
                            "index": index,
                            "overlay": overlay,
                            "file": os.path.abspath(disk.file),
                            "id": _file_identity(overlay),
                        }
                    )
                    statedir.write(warm_dir(state_dir), statedir.SAVING, saving)
            _hold("snapshot")
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
            )
            send_state(qmp, fd, inst.name, started=lambda: _hold("migrating"))
            os.replace(tmp, memory_file(state_dir))
            files = {
                path: _identity(path) for path in _inputs(machine)
            }  # disks are flushed and frozen now
            rfd = os.open(memory_file(state_dir), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                size, sha = os.fstat(rfd).st_size, digest(rfd)
            finally:
                os.close(rfd)
            record = {
                "format": FORMAT,
                "saved_at": time.time(),
                "argv": key_argv(inst.name, machine, state_dir, inst.layout.accel),
                "qemu": _qemu_identity(machine.qemu),
                "qemu_version": qemu_version,
                "files": files,
                "memory_bytes": size,
                "memory_sha256": sha,
                "memory_mib": machine.memory,
            }
            statedir.write(
                os.path.dirname(key_file(state_dir)), os.path.basename(key_file(state_dir)), record
            )
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(key_file(state_dir))
            with contextlib.suppress(QemuspecError):
                _reactivate(qmp, machine)
            left = roll_back(qmp, machine, state_dir)  # before `cont`, unless reactivated
            if isinstance(exc, Exception):
                where = "; ".join(left) if left else "the disks are back on their own files"
                raise QemuspecError(f"{str(exc).split(chr(10), 1)[0]} ({where})") from None
            raise
        finally:
            with contextlib.suppress(QemuspecError):
                if not machine.paused:
                    qmp.command("cont")
    statedir.remove(
        warm_dir(state_dir), statedir.SAVING
    )  # done: the overlays hold only what a restore discards
    return {"seconds": round(time.monotonic() - began, 3), "bytes": size}


def roll_back(qmp: "QMPClient", machine: "Machine", state_dir: str) -> list[str]:
    """Move every disk a save put on a live overlay back onto its own file (an active block-commit,
    completed once in sync), then delete the overlays no drive uses any more and the save's record.
    Returns what could not be undone (that overlay stays, with the record, and holds the disk's
    writes until ``recover`` commits it at the next start). Never deletes a file qemu has open."""
    from qemuspec.runtime import statedir

    left: list[str] = []
    try:
        for index, disk in enumerate(machine.disks):
            overlay = live_disk(state_dir, index)
            if disk.readonly or _active_file(qmp, _drive(index, disk)) != overlay:
                continue
            try:
                _commit_active(qmp, _drive(index, disk), os.path.abspath(disk.file), index)
            except QemuspecError as exc:
                left.append(
                    f"disk {index} stays on {overlay} ({exc}); its writes are committed into {disk.file} "
                    "at the next start"
                )
        in_use = _open_files(qmp)
    except QemuspecError as exc:  # qemu is gone or does not answer: keep everything for recover()
        return [
            f"the disks could not be moved back ({exc}); warm/live-disk*.qcow2 are committed into them "
            "at the next start"
        ]
    for index, disk in enumerate(machine.disks):
        overlay = live_disk(state_dir, index)
        if overlay not in in_use:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay)
    if not left:
        statedir.remove(warm_dir(state_dir), statedir.SAVING)
    return left


def _reactivate(qmp: "QMPClient", machine: "Machine") -> None:
    """After a completed migration qemu has let go of its images (for a destination to take them)
    until `cont`, and a block job cannot run on them: resume (the active commit then carries the
    guest's new writes along), or resume and stop again for a machine meant to stay paused."""
    if qmp.command("query-migrate").get("status") == "completed":
        qmp.command("cont")
        if machine.paused:
            qmp.command("stop")


def _active_file(qmp: "QMPClient", drive: str) -> str | None:
    for block in qmp.command("query-block"):
        if block.get("device") == drive or block.get("qdev") == drive:
            return (block.get("inserted") or {}).get("file")
    return None


def _open_files(qmp: "QMPClient") -> set[str]:
    """Every image file in qemu's block graph (active layers and their backing files)."""
    return {
        node.get("file")
        for node in qmp.command("query-named-block-nodes", {"flat": True})
        if node.get("file")
    }


def _commit_active(qmp: "QMPClient", drive: str, base_file: str, index: int) -> None:
    """Commit a drive's active layer into ``base_file`` (named by node, so nothing below it, such as a
    declared base image, is ever written) and pivot the drive onto it."""
    nodes = qmp.command("query-named-block-nodes", {"flat": True})
    base = [
        n["node-name"]
        for n in nodes
        if n.get("file") == base_file and n.get("drv") not in ("file", "host_device")
    ]
    if not base:
        raise QemuspecError(f"{base_file} is not in qemu's block graph")
    job = f"qemuspec-commit{index}"
    mark = qmp.event_count
    qmp.command("block-commit", {"job-id": job, "device": drive, "base-node": base[0]})

    def job_event(*names: str) -> dict:
        wanted = lambda e: e["event"] in names and e["data"].get("device") == job  # noqa: E731
        return qmp.wait_for("*", COMMIT_TIMEOUT, wanted, since=mark)

    ready = job_event("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
    if ready["event"] == "BLOCK_JOB_READY":
        qmp.command("block-job-complete", {"device": job})
        ready = job_event("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
    if ready["event"] != "BLOCK_JOB_COMPLETED" or ready["data"].get("error"):
        raise QemuspecError(
            f"block-commit did not complete: {ready['data'].get('error') or ready['event']}"
        )


def finish_interrupted(inst: "Instance") -> str | None:
    """An adopted machine whose supervisor died during a save (the guest stopped, disks on live
    overlays): finish the save when its key was written, else undo it (cancel a migration still
    running, commit the overlays back); resume the guest. Returns what was done, or None."""
    if interrupted(inst.state_dir) is None or inst.qmp is None:
        return None
    from qemuspec.runtime import statedir

    qmp, state_dir = inst.qmp, inst.state_dir
    if qmp.command("query-migrate").get("status") in (
        "setup",
        "active",
        "pre-switchover",
        "device",
        "cancelling",
    ):
        mark = qmp.event_count
        qmp.command("migrate_cancel")
        with contextlib.suppress(QemuspecError):
            ended = lambda e: e["data"].get("status") in ("completed", "failed", "cancelled")  # noqa: E731
            qmp.wait_for("MIGRATION", SAVE_TIMEOUT, ended, since=mark)
    record = read(state_dir)
    if record is not None and (_identity(memory_file(state_dir)) or [0, 0, -1])[2] == record.get(
        "memory_bytes"
    ):
        statedir.remove(warm_dir(state_dir), statedir.SAVING)
        done = "the interrupted save had finished: kept"
    else:
        discard(state_dir)
        _reactivate(qmp, inst.machine)
        left = roll_back(qmp, inst.machine, state_dir)
        done = "the interrupted save was undone: " + (
            "; ".join(left) or "the disks are back on their own files"
        )
    if not inst.machine.paused:
        qmp.command("cont")
    return done


def recover(name: str, machine: "Machine", state_dir: str) -> list[str]:
    """Before qemu starts: an interrupted save's overlays (qemu died with it) hold the disks' newest
    writes, so they are committed into the disks with ``qemu-img commit`` (which refuses an image
    another qemu has open). Only overlays this save made are touched: the record must name the
    machine's own disk and the overlay's device and inode, which a copied or planted record cannot
    match. Returns what was done."""
    record = interrupted(state_dir)
    if record is None:
        return []
    from qemuspec import img
    from qemuspec.runtime import statedir

    done = []
    for entry in record.overlays:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(machine.disks):
            continue
        disk, overlay = machine.disks[index], live_disk(state_dir, index)
        if (
            entry.get("overlay") != overlay
            or entry.get("file") != os.path.abspath(disk.file)
            or disk.readonly
        ):
            continue
        if _file_identity(overlay) is None:
            continue
        if entry.get("id") != _file_identity(overlay):
            record_file = os.path.join(warm_dir(state_dir), statedir.SAVING)
            raise QemuspecError(
                f"machine {name}: {overlay} is not the overlay qemuspec made for an interrupted warm "
                f"save: check it, then delete {record_file} to start without it"
            )
        try:
            img.run("commit", "-q", "-b", os.path.abspath(disk.file), overlay)
        except QemuspecError as exc:
            raise QemuspecError(
                f"machine {name}: the writes of an interrupted warm save in {overlay} could not be "
                f"committed into {disk.file}: {exc}. Fix that, then run "
                f"`qemu-img commit {overlay}`"
            ) from None
        os.unlink(overlay)
        done.append(f"committed {overlay} into {disk.file}")
    statedir.remove(warm_dir(state_dir), statedir.SAVING)
    discard(state_dir)
    return done


# -- restore ------------------------------------------------------------------------------------


def restore_machine(machine: "Machine", state_dir: str) -> "Machine":
    """The machine as a restore runs it: every writable disk on a fresh overlay of its frozen file."""
    from qemuspec import img
    from qemuspec.runtime import statedir

    disks = []
    for index, disk in enumerate(machine.disks):
        if disk.readonly:
            disks.append(disk)
            continue
        live = live_disk(state_dir, index)
        statedir.remove(warm_dir(state_dir), os.path.basename(live))
        img.create(
            live, format="qcow2", backing=os.path.abspath(disk.file), backing_format=disk.format
        )
        disks.append(
            disk.model_copy(
                update={
                    "file": live,
                    "format": "qcow2",
                    "backing": None,
                    "backing_format": None,
                    "size": None,
                }
            )
        )
    return machine.model_copy(update={"disks": disks}) if disks else machine


def wait_restored(inst: "Instance", mark: int, timeout: float) -> None:
    """Until qemu has loaded the saved state (it runs by itself afterwards, unless paused)."""
    assert inst.qmp is not None
    try:
        event = inst.qmp.wait_for(
            "MIGRATION",
            timeout,
            lambda e: e["data"].get("status") in ("completed", "failed"),
            since=mark,
        )
    except QemuspecError as exc:
        raise QemuspecError(f"the saved state did not load: {exc}") from None
    if event["data"]["status"] != "completed":
        raise QemuspecError("qemu could not load the saved state")
    if not inst.machine.paused:
        inst.qmp.command("cont")  # the state was saved with the CPUs stopped, so it loads paused


def after_restore(inst: "Instance") -> dict[str, object]:
    """Make a restored guest its own: clock from the host, RNG reseeded. Returns what was done."""
    from qemuspec.render import wants_vmgenid

    machine = inst.machine
    vmgenid = wants_vmgenid(machine) or any(d.driver == "vmgenid" for d in machine.devices)
    info: dict[str, object] = {}
    if not machine.agent:
        info["clock"] = "not set (no guest agent): the guest clock runs from the time of the save"
        info["rng"] = (
            "new vmgenid: reseeded if the guest has a vmgenid driver (Linux CONFIG_VMGENID), "
            "else restores share RNG state"
            if vmgenid
            else "shared between restores (no vmgenid device on this machine type, no guest agent)"
        )
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
                from qemuspec.runtime.reseed import reseed

                agent.write_file("/dev/urandom", os.urandom(64))
                info["rng"] = (
                    "reseeded from host entropy through the agent (RNDADDENTROPY, RNDRESEEDCRNG)"
                    if reseed(agent)
                    else "shared until the guest reseeds (it has no vmgenid driver and could not be "
                    "reseeded): host entropy was mixed into its pool through the agent"
                )
    except QemuspecError as exc:
        info.setdefault("clock", f"not set: {exc}")
        info.setdefault("rng", f"unknown: the guest agent did not answer ({exc})")
    return info


def _set_clock(agent: GuestAgent) -> str:
    try:
        agent.command("guest-set-time", {"time": time.time_ns()})
    except QMPError as exc:
        if "hwclock" not in exc.desc:
            raise
        return "set from the host (the guest's hardware clock was not updated)"
    return "set from the host"


def _exists(agent: GuestAgent, path: str) -> bool:
    try:
        handle = agent.file_open(path, "r")
    except QMPError:
        return False
    agent.file_close(handle)
    return True
