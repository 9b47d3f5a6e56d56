"""A hostile definition file (issue 20: items 1, 3, 5, 9, 13, 14, 18), tried as the attack it is: a
planted program, planted files and symlinks, host paths outside the tree. Each test asserts that
nothing happened, and that the refusal is one paragraph naming the file and the field."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest


def cli(*args, cwd=None, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def _one_paragraph(stderr: str) -> None:
    assert "Traceback" not in stderr and stderr.strip() and "\n\n" not in stderr.strip(), stderr


def _evil(directory) -> str:
    """A program the repository ships: it leaves a marker if anything runs it."""
    marker = os.path.join(directory, "ran")
    script = os.path.join(directory, "evil.sh")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(script, 0o755)
    return marker


# ---- item 1: a libvirt URI cannot name a program ---------------------------------------------

SMUGGLED = [
    "qemu+ssh://ci@h/system?keyfile=id;command=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id;netcat=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id%26command=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id%3Bcommand=./evil.sh",
    "qemu+ssh://ci@h/system?Command=./evil.sh",
    "qemu+ssh://ci@h/system?COMMAND=./evil.sh",
    "qemu+ssh://ci@h/system?%63ommand=./evil.sh",
    "qemu+ssh://ci@h/system?proxy=netcat&netcat=./evil.sh",
    "qemu+ssh://ci@h/system?socket=/x;./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=$(./evil.sh)",
    "qemu+ssh://ci@h/system?keyfile=-oProxyCommand=./evil.sh",
    "qemu+ssh://ci@h/system?keyfile=id%0A./evil.sh",
    "qemu+ssh://ci@h/system?keyfile",
    "qemu+ssh://ci@h/system?",
]


@pytest.mark.parametrize("uri", SMUGGLED)
def test_a_host_uri_smuggling_a_program_runs_nothing(uri, tmp_path):
    marker = _evil(tmp_path)
    path = tmp_path / "m.toml"
    path.write_text(f'[machines.m]\nhost = "{uri}"\nmemory = "64M"\n')
    for command in ("status", "plan", "validate"):
        result = cli(command, str(path), cwd=tmp_path, env={"QEMUSPEC_CONNECT": ""})
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "m.toml" in result.stderr and "machines.m.host" in result.stderr, result.stderr
        assert "not a libvirt QEMU URI" in result.stderr, result.stderr
        _one_paragraph(result.stderr)
    assert not os.path.exists(marker), "the repository's program ran"


@pytest.mark.parametrize("uri", SMUGGLED[:5])
def test_a_connect_uri_smuggling_a_program_runs_nothing(uri, tmp_path):
    marker = _evil(tmp_path)
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "64M"\n')
    result = cli("status", str(path), "--connect", uri, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--connect" in result.stderr and "not a libvirt QEMU URI" in result.stderr, result.stderr
    _one_paragraph(result.stderr)
    assert not os.path.exists(marker)


def test_the_connection_itself_refuses_a_uri_that_names_a_program(tmp_path):
    """The last line: a URI reaching ``connect`` from any record (a cache entry, a library caller)."""
    from qemuspec.backends.libvirt_conn import connect
    from qemuspec.errors import QemuspecError

    marker = _evil(tmp_path)
    os.chdir(tmp_path)
    with pytest.raises(QemuspecError, match="not a libvirt QEMU URI"):
        connect("qemu+ssh://ci@h/system?keyfile=id;command=./evil.sh")
    assert not os.path.exists(marker)


def test_uri_parameters_users_write_still_pass():
    from qemuspec.spec.uris import check_libvirt_uri

    for uri in [
        "qemu+ssh://ci@h/system?keyfile=/home/ci/.ssh/id_ed25519;no_verify=1",
        "qemu+ssh://ci@h/system?keyfile=%2Fk&known_hosts_verify=ignore&sshauth=agent,privkey",
        "qemu+tls://h/system?pkipath=/etc/pki/x&tls_priority=NORMAL:%25COMPAT",
        "qemu:///system?mode=direct",
    ]:
        assert check_libvirt_uri(uri) == uri


# ---- item 3: every purge keeps to created.json ------------------------------------------------

UNREACHABLE = "qemu+ssh://nobody@127.0.0.1:1/system?no_tty=1&no_verify=1"  # refused at once: no libvirtd needed


def _victims(tmp_path):
    """A directory of someone else's files, a file named as a disk with a size, and one with a backing."""
    victim = tmp_path / "victim"
    (victim / "home" / "alice").mkdir(parents=True)
    (victim / "home" / "alice" / "thesis.txt").write_text("years of work\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.img").write_text("the user's own image\n")
    (project / "notes.qcow2").write_text("not an overlay at all\n")
    return victim, project


