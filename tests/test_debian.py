"""A real distribution: Debian 12 built from Debian's archive (guest/debian.py: systemd, dbus, cloud-init,
openssh-server, qemu-guest-agent, its own kernel and initrd, root on a virtio disk), booted through
qemuspec as a user would. One machine serves the ordered checks of this module (a boot costs about a
minute under TCG): cloud-init's user and `ssh`, `ready.command` waiting for cloud-init, provision once
and `qemuspec provision`, `exec`/`cp`, an ACPI `down` that keeps what was written, `run`, and the same
image without dbus (no logind: nothing handles the power button) stopped through the guest agent with
its data on the disk. The image comes as a user's would: by URL and digest from a local HTTP server,
into a cache of this module's own, downloaded once for every boot of the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, fail_or_skip
from helpers import ImageServer, qemu_pids

pytestmark = [pytest.mark.guest, pytest.mark.qemu]

ENTRY = [sys.executable, "-m", "qemuspec"]
NO_DBUS = "systemd.mask=dbus.service systemd.mask=dbus.socket systemd.mask=systemd-logind.service"
FIGURES: dict[str, float] = {}
ENV: dict[str, str] = {}  # for every qemuspec command of the module: the image cache of its own
IMAGE = "debian-12-qemuspec.qcow2"


@pytest.fixture(scope="session")
def debian_image() -> dict:
    """The built Debian guest (cached outside the clone by its recipe's hash; built here when missing)."""
    sys.path.insert(0, os.path.join(ROOT, "guest"))
    try:
        import debian
    finally:
        sys.path.pop(0)
    missing = debian.missing_tools() + [
        t
        for t in ("qemu-system-x86_64", "debugfs")
        if shutil.which(t) is None
        and not os.path.exists(f"/usr/sbin/{t}")
        and not os.path.exists(f"/sbin/{t}")
    ]
    if missing:
        fail_or_skip(
            f"{', '.join(missing)} not installed (Debian: apt-get install mmdebstrap e2fsprogs qemu-utils "
            "qemu-system-x86; scripts/bootstrap does)"
        )
    began = time.monotonic()
    try:
        path = debian.ensure(log=print)
    except (
        SystemExit,
        subprocess.CalledProcessError,
        OSError,
    ) as exc:  # no route to Debian's archive
        fail_or_skip(f"cannot build the Debian guest: {exc}")
    with open(os.path.join(path, "build.json")) as f:
        FIGURES["build_s"] = json.load(f)["total_s"] if time.monotonic() - began > 5 else 0.0
    return {
        "kernel": os.path.join(path, "vmlinuz"),
        "initrd": os.path.join(path, "initrd.img"),
        "base": os.path.join(path, "root.qcow2"),
    }


@pytest.fixture(scope="module")
def debian_disk(debian_image, tmp_path_factory):
    """The machine's root disk table, in the directory its definition is to be written to: the built
    image served by a real HTTP server and named by URL and sha256, as a user names a distribution's
    cloud image; the machine's own qcow2 overlay (``overlay``, the file qemu writes) on the cached base,
    which stays unwritten. The cache is the module's own (XDG_CACHE_HOME), so the download is real."""
    tmp = tmp_path_factory.mktemp("debian")
    digest = hashlib.sha256()
    with open(debian_image["base"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    ENV["XDG_CACHE_HOME"] = str(tmp / "cache")
    with ImageServer() as server:
        server.files[IMAGE] = debian_image["base"]
        table = (
            f'[[machines.deb.disks]]\nfile = "root.qcow2"\n'
            f'image = {{ url = "{server.url(IMAGE)}", digest = "sha256:{digest.hexdigest()}" }}\n'
        )
        yield {
            "dir": tmp,
            "table": table,
            "overlay": str(tmp / "root.qcow2"),
            "server": server,
            "digest": "sha256:" + digest.hexdigest(),
        }
    ENV.clear()


DEFINITION = """
[vars]
extra = ""
stop = "40s"

[machines.deb]
memory = "1G"
cpus = 2
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "root=/dev/vda rw console=ttyS0 {{{{ extra }}}}"
agent = true
rng = true
stop_timeout = "{{{{ stop }}}}"
provision = ["echo provisioned >> /root/provision-count", "echo provision-output-$(wc -l < /root/provision-count)"]

{disk}
[machines.deb.cloud_init]
user_data = '''#cloud-config
users:
  - name: tester
    shell: /bin/bash
    ssh_authorized_keys: ["{{{{ ssh_public_key }}}}"]
'''

[machines.deb.ssh]
user = "tester"

[machines.deb.ready]
command = "cloud-init status --wait"
timeout = "400s"

[[machines.deb.nics]]
type = "user"
forwards = [{{ host = 0, guest = 22 }}]
"""


def q(*args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*ENTRY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def guest_exec(path: str, *command: str) -> str:
    return q("exec", path, "--", *command).stdout


def guest_disk(image: str, command: str, tmp: str) -> str:
    """debugfs ``command`` on the guest's ext4 root as qemu left it on the disk, read from the host (no boot)."""
    raw = os.path.join(tmp, "disk.raw")
    subprocess.run(["qemu-img", "convert", "-S", "4k", "-O", "raw", image, raw], check=True)
    try:
        debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
        return subprocess.run(
            [debugfs, "-R", command, raw], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(raw)


@pytest.fixture(scope="module")
def deb(debian_image, debian_disk) -> dict:
    """The machine, brought up cold once; stopped (whatever state the checks left it in) at the end."""
    tmp = debian_disk["dir"]
    path = tmp / "debian.toml"
    overlay = debian_disk["overlay"]
    path.write_text(
        DEFINITION.format(
            kernel=debian_image["kernel"], initrd=debian_image["initrd"], disk=debian_disk["table"]
        )
    )
    before = qemu_pids(str(tmp))
    began = time.monotonic()
    up = q("up", str(path))
    FIGURES["cold_up_to_ready_command_s"] = round(time.monotonic() - began, 1)
    state = {
        "path": str(path),
        "tmp": str(tmp),
        "overlay": overlay,
        "up": up,
        "server": debian_disk["server"],
        "digest": debian_disk["digest"],
    }
    yield state
    q("down", str(path), check=False)
    q(
        "down",
        str(path),
        env={"QEMUSPEC_VAR_extra": NO_DBUS, "QEMUSPEC_VAR_stop": "16s"},
        check=False,
    )
    assert qemu_pids(str(tmp)) == before
    print(f"\ndebian figures: {json.dumps(FIGURES)}")


def test_ready_command_waits_for_cloud_init_and_provision_ran_once(deb):
    """`up` returned only once `cloud-init status --wait` exited 0: right after it, cloud-init says done;
    the provision steps ran once, their output streamed by `up`."""
    status = guest_exec(deb["path"], "cloud-init", "status")
    assert "status: done" in status, status
    assert "provision-output-1" in deb["up"].stdout, deb["up"].stdout
    assert guest_exec(deb["path"], "cat", "/root/provision-count") == "provisioned\n"


def test_cloud_init_user_logs_in_with_qemuspecs_key(deb):
    result = q("ssh", deb["path"], "--", "id", "-un")
    assert result.stdout.strip() == "tester"
    shadow = guest_exec(deb["path"], "getent", "passwd", "tester")
    assert shadow.startswith("tester:") and shadow.rstrip().endswith("/bin/bash")


def test_exec_and_cp_both_ways(deb, tmp_path):
    assert "bookworm" in guest_exec(deb["path"], "cat", "/etc/os-release")
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(300_000))
    q("cp", deb["path"], str(blob), "deb:/root/blob")
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert guest_exec(deb["path"], "sha256sum", "/root/blob").split()[0] == digest
    back = tmp_path / "back"
    q("cp", deb["path"], "deb:/root/blob", str(back))
    assert back.read_bytes() == blob.read_bytes()


def test_plain_up_does_not_provision_again_and_provision_does(deb):
    again = q("up", deb["path"])
    assert "up to date" in again.stdout and "provision" not in again.stdout
    assert guest_exec(deb["path"], "cat", "/root/provision-count") == "provisioned\n"
    began = time.monotonic()
    rerun = q("provision", deb["path"])
    FIGURES["provision_s"] = round(time.monotonic() - began, 1)
    assert "provision-output-2" in rerun.stdout and "provision 2/2" in rerun.stdout, rerun.stdout
    assert guest_exec(deb["path"], "cat", "/root/provision-count") == "provisioned\n" * 2


def test_down_is_acpi_and_keeps_what_was_written(deb):
    guest_exec(
        deb["path"], "sh", "-c", "echo written-before-acpi-down > /root/kept"
    )  # no sync of its own
    began = time.monotonic()
    down = json.loads(q("down", deb["path"], "--json").stdout)
    FIGURES["acpi_down_s"] = round(time.monotonic() - began, 1)
    assert (
        down[0]["action"] == "stopped"
        and down[0]["detail"] == "ACPI powerdown"
        and not down[0]["forced"]
    ), down
    assert guest_disk(deb["overlay"], "cat /root/kept", deb["tmp"]) == "written-before-acpi-down\n"


def test_run_boots_throwaway_disks_and_exits_with_the_command(deb):
    began = time.monotonic()
    command = "cat /etc/debian_version; touch /root/throwaway; exit 7"
    result = q("run", deb["path"], "--", "sh", "-c", command, check=False)
    FIGURES["run_s"] = round(time.monotonic() - began, 1)
    assert result.returncode == 7, result.stderr
    assert result.stdout.strip().startswith("12."), result.stdout
    listing = guest_disk(deb["overlay"], "ls -l /root", deb["tmp"])
    assert "kept" in listing and "throwaway" not in listing, (
        "run wrote to throwaway overlays, never to the disk"
    )


def test_without_dbus_the_agent_stops_it_and_the_data_is_kept(deb):
    """The same image with dbus and logind masked: the power button goes unanswered, the guest agent
    still runs. `down` asks the agent after half the stop timeout and names that step; the file written
    just before is on the disk. The boot also shows the ACPI stop kept its data and provision did not rerun."""
    env = {"QEMUSPEC_VAR_extra": NO_DBUS, "QEMUSPEC_VAR_stop": "16s"}
    began = time.monotonic()
    up = q("up", deb["path"], env=env)
    FIGURES["second_up_no_dbus_s"] = round(time.monotonic() - began, 1)
    assert "provision" not in up.stdout, (
        "the disk still holds the provisioned change: not run again"
    )
    assert guest_exec(deb["path"], "cat", "/root/kept") == "written-before-acpi-down\n"
    active = q(
        "exec", deb["path"], "--", "systemctl", "is-active", "systemd-logind", "dbus", check=False
    )
    active = active.stdout.split()
    assert active == ["inactive", "inactive"], active
    guest_exec(deb["path"], "sh", "-c", "echo written-before-agent-down > /root/agent-kept")
    began = time.monotonic()
    down = json.loads(q("down", deb["path"], "--json", env=env).stdout)
    FIGURES["agent_down_s"] = round(time.monotonic() - began, 1)
    assert down[0]["detail"] == "guest-agent shutdown" and not down[0]["forced"], down
    assert (
        guest_disk(deb["overlay"], "cat /root/agent-kept", deb["tmp"])
        == "written-before-agent-down\n"
    )


def test_the_image_came_once_by_url_and_its_base_was_never_written(deb, debian_image):
    """Every boot of the module (two `up`s and a `run`) used one download: the server saw one whole
    GET of the image, and the cached base is byte for byte what was served (qemu wrote only overlays)."""
    from qemuspec.imagecache import entry_name

    assert deb["server"].gets(IMAGE) == [None], deb["server"].log
    cached = os.path.join(ENV["XDG_CACHE_HOME"], "qemuspec", "images", entry_name(deb["digest"]))
    digest = hashlib.sha256()
    with open(cached, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    assert "sha256:" + digest.hexdigest() == deb["digest"], "the cached base changed"
