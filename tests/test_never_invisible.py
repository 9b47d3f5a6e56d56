"""Issue 22, "Never invisible" (items 6-11): a fault matrix with real qemu under TCG and the test guest.

Each test injects one fault into a machine started by the CLI and asserts what status shows, what is
left running (only this test's own processes: qemu whose command line names the test's tmp_path, and
the supervisors it recorded) and the data kept. Detection and recovery times go to
$QEMUSPEC_FAULT_TIMINGS (JSON lines) when it is set, for the report; they are never asserted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import fail_or_skip
from helpers import alive
from test_faults import cli, timing, until

MACHINE = """
[machines.{name}]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 {cmdline}"
memory = "256M"
rng = true
agent = true
restart = "{restart}"
stop_timeout = "{stop_timeout}"
[machines.{name}.ready]
serial = "{marker}"
timeout = "{timeout}"
"""


def own_qemu(tmp_path) -> set[int]:
    """This test's qemu processes: their command line names its tmp_path (never another helper's)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            exe = os.path.basename(os.readlink(f"/proc/{entry}/exe"))
        except OSError:
            continue
        if (
            exe.startswith("qemu-system")
            and any(str(tmp_path).encode() in arg for arg in argv)
            and alive(entry)
        ):
            found.add(int(entry))
    return found


