"""The libvirt backend: the same commands, with a real libvirtd (and, for the remote path, a real sshd
and a session libvirtd of another user) underneath. Guests run under TCG (domain type qemu)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import fail_or_skip
from qemuspec.errors import SpecError
from qemuspec.libvirt import domain_xml
from qemuspec.spec.models import Machine

REMOTE_USER = "qsremote"

# Each Machine field reaching the domain XML (or refused by name) and libvirt's plan: tests/samples.py,
# checked in tests/test_typed_options.py with every other layer.
# Option maps on the parts of a machine: each must reach the XML, or be refused naming its field.
NESTED = {
    "disks.0.options": {"disks": [{"file": "/d.img", "options": {"aio": "native"}}]},
    "disks.0.options cache": {"disks": [{"file": "/d.img", "options": {"cache": "none"}}]},
    "disks.0.device_options": {
        "disks": [{"file": "/d.img", "device_options": {"logical_block_size": 4096}}]
    },
    "nics.0.options": {"nics": [{"type": "user", "options": {"ipv6": False}}]},
    "nics.0.device_options": {"nics": [{"type": "user", "device_options": {"romfile": ""}}]},
    "nics.0.mac": {"nics": [{"type": "user", "mac": "52:54:00:12:34:56"}]},
    "shares.0.options": {
        "shares": [{"source": "/s", "tag": "s", "options": {"multidevs": "remap"}}]
    },
    "display.options": {"display": {"type": "vnc", "options": {"lossy": True}}},
    "disks.0.interface nvme": {"disks": [{"file": "/d.img", "interface": "nvme"}]},
    "disks.0.id": {"disks": [{"file": "/d.img", "id": "mydisk"}]},
    "disks.0.id none": {"disks": [{"file": "/d.img", "id": "mydisk", "interface": "none"}]},
}


# Where each field of a machine's parts goes in the export. A new field fails the test below until it
# is placed here (and, for an option map or an id, given a NESTED sample above).
PARTS = {
    "Disk": {
        "file": "source/upload",
        "format": "driver type",
        "size": "volume",
        "backing": "volume backingStore",
        "backing_format": "volume backingStore",
        "interface": "target bus / commandline",
        "readonly": "readonly",
        "serial": "serial",
        "options": "NESTED",
        "device_options": "NESTED",
        "id": "NESTED",
        "image": "refused",
    },
    "NIC": {
        "type": "interface type / commandline",
        "network": "refused",
        "address": "cloud-init seed",
        "model": "model",
        "mac": "NESTED",
        "forwards": "commandline",
        "listen": "commandline",
        "connect": "commandline",
        "mcast": "commandline",
        "ifname": "commandline",
        "bridge": "source bridge",
        "options": "NESTED",
        "device_options": "NESTED",
        "outbound": "interface type user (else commandline with restrict=on)",
    },
    "Share": {
        "type": "filesystem driver",
        "source": "source dir",
        "tag": "target dir",
        "readonly": "readonly",
        "security_model": "accessmode",
        "options": "NESTED",
    },
    "Display": {
        "type": "graphics",
        "listen": "graphics listen",
        "port": "graphics port",
        "vga": "video model",
        "options": "NESTED",
        "unauthenticated": "graphics listen (a TCP display without it is refused)",
    },
    "Firmware": {"type": "loader", "code": "loader", "vars": "nvram template"},
    "Device": {"driver": "commandline", "id": "commandline", "options": "commandline"},
    "QomObject": {"type": "commandline", "id": "commandline", "options": "commandline"},
    "Forward": {"host": "hostfwd", "guest": "hostfwd", "protocol": "hostfwd", "address": "hostfwd"},
    "CloudInit": {
        "user_data": "seed",
        "user_data_file": "seed",
        "meta_data": "seed",
        "network_config": "seed",
        "network_config_file": "seed",
    },
}


def test_every_field_of_a_machines_parts_is_placed():
    from qemuspec.spec import models

    for part, placed in PARTS.items():
        fields = set(getattr(models, part).model_fields)
        assert fields == set(placed), (
            f"{part}: fields the libvirt export does not place: {sorted(fields - set(placed))}"
        )


def _xml_or_refusal(fields: dict) -> str:
    machine = (
        Machine.model_validate({"kernel": "/k", **fields})
        if "kernel" not in fields
        else Machine.model_validate(fields)
    )
    try:
        return domain_xml(machine, "m")
    except SpecError as exc:
        return f"REFUSED {exc}"


def test_every_option_map_of_a_part_reaches_the_domain_or_is_refused():
    for label, fields in NESTED.items():
        out = _xml_or_refusal(fields)
        base = _xml_or_refusal(
            {
                k: [
                    {
                        kk: vv
                        for kk, vv in v[0].items()
                        if kk not in ("options", "device_options", "mac", "interface", "id")
                    }
                ]
                if isinstance(v, list)
                else {"type": v["type"]}
                for k, v in fields.items()
            }
        )
        assert out != base, f"{label} changed nothing in the domain XML and was not refused"
        if out.startswith("REFUSED"):
            assert f"machines.m.{label.split()[0]}" in out, out


def test_unsupported_field_is_a_clear_error_with_exit_2(tmp_path):
    from test_cli import cli

    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nhost = "qemu:///system"\ndefaults = true\n')
    result = cli("render", str(path), "--format", "libvirt")
    assert result.returncode == 2, result.stderr
    assert "machines.m.defaults" in result.stderr and "Traceback" not in result.stderr


def test_the_local_path_never_imports_libvirt(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "64M"\n')
    code = (
        "import sys; from qemuspec.cli.main import main; "
        f"rc = [main(['status', {str(path)!r}]), main(['plan', {str(path)!r}])]; "
        "print('LOADED' if 'libvirt' in sys.modules else 'CLEAN')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "QEMUSPEC_CONNECT": ""},
    )
    assert out.stdout.strip().endswith("CLEAN"), out.stdout + out.stderr


def test_a_bad_connect_uri_is_a_usage_error(tmp_path):
    from test_cli import cli

    path = tmp_path / "m.toml"
    path.write_text('[machines.m]\nmemory = "64M"\n')
    result = cli("status", str(path), "--connect", "http://example/")
    assert result.returncode == 2 and "not a libvirt QEMU URI" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ext:///system?command=/bin/sh",
        "qemu+ssh://h/system?command=/tmp/evil",
        "qemu+ssh://h/system?netcat=/tmp/evil",
        "qemu+ssh://-oProxyCommand=touch${IFS}/tmp/x/system",
        "qemu+ssh://u;id@h/system",
        "xen:///system",
        "qemu:///system extra",
    ],
)
def test_a_host_uri_cannot_name_a_program(uri, tmp_path):
    """libvirt runs programs a URI names, and hands its host to ssh: the definition may name neither."""
    from test_cli import cli

    path = tmp_path / "m.toml"
    path.write_text(f'[machines.m]\nhost = "{uri}"\n')
    result = cli("validate", str(path))
    assert (
        result.returncode == 2
        and "host" in result.stderr
        and "not a libvirt QEMU URI" in result.stderr
    ), result.stderr
    assert not os.path.exists("/tmp/x") and not os.path.exists("/tmp/evil")


def test_host_uris_users_write_are_accepted(tmp_path):
    from test_cli import cli

    path = tmp_path / "m.toml"
    path.write_text(
        "".join(
            f'[machines.m{i}]\nhost = "{uri}"\n'
            for i, uri in enumerate(
                [
                    "qemu:///system",
                    "qemu:///session",
                    "qemu+ssh://ci@ci-02.example.org/system",
                    "qemu+ssh://ci@10.0.0.2:2222/system?keyfile=/k&no_verify=1",
                    "qemu+tls://[fd00::2]/system",
                    "qemu+libssh2://u@h/session?known_hosts=/kh&sshauth=privkey",
                ]
            )
        )
    )
    result = cli("validate", str(path))
    assert result.returncode == 0, result.stderr


# ---- real libvirt -----------------------------------------------------------------------------


def _wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s")
        time.sleep(0.1)  # a daemon's socket appears with no notification we can wait on


@pytest.fixture(scope="module")
def system_libvirtd(system_libvirtd):
    """conftest's system libvirtd, for the backend: which also needs the Python binding."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        fail_or_skip("libvirt-python is missing: pip install -e '.[libvirt]'")
    return system_libvirtd


