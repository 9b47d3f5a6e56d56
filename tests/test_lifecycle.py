"""The reconciler and its supervisors with real guests under TCG: idempotent up, changes,
restart policies, adoption, concurrency, dependency order, and a clean down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import alive, qemu_pids

MACHINE = """
[machines.{name}]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet {cmdline}"
memory = "{memory}"
rng = true
restart = "{restart}"
stop_timeout = "5s"
depends_on = {depends}
{extra}
[machines.{name}.ready]
serial = "{marker}"
timeout = "90s"
"""


def definition(tmp_path, guest, machines: dict[str, dict], name="lab.toml") -> str:
    text = ""
    for machine, fields in machines.items():
        values = {
            "name": machine,
            "kernel": guest["kernel"],
            "initrd": guest["initrd"],
            "marker": guest["marker"],
            "cmdline": "",
            "memory": "256M",
            "restart": "no",
            "depends": "[]",
            "extra": "",
            **fields,
        }
        text += MACHINE.format(**values)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def status(path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(cli("status", path, "--json").stdout)}


def events(path, machine) -> list[dict]:
    log = os.path.join(os.path.dirname(path), ".qemuspec", machine, "events.jsonl")
    try:
        with open(log) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def wait_event(path, machine, predicate, timeout=120.0) -> dict:
    """Wait until events.jsonl holds a matching event (the supervisor appends as things happen)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in events(path, machine):
            if predicate(event):
                return event
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no matching event for {machine} within {timeout} s: {events(path, machine)[-5:]}"
            )
        time.sleep(0.05)


def stamp(event) -> float:
    return event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6


@pytest.fixture
def lab(tmp_path, guest):
    """Definitions made in the test; whatever they started is brought down, then nothing may remain."""
    before = qemu_pids(tmp_path)
    made = []

    def make(machines, name="lab.toml"):
        path = definition(tmp_path, guest, machines, name)
        made.append(path)
        return path

    yield make
    supervisors = []
    for path in made:
        supervisors += [r["supervisor"] for r in status(path).values() if r["supervisor"]]
        cli("down", path, check=False)
    assert qemu_pids(tmp_path) == before, "no qemu left behind"
    assert not any(alive(pid) for pid in supervisors), "no supervisor left behind"
    from qemuspec.runtime import paths

    for path in made:
        root = os.path.join(os.path.dirname(path), ".qemuspec")
        for name in os.listdir(root) if os.path.isdir(root) else []:
            assert not os.path.exists(paths.layout(os.path.join(root, name)).run_dir), (
                f"{name}: sockets left"
            )
            leftovers = {"state.json", "qemu.pid", "supervisor.json", "stop.json", ".lock"} & set(
                os.listdir(os.path.join(root, name))
            )
            assert not leftovers, f"{name}: {leftovers}"
    assert (
        not [f for f in os.listdir(os.path.dirname(made[0])) if f.endswith(".lock")]
        if made
        else True
    )


def test_up_is_idempotent_and_restarts_only_what_changed(lab):
    path = lab({"a": {}, "b": {}})
    first = {o["name"]: o for o in json.loads(cli("up", path, "--json").stdout)}
    assert {o["action"] for o in first.values()} == {"started"}
    second = {o["name"]: o for o in json.loads(cli("up", path, "--json").stdout)}
    assert {o["action"] for o in second.values()} == {"up to date"}
    assert {n: o["pid"] for n, o in second.items()} == {n: o["pid"] for n, o in first.items()}
    ours = {first["a"]["pid"], first["b"]["pid"]}
    assert ours <= qemu_pids(os.path.dirname(path))

    text = open(path).read()
    start = text.index("[machines.b]")
    with open(path, "w") as f:
        f.write(text[:start] + text[start:].replace('memory = "256M"', 'memory = "320M"', 1))
    pending = cli("plan", path, "--json", check=False)
    assert pending.returncode == 3  # changes pending: the documented code CI gates on
    plan = {p["name"]: p for p in json.loads(pending.stdout)}
    assert plan["a"]["action"] == "up to date" and plan["b"]["action"] == "restart"
    assert (
        "-m" not in plan["b"]["diff"]
        and "-256M" in plan["b"]["diff"]
        and "+320M" in plan["b"]["diff"]
    )
    human = cli("plan", path, check=False).stdout
    assert "b: restart" in human and "a: up to date" in human
    third = {o["name"]: o for o in json.loads(cli("up", path, "--json").stdout)}
    assert third["a"]["action"] == "up to date" and third["a"]["pid"] == first["a"]["pid"]
    assert third["b"]["action"] == "restarted" and third["b"]["pid"] != first["b"]["pid"]
    assert not alive(first["b"]["pid"])


