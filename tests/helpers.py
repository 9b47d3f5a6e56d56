"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os

OPTION_SWITCHES = {
    "-drive",
    "-device",
    "-netdev",
    "-chardev",
    "-fsdev",
    "-object",
    "-machine",
    "-name",
    "-mon",
    "-boot",
    "-spice",
    "-cpu",
}


def qemu_options(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(implied head, [(key, value)]) for an option list, parsed the way qemu parses it."""
    from qemuspec.spec.qemuopts import split_opts

    return split_opts(text, implied="")


def option_args(argv: list[str]) -> list[tuple[str, str]]:
    return [(argv[i], argv[i + 1]) for i in range(len(argv) - 1) if argv[i] in OPTION_SWITCHES]


def _stat(pid) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read()
    except OSError:
        return None


def alive(pid) -> bool:
    """The process exists and is not a zombie (read from /proc, not through qemuspec's own helpers)."""
    stat = _stat(pid)
    return stat is not None and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def qemu_pids(scope) -> set[int]:
    """The live qemu processes whose command line names a path inside ``scope`` (the test's tmp_path or
    project directory: every qemu qemuspec starts gets ``-pidfile`` under its state directory), so a
    test counts its own qemu and never the demo's or another run's on the same host."""
    root = os.path.abspath(os.fspath(scope)).rstrip(os.sep)
    inside = root + os.sep

    def names_scope(arg: str) -> bool:
        return inside in arg or arg == root or arg.endswith("=" + root)

    return {
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit()
        and "(qemu-system-x86" in (_stat(entry) or "")
        and alive(entry)
        and any(names_scope(arg) for arg in _cmdline(entry))
    }


def shipped_definitions() -> list[str]:
    """The definition files shipped in machines/ (not what running them leaves there, such as the
    demo's .qemuspec/ state directory)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "machines")
    return [
        os.path.join(root, name)
        for name in sorted(os.listdir(root))
        if name.endswith((".toml", ".yaml", ".yml")) and os.path.isfile(os.path.join(root, name))
    ]


class ImageServer:
    """A real HTTP server on 127.0.0.1 (http.server in a thread) for base images: serves ``files``
    (name -> bytes or a path on disk), honours ``Range: bytes=N-`` with 206, logs every request as
    (method, path, Range header), sends an ETag and honours ``If-Range`` (a stale validator gets the
    whole file, 200), acts as an HTTP proxy for absolute-form requests (``GET http://any.host/NAME``,
    logged with the full URL), serves TLS with ``tls=(certfile, keyfile)``, and can misbehave on
    purpose: ``cut[name] = N`` sends N bytes of
    the body then closes the connection (once), ``hold[name] = (N, event)`` sends N bytes and waits
    for the event before the rest (to keep a download in flight while a test looks at it).

        with ImageServer() as server:
            server.files["disk.qcow2"] = data
            url = server.url("disk.qcow2")
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        import threading

        self.tls = tls
        self.files: dict[str, bytes | str] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.hold: dict[str, tuple[int, threading.Event]] = {}
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None

    def url(self, name: str) -> str:
        assert self._server is not None
        return (
            f"{'https' if self.tls else 'http'}://127.0.0.1:{self._server.server_address[1]}/{name}"
        )

    def gets(self, name: str) -> list[str | None]:
        """The Range header (None: a whole-file GET) of each GET of ``name``."""
        with self._lock:
            return [rng for method, path, rng in self.log if method == "GET" and path == "/" + name]

    def __enter__(self) -> "ImageServer":
        import http.server
        import threading

        server_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import urlsplit

                name = urlsplit(self.path).path.lstrip("/")
                with server_self._lock:
                    shown = (
                        self.path if "://" in self.path else "/" + name
                    )  # a proxied request keeps its URL
                    server_self.log.append(("GET", shown, self.headers.get("Range")))
                    source = server_self.files.get(name)
                    cut = server_self.cut.pop(name, None)
                    hold = server_self.hold.get(name)
                if source is None:
                    self.send_error(404)
                    return
                import hashlib

                size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
                identity = (
                    source
                    if isinstance(source, bytes)
                    else f"{source}:{os.stat(source).st_mtime_ns}".encode()
                )
                etag = '"' + hashlib.sha256(identity).hexdigest()[:16] + '"'
                start = 0
                rng = self.headers.get("Range")
                if self.headers.get("If-Range") not in (None, etag):
                    rng = None  # changed since the part the client has: the whole file
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", etag)
                self.end_headers()
                limit = size if cut is None else min(size, start + cut)
                try:
                    if hold is not None:
                        self._send(source, start, min(limit, start + hold[0]))
                        hold[1].wait(60)
                        start = min(limit, start + hold[0])
                    self._send(source, start, limit)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if cut is not None:
                    self.close_connection = True

            def _send(self, source: bytes | str, start: int, end: int) -> None:
                if isinstance(source, bytes):
                    self.wfile.write(source[start:end])
                    return
                with open(source, "rb") as f:
                    offset = start
                    while offset < end:
                        offset += self.connection.sendfile(f, offset, end - offset) or (
                            end - offset
                        )

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for _, event in self.hold.values():
            event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
