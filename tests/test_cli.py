"""The spec-side CLI: validate, render, schema, init; exit codes; lean start-up."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from qemuspec.spec.schema import schema_text

from helpers import shipped_definitions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "machines", "example.toml")


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def test_schema_file_is_in_sync_with_the_models():
    with open(os.path.join(ROOT, "schemas", "qemuspec.schema.json")) as f:
        assert f.read() == schema_text(), "run: qemuspec schema -o schemas/qemuspec.schema.json"


def test_schema_command_prints_it():
    result = cli("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout)["properties"]["machines"]


def test_example_files_carry_editor_schema_hints():
    for name in shipped_definitions():
        first = open(name).readline()
        if name.endswith(".toml"):
            assert first.startswith("#:schema ../schemas/qemuspec.schema.json"), name
        elif name.endswith((".yaml", ".yml")):
            assert first.startswith(
                "# yaml-language-server: $schema=../schemas/qemuspec.schema.json"
            ), name


def test_validate_ok_and_bad(
    tmp_path, guest
):  # the examples boot the test guest: validate checks it exists
    ok = cli("validate", EXAMPLE, os.path.join(ROOT, "machines", "example.yaml"))
    assert ok.returncode == 0 and "valid (1 machine: web)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[machines.web]\nmemroy = "1G"\n')
    result = cli("validate", str(bad))
    assert result.returncode == 2
    assert (
        f'error: {bad}:2: machines.web.memroy: unknown key "memroy": did you mean "memory"?'
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    as_json = json.loads(cli("validate", "--json", str(bad), EXAMPLE).stdout)
    assert [r["valid"] for r in as_json] == [False, True]


def test_render_json_and_shell_agree():
    as_json = json.loads(cli("render", EXAMPLE, "--json").stdout)
    assert as_json[0] == "qemu-system-x86_64" and "-S" not in as_json
    shell = cli("render", EXAMPLE, "--shell").stdout.strip()
    assert shlex.split(shell) == as_json


def test_render_uses_vars_from_the_command_line():
    argv = json.loads(cli("render", EXAMPLE, "--json", "--var", "memory=1G").stdout)
    assert argv[argv.index("-m") + 1] == "1024M"


def test_render_several_machines_and_pick_one(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text("[machines.a]\n[machines.b]\ndepends_on = ['a']\n")
    both = json.loads(cli("render", str(path), "--json").stdout)
    assert set(both) == {"a", "b"}
    one = json.loads(cli("render", str(path), "--json", "--machine", "b").stdout)
    assert one[one.index("-name") + 1] == "guest=b"
    typo = cli("render", str(path), "--machine", "bb")
    assert typo.returncode == 2 and 'no machine named "bb": did you mean "b"?' in typo.stderr


def test_usage_errors_exit_2(tmp_path):
    assert cli("render", EXAMPLE, "--var", "novalue").returncode == 2
    assert cli("no-such-command").returncode == 2
    assert cli("validate", str(tmp_path / "missing.toml")).returncode == 2


def test_init_writes_a_definition_that_says_what_to_fill_in_and_never_overwrites(tmp_path):
    path = tmp_path / "new.toml"
    assert cli("init", str(path)).returncode == 0
    blank = cli(
        "validate", str(path)
    )  # its disk is created blank: nothing boots until a boot source is filled in
    assert (
        blank.returncode == 2
        and "nothing to boot" in blank.stderr
        and 'kernel = "path/to/vmlinuz"' in blank.stderr
    )
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x7fELF")
    path.write_text(path.read_text().replace('# kernel = "vmlinuz"', 'kernel = "vmlinuz"'))
    assert cli("validate", str(path)).returncode == 0, "filled in, it validates"
    path.write_text("# mine\n")
    again = cli("init", str(path))
    assert again.returncode == 2 and "--force" in again.stderr
    assert path.read_text() == "# mine\n"


@pytest.mark.parametrize(
    "args", [["--help"], ["up", "--help"], ["render", "--help"], ["validate", "--help"]]
)
def test_help_imports_nothing_heavy(args):
    code = (
        "import sys\nfrom qemuspec.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('pydantic', 'jinja2', 'yaml', 'tomllib', 'asyncio', 'qemuspec.spec') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert "usage:" in result.stdout
    assert "HEAVY []" in result.stderr
    assert "exit codes:" in result.stdout
