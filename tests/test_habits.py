"""The habits users bring (issue 19), against the real test guest: `exec` streams, 127, 124 (the guest
command killed), large stdin, `-t`; ssh options and `ssh-config` read by OpenSSH itself; `run` beside a
running `up` of the same file with a fixed port; `down` of a machine whose file is gone (by name, by
--state-dir) and the ssh port of `host = 0` the same when it is started again; the library beside the CLI (refused, nothing
destroyed), a library VM dying with its process, and `wait_console(since="now")`.

One machine (`up` once) serves the CLI tests, in file order; the library tests boot their own."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import qemu_pids

ENTRY = [sys.executable, "-m", "qemuspec.cli.main"]

MACHINE = """
[machines.h]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
memory = "256M"
rng = true
agent = true
stop_timeout = "10s"
[machines.h.cloud_init]
user_data = \"\"\"#cloud-config
ssh_authorized_keys:
  - {{{{ ssh_public_key }}}}
\"\"\"
[machines.h.ready]
serial = "{marker}"
agent = true
[[machines.h.nics]]
forwards = [{{ host = 0, guest = 22 }}, {{ host = {fixed}, guest = 80 }}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Box:
    def __init__(self, tmp, guest):
        if "/usr/sbin/dropbear" not in guest["extras"]:
            pytest.fail("the test guest has no dropbear: install dropbear-bin and rebuild it")
        self.dir = tmp
        self.path = str(tmp / "h.toml")
        self.fixed = free_port()
        self.text = MACHINE.format(
            kernel=guest["kernel"], initrd=guest["initrd"], marker=guest["marker"], fixed=self.fixed
        )
        with open(self.path, "w") as f:
            f.write(self.text)
        run, state = tmp / "xdg-run", tmp / "xdg-state"  # `ls` and `down NAME` see this test's only
        for d in (run, state):
            d.mkdir(mode=0o700)
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "XDG_STATE_HOME": str(state)}

    def cli(self, *args, code=0, **kw):
        kw.setdefault("capture_output", True)
        result = subprocess.run(
            [*ENTRY, *args], text=True, env=self.env, timeout=kw.pop("timeout", 300), **kw
        )
        assert "Traceback" not in (result.stderr or "")
        if code is not None:
            assert result.returncode == code, (
                f"qemuspec {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def exec(self, *command, code=0, options=(), **kw):
        return self.cli("exec", self.path, *options, "--", *command, code=code, **kw)

    def ports(self) -> dict[int, int]:
        rows = json.loads(self.cli("status", self.path, "--json").stdout)
        return {p["guest"]: p["host"] for p in rows[0]["ports"]}


@pytest.fixture(scope="module")
def box(tmp_path_factory, guest):
    box = Box(tmp_path_factory.mktemp("habits"), guest)
    try:
        box.cli("up", box.path)
        yield box
    finally:
        if os.path.exists(box.path):
            box.cli("down", box.path, code=None)
        for pid in qemu_pids(box.dir):  # a test that failed half-way: never leave its qemu
            os.kill(pid, signal.SIGKILL)


def test_exec_streams_output_while_the_command_runs(box):
    proc = subprocess.Popen(
        [
            *ENTRY,
            "exec",
            box.path,
            "--",
            "/bin/sh",
            "-c",
            "rm -f /tmp/go; echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=box.env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no output while the command waits"
        assert proc.stdout.readline() == b"first\n"
        assert (
            proc.poll() is None
        )  # the command still waits for /tmp/go: this came as it was printed
        box.cli("ssh", box.path, "--", "touch", "/tmp/go")  # the agent serves one session: ssh
        out, _ = proc.communicate(timeout=60)
        assert out == b"second\n" and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exec_exits_127_for_a_missing_command(box):
    result = box.exec("no-such-command-here", code=127)
    assert "no-such-command-here" in result.stderr


def test_exec_timeout_exits_124_and_kills_the_guest_command(box):
    started = box.exec(
        "/bin/sh",
        "-c",
        "echo $$ > /tmp/sleeper; exec sleep 600",
        options=("--timeout", "2"),
        code=124,
    )
    assert "killed" in started.stderr
    pid = box.exec("/bin/cat", "/tmp/sleeper").stdout.strip()
    assert pid.isdigit()
    gone = box.exec("/bin/sh", "-c", f"kill -0 {pid}", code=None)
    assert gone.returncode != 0, f"guest process {pid} still runs"


def test_exec_takes_a_large_stdin(box, tmp_path):
    blob = os.urandom(4 << 20)  # more than one agent message is worth carrying
    result = subprocess.run(
        [*ENTRY, "exec", box.path, "--", "sha256sum"],
        input=blob,
        capture_output=True,
        env=box.env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()


def _on_a_terminal(box, *args, timeout=60) -> tuple[int, bytes]:
    """Run qemuspec with a pty as its terminal; (exit code, what the terminal showed)."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*ENTRY, *args], stdin=secondary, stdout=secondary, stderr=secondary, env=box.env
    )
    os.close(secondary)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(primary, 4096)
            except OSError:  # EIO: every holder of the terminal is gone
                break
            if not data:
                break
            shown += data
        return proc.wait(timeout=10), shown
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exec_t_gives_the_command_a_terminal_through_ssh(box):
    code, shown = _on_a_terminal(
        box, "exec", "-t", box.path, "--", "/bin/sh", "-c", "tty; echo on-a-tty"
    )
    assert code == 0, shown
    assert b"on-a-tty" in shown and b"/dev/pts/" in shown, shown


def test_ssh_passes_its_options_through(box):
    reach = json.loads(
        box.cli("ssh", box.path, "--json", "--", "-L", "8080:localhost:80", "uname", "-a").stdout
    )
    argv = reach["argv"]
    destination = argv.index("root@127.0.0.1")
    assert argv[1:3] == ["-L", "8080:localhost:80"] and argv[destination + 1 :] == [
        "--",
        "uname",
        "-a",
    ]
    served = free_port()  # an option ssh itself acts on: a local forward to the guest's web server
    proc = subprocess.Popen(
        [*ENTRY, "ssh", box.path, "--", "-L", f"{served}:127.0.0.1:80", "cat", ">/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=box.env,
    )
    try:
        page, deadline = b"", time.monotonic() + 60
        while not page.startswith(b"HTTP/") and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", served), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    page = conn.recv(64)
            except OSError:  # ssh has not bound the forward yet
                if proc.poll() is not None:
                    break
                time.sleep(0.1)  # polled until the deadline above
        assert page.startswith(b"HTTP/"), proc.stderr.read() if proc.poll() is not None else page
    finally:
        proc.stdin.close()  # the remote `cat` ends, and with it ssh
        proc.wait(timeout=30)


def test_ssh_config_is_a_block_openssh_reads(box):
    config = box.dir / "ssh_config"
    config.write_text(box.cli("ssh-config", box.path).stdout)
    resolved = subprocess.run(
        ["ssh", "-F", str(config), "-G", "h"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert f"port {box.ports()[22]}" in resolved and "hostname 127.0.0.1" in resolved
    assert "user root" in resolved
    login = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "h", "echo", "via-ssh-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert login.stdout.strip() == "via-ssh-config", login.stderr


def test_cp_via_ssh_round_trips_a_file_with_its_mode(box, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20))
    blob.chmod(0o751)
    sent = json.loads(
        box.cli("cp", "--via", "ssh", "--json", box.path, str(blob), "h:/tmp/").stdout
    )
    assert sent["files"][0]["target"] == "/tmp/blob" and sent["bytes"] == 3 << 20
    inside = box.exec("/bin/sh", "-c", "sha256sum /tmp/blob; stat -c %a /tmp/blob").stdout.split()
    assert inside == [hashlib.sha256(blob.read_bytes()).hexdigest(), "/tmp/blob", "751"]
    back = tmp_path / "back"
    box.cli("cp", "--via", "ssh", box.path, "h:/tmp/blob", str(back))
    assert back.read_bytes() == blob.read_bytes() and oct(back.stat().st_mode & 0o777) == "0o751"
    missing = box.cli("cp", "--via", "ssh", box.path, "h:/tmp/nothing-here", str(tmp_path), code=1)
    assert "not a regular file" in missing.stderr
    assert not [n for n in os.listdir(tmp_path) if "qemuspec-tmp" in n]  # nothing half-written kept


REFUSED_CHILD = """
import sys
from qemuspec import load
from qemuspec.errors import LaunchError
vm = load(sys.argv[1])["h"]
try:
    vm.start()
except LaunchError as exc:
    print(exc)
    sys.exit(3)
"""


def test_the_library_refuses_a_machine_the_cli_runs_and_destroys_nothing(box):
    before = json.loads(box.cli("status", box.path, "--json").stdout)[0]
    refused = subprocess.run(
        [sys.executable, "-c", REFUSED_CHILD, box.path],
        capture_output=True,
        text=True,
        env=box.env,
        timeout=120,
    )  # a program of the user's, with the user's environment, as the CLI had
    assert refused.returncode == 3, refused.stderr
    assert f"is run by {box.path}" in refused.stdout and "qemuspec down" in refused.stdout
    row = json.loads(box.cli("status", box.path, "--json").stdout)[0]
    assert row["state"] == "running" and row["pid"] == before["pid"]
    assert box.exec("/bin/echo", "still-here").stdout == "still-here\n"  # sockets and records kept


def test_run_beside_a_running_up_maps_fixed_ports_to_free_ones(box):
    assert box.ports()[80] == box.fixed  # `up` holds the fixed port
    result = box.cli("run", box.path, "--", "/bin/echo", "from-run")
    assert result.stdout == "from-run\n"
    mapped = [line for line in result.stderr.splitlines() if "ports" in line]
    assert mapped and f"{box.fixed}->80" not in mapped[0] and "->80/tcp" in mapped[0], result.stderr


def test_a_machine_whose_file_is_gone_is_stopped_and_its_ssh_port_stays(box, tmp_path):
    ports = box.ports()
    away = str(tmp_path / "moved.toml")
    shutil.move(box.path, away)
    try:
        listed = json.loads(box.cli("ls", "--json").stdout)
        assert [r["name"] for r in listed] == ["h"]
        pid = listed[0]["pid"]
        stopped = box.cli("down", "h", cwd=tmp_path)  # no file here: found by its `ls` name
        assert stopped.stdout.count("h: stopped") == 1, stopped.stdout
        assert not qemu_pids(box.dir) and not os.path.exists(f"/proc/{pid}")
        shutil.copy(away, box.path)
        box.cli("up", box.path)
        assert box.ports() == ports  # the ssh port qemu picked for host = 0 is the same again
        os.remove(box.path)
        root = str(box.dir / ".qemuspec")
        stopped = box.cli("down", "--state-dir", root, "--json", cwd=tmp_path)
        assert [o["action"] for o in json.loads(stopped.stdout)] == ["stopped"]
        assert not qemu_pids(box.dir)
    finally:
        if not os.path.exists(box.path):
            shutil.copy(away, box.path)


LIBRARY_CHILD = """
import os, sys
from qemuspec import Qemu
vm = Qemu(accel="tcg").vm("orphan", kernel=sys.argv[1], initrd=sys.argv[2], memory="128M", cmdline="console=ttyS0 quiet")
vm.start(ready=False)
print(vm.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_library_vm_dies_with_the_process_that_started_it(guest):
    child = subprocess.run(
        [sys.executable, "-c", LIBRARY_CHILD, guest["kernel"], guest["initrd"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    pid = int(child.stdout.split()[0])
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        assert select.select([fd], [], [], 10)[0], f"qemu {pid} outlived the killed test process"
    finally:
        os.close(fd)


def test_wait_console_since_now_waits_for_the_next_occurrence(guest):
    from qemuspec import Qemu
    from qemuspec.errors import ReadyTimeout

    vm = (
        Qemu(accel="tcg")
        .vm("since", kernel=guest["kernel"], initrd=guest["initrd"], memory="128M")
        .cmdline("console=ttyS0 quiet")
        .ready(serial=guest["marker"])
    )
    with vm.start():
        assert vm.wait_console(guest["marker"], 5) == guest["marker"]  # since boot: seen already
        with pytest.raises(ReadyTimeout):
            vm.wait_console(guest["marker"], 1, since="now")  # printed once, before now
        mark = vm.console_position()
        vm.instance.console.send(b"echo hello-$((40 + 2))\n")  # the guest's shell on ttyS0
        assert vm.wait_console("hello-42", 30, since=mark) == "hello-42"
        with pytest.raises(ReadyTimeout):
            vm.wait_console("hello-42", 1, since="now")
