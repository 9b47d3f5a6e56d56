"""What the installed qemu binary can do, asked of the binary itself and cached.

One probe per binary (path + mtime + size; the version is recorded inside): qemu started with
``-machine none -S`` on a socketpair monitor (no guest, no path, no port), asked for its machine types,
CPU models, device and object types with their properties, accelerators and command-line options,
then quit. A cached answer costs a JSON read.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from typing import IO
from dataclasses import dataclass

from qemuspec.errors import LaunchError, QemuspecError, QMPError

CACHE_VERSION = 2
_GROUPS = {"boot": "boot-opts", "smp": "smp-opts", "m": "memory"}  # switch -> option group
# Options whose parameter list depends on a driver or backend: qemu reports only the common keys.
_OPEN_ENDED = {
    "drive",
    "machine",
    "global",
    "chardev",
    "fsdev",
    "virtfs",
    "spice",
    "iscsi",
    "trace",
    "option-rom",
    "add-fd",
}


@dataclass
class Capabilities:
    binary: str
    version: str
    machines: list[str]
    cpus: list[str]
    devices: dict[str, list[str]]  # driver -> property names
    objects: list[str]
    accels: list[str]
    options: list[str]  # command-line switches without the dash
    parameters: dict[
        str, list[str]
    ]  # switch -> the keys its option list takes (query-command-line-options)

    @classmethod
    def from_dict(cls, data: dict) -> "Capabilities":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def cache_dir() -> str:
    from qemuspec.settings import current

    return os.path.join(current().cache_dir, "capabilities")


def probe(binary: str) -> Capabilities:
    path = shutil.which(binary) or binary
    try:
        info = os.stat(path)
    except OSError:
        raise LaunchError(
            f"qemu binary {binary!r} not found: install it (Debian: apt-get install qemu-system-x86)"
        ) from None
    real = os.path.realpath(path)
    key = hashlib.sha256(
        f"{CACHE_VERSION}:{real}:{info.st_mtime_ns}:{info.st_size}".encode()
    ).hexdigest()[:24]
    from qemuspec import privdir

    # The cache directory only when it and its ancestors are closed to other users (privdir), the
    # entry opened relative to it without following links, written under an O_EXCL random name:
    # a HOME another user controls means no cache, never their file or their symlink.
    with privdir.private(cache_dir(), create=False) as dfd:
        body = privdir.read(dfd, f"{key}.json", ENTRY_LIMIT) if dfd is not None else None
    if body is not None:
        try:
            cached = Capabilities.from_dict(json.loads(body))
            if cached.binary == real and _well_formed(cached):
                return cached
        except (ValueError, KeyError, TypeError, RecursionError):
            pass
    caps = _ask(real)
    try:
        with privdir.private(cache_dir()) as dfd:
            if dfd is not None:
                privdir.write(dfd, f"{key}.json", json.dumps(caps.__dict__).encode(), sync=False)
    except OSError:
        pass  # no cache costs the next probe its speed only
    return caps


ENTRY_LIMIT = 64 * 1024 * 1024


def _well_formed(caps: Capabilities) -> bool:
    """A decoded entry has the shapes check() relies on (lists and maps of names)."""
    names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    lists = (caps.machines, caps.cpus, caps.objects, caps.accels, caps.options)
    return (
        isinstance(caps.version, str)
        and all(names(v) for v in lists)
        and all(
            isinstance(d, dict) and all(isinstance(k, str) and names(x) for k, x in d.items())
            for d in (caps.devices, caps.parameters)
        )
    )


def _ask(binary: str) -> Capabilities:
    from qemuspec.qmp.sync import QMPClient

    proc, ours, errors = _stopped_qemu(binary, ["-machine", "none"])
    try:
        from qemuspec.settings import current

        client = QMPClient.connect(ours, timeout=current().greeting_timeout or PROBE_TIMEOUT)
        try:
            version = (client.greeting or {})["version"]["qemu"]
            types = lambda implements: sorted(
                t["name"]
                for t in client.command(
                    "qom-list-types", {"implements": implements, "abstract": False}
                )
            )
            devices: dict[str, list[str]] = {}
            for driver in types("device"):
                try:
                    devices[driver] = sorted(
                        p["name"]
                        for p in client.command("device-list-properties", {"typename": driver})
                    )
                except QMPError:
                    devices[
                        driver
                    ] = []  # some types cannot be introspected; their names still count
            machines = set()
            for m in client.command("query-machines"):
                machines.add(m["name"])
                if m.get("alias"):
                    machines.add(m["alias"])
            caps = Capabilities(
                binary=binary,
                version=f"{version['major']}.{version['minor']}.{version['micro']}",
                machines=sorted(machines | {"none"}),
                cpus=sorted(
                    {c["name"] for c in client.command("query-cpu-definitions")} | {"host"}
                ),
                devices=devices,
                objects=types("user-creatable"),
                accels=sorted(a.removesuffix("-accel") for a in types("accel")),
                options=_help_options(binary),
                parameters={
                    o["option"]: sorted(p["name"] for p in o["parameters"])
                    for o in client.command("query-command-line-options")
                    if o["parameters"]
                },
            )
            client.command("quit")
        finally:
            client.close()
    except QemuspecError as exc:
        _kill_group(proc)
        errors.seek(0)
        raise LaunchError(
            f"cannot probe {binary}: {exc}: {errors.read(4096).decode(errors='replace').strip()}"
        ) from None
    finally:
        try:
            proc.wait(PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc)
        errors.close()
        ours.close()
    return caps


PROBE_TIMEOUT = 10.0


def kvm_failure(binary: str, machine_type: str, cpu: str) -> str | None:
    """Why ``binary`` cannot run this machine type and CPU model on KVM, or None when it can: qemu is
    started stopped (``-S``, no guest) and asked for its status. KVM that exists but fails (nested hosts:
    "failed to set MSR 0x10a" with -cpu max) aborts qemu while it sets the vCPUs up, before it answers;
    a KVM on which the guest then hangs is not found this way (the readiness failure names it)."""
    from qemuspec.qmp.sync import QMPClient

    proc, ours, errors = _stopped_qemu(
        binary, ["-accel", "kvm", "-machine", machine_type, "-cpu", cpu, "-m", "64"]
    )
    try:
        try:
            with QMPClient.connect(ours, timeout=PROBE_TIMEOUT) as client:
                client.command("query-status", timeout=PROBE_TIMEOUT)
                client.command("quit")
            return None
        except QemuspecError as exc:
            _kill_group(proc)
            errors.seek(0)
            said = [
                line
                for line in errors.read(4096).decode(errors="replace").splitlines()
                if line.strip()
            ]
            return "; ".join(said[:2]) or str(exc)
    finally:
        try:
            proc.wait(PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc)
        errors.close()
        ours.close()


def _stopped_qemu(
    binary: str, machine: list[str]
) -> tuple[subprocess.Popen, socket.socket, IO[bytes]]:
    """``binary`` started stopped (``-S``, no devices, no display) with ``machine``'s switches and a QMP
    monitor on a socketpair: the process, our end of the monitor, and its stderr. stderr goes to a
    file, not a pipe: a child the binary forks could hold a pipe open forever. Its own session, so
    the whole group goes on failure (a wrapper script's children too, _kill_group)."""
    import tempfile

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        binary,
        *machine,
        "-S",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
        f"socket,id=qmp,fd={theirs.fileno()}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    errors = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            argv,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
    except BaseException:
        errors.close()
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours, errors


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the probe's process group (it leads its own session) and reap it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


def _help_options(binary: str) -> list[str]:
    import tempfile

    with tempfile.TemporaryFile() as out_file:
        proc = subprocess.Popen(
            [binary, "-help"],
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.wait(PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise QemuspecError(
                f"{binary} -help did not finish within {PROBE_TIMEOUT:g} s"
            ) from None
        finally:
            _kill_group(proc)
        out_file.seek(0)
        out = out_file.read().decode(errors="replace")
    return sorted(set(re.findall(r"^-([a-zA-Z0-9][\w-]*)", out, re.M)))


def _closest(word: str, choices, what: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else f"see `{what}`"


def machine_problems(
    name: str, machine, forced_accel: str | None = None
) -> list[tuple[tuple, str]]:
    """What the machine's qemu binary says against the machine (cached), and, when the machine
    demands KVM alone, whether qemu can start it on KVM here (explicit kvm has no fallback). The one
    probe of a definition against qemu: `up`'s local preflight, `run` and `validate --probe`."""
    from qemuspec.settings import current

    problems = check(name, machine, probe(machine.qemu))
    accels = [machine.accel] if isinstance(machine.accel, str) else list(machine.accel)
    demanded = (
        accels[:1] == ["kvm"] and "tcg" not in accels and not (forced_accel or current().accel)
    )
    if demanded and os.path.exists("/dev/kvm"):
        why = kvm_failure(machine.qemu, machine.machine, machine.cpu)
        if why:
            problems.append(
                (
                    ("machines", name, "accel"),
                    'accel = "kvm" but qemu cannot start this machine '
                    f'on KVM here ({why}): use accel = "auto" (kvm when it works, else tcg) or "tcg", '
                    "or run with QEMUSPEC_ACCEL=tcg",
                )
            )
    return problems


def check(name: str, machine, caps: Capabilities) -> list[tuple[tuple, str]]:
    """Problems of one machine against what its qemu supports: (location, message) pairs."""
    from qemuspec.render import DISK_DEVICE

    where = ("machines", name)
    problems: list[tuple[tuple, str]] = []
    qemu = f"{os.path.basename(caps.binary)} {caps.version}"
    if machine.machine not in caps.machines:
        problems.append(
            (
                where + ("machine",),
                f'{qemu} has no machine type "{machine.machine}": {_closest(machine.machine, caps.machines, "qemu -machine help")}',
            )
        )
    if machine.machine != "none" and machine.cpu not in caps.cpus:
        problems.append(
            (
                where + ("cpu",),
                f'{qemu} has no CPU model "{machine.cpu}": {_closest(machine.cpu, caps.cpus, "qemu -cpu help")}',
            )
        )
    for accel in [machine.accel] if isinstance(machine.accel, str) else machine.accel:
        if accel != "auto" and accel not in caps.accels:
            problems.append(
                (
                    where + ("accel",),
                    f'{qemu} has no accelerator "{accel}": it has {", ".join(caps.accels)}',
                )
            )

    def device(loc: tuple, driver: str, options: dict, options_key: str) -> None:
        if driver not in caps.devices:
            problems.append(
                (
                    loc,
                    f'{qemu} has no device "{driver}": {_closest(driver, caps.devices, "qemu -device help")}',
                )
            )
            return
        props = caps.devices[driver]
        for key in options:
            if props and key not in props:
                problems.append(
                    (
                        loc[:-1] + (options_key, key),
                        f'device "{driver}" has no property "{key}": {_closest(key, props, f"qemu -device {driver},help")}',
                    )
                )

    for i, nic in enumerate(machine.nics):
        device(where + ("nics", i, "model"), nic.model, nic.device_options, "device_options")
    for i, disk in enumerate(machine.disks):
        if disk.interface != "none":
            device(
                where + ("disks", i, "interface"),
                DISK_DEVICE[disk.interface],
                disk.device_options,
                "device_options",
            )
    for i, dev in enumerate(machine.devices):
        device(where + ("devices", i, "driver"), dev.driver, dev.options, "options")
    for i, obj in enumerate(machine.objects):
        if obj.type not in caps.objects:
            problems.append(
                (
                    where + ("objects", i, "type"),
                    f'{qemu} has no object type "{obj.type}": {_closest(obj.type, caps.objects, "qemu -object help")}',
                )
            )
    for i, arg in enumerate(machine.append):
        if arg.startswith("-") and not re.fullmatch(r"-[\d.]+", arg):
            option = arg.lstrip("-")
            if option not in caps.options:
                close = difflib.get_close_matches(option, caps.options, n=1, cutoff=0.6)
                hint = f'did you mean "-{close[0]}"?' if close else "see `qemu -help`"
                problems.append((where + ("append", i), f'{qemu} has no option "{arg}": {hint}'))
            elif (
                _GROUPS.get(option, option) in caps.parameters
                and option not in _OPEN_ENDED
                and i + 1 < len(machine.append)
            ):
                keys = caps.parameters[_GROUPS.get(option, option)]
                for part in re.split(r"(?<!,),(?!,)", machine.append[i + 1]):
                    key = part.split("=", 1)[0]
                    if "=" in part and key not in keys:
                        problems.append(
                            (
                                where + ("append", i + 1),
                                f'option "{arg}" has no parameter "{key}": {_closest(key, keys, f"qemu {arg} help")}',
                            )
                        )
    return problems
