"""Property: whatever text a definition file holds, loading it either succeeds or raises SpecError
(one paragraph naming the file) -- never another exception. 5,000+ mutated definitions per run,
seeded with the shipped examples and the inputs that once broke the loader."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuspec.errors import SpecError
from qemuspec.spec.loader import loads

from helpers import shipped_definitions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = {}
for path in shipped_definitions():
    with open(path, encoding="utf-8") as f:
        SEEDS[os.path.basename(path)] = ("toml" if path.endswith(".toml") else "yaml", f.read())

# Fragments that broke the loader before (issue 9) or are classic parser edge cases.
NASTY = [
    "9" * 400,
    "1e300",
    "-1",
    "0",
    "nan",
    "inf",
    "-inf",
    "\x00",
    "\\U7fffffff",
    '"\\U7fffffff"',
    "\\x00",
    "? [a, b]\n: c\n",
    "? {a: 1}\n: 2\n",
    "!!timestamp 2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "!!binary aGVsbG8=",
    "!!python/object:os.system",
    "&a [*a]",
    "*a",
    "&x",
    "{{ 1/0 }}",
    "{{ [][0] }}",
    "{{ 'a' + 1 }}",
    "{{ x.y.z }}",
    "{% for i in range(3) %}{% endfor %}",
    "{{",
    "}}",
    "{%",
    "[[",
    "]]",
    "[a.b.c]",
    "= ",
    '"""',
    "'''",
    "\t",
    "\r\n",
    "\ufeff",
    "\udcff",
    "é",
    "🙂",
    "[" * 200,
    "{" * 200,
    "- " * 200,
    "a: &a [1]\nb: *a\n",
    "<<: *a",
    "~",
    "null",
    "true",
    "yes",
    "0x10",
    "0o7",
    "1_000",
    "256M",
    "1G",
    "99999999999999999999T",
    "30s",
    "1e400s",
    "machines",
    "[machines.x]",
    "memory = ",
    "cpus = ",
    "stop_timeout = ",
    "ready.timeout = 1e300",
    "port = 70000",
    "port = -5",
]


def _mutate(text: str, ops: list[tuple[int, int, int, str]]) -> str:
    for kind, a, b, fragment in ops:
        if not text:
            text = fragment
            continue
        i, j = sorted((a % (len(text) + 1), b % (len(text) + 1)))
        if kind == 0:
            text = text[:i] + fragment + text[i:]
        elif kind == 1:
            text = text[:i] + text[j:]
        elif kind == 2:
            text = text[:i] + fragment + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


fragments = st.one_of(st.sampled_from(NASTY), st.text(max_size=12))
ops = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 10**6), fragments),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False
)
@given(seed=st.sampled_from(sorted(SEEDS)), mutations=ops)
def test_mutated_definitions_load_or_fail_with_a_spec_error(seed, mutations):
    fmt, text = SEEDS[seed]
    mutated = _mutate(text, mutations)
    try:
        loads(mutated, fmt, source=seed, base_dir=ROOT, environ={})
    except SpecError as exc:
        assert str(exc).startswith(seed), f"the error names the file: {exc}"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(fragment=st.sampled_from(NASTY), fmt=st.sampled_from(["toml", "yaml"]))
def test_bare_nasty_fragments(fragment, fmt):
    try:
        loads(fragment, fmt, source="f", base_dir=ROOT, environ={})
    except SpecError:
        pass


def test_alias_bomb_is_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    assert len(bomb) < 1000
    try:
        loads(bomb, "yaml", source="bomb.yaml")
    except SpecError as exc:
        assert "aliases" in str(exc)
    else:
        raise AssertionError("an alias bomb must be refused")


def test_oversized_file_is_refused(tmp_path):
    from qemuspec.spec.loader import load

    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * (1024 * 1024) + "\n")
    try:
        load(path)
    except SpecError as exc:
        assert "at most 1048576 bytes" in str(exc)
    else:
        raise AssertionError("a file over 1 MiB must be refused")


def test_deep_nesting_is_a_clean_error():
    for fmt, text in (
        ("toml", "x = " + "[" * 5000 + "]" * 5000),
        ("yaml", "x: " + "[" * 5000 + "]" * 5000),
    ):
        try:
            loads(text, fmt, source="deep")
        except SpecError as exc:
            assert "nested" in str(exc) or "syntax" in str(exc)
