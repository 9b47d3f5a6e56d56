"""What a repository ships inside `.qemuspec/`, what another local user puts in a HOME or in /tmp, and
the modes of the images qemuspec makes (issue 20, items 4, 6, 12 and 19), with real qemu: each
test plants the attack as it is and checks that nothing happened."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from helpers import qemu_pids
from test_security import PAUSED, _free_port, _other_user, _write, cli, project  # noqa: F401 (project: a fixture)
from test_warm import warm_lab  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIX_PAUSED = PAUSED.replace('[machines.{name}.qmp]\ntransport = "tcp"\nport = {port}\n', "")
VICTIM_USER = "qemuspec-victim"


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _untrusted(state: str) -> list[str]:
    return glob.glob(os.path.join(state, "untrusted-*"))


# -- item 4: a committed .qemuspec/ is not qemuspec's ---------------------------------------------


def _attacker_credentials(where: str) -> str:
    """A complete TLS set made the way qemuspec makes one: its author holds the client key."""
    from qemuspec.runtime import tls

    return tls.ensure(os.path.join(where, "tls"))


CONNECT = textwrap.dedent("""
    import json, socket, ssl, sys
    tls_dir, port = sys.argv[1], int(sys.argv[2])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker does not care who answers, only whether it lets him in
    ctx.load_cert_chain(tls_dir + "/client-cert.pem", tls_dir + "/client-key.pem")
    got = ""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.settimeout(5)
                got = s.recv(4096).decode(errors="replace")
    except (OSError, ssl.SSLError) as exc:
        got = "refused: " + type(exc).__name__
    print(json.dumps(got))
