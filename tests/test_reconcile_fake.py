"""reconcile's decisions against a fake backend (as httpx tests with MockTransport): levels, a failed
dependency, ownership, the definition record, --timeout and --warm are decided above every backend, so
they are tested here without qemu. The fake records what it was asked, in order."""

from __future__ import annotations

import json
import os
import threading
from typing import Callable

import pytest

from qemuspec import reconcile
from qemuspec.backends.base import Outcome, Seen
from qemuspec.errors import QemuspecError, UsageError
from qemuspec.spec import loads
from qemuspec.spec.records import definition_hash


class FakeBackend:
    """A backend that runs nothing: ``machines`` is what "runs" (name -> Seen); ``fail`` names
    machines whose start fails; ``calls`` records (verb, name) in the order they happened."""

    kind = "fake"
    uri = "fake:///"
    where = "fake"

    def __init__(self, fail: set[str] | None = None, refuse_warm: bool = False):
        self.machines: dict[str, Seen] = {}
        self.fail = fail or set()
        self.refuse_warm = refuse_warm
        self.calls: list[tuple[str, str]] = []
        self.timeouts: dict[str, float] = {}
        self.changed: dict[str, list[str]] = {}
        self.refuse_live: set[str] = set()
        self._lock = threading.Lock()

    def _call(self, verb: str, name: str) -> None:
        with self._lock:
            self.calls.append((verb, name))

    def look(self, name, machine):
        return self.machines.get(name, Seen())

    def start(self, name, machine, action, report) -> Callable[[], Outcome]:
        self._call("start", name)
        self.timeouts[name] = machine.ready.timeout

        def wait() -> Outcome:
            if name in self.fail:
                return Outcome(name, "failed", detail=f"{name} did not boot")
            self.machines[name] = Seen(
                running=True, hash=definition_hash(machine), owner=OWNER, claimed=True
            )
            return Outcome(name, action)

        return wait

    def join(self, name, machine, began):
        return None

    def change(self, name, old, new, fields) -> Outcome:
        self._call("change", name)
        self.changed[name] = list(fields)
        if name in self.refuse_live:
            raise QemuspecError(f"{name}: qemu said no")
        self.machines[name] = Seen(
            running=True, hash=definition_hash(new), owner=OWNER, claimed=True
        )
        return Outcome(name, "changed", detail="; ".join(fields))

    def stop(self, name, machine, timeout):
        self._call("stop", name)
        self.machines.pop(name, None)
        return "ACPI powerdown"

    def clean(self, name):
        self._call("clean", name)

    def plan_step(self, name, machine, seen, action):
        return {"diff": ["-old", "+new"] if action == "recreate" else []}

    def status(self, name, machine):
        return {"name": name}

    def preflight(
        self,
        spec,
        source,
        names,
        allow_local_qemu,
        allow_host_paths,
        environ,
        ports=False,
        probe=False,
    ):
        self._call("preflight", ",".join(names))
        return []

    def refusal(self, name, machine, command):
        return f"{name}: no warm start here" if self.refuse_warm and machine.warm else None

    def purge(self, name):
        return []

    def settle(self, spec, names):
        self._call("settle", ",".join(names))

    def readopt(self, spec, names):
        return []


OWNER = "/src/machines/a.toml"
FILE = """
[machines.db]
memory = "64M"
[machines.cache]
memory = "64M"
[machines.web]
memory = "64M"
depends_on = ["db", "cache"]
[machines.lb]
memory = "64M"
depends_on = ["web"]
"""


@pytest.fixture
def spec():
    return loads(FILE, "toml")


def every(spec, backend):
    return {name: backend for name in spec.machines}


