"""One machine's qemu under control: launch, readiness, QMP, stop with escalation, adoption.

The library's VM and the CLI both drive machines through this class, so a machine started from code
and one started from a file behave the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from qemuspec.errors import (
    LaunchError,
    QemuspecError,
    QMPConnectionError,
    QMPError,
    ReadyTimeout,
    StopRequested,
)
from qemuspec.qmp.sync import QMPClient
from qemuspec.render import OVMF_VARS, render
from qemuspec.runtime import paths, statedir
from qemuspec.runtime.paths import Layout
from qemuspec.runtime.console import ConsoleReader, tail
from qemuspec.runtime.process import Process, alive, cmdline, spawn, start_time
from qemuspec.spec.records import definition_hash, older_hash

if TYPE_CHECKING:
    from qemuspec.runtime.agent import GuestAgent
    from qemuspec.spec.models import Machine

GREETING_TIMEOUT = 15.0
FATAL_EVENTS = ("GUEST_PANICKED", "SHUTDOWN")  # during readiness: the guest will not become ready


class _GuestFailed(QemuspecError):
    """Raised from a probe's hook when the guest died (Instance._failure says how): ends the wait."""


@dataclass
class StopResult:
    step: str  # "ACPI powerdown", "guest-agent shutdown", "QMP quit[: why]", "SIGTERM", "SIGKILL", "already stopped"
    seconds: float
    returncode: int | None