""")


def test_planted_tls_credentials_are_never_used(project, tmp_path):
    other = _other_user()
    planted = _attacker_credentials(
        os.path.join(project, "attacker")
    )  # the author's copy, which he can read
    for base, dirs, files in os.walk(os.path.join(project, "attacker")):
        for name in dirs + files:
            os.chmod(os.path.join(base, name), 0o755 if name in dirs else 0o644)
    os.chmod(os.path.join(project, "attacker"), 0o755)
    state = os.path.join(project, ".qemuspec", "m")
    os.makedirs(state)
    shutil.copytree(planted, os.path.join(state, "tls"))
    for base, dirs, files in os.walk(
        os.path.join(state, "tls")
    ):  # committed files: readable by everyone
        for name in dirs + files:
            os.chmod(os.path.join(base, name), 0o755 if name in dirs else 0o644)
    os.chmod(os.path.join(state, "tls"), 0o755)
    planted_ca = open(os.path.join(planted, "ca-cert.pem")).read()
    path = _write(project, PAUSED.format(name="m", port=_free_port()))
    cli("up", path)
    [row] = json.loads(cli("status", path, "--json").stdout)
    port = int(row["qmp"].rsplit(":", 1)[1])
    # another local user with the repository's client key: qemu does not let it in
    script = os.path.join(project, "connect.py")
    with open(script, "w") as f:
        f.write(CONNECT)
    os.chmod(script, 0o644)
    [moved] = _untrusted(state)
    attempt = subprocess.run(
        [
            "setpriv",
            f"--reuid={other.pw_uid}",
            f"--regid={other.pw_gid}",
            "--clear-groups",
            sys.executable,
            script,
            planted,
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert attempt.returncode == 0, attempt.stderr
    assert "QMP" not in json.loads(attempt.stdout), "the planted client key opened the monitor"
    # qemu serves another CA's certificate: the one qemuspec made, outside the state directory
    from qemuspec.runtime import paths

    ours = os.path.join(paths.run_dir(state), "tls")
    assert open(os.path.join(ours, "ca-cert.pem")).read() != planted_ca
    argv = open(f"/proc/{row['pid']}/cmdline", "rb").read().decode().split("\0")
    assert any(f"dir={ours}," in a for a in argv) and not any(
        state + "/" in a and "tls" in a for a in argv
    )
    # nothing deleted: the planted files were moved aside, byte for byte
    assert open(os.path.join(moved, "tls", "ca-cert.pem")).read() == planted_ca
    assert not os.path.exists(os.path.join(state, "tls"))


def test_planted_public_key_symlink_never_reaches_the_seed(project, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("HOST-SECRET-4711 do not leak\n")
    root = os.path.join(project, ".qemuspec")
    os.makedirs(os.path.join(root, "ssh"))
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "attacker",
            "-f",
            os.path.join(root, "ssh", "id_ed25519"),
        ],
        check=True,
    )
    os.unlink(os.path.join(root, "ssh", "id_ed25519.pub"))
    os.symlink(secret, os.path.join(root, "ssh", "id_ed25519.pub"))
    os.makedirs(os.path.join(root, "m"))
    os.symlink(secret, os.path.join(root, "m", "id_ed25519.pub"))
    keys = 'ssh_authorized_keys: [\\"{{ ssh_public_key }}\\"]'
    text = (
        UNIX_PAUSED.format(name="m")
        + f'[machines.m.cloud_init]\nuser_data = "#cloud-config\\n{keys}\\n"\n'
    )
    path = _write(project, text)
    cli("up", path)
    with open(os.path.join(root, "m", "cidata.iso"), "rb") as f:
        seed = f.read()
    assert b"HOST-SECRET-4711" not in seed, "a host file went into the guest's seed"
    assert b"attacker" not in seed and b"ssh-ed25519 " in seed, (
        "the seed carries qemuspec's own key"
    )
    assert _mode(os.path.join(root, "m", "cidata.iso")) == 0o600


@pytest.mark.parametrize("when", ["committed", "added later"])
def test_planted_warm_symlink_is_never_written_or_deleted_through(warm_lab, guest, tmp_path, when):  # noqa: F811
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "key.json").write_text("the user's own file\n")
    path = warm_lab(guest, agent=False)
    state = tmp_path / ".qemuspec" / "w"
    if when == "committed":
        state.mkdir(parents=True)
        os.symlink(elsewhere, state / "warm")
        cli("up", path)
        assert (state / "warm").is_dir() and not (state / "warm").is_symlink(), (
            "saved in a directory of ours"
        )
        assert os.path.islink(_untrusted(str(state))[0] + "/warm"), (
            "the planted link was moved aside, not followed"
        )
    else:  # a pull adds the link to a directory qemuspec already owns
        cli("up", path)
        cli("down", path)
        shutil.rmtree(state / "warm")
        os.symlink(elsewhere, state / "warm")
        up = cli("up", path)
        assert "boot warm" not in up.stdout, "nothing was restored from the planted link"
        assert any(e["event"] == "QEMUSPEC_SAVE_FAILED" for e in _events(state)), (
            "the save refused the link"
        )
        cli("down", path)
    assert sorted(os.listdir(elsewhere)) == ["key.json"], "nothing was written there"
    assert (elsewhere / "key.json").read_text() == "the user's own file\n", (
        "nothing was deleted there"
    )


def _events(state) -> list[dict]:
    with open(os.path.join(state, "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_planted_log_symlinks_are_never_printed(project, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("SECRET-FILE-0815\n")
    state = os.path.join(project, ".qemuspec", "m")
    os.makedirs(state)
    path = _write(project, UNIX_PAUSED.format(name="m"))
    env = dict(os.environ, CI_TOKEN="SECRET-ENV-0916")
    for target in ("/proc/self/environ", str(secret)):
        for name in ("serial.log", "events.jsonl"):
            with_link = os.path.join(state, name)
            if os.path.lexists(with_link):
                os.unlink(with_link)
            os.symlink(target, with_link)
        for args in (
            ("logs", path),
            ("logs", path, "--events"),
            ("events", path),
            ("logs", path, "--json"),
        ):
            result = cli(*args, check=False, env=env)
            printed = result.stdout + result.stderr
            assert "SECRET-ENV-0916" not in printed and "SECRET-FILE-0815" not in printed, (
                args,
                target,
            )
            assert "Traceback" not in printed


def test_a_committed_created_record_deletes_nothing(project):
    """Even with the right device and inode, a `created.json` qemuspec did not write names nothing purge may delete."""
    thesis = os.path.join(project, "thesis.img")
    with open(thesis, "wb") as f:
        f.write(b"years of work")
    info = os.stat(thesis)
    state = os.path.join(project, ".qemuspec", "m")
    os.makedirs(state)
    with open(os.path.join(state, "created.json"), "w") as f:
        json.dump({"files": [{"path": thesis, "dev": info.st_dev, "ino": info.st_ino}]}, f)
    path = _write(
        project,
        UNIX_PAUSED.format(name="m")
        + '[[machines.m.disks]]\nfile = "thesis.img"\nformat = "raw"\n',
    )
    cli("down", path, "--purge", check=False)
    assert open(thesis, "rb").read() == b"years of work"


# -- item 12: images are 0600 ---------------------------------------------------------------------


def test_images_qemuspec_makes_are_private(project, guest, tmp_path):
    base = os.path.join(project, "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
    os.chmod(base, 0o644)
    text = UNIX_PAUSED.format(name="m") + textwrap.dedent("""
        [[machines.m.disks]]
        file = "fresh.qcow2"
        size = "16M"
        format = "qcow2"
        [[machines.m.disks]]
        file = "raw.img"
        size = "1M"
        format = "raw"
        [[machines.m.disks]]
        file = "overlay.qcow2"
        format = "qcow2"
        backing = "base.qcow2"
        backing_format = "qcow2"
        [machines.m.cloud_init]
        user_data = "#cloud-config\\n"
        """)
    path = _write(project, text)
    subprocess.run(
        [sys.executable, "-m", "qemuspec.cli.main", "up", path],
        check=True,
        capture_output=True,
        timeout=300,
        umask=0o022,
    )
    for name in ("fresh.qcow2", "raw.img", "overlay.qcow2", ".qemuspec/m/cidata.iso"):
        assert _mode(os.path.join(project, name)) == 0o600, name
    cli("down", path)
    # `run`: its throwaway overlays, looked at while the guest command waits
    from test_lifecycle import definition

    extra = (
        'agent = true\n[[machines.box.disks]]\nfile = "data.qcow2"\nformat = "qcow2"\nsize = "8M"\n'
    )
    box = definition(tmp_path, guest, {"box": {"extra": extra}})
    runs = tmp_path / "tmp"
    runs.mkdir()
    # the guest command keeps the machine up after "go" (run reads all of stdin first, so no `read`)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemuspec", "run", box, "--", "/bin/sh", "-c", "echo go; sleep 20"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        umask=0o022,
        env=dict(os.environ, TMPDIR=str(runs)),
    )
    try:
        assert proc.stdout.readline() == b"go\n", (
            proc.stderr.read() if proc.poll() is not None else "no output"
        )
        overlays = glob.glob(str(runs / "qemuspec-run-*" / "**" / "*.qcow2"), recursive=True)
        assert overlays and all(_mode(o) == 0o600 for o in overlays), {
            o: oct(_mode(o)) for o in overlays
        }
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_warm_overlays_are_private(warm_lab, guest, tmp_path):  # noqa: F811
    path = warm_lab(guest, agent=False)
    cli("up", path)
    state = tmp_path / ".qemuspec" / "w"
    assert _mode(tmp_path / "disk.qcow2") == 0o600
    assert (
        _mode(state / "warm" / "memory") == 0o600
        and _mode(state / "warm" / "live-disk0.qcow2") == 0o600
    )
    cli("down", path)
    assert "boot warm" in cli("up", path).stdout
    assert _mode(state / "warm" / "live-disk0.qcow2") == 0o600, "the restore's fresh overlay"


# -- item 6: caches under a HOME another user controls --------------------------------------------


def _home_of(other: pwd.struct_passwd, tmp_path) -> str:
    """A home directory tree the other user owns, the way sudo keeping HOME hands one to root."""
    home = tmp_path / "home-of-other"
    (home / ".cache" / "qemuspec" / "definitions").mkdir(parents=True)
    (home / ".cache" / "qemuspec" / "capabilities").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    for base, dirs, _ in os.walk(home):
        os.chown(base, other.pw_uid, other.pw_gid)
        os.chmod(base, 0o755)
    return str(home)


def _tree(path: str) -> dict[str, tuple]:
    out = {}
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(base, name)
            st = os.lstat(p)
            out[p] = (st.st_uid, st.st_size, st.st_mtime_ns)
    return out


def test_caches_in_a_home_another_user_controls_are_neither_used_nor_written(
    project, tmp_path, qemu_bin
):
    other = _other_user()
    home = _home_of(other, tmp_path)
    marker = tmp_path / "planted-qemu-ran"
    planted = tmp_path / "bin" / "qemu-system-x86_64"
    planted.parent.mkdir()
    planted.write_text(f'#!/bin/sh\ntouch {marker}\nexec {qemu_bin} "$@"\n')
    planted.chmod(0o755)
    path = _write(project, UNIX_PAUSED.format(name="m"))
    # The definitions entry root would look up, made honestly in a private cache, then given the
    # other user's qemu and put where the check-then-open race leaves root reading: a root-owned 0700
    # `definitions` directory under the other user's ~/.cache/qemuspec (which they can swap at will).
    private = tmp_path / "private-cache"
    cli("status", path, env=dict(os.environ, HOME=home, XDG_CACHE_HOME=str(private)))
    [entry] = glob.glob(str(private / "qemuspec" / "definitions" / "*.json"))
    body = open(entry).read().replace('"qemu-system-x86_64"', json.dumps(str(planted)))
    assert str(planted) in body
    definitions = os.path.join(home, ".cache", "qemuspec", "definitions")
    os.chown(definitions, 0, 0)
    os.chmod(definitions, 0o700)
    with open(os.path.join(definitions, os.path.basename(entry)), "w") as f:
        f.write(body)
    # the predictable temporary names of the old capabilities cache, pointing at a root-owned file
    from qemuspec.runtime import capabilities

    real = os.path.realpath(qemu_bin)
    st = os.stat(real)
    import hashlib

    key = hashlib.sha256(
        f"{capabilities.CACHE_VERSION}:{real}:{st.st_mtime_ns}:{st.st_size}".encode()
    ).hexdigest()[:24]
    caps_dir = os.path.join(home, ".cache", "qemuspec", "capabilities")
    victim = tmp_path / "root-owned"
    victim.write_text("root's file\n")
    for pid in range(os.getpid(), os.getpid() + 2000):
        os.symlink(victim, os.path.join(caps_dir, f"{key}.json.{pid}.tmp"))
    for name in os.listdir(caps_dir):
        os.lchown(os.path.join(caps_dir, name), other.pw_uid, other.pw_gid)
    before = _tree(home)
    root_env = {
        k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "XDG_STATE_HOME")
    }
    root_env["HOME"] = home
    cli(
        "validate", path, "--probe", env=root_env
    )  # a miss: the probe's answer is not written through the links
    assert victim.read_text() == "root's file\n"
    cli("up", path, env=root_env)
    assert not marker.exists(), "root ran the other user's qemu"
    [row] = json.loads(cli("status", path, "--json", env=root_env).stdout)
    assert row["state"] == "paused"
    assert _tree(home) == before, "nothing was written into the other user's tree"
    # a capabilities entry for the real qemu that says it has no q35: not believed
    fake = {
        "binary": real,
        "version": "0.0.0",
        "machines": ["evil"],
        "cpus": [],
        "devices": {},
        "objects": [],
        "accels": ["tcg"],
        "options": [],
        "parameters": {},
    }
    with open(os.path.join(caps_dir, f"{key}.json"), "w") as f:
        json.dump(fake, f)
    os.chown(os.path.join(caps_dir, f"{key}.json"), other.pw_uid, other.pw_gid)
    before = _tree(home)
    probe = cli("validate", path, "--probe", env=root_env, check=False)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    cli("down", path, env=root_env)
    assert not marker.exists()
    assert victim.read_text() == "root's file\n"
    assert _tree(home) == before, "nothing of root's was written into the other user's tree"


def test_a_cache_entry_that_breaks_the_cheap_rules_is_a_miss(tmp_path):
    """Even in a private cache, a decoded entry naming a non-qemu program is not used."""
    path = tmp_path / "lab.toml"
    path.write_text('[machines.m]\nmemory = "64M"\n')
    where = tmp_path / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(where))
    cli("status", str(path), env=env)
    [entry] = glob.glob(str(where / "qemuspec" / "definitions" / "*.json"))
    body = open(entry).read().replace('"qemu-system-x86_64"', '"/bin/sh"')
    with open(entry, "w") as f:
        f.write(body)
    result = cli("render", str(path), env=env)
    assert "/bin/sh" not in result.stdout and "qemu-system-x86_64" in result.stdout


# -- item 19: a squatted /tmp/qemuspec-UID --------------------------------------------------------


def _victim() -> pwd.struct_passwd:
    _other_user()  # root, or skip/fail as that helper says
    try:
        return pwd.getpwnam(VICTIM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                VICTIM_USER,
            ],
            check=True,
        )
        return pwd.getpwnam(VICTIM_USER)


@pytest.fixture
def squatted(qemu_bin):
    """A user whose /tmp/qemuspec-UID another user made first."""
    import pathlib
    import tempfile

    other, victim = _other_user(), _victim()
    squat = f"/tmp/qemuspec-{victim.pw_uid}"
    if os.path.lexists(squat):
        subprocess.run(["rm", "-rf", squat], check=True)
    os.mkdir(squat, 0o777)
    os.chown(squat, other.pw_uid, other.pw_gid)
    top = pathlib.Path(
        tempfile.mkdtemp(prefix="qemuspec-squat-", dir="/tmp")
    )  # the user can reach it
    os.chmod(top, 0o755)
    home = top / "victim-home"
    project_dir = top / "victim-project"
    for d in (home, project_dir):
        d.mkdir()
        os.chown(d, victim.pw_uid, victim.pw_gid)
        os.chmod(d, 0o700)
    path = project_dir / "lab.toml"
    path.write_text(UNIX_PAUSED.format(name="m"))
    os.chown(path, victim.pw_uid, victim.pw_gid)
    before = qemu_pids(project_dir)

    def run(*args, home_dir=str(home), xdg=None):
        env = {
            "PATH": os.environ["PATH"],
            "HOME": home_dir,
            "PYTHONPATH": ROOT,
            "QEMUSPEC_ACCEL": "tcg",
        }
        if xdg:
            env["XDG_RUNTIME_DIR"] = xdg
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={victim.pw_uid}",
                f"--regid={victim.pw_gid}",
                "--clear-groups",
                sys.executable,
                "-m",
                "qemuspec.cli.main",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=str(project_dir),
        )

    yield {"run": run, "path": str(path), "squat": squat, "home": str(home)}
    run("down", str(path))
    assert qemu_pids(project_dir) == before, "no qemu left behind"
    subprocess.run(["rm", "-rf", squat, str(top)], check=True)


def test_a_squatted_runtime_base_falls_back_to_a_private_one(squatted):
    run, path, squat = squatted["run"], squatted["path"], squatted["squat"]
    up = run("up", path, xdg=squat)  # an XDG_RUNTIME_DIR that is another user's is not used either
    assert up.returncode == 0, up.stdout + up.stderr
    assert os.listdir(squat) == [], "nothing of the machine is in the squatter's directory"
    status = run("status", path, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)[0]["state"] == "paused", (
        status.stdout + status.stderr
    )
    listed = run("ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == ["m"], listed.stdout
    sockets = glob.glob(
        os.path.join(squatted["home"], ".local", "state", "qemuspec", "run", "*", "qmp.sock")
    )
    assert sockets and all(_mode(s) == 0o600 for s in sockets)
    down = run("down", path)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert json.loads(run("status", path, "--json").stdout)[0]["state"] == "stopped"


def test_a_squatted_runtime_base_without_a_private_home_names_xdg_runtime_dir(squatted):
    up = squatted["run"]("up", squatted["path"], home_dir="/nonexistent")
    assert up.returncode == 1, up.stdout + up.stderr
    assert (
        "XDG_RUNTIME_DIR" in up.stderr
        and "Traceback" not in up.stderr
        and "--state-dir" not in up.stderr
    )
    assert os.listdir(squatted["squat"]) == []