def test_up_goes_by_levels_and_down_in_reverse(spec, tmp_path):
    fake = FakeBackend()
    outcomes = reconcile.up(spec, str(tmp_path), ["lb"], every(spec, fake), owner=OWNER)
    assert [o.action for o in outcomes] == ["started"] * 4
    starts = [n for verb, n in fake.calls if verb == "start"]
    assert set(starts[:2]) == {"db", "cache"} and starts[2:] == ["web", "lb"], starts
    fake.calls.clear()
    reconcile.down(spec, str(tmp_path), list(spec.machines), every(spec, fake), owner=OWNER)
    stops = [n for verb, n in fake.calls if verb == "stop"]
    assert stops[:2] == ["lb", "web"] and set(stops[2:]) == {"db", "cache"}, stops
    assert fake.calls[-1][0] == "settle", "what machines share is settled once, after every stop"


def test_a_failed_dependency_stops_its_dependants(spec, tmp_path):
    fake = FakeBackend(fail={"cache"})
    outcomes = {
        o.name: o.action
        for o in reconcile.up(spec, str(tmp_path), ["lb"], every(spec, fake), owner=OWNER)
    }
    assert outcomes == {"db": "started", "cache": "failed"}, outcomes
    assert ("start", "web") not in fake.calls and ("start", "lb") not in fake.calls


def test_another_files_machine_is_refused_by_every_verb(spec, tmp_path):
    fake = FakeBackend()
    other = "/src/machines/b.toml"
    fake.machines["db"] = Seen(running=True, hash="x", owner=other, claimed=True)
    up = {
        o.name: o for o in reconcile.up(spec, str(tmp_path), ["db"], every(spec, fake), owner=OWNER)
    }
    assert up["db"].action == "failed" and f"is run by {other}" in up["db"].detail
    down = {
        o.name: o
        for o in reconcile.down(spec, str(tmp_path), ["db"], every(spec, fake), owner=OWNER)
    }
    assert down["db"].action == "belongs to another file"
    plan = reconcile.plan(spec, every(spec, fake), ["db"], owner=OWNER)
    assert plan[0]["action"] == "belongs to another file"
    assert not [c for c in fake.calls if c[0] in ("start", "stop")], (
        "nothing of the other file's machine was touched"
    )


def test_a_backends_own_refusal_counts_as_foreign(spec, tmp_path):
    fake = FakeBackend()
    fake.machines["db"] = Seen(
        claimed=True, refusal="a domain named db exists and qemuspec did not define it"
    )
    up = reconcile.up(spec, str(tmp_path), ["db"], every(spec, fake), owner=OWNER)
    assert up[0].action == "failed" and "did not define it" in up[0].detail
    assert ("start", "db") not in fake.calls


def test_decisions_from_what_the_backend_sees(spec, tmp_path):
    fake = FakeBackend()
    db = spec.machines["db"]
    fake.machines["db"] = Seen(running=True, hash=definition_hash(db), owner=OWNER, claimed=True)
    fake.machines["cache"] = Seen(running=True, hash="changed", owner=OWNER, claimed=True)
    steps = {
        s["name"]: s for s in reconcile.plan(spec, every(spec, fake), ["db", "cache"], owner=OWNER)
    }
    # changed, and no definition recorded to say which fields: a restart (disks kept)
    assert steps["db"]["action"] == "up to date" and steps["cache"]["action"] == "restart"
    assert steps["cache"]["class"] == "restart" and steps["cache"]["changes"] == []
    assert steps["cache"]["diff"] == ["-old", "+new"], "the backend's diff reaches the plan"
    outcomes = {
        o.name: o.action
        for o in reconcile.up(spec, str(tmp_path), ["db", "cache"], every(spec, fake), owner=OWNER)
    }
    assert outcomes == {"db": "up to date", "cache": "restarted"}
    assert fake.calls.index(("stop", "cache")) < fake.calls.index(("start", "cache")), (
        "a restart stops first"
    )
    assert ("start", "db") not in fake.calls


def test_the_definition_record_is_written_for_every_backend(spec, tmp_path):
    one, two = FakeBackend(), FakeBackend()
    backends = {"db": one, "cache": two, "web": one, "lb": two}
    declared = reconcile.overridden(spec, ["db", "cache"], timeout=7, warm=True)
    reconcile.up(spec, str(tmp_path), ["db", "cache"], backends, owner=OWNER, record=declared)
    for name in ("db", "cache"):
        recorded = json.loads((tmp_path / name / "definition.json").read_text())
        assert recorded["warm"] is True, "--warm is part of what was started"
        assert recorded["ready"]["timeout"] != 7, "--timeout is this run's, not the definition's"
    assert not (tmp_path / "web").exists()


