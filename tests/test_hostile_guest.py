"""A hostile guest and planted host files get nothing (issue 20, items 2, 7, 15, 16, 17).

The guest is the suite's real test guest, made hostile by the test through its agent: file names
with newlines, setuid files, a `find` and a `stat` replaced by scripts that lie, bytes that move a
terminal. On the host: planted symlinks and FIFOs, a pty for what a person's terminal would get.
Each test asserts that nothing happened outside what was asked."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from helpers import alive, qemu_pids
from test_lifecycle import cli, definition

ENTRY = [sys.executable, "-m", "qemuspec"]


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest):
    """One running test guest with an agent, for the whole module; left as it was found."""
    tmp = tmp_path_factory.mktemp("hostile")
    before = qemu_pids(tmp)
    path = definition(tmp, guest, {"evil": {"extra": "agent = true\n"}})
    cli("up", path)
    try:
        yield path
    finally:
        cli("down", path)
        assert qemu_pids(tmp) == before, "no qemu left behind"


def guest_sh(vm, script: str) -> str:
    """Run a shell script in the guest as root (the hostile side's own doing)."""
    return cli("exec", vm, "--", "/bin/sh", "-c", script).stdout


def everything_under(top) -> set[str]:
    found = set()
    for base, dirs, files in os.walk(top):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(base, name), top))
    return found


@pytest.fixture
def replaced(vm):
    """Replace guest programs (find, stat) with scripts; restored to busybox afterwards."""
    done = []

    def replace(program: str, script: str) -> None:
        where = guest_sh(vm, f"which {program}").strip()
        assert where.startswith("/"), where
        guest_sh(
            vm,
            f"rm -f {where} && cat > {where} <<'EOF'\n#!/bin/sh\n{script}\nEOF\nchmod 755 {where}",
        )
        done.append(where)

    yield replace
    for where in done:
        guest_sh(vm, f"rm -f {where} && ln -s /bin/busybox {where}")


# -- item 2: cp -r VM:/dir DEST ---------------------------------------------------------------------


