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
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


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
    definition.write_text(
        '[vars]\nbranch = "main"\n[machines.vm]\nkernel = "k"\ncmdline = "console=ttyS0 branch={{ branch }}"\n'
        '[machines.vm.cloud_init]\nuser_data = "#cloud-config\\n# {{ branch }}"\n'
    )
    hostile = 'x"\nqemu = "/bin/sh'
    with pytest.raises(
        SpecError, match="machines.vm.cmdline: a line break cannot be passed to qemu"
    ):
        load(definition, variables={"branch": hostile}, environ={})
    definition.write_text(definition.read_text().replace("cmdline = ", "# cmdline = "))
    machine = load(definition, variables={"branch": hostile}, environ={}).machines["vm"]
    assert machine.cloud_init.user_data == f"#cloud-config\n# {hostile}"
    assert machine.qemu == "qemu-system-x86_64"
    machine = load(definition, environ={"QEMUSPEC_VAR_branch": hostile}).machines["vm"]
    assert machine.cloud_init.user_data.endswith(hostile) and machine.qemu == "qemu-system-x86_64"
    quoted = 'feature/"quoted" branch'
    machine = load(
        definition.with_name("m.toml"), variables={"branch": quoted}, environ={}
    ).machines["vm"]
    assert machine.cloud_init.user_data.endswith(quoted)


def test_error_lines_stay_right_after_templating(tmp_path):
    definition = tmp_path / "m.toml"
    definition.write_text(
        '[vars]\nlong = "a\\nb\\nc\\nd"\n[machines.vm]\nkernel = "k"\ncmdline = "{{ long }}"\nmemory = "lots"\n'
    )
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
    result = cli(
        "validate",
        str(definition),
        env={"QEMUSPEC_VAR_memroy": "1G", "QEMUSPEC_VAR_unrelated": "x"},
    )
    assert result.returncode == 0, result.stderr
    assert "QEMUSPEC_VAR_memroy is set but not used" in result.stderr
    assert "unrelated" not in result.stderr


@pytest.mark.parametrize(
    "template, expect",
    [
        ("{{ 'x' * 10**9 }}", "went over a limit"),
        ("{{ 10**100000 }}", "exponent"),
        ("{{ 'x' * 1000000000 }}", "went over a limit"),
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "range()",
        ),
        (
            "{% for a in 'x' * 1000 %}{% for b in 'x' * 1000 %}{% for c in 'x' * 1000 %}{% for d in 'x' * 1000 %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
            "took more than",
        ),
        ("{{ 'x'|center(1000000000) }}", "No filter named 'center'"),
        ("{{ 'x'.ljust(1000000000) }}", "may not do"),
        ("{{ '{:>1000000000}'.format(1) }}", "may not do"),
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{{ '%1000000000d' % 1 }}", "formatting"),
        ("{{ undefined_thing.attr }}", 'template variable "undefined_thing" is not defined'),
    ],
)
def test_templates_are_bounded_in_time_and_memory(tmp_path, template, expect):
    definition = tmp_path / "m.toml"
    definition.write_text(f'[machines.vm]\nkernel = "k"\ncmdline = "{template}"\n')
    with pytest.raises(SpecError) as err:
        load(definition, environ={})
    assert expect in str(err.value)
    assert f"{definition}:3: machines.vm.cmdline" in str(err.value)


