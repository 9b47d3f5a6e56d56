"""The local backend: machines run here, each under qemuspec's own supervisor (runtime/supervisor.py),
its qemu found through the state directory's records. What it does is one machine's part; levels,
the lock, ownership and the definition record are reconcile's (backends/base.py)."""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import time
from typing import TYPE_CHECKING, Callable

from qemuspec.backends.base import Outcome, Problem, Report, Seen, locked
from qemuspec.errors import QemuspecError
from qemuspec.runtime import supervisor
from qemuspec.runtime.instance import Instance, forget
from qemuspec.spec.preflight import qemu_path

if TYPE_CHECKING:
    import socket

    from qemuspec.qmp.sync import QMPClient
    from qemuspec.runtime.agent import GuestAgent
    from qemuspec.spec.models import File, Machine


class LocalBackend:
    """Machines of one state root on this host. ``owner``: the definition file, recorded by the
    supervisors it forks; ``source``: the file named in hints."""

    kind = "local"
    uri = None
    where = "local"

    def __init__(self, root: str, source: str, owner: str | None = None):
        self.root, self.source, self.owner = root, source, owner

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def look(self, name: str, machine: Machine) -> Seen:
        from qemuspec.runtime import paths
        from qemuspec.runtime.instance import is_our_qemu, recorded

        state_dir = self._dir(name)
        sup = supervisor.read_supervisor(state_dir)
        record = recorded(state_dir)
        found = Instance.find(name, machine, state_dir)
        live = sup is not None or (
            record is not None and is_our_qemu(record, paths.layout(state_dir).pidfile)
        )
        seen = Seen(
            running=found is not None,
            hash=found.recorded_hash if found is not None else None,
            owner=(sup.owner if sup is not None and sup.owner else None)
            or (record.owner if record else None),
            claimed=live,
            adoptable=found is not None and sup is None,
            busy=sup is not None,
            starting=sup is not None and sup.phase in ("starting", "restarting"),
            place=f"in {state_dir}",
        )
        if found is not None and found.process is not None:
            seen.pid, seen.ports, seen.accel = (
                found.process.pid,
                found.ports,
                list(found.layout.accel),
            )
            seen.booted_memory = _booted_memory(found.argv)
        return seen

    def start(
        self, name: str, machine: Machine, action: str, report: Report
    ) -> Callable[[], Outcome]:
        state_dir = self._dir(name)
        began = time.monotonic()
        adopt, restarts = action == "adopted", 0
        if adopt:
            stale = supervisor.stale_supervisor(state_dir)
            restarts = stale.restarts if stale else 0  # the count carries on
        else:
            _clean_stale(state_dir)
        if action == "recreated":
            try:
                _rebuild(name, machine, state_dir)
            except QemuspecError as exc:
                failed = Outcome(name, "failed", detail=str(exc))
                return lambda: failed
        try:
            _, fd = supervisor.spawn(name, machine, state_dir, adopt, self.owner, restarts)
        except (OSError, QemuspecError) as exc:
            failed = Outcome(name, "failed", detail=f"cannot start the supervisor of {name}: {exc}")
            return lambda: failed
        report(name, "starting")

        def wait() -> Outcome:
            outcomes: dict[str, Outcome] = {}
            _collect({name: machine}, {fd: (name, action, began)}, outcomes, report)
            return outcomes[name]

        return wait

    def join(self, name: str, machine: Machine, began: float) -> Outcome | None:
        return _wait_started(name, machine, self._dir(name), began)

    def change(self, name: str, old: Machine, new: Machine, fields: list[str]) -> Outcome:
        """qemu's part through ``runtime/live.py`` on the client monitor (the supervisor holds the main
        one; qemu sends its events, DEVICE_DELETED too, to both), then the supervisor's: SIGHUP makes
        it re-read the recorded definition (restart policy, stop timeout, what a restart starts) and
        write qemu's record with the new definition hash, which this waits for. An unsupervised
        machine's record is written here; its next supervisor reads the new definition."""
        from qemuspec.qmp.sync import QMPClient
        from qemuspec.runtime import live
        from qemuspec.spec.changes import classify
        from qemuspec.spec.records import definition_hash

        state_dir = self._dir(name)
        inst = self.instance(name, old)
        assert inst.process is not None
        pid = inst.process.pid
        by = {
            c.field: c.by
            for c in classify(old.model_dump(mode="json"), new.model_dump(mode="json"))
        }
        qemu_fields = [f for f in fields if by.get(f) == "qemu"]
        steps: list[str] = []
        if qemu_fields:
            with QMPClient.connect(f"unix:{inst.layout.qmp_client}", timeout=5) as client:
                steps = live.apply(client, name, old, new, inst.layout, qemu_fields)
        supervised = [f for f in fields if by.get(f) == "supervisor"]
        if supervised:
            steps.append("supervisor: " + ", ".join(supervised))
        wanted = definition_hash(new)
        sup = supervisor.read_supervisor(state_dir)
        if sup is None:
            inst.machine = new
            inst.write_state()
        else:
            os.kill(sup.pid, signal.SIGHUP)  # read_supervisor proved the pid (lock, start time)
            _await_hash(name, new, state_dir, wanted)
        found = Instance.find(name, new, state_dir)
        return Outcome(
            name,
            "changed",
            pid=pid,
            detail="; ".join(steps) or "recorded",
            ports=found.ports if found is not None else inst.ports,
            accel=list(inst.layout.accel),
        )

    def stop(self, name: str, machine: Machine, timeout: float | None) -> str:
        step = _stop_one(name, machine, self._dir(name), timeout)
        from qemuspec.runtime.policy import forced

        supervisor.record(self._dir(name), "QEMUSPEC_DOWN", step=step, forced=forced(step))
        return step

    def clean(self, name: str) -> None:
        _clean_stale(self._dir(name))

    def plan_step(self, name: str, machine: Machine, seen: Seen, action: str) -> dict:
        step: dict = {"diff": []}
        if action == "recreate":
            found = Instance.find(name, machine, self._dir(name))
            if found is not None:
                import difflib

                from qemuspec.render import render

                wanted = render(machine, name, found.layout)
                step["diff"] = list(
                    difflib.unified_diff(
                        found.argv, wanted, "running", "definition", lineterm="", n=1
                    )
                )
        if machine.warm:
            from qemuspec.runtime import warm

            step["warm"] = warm.check(name, machine, self._dir(name)).as_dict()
        return step

    def status(self, name: str, machine: Machine) -> dict:
        from qemuspec.runtime.status import machine_status

        return {**machine_status(name, machine, self._dir(name)), "host": None}

    def preflight(
        self,
        spec: File,
        source: str,
        names: list[str],
        allow_local_qemu: bool,
        allow_host_paths: bool,
        environ: dict[str, str],
        ports: bool = False,
        probe: bool = False,
    ) -> list[Problem]:
        """Every check: files, kvm, the qemu binary, host paths; then (``ports``) the forwards of the
        machines `up` would start must be free; then (``probe``) what the qemu binary supports."""
        from qemuspec.spec import preflight as checks

        problems = checks.host_problems(
            spec,
            source,
            names,
            allow_local_qemu=allow_local_qemu,
            environ=environ,
            allow_host_paths=allow_host_paths,
        )
        if problems:
            return problems
        if ports:
            from qemuspec.runtime.sockets import busy_forwards

            for name in names:
                seen = self.look(name, spec.machines[name])
                if seen.running or seen.busy:
                    continue
                problems += [
                    (
                        ("machines", name, "nics", index, "forwards", number, "host"),
                        f"host port {fwd.address}:{fwd.host}/{fwd.protocol} is {why}: stop what holds it, "
                        "or choose another port (host = 0 picks a free one)",
                    )
                    for index, number, fwd, why in busy_forwards(spec.machines[name].nics)
                ]
        if probe and not problems:
            from qemuspec.runtime import capabilities

            for name in names:
                problems += capabilities.machine_problems(name, spec.machines[name])
        return problems

    def refusal(self, name: str, machine: Machine, command: str) -> str | None:
        return None

    def purge(self, name: str) -> list[str]:
        from qemuspec.runtime.purge import purge

        return purge(self.root, name)

    def instance(self, name: str, machine: Machine) -> Instance:
        inst = Instance.find(name, machine, self._dir(name))
        if inst is None:
            raise QemuspecError(
                f"machine {name} is not running: start it with `qemuspec up {self.source}`"
            )
        return inst

    def monitor(self, name: str, machine: Machine) -> "QMPClient":
        """A connection on the client monitor, which stays free while the supervisor holds the main one."""
        from qemuspec.qmp.sync import QMPClient

        return QMPClient.connect(
            f"unix:{self.instance(name, machine).layout.qmp_client}", timeout=5
        )

    def agent(self, name: str, machine: Machine, timeout: float) -> "GuestAgent":
        """A synced guest-agent session, or an error that says why not: machine paused, agent silent."""
        from qemuspec.errors import QMPConnectionError, QMPProtocolError, QMPTimeout
        from qemuspec.runtime.agent import GuestAgent
        from qemuspec.runtime.status import run_state

        inst = self.instance(name, machine)
        if run_state(inst)[0] == "paused":
            raise QemuspecError(
                f"machine {name} is paused, so its guest agent cannot answer: "
                f"`qemuspec resume {self.source} {name}` first"
            )
        agent = GuestAgent(inst.layout.qga, timeout=timeout)
        try:
            agent.sync(timeout=min(timeout, 10.0))
        except (
            QMPProtocolError
        ) as exc:  # the guest answers, but not as an agent: say so, not "is it running?"
            agent.close()
            raise QMPProtocolError(
                f"the guest agent of {name} broke the protocol, so nothing it says is used: {exc}"
            ) from None
        except (QMPTimeout, QMPConnectionError) as exc:
            agent.close()
            raise QemuspecError(
                f"the guest agent of {name} does not answer ({exc}): is qemu-guest-agent running in the guest "
                "on the virtio-serial port org.qemu.guest_agent.0?"
            ) from None
        return agent

    def pause(self, name: str, machine: Machine, paused: bool) -> None:
        with self.monitor(name, machine) as client:
            client.command("stop" if paused else "cont")

    def console(self, name: str, machine: Machine, interactive: bool) -> "socket.socket":
        """A session on the supervisor's console proxy (runtime/console.py): it answers ``ok`` or why not."""
        import socket

        inst = self.instance(name, machine)
        if inst.machine.serial not in ("log", "socket"):
            raise QemuspecError(
                f'machine {name} has no console socket: set serial = "log" or "socket"'
            )
        path = inst.layout.console_client
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            sock.settimeout(5)
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < 4096:
                chunk = sock.recv(1)
                if not chunk:
                    break
                answer += chunk
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise QemuspecError(
                f"the console of machine {name} is not served ({path}: {exc.strerror or exc}): its "
                "supervisor serves it; `qemuspec status` says whether it runs (an unsupervised machine "
                "is adopted by `qemuspec up`)"
            ) from None
        if answer != b"ok\n":
            sock.close()
            why = (
                answer.decode(errors="replace").strip().removeprefix("busy: ")
                or "the proxy closed the connection"
            )
            raise QemuspecError(why)
        return sock

    def serial_log(self, name: str) -> str | None:
        from qemuspec.runtime.statedir import SERIAL_LOG, read_from

        data = read_from(
            os.path.join(self._dir(name), SERIAL_LOG), 0
        )  # never through a planted symlink
        return None if data is None else data.decode(errors="replace").replace("\r", "")

    def ssh(self, name: str, machine: Machine, command: list[str]) -> dict:
        from qemuspec.runtime import sshkeys

        inst = self.instance(name, machine)
        key, _ = sshkeys.ensure_key(self.root)
        port = inst.host_port(machine.ssh.port)
        argv = sshkeys.ssh_argv(key, inst.state_dir, machine.ssh.user, port, command)
        return {
            "machine": name,
            "host": "127.0.0.1",
            "port": port,
            "user": machine.ssh.user,
            "key": key,
            "argv": argv,
        }

    def settle(self, spec: File, names: list[str]) -> None:
        """A network's switch goes when no machine of the file that uses it still runs."""
        from qemuspec.runtime import paths
        from qemuspec.runtime.network import stop_switch

        for network in spec.networks:
            users = [
                n for n, m in spec.machines.items() if any(nic.network == network for nic in m.nics)
            ]
            if users and not any(Instance.find(n, spec.machines[n], self._dir(n)) for n in users):
                stop_switch(paths.layout(self._dir(users[0])).network(network))

    def readopt(self, spec: File, names: list[str]) -> list[Outcome]:
        """Give unsupervised machines with a restart policy a supervisor again (libvirtd and PID 1 re-find
        their children; so does any qemuspec command that sees one): only a machine this file started,
        still of this definition (same hash), and only when no other qemuspec command holds the state
        lock (it is acting on the machines; never wait for it). The restart count carries on."""
        wanted = [
            n
            for n in names
            if spec.machines[n].restart != "no" and self._unsupervised(spec.machines[n], n)
        ]
        if not wanted:
            return []
        with locked(self.root, wait=False) as held:
            if not held:
                return []
            waits = [
                self.start(n, spec.machines[n], "adopted", lambda n, s: None)
                for n in wanted
                if self._unsupervised(spec.machines[n], n)
            ]  # checked again under the lock
            return [wait() for wait in waits]

    def _unsupervised(self, machine: Machine, name: str) -> bool:
        from qemuspec.spec.records import definition_hash

        seen = self.look(name, machine)
        if seen.busy or (
            seen.owner
            and self.owner
            and seen.claimed
            and os.path.abspath(seen.owner) != os.path.abspath(self.owner)
        ):
            return False
        return seen.running and seen.hash == definition_hash(machine)