def background(*args, **kwargs) -> subprocess.Popen:
    """A qemuspec command left running while the test goes on."""
    return subprocess.Popen(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def started_again(path, old_pid, what, timeout=120.0) -> dict:
    """Wait until the machine runs a qemu other than ``old_pid``; its status row."""
    return until(
        lambda: (r := status(path)["web"])["state"] == "running" and r["pid"] != old_pid and r,
        timeout=timeout,
        what=what,
    )


def status(path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(cli("status", path, "--json").stdout)}


def run_dir(path, name="web") -> str:
    from qemuspec.runtime import paths

    return paths.run_dir(os.path.join(os.path.dirname(path), ".qemuspec", name))


def state(path, name="web") -> str:
    return os.path.join(os.path.dirname(path), ".qemuspec", name)


@pytest.fixture
def lab(tmp_path, guest):
    """Definitions of the test guest; in teardown every recorded supervisor is continued (a test may
    SIGSTOP one), every file brought down, and none of this test's qemu or supervisors may remain."""
    made: list[str] = []
    supervisors: set[int] = set()

    def make(
        restart="no",
        cmdline="quiet",
        marker=None,
        timeout="90s",
        stop_timeout="5s",
        file="lab.toml",
    ):
        path = tmp_path / file
        path.write_text(
            MACHINE.format(
                name="web",
                kernel=guest["kernel"],
                initrd=guest["initrd"],
                cmdline=cmdline,
                restart=restart,
                marker=marker or guest["marker"],
                timeout=timeout,
                stop_timeout=stop_timeout,
            )
        )
        made.append(str(path))
        return str(path)

    make.supervisors = supervisors  # type: ignore[attr-defined]
    yield make
    for pid in supervisors:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    for path in made:
        cli("down", path, check=False)
    assert own_qemu(tmp_path) == set(), "none of this test's qemu is left"
    assert not any(alive(pid) for pid in supervisors), "none of this test's supervisors is left"
    for path in made:
        assert not os.path.exists(run_dir(path)), "no runtime directory left"


def up(lab, path) -> tuple[dict, int]:
    [started] = json.loads(cli("up", path, "--json").stdout)
    sup = status(path)["web"]["supervisor"]
    lab.supervisors.add(sup)
    return started, sup


# -- item 6: the runtime directory removed under a live supervisor -------------------------------


def test_runtime_directory_removed_under_a_live_supervisor_is_made_again(lab, tmp_path):
    path = lab(restart="always")
    started, sup = up(lab, path)
    lock = os.path.join(run_dir(path), "supervisor.lock")
    removed = time.monotonic()
    shutil.rmtree(run_dir(path))  # what tmpfiles does to /tmp, or logind to /run/user/UID
    until(
        lambda: os.path.exists(lock),
        timeout=10,
        what="the supervisor makes its runtime directory again",
    )
    detected = time.monotonic() - removed
    row = status(path)["web"]
    assert row["state"] == "running" and row["supervisor"] == sup and row["pid"] == started["pid"]
    assert "runtime directory" in row["reason"] and "made again" in row["reason"]
    [again] = json.loads(cli("up", path, "--json").stdout)
    assert again["action"] == "up to date" and again["pid"] == started["pid"], (
        "up finds it: no second qemu"
    )
    assert own_qemu(tmp_path) == {started["pid"]}
    ls = [r for r in json.loads(cli("ls", "--json").stdout) if r["state_dir"] == state(path)]
    assert [r["pid"] for r in ls] == [started["pid"]], "ls lists it again"
    began = time.monotonic()
    result = cli("down", path, "--json")
    [down] = json.loads(result.stdout)
    assert down["action"] == "stopped" and result.returncode == 0
    assert not alive(sup) and not alive(started["pid"]), (
        "one down stops it: no supervisor is left to restart it"
    )
    assert own_qemu(tmp_path) == set()
    timing("6 runtime directory removed", detection=detected, down=time.monotonic() - began)


def _remove_tree(path: str) -> None:
    """rm -rf, as a tmp cleaner does, racing the live supervisor that writes into the directory (its
    heartbeat, its records): a file it adds meanwhile makes rmtree's last rmdir fail, so go again."""
    for _ in range(100):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    raise AssertionError(f"{path} kept refilling")


def test_down_right_after_the_runtime_directory_is_removed_still_stops_the_machine(lab, tmp_path):
    path = lab(restart="always")
    started, sup = up(lab, path)
    _remove_tree(run_dir(path))
    began = time.monotonic()
    [down] = json.loads(cli("down", path, "--json").stdout)  # before the supervisor has noticed
    assert down["action"] == "stopped", down
    assert not alive(sup) and not alive(started["pid"]) and own_qemu(tmp_path) == set()
    assert status(path)["web"]["state"] == "stopped"
    timing("6 runtime directory removed: immediate down", recovery=time.monotonic() - began)


# -- item 7: a second `up` while the first one's start is still in progress ------------------------


def _interrupted_up(lab, path, signum) -> int:
    """Start `up`, and once its supervisor has forked and is starting the machine, interrupt the CLI."""
    first = background("up", path)
    from qemuspec.runtime import statedir

    rec = until(
        lambda: statedir.read(run_dir(path), statedir.SUPERVISOR, statedir.SupervisorRecord),
        timeout=60,
        what="the supervisor",
    )
    lab.supervisors.add(rec.pid)
    first.send_signal(signum)
    first.communicate(timeout=30)
    assert alive(rec.pid), "the supervisor outlives the interrupted up"
    return rec.pid


# SIGKILL only: a Ctrl-C (SIGINT) now stops what the `up` was starting (issue 19; test_fail_fast.py's
# test_ctrl_c_during_up_stops_the_machine_it_was_starting), so no start is left in progress by it.
@pytest.mark.parametrize("signum", [signal.SIGKILL])
def test_second_up_waits_for_a_starting_machine_and_reports_ready(lab, tmp_path, signum):
    path = lab()
    sup = _interrupted_up(lab, path, signum)
    assert status(path)["web"]["state"] == "starting"
    began = time.monotonic()
    result = cli("up", path, "--json")
    [second] = json.loads(result.stdout)
    assert (
        result.returncode == 0
        and second["action"] == "started"
        and "another `up`" in second["detail"]
    )
    row = status(path)["web"]
    assert row["state"] == "running" and row["pid"] == second["pid"] and row["supervisor"] == sup
    assert own_qemu(tmp_path) == {second["pid"]}, "one qemu"
    timing(f"7 second up after {signal.Signals(signum).name}", recovery=time.monotonic() - began)


def test_second_up_reports_the_failure_of_a_start_in_progress(lab, tmp_path):
    path = lab(marker="never-printed-marker", timeout="12s")
    sup = _interrupted_up(lab, path, signal.SIGKILL)
    result = cli("up", path, "--json", check=False)
    [second] = json.loads(result.stdout)
    assert result.returncode == 1 and second["action"] == "failed"
    assert (
        "another `up` began failed" in second["detail"] and "never became ready" in second["detail"]
    ), second
    assert "up to date" not in result.stdout
    until(lambda: not alive(sup), timeout=20, what="the failed supervisor's exit")
    assert own_qemu(tmp_path) == set()
    row = status(path)["web"]
    assert row["state"] == "failed" and "never became ready" in row["reason"]


# -- item 8: stopping, and a supervisor that no longer answers --------------------------------------


def test_status_says_stopping_while_a_stop_is_in_progress(lab, tmp_path):
    path = lab(
        cmdline="quiet qemuspec.noacpi", stop_timeout="8s"
    )  # the guest ignores the power button
    started, sup = up(lab, path)
    down = background("down", path, "--json")
    began = time.monotonic()
    row = until(
        lambda: (r := status(path)["web"])["state"] == "stopping" and r, timeout=20, what="stopping"
    )
    timing("8 stop in progress", detection=time.monotonic() - began)
    assert row["pid"] == started["pid"] and "stop is in progress" in row["reason"]
    out, _ = down.communicate(timeout=120)
    [outcome] = json.loads(out)
    assert outcome["action"] == "stopped" and outcome["detail"].startswith("QMP quit")
    assert not alive(sup) and own_qemu(tmp_path) == set()


def test_a_sigstopped_supervisor_is_hung_and_down_acts_itself(lab, tmp_path):
    from qemuspec.runtime.policy import stop_budget

    path = lab(restart="always")
    started, sup = up(lab, path)
    os.kill(sup, signal.SIGSTOP)
    began = time.monotonic()
    row = status(path)["web"]
    timing("8 supervisor SIGSTOPped", detection=time.monotonic() - began)
    assert row["state"] == "hung" and f"pid {sup}" in row["reason"] and "stopped" in row["reason"]
    began = time.monotonic()
    [down] = json.loads(cli("down", path, "--json").stdout)
    seconds = time.monotonic() - began
    timing("8 supervisor SIGSTOPped: down", recovery=seconds)
    assert down["action"] == "stopped" and seconds < stop_budget(5.0) / 2, (
        "a bounded wait, not the whole stop budget"
    )
    assert not alive(sup) and not alive(started["pid"]) and own_qemu(tmp_path) == set()


def test_a_supervisor_without_heartbeat_is_hung(tmp_path):
    """The heartbeat (the lock's mtime, touched every second) going stale is enough, whatever the
    process state: a live, running process that holds the lock but stopped beating is hung."""
    import fcntl

    from qemuspec.runtime import paths, statedir
    from qemuspec.runtime.process import start_time
    from qemuspec.runtime.supervisor import HUNG_AFTER, hung, read_supervisor

    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    run = paths.run_dir(state_dir)
    paths.private_dir(os.path.dirname(run))
    paths.private_dir(run)
    try:
        fd = statedir.hold_lock(run)
        me = statedir.SupervisorRecord(
            pid=os.getpid(), started=start_time(os.getpid()), phase="running"
        )
        statedir.write(run, statedir.SUPERVISOR, me)
        sup = read_supervisor(state_dir)
        assert sup is not None and hung(state_dir, sup) is None, "a fresh heartbeat"
        os.utime(os.path.join(run, statedir.LOCK), (time.time() - HUNG_AFTER - 3,) * 2)
        why = hung(state_dir, sup)
        assert why is not None and f"pid {os.getpid()}" in why and "has not answered for" in why
        statedir.beat(fd)
        assert hung(state_dir, sup) is None
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert read_supervisor(state_dir) is None, "no lock, no supervisor"
        os.close(fd)
    finally:
        shutil.rmtree(run, ignore_errors=True)


# -- item 9: a dead supervisor is replaced, the restart count kept ----------------------------------


def test_unsupervised_machine_with_a_restart_policy_is_adopted_again(lab, tmp_path):
    path = lab(restart="always")
    started, sup = up(lab, path)
    os.kill(started["pid"], signal.SIGKILL)  # one restart first, so there is a count to keep
    row = started_again(path, started["pid"], "restart 1")
    assert row["restarts"] == 1
    qemu = row["pid"]
    os.kill(sup, signal.SIGKILL)
    killed = time.monotonic()
    until(lambda: not alive(sup), what="the supervisor gone")
    listed = [r for r in json.loads(cli("ls", "--json").stdout) if r["state_dir"] == state(path)]
    assert listed and listed[0]["state"] == "unsupervised"
    assert 'restart = "always" is not enforced' in listed[0]["reason"]
    assert listed[0]["restarts"] == 1
    result = cli("status", path, "--json")  # a command with the definition adopts it again
    [row] = json.loads(result.stdout)
    recovered = time.monotonic() - killed
    assert (
        row["state"] == "running" and row.get("readopted") and row["supervisor"] not in (None, sup)
    )
    assert row["pid"] == qemu and row["restarts"] == 1, "same qemu, restart count kept"
    assert "adopted again" in result.stderr
    lab.supervisors.add(row["supervisor"])
    os.kill(qemu, signal.SIGKILL)  # the new supervisor enforces the policy
    row = started_again(path, qemu, "restart 2")
    assert row["restarts"] == 2 and own_qemu(tmp_path) == {row["pid"]}
    timing("9 supervisor killed: re-adopted by status", recovery=recovered)


# -- item 10: serial.log capped while running, and the truth of the console -----------------------


def test_serial_log_stays_under_the_cap_while_the_guest_floods_the_console(lab, tmp_path):
    from qemuspec.runtime.statedir import LOG_LIMIT

    path = lab()
    started, sup = up(lab, path)
    log = os.path.join(state(path), "serial.log")
    flood = background(
        "exec", path, "--", "sh", "-c", "yes qemuspec-flood-line | head -c 6000000 > /dev/ttyS0"
    )
    began = time.monotonic()
    largest = 0

    def size(name):
        try:
            return os.path.getsize(name)
        except FileNotFoundError:
            return 0

    while flood.poll() is None:  # sampled while the guest writes: the cap holds at every moment
        total = size(log) + size(log + ".1")
        largest = max(largest, total)
        assert total <= LOG_LIMIT, f"serial.log + serial.log.1 = {total} bytes while running"
        assert time.monotonic() - began < 240, "the flood did not end"
        time.sleep(0.2)  # a sampling interval, not a synchronisation
    assert flood.returncode == 0, flood.stderr.read()
    assert os.path.exists(log + ".1"), "rotated while running"
    tail = open(log, "rb").read()
    assert b"qemuspec-flood-line\r\n" in tail and size(log) + size(log + ".1") <= LOG_LIMIT
    assert status(path)["web"]["state"] == "running" and alive(started["pid"])
    timing("10 console flood", seconds=time.monotonic() - began, largest_mib=largest / 2**20)


def test_slow_console_reader_gets_what_serial_log_holds(lab, tmp_path, guest):
    """A non-quiet boot seen by a slow `qemuspec console`: qemu's own logfile= repeated bytes behind a
    slow reader; now the log is what the reader received (no byte twice, none missing)."""
    path = lab(cmdline="")  # not quiet: the whole kernel log
    first = background("up", path)
    proxy = os.path.join(run_dir(path), "console-client.sock")
    until(
        lambda: (
            os.path.exists(proxy) and os.path.exists(os.path.join(run_dir(path), "machine.json"))
        ),
        timeout=60,
        what="the console proxy",
    )
    console = background("console", path, stdin=subprocess.PIPE)
    assert console.stdout is not None
    received = console.stdout.read1(256)  # attached: the boot is streaming to it
    assert received, console.stderr.read() if console.stderr else ""
    second = cli("console", path, check=False)  # one console at a time
    assert second.returncode == 1 and "in use by another `qemuspec console`" in second.stderr
    assert "Traceback" not in second.stderr
    while (
        guest["marker"].encode() not in received
    ):  # slowly, 256 bytes at a time, until the boot is done
        chunk = console.stdout.read1(256)
        assert chunk, console.stderr.read() if console.stderr else ""
        received += chunk
        time.sleep(0.005)  # the slowness is the fault injected, not a synchronisation
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    lab.supervisors.add(status(path)["web"]["supervisor"])
    cli("down", path)
    rest, err = console.communicate(timeout=60)
    received += rest
    assert b"the console closed" in err
    log = open(os.path.join(state(path), "serial.log"), "rb").read()
    assert len(received) > 4096 and log.endswith(received), (
        "serial.log holds exactly what the reader was sent"
    )
    assert b"Linux version" in log and own_qemu(tmp_path) == set()


# -- item 11: error paths that used to end as "internal error" ---------------------------------------


def test_exec_poweroff_on_an_always_machine_says_the_guest_went_away(lab, tmp_path):
    path = lab(restart="always")
    started, sup = up(lab, path)
    began = time.monotonic()
    result = cli("exec", path, "--", "poweroff", "-f", check=False)
    assert result.returncode == 255 and "the guest went away" in result.stderr, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    row = started_again(path, started["pid"], "restarted")
    timing("11 exec poweroff -f under always", recovery=time.monotonic() - began)
    assert row["restarts"] == 1 and row["supervisor"] == sup and own_qemu(tmp_path) == {row["pid"]}


def test_read_only_state_directory_during_a_restart_is_a_clear_error(lab, tmp_path):
    if os.getuid() != 0:
        fail_or_skip(
            "this test bind-mounts the state directory read-only: it needs root (CI runs as root)"
        )
    path = lab(restart="always")
    started, sup = up(lab, path)
    directory = state(path)
    with open(
        os.path.join(directory, "known_hosts"), "w"
    ) as f:  # what an ssh probe leaves, removed at each launch
        f.write("[127.0.0.1]:2222 ssh-ed25519 AAAA\n")
    subprocess.run(["mount", "--bind", directory, directory], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", directory], check=True)
        os.kill(started["pid"], signal.SIGKILL)
        row = until(
            lambda: (
                (r := status(path)["web"])["state"] == "restarting"
                and "failed to start" in r["reason"]
                and r
            ),
            timeout=60,
            what="a failed restart",
        )
        assert "known_hosts" in row["reason"] and "Read-only file system" in row["reason"], row
        assert "writable" in row["reason"]
        assert "internal error" not in row["reason"] and row["supervisor"] == sup
        log = open(os.path.join(directory, "supervisor.log")).read()
        assert "Traceback" not in log
    finally:
        subprocess.run(["umount", directory], check=False)
    row = until(
        lambda: (r := status(path)["web"])["state"] == "running" and r,
        timeout=120,
        what="running once writable",
    )
    assert own_qemu(tmp_path) == {row["pid"]}


def test_down_of_another_files_machine_refuses_and_exits_1(lab, tmp_path):
    first = lab(file="one.toml")
    second = lab(file="two.toml")
    started, sup = up(lab, first)
    result = cli("down", second, check=False)
    assert (
        result.returncode == 1
        and f"is run by {first}" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert alive(started["pid"]) and status(first)["web"]["pid"] == started["pid"]