def _domains(uri: str) -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", uri, "list", "--all", "--name"], capture_output=True, text=True
    )
    return [line for line in out.stdout.split() if line]


def run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def machine_toml(guest: dict, name: str, host: str | None = None, extra: str = "") -> str:
    return f"""
[machines.{name}]
{f'host = "{host}"' if host else ""}
accel = "tcg"
memory = "192M"
kernel = "{guest["kernel"]}"
initrd = "{guest["initrd"]}"
cmdline = "console=ttyS0 quiet"
rng = true
agent = true
stop_timeout = "15s"
{extra}
[machines.{name}.ready]
serial = "{guest["marker"]}"
agent = true
timeout = "120s"
[[machines.{name}.nics]]
type = "user"
forwards = [{{ host = 0, guest = 22 }}]
device_options = {{ romfile = "" }}
"""


def never_ready(guest: dict, name: str, timeout: str) -> str:
    """A machine whose readiness pattern the guest never prints, within ``timeout``."""
    return machine_toml(guest, name).replace(
        f'serial = "{guest["marker"]}"\nagent = true\ntimeout = "120s"',
        f'serial = "a line this guest never prints"\ntimeout = "{timeout}"',
    )


def _cleanup(uri: str, names: list[str], env: dict | None = None) -> None:
    """Whatever a failed test left: destroy and undefine its domains (by their test-unique names)."""
    for name in names:
        subprocess.run(
            ["virsh", "-c", uri, "destroy", name],
            capture_output=True,
            env={**os.environ, **(env or {})},
        )
        subprocess.run(
            ["virsh", "-c", uri, "undefine", name, "--nvram"],
            capture_output=True,
            env={**os.environ, **(env or {})},
        )