def _booted_memory(argv: list[str]) -> int | None:
    """The MiB of `-m` on the command line qemu runs (render writes ``-m NM``); None if not there."""
    for option, value in zip(argv, argv[1:]):
        if option == "-m" and value.endswith("M") and value[:-1].isdigit():
            return int(value[:-1])
    return None


def _rebuild(name: str, machine: Machine, state_dir: str) -> None:
    """A recreate (spec/changes.py): the disks whose image changed (size, backing, format, base) are
    made again by the start, so the ones qemuspec created (created.json, same device and inode) are
    deleted first; a disk the user supplied is never deleted, the error says what to do. The cloud-init
    seed is rebuilt by the start itself (its inputs' hash changed)."""
    from qemuspec.runtime import statedir
    from qemuspec.spec.changes import RECREATE, classify

    recorded = statedir.recorded_definition(state_dir)
    if recorded is None:
        return
    ours = set(statedir.created_files(state_dir))
    for change in classify(recorded, machine.model_dump(mode="json")):
        if change.cls != RECREATE or not change.field.startswith("disks["):
            continue
        index = int(change.field[len("disks[") :].split("]", 1)[0])
        path = machine.disks[index].file
        if path in ours:
            os.unlink(path)
            ours.discard(path)
        elif os.path.exists(path):
            raise QemuspecError(
                f"machine {name}: {change.field} changed, so disk {path} must be made again, and "
                "qemuspec did not create it (it deletes only disks it made): resize it with "
                "`qemuspec img resize`, or move it away so `up` creates a new one"
            )


