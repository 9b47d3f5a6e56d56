"""Loading definitions: formats, templating, normalisation, and the errors users see."""

from __future__ import annotations

import os

import pytest

from qemuspec.errors import SpecError
from qemuspec.spec import load, loads
from qemuspec.spec.models import Machine

from helpers import shipped_definitions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_TOML = os.path.join(ROOT, "machines", "example.toml")
EXAMPLE_YAML = os.path.join(ROOT, "machines", "example.yaml")


def test_example_toml_and_yaml_give_the_same_model():
    toml_model = load(EXAMPLE_TOML)
    yaml_model = load(EXAMPLE_YAML)
    assert toml_model == yaml_model
    web = toml_model.machines["web"]
    assert web.memory == 256
    assert web.cpus == 2
    assert web.disks[0].size == 1 << 30
    assert web.ready.timeout == 60.0
    assert web.kernel == os.path.join(ROOT, "guest", "out", "vmlinuz")  # relative to the file
    assert [f.host for f in web.nics[0].forwards] == [8080, 0]


def test_every_shipped_definition_validates():
    for name in shipped_definitions():
        assert load(name).machines


def test_equivalent_spellings_are_equal_models():
    a = Machine(memory="1G", stop_timeout="2m")
    b = Machine(memory=1024, stop_timeout=120)
    assert a == b