def test_timeout_and_warm_reach_every_backend(spec, tmp_path):
    fake = FakeBackend()
    reconcile.overridden(spec, ["web", "db", "cache"], timeout=9, warm=True)
    reconcile.up(spec, str(tmp_path), ["web"], every(spec, fake), owner=OWNER)
    assert fake.timeouts == {"db": 9, "cache": 9, "web": 9}
    assert spec.machines["lb"].ready.timeout != 9 and not spec.machines["lb"].warm, (
        "only the machines of this run"
    )
    with pytest.raises(UsageError, match="--timeout"):
        reconcile.overridden(spec, ["db"], timeout=0)


def test_preflight_asks_each_backend_once_and_refusals_stop_it(spec, tmp_path):
    one, two = FakeBackend(), FakeBackend(refuse_warm=True)
    backends = {"db": one, "cache": two, "web": one, "lb": two}
    assert reconcile.preflight(spec, "/src/a.toml", ["db", "cache", "web"], backends) == []
    assert one.calls == [("preflight", "db,web")] and two.calls == [("preflight", "cache")]
    reconcile.overridden(spec, ["cache"], warm=True)
    with pytest.raises(UsageError, match="no warm start here"):
        reconcile.preflight(spec, "/src/a.toml", ["cache"], backends)


def test_up_holds_the_state_lock(spec, tmp_path):
    """While `up` runs, another command's lock on the state root waits (flock on the directory)."""
    import fcntl

    held = []

    class Probe(FakeBackend):
        def start(self, name, machine, action, report):
            fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(fd)
            return super().start(name, machine, action, report)

    reconcile.up(spec, str(tmp_path), ["db"], every(spec, Probe()), owner=OWNER)
    assert held == [True]


def _running(spec, tmp_path, fake, names):
    """Start ``names`` through reconcile, so their definitions are recorded in a claimed directory."""
    outcomes = reconcile.up(spec, str(tmp_path), names, every(spec, fake), owner=OWNER)
    assert {o.action for o in outcomes} == {"started"}
    fake.calls.clear()


def _changed(spec, name, **update):
    spec.machines[name] = spec.machines[name].model_copy(update=update)


def test_plan_gives_the_machine_and_each_field_a_class(spec, tmp_path):
    fake = FakeBackend()
    _running(spec, tmp_path, fake, ["db", "cache"])
    _changed(spec, "db", stop_timeout=5.0, restart="always")  # supervisor only: live
    _changed(spec, "cache", stop_timeout=5.0, cpus=2)  # one live, one restart: restart
    steps = {
        s["name"]: s
        for s in reconcile.plan(spec, every(spec, fake), ["db", "cache"], OWNER, str(tmp_path))
    }
    assert steps["db"]["action"] == steps["db"]["class"] == "live"
    assert {c["field"]: c["class"] for c in steps["db"]["changes"]} == {
        "stop_timeout": "live",
        "restart": "live",
    }
    assert all(c["by"] == "supervisor" for c in steps["db"]["changes"])
    assert steps["cache"]["class"] == "restart"
    assert {c["field"]: c["class"] for c in steps["cache"]["changes"]} == {
        "stop_timeout": "live",
        "cpus": "restart",
    }
    assert not [c for c in fake.calls if c[0] in ("start", "stop", "change")], (
        "plan changes nothing"
    )


