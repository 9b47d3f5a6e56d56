"""A fresh restore of a machine's checkpoint on throwaway overlays: what `run`, `test` and the pytest
plugin start each command, case or test on.

A checkpoint is a machine booted once on throwaway disks, made ready, its ``setup`` commands run, then
saved (RAM and devices by QMP ``migrate`` to a file; the throwaway disks frozen at that instant) and
stopped. Every restore is a new machine: a new qemu on its own qcow2 overlays over the frozen disks
(nothing a restore writes is seen by another, or by the checkpoint), its own runtime directory,
sockets and forwards (``host = 0`` picks a free port per restore), the clock set from the host and
host entropy mixed into the guest's RNG through the agent (runtime/warm.py ``after_restore``; a
guest with a vmgenid driver reseeds by itself on the new GUID every qemu start gives).

Checkpoints live in the user's warm store (``Settings.checkpoints``: ``QEMUSPEC_WARM_DIR``, else
``warm/`` in qemuspec's cache directory), one directory per **content key**, never in a
repository's ``.qemuspec/`` (which qemuspec does not trust). The key is a digest of everything the
saved state depends on and nothing else: the command line rendered with fixed placeholder paths
(no state directory, socket or port in it) in which every input file's path is replaced by the
sha256 of its content (kernel, initrd, firmware, cdroms, disks and their bases; an image disk by
its declared digest; a disk qemuspec creates by its size and format), the qemu version, the
``setup`` commands and the cloud-init inputs. Inodes, mtimes and absolute paths are not part of it,
so a store copied with ``cp -r`` elsewhere (or restored by ``actions/cache`` on a fresh runner, or a
checkout moved) is found and used; `qemuspec warm key FILE` prints the key for a CI cache step.
A checkpoint that does not fit the machine is never used: the reason is said (``report``) and the
machine boots cold and makes a new one; a checkpoint whose memory file does not match the digest
recorded with it is deleted and made again.

The store is used only when it and its ancestors are closed to other users (``privdir``): another
user's directory, or one others can write, gives cold boots with that reason, never their files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from qemuspec.errors import QemuspecError
from qemuspec.runtime import filenames

if TYPE_CHECKING:
    from qemuspec.runtime.instance import Instance
    from qemuspec.settings import Settings
    from qemuspec.spec.models import File, Machine

FORMAT = 1  # of the key and of checkpoint.json
KEY_CHARS = 32  # hex characters of the key: a directory name in the store
RECORD_LIMIT = 4 * 1024 * 1024
PLACEHOLDER = "/qemuspec-checkpoint"  # the state directory the key's command line is rendered with

Report = Callable[[str], object]


def _quiet(message: str) -> None:
    pass


class SetupFailed(QemuspecError):
    """A machine's ``setup`` command exited non-zero (or timed out): no checkpoint is made."""


@dataclass(frozen=True)
class Key:
    """A checkpoint's content key: ``digest`` names its directory; ``parts`` are what was hashed (kept
    in the checkpoint's record, so a checkpoint that does not fit can say what differs)."""

    digest: str
    parts: dict[str, object] = field(hash=False, compare=False)


@dataclass(frozen=True)
class Checkpoint:
    """A saved machine in the warm store: ``directory`` holds ``memory`` (qemu's migration stream),
    the frozen disks and ``checkpoint.json`` (written last)."""

    key: Key
    directory: str
    record: dict = field(hash=False, compare=False)
    made: bool = False  # by this process, just now (the machine booted cold for it)

    @property
    def memory(self) -> str:
        return os.path.join(self.directory, filenames.WARM_MEMORY)


# -- the key ------------------------------------------------------------------------------------

_digests: dict[tuple, str] = {}  # (real path, dev, inode, size, mtime) -> sha256: once per process