def test_variable_precedence_file_then_env_then_cli(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[vars]\nmem = "128M"\n[machines.a]\nmemory = "{{ mem }}"\n')
    assert load(path, environ={}).machines["a"].memory == 128
    assert load(path, environ={"QEMUSPEC_VAR_mem": "256M"}).machines["a"].memory == 256
    assert (
        load(path, variables={"mem": "512M"}, environ={"QEMUSPEC_VAR_mem": "256M"})
        .machines["a"]
        .memory
        == 512
    )


def test_templates_cannot_add_keys_or_tables(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text(
        "vars:\n  n: 3\nmachines:\n{% for i in range(n) %}  node{{ i }}:\n    memory: 128M\n{% endfor %}"
    )
    with pytest.raises(SpecError, match="inside quoted text values only"):
        load(path, environ={})


def test_a_whole_value_template_keeps_the_variable_type(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(
        '[vars]\nn = 3\nflag = true\n[machines.a]\ncpus = "{{ n }}"\nrng = "{{ flag }}"\nmemory = "{{ n * 64 }}M"\n'
    )
    machine = load(path, environ={}).machines["a"]
    assert (machine.cpus, machine.rng, machine.memory) == (3, True, 192)


def test_files_without_template_syntax_do_not_need_jinja(tmp_path):
    path = tmp_path / "plain.toml"
    path.write_text('[machines.a]\ncmdline = "x"\nkernel = "k"\n')
    assert load(path).machines["a"].cmdline == "x"


BAD = [
    # (id, file name, content, fragments the single error must contain)
    (
        "unknown-key",
        "a.toml",
        '[machines.web]\nmemroy = "1G"\n',
        ["a.toml:2", "machines.web.memroy", 'did you mean "memory"'],
    ),
    (
        "unknown-top-key",
        "a.toml",
        "[machine.web]\ncpus = 1\n",
        ["a.toml", 'unknown key "machine"', 'did you mean "machines"'],
    ),
    (
        "wrong-type",
        "a.toml",
        '[machines.web]\ncpus = "two"\n',
        ["a.toml:2", "machines.web.cpus", "whole number"],
    ),
    (
        "bad-unit",
        "a.toml",
        '[machines.web]\nmemory = "12X"\n',
        ["a.toml:2", "machines.web.memory", 'bad size "12X"', '"512M"'],
    ),
    (
        "bad-disk-size",
        "a.toml",
        '[machines.web]\n[[machines.web.disks]]\nfile = "d"\nformat = "qcow2"\nsize = "lots"\n',
        ["a.toml:5", "machines.web.disks[0].size", "bad size"],
    ),
    (
        "bad-duration",
        "a.toml",
        '[machines.web.ready]\ntimeout = "soon"\n',
        ["a.toml:2", "machines.web.ready.timeout", "bad duration", '"30s"'],
    ),
    (
        "missing-var",
        "a.toml",
        '[machines.web]\nmemory = "{{ mem }}"\n',
        ["a.toml:2", 'template variable "mem"', "QEMUSPEC_VAR_mem", "--var mem="],
    ),
    (
        "template-syntax",
        "a.toml",
        '[machines.web]\nmemory = "{{ mem "\n',
        ["a.toml:2", "template syntax error"],
    ),
    (
        "toml-syntax",
        "a.toml",
        "[machines.web]\nmemory = 256M\n",
        ["a.toml:2", "TOML syntax error", "quotes"],
    ),
    (
        "yaml-syntax",
        "a.yaml",
        "machines:\n  web:\n    memory: [1\n",
        ["a.yaml", "YAML syntax error"],
    ),
    (
        "dup-machine-toml",
        "a.toml",
        "[machines.web]\ncpus = 1\n[machines.web]\ncpus = 2\n",
        ["a.toml:3", 'duplicate machine name "web"'],
    ),
    (
        "dup-machine-yaml",
        "a.yaml",
        "machines:\n  web: {cpus: 1}\n  web: {cpus: 2}\n",
        ["a.yaml:3", 'duplicate machine name "web"', "line 2"],
    ),
    (
        "backing-no-format",
        "a.toml",
        '[machines.web]\n[[machines.web.disks]]\nfile = "o.qcow2"\nbacking = "base.qcow2"\n',
        ["a.toml:2", "machines.web.disks[0]", 'needs "format"', 'format = "qcow2"'],
    ),
    (
        "bad-accel",
        "a.toml",
        '[machines.web]\naccel = "kvmm"\n',
        ["a.toml:2", "machines.web.accel", 'did you mean "kvm"'],
    ),
    (
        "bad-interface",
        "a.yaml",
        "machines:\n  web:\n    disks:\n      - file: d\n        interface: virtoi\n",
        ["a.yaml:5", "machines.web.disks[0].interface", 'did you mean "virtio"'],
    ),
    ("no-machines", "a.toml", "[vars]\na = 1\n", ["a.toml", "machines", "required"]),
    ("empty-machines", "a.yaml", "machines: {}\n", ["a.yaml", "no machines are declared"]),
    (
        "bad-machine-name",
        "a.toml",
        '[machines."web server"]\ncpus = 1\n',
        ["a.toml:1", '"web server" is not a valid machine name'],
    ),
    (
        "unknown-dependency",
        "a.toml",
        '[machines.web]\ndepends_on = ["dbb"]\n[machines.db]\n',
        ["a.toml", "machines.web.depends_on", 'did you mean "db"'],
    ),
    (
        "dependency-cycle",
        "a.toml",
        '[machines.a]\ndepends_on = ["b"]\n[machines.b]\ndepends_on = ["a"]\n',
        ["a.toml", "cycle"],
    ),
    (
        "port-range",
        "a.toml",
        '[machines.web.qmp]\ntransport = "tcp"\nport = 70000\n',
        ["a.toml:3", "machines.web.qmp.port", "out of range"],
    ),
    (
        "forward-non-user",
        "a.toml",
        '[machines.web]\n[[machines.web.nics]]\ntype = "tap"\nforwards = [{ host = 1, guest = 2 }]\n',
        ["a.toml:2", "machines.web.nics[0]", '"forwards" only works with type = "user"'],
    ),
    (
        "bad-option-key",
        "a.toml",
        '[machines.web]\n[[machines.web.disks]]\nfile = "d"\noptions = { "cache,x" = "y" }\n',
        ["a.toml", "machines.web.disks[0].options", "not a valid qemu identifier"],
    ),
    (
        "initrd-without-kernel",
        "a.toml",
        '[machines.web]\ninitrd = "i"\n',
        ["a.toml:1", "machines.web", '"initrd" needs "kernel"'],
    ),
    (
        "bad-regex",
        "a.toml",
        '[machines.web.ready]\nserial = "login(:"\n',
        ["a.toml:2", "machines.web.ready.serial", "not a valid regular expression"],
    ),
    (
        "agent-probe-without-agent",
        "a.toml",
        "[machines.web.ready]\nagent = true\n",
        ["a.toml", "agent = true"],
    ),
    ("not-a-table", "a.yaml", "- just\n- a list\n", ["a.yaml", "must be a table"]),
    ("wrong-extension", "a.json", "{}", ["a.json", ".toml, .yaml or .yml"]),
    (
        "vnc-port",
        "a.toml",
        '[machines.web.display]\ntype = "vnc"\nport = 80\n',
        ["a.toml", "machines.web.display", "5900"],
    ),
    (
        "not-a-qemu",
        "a.toml",
        '[machines.web]\nqemu = "/bin/sh"\n',
        ["a.toml:2", "machines.web.qemu", "is not a qemu system emulator"],
    ),
    (
        "forward-address",
        "a.toml",
        '[machines.web]\n[[machines.web.nics]]\nforwards = [{ host = 1, guest = 2, address = "0.0.0.0,x" }]\n',
        ["a.toml", "machines.web.nics[0].forwards[0].address", "not an IPv4 address"],
    ),
]


@pytest.mark.parametrize("name,content,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_files_give_one_clear_paragraph(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SpecError) as info:
        load(path, environ={})
    problems = info.value.problems
    assert len(problems) == 1, problems
    text = problems[0]
    assert str(path) in text
    assert "\n" not in text, "one paragraph"
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_several_problems_are_all_reported_in_line_order(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[machines.web]\ncpus = "x"\nmemroy = 1\naccel = "fast"\n')
    with pytest.raises(SpecError) as info:
        load(path)
    lines = [p.split(":")[1] for p in info.value.problems]
    assert lines == ["2", "3", "4"]


def test_missing_file_suggests_init(tmp_path):
    with pytest.raises(SpecError, match="qemuspec init"):
        load(tmp_path / "nope.toml")


def test_loads_from_text_without_a_file():
    spec = loads("machines:\n  a:\n    memory: 64M\n", "yaml", base_dir="/base")
    assert spec.machines["a"].memory == 64
