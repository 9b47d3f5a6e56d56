"""The validated-definition cache (spec/cache.py, spec/records.py): a cached read must be the same
definition as a fresh one, to qemu (the rendered argv), to `plan` (definition hash, dumps) and to the
model itself; and anything that changes what loading would give must miss."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import warnings

import pytest
import tomli_w

from qemuspec.render import render
from qemuspec.runtime import paths
from qemuspec.spec import cache, records
from qemuspec.spec.importer import import_argv
from qemuspec.spec.loader import load_located

from helpers import shipped_definitions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "data", "import_corpus.txt")


def _definitions(tmp_path) -> list[str]:
    """Every shipped definition, and one file per line of the import corpus (rich in devices and options)."""
    out = shipped_definitions()
    placeholder = re.compile(r"\{(\w+)\}")
    for index, raw in enumerate(open(CORPUS, encoding="utf-8").read().splitlines()):
        if not raw.strip() or raw.startswith("#"):
            continue
        argv = shlex.split(placeholder.sub(lambda m: f"/images/{m.group(1)}.img", raw))
        try:
            name, table, _ = import_argv(argv, base_dir=str(tmp_path))
        except Exception:  # lines that need real files to import are covered by test_import
            continue
        path = tmp_path / f"corpus{index}.toml"
        path.write_text(tomli_w.dumps({"machines": {name: table}}))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_located(str(path))
        except Exception:
            path.unlink()
            continue
        out.append(str(path))
    return out


def _cached(path: str, where: str, variables=None, environ=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cache.load(path, variables or {}, environ or {}, where)


def test_a_cached_definition_is_the_same_definition(tmp_path):
    where = str(tmp_path / "cache")
    files = _definitions(tmp_path)
    assert len(files) >= 40, f"only {len(files)} definitions to compare"
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh, fresh_lines = load_located(path)
        first, _ = _cached(path, where)  # miss: the loader's own models, written to the cache
        assert not isinstance(first, records.Record)
        again, lines = _cached(path, where)  # hit: records, no validation
        assert isinstance(again, records.Record), path
        assert lines == fresh_lines
        assert again.model_dump(mode="json") == fresh.model_dump(mode="json")
        assert again.materialize() == fresh, path
        for name, machine in fresh.machines.items():
            record = again.machines[name]
            assert isinstance(record, records.Record)
            lay = paths.with_accel(paths.layout(str(tmp_path / "state" / name)), ("tcg",))
            assert render(record, name, lay) == render(machine, name, lay), f"{path}: {name}"
            assert records.definition_hash(record) == records.definition_hash(machine)
            assert record.model_dump(mode="json") == machine.model_dump(mode="json")
            assert copy.deepcopy(record) == record and record.model_copy(deep=True) == record
            assert pickle.loads(pickle.dumps(record)) == record
            changed = record.model_copy(update={"warm": True})
            assert changed.warm and not record.warm
            assert records.definition_hash(changed) == records.definition_hash(
                machine.model_copy(update={"warm": True})
            )


def test_what_loading_reads_changes_the_key(tmp_path):
    where = str(tmp_path / "cache")
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "{{ mem }}"\n[vars]\nmem = "256M"\n')
    _cached(str(path), where)
    assert _cached(str(path), where)[0].machines["m"].memory == 256
    assert _cached(str(path), where, variables={"mem": "512M"})[0].machines["m"].memory == 512
    assert (
        _cached(str(path), where, environ={"QEMUSPEC_VAR_mem": "1G"})[0].machines["m"].memory
        == 1024
    )
    path.write_text('[machines.m]\nmemory = "384M"\n')
    assert _cached(str(path), where)[0].machines["m"].memory == 384
    moved = tmp_path / "other"
    moved.mkdir()
    (moved / "m.toml").write_text('[machines.m]\nkernel = "vmlinuz"\n')
    (tmp_path / "m.toml").write_text('[machines.m]\nkernel = "vmlinuz"\n')
    _cached(str(tmp_path / "m.toml"), where)
    assert _cached(str(moved / "m.toml"), where)[0].machines["m"].kernel == str(
        moved / "vmlinuz"
    )  # paths resolve per file


def test_a_damaged_or_foreign_entry_is_a_miss(tmp_path):
    where = tmp_path / "cache"
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "256M"\n')
    _cached(str(path), str(where))
    (entry,) = list(where.iterdir())
    data = json.loads(entry.read_text())
    data["file"]["v"]["machines"]["d"]["m"]["m"] = "os.system"  # not a model kind
    entry.write_text(json.dumps(data))
    assert not isinstance(
        _cached(str(path), str(where))[0], records.Record
    )  # read afresh (and rewritten)
    entry.write_text("{torn")
    assert not isinstance(_cached(str(path), str(where))[0], records.Record)
    assert isinstance(_cached(str(path), str(where))[0], records.Record)
    os.chmod(where, 0o777)  # a directory others can write is not trusted
    assert not isinstance(_cached(str(path), str(where))[0], records.Record)


def test_an_invalid_definition_is_never_cached(tmp_path):
    where = tmp_path / "cache"
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "lots"\n')
    for _ in range(2):
        with pytest.raises(Exception, match="memory"):
            _cached(str(path), str(where))
    assert not where.exists() or not list(where.iterdir())


def test_a_cached_read_says_the_same_warnings(tmp_path):
    where = str(tmp_path / "cache")
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "256M"\nappend = ["-m", "1G"]\noverrides = ["-m"]\n')
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache.load(str(path), {}, {}, where)
        assert any("append overrides -m" in str(w.message) for w in caught)


def test_status_and_down_of_a_cached_definition_do_not_import_pydantic(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "128M"\n')
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    probe = (
        "import runpy, sys; sys.argv = ['qemuspec'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('qemuspec.cli.main', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('PYDANTIC' if 'pydantic' in sys.modules else 'CLEAN', file=sys.stderr)"
    )
    seen = []
    for command in ("status", "status", "down", "plan"):
        result = subprocess.run(
            [sys.executable, "-c", probe, command, str(path), "--state-dir", str(tmp_path / "st")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        seen.append(result.stderr.strip().splitlines()[-1])
    assert seen[0] == "PYDANTIC"  # the first read validates and fills the cache
    assert seen[1:] == ["CLEAN", "CLEAN", "CLEAN"], seen