def test_on_failure_restarts_a_killed_qemu(lab):
    path = lab({"web": {"restart": "on-failure"}})
    [started] = json.loads(cli("up", path, "--json").stdout)
    os.kill(started["pid"], signal.SIGKILL)
    ready = wait_event(
        path, "web", lambda e: e["event"] == "QEMUSPEC_READY" and e["data"]["restarts"] == 1
    )
    row = status(path)["web"]
    assert row["state"] == "running" and row["restarts"] == 1
    assert row["pid"] == ready["data"]["pid"] != started["pid"]


def test_guest_power_off_is_final_under_on_failure(lab):
    path = lab({"web": {"restart": "on-failure", "cmdline": "qemuspec.exit=1"}})
    cli("up", path)
    wait_event(path, "web", lambda e: e["event"] == "QEMUSPEC_EXITED")
    row = status(path)["web"]
    while row["supervisor"] is not None:  # the supervisor writes its record, then exits
        wait_event(path, "web", lambda e: e["event"] == "QEMUSPEC_EXITED", timeout=5)
        row = status(path)["web"]
    assert row["state"] == "stopped" and row["restarts"] == 0
    assert not any(e["event"] == "QEMUSPEC_RESTART" for e in events(path, "web"))


def test_guest_power_off_restarts_under_always(lab):
    path = lab({"web": {"restart": "always", "cmdline": "qemuspec.exit=1"}})
    cli("up", path)
    restart = wait_event(path, "web", lambda e: e["event"] == "QEMUSPEC_RESTART")
    assert restart["data"]["reason"] == "clean"
    wait_event(path, "web", lambda e: e["event"] == "QEMUSPEC_READY" and e["data"]["restarts"] == 1)


def test_on_failure_restarts_a_panicked_guest(lab):
    path = lab(
        {"web": {"restart": "on-failure", "cmdline": "qemuspec.panic=1"}}
    )  # no device: qemuspec adds pvpanic
    cli("up", path)
    wait_event(path, "web", lambda e: e["event"] == "GUEST_PANICKED")
    restart = wait_event(path, "web", lambda e: e["event"] == "QEMUSPEC_RESTART")
    assert restart["data"]["reason"] == "failure"
    wait_event(path, "web", lambda e: e["event"] == "QEMUSPEC_READY" and e["data"]["restarts"] == 1)


def test_killed_supervisor_leaves_the_vm_running_and_up_adopts_it(lab):
    path = lab({"web": {"restart": "on-failure"}})
    [started] = json.loads(cli("up", path, "--json").stdout)
    row = status(path)["web"]
    os.kill(row["supervisor"], signal.SIGKILL)
    while alive(row["supervisor"]):
        time.sleep(0.01)
    state_dir = os.path.join(os.path.dirname(path), ".qemuspec", "web")
    # ls adopts nothing (status would)
    [row] = [r for r in json.loads(cli("ls", "--json").stdout) if r["state_dir"] == state_dir]
    assert row["state"] == "unsupervised" and row["pid"] == started["pid"] and alive(started["pid"])
    [adopted] = json.loads(cli("up", path, "--json").stdout)
    assert adopted["action"] == "adopted" and adopted["pid"] == started["pid"]
    row = status(path)["web"]
    assert row["state"] == "running" and row["supervisor"] is not None
    assert len([p for p in qemu_pids(os.path.dirname(path)) if p == started["pid"]]) == 1
    # the new supervisor really supervises: a crash is restarted
    os.kill(started["pid"], signal.SIGKILL)
    wait_event(
        path, "web", lambda e: e["event"] == "QEMUSPEC_READY" and e["data"].get("restarts") == 1
    )