def test_guest_file_names_with_newlines_stay_inside_dest(vm, tmp_path):
    """A newline in a name used to forge a second `stat` line ("81a4 4 pwned") that the old parser
    placed outside DEST (relative to the CLI's working directory); setuid bits came along too."""
    guest_sh(
        vm,
        "rm -rf /tmp/nl && mkdir -p /tmp/nl/sub && printf secret > \"/tmp/nl/$(printf 'x\\n81a4 6 pwned')\" && "
        "printf root > /tmp/nl/suid && chmod 4755 /tmp/nl/suid && chmod 2775 /tmp/nl/sub && "
        "printf deep > /tmp/nl/sub/file && chmod 1777 /tmp/nl",
    )
    work = tmp_path / "work"
    (work / "deep" / "er").mkdir(parents=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    before = everything_under(tmp_path)
    result = subprocess.run(
        [*ENTRY, "cp", "-r", vm, "evil:/tmp/nl", str(dest)],
        cwd=work / "deep" / "er",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    created = everything_under(tmp_path) - before
    assert created == {
        "dest/nl",
        "dest/nl/x\n81a4 6 pwned",
        "dest/nl/suid",
        "dest/nl/sub",
        "dest/nl/sub/file",
    }, created
    assert (dest / "nl" / "x\n81a4 6 pwned").read_bytes() == b"secret"
    assert stat.S_IMODE(os.stat(dest / "nl" / "suid").st_mode) == 0o755, "setuid dropped"
    assert stat.S_IMODE(os.stat(dest / "nl" / "sub").st_mode) == 0o775, "setgid dropped"
    assert stat.S_IMODE(os.stat(dest / "nl").st_mode) == 0o777, "sticky dropped"


def test_a_lying_find_cannot_name_host_paths(vm, tmp_path, replaced):
    """A replaced `find` that lists ../ paths, absolute paths elsewhere, or files whose directory it
    never listed: the copy is refused with a paragraph, and nothing is written outside DEST."""
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    guest_sh(vm, "rm -rf /tmp/lie && mkdir -p /tmp/lie/a && printf owned > /tmp/lie/a/f")
    for listing in (
        f"/tmp/lie/../../../../../..{victim}/f",
        f"{victim}/f",
        "/tmp/lie/a/../../../f",
        "/tmp/lie//f",
        "/tmp/lie/a/f",
    ):  # the last one: a file whose directory was never listed
        replaced("find", f"printf '%s\\0' '{listing}'")
        result = subprocess.run(
            [*ENTRY, "cp", "-r", vm, "evil:/tmp/lie", str(dest)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1, (listing, result.stderr)
        assert "refusing the copy" in result.stderr and "Traceback" not in result.stderr, (
            result.stderr
        )
        assert os.listdir(victim) == [], listing
        assert everything_under(dest) <= {"lie"}, everything_under(dest)


def test_host_directories_not_made_by_the_copy_are_never_chmodded(vm, tmp_path):
    """DEST/tree/sub planted as a symlink to a host directory: the copy does not go through it, and
    neither the target nor the existing DEST/tree gets the guest's 0777."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    os.chmod(outside, 0o700)
    dest = tmp_path / "dest"
    (dest / "tree").mkdir(parents=True)
    os.chmod(dest / "tree", 0o750)
    os.symlink(outside, dest / "tree" / "sub")
    guest_sh(
        vm,
        "rm -rf /tmp/tree && mkdir -p /tmp/tree/sub && printf x > /tmp/tree/sub/planted && chmod -R 777 /tmp/tree",
    )
    result = subprocess.run(
        [*ENTRY, "cp", "-r", vm, "evil:/tmp/tree", str(dest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.startswith("error: ") and "sub exists and is not a directory" in result.stderr
    ), result.stderr
    assert os.listdir(outside) == []
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(dest / "tree").st_mode) == 0o750, (
        "an existing directory keeps its mode"
    )


def test_single_file_from_a_lying_guest_fails_cleanly(vm, tmp_path, replaced):
    """Malformed stat output, and a stat that under-reports the size: exit 1, one paragraph, no file
    and no temporary file left."""
    guest_sh(vm, "printf 0123456789 > /tmp/ten")
    dest = tmp_path / "dest"
    dest.mkdir()
    for script, expect in (
        ("echo hello", 'not "MODE SIZE"'),
        ("printf '81a4 3\\n'", "more than the 3 bytes"),
        ("printf '81a4 3\\n81a4 3\\n'", "answered 2 lines for 1"),
    ):
        replaced("stat", script)
        result = subprocess.run(
            [*ENTRY, "cp", vm, "evil:/tmp/ten", str(dest / "ten")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1, result.stderr
        assert (
            expect in result.stderr
            and result.stderr.startswith("error: ")
            and "internal error" not in result.stderr
        ), result.stderr
        assert os.listdir(dest) == [], os.listdir(dest)


# -- item 7: cp -r into the guest keeps host symlinks as symlinks --------------------------------------


def test_host_symlinks_travel_as_symlinks_not_as_their_targets(vm, tmp_path):
    token = os.urandom(8).hex()
    secret = tmp_path / "secret"
    secret.write_text(f"CI_TOKEN={token}\n")
    secret_dir = tmp_path / "secret-dir"
    secret_dir.mkdir()
    (secret_dir / "key").write_text(token)
    src = tmp_path / "src"
    src.mkdir()
    (src / "plain").write_text("kept")
    os.symlink(secret, src / "leak")
    os.symlink(secret_dir, src / "dirleak")
    os.mkfifo(src / "pipe")  # opening it for reading would hang the copy
    guest_sh(vm, "rm -rf /tmp/in /tmp/deref")
    result = cli("cp", "-r", vm, str(src), "evil:/tmp/in")
    assert "pipe: skipped" in result.stderr, result.stderr
    assert guest_sh(vm, "readlink /tmp/in/leak; readlink /tmp/in/dirleak; cat /tmp/in/plain").split(
        "\n"
    )[:3] == [str(secret), str(secret_dir), "kept"]
    found = guest_sh(vm, f"grep -rl {token} /tmp/in 2>/dev/null; echo end")
    assert found == "end\n", "no secret bytes in the guest"
    copied = json.loads(cli("cp", "-r", "--json", vm, str(src), "evil:/tmp/in2").stdout)["files"]
    assert {f["target"]: f.get("link") for f in copied} == {
        "/tmp/in2/dirleak": str(secret_dir),
        "/tmp/in2/leak": str(secret),
        "/tmp/in2/plain": None,
    }
    cli(
        "cp", "-r", "--dereference", vm, str(src), "evil:/tmp/deref"
    )  # the documented opt-in follows them
    assert (
        guest_sh(vm, "cat /tmp/deref/leak /tmp/deref/dirleak/key") == f"CI_TOKEN={token}\n{token}"
    )


# -- item 15: a guest's terminal escapes reach no terminal -------------------------------------------

ESCAPES = (
    "\\033[6n\\033]0;pwned-title\\007\\033[2J"  # ask the cursor position, retitle, clear the screen
)
SHOWN = b"\\x1b[6n\\x1b]0;pwned-title\\x07\\x1b[2J"


def on_pty(argv, which="stdout", env=None, timeout=300) -> tuple[int, bytes]:
    """Run ``argv`` with its stdout (or stderr) on a real pty, as a person's terminal; what arrived."""
    import pty  # noqa: F401  (the pty module's os.openpty is the terminal under test)

    master, slave = os.openpty()
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, which: slave}
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TERM": "dumb", "NO_COLOR": "1", **(env or {})},
        **streams,
    )
    os.close(slave)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty has gone
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(master)
    proc.communicate(timeout=timeout)
    return proc.returncode, data


def test_console_escapes_from_the_guest_arrive_escaped_on_a_terminal(vm):
    guest_sh(vm, f"printf 'hostile:{ESCAPES}:end\\n' > /dev/console")
    log = os.path.join(os.path.dirname(vm), ".qemuspec", "evil", "serial.log")
    from test_guest_access import wait_console

    wait_console(vm, "evil", ":end")
    assert b"\x1b[6n" in open(log, "rb").read(), "the guest really sent the raw sequence"
    code, shown = on_pty([*ENTRY, "logs", vm])
    assert code == 0 and b"hostile:" + SHOWN + b":end" in shown, shown[-300:]
    assert b"\x1b" not in shown and b"\x07" not in shown
    code, raw = on_pty([*ENTRY, "logs", vm, "--raw"])
    assert code == 0 and b"\x1b[6n" in raw and b"\x1b]0;pwned-title\x07" in raw, "--raw opts out"
    code, as_json = on_pty([*ENTRY, "logs", vm, "--json"])
    records = [json.loads(line) for line in as_json.decode().replace("\r", "").splitlines() if line]
    assert any("\x1b[6n" in r["line"] for r in records), (
        "JSON carries the bytes, escaped the JSON way"
    )
    code, events = on_pty([*ENTRY, "events", vm])
    assert code == 0 and b"QEMUSPEC_READY" in events and b"\x1b" not in events


def test_ready_failure_tail_is_escaped_on_a_terminal(guest, tmp_path):
    """`up` of a machine that never becomes ready prints the console's last lines: the guest (through
    its agent, while `up` waits) puts escapes there; stderr is a pty."""
    import threading

    from qemuspec.runtime import paths, probes
    from qemuspec.runtime.agent import GuestAgent

    path = tmp_path / "tail.toml"
    path.write_text(f'''[machines.tail]
kernel = "{guest["kernel"]}"
initrd = "{guest["initrd"]}"
cmdline = "console=ttyS0 quiet"
memory = "256M"
rng = true
agent = true
stop_timeout = "5s"
[machines.tail.ready]
serial = "qemuspec-never-printed"
timeout = "30s"
''')
    before = qemu_pids(tmp_path)
    qga = paths.layout(str(tmp_path / ".qemuspec" / "tail")).qga
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(
            zip(("code", "stderr"), on_pty([*ENTRY, "up", str(path)], "stderr"))
        )
    )
    runner.start()
    try:
        deadline = __import__("time").monotonic() + 30
        while not os.path.exists(
            qga
        ):  # the runtime directory appears once the supervisor launches qemu
            assert __import__("time").monotonic() < deadline and runner.is_alive(), (
                "qemu never launched"
            )
            threading.Event().wait(0.05)
        probes.wait_agent(qga, deadline, lambda: True)
        with GuestAgent(qga, timeout=10) as agent:
            agent.exec(["/bin/sh", "-c", f"printf 'tail:{ESCAPES}:end\\n' > /dev/console"])
        runner.join(timeout=120)
    finally:
        cli("down", str(path), check=False)
    assert result["code"] == 1, result
    assert (
        b"was not ready within 30 s" in result["stderr"]
        and b"tail:" + SHOWN + b":end" in result["stderr"]
    ), result["stderr"][-600:]
    assert b"\x1b" not in result["stderr"] and b"\x07" not in result["stderr"]
    assert qemu_pids(tmp_path) == before


# -- item 16: a backtracking ready.serial pattern against guest output ------------------------------

BACKTRACKING = "(a+)+qemuspec-never$"  # exponential in a run of a's for a backtracking engine


def test_backtracking_pattern_on_console_bytes_ends_at_its_deadline():
    """Fed from a socket, no qemu: Python's re would take 2**3000 steps here."""
    import socket
    import time

    from qemuspec.errors import ReadyTimeout
    from qemuspec.runtime.console import ConsoleReader

    ours, guest_side = socket.socketpair()
    reader = ConsoleReader(ours)
    try:
        guest_side.sendall(
            (b"a" * 3000 + b"!\r\n") * 50 + b"a" * 100_000
        )  # lines and a line that never ends
        began = time.monotonic()
        with pytest.raises(ReadyTimeout):
            reader.wait_for(BACKTRACKING, 1.5)
        assert time.monotonic() - began < 3.0
        guest_side.sendall(b"\nlogin: ")
        assert reader.wait_for(r"^login: $", 5).group(0) == b"login: ", (
            "a prompt without a newline still matches"
        )
    finally:
        guest_side.close()
        reader.close()


def test_a_signal_ends_a_console_wait_at_once():
    """The supervisor's SIGTERM handler interrupts the console wait: here SIGALRM stands in for it."""
    import signal
    import socket
    import time

    from qemuspec.errors import StopRequested
    from qemuspec.runtime.console import ConsoleReader

    ours, guest_side = socket.socketpair()
    reader = ConsoleReader(ours)
    asked = []

    def on_alarm(*_):
        asked.append(True)
        reader.interrupt()

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        guest_side.sendall(b"a" * 5000 + b"!\n")
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        began = time.monotonic()
        with pytest.raises(StopRequested):
            reader.wait_for(BACKTRACKING, 60, stopping=lambda: bool(asked))
        assert time.monotonic() - began < 3.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        guest_side.close()
        reader.close()


def test_validate_names_the_engine_for_lookaround(tmp_path):
    path = tmp_path / "look.toml"
    path.write_text('[machines.m]\n[machines.m.ready]\nserial = "(?<=x)ready"\n')
    result = cli("validate", str(path), check=False)
    assert (
        result.returncode == 2
        and "machines.m.ready.serial" in result.stderr
        and "lookaround" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_backtracking_ready_serial_with_real_qemu_times_out_and_stops_on_sigterm(guest, tmp_path):
    """The kernel echoes its command line (a run of a's ending in "!") on the console; the pattern
    backtracks on it. `up` fails at its timeout; a second `up`, its supervisor sent SIGTERM while it
    matches, ends at once."""
    import time

    path = tmp_path / "slow.toml"
    path.write_text(f'''[machines.slow]
kernel = "{guest["kernel"]}"
initrd = "{guest["initrd"]}"
cmdline = "console=ttyS0 loglevel=7 {"a" * 80}!"
memory = "256M"
rng = true
stop_timeout = "5s"
[machines.slow.ready]
serial = "{BACKTRACKING}"
timeout = "12s"
''')
    before = qemu_pids(tmp_path)
    try:
        began = time.monotonic()
        failed = cli("up", str(path), check=False)
        took = time.monotonic() - began
        assert failed.returncode == 1 and "was not ready within 12 s" in failed.stderr, (
            failed.stderr
        )
        log = open(os.path.join(tmp_path, ".qemuspec", "slow", "serial.log"), "rb").read()
        assert b"a" * 80 + b"!" in log, "the guest printed the line the pattern was matched against"
        assert took < 12 + 20, f"up took {took:.1f} s"
        assert qemu_pids(tmp_path) == before
        # SIGTERM, as `down` sends it (`down` itself waits for the state lock a starting `up` holds)
        up = subprocess.Popen(
            [*ENTRY, "up", str(path), "--timeout", "300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first_boot = log.count(
                b"a" * 80 + b"!"
            )  # the kernel shows the line more than once per boot
            deadline = time.monotonic() + 120
            supervisor = None
            while (
                log.count(b"a" * 80 + b"!") <= first_boot or not supervisor
            ):  # the second boot is being matched
                assert time.monotonic() < deadline and up.poll() is None, (
                    "the second boot never printed its line"
                )
                time.sleep(0.05)
                log = open(os.path.join(tmp_path, ".qemuspec", "slow", "serial.log"), "rb").read()
                supervisor = json.loads(cli("status", str(path), "--json").stdout)[0]["supervisor"]
            assert alive(supervisor)
            began = time.monotonic()
            os.kill(supervisor, signal.SIGTERM)
            _, err = up.communicate(timeout=30)
            assert time.monotonic() - began < 15, "SIGTERM stopped the waiting supervisor at once"
            assert up.returncode == 1 and "stopped while waiting" in err, err
            assert json.loads(cli("status", str(path), "--json").stdout)[0]["state"] == "stopped"
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    finally:
        cli("down", str(path), check=False)
    assert qemu_pids(tmp_path) == before


# -- item 17: malformed guest-agent replies are protocol errors --------------------------------------


class FakeAgent:
    """A guest agent on a unix socket that answers the sync honestly, then sends ``reply`` (bytes)
    to every command: a hostile guest's qemu-ga, without qemu."""

    def __init__(self, path: str, reply: bytes):
        import socket
        import threading

        self.reply = reply
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line.lstrip(b"\xff"))
                if request["execute"] == "guest-sync-delimited":
                    conn.sendall(
                        b"\xff"
                        + json.dumps({"return": request["arguments"]["id"]}).encode()
                        + b"\n"
                    )
                else:
                    try:
                        conn.sendall(self.reply)
                    except OSError:  # the client gave up on an oversized reply: that is the point
                        return

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=10)


MALFORMED = [
    (b"[1,2,3]\n", "guest-ping", "not an object"),
    (b'{"return": \n', "guest-ping", "not JSON"),
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", "guest-ping", "nested too deeply"),
    (b"{" + b'"a":{' * 100_000 + b"}" * 100_001 + b"\n", "guest-ping", "nested too deeply"),
    (b'{"error": "x"}\n', "guest-ping", "malformed error"),
    (b'{"error": {"class": 7}}\n', "guest-ping", "malformed error"),
    (b'{"return": [1]}\n', "exec", "where an object belongs"),
    (b'{"return": {"pid": "1"}}\n', "exec", "pid = '1': expected int"),
    (b'{"return": {"pid": true}}\n', "exec", "pid = True: expected int"),
    (b'{"return": 5}\n', "read", "where an object belongs"),
    (b'{"return": {"buf-b64": "%%%", "eof": true}}\n', "read", "not base64"),
    (b'{"return": {"buf-b64": 1}}\n', "read", "buf-b64 = 1: expected str"),
    (
        b'{"return": {"buf-b64": "'
        + __import__("base64").b64encode(b"x" * 5000)
        + b'", "count": 10}}\n',
        "read",
        "5000 bytes for a read of 4096",
    ),
    (b"x" * (33 << 20), "guest-ping", "over 32 MiB"),
]


@pytest.mark.parametrize(
    "reply,call,expect", MALFORMED, ids=[m[2] + f"-{i}" for i, m in enumerate(MALFORMED)]
)
def test_malformed_agent_replies_are_protocol_errors(tmp_path, reply, call, expect):
    from qemuspec.errors import QemuspecError, QMPProtocolError
    from qemuspec.runtime.agent import GuestAgent

    fake = FakeAgent(str(tmp_path / "qga.sock"), reply)
    try:
        with GuestAgent(str(tmp_path / "qga.sock"), timeout=20) as agent:
            with pytest.raises(QMPProtocolError) as caught:
                if call == "exec":
                    agent.exec(["/bin/true"], timeout=5)
                elif call == "read":
                    agent.file_read(3, 4096)
                else:
                    agent.command(call)
            assert isinstance(caught.value, QemuspecError) and expect in str(caught.value), str(
                caught.value
            )
            assert len(str(caught.value)) < 600, "the message quotes the reply, briefly"
            with pytest.raises(
                QMPProtocolError
            ):  # the session is over: nothing more is read from it
                agent.command("guest-ping")
    finally:
        fake.close()


def test_a_reply_the_size_of_the_cap_still_passes(tmp_path):
    """The cap is above what qemu-ga really sends (16 MiB of guest-exec output, as base64)."""
    import base64

    from qemuspec.runtime.agent import GuestAgent

    payload = os.urandom(16 << 20)
    reply = json.dumps(
        {
            "return": {
                "buf-b64": base64.b64encode(payload).decode(),
                "count": len(payload),
                "eof": True,
            }
        }
    ).encode()
    fake = FakeAgent(str(tmp_path / "qga.sock"), reply + b"\n")
    try:
        with GuestAgent(str(tmp_path / "qga.sock"), timeout=20) as agent:
            assert agent.file_read(1, len(payload)) == (payload, True)
    finally:
        fake.close()


def test_an_impostor_agent_in_the_guest_ends_as_a_paragraph_through_the_cli(vm):
    """The guest replaces its qemu-ga with a script that answers `[1,2,3]` once, then brings the real
    agent back: `qemuspec exec` exits 1 with one paragraph, no traceback, no internal error."""
    from test_guest_access import wait_console

    port = "/dev/virtio-ports/org.qemu.guest_agent.0"
    # the guest's own delay before it strikes: the exec that starts it must get its exit status first
    impostor = (
        f"sleep 2; kill $(pidof qemu-ga); while pidof qemu-ga >/dev/null; do usleep 10000; done; exec 3<>{port}; "
        "echo impostor-listening > /dev/console; read -r line <&3; printf '\\377[1,2,3]\\n' >&3; exec 3>&-; "
        f"qemu-ga -m virtio-serial -p {port} -t /run >/dev/null 2>&1 & echo impostor-gone > /dev/console"
    )
    cli(
        "exec",
        vm,
        "--",
        "/bin/sh",
        "-c",
        'setsid sh -c "$0" </dev/null >/dev/null 2>&1 &',
        impostor,
    )
    wait_console(vm, "evil", "impostor-listening")
    result = subprocess.run(
        [*ENTRY, "exec", vm, "--", "/bin/true"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result
    assert (
        result.stderr.startswith("error: the guest agent of evil broke the protocol")
        and "not an object" in result.stderr
    ), result.stderr
    assert (
        result.stderr.count("\n") == 1
        and "Traceback" not in result.stderr
        and "internal error" not in result.stderr
    )
    wait_console(vm, "evil", "impostor-gone")
    assert cli("exec", vm, "--", "/bin/echo", "back").stdout == "back\n", (
        "the real agent answers again"
    )
