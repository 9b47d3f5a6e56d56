"""Base images by URL and digest (issue 23): the content-addressed cache, checked while the bytes
arrive, against a real HTTP server on 127.0.0.1 (tests/helpers.py ImageServer) that logs every
request, cuts responses short and serves Range; a real guest booted on an overlay of a served image."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
import threading
import time

import pytest

from helpers import qemu_pids
from test_lifecycle import MACHINE

CLI = [sys.executable, "-m", "qemuspec.cli.main"]


@pytest.fixture
def env(tmp_path) -> dict:
    """The CLI's environment with a cache of this test's own (XDG_CACHE_HOME) and no proxies."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    out = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    out.update(XDG_CACHE_HOME=str(cache))
    out.pop("QEMUSPEC_OFFLINE", None)
    return out


def images_dir(env: dict) -> str:
    return os.path.join(env["XDG_CACHE_HOME"], "qemuspec", "images")


IN_PROCESS = (
    "validate",
    "init",
    "img",
)  # commands that fork nothing: run in this process (the fast lane)


def run(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI with ``env`` as its whole environment: in this process for commands that fork nothing
    (main() is what the entry point runs; output captured), a subprocess for the rest."""
    if args[0] in IN_PROCESS:
        import contextlib
        import io

        from qemuspec.cli.main import main

        saved = dict(os.environ)
        out, err = io.StringIO(), io.StringIO()
        try:
            os.environ.clear()
            os.environ.update(env)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        result = subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
    else:
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"qemuspec {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def disk_file(
    tmp_path,
    url: str,
    digest: str | None = None,
    digest_url: str | None = None,
    name: str = "lab.toml",
    machines: tuple[str, ...] = ("box",),
) -> str:
    """A definition whose machines each have one disk on the image (no kernel: nothing boots)."""
    image = f'url = "{url}", ' + (
        f'digest = "{digest}"' if digest else f'digest_url = "{digest_url}"'
    )
    text = "".join(
        f'[machines.{m}]\nmemory = "64M"\n[[machines.{m}.disks]]\nfile = "{m}.qcow2"\n'
        f"image = {{ {image} }}\n\n"
        for m in machines
    )
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def qcow2(tmp_path, content: bytes, size: str = "16M") -> bytes:
    """A small real qcow2 whose first bytes are ``content`` (made by qemu-img from a raw file)."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(content.ljust(1 << 20, b"\0"))
    out = tmp_path / "src.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True
    )
    subprocess.run(["qemu-img", "resize", "-q", str(out), size], check=True)
    data = out.read_bytes()
    out.unlink()
    raw.unlink()
    return data


def cached(env: dict) -> list[str]:
    try:
        return sorted(os.listdir(images_dir(env)))
    except FileNotFoundError:
        return []


# -- the model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, field, words",
    [
        (
            '{ url = "ftp://host/x.qcow2", digest = "sha256:' + "a" * 64 + '" }',
            "image.url",
            "http://, https:// or file:///",
        ),
        (
            '{ url = "https://host/x.qcow2", digest = "sha256:abc" }',
            "image.digest",
            "64 hex digits",
        ),
        ('{ url = "https://host/x.qcow2" }', "image", "exactly one of digest"),
        (
            '{ url = "https://host/x.qcow2", digest = "sha256:'
            + "a" * 64
            + '", digest_url = "https://host/SUMS" }',
            "image",
            "exactly one of digest",
        ),
        (
            '{ url = "file://relative/x.qcow2", digest = "sha256:' + "a" * 64 + '" }',
            "image.url",
            "absolute path",
        ),
    ],
)
def test_validate_names_file_line_field_and_fix(tmp_path, env, image, field, words):
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[machines.box]\n[[machines.box.disks]]\nfile = "box.qcow2"\nimage = {image}\n'
    )
    result = run(env, "validate", str(path), check=False)
    assert result.returncode == 2
    assert f"{path}:4: machines.box.disks[0].{field}" in result.stderr and words in result.stderr
    assert "Traceback" not in result.stderr


