"""Every field of a machine goes through every layer: the renderer, the libvirt export and the
projection libvirt's `plan` compares, both importers, plan's field diff and the definition hash, and
the library's builder. The table is tests/samples.py; a new field without an entry, or a layer that
forgot a field, fails here. (qemu itself judges the renderer and the importers elsewhere: tests/
test_import.py, tests/test_render.py; this is the guard that no layer is left out.)"""

from __future__ import annotations

import pytest

from qemuspec.api import VM, field_changes
from qemuspec.errors import SpecError
from qemuspec.libvirt import BACKEND_FIELDS, domain_xml
from qemuspec.render import render
from qemuspec.runtime.paths import Layout
from qemuspec.spec.importer import import_argv
from qemuspec.spec.libvirt_import import import_domain
from qemuspec.spec.models import Machine
from qemuspec.spec.records import definition_hash
from samples import SAMPLES, TYPED

BASE = {"kernel": "/k"}


def layout(m: Machine) -> Layout:
    """The machine's Layout as paths.machine_layout builds it on a host without KVM (so "auto" is tcg
    whatever this box has, and an explicit accelerator shows in the argv)."""
    from qemuspec.render import accelerators

    return Layout("/state/m", "/run/m", accelerators(m.accel, kvm=False))


def fields(name: str) -> dict:
    sample = SAMPLES[name]
    value = sample.value
    if value is None:
        value = "/x" if name == "initrd" else "quiet"
    return {**BASE, name: value, **sample.needs}


def machine(values: dict) -> Machine:
    return Machine.model_validate(values)


def xml_or_refusal(values: dict) -> str:
    try:
        return domain_xml(machine(values), "m")
    except SpecError as exc:
        return f"REFUSED {exc}"


def test_every_field_of_the_model_has_a_sample():
    missing = sorted(set(Machine.model_fields) - set(SAMPLES))
    assert not missing, f"give these fields an entry in tests/samples.py: {missing}"
    assert not set(SAMPLES) - set(Machine.model_fields), "samples of fields the model no longer has"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_renderer_renders_each_field(name):
    try:
        plain = machine(
            {**BASE, **SAMPLES[name].needs}
        )  # what the sample needs beside it, without it
    except ValueError:  # needs that are valid only with the sample (append's -cpu with overrides)
        plain = machine(BASE)
    base = render(plain, "m", layout(plain))
    argv = render(machine(fields(name)), "m", layout(machine(fields(name))))
    if SAMPLES[name].argv:
        assert argv != base, f"{name}: the sample changed nothing on the command line"
    else:
        assert argv == base, f"{name}: marked runtime-only, but the command line changed"


@pytest.mark.parametrize("name", [n for n in SAMPLES if n not in BACKEND_FIELDS])
def test_the_libvirt_export_and_plan_projection_carry_each_field(name):
    from qemuspec.backends.libvirt_domain import project

    base = xml_or_refusal(BASE)
    xml = xml_or_refusal(fields(name))
    assert xml != base, f"{name}: changed nothing in the domain XML and was not refused"
    if xml.startswith("REFUSED"):
        assert f"machines.m.{name}" in xml, xml
        return
    assert project(xml) != project(base), (
        f"{name}: in the domain XML, but libvirt's plan does not compare it"
    )


def _back(table: dict, name: str):
    return machine(table).model_dump(mode="json")[name]


@pytest.mark.parametrize("name", [n for n in SAMPLES if SAMPLES[n].from_argv == TYPED])
def test_the_argv_importer_gives_each_typed_field_back(name):
    wanted = machine(fields(name))
    _, table, _ = import_argv(render(wanted, "m", layout(wanted)))
    assert _back(table, name) == wanted.model_dump(mode="json")[name], table


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in SAMPLES
        if SAMPLES[n].from_libvirt == TYPED
        and n not in BACKEND_FIELDS
        and not xml_or_refusal(fields(n)).startswith("REFUSED")
    ],
)
def test_the_libvirt_importer_gives_each_typed_field_back(name):
    wanted = machine(fields(name))
    _, table, _ = import_domain(domain_xml(wanted, "m"))
    assert _back(table, name) == wanted.model_dump(mode="json")[name], table


@pytest.mark.parametrize("name", list(SAMPLES))
def test_plan_and_the_definition_hash_see_each_field(name):
    base, changed = machine(BASE), machine(fields(name))
    named = {
        path.split(".")[0].split("[")[0]
        for path, _, _ in field_changes(
            base.model_dump(mode="json"), changed.model_dump(mode="json")
        )
    }
    assert name in named, f"{name}: plan's field diff does not name it"
    assert definition_hash(changed) != definition_hash(base), (
        f"{name}: the definition hash does not see it"
    )


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_builder_sets_each_field(name):
    vm = VM("m", dict(BASE, **SAMPLES[name].needs))
    assert callable(getattr(vm, name, None)), f"VM has no builder method {name}()"
    if name in vars(VM):  # a method of its own, with its own arguments (vm.cpu("max", pmu=False))
        vm.set(**{name: fields(name)[name]})
    else:  # the setter the model's field gives
        assert getattr(vm, name)(fields(name)[name]) is vm
    assert vm.model == machine(fields(name))


# ---- qemu and libvirt judge the balloon, the option added through the table alone ----------------


def _layout(tmp_path) -> Layout:
    import os

    lay = Layout(str(tmp_path / "state"), str(tmp_path / "run"), ("tcg",))
    os.makedirs(lay.state_dir)
    os.makedirs(lay.run_dir)
    return lay


@pytest.mark.parametrize("balloon", [True, False])
def test_qemu_has_a_balloon_exactly_when_the_definition_says_so(qemu_bin, tmp_path, balloon):
    from qemuspec.errors import QMPError
    from test_qemu_real import run_rendered, stop_rendered

    lay = _layout(tmp_path)
    wanted = machine(
        {
            "paused": True,
            "memory": "96M",
            "balloon": {"options": {"deflate-on-oom": True}} if balloon else False,
        }
    )
    proc, client = run_rendered(render(wanted, "m", lay), lay.qmp)
    try:
        if balloon:
            assert client.command("query-balloon")["actual"] == 96 << 20
            kinds = {
                d["name"]: d["type"]
                for d in client.command("qom-list", {"path": "/machine/peripheral"})
            }
            assert kinds["qemuspec-balloon0"] == "child<virtio-balloon-pci>"
            backend = "/machine/peripheral/qemuspec-balloon0/virtio-backend"
            assert (
                client.command("qom-get", {"path": backend, "property": "deflate-on-oom"}) is True
            )
        else:
            with pytest.raises(QMPError, match="[Nn]o balloon"):
                client.command("query-balloon")
    finally:
        stop_rendered(proc, client)


def test_libvirt_gets_no_balloon_unless_the_definition_has_one(tmp_path):
    """libvirt adds a virtio balloon to a domain without <memballoon>: the export says none, so the
    domain has what the local command line has (virt-xml-validate: tests/test_libvirt.py)."""
    from test_libvirt import validates

    off = domain_xml(machine({}), "m")
    assert '<memballoon model="none" />' in off and "virtio-balloon" not in off
    on = domain_xml(machine({"balloon": True}), "m")
    assert '<memballoon model="virtio" />' in on and 'model="none"' not in on
    for xml in (off, on):
        validates(xml, tmp_path)
    with pytest.raises(SpecError, match="machines.m.balloon.options"):
        domain_xml(machine({"balloon": {"options": {"guest-stats-polling-interval": 2}}}), "m")