def test_stale_state_never_touches_an_unrelated_process(lab):
    path = lab({"web": {}})
    state = os.path.join(os.path.dirname(path), ".qemuspec", "web")
    os.makedirs(state)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with open(os.path.join(state, "state.json"), "w") as f:
            json.dump({"pid": sleeper.pid, "qmp": "unix:/nonexistent", "hash": "x"}, f)
        with open(os.path.join(state, "supervisor.json"), "w") as f:
            json.dump({"pid": sleeper.pid, "started": "0"}, f)
        assert status(path)["web"]["state"] == "stopped"
        cli("down", path)
        [started] = json.loads(cli("up", path, "--json").stdout)
        assert started["action"] == "started"
        assert sleeper.poll() is None, "the unrelated process is untouched"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_concurrent_ups_start_one_qemu(lab):
    path = lab({"web": {}})
    before = qemu_pids(os.path.dirname(path))
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda _: json.loads(cli("up", path, "--json").stdout)[0], range(2))
        )
    assert sorted(r["action"] for r in results) == ["started", "up to date"]
    assert results[0]["pid"] == results[1]["pid"]
    assert len(qemu_pids(os.path.dirname(path)) - before) == 1


def test_dependency_order_up_and_reverse_down(lab):
    path = lab({"db": {}, "app": {"depends": '["db"]'}, "web": {"depends": '["app"]'}})
    outcomes = json.loads(cli("up", path, "--json").stdout)
    assert [o["name"] for o in outcomes] == ["db", "app", "web"]
    launched = {
        m: stamp(wait_event(path, m, lambda e: e["event"] == "QEMUSPEC_LAUNCHED"))
        for m in ("db", "app", "web")
    }
    ready = {
        m: stamp(wait_event(path, m, lambda e: e["event"] == "QEMUSPEC_READY"))
        for m in ("db", "app", "web")
    }
    assert ready["db"] <= launched["app"] and ready["app"] <= launched["web"], (
        "each starts after its dependency is ready"
    )
    assert ready["db"] < ready["app"] < ready["web"]
    down = cli("down", path)
    assert [line.split(":")[0] for line in down.stdout.splitlines()] == ["web", "app", "db"]
    stopped = {
        m: stamp(wait_event(path, m, lambda e: e["event"] == "SHUTDOWN"))
        for m in ("db", "app", "web")
    }
    assert stopped["web"] < stopped["app"] < stopped["db"]
    for m in ("db", "app", "web"):
        assert not os.path.exists(os.path.join(os.path.dirname(path), ".qemuspec", m, "state.json"))


def test_up_failure_exits_1_with_console_lines(lab, tmp_path):
    path = lab({"web": {}})
    text = open(path).read().replace('timeout = "90s"', 'timeout = "12s"\ntcp = 81')
    text += (
        "[[machines.web.nics]]\nforwards = [{ host = 0, guest = 81 }]\n"  # nothing listens on 81
    )
    with open(path, "w") as f:
        f.write(text)
    result = cli("up", path, check=False)
    assert result.returncode == 1
    assert "was not ready within 12 s" in result.stderr and "last console lines" in result.stderr
    row = status(path)["web"]
    assert row["state"] == "failed", "a machine that never started did not crash"
    assert "never became ready (probe tcp guest port 81, after" in row["reason"]