def file_digest(path: str) -> str:
    """sha256 of a file's content (remembered for this process by the file's identity)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    ident = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _digests.get(ident)
    if known is None:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        known = _digests[ident] = h.hexdigest()
    return known


def _tokens(machine: Machine) -> dict[str, str]:
    """Each input file's absolute path -> what stands for it in the key (its content's digest)."""
    out: dict[str, str] = {}

    def content(path: str | None, label: str) -> None:
        if path:
            absolute = os.path.abspath(path)
            out[absolute] = (
                f"<{label} sha256:{file_digest(absolute)}>"
                if os.path.exists(absolute)
                else f"<{label} missing>"
            )

    content(machine.kernel, "kernel")
    content(machine.initrd, "initrd")
    content(machine.firmware.code, "firmware")
    for index, cdrom in enumerate(machine.cdrom):
        content(cdrom, f"cdrom{index}")
    for index, disk in enumerate(machine.disks):
        absolute = os.path.abspath(disk.file)
        if os.path.exists(absolute):
            content(disk.file, f"disk{index}")
        elif disk.image is not None:
            out[absolute] = f"<disk{index} image {disk.image.digest or disk.image.url}>"
        elif disk.backing:
            content(disk.backing, f"disk{index} backing")
            out[absolute] = out.pop(os.path.abspath(disk.backing)) + "<overlay>"
        else:
            out[absolute] = f"<disk{index} new {disk.format or 'raw'} {disk.size}>"
        if disk.backing and os.path.exists(absolute):
            content(disk.backing, f"disk{index} backing")
    return out


def key(name: str, machine: Machine, settings: Settings) -> Key:
    """The content key of ``machine``'s checkpoint (see the module's docstring for what is in it)."""
    from qemuspec.render import render
    from qemuspec.runtime import capabilities, paths

    lay = paths.machine_layout(
        machine, f"{PLACEHOLDER}/{name}", settings, run_dir=f"{PLACEHOLDER}-run"
    )
    argv = render(machine, name, lay)
    tokens = _tokens(machine)
    for path in sorted(tokens, key=len, reverse=True):  # a longer path first: no prefix clash
        argv = [
            word.replace(path.replace(",", ",,"), tokens[path]).replace(path, tokens[path])
            for word in argv
        ]
    ci = machine.cloud_init
    parts: dict[str, object] = {
        "format": FORMAT,
        "argv": argv,
        "qemu": capabilities.probe(machine.qemu).version,
        "setup": list(machine.setup),
        "cloud_init": ci.model_dump(mode="json") if ci is not None else None,
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return Key(hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS], parts)


# -- the store ----------------------------------------------------------------------------------


def _store(settings: Settings, create: bool) -> tuple[str, str | None]:
    """(the warm store's path, why it cannot be used or None)."""
    from qemuspec import privdir

    where = settings.checkpoints
    fd = privdir.open_private(where, create=create)
    if fd is None:
        if not create and not os.path.lexists(where):
            return where, "no checkpoint yet"
        return where, (
            f"the warm store {where} is not a private directory of this user's (it or a parent is "
            "another user's or writable by others): set QEMUSPEC_WARM_DIR to a directory of your own"
        )
    os.close(fd)
    return where, None


def unusable(machine: Machine, settings: Settings) -> str | None:
    """Why this machine gets no checkpoint here (UEFI, shares, a warm store others can change), if so:
    it then boots cold, with that reason."""
    from qemuspec.runtime import warm

    return warm.unsupported(machine) or _store(settings, create=True)[1]


def _read_record(directory: str) -> dict | None:
    from qemuspec import privdir

    with privdir.private(directory, create=False) as dfd:
        data = privdir.read(dfd, filenames.CHECKPOINT, RECORD_LIMIT) if dfd is not None else None
    try:
        record = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _difference(old: dict, new: dict) -> str:
    """What differs between two keys' parts, said for a person."""
    if old.get("qemu") != new.get("qemu"):
        return f"qemu changed ({old.get('qemu')} -> {new.get('qemu')})"
    if old.get("setup") != new.get("setup"):
        return "the setup commands changed"
    if old.get("cloud_init") != new.get("cloud_init"):
        return "the cloud-init inputs changed"
    a, b = list(old.get("argv") or []), list(new.get("argv") or [])
    import difflib

    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        switch = next((w for w in reversed(a[:i1]) if w.startswith("-")), "")
        was, now = " ".join(a[i1:i2]) or "nothing", " ".join(b[j1:j2]) or "nothing"
        return f"the machine changed since the checkpoint ({switch} {was} -> {now})".replace(
            "( ", "("
        )
    return "the machine changed since the checkpoint"


def _why_none(store: str, name: str, wanted: Key) -> str:
    """Why no checkpoint fits: the newest checkpoint of a machine of this name, compared."""
    newest: dict | None = None
    with contextlib.suppress(OSError):
        for entry in os.listdir(store):
            if entry.startswith(".") or len(entry) != KEY_CHARS:
                continue
            record = _read_record(os.path.join(store, entry))
            if record and record.get("machine") == name:
                if newest is None or record.get("created_at", 0) > newest.get("created_at", 0):
                    newest = record
    if newest is None:
        return "no checkpoint yet"
    return f"checkpoint {newest.get('key')} does not fit: {_difference(newest.get('parts') or {}, wanted.parts)}"


_verified: set[tuple] = set()  # memory files whose digest this process checked (by identity)


def find(
    name: str, machine: Machine, settings: Settings, wanted: Key | None = None
) -> tuple[Checkpoint | None, str]:
    """The checkpoint that fits ``machine`` now, or None and why not (said to the user before a cold
    boot). A checkpoint whose files do not match its record is deleted here."""
    wanted = wanted or key(name, machine, settings)
    store, problem = _store(settings, create=False)
    if problem:
        return None, problem
    directory = os.path.join(store, wanted.digest)
    record = _read_record(directory)
    if record is None or record.get("key") != wanted.digest:
        return None, _why_none(store, name, wanted)
    checkpoint = Checkpoint(wanted, directory, record)
    broken = _broken(checkpoint)
    if broken:
        discard(checkpoint)
        return None, f"checkpoint {wanted.digest} was deleted: {broken}"
    return checkpoint, f"restore checkpoint {wanted.digest}"


def _broken(checkpoint: Checkpoint) -> str | None:
    """Why a checkpoint's files are not the ones its record names (None: they are)."""
    record = checkpoint.record
    try:
        fd = os.open(checkpoint.memory, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        return f"its memory file cannot be read ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if st.st_size != record.get("memory_bytes"):
            return "its memory file is truncated or changed"
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if ident not in _verified and not _verified_before(checkpoint.directory, st):
            from qemuspec.runtime import warm

            if warm.digest(fd) != record.get("memory_sha256"):
                return "its memory file does not match the sha256 digest recorded with it"
            _verified.add(ident)
            _note_verified(checkpoint.directory, st)
    finally:
        os.close(fd)
    for disk in record.get("disks") or []:
        if not isinstance(disk, dict) or not os.path.isfile(
            os.path.join(checkpoint.directory, str(disk.get("file")))
        ):
            return f"its disk {disk} is missing"
    return None


def _stamp(st: os.stat_result) -> list[int]:
    """A file's identity: a write changes its mtime and ctime, and no process can set the ctime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _verified_before(directory: str, st: os.stat_result) -> bool:
    """The memory file is the very file whose digest an earlier process checked (a copy, a new inode,
    is checked again once): its 100 MiB are not hashed again on every restore."""
    from qemuspec import privdir

    with privdir.private(directory, create=False) as dfd:
        data = privdir.read(dfd, filenames.CHECKPOINT_VERIFIED, 4096) if dfd is not None else None
    try:
        return data is not None and json.loads(data).get("memory") == _stamp(st)
    except (ValueError, AttributeError, RecursionError):
        return False


def _note_verified(directory: str, st: os.stat_result) -> None:
    from qemuspec.runtime import statedir

    with contextlib.suppress(OSError, QemuspecError):
        statedir.write(directory, filenames.CHECKPOINT_VERIFIED, {"memory": _stamp(st)})


def discard(checkpoint: Checkpoint) -> None:
    """Delete a checkpoint (its record first: a half-deleted one is never taken for whole)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(checkpoint.directory, filenames.CHECKPOINT))
    shutil.rmtree(checkpoint.directory, ignore_errors=True)


def _locked(store: str, digest: str) -> contextlib.AbstractContextManager[None]:
    """One process makes (or fixes up) a checkpoint at a time; the others wait and then use it."""
    from qemuspec.runtime import statedir

    return statedir.exclusive(os.path.join(store, f".{digest}{filenames.CHECKPOINT_LOCK}"))


# -- disks --------------------------------------------------------------------------------------


def free_forwards(machine: Machine) -> Machine:
    """The machine with every fixed host port of a user-mode forward turned into ``host = 0`` (any
    free port): a throwaway `run` must not collide with a running `up` of the same file, another
    run, or another user's port. The ports it got are reported once the machine is up."""
    nics = []
    for nic in machine.nics:
        forwards = getattr(nic, "forwards", None) or []
        if nic.type == "user" and any(f.host for f in forwards):
            nic = nic.model_copy(
                update={"forwards": [f.model_copy(update={"host": 0}) for f in forwards]}
            )
        nics.append(nic)
    return machine.model_copy(update={"nics": nics})


def throwaway(machine: Machine, workdir: str) -> Machine:
    """The same machine on disks that are thrown away: each writable disk becomes a qcow2 overlay in
    ``workdir`` over the declared image (created there when the image does not exist yet), so the
    definition's own disks are never written, and with every fixed forward on a free port
    (``free_forwards``), so it never collides with the file's `up` or another restore."""
    machine = free_forwards(machine)
    disks = []
    for index, disk in enumerate(machine.disks):
        if disk.readonly:
            disks.append(disk)
            continue
        overlay = os.path.join(workdir, filenames.checkpoint_disk(index))
        if os.path.exists(disk.file):
            base_format = disk.format
            if base_format is None:
                from qemuspec import img

                base_format = img.info(disk.file).format
            disks.append(
                disk.model_copy(
                    update={
                        "file": overlay,
                        "format": "qcow2",
                        "size": None,
                        "image": None,
                        "backing": os.path.abspath(disk.file),
                        "backing_format": base_format,
                    }
                )
            )
        else:  # made fresh by `up` (an image's overlay too): make it in the throwaway directory instead
            disks.append(
                disk.model_copy(
                    update={
                        "file": overlay
                        if disk.backing or (disk.format or "raw") == "qcow2"
                        else overlay[:-6] + ".img"
                    }
                )
            )
    return machine.model_copy(update={"disks": disks, "restart": "no"})


def _saved(machine: Machine, directory: str) -> Machine:
    """The machine on a checkpoint's frozen disks (as they are now, in ``directory``)."""
    base = throwaway(machine, directory)
    disks = []
    for disk in base.disks:
        if disk.readonly:
            disks.append(disk)
            continue
        disks.append(
            disk.model_copy(
                update={"image": None, "size": None, "backing": None, "backing_format": None}
            )
        )
    return base.model_copy(update={"disks": disks, "restart": "no"})


def _rebase_moved(checkpoint: Checkpoint, machine: Machine) -> None:
    """A checkpoint copied from another checkout: its frozen overlays name their base by the absolute
    path it had there. The key proved the content the same, so the header is pointed at the base's
    path here (``qemu-img rebase -u``: the header only, no data)."""
    from qemuspec import img

    for entry in checkpoint.record.get("disks") or []:
        backing = entry.get("backing")
        index = entry.get("index")
        if not backing or not isinstance(index, int) or index >= len(machine.disks):
            continue
        declared = machine.disks[index]
        now = (
            os.path.abspath(declared.file)
            if os.path.exists(declared.file)
            else (os.path.abspath(declared.backing) if declared.backing else None)
        )
        path = os.path.join(checkpoint.directory, entry["file"])
        if now and img.info(path).backing != now:
            img.run("rebase", "-u", "-b", now, "-F", entry.get("backing_format") or "raw", path)


def _restore_disks(saved: Machine, state_dir: str) -> Machine:
    """``saved`` with every writable disk on a new overlay of its frozen file, in ``state_dir``."""
    from qemuspec import img

    disks = []
    for index, disk in enumerate(saved.disks):
        if disk.readonly:
            disks.append(disk)
            continue
        overlay = os.path.join(state_dir, filenames.restore_disk(index))
        img.create(overlay, format="qcow2", backing=disk.file, backing_format=disk.format or "raw")
        disks.append(disk.model_copy(update={"file": overlay, "format": "qcow2"}))
    return saved.model_copy(update={"disks": disks})


# -- making a checkpoint ------------------------------------------------------------------------


def _run_setup(
    inst: Instance, commands: list[str], deadline: float, on_output: Callable[[str, bytes], object]
) -> None:
    from qemuspec.errors import QMPTimeout
    from qemuspec.runtime import guestrun

    how = guestrun.via(inst)
    for command in commands:
        seen: list[bytes] = []

        def keep(stream: str, data: bytes) -> None:
            seen.append(data)
            del seen[:-64]
            on_output(stream, data)

        try:
            code = guestrun.run(
                inst, guestrun.shell(command, how), keep, how=how, deadline=deadline
            )
        except QMPTimeout:
            raise SetupFailed(
                f"machine {inst.name}: setup command `{command}` did not finish before the readiness "
                "timeout: no checkpoint made"
            ) from None
        if code != 0:
            last = b"".join(seen).decode(errors="replace").strip().splitlines()[-10:]
            raise SetupFailed(
                f"machine {inst.name}: setup command `{command}` exited {code}: no checkpoint made"
                + ("\n" + "\n".join(last) if last else "")
            )


def _save(inst: Instance, memory: str) -> None:
    """Stop the guest and write its RAM and devices to ``memory`` (an fd handed over with getfd); the
    disks are flushed when the migration completes and no longer written: qemu is quit afterwards."""
    from qemuspec.runtime import warm

    qmp = inst.qmp
    assert qmp is not None
    qmp.command("stop")
    fd = os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    warm.send_state(qmp, fd, inst.name)


def ensure(
    name: str,
    machine: Machine,
    settings: Settings,
    *,
    wanted: Key | None = None,
    ready_timeout: float | None = None,
    report: Report = _quiet,
    on_output: Callable[[str, bytes], object] = lambda stream, data: None,
    prepare: Callable[[Instance], object] | None = None,
) -> Checkpoint:
    """The checkpoint of ``machine``: found in the store, or made now (cold boot on throwaway disks,
    readiness, ``setup`` with its output to ``on_output``, save, quit), once across processes (a flock
    per key). Raises SetupFailed when setup fails, the boot's QemuspecError when it does not boot."""
    from qemuspec.runtime.instance import Instance

    wanted = wanted or key(name, machine, settings)
    store, problem = _store(settings, create=True)
    if problem:
        raise QemuspecError(problem)
    with _locked(store, wanted.digest):
        found, _why = find(name, machine, settings, wanted)
        if found is not None:
            _rebase_moved(found, machine)
            return found
        making = tempfile.mkdtemp(prefix=".making-", dir=store)
        scratch = tempfile.mkdtemp(prefix="qemuspec-checkpoint-")
        inst = Instance(name, throwaway(machine, making), os.path.join(scratch, name))
        if prepare is not None:
            prepare(inst)
        began = time.monotonic()
        try:
            inst.launch()
            deadline = began + (
                ready_timeout if ready_timeout is not None else machine.ready.timeout
            )
            inst.wait_ready(max(0.1, deadline - time.monotonic()))
            _agent_ready(inst, deadline)
            booted = time.monotonic() - began
            if machine.setup:
                report(f"{name}: running setup ({len(machine.setup)} command(s))")
                _run_setup(inst, list(machine.setup), deadline, on_output)
            set_up = time.monotonic() - began - booted
            _save(inst, os.path.join(making, filenames.WARM_MEMORY))
            saved = time.monotonic() - began - booted - set_up
            _stop(inst)
            from qemuspec.runtime import warm

            with open(os.path.join(making, filenames.WARM_MEMORY), "rb") as f:
                size, sha = os.fstat(f.fileno()).st_size, warm.digest(f.fileno())
            disks = [
                {
                    "index": index,
                    "file": os.path.basename(disk.file),
                    "backing": disk.backing,
                    "backing_format": disk.backing_format,
                    "format": disk.format,
                }
                for index, disk in enumerate(inst.machine.disks)
                if not disk.readonly
            ]
            record = {
                "format": FORMAT,
                "key": wanted.digest,
                "machine": name,
                "parts": wanted.parts,
                "created_at": time.time(),
                "memory_bytes": size,
                "memory_sha256": sha,
                "disks": disks,
                "seconds": {
                    "boot": round(booted, 3),
                    "setup": round(set_up, 3),
                    "save": round(saved, 3),
                },
            }
            from qemuspec.runtime import statedir

            statedir.write(making, filenames.CHECKPOINT, record)
            final = os.path.join(store, wanted.digest)
            shutil.rmtree(final, ignore_errors=True)  # a broken one (find deleted its record)
            os.rename(making, final)
        except BaseException:
            _stop(inst)
            shutil.rmtree(making, ignore_errors=True)
            raise
        finally:
            from qemuspec.runtime.statedir import disown

            disown(os.path.join(scratch, name))
            shutil.rmtree(scratch, ignore_errors=True)
        report(
            f"{name}: checkpoint {wanted.digest} saved ({size / (1 << 20):.0f} MiB; boot {booted:.1f} s, "
            f"save {saved:.1f} s)"
        )
        checkpoint = Checkpoint(wanted, final, record, made=True)
        _verified.add(_identity(checkpoint.memory))
        _note_verified(final, os.stat(checkpoint.memory))
        return checkpoint


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _agent_ready(inst: Instance, deadline: float) -> None:
    """Commands run through the agent when the machine has one: wait for it too (not only the
    declared probes)."""
    if inst.machine.agent:
        from qemuspec.runtime import probes

        probes.wait_agent(inst.layout.qga, deadline, inst.running)


def _stop(inst: Instance) -> None:
    """Quit qemu (kill when it does not answer), holding termination signals so a second Ctrl-C or
    SIGTERM cannot leave it behind."""
    import signal

    if inst.process is None:
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        try:
            inst.quit(5.0)
        except QemuspecError:
            inst.kill()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


# -- a fresh restore ----------------------------------------------------------------------------


def _load(spec_path: str, settings: Settings) -> File:
    from qemuspec.spec import cache

    return cache.load(spec_path, settings.variables, settings.var_environ(), where=settings.cache)[
        0
    ]


@contextlib.contextmanager
def started(
    spec_path: str,
    name: str,
    settings: Settings,
    *,
    spec: File | None = None,
    root: str | None = None,
    warm: bool | None = None,
    ready_timeout: float | None = None,
    report: Report = _quiet,
    prepare: Callable[[Instance], object] | None = None,
    on_setup_output: Callable[[str, bytes], object] = lambda stream, data: None,
) -> Iterator[Instance]:
    """A running, ready machine ``name`` of the definition at ``spec_path``, thrown away on exit.

    With warm start (``warm``: True or False forces it; None takes the machine's own ``warm``), it is
    a fresh restore of the machine's checkpoint (made first when none fits: a cold boot, ``setup``,
    save; said through ``report``); else, or when the machine cannot be warm-started (UEFI, shares)
    or its checkpoint does not load, a cold boot on throwaway disks, the reason said through
    ``report``. Either way the definition's own disks are never written.

    - ``settings``: the caller's (the warm store, accelerators, variables); ``spec``: the definition
      already loaded from ``spec_path`` (else it is loaded here, through the definitions cache).
      Preflight (the local-qemu and host-path rules) and pulling base images are the caller's
      (cli/common.preflight, cli/img_commands.ensure_images), done before this.
    - ``root``: the state root of this restore (the machine's files go in ``root/NAME``: serial.log,
      events.jsonl, qemu.log, its overlays). Machines started with the same ``root`` share their
      private networks (one vde_switch per network and root), so a multi-machine test passes one
      root to several ``started``; each root is one isolated group. None: a new temporary directory,
      deleted on exit. A root given by the caller is left in place (copy ``artifacts`` first if they
      are to be kept; the caller deletes it).
    - ``ready_timeout``: seconds for the whole start (restore or boot, readiness probes, the guest
      agent when the machine has one); default the machine's ``ready.timeout``. A checkpoint being
      made gets the same budget for its boot and setup.
    - ``prepare(instance)``: called before qemu is launched, for subscribing to QMP events
      (``instance.on("GUEST_PANICKED", ...)``) or setting ``instance.stopping``; called for the
      checkpoint's boot too.
    - ``on_setup_output(stream, data)``: the setup commands' output while a checkpoint is made.

    The yielded Instance is launched and ready: ``instance.qmp`` is its monitor, ``instance.layout``
    its sockets (``qga``), ``instance.host_port(guest)`` its forwards, ``instance.console`` its
    console reader, ``instance.boot`` "warm" (restored) or "cold", and ``instance.restored`` a dict:
    for a restore ``checkpoint`` (the key), ``clock`` and ``rng`` (what was done), and ``made`` (why
    no checkpoint fitted) when this call booted cold to make it; for a cold start in warm mode ``why``
    (why not restored). Run commands with ``runtime.guestrun.run(instance, ...)``.
    On exit qemu is quit (killed if it does not answer) with termination signals held.

    Raises SetupFailed (setup exited non-zero), and the QemuspecError of a boot that fails
    (ReadyTimeout, LaunchError, ...): nothing is left running.
    """

    spec = spec if spec is not None else _load(spec_path, settings)
    machine = spec.machines[name]
    use_warm = machine.warm if warm is None else warm
    made_root = root is None
    root = tempfile.mkdtemp(prefix="qemuspec-fresh-") if root is None else os.path.abspath(root)
    state_dir = os.path.join(root, name)
    timeout = ready_timeout if ready_timeout is not None else machine.ready.timeout
    inst: Instance | None = None
    try:
        checkpoint: Checkpoint | None = None
        why: str | None = None
        if use_warm:
            why = unusable(machine, settings)
            if why is None:
                wanted = key(name, machine, settings)
                checkpoint, why = find(name, machine, settings, wanted)
                if checkpoint is None:
                    report(f"{name}: {why}: booting cold to make checkpoint {wanted.digest}")
                    checkpoint = ensure(
                        name,
                        machine,
                        settings,
                        wanted=wanted,
                        ready_timeout=timeout,
                        report=report,
                        on_output=on_setup_output,
                        prepare=prepare,
                    )
                else:
                    with _locked(os.path.dirname(checkpoint.directory), wanted.digest):
                        _rebase_moved(checkpoint, machine)
            else:
                report(f"{name}: {why}: booting cold")
        made = why if checkpoint is not None and checkpoint.made else None
        if checkpoint is not None:
            inst, failure = _restore(name, machine, checkpoint, state_dir, timeout, report, prepare)
            if inst is not None and made:
                inst.restored = {**(inst.restored or {}), "made": made}
            if inst is None:
                discard(checkpoint)  # a checkpoint that does not load is made again next time
                why = f"checkpoint {checkpoint.key.digest} did not load ({failure}) and was deleted"
                report(f"{name}: {why}: booting cold")
                shutil.rmtree(state_dir, ignore_errors=True)
        if inst is None:
            inst = _cold(name, machine, root, state_dir, timeout, report, prepare)
            if use_warm:
                inst.restored = {"why": why}
        yield inst
    finally:
        if inst is not None:
            _stop(inst)
        if made_root:
            from qemuspec.runtime.statedir import disown

            disown(state_dir)
            shutil.rmtree(root, ignore_errors=True)


def _restore(
    name: str,
    machine: Machine,
    checkpoint: Checkpoint,
    state_dir: str,
    timeout: float,
    report: Report,
    prepare: Callable[[Instance], object] | None,
) -> tuple[Instance | None, str | None]:
    """A restore of ``checkpoint`` in ``state_dir``, ready; (None, why) when the state does not load."""
    from qemuspec.runtime import warm
    from qemuspec.runtime.instance import Instance

    inst = Instance(name, _saved(machine, checkpoint.directory), state_dir)

    def incoming(saved: Machine) -> tuple[Machine, int]:
        fd = os.open(checkpoint.memory, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return _restore_disks(saved, state_dir), fd
        except BaseException:
            os.close(fd)
            raise

    inst.incoming = incoming
    if prepare is not None:
        prepare(inst)
    began = time.monotonic()
    try:
        inst.launch(restore=True)
        deadline = began + timeout
        owning = None
        if machine.agent:  # clock and RNG through the agent while the probes run (as `up` does)
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1, thread_name_prefix="after-restore")
            owning = pool.submit(warm.after_restore, inst)
            pool.shutdown(wait=False)
        inst.wait_ready(max(0.1, deadline - time.monotonic()))
        _agent_ready(inst, deadline)
        done = owning.result() if owning is not None else warm.after_restore(inst)
    except QemuspecError as exc:
        _stop(inst)
        return None, str(exc).split("\n", 1)[0]
    inst.restored = {"checkpoint": checkpoint.key.digest, **done}
    report(
        f"{name}: restored checkpoint {checkpoint.key.digest} in {time.monotonic() - began:.1f} s"
    )
    return inst, None


def _cold(
    name: str,
    machine: Machine,
    root: str,
    state_dir: str,
    timeout: float,
    report: Report,
    prepare: Callable[[Instance], object] | None,
) -> Instance:
    from qemuspec.runtime.instance import Instance

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    inst = Instance(name, throwaway(machine, state_dir), state_dir)
    if prepare is not None:
        prepare(inst)
    began = time.monotonic()
    report(f"{name}: booting on throwaway disks")
    inst.launch()
    try:
        deadline = began + timeout
        inst.wait_ready(max(0.1, deadline - time.monotonic()))
        _agent_ready(inst, deadline)
    except BaseException:
        _stop(inst)
        raise
    report(f"{name}: ready in {time.monotonic() - began:.1f} s")
    return inst


def artifacts(inst: Instance) -> dict[str, str]:
    """The files worth keeping of a restore whose case failed: role -> path (those that exist)."""
    lay = inst.layout
    found = {"console": lay.serial_log, "events": lay.events_log, "qemu": lay.qemu_log}
    return {role: path for role, path in found.items() if os.path.exists(path)}