def test_two_machines_through_the_system_libvirtd(system_libvirtd, guest, tmp_path):
    from qemuspec import img

    uri = system_libvirtd
    tag = os.getpid()
    a, b = f"qsa{tag}", f"qsb{tag}"
    base = tmp_path / "base.qcow2"
    img.create(str(base), "16M")
    disk = f'[[machines.{a}.disks]]\nfile = "{tmp_path}/{a}.qcow2"\nformat = "qcow2"\nbacking = "{base}"\n'
    text = machine_toml(guest, a, extra=disk) + machine_toml(guest, b, extra='restart = "always"')
    path = tmp_path / "two.toml"
    path.write_text(text)
    env = {"QEMUSPEC_CONNECT": uri}
    follower = None
    try:
        up = run("up", str(path), "--json", env=env)
        assert up.returncode == 0, up.stderr
        outcomes = {o["name"]: o for o in json.loads(up.stdout)}
        assert outcomes[a]["action"] == outcomes[b]["action"] == "started", outcomes
        assert outcomes[a]["ports"] and outcomes[a]["ports"][0]["guest"] == 22, (
            "forwards read back through the monitor"
        )

        status = run("status", str(path), "--json", env=env)
        rows = {r["name"]: r for r in json.loads(status.stdout)}
        assert rows[a]["state"] == rows[b]["state"] == "running" and rows[a]["host"] == uri, rows
        table = run("status", str(path), env=env).stdout
        assert "HOST" in table and "qemu:///system" in table

        dumped = subprocess.run(
            ["virsh", "-c", uri, "dumpxml", a], capture_output=True, text=True
        ).stdout
        assert f'file="{path}"' in dumped.replace("'", '"') and "qemuspec:owner" in dumped, (
            "the owner record names the file"
        )
        assert "/var/lib/libvirt/images/qemuspec/" in dumped and f"{a}-disk0.qcow2" in dumped, (
            "the overlay is a volume"
        )
        vol = subprocess.run(
            ["virsh", "-c", uri, "vol-dumpxml", "--pool", "qemuspec", f"{a}-disk0.qcow2"],
            capture_output=True,
            text=True,
        ).stdout
        assert "<backingStore>" in vol and "media-" in vol, (
            "the overlay's base was uploaded as a volume"
        )

        hello = run(
            "exec",
            "-F",
            str(path),
            a,
            "--",
            "/bin/sh",
            "-c",
            "echo hello from $(hostname); exit 3",
            env=env,
        )
        assert hello.returncode == 3 and "hello from" in hello.stdout, hello.stderr
        src = tmp_path / "payload"
        src.write_bytes(os.urandom(70000))
        assert run("cp", "-F", str(path), str(src), f"{b}:/tmp/payload", env=env).returncode == 0
        back = tmp_path / "back"
        assert run("cp", "-F", str(path), f"{b}:/tmp/payload", str(back), env=env).returncode == 0
        assert back.read_bytes() == src.read_bytes()

        qmp = run("qmp", "-F", str(path), b, "query-status", "--json", env=env)
        assert json.loads(qmp.stdout)["status"] == "running", qmp.stderr
        assert run("pause", "-F", str(path), b, env=env).returncode == 0
        assert {
            r["name"]: r["state"]
            for r in json.loads(run("status", str(path), "--json", env=env).stdout)
        }[b] == "paused"
        assert run("resume", "-F", str(path), b, env=env).returncode == 0
        logs = run("logs", "-F", str(path), a, env=env)
        assert logs.returncode == 0 and guest["marker"] in logs.stdout, logs.stderr

        # restart = "always" is libvirt's on_poweroff = restart: a guest that powers off boots again
        def boot_id():
            out = run(
                "exec",
                "-F",
                str(path),
                b,
                "--",
                "/bin/cat",
                "/proc/sys/kernel/random/boot_id",
                env=env,
                timeout=60,
            )
            return out.stdout.strip() if out.returncode == 0 else None

        first = boot_id()
        assert first, "the agent answers before the power-off"
        assert (
            run(
                "exec",
                "-F",
                str(path),
                b,
                "--",
                "/bin/sh",
                "-c",
                "(sleep 1; poweroff -f) >/dev/null 2>&1 &",
                env=env,
            ).returncode
            == 0
        )
        deadline = time.monotonic() + 90
        while boot_id() in (
            first,
            None,
        ):  # each try is an agent round trip that fails fast while the guest reboots
            assert time.monotonic() < deadline, "the guest did not come back after powering off"
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qemuspec.cli.main",
                "logs",
                "-F",
                str(path),
                "-f",
                "-n",
                "100000",  # the log so far too (-f alone starts at the end)
                a,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )

        # a live change through libvirt: the restart policy by setLifecycleAction, same domain
        def domid() -> str:
            out = subprocess.run(["virsh", "-c", uri, "domid", b], capture_output=True, text=True)
            return out.stdout.strip()

        before = domid()
        text = text.replace('restart = "always"', 'restart = "on-failure"')
        path.write_text(text)
        [step] = [
            s
            for s in json.loads(run("plan", str(path), "--json", env=env).stdout)
            if s["name"] == b
        ]
        assert step["class"] == "live" and step["changes"][0]["field"] == "restart", step
        live = run("up", str(path), "--no-restart", "--json", env=env)
        assert live.returncode == 0, live.stdout + live.stderr
        assert {o["name"]: o["action"] for o in json.loads(live.stdout)}[b] == "changed"
        assert domid() == before, "the domain was not restarted"
        xml = subprocess.run(
            ["virsh", "-c", uri, "dumpxml", b], capture_output=True, text=True
        ).stdout
        assert "<on_poweroff>destroy</on_poweroff>" in xml, "on-failure: a power-off stays off"
        assert run("plan", str(path), env=env).returncode == 0, "the next plan is empty"

        path.write_text(text.replace('memory = "192M"', 'memory = "224M"', 1))
        plan = run("plan", str(path), env=env)
        assert plan.returncode == 3, "plan exits 3 when up would change something: " + plan.stderr
        assert f"{a}: restart" in plan.stdout and f"{b}: up to date" in plan.stdout, plan.stdout
        changed = [
            line.strip()
            for line in plan.stdout.splitlines()
            if line.strip()[:1] in "+-" and not line.strip().startswith("@@")
        ]
        assert changed == ["-memory: 192 MiB", "+memory: 224 MiB"], (
            "the diff against libvirt's XML is the change, no noise: " + plan.stdout
        )

        down = run("down", str(path), "--purge", "--json", env=env)
        assert down.returncode == 0, down.stderr
        assert {o["name"]: o["action"] for o in json.loads(down.stdout)} == {
            a: "stopped",
            b: "stopped",
        }
        assert {o["name"]: o["detail"] for o in json.loads(down.stdout)}[b] == "ACPI powerdown"
        assert a not in _domains(uri) and b not in _domains(uri), "nothing left defined"
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0 and guest["marker"] in out, (
            "logs -f printed the log and ended with the machine: " + err
        )
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        _cleanup(uri, [a, b])
        run("down", str(path), "--purge", env=env)