def _mixed(project, host: str) -> str:
    """A file with one libvirt machine, so `down` takes the libvirt path, and a local machine named
    like the victim's subdirectory, with disks qemuspec never made."""
    path = project / "lab.toml"
    path.write_text(
        f'[machines.far]\nhost = "{host}"\nmemory = "64M"\n\n'
        '[machines.home]\nmemory = "64M"\n'
        '[[machines.home.disks]]\nfile = "data.img"\nsize = "1M"\n'
        '[[machines.home.disks]]\nfile = "notes.qcow2"\nformat = "qcow2"\nbacking = "data.img"\n'
        'backing_format = "raw"\n'
    )
    return str(path)


def test_libvirt_path_purge_never_follows_a_planted_state_symlink(tmp_path):
    victim, project = _victims(tmp_path)
    os.symlink(victim, project / ".qemuspec")  # committed in the repository: .qemuspec -> /
    path = (
        project / "lab.toml"
    )  # machines all on libvirt hosts: no local machine checks the state root first
    path.write_text(f'[machines.home]\nhost = "{UNREACHABLE}"\nmemory = "64M"\n')
    result = cli("down", str(path), "--purge", timeout=120)
    assert result.returncode != 0 and "symlink" in result.stderr, result.stderr
    _one_paragraph(result.stderr)
    assert (victim / "home" / "alice" / "thesis.txt").read_text() == "years of work\n", (
        "rm -rf through the symlink"
    )
    assert (project / "data.img").read_text() == "the user's own image\n"
    assert (project / "notes.qcow2").read_text() == "not an overlay at all\n"


def test_libvirt_path_purge_deletes_no_disk_qemuspec_did_not_create(tmp_path):
    _victim, project = _victims(tmp_path)
    state = project / ".qemuspec" / "home"
    state.mkdir(parents=True)
    (state / "known_hosts").write_text("h ssh-ed25519 AAAA\n")
    cli("down", _mixed(project, UNREACHABLE), "--purge", timeout=120)
    assert (project / "data.img").read_text() == "the user's own image\n", (
        "a disk with a size qemuspec never made"
    )
    assert (project / "notes.qcow2").read_text() == "not an overlay at all\n", (
        "a backing disk qemuspec never made"
    )
    assert not state.exists(), "the machine's own state directory goes"


# ---- item 5: reset replaces only overlays qemuspec created -------------------------------------


def _overlay_file(tmp_path, overlay: str) -> str:
    from qemuspec import img

    img.create(str(tmp_path / "base.qcow2"), "16M", "qcow2")
    path = tmp_path / "m.toml"
    path.write_text(
        f'[machines.m]\nmemory = "64M"\n[[machines.m.disks]]\nfile = "{overlay}"\nformat = "qcow2"\n'
        'backing = "base.qcow2"\nbacking_format = "qcow2"\n'
    )
    return str(path)


def test_reset_never_replaces_a_file_it_did_not_create(tmp_path):
    (tmp_path / "thesis.txt").write_text("years of work\n")
    path = _overlay_file(tmp_path, "thesis.txt")
    result = cli("reset", path)
    assert result.returncode == 1, result.stderr
    assert "m.toml" in result.stderr and "machines.m.disks.0.file" in result.stderr
    assert "not an overlay qemuspec created" in result.stderr
    _one_paragraph(result.stderr)
    assert (tmp_path / "thesis.txt").read_text() == "years of work\n"


def test_reset_replaces_its_own_overlay_and_not_one_put_in_its_place(tmp_path):
    from qemuspec import img

    path = _overlay_file(tmp_path, "overlay.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    assert cli("reset", path).returncode == 0 and img.info(str(overlay)).backing == str(
        tmp_path / "base.qcow2"
    )
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x55 0 4096", str(overlay)], check=True, capture_output=True
    )
    assert (
        subprocess.run(
            ["qemu-img", "compare", "-q", str(overlay), str(tmp_path / "base.qcow2")]
        ).returncode
        == 1
    )
    assert cli("reset", path).returncode == 0, "an overlay qemuspec recorded is replaced"
    assert (
        subprocess.run(
            ["qemu-img", "compare", "-q", str(overlay), str(tmp_path / "base.qcow2")]
        ).returncode
        == 0
    )
    overlay.rename(tmp_path / "kept.qcow2")  # kept, so the new file cannot reuse its inode
    overlay.write_text("the user's file, same name\n")
    result = cli("reset", path)
    assert result.returncode == 1 and "not an overlay qemuspec created" in result.stderr, (
        result.stderr
    )
    assert overlay.read_text() == "the user's file, same name\n"


