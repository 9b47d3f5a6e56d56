"""Reading a definition from someone else's repository never runs anything it names.

Known Jinja2 server-side template injection payloads, variables that try to splice text into the file,
and templates that try to exhaust time or memory: each must end as a clean exit-2 error naming the
file, with no side effect (the file the payload would create does not exist).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qemuspec.errors import SpecError
from qemuspec.spec import load

# Each payload tries to create the file MARK; {mark} is replaced by its path.
PAYLOADS = [
    "{{{{ cycler.__init__.__globals__.os.popen('touch {mark}').read() }}}}",
    "{{{{ joiner.__init__.__globals__.os.popen('touch {mark}').read() }}}}",
    "{{{{ namespace.__init__.__globals__.os.popen('touch {mark}').read() }}}}",
    "{{{{ lipsum.__globals__['os'].popen('touch {mark}').read() }}}}",
    "{{{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {mark}') }}}}",
    "{{{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch {mark}').read() }}}}",
    "{{% for c in ''.__class__.__mro__[1].__subclasses__() %}}{{% if c.__name__ == 'Popen' %}}{{{{ c(['touch', '{mark}']) }}}}{{% endif %}}{{% endfor %}}",
    "{{% for c in ().__class__.__base__.__subclasses__() %}}{{% if 'warning' in c.__name__ %}}{{{{ c()._module.__builtins__['__import__']('os').system('touch {mark}') }}}}{{% endif %}}{{% endfor %}}",
    "{{{{ ''|attr('__class__')|attr('__mro__')|last|attr('__subclasses__')() }}}}{{{{ 'touch {mark}' }}}}",
    "{{{{ request.application.__globals__.__builtins__.__import__('os').popen('touch {mark}').read() }}}}",
    "{{{{ config.__class__.__init__.__globals__['os'].popen('touch {mark}').read() }}}}",
    "{{{{ '{{0.__class__.__init__.__globals__}}'.format(range) }}}}{{{{ 'touch {mark}' }}}}",
    "{{{{ range.__init__.__globals__['os'].system('touch {mark}') }}}}",
    "{{{{ dict.__init__.__globals__['os'].system('touch {mark}') }}}}",
    "{{% set x = self.__dict__ %}}{{{{ x._TemplateReference__context.environment.__class__ }}}}{{{{ 'touch {mark}' }}}}",
]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qemuspec.cli.main", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("index", range(len(PAYLOADS)))
@pytest.mark.parametrize("command", ["validate", "render", "plan"])
def test_template_injection_is_refused_without_side_effect(tmp_path, index, command):
    mark = tmp_path / "pwned"
    payload = PAYLOADS[index].format(mark=mark).replace('"', '\\"')
    definition = tmp_path / "evil.toml"
    definition.write_text(f'[machines.vm]\nkernel = "k"\ncmdline = "{payload}"\n')
    result = cli(command, str(definition))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert f"{definition}:3" in result.stderr and "machines.vm.cmdline" in result.stderr
    assert not mark.exists()


def test_a_variable_is_one_value_and_cannot_add_keys(tmp_path):
    definition = tmp_path / "m.toml"
    definition.write_text('[vars]\nbranch = "main"\n[machines.vm]\nkernel = "k"\ncmdline = "console=ttyS0 branch={{ branch }}"\n')
    hostile = 'x"\nqemu = "/bin/sh'
    machine = load(definition, variables={"branch": hostile}, environ={}).machines["vm"]
    assert machine.cmdline == f"console=ttyS0 branch={hostile}"
    assert machine.qemu == "qemu-system-x86_64"
    # and from the environment, the same
    machine = load(definition, environ={"QEMUSPEC_VAR_branch": hostile}).machines["vm"]
    assert machine.cmdline.endswith(hostile)


def test_error_lines_stay_right_after_templating(tmp_path):
    definition = tmp_path / "m.toml"
    definition.write_text('[vars]\nlong = "a\\nb\\nc\\nd"\n[machines.vm]\nkernel = "k"\ncmdline = "{{ long }}"\nmemory = "lots"\n')
    with pytest.raises(SpecError) as err:
        load(definition, environ={})
    assert f"{definition}:6: machines.vm.memory" in str(err.value)


def test_an_unused_var_is_an_error_with_a_suggestion(tmp_path):
    definition = tmp_path / "m.toml"
    definition.write_text('[vars]\nmemory = "256M"\n[machines.vm]\nmemory = "{{ memory }}"\n')
    result = cli("validate", str(definition), "--var", "memroy=1G")
    assert result.returncode == 2
    assert "--var memroy is not used" in result.stderr and 'did you mean "memory"?' in result.stderr


def test_an_unused_environment_variable_only_warns(tmp_path):
    definition = tmp_path / "m.toml"
    definition.write_text('[vars]\nmemory = "256M"\n[machines.vm]\nmemory = "{{ memory }}"\n')
    result = cli("validate", str(definition), env={"QEMUSPEC_VAR_memroy": "1G", "QEMUSPEC_VAR_unrelated": "x"})
    assert result.returncode == 0, result.stderr
    assert "QEMUSPEC_VAR_memroy is set but not used" in result.stderr
    assert "unrelated" not in result.stderr


@pytest.mark.parametrize("template, expect", [
    ("{{ 'x' * 10**9 }}", "went over a limit"),
    ("{{ 10**100000 }}", "exponent"),
    ("{{ 'x' * 1000000000 }}", "went over a limit"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "range()"),
    ("{% for a in 'x' * 1000 %}{% for b in 'x' * 1000 %}{% for c in 'x' * 1000 %}{% for d in 'x' * 1000 %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}", "took more than"),
    ("{{ 'x'|center(1000000000) }}", "No filter named 'center'"),
    ("{{ 'x'.ljust(1000000000) }}", "may not do"),
    ("{{ '{:>1000000000}'.format(1) }}", "may not do"),
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ '%1000000000d' % 1 }}", "formatting"),
    ("{{ undefined_thing.attr }}", 'template variable "undefined_thing" is not defined'),
])
def test_templates_are_bounded_in_time_and_memory(tmp_path, template, expect):
    definition = tmp_path / "m.toml"
    definition.write_text(f'[machines.vm]\nkernel = "k"\ncmdline = "{template}"\n')
    with pytest.raises(SpecError) as err:
        load(definition, environ={})
    assert expect in str(err.value)
    assert f"{definition}:3: machines.vm.cmdline" in str(err.value)
