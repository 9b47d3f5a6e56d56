"""The JSON Schema agrees with the CLI, judged by an editor's validator (the `jsonschema` package).

Editors (taplo, yaml-language-server) read the file as written, before templates are rendered, so the
schema must accept template strings and the shorthands the models accept, and refuse what the CLI
refuses. Cross-field rules (cmdline needs kernel, ids unique, ...) are the CLI's alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import jsonschema
import pytest
import yaml

from qemuspec.spec.schema import schema

from helpers import shipped_definitions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATOR = jsonschema.Draft202012Validator(schema())


def read(path: str) -> object:
    with open(path, "rb") as f:
        return tomllib.load(f) if path.endswith(".toml") else yaml.safe_load(f)


def schema_errors(data: object) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(data)]


def cli_verdicts(paths: list[str]) -> list[bool]:
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", "validate", "--json", *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr
    return [r["valid"] for r in json.loads(result.stdout)]


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(schema())


def test_every_shipped_definition_is_valid_for_an_editor():
    files = shipped_definitions()
    assert len(files) >= 3
    for path in files:
        assert schema_errors(read(path)) == [], path


def test_init_output_is_valid_for_an_editor(tmp_path):
    target = tmp_path / "qemuspec.toml"
    result = subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", "init", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert schema_errors(read(str(target))) == []


def test_readme_example_is_valid_for_an_editor():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    assert "[machines." in block
    assert schema_errors(tomllib.loads(block)) == []


GOOD = {
    "templates-everywhere": '[vars]\nm = "256M"\nn = 2\n[machines.a]\nmemory = "{{ m }}"\ncpus = "{{ n }}"\naccel = "{{ \'tcg\' }}"\n',
    "shorthands": '[machines.a]\ndisplay = "none"\nfirmware = "bios"\ncdrom = "x.iso"\n',
    "names": "[machines.web-1_a]\n[machines.B2]\n",
    "options": '[machines.a]\nmachine_options = { "kernel-irqchip" = "split", smm = false, "x-y" = 3 }\n',
}
BAD = {
    "unknown-top-key": '[machine.web]\nmemory = "1G"\n',
    "name-with-space": '[machines."my vm"]\n',
    "name-with-dash-first": '[machines."-x"]\n',
    "name-too-long": f"[machines.{'a' * 64}]\n",
    "memory-words": '[machines.a]\nmemory = "lots"\n',
    "memory-zero": "[machines.a]\nmemory = 0\n",
    "cpus-zero": "[machines.a]\ncpus = 0\n",
    "cpus-words": '[machines.a]\ncpus = "two"\n',
    "accel-unknown": '[machines.a]\naccel = "turbo"\n',
    "unknown-machine-key": '[machines.a]\nmemroy = "1G"\n',
    "disk-interface": '[machines.a]\ndisks = [{ file = "d.img", interface = "usb" }]\n',
    "nic-type": '[machines.a]\nnics = [{ type = "wifi" }]\n',
    "forward-port-range": "[machines.a]\nnics = [{ forwards = [{ host = 70000, guest = 22 }] }]\n",
    "display-unknown": '[machines.a]\ndisplay = "hologram"\n',
    "firmware-unknown": '[machines.a]\nfirmware = "coreboot"\n',
    "serial-unknown": '[machines.a]\nserial = "telnet"\n',
    "restart-unknown": '[machines.a]\nrestart = "sometimes"\n',
    "timeout-words": '[machines.a.ready]\ntimeout = "soon"\n',
    "qmp-transport": '[machines.a.qmp]\ntransport = "udp"\n',
    "no-machines": "[vars]\na = 1\n",
    "empty-machines": "machines = {}\n",
    "boot-order": '[machines.a]\nboot_order = "xyz"\n',
    "mac-format": '[machines.a]\nnics = [{ mac = "52:54:00:zz:00:01" }]\n',
    "nics-not-a-list": '[machines.a]\nnics = "user"\n',
    "stop-timeout-negative": "[machines.a]\nstop_timeout = -1\n",
    "option-key": '[machines.a]\nmachine_options = { "bad key" = 1 }\n',
}


def test_bad_files_are_refused_by_both_the_schema_and_the_cli(tmp_path):
    assert len(BAD) >= 15
    paths = []
    for name, text in BAD.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        paths.append(str(path))
        assert schema_errors(tomllib.loads(text)), (
            f"{name}: the schema accepts what the CLI refuses"
        )
    assert cli_verdicts(paths) == [False] * len(BAD)


def test_good_files_are_accepted_by_both(tmp_path):
    paths = []
    for name, text in GOOD.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        paths.append(str(path))
        (tmp_path / "x.iso").write_bytes(b"")
        assert schema_errors(tomllib.loads(text)) == [], name
    assert cli_verdicts(paths) == [True] * len(GOOD)


@pytest.mark.parametrize("name", ["example.toml", "dev.toml", "example.yaml"])
def test_shipped_files_keep_their_editor_schema_comment(name):
    first = open(os.path.join(ROOT, "machines", name)).readline()
    assert "../schemas/qemuspec.schema.json" in first