def test_a_domain_qemuspec_did_not_define_is_left_alone(system_libvirtd, tmp_path):
    uri = system_libvirtd
    name = f"qsforeign{os.getpid()}"
    xml = tmp_path / "d.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"
    )
    subprocess.run(["virsh", "-c", uri, "define", str(xml)], check=True, capture_output=True)
    try:
        path = tmp_path / "f.toml"
        path.write_text(f'[machines.{name}]\nmemory = "64M"\naccel = "tcg"\n')
        for command in (["up", str(path)], ["down", str(path)]):
            result = run(*command, "--connect", uri)
            assert result.returncode == 1 and "qemuspec did not define it" in result.stderr, (
                result.stderr
            )
        assert name in _domains(uri)
        assert "not ours" in run("status", str(path), "--connect", uri).stdout
    finally:
        subprocess.run(["virsh", "-c", uri, "undefine", name], capture_output=True)


# ---- ssh: the remote code path -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 with its own host key, accepting one key the test made; and an `ssh`
    wrapper (first on PATH for qemuspec) that uses that key and a private known_hosts."""
    if os.geteuid() != 0:
        fail_or_skip("the ssh tests start an sshd and need root")
    if not os.path.exists("/usr/sbin/sshd"):
        fail_or_skip("sshd is missing (Debian: openssh-server)")
    work = tempfile.mkdtemp(prefix="qemuspec-sshd-")
    os.chmod(work, 0o755)
    for key in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{work}/{key}"], check=True
        )
    shutil.copy(f"{work}/client.pub", f"{work}/authorized_keys")
    os.chmod(f"{work}/authorized_keys", 0o644)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(
        [
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            "/dev/null",
            "-p",
            str(port),
            "-o",
            "ListenAddress=127.0.0.1",
            "-h",
            f"{work}/host",
            "-o",
            f"AuthorizedKeysFile={work}/authorized_keys",
            "-o",
            "StrictModes=no",
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            "UsePAM=no",
            "-o",
            f"PidFile={work}/sshd.pid",
        ],
        stderr=open(f"{work}/sshd.log", "w"),
    )
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir)
    with open(f"{work}/ssh_config", "w") as f:
        f.write(
            f"Host *\n  IdentityFile {work}/client\n  IdentitiesOnly yes\n  UserKnownHostsFile {work}/known_hosts\n"
            "  StrictHostKeyChecking accept-new\n  BatchMode yes\n"
        )
    with open(f"{bindir}/ssh", "w") as f:
        f.write(f'#!/bin/sh\nexec /usr/bin/ssh -F {work}/ssh_config "$@"\n')
    os.chmod(f"{bindir}/ssh", 0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    _wait_for(
        lambda: (
            subprocess.run(
                ["ssh", "-p", str(port), "root@127.0.0.1", "true"],
                capture_output=True,
                env={**os.environ, **env},
            ).returncode
            == 0
        ),
        "sshd accepted the test key",
    )
    yield {"port": port, "env": env, "work": work}
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(work, ignore_errors=True)


def test_one_machine_through_qemu_ssh(system_libvirtd, sshd, guest, tmp_path):
    uri = f"qemu+ssh://root@127.0.0.1:{sshd['port']}/system"
    name = f"qsssh{os.getpid()}"
    path = tmp_path / "ssh.toml"
    seed = f'''
[machines.{name}.cloud_init]
user_data = """#cloud-config
ssh_authorized_keys:
  - {{{{ ssh_public_key }}}}