RELOAD_TIMEOUT = 10.0  # a supervisor answers a SIGHUP between two of its waits, in milliseconds


def _await_hash(name: str, machine: Machine, state_dir: str, wanted: str) -> None:
    """Until qemu's record carries the new definition hash (the supervisor re-read the definition),
    within RELOAD_TIMEOUT; polled, since the supervisor has no channel back to this process."""
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        found = Instance.find(name, machine, state_dir)
        if found is not None and found.recorded_hash == wanted:
            return
        if found is None or time.monotonic() > deadline:
            raise QemuspecError(
                f"the supervisor of {name} did not take the changed definition within "
                f"{RELOAD_TIMEOUT:g} s (its supervisor.log may say why)"
            )
        time.sleep(0.02)


def _wait_started(name: str, machine: Machine, state_dir: str, began: float) -> Outcome | None:
    """Wait for a start another `up` began (the supervisor lives on when that `up` is interrupted):
    its outcome is ours. Ready: "started"; failed, or a failed attempt of a restarting machine: "failed"
    with the supervisor's reason; no answer within the readiness timeout (after a pending restart's
    delay): "failed". None when the supervisor ended without a failure (then `up` decides again)."""
    from qemuspec.runtime import statedir

    sup = supervisor.read_supervisor(state_dir)
    if sup is None:
        return None
    delay = (
        max(0.0, (sup.next_at or time.time()) - time.time()) if sup.phase == "restarting" else 0.0
    )
    deadline = time.monotonic() + delay + machine.ready.timeout + 10.0
    seen_failure = sup.last_exit if sup.phase == "restarting" else None
    try:
        pidfd = os.pidfd_open(sup.pid)
    except ProcessLookupError:
        pidfd = None
    try:
        while True:
            current = supervisor.read_supervisor(state_dir) if pidfd is not None else None
            if current is None:  # the supervisor ended: how, its exit record says
                end = statedir.read(state_dir, statedir.EXIT, statedir.ExitRecord)
                if end is not None and end.phase in ("failed", "crashed"):
                    return Outcome(
                        name,
                        "failed",
                        time.monotonic() - began,
                        detail=f"machine {name}: the start another `up` began failed: "
                        f"{end.reason or end.why}",
                    )
                return None
            if current.phase == "running":
                found = Instance.find(name, machine, state_dir)
                if found is not None and found.process is not None:
                    return Outcome(
                        name,
                        "started",
                        time.monotonic() - began,
                        found.process.pid,
                        detail="start begun by another `up`",
                        ports=found.ports,
                        accel=list(found.layout.accel),
                        qemu=qemu_path(machine.qemu) or machine.qemu,
                    )
            if (
                current.phase == "restarting"
                and current.last_exit
                and current.last_exit != seen_failure
            ):
                return Outcome(
                    name,
                    "failed",
                    time.monotonic() - began,
                    detail=f"machine {name}: the start another `up` began failed: {current.last_exit} "
                    f'(restart = "{current.restart}": attempt {current.attempt} follows)',
                )
            if current.phase == "stopping":
                return Outcome(
                    name,
                    "failed",
                    time.monotonic() - began,
                    detail=f"machine {name} is being stopped (`down` runs)",
                )
            if time.monotonic() > deadline:
                return Outcome(
                    name,
                    "failed",
                    time.monotonic() - began,
                    detail=f"machine {name} was not ready within {machine.ready.timeout:g} s of the start "
                    f"another `up` began (its supervisor, pid {current.pid}, says {current.phase})",
                )
            # the supervisor's record changes without a notification we can wait on; its exit wakes us at once
            select.select([pidfd] if pidfd is not None else [], [], [], 0.1)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _collect(
    machines: dict[str, Machine],
    pending: dict[int, tuple[str, str, float]],
    outcomes: dict[str, Outcome],
    report: Report,
) -> None:
    """Read supervisors' progress lines until each machine is ready or failed."""
    sel = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    deadlines: dict[int, float] = {}
    discarded: dict[int, str] = {}  # fd -> why its saved state was not restored
    for fd, (name, _, _) in pending.items():
        sel.register(fd, selectors.EVENT_READ)
        buffers[fd] = b""
        deadlines[fd] = time.monotonic() + machines[name].ready.timeout + 30.0
    try:
        while pending:
            timeout = max(0.0, min(deadlines[fd] for fd in pending) - time.monotonic())
            events = sel.select(timeout)
            if not events:
                for fd in [fd for fd in pending if deadlines[fd] <= time.monotonic()]:
                    name, _, began = pending.pop(fd)
                    sel.unregister(fd)
                    os.close(fd)
                    outcomes[name] = Outcome(
                        name,
                        "failed",
                        time.monotonic() - began,
                        detail=f"machine {name}: its supervisor gave no answer in time",
                    )
                continue
            for key, _ in events:
                fd = key.fd
                name, action, began = pending[fd]
                chunk = os.read(fd, 65536)
                if chunk:
                    buffers[fd] += chunk
                    *lines, buffers[fd] = buffers[fd].split(b"\n")
                    done = None
                    for line in lines:
                        message = json.loads(line)
                        status = message["status"]
                        if status == "waiting":
                            report(
                                name,
                                "restoring saved state"
                                if message.get("boot") == "warm"
                                else "waiting for ready",
                            )
                        elif status == "probe":  # which readiness probe the guest is at
                            report(name, f"waiting for {message.get('probe', 'ready')}")
                        elif status == "saving":
                            report(name, "saving warm state")
                        elif status == "restore failed":
                            discarded[fd] = message.get("detail", "")
                            report(name, "saved state did not load: booting cold")
                        elif status == "ready":
                            seconds = time.monotonic() - began
                            how = " (warm)" if message.get("boot") == "warm" else ""
                            report(
                                name,
                                f"ready in {seconds:.1f} s{how}"
                                if not message.get("adopted")
                                else "adopted",
                            )
                            detail = (
                                f"boot {message['boot']}"
                                if message.get("boot") and machines[name].warm
                                else ""
                            )
                            warnings = []
                            if fd in discarded:
                                warnings.append(
                                    f"the saved state was not restored: {discarded[fd]}"
                                )
                                detail += f" (saved state discarded: {discarded[fd]})"
                            if message.get(
                                "kvm_failed"
                            ):  # said on up's line, not only in status --json
                                detail += (
                                    "; " if detail else ""
                                ) + f"kvm failed, fell back to tcg: {message['kvm_failed']}"
                            if message.get("saved"):
                                saved = message["saved"]
                                detail += f", state saved in {saved['seconds']:.2f} s ({saved['bytes'] / 2**20:.0f} MiB)"
                            if message.get(
                                "save_failed"
                            ):  # running, its data safe: exit 0, said plainly
                                detail += f", warm save failed: {message['save_failed']}"
                                warnings.append(
                                    f"warm save failed, the next start is cold: {message['save_failed']}"
                                )
                            if (
                                message.get("boot")
                                and machines[name].warm
                                and not message.get("save_failed")
                            ):
                                from qemuspec.runtime.warm import disk_writes

                                if note := disk_writes(machines[name]):
                                    detail += f"; {note.split(':', 1)[0]}"
                            if message.get("recovered"):
                                detail += ("; " if detail else "") + message["recovered"]
                            done = Outcome(
                                name,
                                action,
                                seconds,
                                message.get("pid"),
                                detail=detail,
                                ports=message.get("ports", []),
                                accel=message.get("accel", []),
                                qemu=qemu_path(machines[name].qemu) or machines[name].qemu,
                                warnings=warnings,
                            )
                        elif status == "failed":
                            report(name, "failed")
                            done = Outcome(
                                name,
                                "failed",
                                time.monotonic() - began,
                                detail=message.get("detail", ""),
                            )
                    if done is None:
                        continue
                    outcomes[name] = done
                else:
                    outcomes.setdefault(
                        name,
                        Outcome(
                            name,
                            "failed",
                            time.monotonic() - began,
                            detail=f"machine {name}: its supervisor exited unexpectedly (see supervisor.log)",
                        ),
                    )
                pending.pop(fd)
                sel.unregister(fd)
                os.close(fd)
    finally:
        sel.close()