def test_image_with_backing_or_raw_format_is_refused(tmp_path, env):
    digest = "sha256:" + "b" * 64
    for extra, words in (
        ('backing = "base.qcow2"', 'give "image" or "backing"'),
        ('format = "raw"', "qcow2 overlay"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(
            f'[machines.box]\n[[machines.box.disks]]\nfile = "box.qcow2"\n{extra}\n'
            f'image = {{ url = "https://h/x.qcow2", digest = "{digest}" }}\n'
        )
        result = run(env, "validate", str(path), check=False)
        assert result.returncode == 2 and words in result.stderr, result.stderr


def test_checksum_file_formats():
    from qemuspec.imagecache import parse_checksums

    a, b = "ab" * 32, "cd" * 64
    gnu = f"{b}  debian-12-genericcloud-amd64.qcow2\n{'ef' * 64}  other.qcow2\n"
    assert parse_checksums(gnu, "debian-12-genericcloud-amd64.qcow2") == f"sha512:{b}"
    assert parse_checksums(f"{a} *ubuntu.img\n", "ubuntu.img") == f"sha256:{a}"
    bsd = f"-----BEGIN PGP SIGNED MESSAGE-----\n# Fedora.qcow2: 1 bytes\nSHA256 (Fedora.qcow2) = {a.upper()}\n"
    assert parse_checksums(bsd, "Fedora.qcow2") == f"sha256:{a}"
    assert parse_checksums(gnu, "missing.qcow2") is None
    assert (
        parse_checksums(f"SHA256 (x.img) = {b}\n", "x.img") is None
    )  # the length must fit the algorithm


# -- the cache ------------------------------------------------------------------------------------------


def test_wrong_digest_fails_before_any_qemu_starts(tmp_path, env, image_server, qemu_bin):
    data = qcow2(tmp_path, b"right bytes")
    image_server.files["disk.qcow2"] = data
    wrong = sha256(b"other bytes")
    path = disk_file(tmp_path, image_server.url("disk.qcow2"), wrong)
    offline = run(env, "up", path, "--offline", check=False)
    assert offline.returncode == 1 and "--offline" in offline.stderr and image_server.log == []
    result = run(env, "up", path, check=False)
    assert result.returncode == 2, result.stderr
    assert image_server.url("disk.qcow2") in result.stderr
    assert wrong in result.stderr and sha256(data) in result.stderr  # both digests
    assert qemu_pids(tmp_path) == set()
    assert [
        n for n in cached(env) if not n.endswith(".lock")
    ] == []  # nothing kept, no partial file either
    assert not os.path.exists(tmp_path / "box.qcow2")


def test_interrupted_download_resumes_with_a_range_request(tmp_path, env, image_server):
    data = os.urandom(3 << 20)
    image_server.files["disk.raw"] = data
    image_server.cut["disk.raw"] = 1_234_567
    path = disk_file(tmp_path, image_server.url("disk.raw"), sha256(data))
    first = run(env, "img", "pull", path, check=False)
    assert first.returncode == 1 and "resume" in first.stderr, first.stderr
    listing = json.loads(run(env, "img", "ls", "--json").stdout)
    assert listing["images"] == [] and listing["partial"][0]["bytes"] == 1_234_567
    run(env, "img", "pull", path)
    assert image_server.gets("disk.raw") == [
        None,
        "bytes=1234567-",
    ]  # the second GET fetched only the rest
    [entry] = json.loads(run(env, "img", "ls", "--json").stdout)["images"]
    with open(entry["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert entry["format"] == "raw"


def test_a_file_changed_upstream_between_attempts_comes_whole(tmp_path, env, image_server):
    """The resume carries If-Range: a file replaced upstream is sent whole (200), never glued to the
    old head, so the mismatch names the digest the server's file really has."""
    old, new = os.urandom(2 << 20), os.urandom(2 << 20)
    image_server.files["moving.raw"] = old
    image_server.cut["moving.raw"] = 1 << 20
    path = disk_file(tmp_path, image_server.url("moving.raw"), sha256(old))
    assert run(env, "img", "pull", path, check=False).returncode == 1
    image_server.files["moving.raw"] = new
    result = run(env, "img", "pull", path, check=False)
    assert result.returncode == 2 and sha256(new) in result.stderr, result.stderr
    assert image_server.gets("moving.raw") == [None, f"bytes={1 << 20}-"]
    assert [n for n in cached(env) if not n.endswith(".lock")] == []


def test_https_checks_the_certificate(tmp_path, env):
    from helpers import ImageServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    data = os.urandom(1 << 20)
    with ImageServer(tls=(str(cert), str(key))) as server:
        server.files["tls.raw"] = data
        path = disk_file(tmp_path, server.url("tls.raw"), sha256(data))
        refused = run(env, "img", "pull", path, check=False)
        assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr, (
            refused.stderr
        )
        trusted = run(
            {**env, "SSL_CERT_FILE": str(cert)}, "img", "pull", path
        )  # OpenSSL's own variable
        assert trusted.returncode == 0 and server.gets("tls.raw") == [None]


def test_proxy_variables_are_honoured(tmp_path, env, image_server):
    data = os.urandom(1 << 20)
    image_server.files["via.raw"] = data
    proxied = disk_file(
        tmp_path, "http://images.example.invalid/via.raw", sha256(data), name="proxied.toml"
    )
    proxy = image_server.url("").rstrip("/")
    run({**env, "http_proxy": proxy}, "img", "pull", proxied)
    assert [p for _, p, _ in image_server.log] == ["http://images.example.invalid/via.raw"]
    direct = disk_file(
        tmp_path, image_server.url("via.raw"), sha256(os.urandom(8)), name="direct.toml"
    )
    dead = {**env, "http_proxy": "http://127.0.0.1:9", "no_proxy": "localhost,127.0.0.1"}
    assert (
        run(dead, "img", "pull", direct, check=False).returncode == 2
    )  # reached the server, not the dead proxy
    assert image_server.log[-1][1] == "/via.raw"


def test_two_pulls_at_once_download_once(tmp_path, env, image_server):
    data = os.urandom(2 << 20)
    held = threading.Event()
    image_server.files["shared.raw"] = data
    image_server.hold["shared.raw"] = (1 << 20, held)  # the first download stays in flight
    first = disk_file(tmp_path, image_server.url("shared.raw"), sha256(data), name="one.toml")
    second = disk_file(tmp_path, image_server.url("shared.raw"), sha256(data), name="two.toml")
    a = subprocess.Popen(
        [*CLI, "img", "pull", first],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    b = None
    try:
        deadline = time.monotonic() + 60
        while not image_server.gets("shared.raw"):
            assert time.monotonic() < deadline and a.poll() is None, (
                "the first pull never asked the server"
            )
            time.sleep(0.02)
        b = subprocess.Popen(
            [*CLI, "img", "pull", second],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert b.stderr is not None
        waiting = (
            b.stderr.readline()
        )  # the second pull says it waits for the first (it holds the lock)
        assert "waiting for another qemuspec" in waiting, waiting
        held.set()
        assert a.wait(60) == 0 and b.wait(60) == 0, (
            a.stderr.read() if a.stderr else "",
            b.stderr.read(),
        )
    finally:
        held.set()
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert image_server.gets("shared.raw") == [None]  # one GET in all


def test_two_machines_of_one_file_share_one_download(tmp_path, env, image_server):
    data = os.urandom(1 << 20)
    image_server.files["pair.raw"] = data
    path = disk_file(tmp_path, image_server.url("pair.raw"), sha256(data), machines=("a", "b"))
    pulled = json.loads(run(env, "img", "pull", path, "--json").stdout)
    assert [p["machine"] for p in pulled] == ["a", "b"] and pulled[0]["path"] == pulled[1]["path"]
    assert image_server.gets("pair.raw") == [None]


def test_cached_image_makes_no_request_and_offline_needs_the_cache(tmp_path, env, image_server):
    data = os.urandom(1 << 20)
    image_server.files["disk.raw"] = data
    image_server.files["SHA256SUMS"] = f"{hashlib.sha256(data).hexdigest()} *disk.raw\n".encode()
    path = disk_file(
        tmp_path, image_server.url("disk.raw"), digest_url=image_server.url("SHA256SUMS")
    )
    offline = run(env, "img", "pull", path, "--offline", check=False)
    assert offline.returncode == 1 and "--offline" in offline.stderr
    assert image_server.log == []  # --offline asked nothing, not even the checksum file
    run(env, "img", "pull", path)
    assert [p for _, p, _ in image_server.log] == ["/SHA256SUMS", "/disk.raw"]
    image_server.log.clear()
    run(env, "img", "pull", path)
    run(env, "img", "pull", path, "--offline")
    run({**env, "QEMUSPEC_OFFLINE": "1"}, "img", "pull", path)
    assert (
        image_server.log == []
    )  # the digest (and its lookup) were in the cache: no network at all
    fresh = {**env, "XDG_CACHE_HOME": str(tmp_path / "empty"), "QEMUSPEC_OFFLINE": "1"}
    assert run(fresh, "img", "pull", path, check=False).returncode == 1 and image_server.log == []


@pytest.mark.parametrize("kind", ["xz", "gz"])
def test_compressed_image_is_checked_as_published_and_unpacked(tmp_path, env, image_server, kind):
    raw = os.urandom(1 << 20) + bytes(8 << 20) + b"tail"
    packed = lzma.compress(raw) if kind == "xz" else gzip.compress(raw)
    image_server.files[f"disk.raw.{kind}"] = packed
    path = disk_file(tmp_path, image_server.url(f"disk.raw.{kind}"), sha256(packed))
    [entry] = json.loads(run(env, "img", "pull", path, "--json").stdout)
    with open(entry["path"], "rb") as f:
        assert f.read() == raw
    assert entry["digest"] == sha256(packed) and entry["format"] == "raw"
    assert os.stat(entry["path"]).st_blocks * 512 < len(raw) // 2  # the zeros stayed holes


def test_prune_removes_unused_images(tmp_path, env, image_server):
    data = os.urandom(1 << 20)
    image_server.files["old.raw"] = data
    path = disk_file(tmp_path, image_server.url("old.raw"), sha256(data))
    run(env, "img", "pull", path)
    assert json.loads(run(env, "img", "prune", "--json").stdout)["removed"] == []  # used just now
    assert json.loads(run(env, "img", "prune", "--older-than", "0d", "--json").stdout)[
        "removed"
    ] == [sha256(data)]
    assert json.loads(run(env, "img", "ls", "--json").stdout)["images"] == []


def test_progress_json_events_and_quiet(tmp_path, env, image_server):
    data = os.urandom(2 << 20)
    image_server.files["p.raw"] = data
    path = disk_file(tmp_path, image_server.url("p.raw"), sha256(data))
    result = run(env, "img", "pull", path, "--json")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "image-download" and kinds[-1] == "image-done"
    finished = [e for e in events if e.get("finished")]
    assert finished[0]["bytes"] == len(data) and finished[0]["rate"] > 0
    quiet = run(env, "img", "pull", path, "--quiet")
    assert quiet.stderr == "" and quiet.stdout == ""


def test_progress_bar_on_a_terminal(tmp_path, env, image_server):
    import pty

    data = os.urandom(4 << 20)
    image_server.files["t.raw"] = data
    path = disk_file(tmp_path, image_server.url("t.raw"), sha256(data))
    leader, follower = pty.openpty()
    terminal = {k: v for k, v in env.items() if k != "CI"}
    terminal["TERM"] = "xterm"
    proc = subprocess.Popen(
        [*CLI, "img", "pull", path], env=terminal, stdout=subprocess.PIPE, stderr=follower
    )
    os.close(follower)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        assert proc.wait(60) == 0
    text = seen.decode(errors="replace")
    assert "\r\x1b[2Kt.raw  [" in text and "4.0 MiB / 4.0 MiB" in text and "/s" in text, text
    assert "ETA" in text or "in the cache" in text


def test_file_url_outside_the_tree_needs_the_users_opt_in(tmp_path, env):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    image = outside / "base.raw"
    data = os.urandom(1 << 20)
    image.write_bytes(data)
    tree = tmp_path / "project"
    tree.mkdir()
    (tree / ".git").mkdir()  # the definition's tree is its checkout
    path = disk_file(tree, f"file://{image}", sha256(data))
    refused = run(env, "img", "pull", path, check=False)
    assert refused.returncode == 2 and "--allow-host-paths" in refused.stderr and cached(env) == []
    [entry] = json.loads(run(env, "img", "pull", path, "--allow-host-paths", "--json").stdout)
    with open(entry["path"], "rb") as f:
        assert f.read() == data
    assert image.read_bytes() == data
    inside = tree / "base.raw"
    inside.write_bytes(data[::-1])
    run(
        env,
        "img",
        "pull",
        disk_file(tree, f"file://{inside}", sha256(data[::-1]), name="inside.toml"),
    )
    fifo = tree / "pipe.raw"
    os.mkfifo(fifo)  # nobody writes it: opening it for reading must not hang the pull
    refused = run(
        env,
        "img",
        "pull",
        disk_file(tree, f"file://{fifo}", sha256(b"fifo"), name="fifo.toml"),
        check=False,
    )
    assert refused.returncode == 1 and "not a regular file" in refused.stderr


# -- templates ------------------------------------------------------------------------------------------

TEMPLATE_FORMATS = {"debian-12": "gnu", "ubuntu-24.04": "gnu", "fedora": "bsd", "alpine": "gnu"}


def test_init_list_names_the_templates(env):
    listing = run(env, "init", "--list").stdout
    for name in TEMPLATE_FORMATS:
        assert name in listing


@pytest.mark.parametrize("name", sorted(TEMPLATE_FORMATS))
def test_template_validates_and_pulls_from_a_local_mirror(tmp_path, env, image_server, name):
    """The written definition as is validates; the same definition with its two URLs pointed at a
    local server (same file names, a checksum file in the distribution's own format) pulls."""
    import tomllib

    target = tmp_path / f"{name}.toml"
    run(env, "init", "--template", name, str(target))
    run(env, "validate", str(target))
    text = target.read_text()
    [machine] = tomllib.loads(text)["machines"].values()
    image_url, sums_url = (
        machine["disks"][0]["image"]["url"],
        machine["disks"][0]["image"]["digest_url"],
    )
    assert image_url.startswith("https://") and sums_url.startswith("https://")
    image_name, sums_name = image_url.rsplit("/", 1)[1], sums_url.rsplit("/", 1)[1]
    data = qcow2(tmp_path, name.encode())
    algo = hashlib.sha512 if name in ("debian-12", "alpine") else hashlib.sha256
    hexdigest = algo(data).hexdigest()
    bsd = TEMPLATE_FORMATS[name] == "bsd"
    line = f"SHA256 ({image_name}) = {hexdigest}\n" if bsd else f"{hexdigest}  {image_name}\n"
    image_server.files[image_name] = data
    image_server.files[sums_name] = (
        "# other files\n" + "0" * len(hexdigest) + "  unrelated.qcow2\n" + line
    ).encode()
    mirrored = text.replace(image_url, image_server.url(image_name)).replace(
        sums_url, image_server.url(sums_name)
    )
    target.write_text(mirrored)
    [entry] = json.loads(run(env, "img", "pull", str(target), "--json").stdout)
    assert entry["format"] == "qcow2" and entry["digest"].endswith(hexdigest)
    assert "ssh_public_key" in text and "cloud-init status --wait" in text


def test_readme_boot_a_distribution_section():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = readme.split("## Boot a distribution", 1)[1].split("\n## ", 1)[0]
    assert "qemuspec init --template" in section and "qemuspec up" in section


# -- a real guest on an overlay of a served image -------------------------------------------------------


def test_guest_reads_a_served_image_and_the_base_stays_unchanged(
    tmp_path, env, image_server, guest
):
    marker = b"qemuspec-image-content-7f3a"
    data = qcow2(tmp_path, marker)
    image_server.files["data.qcow2"] = data
    extra = (
        'agent = true\n[[machines.box.disks]]\nfile = "data.qcow2"\n'
        f'image = {{ url = "{image_server.url("data.qcow2")}", digest = "{sha256(data)}" }}\n'
    )
    values = {
        "name": "box",
        "kernel": guest["kernel"],
        "initrd": guest["initrd"],
        "marker": guest["marker"],
        "cmdline": "",
        "memory": "256M",
        "restart": "no",
        "depends": "[]",
        "extra": extra,
    }
    path = tmp_path / "lab.toml"
    path.write_text(MACHINE.format(**values))
    run(env, "up", str(path))
    try:
        [entry] = json.loads(run(env, "img", "ls", "--json").stdout)["images"]
        base = entry["path"]
        seen = run(
            env, "exec", str(path), "--", "/bin/sh", "-c", f"head -c {len(marker)} /dev/vda"
        ).stdout
        assert seen.encode() == marker
        run(
            env,
            "exec",
            str(path),
            "--",
            "/bin/sh",
            "-c",
            "echo guest-wrote-this | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null; sync",
        )
        assert (
            run(env, "exec", str(path), "--", "/bin/sh", "-c", "head -c 16 /dev/vda").stdout
            == "guest-wrote-this"
        )
        nodes = json.loads(
            run(env, "qmp", str(path), "box", "query-named-block-nodes", "--json").stdout
        )
        ro = {n["file"]: n["ro"] for n in nodes if n.get("drv") == "qcow2"}
        assert ro.get(base) is True, ro  # qemu holds the cached base read-only
        assert ro.get(str(tmp_path / "data.qcow2")) is False
    finally:
        run(env, "down", str(path))
    assert qemu_pids(tmp_path) == set()
    with open(base, "rb") as f:
        assert (
            hashlib.sha256(f.read()).hexdigest() == sha256(data).split(":")[1]
        )  # the base never changed
    overlay = subprocess.run(
        ["qemu-img", "info", "--output=json", str(tmp_path / "data.qcow2")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(overlay.stdout)["full-backing-filename"] == base
    assert image_server.gets("data.qcow2") == [None]


def test_run_boots_a_throwaway_overlay_of_the_image(tmp_path, env, image_server, guest):
    marker = b"qemuspec-run-image-91c2"
    data = qcow2(tmp_path, marker)
    image_server.files["run.qcow2"] = data
    extra = (
        'agent = true\n[[machines.box.disks]]\nfile = "run.qcow2"\n'
        f'image = {{ url = "{image_server.url("run.qcow2")}", digest = "{sha256(data)}" }}\n'
    )
    values = {
        "name": "box",
        "kernel": guest["kernel"],
        "initrd": guest["initrd"],
        "marker": guest["marker"],
        "cmdline": "",
        "memory": "256M",
        "restart": "no",
        "depends": "[]",
        "extra": extra,
    }
    path = tmp_path / "lab.toml"
    path.write_text(MACHINE.format(**values))
    result = run(
        env,
        "run",
        str(path),
        "--",
        "/bin/sh",
        "-c",
        f"head -c {len(marker)} /dev/vda; echo scribble | dd of=/dev/vda conv=notrunc 2>/dev/null",
    )
    assert result.stdout.startswith(marker.decode()), result.stderr
    assert not os.path.exists(tmp_path / "run.qcow2")  # the machine's own overlay was never made
    [entry] = json.loads(run(env, "img", "ls", "--json").stdout)["images"]
    with open(entry["path"], "rb") as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == sha256(data)
    assert qemu_pids(tmp_path) == set()


def test_a_nearly_full_file_system_stops_the_download(tmp_path, image_server, monkeypatch):
    """In-process, with the reserve raised past any disk: the check that stops an xz bomb or an
    endless body before the cache's file system fills."""
    from types import SimpleNamespace

    from qemuspec import imagecache

    data = os.urandom(4 << 20)
    image_server.files["big.raw"] = data
    monkeypatch.setattr(imagecache, "RESERVE", 1 << 62)
    monkeypatch.setattr(imagecache, "_ROOM_EVERY", 1)  # check after every chunk
    cache = imagecache.ImageCache(str(tmp_path / "cache"))
    with pytest.raises(imagecache.FetchError, match="less than"):
        cache.ensure(
            SimpleNamespace(url=image_server.url("big.raw"), digest=sha256(data), digest_url=None)
        )
    assert cache.entries() == []


def test_a_cache_others_can_write_is_not_used(tmp_path, env, image_server):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # any local user could swap entries in it
    data = os.urandom(1 << 20)
    image_server.files["x.raw"] = data
    path = disk_file(tmp_path, image_server.url("x.raw"), sha256(data))
    result = run({**env, "XDG_CACHE_HOME": str(shared)}, "img", "pull", path, check=False)
    assert result.returncode == 1 and "XDG_CACHE_HOME" in result.stderr and image_server.log == []


def test_a_checksum_file_lookup_is_kept_until_the_image_stops_matching_it(
    tmp_path, env, image_server
):
    """digest_url is read once (a base never changes under an overlay); when the URL's file no longer
    matches the recorded digest, the pull fails (exit 2) and drops the record, so the next one reads
    the checksum file again and takes the new image."""
    old, new = os.urandom(1 << 20), os.urandom(1 << 20)
    image_server.files["rolling.raw"] = old
    image_server.files["SHA256SUMS"] = f"{hashlib.sha256(old).hexdigest()}  rolling.raw\n".encode()
    path = disk_file(
        tmp_path, image_server.url("rolling.raw"), digest_url=image_server.url("SHA256SUMS")
    )
    run(env, "img", "pull", path)
    image_server.files["rolling.raw"] = new  # upstream publishes a new "latest"
    image_server.files["SHA256SUMS"] = f"{hashlib.sha256(new).hexdigest()}  rolling.raw\n".encode()
    run(env, "img", "pull", path)
    assert [p for _, p, _ in image_server.log] == [
        "/SHA256SUMS",
        "/rolling.raw",
    ]  # cached: the old one stays
    run(env, "img", "prune", "--older-than", "0d")
    stale = run(env, "img", "pull", path, check=False)
    assert (
        stale.returncode == 2
        and "record is dropped" in stale.stderr
        and sha256(new) in stale.stderr
    )
    [entry] = json.loads(run(env, "img", "pull", path, "--json").stdout)
    assert entry["digest"] == sha256(new)
    assert [p for _, p, _ in image_server.log].count("/SHA256SUMS") == 2


@pytest.mark.parametrize("kind", ["backing", "vmdk"])
def test_a_base_that_would_open_host_files_is_refused(tmp_path, env, image_server, kind):
    """A qcow2 naming a backing file, or a vmdk descriptor naming an extent, would make qemu (or
    qemu-img probing it) open a host file: refused after the digest check, nothing kept."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"not for the guest".ljust(1 << 16, b"\0"))
    if kind == "backing":
        made = tmp_path / "evil.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(made)],
            check=True,
        )
        data = made.read_bytes()
    else:
        data = (
            f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
            f'RW 128 FLAT "{secret}" 0\n'
        ).encode()
    image_server.files["evil.img"] = data
    path = disk_file(tmp_path, image_server.url("evil.img"), sha256(data))
    result = run(env, "img", "pull", path, check=False)
    assert result.returncode == 1 and (
        "backing or data file" in result.stderr or "vmdk image" in result.stderr
    )
    assert [n for n in cached(env) if not n.endswith(".lock")] == []