"""
'''
    path.write_text(
        machine_toml(guest, name, host=uri, extra=seed).replace(
            "agent = true\ntimeout", "agent = true\nssh = true\ntimeout"
        )
    )
    env = sshd["env"]
    try:
        up = run("up", str(path), env=env)
        assert up.returncode == 0 and f"{name}: started" in up.stdout, up.stderr
        login = run("ssh", "-F", str(path), name, "--", "cat", "/proc/cmdline", env=env)
        assert login.returncode == 0 and "console=ttyS0" in login.stdout, (
            "ssh through the forward on the libvirt host: " + login.stderr
        )
        row = json.loads(run("status", str(path), "--json", env=env).stdout)[0]
        assert row["state"] == "running" and row["host"] == uri, row
        out = run("exec", "-F", str(path), name, "--", "/bin/cat", "/proc/cmdline", env=env)
        assert out.returncode == 0 and "console=ttyS0" in out.stdout, out.stderr
        down = run("down", str(path), "--purge", env=env)
        assert down.returncode == 0 and f"{name}: stopped" in down.stdout, down.stderr
        assert name not in _domains("qemu:///system")
    finally:
        _cleanup("qemu:///system", [name])


@pytest.fixture(scope="module")
def session_libvirtd(sshd):
    """A second libvirt instance: the session libvirtd of another local user (created when missing),
    reached over ssh; it has a storage pool in that user's home, as its administrator would set up."""
    created = False
    try:
        info = pwd.getpwnam(REMOTE_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-p", "*", "-s", "/bin/sh", REMOTE_USER], check=True)
        info = pwd.getpwnam(REMOTE_USER)
        created = True
    home = info.pw_dir
    as_user = [
        "runuser",
        "-u",
        REMOTE_USER,
        "--",
        "env",
        "-i",
        f"HOME={home}",
        f"PATH={os.environ['PATH']}",
        f"USER={REMOTE_USER}",
    ]
    sock = f"{home}/.cache/libvirt/libvirt-sock"
    daemon = subprocess.Popen(
        as_user + ["libvirtd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: os.path.exists(sock), "the session libvirtd made its socket")
        uri = f"qemu+ssh://{REMOTE_USER}@127.0.0.1:{sshd['port']}/session"
        pool = f"{home}/images"
        for step in (
            ["pool-define-as", "qemuspec", "dir", "--target", pool],
            ["pool-build", "qemuspec"],
            ["pool-start", "qemuspec"],
        ):
            subprocess.run(
                as_user + ["virsh", "-c", "qemu:///session", *step], check=True, capture_output=True
            )
        yield uri
    finally:
        subprocess.run(
            as_user + ["virsh", "-c", "qemu:///session", "pool-destroy", "qemuspec"],
            capture_output=True,
        )
        subprocess.run(
            as_user + ["virsh", "-c", "qemu:///session", "pool-undefine", "qemuspec"],
            capture_output=True,
        )
        daemon.terminate()
        daemon.wait(15)
        for pidfile in (
            f"{home}/.cache/libvirt/virtlogd.pid",
        ):  # the session daemon spawned its own virtlogd
            try:
                os.kill(int(open(pidfile).read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        if created:
            subprocess.run(["userdel", "-r", REMOTE_USER], capture_output=True)


def test_two_hosts_in_one_file(system_libvirtd, sshd, session_libvirtd, guest, tmp_path):
    here, there = "qemu:///system", session_libvirtd
    tag = os.getpid()
    a, b = f"qshere{tag}", f"qsthere{tag}"
    path = tmp_path / "hosts.toml"
    path.write_text(machine_toml(guest, a, host=here) + machine_toml(guest, b, host=there))
    env = sshd["env"]
    try:
        up = run("up", str(path), env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        rows = {
            r["name"]: r for r in json.loads(run("status", str(path), "--json", env=env).stdout)
        }
        assert (rows[a]["state"], rows[a]["host"]) == ("running", here), rows
        assert (rows[b]["state"], rows[b]["host"]) == ("running", there), rows
        table = run("status", str(path), env=env).stdout
        assert f"{REMOTE_USER}@127.0.0.1:{sshd['port']}" in table and "qemu:///system" in table, (
            table
        )
        out = run("exec", "-F", str(path), b, "--", "/bin/echo", "there", env=env)
        assert out.stdout.strip() == "there", out.stderr
        down = run("down", str(path), "--purge", "--json", env=env)
        assert down.returncode == 0, down.stderr
        assert {o["name"]: o["action"] for o in json.loads(down.stdout)} == {
            a: "stopped",
            b: "stopped",
        }
        assert a not in _domains(here)
        assert b not in json.dumps(
            json.loads(run("status", str(path), "--json", env=env).stdout)
        ) or all(
            r["state"] == "stopped"
            for r in json.loads(run("status", str(path), "--json", env=env).stdout)
        )
    finally:
        _cleanup(here, [a])
        run("down", str(path), "--purge", env=env)


def test_a_machine_that_never_gets_ready_fails_with_its_console_and_is_removed(
    system_libvirtd, guest, tmp_path
):
    uri = system_libvirtd
    name = f"qsnever{os.getpid()}"
    path = tmp_path / "never.toml"
    path.write_text(never_ready(guest, name, "15s"))
    try:
        began = time.monotonic()
        up = run("up", str(path), "--connect", uri)
        assert up.returncode == 1, up.stdout + up.stderr
        assert (
            "did not show" in up.stderr
            and "last console lines" in up.stderr
            and "Traceback" not in up.stderr
        ), up.stderr
        assert time.monotonic() - began < 60, "the readiness timeout bounds up"
        assert name not in _domains(uri), "a failed start leaves nothing defined"
    finally:
        _cleanup(uri, [name])
        run("down", str(path), "--purge", "--connect", uri)


# ---- one file, both backends: what reconcile does above them (issue 21) ---------------------------


def test_a_mixed_file_gives_every_machine_an_owner_and_a_definition_record(
    system_libvirtd, guest, tmp_path
):
    """A libvirt machine beside a local one: the local machine is owned by the file (another file's
    plan leaves it alone) and both get definition.json, so plan says which fields changed."""
    uri = system_libvirtd
    tag = os.getpid()
    remote, local = f"qsmixl{tag}", f"qsmixh{tag}"
    path = tmp_path / "mixed.toml"
    path.write_text(machine_toml(guest, remote, host=uri) + machine_toml(guest, local))
    other = tmp_path / "other.toml"
    other.write_text(machine_toml(guest, local).replace('memory = "192M"', 'memory = "160M"'))
    try:
        up = run("up", str(path), "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        assert {o["name"]: o["action"] for o in json.loads(up.stdout)} == {
            remote: "started",
            local: "started",
        }
        rows = {r["name"]: r for r in json.loads(run("status", str(path), "--json").stdout)}
        assert rows[local]["state"] == "running" and rows[local]["file"] == str(path), rows[local]
        assert rows[remote]["state"] == "running" and rows[remote]["host"] == uri, rows[remote]
        for name in (remote, local):
            recorded = json.loads((tmp_path / ".qemuspec" / name / "definition.json").read_text())
            assert recorded["memory"] in (192, "192M") and recorded["host"] == (
                uri if name == remote else None
            ), recorded
        step = json.loads(run("plan", str(other), "--json").stdout)[0]
        assert step["action"] == "belongs to another file" and str(path) in step["detail"], step
        path.write_text(
            machine_toml(guest, remote, host=uri).replace('memory = "192M"', 'memory = "224M"')
            + machine_toml(guest, local)
        )
        steps = {s["name"]: s for s in json.loads(run("plan", str(path), "--json").stdout)}
        assert [c["field"] for c in steps[remote]["changes"]] == ["memory"], steps[remote]
        assert steps[local]["action"] == "up to date", steps[local]
        down = run("down", str(path), "--purge", "--json")
        assert down.returncode == 0 and {o["action"] for o in json.loads(down.stdout)} == {
            "stopped"
        }, down.stderr
    finally:
        _cleanup(uri, [remote])
        run("down", str(path), "--purge")


def test_status_shows_a_row_for_a_machine_whose_host_cannot_be_reached(tmp_path):
    try:
        import libvirt  # noqa: F401
    except ImportError:
        fail_or_skip("libvirt-python is missing: pip install -e '.[libvirt]'")
    import socket

    with (
        socket.socket() as s
    ):  # a port nothing listens on: libvirt's tcp transport is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "gone.toml"
    path.write_text(
        f'[machines.here]\nmemory = "64M"\n[machines.there]\nmemory = "64M"\n'
        f'host = "qemu+tcp://127.0.0.1:{port}/system"\n'
    )
    status = run("status", str(path), "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["name"]: r for r in json.loads(status.stdout)}
    assert rows["here"]["state"] == "stopped" and rows["here"]["host"] is None, rows
    assert rows["there"]["state"].startswith("unreachable: ") and len(rows["there"]["state"]) > len(
        "unreachable: "
    ), rows
    table = run("status", str(path))
    assert table.returncode == 0 and "unreachable: " in table.stdout and "HOST" in table.stdout, (
        table.stdout + table.stderr
    )


def test_the_libvirt_path_runs_preflight(system_libvirtd, guest, tmp_path):
    """A file `up` would upload that does not exist is found before anything is defined: exit 2, file:line."""
    name = f"qspre{os.getpid()}"
    path = tmp_path / "pre.toml"
    path.write_text(
        machine_toml(guest, name).replace(
            f'kernel = "{guest["kernel"]}"', 'kernel = "/nonexistent/vmlinuz"'
        )
    )
    try:
        up = run("up", str(path), "--connect", system_libvirtd)
        assert up.returncode == 2, up.stdout + up.stderr
        assert (
            f"machines.{name}.kernel" in up.stderr
            and "does not exist" in up.stderr
            and "Traceback" not in up.stderr
        )
        assert name not in _domains(system_libvirtd)
    finally:
        _cleanup(system_libvirtd, [name])


def test_up_warm_through_libvirt_is_refused_before_anything_starts(
    system_libvirtd, guest, tmp_path
):
    """--warm restores qemuspec's own saved state, which libvirt does not keep: one clear paragraph, exit 2."""
    name = f"qswarm{os.getpid()}"
    path = tmp_path / "warm.toml"
    path.write_text(machine_toml(guest, name))
    try:
        up = run("up", str(path), "--warm", "--connect", system_libvirtd)
        assert up.returncode == 2 and "warm start" in up.stderr and name in up.stderr, (
            up.stdout + up.stderr
        )
        assert name not in _domains(system_libvirtd), "nothing was defined"
        plan = run("plan", str(path), "--warm", "--connect", system_libvirtd)
        assert plan.returncode == 2 and "warm start" in plan.stderr, plan.stdout + plan.stderr
    finally:
        _cleanup(system_libvirtd, [name])
        run("down", str(path), "--purge", "--connect", system_libvirtd)


def test_up_timeout_bounds_readiness_through_libvirt(system_libvirtd, guest, tmp_path):
    name = f"qstime{os.getpid()}"
    path = tmp_path / "slow.toml"
    path.write_text(never_ready(guest, name, "600s"))
    try:
        began = time.monotonic()
        up = run("up", str(path), "--timeout", "10", "--connect", system_libvirtd, timeout=200)
        assert up.returncode == 1 and "did not show" in up.stderr, up.stdout + up.stderr
        assert time.monotonic() - began < 90, (
            "--timeout 10, not the definition's 600 s, bounds the wait"
        )
        assert name not in _domains(system_libvirtd)
    finally:
        _cleanup(system_libvirtd, [name])
        run("down", str(path), "--purge", "--connect", system_libvirtd)