# One value each, as a pull request could write it; every one once allocated gigabytes or ran for
# minutes in a single C-level operation that no check between Python lines could stop.
HOSTILE = {
    "issue: nested power": "{{ (((((10**64)**64)**64)**64)**64) > 1 }}",
    "nested power of 2**64": "{{ ((2**64)**64)**64 }}",
    "str.replace amplification": "{{ ('a' * 1000000).replace('a', 'a' * 1000000) }}",
    "replace filter": "{{ ('a' * 1000000)|replace('a', 'a' * 1000000) }}",
    "str.join of a repeated list": "{{ ('x' * 1000000).join(['a' * 1000000] * 1000) }}",
    "join filter": "{{ (['a' * 1000000] * 1000)|join('x' * 1000000) }}",
    "batch fill": "{{ [1]|batch(1000000000, 0)|list }}",
    "slice fill": "{{ [1]|slice(100000000, 0)|list }}",
    "int.to_bytes": "{{ (1).to_bytes(2000000000, 'big') }}",
    "bytes.center": "{{ 'x'.encode().center(2000000000) }}",
    "bytes times N": "{{ 'x'.encode() * 2000000000 }}",
    "'a'*N doubling chain": "{% set a = 'a' * 1000000 %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}{% set e = d ~ d %}"
    "{% set f = e ~ e %}{% set g = f ~ f %}{% set h = g ~ g %}{% set i = h ~ h %}{% set j = i ~ i %}{{ j|length }}",
    "doubling macro": "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('x', 40) }}",
    "sum of repeated lists": "{{ ([[1] * 1000000] * 1000000)|sum(start=[]) }}",
    "str.translate amplification": "{{ ('a' * 1000000).translate({97: 'b' * 1000000}) }}",
    "huge range products": "{% for a in range(100000) %}{{ a * 10**1000 }}{% endfor %}",
    "nested loops over strings": "{% for a in range(100000) %}{% for b in 'x' * 1000000 %}{% endfor %}{% endfor %}",
}
MAX_WALL_SECONDS = 5.0
MAX_PEAK_MIB = 512


def _validate_measured(definition) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MiB of the validate process and what it waited for, exit code, stderr)."""
    import select
    import time

    err = definition.with_suffix(".err")
    began = time.monotonic()
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qemuspec.cli.main", "validate", str(definition)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    pidfd = os.pidfd_open(proc.pid)
    try:
        if not select.select([pidfd], [], [], 60)[0]:  # far past the bar: stop it, and fail below
            proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.monotonic() - began, usage.ru_maxrss / 1024, proc.returncode, err.read_text()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_one_hostile_value_ends_within_5_s_and_512_mib(tmp_path, name):
    definition = tmp_path / "m.toml"
    template = HOSTILE[name].replace('"', '\\"')
    definition.write_text(f'[machines.vm]\nkernel = "k"\ncmdline = "{template}"\n')
    seconds, peak, code, stderr = _validate_measured(definition)
    print(f"{name}: {seconds:.2f} s, peak RSS {peak:.0f} MiB")
    assert seconds < MAX_WALL_SECONDS and peak < MAX_PEAK_MIB, (seconds, peak, stderr)
    assert code == 2 and "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert f"{definition}:3: machines.vm.cmdline" in stderr, stderr


def test_many_values_share_one_budget_per_file(tmp_path):
    """Each value under the per-value cap, but thousands of them: the file's output is bounded too."""
    definition = tmp_path / "m.toml"
    lines = "".join(f"v{i} = \"{{{{ 'x' * 1000000 }}}}\"\n" for i in range(2000))
    definition.write_text(
        f'[machines.vm]\nkernel = "k"\n[machines.vm.cloud_init.meta_data]\n{lines}'
    )
    seconds, peak, code, stderr = _validate_measured(definition)
    assert seconds < MAX_WALL_SECONDS and peak < MAX_PEAK_MIB, (seconds, peak, stderr)
    assert code == 2 and "characters of rendered values in one file" in stderr, stderr


def test_rendering_in_a_child_keeps_results_and_types(tmp_path):
    """The bound changes nothing for a real file: values, types, line numbers and unused --var checks."""
    definition = tmp_path / "m.toml"
    definition.write_text(
        '[vars]\ncpus = 2\nname = "web"\n[machines.vm]\nkernel = "k"\ncpus = "{{ cpus }}"\n'
        'cmdline = "console=ttyS0 host={{ name|upper }}-{{ 2**10 }} {% for i in range(3) %}{{ i }}{% endfor %}"\n'
    )
    machine = load(definition, environ={}).machines["vm"]
    assert machine.cpus == 2 and machine.cmdline == "console=ttyS0 host=WEB-1024 012"