# ---- item 9: import writes nothing outside its header comments --------------------------------

HIDDEN = '\n[[machines.evil.shares]]\nsource = "/"\ntag = "root"\n'


def _declared(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)["machines"]


@pytest.mark.parametrize(
    "payload",
    [
        HIDDEN + "#",
        HIDDEN.replace("\n", "\r\n") + "#",
        HIDDEN.replace("\n", "\u2028"),
        "\x0b" + HIDDEN,
    ],
)
def test_import_refuses_an_argv_value_with_a_line_break(payload, tmp_path):
    out = tmp_path / "out.toml"
    result = cli(
        "import",
        "-o",
        str(out),
        "--",
        "qemu-system-x86_64",
        "-m",
        "256",
        "-append",
        "console=ttyS0" + payload,
    )
    assert result.returncode == 2 and "line break" in result.stderr and "word 4" in result.stderr, (
        result.stderr
    )
    _one_paragraph(result.stderr)
    assert (
        not out.exists()
    )  # before the fix: out.toml declared [[machines.evil.shares]] source = "/"


def test_import_from_a_script_refuses_a_quoted_line_break(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("qemu-system-x86_64 -m 256 \\\n  -name 'vm" + HIDDEN + "'\n")
    result = cli("import", "--from", str(script))
    assert result.returncode == 2 and "line break" in result.stderr, result.stderr
    _one_paragraph(result.stderr)


def test_libvirt_xml_line_breaks_stay_inside_the_comment(tmp_path):
    hidden = HIDDEN.replace("\n", "&#10;").replace('"', "&quot;")
    xml = tmp_path / "domain.xml"
    xml.write_text(
        f"<domain type='qemu'><name>vm</name><memory unit='MiB'>256</memory>"
        f"<on_reboot>destroy{hidden}</on_reboot><on_crash>x&#13;&#10;&#x2028;[machines.evil2]</on_crash>"
        f"<devices><disk type='network' device='disk{hidden}'/></devices></domain>"
    )
    out = tmp_path / "out.toml"
    result = cli("import", "--from-libvirt", str(xml), "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert list(_declared(text)) == ["vm"] and "shares" not in _declared(text)["vm"], text
    assert "the definition declares 1 machine: vm" in result.stderr
    header = text.split("\n\n", 1)[0].splitlines()
    assert header and all(line.startswith("#") for line in header), header
    assert "\\x0a[[machines.evil.shares]]" in text, "the payload is shown, escaped"
    assert cli("validate", str(out)).returncode == 0


def test_libvirt_qemu_commandline_with_a_line_break_is_refused(tmp_path):
    xml = tmp_path / "domain.xml"
    xml.write_text(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>vm</name>"
        "<memory unit='MiB'>256</memory><qemu:commandline><qemu:arg value='-name'/>"
        f"<qemu:arg value='x{HIDDEN.replace(chr(10), '&#10;').replace(chr(34), '&quot;')}'/>"
        "</qemu:commandline></domain>"
    )
    result = cli("import", "--from-libvirt", str(xml))
    assert (
        result.returncode == 2 and "line break" in result.stderr and "domain.xml" in result.stderr
    ), result.stderr
    _one_paragraph(result.stderr)


# ---- item 13: a definition-relative qemu needs the user's opt-in, git checkout or not ----------


def _fake_qemu(directory) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "ran"
    fake = directory / "qemu-system-x86_64"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(0o755)
    return str(marker)


@pytest.mark.parametrize(
    "written",
    ["../tools/qemu-system-x86_64", "bin/qemu-system-x86_64", "./../tools/qemu-system-x86_64"],
)
def test_a_qemu_reached_from_the_definition_needs_the_opt_in_outside_git(written, tmp_path):
    """A tarball or CI artifact: no .git, so the tree is the definition's directory; `../` and a
    committed symlink lead out of it."""
    marker = _fake_qemu(tmp_path / "tools")
    project = tmp_path / "defs"
    project.mkdir()
    os.symlink(tmp_path / "tools", project / "bin")
    path = project / "m.toml"
    path.write_text(f'[machines.vm]\nqemu = "{written}"\nmemory = "64M"\n')
    state = ["--state-dir", str(tmp_path / "state")]
    for command in (
        ["validate", str(path)],
        ["up", str(path), *state],
        ["restart", str(path), *state],
        ["run", str(path), "--", "true"],
    ):
        result = cli(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "m.toml:2" in result.stderr and "machines.vm.qemu" in result.stderr
        assert "--allow-local-qemu" in result.stderr
        _one_paragraph(result.stderr)
    assert not os.path.exists(marker), "the shipped qemu ran"
    assert cli("validate", str(path), "--allow-local-qemu").returncode == 0, "the user may allow it"
    assert cli("validate", str(path), env={"QEMUSPEC_ALLOW_LOCAL_QEMU": "1"}).returncode == 0


def test_a_system_qemu_by_name_or_absolute_path_needs_no_opt_in(qemu_bin, tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(
        f'[machines.a]\nmemory = "64M"\n[machines.b]\nqemu = "{qemu_bin}"\nmemory = "64M"\n'
    )
    result = cli("validate", str(path))
    assert result.returncode == 0, result.stderr


# ---- item 14: host paths outside the tree are listed; shares, writable disks, devices opted in ---


def _outside(tmp_path):
    """A project directory and, beside it, host files the definition names: a secret, a directory."""
    project = tmp_path / "project"
    project.mkdir()
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$hash\n")
    (tmp_path / "home").mkdir()
    return project, str(secret), str(tmp_path / "home")


@pytest.mark.parametrize(
    "table, field",
    [
        ('[[machines.vm.disks]]\nfile = "{secret}"\nformat = "raw"\n', "machines.vm.disks[0].file"),
        ('[[machines.vm.shares]]\nsource = "/"\ntag = "root"\n', "machines.vm.shares[0].source"),
        (
            '[[machines.vm.shares]]\nsource = "{home}"\ntag = "home"\nreadonly = true\n',
            "machines.vm.shares[0].source",
        ),
        (
            '[[machines.vm.disks]]\nfile = "/dev/zero"\nformat = "raw"\nreadonly = true\n',
            "machines.vm.disks[0].file",
        ),
        ('[[machines.vm.disks]]\nfile = "link.img"\nformat = "raw"\n', "machines.vm.disks[0].file"),
        (
            '[[machines.vm.disks]]\nfile = "../made-outside.qcow2"\nformat = "qcow2"\nsize = "16M"\n',
            "machines.vm.disks[0].file",
        ),
    ],
)
def test_shares_writable_disks_and_devices_outside_the_tree_need_the_users_opt_in(
    table, field, tmp_path
):
    project, secret, home = _outside(tmp_path)
    os.symlink(secret, project / "link.img")  # a committed symlink out of the tree
    path = project / "m.toml"
    path.write_text('[machines.vm]\nmemory = "64M"\n' + table.format(secret=secret, home=home))
    for command in (["validate"], ["up", "--no-probe", "--state-dir", str(tmp_path / "state")]):
        result = cli(*command, str(path))
        assert result.returncode == 2, (command, result.stderr)
        assert (
            "m.toml" in result.stderr
            and f"{field}:" in result.stderr
            and "--allow-host-paths" in result.stderr
        )
        assert "Traceback" not in result.stderr
    assert (
        open(secret).read() == "root:$6$hash\n" and not (tmp_path / "made-outside.qcow2").exists()
    )
    assert not (tmp_path / "state").exists(), "up started nothing"
    assert cli("validate", str(path), "--allow-host-paths").returncode == 0, "the user may allow it"
    assert cli("validate", str(path), env={"QEMUSPEC_ALLOW_HOST_PATHS": "1"}).returncode == 0


def test_a_definition_cannot_opt_itself_in(tmp_path):
    project, secret, _home = _outside(tmp_path)
    path = project / "m.toml"
    path.write_text(
        '[vars]\nQEMUSPEC_ALLOW_HOST_PATHS = "1"\nallow_host_paths = true\n'
        f'[machines.vm]\nmemory = "64M"\n[[machines.vm.disks]]\nfile = "{secret}"\nformat = "raw"\n'
    )
    assert cli("validate", str(path)).returncode == 2


def test_validate_render_and_up_list_every_host_path_outside_the_tree(qemu_bin, tmp_path):
    project, secret, home = _outside(tmp_path)
    (tmp_path / "user-data").write_text("#cloud-config\n")
    (project / "inside.img").write_text("")
    path = project / "m.toml"
    path.write_text(
        '[machines.vm]\nmemory = "64M"\n'
        f'kernel = "{secret}"\ninitrd = "../shadow"\ncdrom = ["{secret}"]\n'
        f'[[machines.vm.disks]]\nfile = "{secret}"\nformat = "raw"\nreadonly = true\n'
        '[[machines.vm.disks]]\nfile = "inside.img"\nformat = "raw"\n'
        f'[[machines.vm.shares]]\nsource = "{home}"\ntag = "h"\n'
        f'[machines.vm.cloud_init]\nuser_data_file = "../user-data"\n'
        f'[[machines.vm.objects]]\ntype = "memory-backend-file"\nid = "m0"\n'
        f'options = {{ mem-path = "{home}", size = "64M" }}\n'
    )
    for command in (
        ["validate", "--allow-host-paths"],
        ["render"],
        ["up", "--allow-host-paths", "--state-dir", str(tmp_path / "state"), "--timeout", "1"],
    ):
        result = cli(*command, str(path), timeout=120)
        listed = result.stderr
        for field, where in [
            ("kernel", secret),
            ("initrd", secret),
            ("cdrom.0", secret),
            ("disks.0.file", secret),
            ("shares.0.source", home),
            ("cloud_init.user_data_file", str(tmp_path / "user-data")),
            ("objects.0.options.mem-path", home),
        ]:
            assert any(field in line and where in line for line in listed.splitlines()), (
                command,
                field,
                listed,
            )
        assert "inside.img" not in listed, "paths inside the tree are not listed"
        if command[0] == "up":
            cli("down", str(path), "--state-dir", str(tmp_path / "state"))


# ---- item 18: cloud-init source files are regular files of bounded size ------------------------


@pytest.mark.parametrize("which", ["fifo", "/dev/zero", "big"])
def test_a_cloud_init_file_that_is_no_regular_file_is_refused_at_validate(which, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "big").write_bytes(b"#" * (1024 * 1024 + 1))
    path = tmp_path / "m.toml"
    path.write_text(
        f'[machines.vm]\nmemory = "64M"\n[machines.vm.cloud_init]\nuser_data_file = "{which}"\n'
    )
    for command in (
        ["validate", "--allow-host-paths"],
        ["up", "--no-probe", "--state-dir", str(tmp_path / "state")],
    ):
        result = cli(
            *command, str(path), timeout=20
        )  # a FIFO read would hang: the deadline fails the test instead
        assert result.returncode == 2, result.stderr
        assert "machines.vm.cloud_init.user_data_file" in result.stderr
        assert "not a regular file" in result.stderr or "at most" in result.stderr
        _one_paragraph(result.stderr)


def test_the_seed_builder_never_blocks_on_a_fifo_put_there_after_validate(tmp_path):
    from qemuspec.spec.limits import read_source_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        read_source_text(str(fifo))
    with pytest.raises(ValueError, match="not a regular file"):
        read_source_text("/dev/zero")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_file_that_also_uses_libvirt_gets_the_same_checks_on_up(tmp_path):
    """`up` handed a file with any `host =` machine to the libvirt path before any check: its local
    machines ran a shipped qemu, and its machines got host paths, with no opt-in."""
    marker = _fake_qemu(tmp_path / "tools")
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$hash\n")
    path = tmp_path / "m.toml"
    path.write_text(
        f'[machines.far]\nhost = "{UNREACHABLE}"\nmemory = "64M"\n'
        f'[[machines.far.disks]]\nfile = "{secret}"\nformat = "raw"\n\n'
        '[machines.near]\nqemu = "tools/qemu-system-x86_64"\nmemory = "64M"\n'
    )
    project = tmp_path / "project"
    project.mkdir()
    moved = project / "m.toml"
    os.symlink(tmp_path / "tools", project / "tools")
    path.rename(moved)
    result = cli("up", str(moved), "--no-probe", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "machines.near.qemu" in result.stderr and "--allow-local-qemu" in result.stderr, (
        result.stderr
    )
    assert (
        "machines.far.disks[0].file" in result.stderr and "--allow-host-paths" in result.stderr
    ), result.stderr
    assert not os.path.exists(marker) and secret.read_text() == "root:$6$hash\n"


def test_the_ssh_hop_reads_the_keyfile_as_libvirt_does():
    """Probes and `qemuspec ssh` reach a libvirt host through ssh with the URI's keyfile: split on ;
    too, so the hop gets the same key libvirt uses and never a value holding the rest of the query."""
    from qemuspec.backends.libvirt_reach import Reach

    hop = Reach("qemu+ssh://ci@h:2222/system?keyfile=%2Fk%2Fid;no_verify=1").hop
    assert hop is not None and hop[hop.index("-i") + 1] == "/k/id" and hop[-1] == "ci@h"