class Instance:
    def __init__(self, name: str, machine: Machine, state_dir: str, layout: Layout | None = None):
        """``layout``: the machine's (paths.machine_layout, with the caller's settings); by default
        built from the process's settings when first needed (``ls`` finds machines without one)."""
        self.name = name
        self.machine = machine
        self.state_dir = os.path.abspath(state_dir)
        self._planned = layout
        self.layout: Layout = layout or paths.layout(
            self.state_dir
        )  # where the running qemu's files are
        self.process: Process | None = None
        self.qmp: QMPClient | None = None
        self.console: ConsoleReader | None = None
        self.qmp_address: str | None = None
        self.ports: list[dict] = []
        self.argv: list[str] = []
        self.started_at: float | None = None
        self.recorded_hash: str | None = None
        self.kvm_failure: str | None = None  # why "auto" fell back from KVM to TCG, if it did
        self.boot = "cold"  # "warm" when started from saved state (runtime/warm.py)
        self.restored: dict | None = None  # after a warm start: what was done about clock and RNG
        # Where a restore's saved state comes from: given the machine, the machine on its restore disks
        # and a descriptor of the migration stream (qemu inherits it; the caller's copy is closed after
        # the launch). None: the machine's own warm/ state (runtime/warm.py); runtime/fresh.py sets it.
        self.incoming: Callable[[Machine], tuple[Machine, int]] | None = None
        self._restore_mark: int | None = None
        self.owner: str | None = None  # the definition file this machine belongs to
        self.control_address: str | None = None  # the controller's monitor (always a unix socket)
        self.exec_argv: list[str] = []  # exactly what qemu runs with (its identity in /proc)
        self.write_error: str | None = None  # the copy in the state directory could not be written
        self.stopping: Callable[[], bool] = lambda: (
            False
        )  # the supervisor's "stop requested": ends ready waits
        # told which readiness probe the wait is at (the CLI's live line and heartbeat)
        self.on_probe: Callable[[str], object] | None = None
        self._listeners: list[tuple[str, Callable[[dict], object]]] = []
        self._log_offset = 0
        self._qemu_log_offset = 0  # where this qemu's stderr begins in qemu.log

    @property
    def planned(self) -> Layout:
        """The layout a launch starts from: accelerators and monitor resolved once."""
        if self._planned is None:
            self._planned = paths.machine_layout(self.machine, self.state_dir)
        return self._planned

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, statedir.STATE)

    # -- events -----------------------------------------------------------------------------------

    def on(self, event: str, callback: Callable[[dict], object]) -> None:
        self._listeners.append((event, callback))
        if self.qmp is not None:
            self.qmp.on(event, callback)

    # -- launch -----------------------------------------------------------------------------------

    def launch(self, restore: bool = False) -> None:
        """Start qemu and connect QMP and the console; returns when QMP is negotiated. With
        ``restore``, qemu loads the machine's saved state (see runtime/warm.py) instead of booting."""
        if self.process is not None and self.process.poll() is None:
            raise LaunchError(f"machine {self.name} is already running (pid {self.process.pid})")
        base = self.planned
        statedir.prepare(base)
        self.process = None
        self.boot = "warm" if restore else "cold"
        try:
            try:
                self._launch(base)
            except LaunchError as exc:
                if (
                    restore
                    or not base.fallback
                    or self.process is None
                    or self.process.poll() is None
                ):
                    raise
                # KVM that exists but fails (nested hosts: bad MSRs, no VMX) must not stop "auto"
                self.kvm_failure = str(exc)
                self.process = None
                base = paths.with_accel(base, base.fallback)
                statedir.prepare(base)
                self._launch(base)
        except BaseException:
            if self.process is None:  # nothing started: leave no socket behind
                forget(self.state_dir)
            raise

    def _launch(self, base: Layout) -> None:
        machine = self.machine
        self._prepare_files(base)
        listeners: dict[str, socket.socket] = {}
        memory_fd = None
        try:
            qmp_port = None
            if base.qmp_port is not None:
                from qemuspec.runtime import tls
                from qemuspec.runtime.sockets import listen_tcp

                tls.ensure(base.tls_dir)
                listeners["qmp-tcp"], qmp_port = listen_tcp(
                    base.qmp_port
                )  # may step up past a taken port
            listeners["qmp"] = self._listen(base.qmp)
            listeners["qmp-client"] = self._listen(base.qmp_client)
            if machine.serial in ("log", "socket"):
                listeners["console"] = self._listen(base.console)
            if machine.agent:
                listeners["qga"] = self._listen(base.qga)
            fds = {role: sock.fileno() for role, sock in listeners.items()}
            self.layout = dataclasses.replace(base, qmp_port=qmp_port, fds={})
            self.argv = render(machine, self.name, self.layout)
            run_machine = machine
            if self.boot == "warm":
                if self.incoming is not None:
                    run_machine, memory_fd = self.incoming(machine)
                else:
                    from qemuspec.runtime import warm

                    run_machine = warm.restore_machine(machine, self.state_dir)
                    memory_fd = os.open(
                        warm.memory_file(self.state_dir),
                        os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                    )
                    warm.verify(self.state_dir, memory_fd)  # the very bytes qemu will read
            run_machine = sticky_forwards(run_machine, self.state_dir)
            launch_argv = render(run_machine, self.name, dataclasses.replace(self.layout, fds=fds))
            if memory_fd is not None:
                launch_argv += ["-incoming", "defer"]
            self.qmp_address = (
                f"tcp:127.0.0.1:{qmp_port}" if qmp_port else f"unix:{base.qmp}"
            )  # for people and tools
            self.control_address = f"unix:{base.qmp}"  # ours
            serial_log = None
            if (
                machine.serial == "log"
            ):  # written by the console reader from what it receives (capped while running)
                serial_log = self._serial_log()
            elif (
                machine.serial == "pty"
            ):  # qemu opens it by path: make it ours (0600, no symlink) first
                statedir.precreate(base.state_dir, statedir.SERIAL_LOG)
            self._log_offset = (
                os.path.getsize(base.serial_log) if os.path.exists(base.serial_log) else 0
            )
            log_fd = statedir.open_log(base.state_dir, statedir.QEMU_LOG)
            try:
                qemu_log_offset = self._qemu_log_offset = os.fstat(log_fd).st_size
                popen = spawn(
                    launch_argv,
                    log_fd,
                    pass_fds=tuple(fds.values()) + ((memory_fd,) if memory_fd is not None else ()),
                )
            finally:
                os.close(log_fd)
            self.process = Process(popen.pid, popen)
            self.exec_argv = list(launch_argv)
            self.started_at = time.time()
            # Connect while our copies of the listening sockets still exist: the connections queue in
            # the backlog and qemu accepts them as it starts, so no console output is missed.
            qmp_sock = socket.socket(
                listeners["qmp"].family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
            )
            qmp_sock.connect(listeners["qmp"].getsockname())
            if "console" in listeners:
                self.console = ConsoleReader.connect(base.console, serial_log)
        finally:
            for sock in listeners.values():
                sock.close()
            if memory_fd is not None:
                os.close(memory_fd)  # qemu has its own copy, under the same number
        try:
            from qemuspec.settings import current

            greeting = current().greeting_timeout or GREETING_TIMEOUT
            self.qmp = QMPClient.connect(qmp_sock, timeout=greeting, event_log=base.events_log)
            if memory_fd is not None:
                # qemu inherited the saved state's fd: load it from there, with events to wait on
                self.qmp.command(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
                self._restore_mark = self.qmp.event_count
                self.qmp.command("migrate-incoming", {"uri": f"fd:{memory_fd}"})
        except QemuspecError as exc:
            code = self.process.wait(2)
            if code is None:  # alive but mute: never leave it behind, nor what it forked
                self.process.terminate_and_kill(2.0)
            self.process.kill_group()
            self._cleanup()
            detail = tail(base.qemu_log, 20, qemu_log_offset)
            status = f"exited with code {code}" if code is not None else "did not answer on QMP"
            raise LaunchError(f"qemu for machine {self.name} {status}: {detail or exc}") from None
        for event, callback in self._listeners:
            self.qmp.on(event, callback)
        if any(n.type == "user" and n.forwards for n in machine.nics):
            self.ports = _forwarded(self.qmp)
            remember_forwards(self.state_dir, machine, self.ports)
        self.write_state()

    def _serial_log(self) -> statedir.CappedLog:
        log = statedir.CappedLog(self.state_dir, statedir.SERIAL_LOG, times=statedir.SERIAL_TIMES)
        if log.errno in (errno.ELOOP, errno.EINVAL):
            log.close()
            raise LaunchError(
                f"{self.layout.serial_log} is a symlink or not a regular file: "
                "qemuspec never writes through one; remove it"
            )
        return log

    def attach_console(self) -> None:
        """Read the console of an adopted machine again (its last reader, a killed supervisor, is gone;
        qemu's chardev waits for the next one): serial.log goes on from here."""
        if (
            self.console is None
            and self.machine.serial in ("log", "socket")
            and os.path.exists(self.layout.console)
        ):
            log = self._serial_log() if self.machine.serial == "log" else None
            try:
                self.console = ConsoleReader.connect(self.layout.console, log)
            except OSError:
                if log is not None:
                    log.close()

    def _listen(self, path: str) -> socket.socket:
        from qemuspec.runtime.sockets import listen_unix

        return listen_unix(path)

    def _prepare_files(self, lay: Layout) -> None:
        from qemuspec.runtime import images

        from qemuspec.runtime.sockets import check_forwards

        check_forwards(self.name, self.machine.nics)
        for disk in self.machine.disks:
            images.ensure_disk(disk, self.state_dir)
        if self.machine.firmware.type == "uefi":
            images.ensure_efivars(self.machine.firmware.vars or OVMF_VARS, lay.efivars)
        for path in (self.machine.kernel, self.machine.initrd):
            if path and not os.path.exists(path):
                raise LaunchError(
                    f"machine {self.name}: {path} does not exist: fix the path (relative paths are relative to the definition file)"
                )
        from qemuspec.render import wants_cidata
        from qemuspec.runtime import sshkeys

        try:
            os.unlink(
                sshkeys.known_hosts(self.state_dir)
            )  # a relaunched guest may have a new host key
        except FileNotFoundError:
            pass
        except (
            OSError
        ) as exc:  # a state directory made read-only (or another user's) under a restart
            raise LaunchError(
                f"machine {self.name}: cannot remove {sshkeys.known_hosts(self.state_dir)} "
                f"({exc.strerror}), which a relaunched guest's new host key needs: make {self.state_dir} "
                "writable, or choose another state directory with --state-dir"
            ) from None
        if wants_cidata(self.machine):
            from qemuspec.runtime.cloudinit import ensure_seed

            ensure_seed(self.name, self.machine, lay, self._public_key())
        networks = {nic.network for nic in self.machine.nics if nic.network}
        if networks:
            from qemuspec.runtime.network import ensure_switch

            for network in sorted(networks):
                ensure_switch(lay.network(network))

    def _public_key(self) -> str:
        """The state directory's ssh key, made only when the cloud-init text asks for it."""
        from qemuspec.runtime.cloudinit import read_text

        ci = self.machine.cloud_init
        text = (read_text(self.name, ci, "user_data") or "") if ci else ""
        if "ssh_public_key" not in text:
            return ""
        from qemuspec.runtime import sshkeys

        return sshkeys.ensure_key(os.path.dirname(self.state_dir))[1]

    def record(self) -> statedir.QemuRecord:
        assert self.process is not None
        return statedir.QemuRecord(
            name=self.name,
            pid=self.process.pid,
            exec_argv=self.exec_argv,
            pid_start=start_time(self.process.pid),
            argv=self.argv,
            hash=definition_hash(self.machine),
            qmp=self.qmp_address,
            control=self.control_address,
            tls=self.layout.tls_dir if self.layout.qmp_port else None,
            qmp_client=f"unix:{self.layout.qmp_client}",
            console=self.layout.console_client
            if self.machine.serial in ("log", "socket")
            else None,
            accel=list(self.layout.accel),
            started_at=self.started_at,
            ports=self.ports,
            state_dir=self.state_dir,
            owner=self.owner,
            boot=self.boot,
            restored=self.restored,
        )

    def write_state(self) -> None:
        """The machine's identity into the runtime directory (authoritative: must succeed), and a copy
        into the state directory for people (may fail: disk full, directory deleted; remembered)."""
        record = self.record()
        statedir.write(self.layout.run_dir, statedir.MACHINE, record)
        try:
            statedir.ensure_private(self.state_dir)
            statedir.write(self.state_dir, statedir.STATE, record)
            self.write_error = None
        except (OSError, QemuspecError) as exc:
            self.write_error = (
                f"cannot write {self.state_file}: {getattr(exc, 'strerror', None) or exc}"
            )

    # -- readiness --------------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> float:
        """Run the machine's readiness probes; returns the seconds it took since launch. A guest that dies
        first (a panic line on the console, QMP GUEST_PANICKED or SHUTDOWN, qemu exiting) ends the wait at
        once: the timeout is there for slow guests, and a dead one would only wait it out."""
        from qemuspec.runtime import probes

        assert self.process is not None and self.qmp is not None
        ready = self.machine.ready
        timeout = ready.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        events: list[dict] = []  # GUEST_PANICKED and SHUTDOWN of this qemu

        def heard(
            event: dict,
        ) -> None:  # on the QMP reader thread: note it and wake the console wait
            events.append(event)
            if self.console is not None:
                self.console.interrupt()

        unsubscribe = [self.qmp.on(name, heard) for name in FATAL_EVENTS]
        for (
            name
        ) in FATAL_EVENTS:  # sent before the wait began (the supervisor serves the console first)
            with contextlib.suppress(QemuspecError):
                event = self.qmp.wait_for(name, 0, since=0)
                if event not in events:
                    events.append(event)

        def stopping() -> bool:  # the console wait's hook: a stop request, or a guest that died
            if self.stopping():
                return True
            if self._failure(events):
                raise _GuestFailed()
            return False

        def running() -> (
            bool
        ):  # every probe asks this between attempts: a stop request ends the wait there
            if stopping():
                raise StopRequested(
                    f"machine {self.name}: stopped while waiting for it to become ready"
                )
            return self.process is not None and self.process.poll() is None

        probe = "QMP"
        try:
            if self.boot == "warm":
                from qemuspec.runtime import warm

                probe = "saved state loading"
                self._probing(probe)
                warm.wait_restored(
                    self, self._restore_mark or 0, max(0.0, deadline - time.monotonic())
                )
            if (
                ready.serial and self.boot != "warm"
            ):  # a restored guest printed its marker before the save
                probe = f"serial /{ready.serial}/"
                self._probing(probe)
                if self.console is None:
                    raise LaunchError(
                        f'ready.serial needs serial = "log" or "socket" (machine {self.name} has "{self.machine.serial}")'
                    )
                try:
                    self.console.wait_for(
                        ready.serial, max(0.0, deadline - time.monotonic()), stopping
                    )
                except EOFError:
                    raise QemuspecError("qemu exited before the console showed it") from None
            for guest, expect, label in (
                (ready.tcp, None, "tcp"),
                (self.machine.ssh.port if ready.ssh else None, b"SSH-", "ssh"),
            ):
                if guest:
                    probe = f"{label} guest port {guest}"
                    self._probing(probe)
                    port = self.host_port(guest)
                    probes.wait_tcp(port, deadline, running, expect)
            if ready.ssh and self._public_key():
                from qemuspec.runtime import sshkeys

                probe = "ssh login"
                self._probing(probe)
                key = sshkeys.key_path(os.path.dirname(self.state_dir))
                argv = sshkeys.ssh_argv(
                    key,
                    self.state_dir,
                    self.machine.ssh.user,
                    self.host_port(self.machine.ssh.port),
                    ["true"],
                    batch=True,
                )
                probes.wait_ssh_login(argv, deadline, running)
            if ready.agent:
                probe = "guest agent"
                self._probing(probe)
                probes.wait_agent(self.layout.qga, deadline, running)
            if ready.command:
                more = f" (and {len(ready.command) - 1} more)" if len(ready.command) > 1 else ""
                probe = f"command `{ready.command[0]}`{more}"
                self._probing(probe)
                probes.wait_command(self, list(ready.command), deadline, running)
        except StopRequested:  # one message whichever probe was waiting
            raise StopRequested(
                f"machine {self.name}: stopped while waiting for it to become ready (probe: {probe})"
            ) from None
        except QemuspecError as exc:
            error = ReadyTimeout(self._not_ready(probe, timeout, exc, events))
            error.probe = probe  # for status: "never became ready (probe ..., after ... s)"
            error.why = self._failure(events)
            raise error from None
        finally:
            for off in unsubscribe:
                off()
        return time.time() - (self.started_at or time.time())

    def _probing(self, probe: str) -> None:
        """Tell whoever watches (``on_probe``) which probe the readiness wait is at now."""
        if self.on_probe is not None:
            with contextlib.suppress(Exception):  # a watcher's trouble never fails the wait
                self.on_probe(probe)

    def _failure(self, events: list[dict]) -> str | None:
        """Why the guest can no longer become ready (its kernel panicked, it shut down, qemu exited), or
        None while it still may."""
        panics = self.console.panics if self.console is not None else []
        names = [event.get("event") for event in events]
        if panics:
            return f"the guest kernel panicked: {panics[0]}"
        if "GUEST_PANICKED" in names:
            return "the guest kernel panicked (QMP GUEST_PANICKED from the pvpanic device)"
        for event in events:
            reason = (event.get("data") or {}).get("reason")
            if event.get("event") == "SHUTDOWN":
                return (
                    "the guest kernel panicked (QMP SHUTDOWN, reason guest-panic)"
                    if reason == "guest-panic"
                    else f"the machine shut down (QMP SHUTDOWN, reason {reason})"
                )
        if self.process is not None and self.process.poll() is not None:
            return "qemu exited"
        return None

    def host_port(self, guest: int, protocol: str = "tcp") -> int:
        for port in self.ports:
            if port["guest"] == guest and port["protocol"] == protocol:
                return port["host"]
        raise LaunchError(
            f"machine {self.name} has no {protocol} forward to guest port {guest}: add forwards = [{{ host = 0, guest = {guest} }}] to a user NIC"
        )

    def _not_ready(self, probe: str, timeout: float, exc: Exception, events: list[dict]) -> str:
        """The ready failure as it was: after how long, why (timeout, panic, shutdown, exit), qemu's real
        state, the guest's panic lines, the last console lines and qemu's stderr."""
        accels = ",".join(self.layout.accel) or "?"
        why = self._failure(events)
        if (
            why is not None
            and self.process is not None
            and self.process.poll() is None
            and why != "qemu exited"
        ):
            self.process.wait(
                2.0
            )  # after GUEST_PANICKED or SHUTDOWN qemu goes on its own: say what it did
        elif (
            why is None
            and not isinstance(exc, (ReadyTimeout, LaunchError))
            and self.process is not None
        ):
            self.process.wait(2.0)  # the console closed or a probe saw qemu go: its exit follows
            why = self._failure(events)
        code = self.process.poll() if self.process else None
        state = f"qemu exited with code {code}" if code is not None else "qemu is still running"
        if code is None and why is not None and "panicked" in why:
            state += " (a panicked guest hangs)"
        elapsed = time.time() - self.started_at if self.started_at else None
        after = f" {elapsed:.1f} s after launch" if elapsed is not None else ""
        console = tail(self.layout.serial_log, 20, self._log_offset) or "(nothing)"
        stderr = tail(self.layout.qemu_log, 20, self._qemu_log_offset) or "(nothing)"
        panics = self.console.panics if self.console is not None else []
        hint = ""
        if why is None and "kvm" in self.layout.accel:
            hint = (
                ' KVM can exist and still hang guests (nested virtualisation): try accel = "tcg" in the '
                "definition, or QEMUSPEC_ACCEL=tcg for the whole run."
            )
        if why is None and isinstance(exc, ReadyTimeout):
            head = f"machine {self.name} was not ready within {timeout:g} s"
            detail = f"{exc}."
        elif why is None:  # the wait could not go on (no forward for the probe, no console)
            head = f"machine {self.name} failed{after}, before it was ready"
            detail = f"{exc}."
        else:
            head = f"machine {self.name} failed{after}, before it was ready"
            detail = f"{why}." if why != "qemu exited" else f"{exc}."
        return (
            f"{head} (probe: {probe}; accelerator: {accels}; {state}): {detail}{hint}\n"
            + ("--- guest panic lines ---\n" + "\n".join(panics) + "\n" if panics else "")
            + f"--- last console lines ---\n{console}\n--- qemu stderr ---\n{stderr}"
        )

    # -- control ----------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        if self.process is None:
            return None
        code = self.process.wait(timeout)
        if code is not None:
            self._cleanup()
        return code

    def quit(self, timeout: float | None = None) -> StopResult:
        """QMP quit at once (no ACPI; ``timeout`` for qemu to go), then signals if qemu does not go."""
        return self._stop(acpi_timeout=None, quit_wait=timeout)

    def stop(self, timeout: float | None = None) -> StopResult:
        """ACPI powerdown, wait up to the stop timeout, then QMP quit, SIGTERM, SIGKILL; always reaped.
        The steps and their timeouts are policy.escalate's."""
        return self._stop(acpi_timeout=self.machine.stop_timeout if timeout is None else timeout)

    def _stop(self, acpi_timeout: float | None, quit_wait: float | None = None) -> StopResult:
        from qemuspec.runtime.policy import QUIT_WAIT, escalate

        began = time.monotonic()
        if self.process is None or self.process.poll() is not None:
            self._cleanup()
            return StopResult(
                "already stopped", 0.0, self.process.returncode if self.process else None
            )
        step = escalate(
            _Escalation(self), acpi_timeout, QUIT_WAIT if quit_wait is None else quit_wait
        )
        self._cleanup()
        return StopResult(step, time.monotonic() - began, self.process.returncode)

    def kill(self) -> None:
        if self.process is not None:
            self.process.terminate_and_kill(0.0)
            self._cleanup()

    def _cleanup(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.console is not None:
            self.console.close()
            self.console = None
        if self.process is not None and self.process.poll() is not None:
            if self.process.popen is not None:
                self.process.kill_group()  # what a wrapper forked dies with it
            forget(self.state_dir)

    def close(self) -> None:
        """Let go of a running machine without stopping it (it keeps running on its own)."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.console is not None:
            self.console.close()
            self.console = None

    # -- adoption ---------------------------------------------------------------------------------

    @classmethod
    def find(cls, name: str, machine: Machine, state_dir: str) -> "Instance | None":
        """The running qemu of this state directory, if the recorded pid really is that qemu.

        The runtime directory's record comes first: it survives a deleted state directory and only
        this user can write it. The state directory's copy is a fallback (runtime directory cleared)
        and is trusted no further than the identity check: same uid, kernel start time, and a
        command line equal to the recorded one, which names this machine's pidfile."""
        inst = cls(name, machine, state_dir)
        record = statedir.read(paths.run_dir(inst.state_dir), statedir.MACHINE, statedir.QemuRecord)
        trusted = record is not None
        if record is None:
            record = statedir.read(inst.state_dir, statedir.STATE, statedir.QemuRecord)
        if record is None or record.name != name:
            return None
        recorded_accel = tuple(a for a in record.accel if isinstance(a, str))
        if not recorded_accel and machine is not None:
            recorded_accel = inst.planned.accel
        port = (
            record.qmp.rsplit(":", 1)[-1] if record.qmp and record.qmp.startswith("tcp:") else None
        )
        lay = dataclasses.replace(
            paths.with_accel(inst.layout, recorded_accel),
            qmp_port=int(port) if port and port.isdigit() else None,
        )
        if not is_our_qemu(record, lay.pidfile) or (not trusted and not _runs_qemu(record.pid)):
            return None
        inst.process = Process(record.pid)
        inst.layout = lay
        inst.argv = record.argv
        inst.exec_argv = record.exec_argv
        inst.qmp_address = record.qmp
        inst.control_address = record.control or (
            record.qmp if (record.qmp or "").startswith("unix:") else None
        )
        inst.ports = record.ports
        inst.started_at = record.started_at
        inst.recorded_hash = record.hash
        if older_hash(record.hash) and record.argv == render(
            machine, name, lay
        ):  # started by an older qemuspec
            inst.recorded_hash = definition_hash(machine)
        inst.owner = record.owner
        inst.boot = record.boot or "cold"
        inst.restored = record.restored
        return inst

    def connect(self, timeout: float = 5.0) -> QMPClient:
        """Connect to the main monitor of an adopted machine (free when no supervisor holds it)."""
        if self.qmp is None or self.qmp.closed:
            if not self.control_address:
                raise QMPConnectionError(f"machine {self.name} has no recorded QMP address")
            self.qmp = QMPClient.connect(
                self.control_address, timeout=timeout, event_log=self.layout.events_log
            )
            for event, callback in self._listeners:
                self.qmp.on(event, callback)
        return self.qmp


class _Escalation:
    """An Instance as policy.escalate sees it."""

    def __init__(self, inst: Instance):
        self.inst = inst

    def guest_running(self) -> bool:
        """A paused or never-started guest cannot act on the power button: skip straight to quit."""
        from qemuspec.runtime.policy import QUERY_TIMEOUT

        if self.inst.qmp is None:
            return False
        try:
            return (
                self.inst.qmp.command("query-status", timeout=QUERY_TIMEOUT).get("status")
                == "running"
            )
        except QemuspecError:
            return False

    def send(self, command: str) -> bool:
        """Send a stop command and wait for its reply (closing right after `quit` can leave qemu up)."""
        from qemuspec.runtime.policy import COMMAND_TIMEOUT

        if self.inst.qmp is None:
            return False
        try:
            self.inst.qmp.command(command, timeout=COMMAND_TIMEOUT)
            return True
        except QMPConnectionError:
            return command == "quit"  # the reply can lose the race with qemu closing the socket
        except (QMPError, QemuspecError):
            return False

    def frozen(self) -> bool:
        """qemu is stopped (SIGSTOP, a debugger): the kernel's process state says so."""
        from qemuspec.runtime.process import state

        return self.inst.process is not None and (state(self.inst.process.pid) or "") in ("T", "t")

    def acpi_unanswered(self) -> str | None:
        """Why a power-button press cannot be answered, when qemu can tell: the machine has no ACPI,
        or the guest has not taken ACPI over yet (SCI_EN, bit 0 of PM1 control, is set by the OS; an
        unmapped PM block reads all ones). Then stop goes straight to quit instead of waiting out
        stop_timeout. Known for SeaBIOS on pc/q35 (PM base 0x600); other firmware is just waited for."""
        kind = self.inst.machine.machine
        if kind == "none":
            return "the machine has no ACPI"
        if (
            self.inst.machine.firmware.type != "bios"
            or self.inst.machine.firmware.code
            or not kind.startswith(("pc", "q35"))
            or self.inst.qmp is None
        ):
            return None
        try:
            out = self.inst.qmp.command(
                "human-monitor-command", {"command-line": "i/w 0x604"}, timeout=5
            )
        except QemuspecError:
            return None
        import re

        match = re.search(r"=\s*0x([0-9a-fA-F]+)", out or "")
        if match is None:
            return None
        pm1_control = int(match.group(1), 16) & 0xFFFF
        if pm1_control == 0xFFFF or not pm1_control & 1:
            return "the guest has not enabled ACPI yet"
        return None

    def has_agent(self) -> bool:
        return bool(self.inst.machine.agent) and os.path.exists(self.inst.layout.qga)

    def _agent(self, timeout: float) -> GuestAgent:
        from qemuspec.runtime.agent import GuestAgent

        agent = GuestAgent(self.inst.layout.qga, timeout=timeout)
        agent.sync(timeout=timeout)
        return agent

    def agent_shutdown(self) -> bool:
        """`guest-shutdown` through the agent. The agent sends no reply when it took the request, an
        error when it could not: silence within the wait counts as taken. Its `shutdown -P +0` is a
        *scheduled* shutdown for systemd, which needs logind -- exactly what a guest whose power button
        nothing handles lacks (seen on Debian 12 without dbus: "child process has failed to shutdown") --
        so after an error the agent runs `poweroff` instead (systemd's works without logind)."""
        from qemuspec.errors import QMPTimeout
        from qemuspec.runtime.policy import AGENT_REPLY

        try:
            agent = self._agent(AGENT_REPLY / 2)
        except QemuspecError:
            return False  # the agent does not answer at all
        with agent:
            try:
                agent.command("guest-shutdown", {"mode": "powerdown"}, timeout=AGENT_REPLY / 2)
            except QMPTimeout:
                return True  # silence: the agent took it (and the guest may be going down already)
            except QMPConnectionError:
                return True  # the guest went down while we waited
            except QemuspecError:
                pass  # an error reply: its shutdown command failed
            try:
                agent.spawn(["poweroff"])
            except QMPConnectionError:
                return True  # gone while we asked
            except QemuspecError:
                return False
        return True

    def agent_sync(self) -> str | None:
        """Before a forced quit: freeze the guest's file systems through the agent (their caches
        written and journals committed), else have it run `sync`; what was done, or None."""
        from qemuspec.runtime.policy import AGENT_SYNC

        try:
            with self._agent(min(3.0, AGENT_SYNC)) as agent:
                try:
                    frozen = agent.command("guest-fsfreeze-freeze", timeout=AGENT_SYNC - 3.0)
                    if isinstance(frozen, int) and not isinstance(frozen, bool) and frozen > 0:
                        return f"{frozen} guest file system{'s' if frozen != 1 else ''} frozen through the guest agent"
                except QMPError:
                    pass  # freezing disabled, or refused: a sync still writes the caches out
                with contextlib.suppress(
                    QemuspecError
                ):  # nothing frozen: the agent must not stay in its frozen state
                    agent.command("guest-fsfreeze-thaw", timeout=3.0)
                code, _, _ = agent.exec(["sync"], timeout=AGENT_SYNC - 3.0)
                return "guest file systems synced through the guest agent" if code == 0 else None
        except QemuspecError:
            return None

    def wait(self, timeout: float) -> bool:
        assert self.inst.process is not None
        return self.inst.process.wait(timeout) is not None

    def signal(self, signum: int) -> None:
        assert self.inst.process is not None
        self.inst.process.signal(signum)


def recorded(state_dir: str) -> statedir.QemuRecord | None:
    """The last qemu recorded for a state directory (alive or not)."""
    state_dir = os.path.abspath(state_dir)
    return statedir.read(
        paths.run_dir(state_dir), statedir.MACHINE, statedir.QemuRecord
    ) or statedir.read(state_dir, statedir.STATE, statedir.QemuRecord)


def forget(state_dir: str) -> None:
    """Remove what a stopped qemu leaves behind: its records, pidfile and sockets; the runtime
    directory too once nothing else (a supervisor between restarts) uses it. Logs and disks stay."""
    state_dir = os.path.abspath(state_dir)
    run = paths.run_dir(state_dir)
    statedir.remove(
        run,
        statedir.MACHINE,
        *statedir.RUN_SOCKETS,
        *[n for n in _listdir(run) if statedir.is_virtiofs_sock(n)],
    )
    tls = os.path.join(
        run, statedir.TLS_DIR
    )  # the TCP monitor's credentials live as long as its qemu
    statedir.remove(tls, *_listdir(tls))
    with contextlib.suppress(OSError):
        os.rmdir(tls)
    statedir.remove(state_dir, statedir.STATE, statedir.PIDFILE)
    with contextlib.suppress(OSError):
        os.rmdir(run)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _runs_qemu(pid: int) -> bool:
    """For a record from the state directory (which others may have written): the process must run a
    qemu-system binary, not merely carry a qemu-like argv."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system")
    except OSError:
        return False


def is_our_qemu(record: statedir.QemuRecord, pidfile: str) -> bool:
    """True only for a live process of this user whose command line is exactly the recorded one and
    names this machine's pidfile, started when recorded: neither a recycled pid nor a process whose
    argv merely mentions the pidfile, nor a forged record pointing at another program, is signalled."""
    pid = record.pid
    if not isinstance(pid, int) or pid <= 1 or not alive(pid):
        return False
    argv = cmdline(pid)
    if not argv or argv != record.exec_argv:
        return False
    if (
        "-pidfile" not in argv
        or argv.index("-pidfile") + 1 >= len(argv)
        or argv[argv.index("-pidfile") + 1] != pidfile
    ):
        return False
    if record.pid_start is not None and start_time(pid) != record.pid_start:
        return False
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def sticky_forwards(machine: Machine, state_dir: str) -> Machine:
    """``machine`` with each ``host = 0`` forward asking for the port its last qemu got (ports.json),
    when that port is free now: the ssh port of `ssh-config` and a bookmarked URL survive restarts.
    A port taken meanwhile stays 0 (any free one). Only what qemu runs changes: the recorded argv,
    plan and warm keys keep the declared 0."""
    last = statedir.read(state_dir, statedir.PORTS, statedir.PortsRecord)
    if last is None or not last.forwards:
        return machine
    from qemuspec.runtime.sockets import is_free

    wanted = {
        (f.get("protocol"), f.get("address"), f.get("guest")): f.get("host")
        for f in last.forwards
        if isinstance(f, dict) and isinstance(f.get("host"), int)
    }
    nics, changed = [], False
    for nic in machine.nics:
        forwards = []
        for fwd in getattr(nic, "forwards", None) or []:
            port = wanted.get((fwd.protocol, fwd.address, fwd.guest))
            if (
                nic.type == "user"
                and not fwd.host
                and port
                and 1024 <= port < 65536
                and is_free(fwd.address, port, fwd.protocol)
            ):
                fwd = fwd.model_copy(update={"host": port})
                changed = True
            forwards.append(fwd)
        nics.append(nic.model_copy(update={"forwards": forwards}) if forwards else nic)
    return machine.model_copy(update={"nics": nics}) if changed else machine


def remember_forwards(state_dir: str, machine: Machine, ports: list[dict]) -> None:
    """Record the ports qemu bound for the declared ``host = 0`` forwards (see sticky_forwards)."""
    picked = {
        (f.protocol, f.address, f.guest)
        for n in machine.nics
        if n.type == "user"
        for f in n.forwards
        if not f.host
    }
    forwards = [
        {"protocol": p["protocol"], "address": p["address"], "guest": p["guest"], "host": p["host"]}
        for p in ports
        if (p.get("protocol"), p.get("address"), p.get("guest")) in picked
    ]
    if forwards:
        with contextlib.suppress(OSError, QemuspecError):
            statedir.write(state_dir, statedir.PORTS, statedir.PortsRecord(forwards=forwards))


def _forwarded(qmp: QMPClient) -> list[dict]:
    from qemuspec.runtime.probes import forwarded_ports

    try:
        return forwarded_ports(qmp)
    except QemuspecError:
        return []