def _stop_one(name: str, machine: Machine, state_dir: str, timeout: float | None) -> str:
    """Stop a machine. One owner for stopping: a live supervisor stops its own machine (so it is not
    restarted, and its escalation is never cut short); we wait for it as long as that escalation can
    take (policy.stop_budget, from the named timeouts) and act ourselves only when there is no
    supervisor, or it did not finish within that budget (hung: then it is killed first).
    Returns the step that stopped qemu."""
    from qemuspec.runtime import statedir
    from qemuspec.runtime.policy import stop_budget

    sup = supervisor.read_supervisor(state_dir)
    step = "already stopped"
    acpi = machine.stop_timeout if timeout is None else timeout
    if sup is not None:
        supervisor.request_stop(state_dir, timeout)
        if _signal_and_wait(
            sup.pid, signal.SIGTERM, stop_budget(acpi), lambda: supervisor.hung(state_dir, sup)
        ):
            end = statedir.read(state_dir, statedir.EXIT, statedir.ExitRecord)
            step = (end.step if end else None) or step
        else:  # hung (HUNG_GRACE without an answer) or over its budget: we act ourselves
            _signal_and_wait(sup.pid, signal.SIGKILL, 5)
    found = Instance.find(name, machine, state_dir)
    if found is not None:  # unsupervised, or its supervisor hung
        try:
            found.connect()
        except QemuspecError:
            pass  # stop() escalates to signals without QMP
        step = found.stop(timeout).step
    _clean_stale(state_dir)
    return step


def _clean_stale(state_dir: str) -> None:
    """What a killed supervisor and qemu left: records, sockets, the runtime directory. Only called
    when neither lives (checked through the lock and the process identity)."""
    if supervisor.read_supervisor(state_dir) is None:
        forget(state_dir)
        supervisor.clear(state_dir)


HUNG_GRACE = (
    3.0  # seconds a supervisor that does not answer gets to come back before `down` acts itself
)


def _signal_and_wait(
    pid: int, signum: int, timeout: float, hung: Callable[[], str | None] | None = None
) -> bool:
    """Signal and wait for the exit (True) within ``timeout``; with ``hung``, give up (False) once the
    process has not answered for HUNG_GRACE (a SIGSTOPped supervisor never handles the SIGTERM)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        silent_since: float | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if select.select([fd], [], [], min(remaining, 0.5) if hung else remaining)[0]:
                return True
            if hung is not None:
                now = time.monotonic()
                if hung() is None:
                    silent_since = None
                elif silent_since is None:
                    silent_since = now
                elif now - silent_since >= HUNG_GRACE:
                    return False
    except ProcessLookupError:
        return True
    finally:
        os.close(fd)