def test_up_changes_live_fields_in_place_and_records_them(spec, tmp_path):
    fake = FakeBackend()
    _running(spec, tmp_path, fake, ["db"])
    _changed(spec, "db", stop_timeout=5.0)
    outcomes = reconcile.up(spec, str(tmp_path), ["db"], every(spec, fake), owner=OWNER)
    assert [(o.name, o.action) for o in outcomes] == [("db", "changed")]
    assert fake.calls == [("change", "db")], "no stop, no start: changed in place"
    assert fake.changed["db"] == ["stop_timeout"]
    recorded = json.loads((tmp_path / "db" / "definition.json").read_text())
    assert recorded["stop_timeout"] == 5.0
    again = reconcile.plan(spec, every(spec, fake), ["db"], OWNER, str(tmp_path))
    assert again[0]["action"] == "up to date", "the next plan is empty"


def test_a_failed_live_change_restarts_with_the_reason(spec, tmp_path):
    fake = FakeBackend()
    _running(spec, tmp_path, fake, ["db"])
    fake.refuse_live.add("db")
    _changed(spec, "db", stop_timeout=5.0)
    outcomes = reconcile.up(spec, str(tmp_path), ["db"], every(spec, fake), owner=OWNER)
    assert [o.action for o in outcomes] == ["restarted"]
    assert any("qemu said no" in w for w in outcomes[0].warnings), outcomes[0].warnings
    assert fake.calls == [("change", "db"), ("stop", "db"), ("start", "db")]
    recorded = json.loads((tmp_path / "db" / "definition.json").read_text())
    assert recorded["stop_timeout"] == 5.0, "the restart records the new definition"


def test_no_restart_refuses_and_changes_nothing(spec, tmp_path):
    fake = FakeBackend()
    _running(spec, tmp_path, fake, ["db", "cache"])
    before = (tmp_path / "cache" / "definition.json").read_bytes()
    _changed(spec, "db", stop_timeout=5.0)  # live: would be applied without --no-restart
    _changed(spec, "cache", memory=128)  # restart (no balloon)
    outcomes = reconcile.up(
        spec, str(tmp_path), ["db", "cache"], every(spec, fake), owner=OWNER, no_restart=True
    )
    assert [(o.name, o.action) for o in outcomes] == [("cache", "needs restart")]
    assert "memory" in outcomes[0].detail and "restart" in outcomes[0].detail
    assert fake.calls == [], "not even the live change of db: nothing changed"
    assert (tmp_path / "cache" / "definition.json").read_bytes() == before
    _changed(spec, "cache", memory=64)
    live = reconcile.up(
        spec, str(tmp_path), ["db", "cache"], every(spec, fake), owner=OWNER, no_restart=True
    )
    assert {o.name: o.action for o in live} == {"db": "changed", "cache": "up to date"}


def test_the_library_applies_as_up_does(spec, tmp_path):
    from qemuspec import api

    fake = FakeBackend()
    _running(spec, tmp_path, fake, ["db"])
    _changed(spec, "db", restart="on-failure")
    [step] = api.plan(spec, str(tmp_path), ["db"], owner=OWNER, backends=every(spec, fake))
    assert step["class"] == "live" and step["changes"][0]["field"] == "restart"
    [outcome] = api.apply(spec, str(tmp_path), ["db"], owner=OWNER, backends=every(spec, fake))
    assert outcome.action == "changed" and fake.calls == [("change", "db")]
    _changed(spec, "db", cpus=2)
    [refused] = api.apply(
        spec, str(tmp_path), ["db"], owner=OWNER, backends=every(spec, fake), no_restart=True
    )
    assert refused.action == "needs restart" and "cpus" in refused.detail


def test_no_restart_leaves_a_refused_live_change_undone_and_running(spec, tmp_path):
    fake = FakeBackend()
    _running(spec, tmp_path, fake, ["db"])
    before = (tmp_path / "db" / "definition.json").read_bytes()
    fake.refuse_live.add("db")
    _changed(spec, "db", stop_timeout=5.0)
    [outcome] = reconcile.up(
        spec, str(tmp_path), ["db"], every(spec, fake), owner=OWNER, no_restart=True
    )
    assert outcome.action == "needs restart" and "qemu said no" in outcome.detail
    assert fake.calls == [("change", "db")], "no stop, no start"
    assert (tmp_path / "db" / "definition.json").read_bytes() == before, "the old record is back"
