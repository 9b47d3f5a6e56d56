"""The error-message table: each bad definition, through the real CLI, gives exactly one paragraph that
names the file and line, the field and the fix, exits 2, and leaves nothing running. These are the
mistakes that used to cost a whole readiness timeout (or read wrong) and are now caught before boot.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import qemu_pids

ENTRY = [sys.executable, "-m", "qemuspec"]
BOOTS = 'kernel = "vmlinuz"\ncmdline = "console=ttyS0"\n'  # a kernel file the test writes (never booted)
READY = '[machines.web.ready]\nserial = "ready"\n'

# (id, file name, content, commands, fragments the one paragraph must hold)
TABLE = [
    (
        "nothing-to-boot",
        "a.toml",
        '[machines.web]\nmemory = "256M"\n' + READY,
        ("validate", "up"),
        ["a.toml:1:", "machines.web:", "nothing to boot", 'kernel = "path/to/vmlinuz"', "cdrom"],
    ),
    (
        "blank-disk-only",
        "a.toml",
        '[machines.web]\n[[machines.web.disks]]\nfile = "new.qcow2"\nformat = "qcow2"\n'
        'size = "1G"\n' + READY,
        ("validate", "up"),
        ["a.toml:1:", "machines.web:", "created blank by up", "disks[0].file"],
    ),
    (
        "ready-serial-without-console",
        "a.toml",
        "[machines.web]\n" + BOOTS + 'serial = "none"\n' + READY,
        ("validate", "up"),
        ["a.toml:6:", "machines.web.ready.serial:", 'serial = "none"', 'set serial = "log"'],
    ),
    (
        "kernel-is-a-directory",
        "a.toml",
        '[machines.web]\nkernel = "kdir"\n' + READY,
        ("validate", "up"),
        ["a.toml:2:", "machines.web.kernel:", "is a directory", "name the kernel file in it"],
    ),
    (
        "kernel-is-empty",
        "a.toml",
        '[machines.web]\nkernel = "empty"\n' + READY,
        ("validate", "up"),
        ["a.toml:2:", "machines.web.kernel:", "is empty", "rebuild it or fix the path"],
    ),
    (
        "memory-in-bytes",
        "a.toml",
        "[machines.web]\n" + BOOTS + "memory = 536870912\n",
        ("validate", "up"),
        ["a.toml:4:", "machines.web.memory:", "512TiB", "did you mean bytes?", 'memory = "512M"'],
    ),
    (
        "memory-above-the-host",
        "a.toml",
        "[machines.web]\n" + BOOTS + 'memory = "64T"\n',
        ("validate", "up"),
        ["a.toml:4:", "machines.web.memory:", "more than this host has", "lower it"],
    ),
    (
        "yaml-restart-no",
        "a.yaml",
        "machines:\n  web:\n    restart: no\n",
        ("validate", "up"),
        [
            "a.yaml:3:",
            "machines.web.restart:",
            "YAML 1.1 reads the unquoted no as the boolean false",
            'restart: "no"',
        ],
    ),
    (
        "yaml-base-60",
        "a.yaml",
        "machines:\n  web:\n    nics:\n      - forwards:\n          - 22:22\n",
        ("validate", "up"),
        [
            "a.yaml:5:",
            "machines.web.nics[0].forwards[0]:",
            "base-60 number 1342",
            "{host: 22, guest: 22}",
        ],
    ),
    (
        "compose-ports",
        "a.toml",
        '[machines.web]\nports = ["8080:80"]\n',
        ("validate", "up"),
        [
            "a.toml:2:",
            "machines.web.ports:",
            "docker compose",
            "forwards = [{ host = 8080, guest = 80 }]",
        ],
    ),
    (
        "lima-image-url",
        "a.toml",
        '[machines.web]\nimage = "https://example.org/debian.qcow2"\n',
        ("validate", "up"),
        [
            "a.toml:2:",
            "machines.web.image:",
            '[[machines.web.disks]] with image = { url = "https://example.org/debian.qcow2"',
        ],
    ),
    (
        "cmdline-as-a-list",
        "a.toml",
        '[machines.web]\nkernel = "vmlinuz"\ncmdline = ["console=ttyS0", "quiet"]\n',
        ("validate", "up"),
        ["a.toml:3:", "machines.web.cmdline:", 'write cmdline = "console=ttyS0 quiet"'],
    ),
    (
        "compose-restart",
        "a.yaml",
        "machines:\n  web:\n    restart: unless-stopped\n",
        ("validate", "up"),
        ["a.yaml:3:", "machines.web.restart:", 'use "always"'],
    ),
    (
        "run-with-no-way-in",
        "a.toml",
        "[machines.web]\n" + BOOTS + READY,
        ("run",),
        [
            "a.toml:1:",
            "machines.web:",
            "no guest agent and no forward to its ssh port 22",
            "agent = true",
            "forwards = [{ host = 0, guest = 22 }]",
        ],
    ),
]


def argv(command: str, path: str) -> list[str]:
    return [*ENTRY, command, path] + (["--", "true"] if command == "run" else [])


@pytest.mark.parametrize(
    "name,content,commands,fragments", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_a_bad_definition_gives_one_paragraph_exit_2_and_starts_nothing(
    tmp_path, qemu_bin, name, content, commands, fragments
):
    (tmp_path / "vmlinuz").write_bytes(b"\x7fELF not booted")
    (tmp_path / "kdir").mkdir()
    (tmp_path / "empty").write_bytes(b"")
    path = tmp_path / name
    path.write_text(content)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for command in commands:
        result = subprocess.run(
            argv(command, str(path)), capture_output=True, text=True, timeout=120, env=env
        )
        assert result.returncode == 2, f"{command}: {result.stderr}"
        errors = [
            p
            for p in result.stderr.split("\n\n")
            if p.strip().startswith("error:") or "\nerror:" in p
        ]
        assert len(errors) == 1, f"{command}: one paragraph: {result.stderr}"
        paragraph = errors[0].strip().split("error: ", 1)[1]
        assert "\n" not in paragraph and "Traceback" not in result.stderr
        assert paragraph.startswith(str(path)), paragraph
        for fragment in fragments:
            assert fragment in paragraph, f"{command}: {fragment!r} not in {paragraph!r}"
        assert not qemu_pids(tmp_path), f"{command} left a qemu running"
        assert not os.path.exists(tmp_path / ".qemuspec" / "web" / "supervisor.json")


def test_accel_kvm_where_qemu_cannot_start_on_kvm_is_caught_before_boot(tmp_path, qemu_bin):
    """qemu itself is the judge of whether KVM works here: started by hand on KVM with the machine's type
    and CPU, stopped; `up` and `validate --probe` must agree with what it did."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip(
            "no /dev/kvm on this host: preflight refuses accel = kvm there without starting qemu"
        )
    by_hand = subprocess.run(
        [
            qemu_bin,
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-m",
            "64",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-qmp",
            "stdio",
        ],
        input='{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n{"execute": "quit"}\n',
        capture_output=True,
        text=True,
        timeout=30,
    )
    fails = by_hand.returncode != 0 or '"status"' not in by_hand.stdout
    (tmp_path / "vmlinuz").write_bytes(b"\x7fELF not booted")
    path = tmp_path / "k.toml"
    path.write_text("[machines.web]\n" + BOOTS + 'accel = "kvm"\n' + READY)
    env = {k: v for k, v in os.environ.items() if k != "QEMUSPEC_ACCEL"}
    for command in (["validate", "--probe"], ["up"]):
        result = subprocess.run(
            [*ENTRY, *command, str(path)], capture_output=True, text=True, timeout=120, env=env
        )
        if not fails:
            assert "cannot start this machine on KVM" not in result.stderr
            if command == ["up"]:
                subprocess.run([*ENTRY, "down", str(path)], capture_output=True, timeout=120)
            continue
        assert result.returncode == 2, result.stderr
        assert f"{path}:4: machines.web.accel:" in result.stderr
        assert 'use accel = "auto"' in result.stderr and '"tcg"' in result.stderr
        assert by_hand.stderr.strip().splitlines()[0] in result.stderr, (
            "qemu's own words are quoted"
        )
        assert not qemu_pids(tmp_path)
