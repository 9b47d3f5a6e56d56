"""A hostile guest and planted host files get nothing (issue 20, items 2, 7, 15, 16, 17).

The guest is the suite's real test guest, made hostile by the test through its agent: file names
with newlines, setuid files, a `find` and a `stat` replaced by scripts that lie, bytes that move a
terminal. On the host: planted symlinks and FIFOs, a pty for what a person's terminal would get.
Each test asserts that nothing happened outside what was asked."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from helpers import qemu_pids
from test_lifecycle import cli, definition

ENTRY = [sys.executable, "-m", "qemuspec"]


@pytest.fixture(scope="module")
def vm(tmp_path_factory, guest):
    """One running test guest with an agent, for the whole module; left as it was found."""
    before = qemu_pids()
    tmp = tmp_path_factory.mktemp("hostile")
    path = definition(tmp, guest, {"evil": {"extra": "agent = true\n"}})
    cli("up", path)
    try:
        yield path
    finally:
        cli("down", path)
        assert qemu_pids() == before, "no qemu left behind"


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
        guest_sh(vm, f"rm -f {where} && cat > {where} <<'EOF'\n#!/bin/sh\n{script}\nEOF\nchmod 755 {where}")
        done.append(where)

    yield replace
    for where in done:
        guest_sh(vm, f"rm -f {where} && ln -s /bin/busybox {where}")


# -- item 2: cp -r VM:/dir DEST ---------------------------------------------------------------------


def test_guest_file_names_with_newlines_stay_inside_dest(vm, tmp_path):
    """A newline in a name used to forge a second `stat` line ("81a4 4 pwned") that the old parser
    placed outside DEST (relative to the CLI's working directory); setuid bits came along too."""
    guest_sh(vm, "rm -rf /tmp/nl && mkdir -p /tmp/nl/sub && printf secret > \"/tmp/nl/$(printf 'x\\n81a4 6 pwned')\" && "
                 "printf root > /tmp/nl/suid && chmod 4755 /tmp/nl/suid && chmod 2775 /tmp/nl/sub && "
                 "printf deep > /tmp/nl/sub/file && chmod 1777 /tmp/nl")
    work = tmp_path / "work"
    (work / "deep" / "er").mkdir(parents=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    before = everything_under(tmp_path)
    result = subprocess.run([*ENTRY, "cp", "-r", vm, "evil:/tmp/nl", str(dest)], cwd=work / "deep" / "er",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    created = everything_under(tmp_path) - before
    assert created == {"dest/nl", "dest/nl/x\n81a4 6 pwned", "dest/nl/suid", "dest/nl/sub", "dest/nl/sub/file"}, created
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
    for listing in (f"/tmp/lie/../../../../../..{victim}/f", f"{victim}/f", "/tmp/lie/a/../../../f", "/tmp/lie//f",
                    "/tmp/lie/a/f"):  # the last one: a file whose directory was never listed
        replaced("find", f"printf '%s\\0' '{listing}'")
        result = subprocess.run([*ENTRY, "cp", "-r", vm, "evil:/tmp/lie", str(dest)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, (listing, result.stderr)
        assert "refusing the copy" in result.stderr and "Traceback" not in result.stderr, result.stderr
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
    guest_sh(vm, "rm -rf /tmp/tree && mkdir -p /tmp/tree/sub && printf x > /tmp/tree/sub/planted && chmod -R 777 /tmp/tree")
    result = subprocess.run([*ENTRY, "cp", "-r", vm, "evil:/tmp/tree", str(dest)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and "sub exists and is not a directory" in result.stderr, result.stderr
    assert os.listdir(outside) == []
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(dest / "tree").st_mode) == 0o750, "an existing directory keeps its mode"


def test_single_file_from_a_lying_guest_fails_cleanly(vm, tmp_path, replaced):
    """Malformed stat output, and a stat that under-reports the size: exit 1, one paragraph, no file
    and no temporary file left."""
    guest_sh(vm, "printf 0123456789 > /tmp/ten")
    dest = tmp_path / "dest"
    dest.mkdir()
    for script, expect in (("echo hello", "not \"MODE SIZE\""), ("printf '81a4 3\\n'", "more than the 3 bytes"),
                           ("printf '81a4 3\\n81a4 3\\n'", "answered 2 lines for 1")):
        replaced("stat", script)
        result = subprocess.run([*ENTRY, "cp", vm, "evil:/tmp/ten", str(dest / "ten")], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        assert expect in result.stderr and result.stderr.startswith("error: ") and "internal error" not in result.stderr, result.stderr
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
    assert guest_sh(vm, "readlink /tmp/in/leak; readlink /tmp/in/dirleak; cat /tmp/in/plain").split("\n")[:3] == [
        str(secret), str(secret_dir), "kept"]
    found = guest_sh(vm, f"grep -rl {token} /tmp/in 2>/dev/null; echo end")
    assert found == "end\n", "no secret bytes in the guest"
    copied = json.loads(cli("cp", "-r", "--json", vm, str(src), "evil:/tmp/in2").stdout)["files"]
    assert {f["target"]: f.get("link") for f in copied} == {"/tmp/in2/dirleak": str(secret_dir), "/tmp/in2/leak": str(secret),
                                                            "/tmp/in2/plain": None}
    cli("cp", "-r", "--dereference", vm, str(src), "evil:/tmp/deref")  # the documented opt-in follows them
    assert guest_sh(vm, "cat /tmp/deref/leak /tmp/deref/dirleak/key") == f"CI_TOKEN={token}\n{token}"


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
                    conn.sendall(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
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
    (b"{\"return\": \n", "guest-ping", "not JSON"),
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", "guest-ping", "nested too deeply"),
    (b"{" + b"\"a\":{" * 100_000 + b"}" * 100_001 + b"\n", "guest-ping", "nested too deeply"),
    (b"{\"error\": \"x\"}\n", "guest-ping", "malformed error"),
    (b"{\"error\": {\"class\": 7}}\n", "guest-ping", "malformed error"),
    (b"{\"return\": [1]}\n", "exec", "where an object belongs"),
    (b"{\"return\": {\"pid\": \"1\"}}\n", "exec", "pid = '1': expected int"),
    (b"{\"return\": {\"pid\": true}}\n", "exec", "pid = True: expected int"),
    (b"{\"return\": 5}\n", "read", "where an object belongs"),
    (b"{\"return\": {\"buf-b64\": \"%%%\", \"eof\": true}}\n", "read", "not base64"),
    (b"{\"return\": {\"buf-b64\": 1}}\n", "read", "buf-b64 = 1: expected str"),
    (b"x" * (33 << 20), "guest-ping", "over 32 MiB"),
]


@pytest.mark.parametrize("reply,call,expect", MALFORMED, ids=[m[2] + f"-{i}" for i, m in enumerate(MALFORMED)])
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
            assert isinstance(caught.value, QemuspecError) and expect in str(caught.value), str(caught.value)
            assert len(str(caught.value)) < 600, "the message quotes the reply, briefly"
            with pytest.raises(QMPProtocolError):  # the session is over: nothing more is read from it
                agent.command("guest-ping")
    finally:
        fake.close()


def test_a_reply_the_size_of_the_cap_still_passes(tmp_path):
    """The cap is above what qemu-ga really sends (16 MiB of guest-exec output, as base64)."""
    import base64

    from qemuspec.runtime.agent import GuestAgent

    payload = os.urandom(16 << 20)
    reply = json.dumps({"return": {"buf-b64": base64.b64encode(payload).decode(), "count": len(payload), "eof": True}}).encode()
    fake = FakeAgent(str(tmp_path / "qga.sock"), reply + b"\n")
    try:
        with GuestAgent(str(tmp_path / "qga.sock"), timeout=20) as agent:
            assert agent.file_read(1, len(payload)) == (payload, True)
    finally:
        fake.close()
