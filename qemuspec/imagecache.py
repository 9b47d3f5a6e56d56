"""Base images by URL and digest: one content-addressed cache per user, shared by every definition.

Why this shape: a distribution's cloud image is hundreds of MiB that every machine built on it shares,
and the only thing that says it is the right file is its digest. So an entry is named by the digest
(``sha256-HEX``), filled only through a temporary ``.part`` file whose digest is computed while the
bytes arrive, and renamed into place only when it matches; a mismatch deletes the partial file and is
an error (exit 2) naming the URL and both digests, before any qemu starts. Nothing touches the
network when the digest is in the cache; a checksum-file lookup (``digest_url``) is recorded too, so
a cached image needs no request either (and a base never changes under an overlay made on it).

- Resume: an interrupted download keeps its ``.part`` file; the next pull hashes what is there and
  asks for the rest with an HTTP ``Range`` (a server answering 200 instead restarts it from 0).
- One download per image: a flock per digest, held for the download; a second pull waits for it and
  then finds the entry.
- Compressed images (``.xz``, ``.gz`` URLs): the digest is of the file as published (what checksum
  files list), checked on the compressed bytes; the entry holds the unpacked image.
- A base must stand alone: raw or qcow2 only (vmdk descriptors name host files), and a qcow2 with a
  backing or external data file is refused, so a downloaded header cannot make qemu open a host file.
  Entries are 0400; overlays name them as their backing file, which qemu opens read-only.
- HTTP client: the standard library (``urllib.request``: https with the system CA store through
  ``ssl.create_default_context``, proxies passed in from settings, redirects); ``Range`` is one header,
  so a library would buy nothing here. Imported only when a download happens (``_open``).

Everything is relative to the cache directory's descriptor (``privdir``): a cache another user could
change is not used at all (an error naming XDG_CACHE_HOME).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

from qemuspec import privdir
from qemuspec.errors import QemuspecError

if TYPE_CHECKING:
    from urllib.request import OpenerDirector

    from qemuspec.settings import Settings

DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
SCHEMES = ("http", "https", "file")
CHUNK = 1 << 20
CHECKSUM_LIMIT = 4 << 20  # a checksum file is text; more than this is not one
_HEX_ALGO = {64: "sha256", 128: "sha512"}
_FORMATS = ("qcow2", "raw")
_ZERO = bytes(CHUNK)
# magic bytes of image formats refused as bases (qemu's own probes look for the same)
_OTHER_FORMATS = (
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"COWD", "vmdk"),
    (b"QED\x00", "qed"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"LUKS\xba\xbe", "luks"),
    (b"OOOM", "cow"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format", "cloop"),
)
RESERVE = (
    1 << 30
)  # a download or unpack stops before it leaves less than this free (a bomb, an endless body)
_ROOM_EVERY = 256  # chunks between free-space checks
_FLUSH_EVERY = 64  # chunks between early write-backs

Report = Callable[[dict], Any]


class ImageSource(Protocol):
    """What a definition says about a base image (the model's ``Image``, or a cached record)."""

    url: str
    digest: str | None
    digest_url: str | None


class FetchError(QemuspecError):
    """An image could not be fetched (network, server, offline, cache unusable): a runtime failure."""


class DigestMismatch(QemuspecError):
    """The bytes fetched are not what the definition's digest says: bad input, exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class Entry:
    """A base image in the cache."""

    digest: str
    path: str
    format: str
    size: int
    url: str
    compressed: str | None
    pulled: float
    used: float


def entry_name(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"{algo}-{hexdigest}"


def compression(url: str) -> str | None:
    """ "xz" or "gz" when the URL names a compressed file (by its suffix), else None."""
    path = url.split("?", 1)[0].split("#", 1)[0].lower()
    for suffix, kind in ((".xz", "xz"), (".gz", "gz")):
        if path.endswith(suffix):
            return kind
    return None


def basename(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def parse_checksums(text: str, name: str) -> str | None:
    """The digest ``name`` has in a checksum file, as ``algo:hex``: GNU coreutils lines (``HEX  name``,
    ``HEX *name``: Debian's SHA512SUMS, Ubuntu's SHA256SUMS, Alpine's .sha512) and BSD lines
    (``SHA256 (name) = HEX``: Fedora's CHECKSUM). The algorithm follows from the length of the hex."""
    for raw in text.splitlines():
        line = raw.strip()
        bsd = re.match(r"^(SHA256|SHA512) \((.+)\) = ([0-9A-Fa-f]+)$", line)
        if bsd:
            algo, found, hexdigest = bsd.group(1).lower(), bsd.group(2), bsd.group(3).lower()
        else:
            gnu = re.match(r"^([0-9A-Fa-f]{64}|[0-9A-Fa-f]{128}) [ *](.+)$", line)
            if not gnu:
                continue
            hexdigest, found = gnu.group(1).lower(), gnu.group(2)
            algo = _HEX_ALGO[len(hexdigest)]
        if os.path.basename(found.strip()) == name and _HEX_ALGO.get(len(hexdigest)) == algo:
            return f"{algo}:{hexdigest}"
    return None


def from_settings(
    settings: "Settings", offline: bool = False, report: Report | None = None
) -> "ImageCache":
    """The user's cache as settings say (directory, QEMUSPEC_OFFLINE or ``offline``, proxies)."""
    return ImageCache(
        settings.images,
        offline=offline or settings.offline,
        proxies=settings.proxies,
        report=report,
    )


class ImageCache:
    """The user's image cache: ``ensure`` an image (pull it when missing), ``entries``, ``prune``."""

    def __init__(
        self,
        directory: str,
        *,
        offline: bool = False,
        proxies: Mapping[str, str] | None = None,
        report: Report | None = None,
        interval: float = 0.25,
    ):
        self.directory = directory
        self.offline = offline
        self.proxies = dict(proxies or {})
        self.report = report or (lambda event: None)
        self.interval = interval

    # -- the directory ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _dir(self, create: bool = True) -> Iterator[int]:
        fd = privdir.open_private(self.directory, create)
        if fd is None:
            if not create and not os.path.lexists(self.directory):
                raise FileNotFoundError(self.directory)
            raise FetchError(
                f"the image cache {self.directory} (or a directory above it) can be changed by another "
                "user or is not this user's, so qemuspec does not use it: set XDG_CACHE_HOME to a "
                "directory of yours that only you can write"
            )
        try:
            yield fd
        finally:
            os.close(fd)

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, entry_name(digest))

    def _meta(self, dfd: int, digest: str) -> dict | None:
        data = privdir.read(dfd, entry_name(digest) + ".json", 1 << 16)
        try:
            meta = json.loads(data) if data else None
        except ValueError:
            return None
        if (
            not isinstance(meta, dict)
            or meta.get("digest") != digest
            or meta.get("format") not in _FORMATS
        ):
            return None
        try:
            info = os.stat(entry_name(digest), dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        return meta

    def _entry(self, dfd: int, digest: str, meta: dict) -> Entry:
        used = os.stat(entry_name(digest) + ".json", dir_fd=dfd, follow_symlinks=False).st_mtime
        size = os.stat(entry_name(digest), dir_fd=dfd, follow_symlinks=False).st_size
        return Entry(
            digest,
            self.path(digest),
            meta["format"],
            size,
            str(meta.get("url", "")),
            meta.get("compressed"),
            float(meta.get("pulled", 0)),
            used,
        )

    # -- looking digests up ---------------------------------------------------------------------------

    def resolve(self, image: ImageSource) -> str:
        """The image's digest: as written, or looked up in its checksum file (once; recorded)."""
        if image.digest:
            return image.digest.lower()
        assert image.digest_url, "the model requires digest or digest_url"
        name = basename(image.url)
        key = _lookup_name(image)
        with self._dir() as dfd:
            data = privdir.read(dfd, key, 1 << 16)
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                found = json.loads(data or b"").get("digest")
                if isinstance(found, str) and DIGEST.match(found):
                    return found
            if self.offline:
                raise FetchError(
                    f"{image.digest_url}: --offline, and the digest of {name} has not been looked up "
                    'yet: run `qemuspec img pull` once with network, or write digest = "sha256:..."'
                )
            text = self._small(image.digest_url)
            digest = parse_checksums(text, name)
            if digest is None:
                raise FetchError(
                    f"{image.digest_url} lists no sha256/sha512 digest for {name}: check that digest_url "
                    "is the checksum file of the directory the url points into, or write digest = "
                    '"sha256:..." yourself'
                )
            privdir.write(
                dfd,
                key,
                json.dumps(
                    {
                        "digest": digest,
                        "digest_url": image.digest_url,
                        "name": name,
                        "looked_up": time.time(),
                    }
                ).encode(),
            )
            return digest

    def _small(self, url: str) -> str:
        with self._open(url, 0) as (response, _status, _total, _validator):
            data = response.read(CHECKSUM_LIMIT + 1)
        if len(data) > CHECKSUM_LIMIT:
            raise FetchError(
                f"{url} is larger than {CHECKSUM_LIMIT >> 20} MiB: that is not a checksum file"
            )
        return data.decode("utf-8", errors="replace")

    # -- the cache ------------------------------------------------------------------------------------

    def ensure(self, image: ImageSource) -> Entry:
        """The cached base of ``image``, downloaded, checked and unpacked first when missing."""
        digest = self.resolve(image)
        with self._dir() as dfd:
            meta = self._meta(dfd, digest)
            if meta is None:
                if self.offline:
                    raise FetchError(
                        f"{image.url} ({digest}) is not in the image cache {self.directory} and --offline "
                        "forbids downloading it: run `qemuspec img pull FILE` with network first"
                    )
                with self._locked(dfd, digest, image.url):
                    meta = self._meta(dfd, digest)  # another pull may have finished while we waited
                    if meta is None:
                        try:
                            meta = self._pull(dfd, image.url, digest)
                        except DigestMismatch as exc:
                            if image.digest is not None:
                                raise
                            with contextlib.suppress(
                                FileNotFoundError
                            ):  # the next pull reads the file again
                                os.unlink(_lookup_name(image), dir_fd=dfd)
                            raise DigestMismatch(
                                f"{exc} (the digest came from {image.digest_url} when it was "
                                "first read; that record is dropped, so the next pull reads the "
                                "checksum file again)"
                            ) from None
                    else:
                        self.report({"event": "image-cached", "url": image.url, "digest": digest})
            else:
                self.report({"event": "image-cached", "url": image.url, "digest": digest})
            with contextlib.suppress(OSError):  # last use, for `img prune --older-than`
                os.utime(entry_name(digest) + ".json", dir_fd=dfd, follow_symlinks=False)
            return self._entry(dfd, digest, meta)

    @contextlib.contextmanager
    def _locked(self, dfd: int, digest: str, url: str) -> Iterator[None]:
        import fcntl

        fd = os.open(
            entry_name(digest) + ".lock",
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.report({"event": "image-waiting", "url": url, "digest": digest})
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _pull(self, dfd: int, url: str, digest: str) -> dict:
        algo, _, want = digest.partition(":")
        part = entry_name(digest) + ".part"
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise FetchError(
                    f"{self.directory}/{part} is not a regular file of this user's: remove it"
                )
            hasher = hashlib.new(algo)
            have = _hash_existing(fd, hasher)
            got = self._download(dfd, url, digest, fd, hasher, have)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part + ".json", dir_fd=dfd)
            if got != want:
                os.ftruncate(fd, 0)
                os.unlink(part, dir_fd=dfd)
                raise DigestMismatch(
                    f"{url}: the downloaded file's digest is {algo}:{got}, but the definition expects {digest}: "
                    "nothing was kept and no machine was started; if the image was updated upstream, put its new "
                    "digest in the definition (or use digest_url); otherwise do not trust what that URL serves"
                )
            os.fsync(fd)
        finally:
            os.close(fd)
        kind = compression(url)
        name = entry_name(digest)
        if kind:
            tmp = f".{name}.{os.urandom(6).hex()}.unpack"
            try:
                self.report(
                    {"event": "image-unpack", "url": url, "digest": digest, "compression": kind}
                )
                _unpack(dfd, part, tmp, kind, url)
                fmt = self._check_base(dfd, tmp, url)
                os.chmod(tmp, 0o400, dir_fd=dfd, follow_symlinks=False)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                if isinstance(
                    exc, FetchError
                ):  # verified but unusable: nothing is kept (an interrupt keeps it)
                    with contextlib.suppress(OSError):
                        os.unlink(part, dir_fd=dfd)
                raise
            os.unlink(part, dir_fd=dfd)
        else:
            try:
                fmt = self._check_base(dfd, part, url)
            except BaseException:
                os.unlink(part, dir_fd=dfd)
                raise
            os.chmod(part, 0o400, dir_fd=dfd, follow_symlinks=False)
            os.replace(part, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        meta = {
            "digest": digest,
            "url": url,
            "format": fmt,
            "compressed": kind,
            "pulled": time.time(),
        }
        privdir.write(dfd, name + ".json", json.dumps(meta).encode())
        self.report(
            {
                "event": "image-done",
                "url": url,
                "digest": digest,
                "size": os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size,
            }
        )
        return meta

    def _check_base(self, dfd: int, name: str, url: str) -> str:
        """The verified file's format; refused unless it is raw or a qcow2 standing alone. The format
        is read from the magic bytes here, never probed by qemu-img (a vmdk descriptor names host files
        that probing would open); only a qcow2 goes to ``qemu-img info -f qcow2`` for its header."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            head = os.pread(fd, 512, 0)
        finally:
            os.close(fd)
        other = next((kind for magic, kind in _OTHER_FORMATS if head.startswith(magic)), None)
        if other:
            raise FetchError(
                f"{url} is a {other} image: qemuspec takes raw or qcow2 bases only (other formats can "
                "name host files); convert it with `qemuspec img convert -O qcow2` and serve that"
            )
        if not head.startswith(b"QFI\xfb"):
            return "raw"
        from qemuspec import img

        found = img.ImageInfo.from_json(
            json.loads(
                img.run(
                    "info", "--output=json", "-U", "-f", "qcow2", os.path.join(self.directory, name)
                )
            )
        )
        specific = (found.raw.get("format-specific") or {}).get("data") or {}
        if found.backing or specific.get("data-file"):
            raise FetchError(
                f"{url} is a qcow2 image with a backing or data file "
                f"({found.backing or specific.get('data-file')}): a base image must stand alone, or its "
                "header could make qemu open a host file"
            )
        return "qcow2"

    def _download(self, dfd: int, url: str, digest: str, fd: int, hasher: Any, have: int) -> str:
        """Append the rest of ``url`` from offset ``have`` to ``fd`` (zero chunks as holes), hashing as
        the bytes arrive; the hex digest of the whole file. A resume sends ``If-Range`` with the
        validator (ETag, else Last-Modified) the first response had, so a file changed upstream in
        between comes whole (200) instead of as a tail glued to the old head."""
        part = entry_name(digest) + ".part.json"
        validator = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            validator = json.loads(privdir.read(dfd, part, 1 << 14) or b"").get("validator")
        with self._open(url, have, validator if isinstance(validator, str) else None) as (
            response,
            status,
            total,
            new,
        ):
            if have and status != 206:  # the server sent the whole file: start again
                os.ftruncate(fd, 0)
                hasher = hashlib.new(hasher.name)
                have = 0
            if status != 206 and new:
                privdir.write(
                    dfd, part, json.dumps({"url": url, "validator": new}).encode(), sync=False
                )
            offset = have
            started = last = time.monotonic()
            event = {
                "event": "image-download",
                "url": url,
                "digest": digest,
                "bytes": offset,
                "total": total,
                "resumed_at": have or None,
            }
            self.report(dict(event, rate=0.0))
            from http.client import HTTPException

            sink = _Sink(fd, hasher, offset)
            try:
                while True:
                    buffer = sink.buffer()
                    try:
                        count = _fill(response, memoryview(buffer))
                    except (OSError, HTTPException) as exc:
                        sink.close()
                        os.ftruncate(fd, sink.offset)  # what arrived stays for the resume
                        raise FetchError(
                            f"{url}: the download broke off after {sink.offset} bytes ({exc}): run the "
                            "command again to resume it"
                        ) from None
                    if not count:
                        break
                    sink.put(buffer, count)
                    offset += count
                    now = time.monotonic()
                    if now - last >= self.interval:
                        last = now
                        self.report(
                            dict(
                                event, bytes=offset, rate=(offset - have) / max(now - started, 1e-6)
                            )
                        )
            finally:
                sink.close()
            if total is not None and offset < total:
                os.ftruncate(fd, offset)
                raise FetchError(
                    f"{url}: the server closed the connection after {offset} of {total} bytes: run the "
                    "command again to resume the download"
                )
            os.ftruncate(fd, offset)
            elapsed = max(time.monotonic() - started, 1e-6)
            self.report(
                dict(
                    event, bytes=offset, total=offset, rate=(offset - have) / elapsed, finished=True
                )
            )
        return hasher.hexdigest()

    @contextlib.contextmanager
    def _open(
        self, url: str, offset: int, validator: str | None = None
    ) -> Iterator[tuple[IO[bytes], int, int | None, str | None]]:
        """(response, status, total size or None, validator) for ``url`` from byte ``offset``; 206 when
        resumed."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "file":
            from urllib.parse import unquote, urlsplit

            path = unquote(urlsplit(url).path)
            try:  # non-blocking: a FIFO must not hang the pull; only a regular file is an image
                raw = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise FetchError(f"{url}: cannot open {path} ({exc.strerror})") from None
            if not stat.S_ISREG(os.fstat(raw).st_mode):
                os.close(raw)
                raise FetchError(
                    f"{url}: {path} is not a regular file: a file URL names an image file"
                )
            with os.fdopen(raw, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                yield f, 206 if offset else 200, size, None
            return
        if self.offline:
            raise FetchError(f"{url}: --offline forbids downloading")
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            url, headers={"User-Agent": "qemuspec", "Accept-Encoding": "identity"}
        )
        if offset:
            request.add_header("Range", f"bytes={offset}-")
            if validator:
                request.add_header("If-Range", validator)
        try:
            response = self._opener(url).open(request, timeout=60)
        except urllib.error.HTTPError as exc:
            if (
                exc.code == 416 and offset
            ):  # nothing left past the partial file: it is complete (or wrong)
                import io

                yield io.BytesIO(b""), 206, offset, None
                return
            raise FetchError(
                f"{url}: the server answered {exc.code} {exc.reason}: check the URL"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(
                f"{url}: cannot download ({reason}): check the URL and the network (proxy variables: "
                "http_proxy, https_proxy, no_proxy), or use an image already in the cache"
            ) from None
        with response:
            status = response.status
            length = response.headers.get("Content-Length")
            total = (
                int(length) + (offset if status == 206 else 0)
                if length and length.isdigit()
                else None
            )
            if status == 206:
                match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != offset:
                    raise FetchError(
                        f"{url}: the server resumed at the wrong offset "
                        f"({response.headers.get('Content-Range')!r} for byte {offset})"
                    )
            etag = response.headers.get("ETag")
            yield (
                response,
                status,
                total,
                etag
                if etag and not etag.startswith("W/")
                else response.headers.get("Last-Modified"),
            )

    def _opener(self, url: str) -> "OpenerDirector":
        import ssl
        import urllib.request
        from urllib.parse import urlsplit

        host = urlsplit(url).hostname or ""
        proxies = {k: v for k, v in self.proxies.items() if k != "no"}
        if proxies and _bypass(host, self.proxies.get("no", "")):
            proxies = {}
        return urllib.request.build_opener(
            urllib.request.ProxyHandler(proxies),
            urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        )

    # -- ls and prune ---------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        try:
            with self._dir(create=False) as dfd:
                out = []
                for name in sorted(os.listdir(dfd)):
                    m = re.match(r"^(sha256|sha512)-([0-9a-f]+)\.json$", name)
                    if m:
                        digest = f"{m.group(1)}:{m.group(2)}"
                        meta = self._meta(dfd, digest)
                        if meta:
                            out.append(self._entry(dfd, digest, meta))
                return out
        except FileNotFoundError:
            return []

    def partial(self) -> list[tuple[str, int]]:
        """Interrupted downloads: (name, bytes so far)."""
        try:
            with self._dir(create=False) as dfd:
                return [
                    (n, os.stat(n, dir_fd=dfd, follow_symlinks=False).st_size)
                    for n in sorted(os.listdir(dfd))
                    if n.endswith(".part")
                ]
        except FileNotFoundError:
            return []

    def prune(self, older_than: float | None = None, everything: bool = False) -> list[str]:
        """Remove entries not used for ``older_than`` seconds (all with ``everything``), interrupted
        downloads and stale lookups; what was removed. An overlay on a removed base needs it again:
        the next `up` pulls it back to the same path (entries are named by digest)."""
        removed = []
        now = time.time()
        try:
            with self._dir(create=False) as dfd:
                for entry in self.entries():
                    if everything or (older_than is not None and now - entry.used > older_than):
                        name = entry_name(entry.digest)
                        for suffix in ("", ".json", ".lock"):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(name + suffix, dir_fd=dfd)
                        removed.append(entry.digest)
                for name in os.listdir(dfd):
                    if name.endswith((".part", ".part.json", ".unpack")) or (
                        everything and name.startswith("lookup-")
                    ):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=dfd)
                        removed.append(name)
        except FileNotFoundError:
            pass
        return removed


def _bypass(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (curl's rules: "*", names, ".domain" suffixes, optional :port) exempts ``host``."""
    host = host.lower().strip("[]")
    for item in no_proxy.lower().split(","):
        entry = item.strip().rsplit(":", 1)[0] if item.count(":") == 1 else item.strip()
        entry = entry.strip("[]").lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return True
    return False


class _Sink:
    """Hashes and writes the chunks the network thread reads, in a thread of its own: recv, sha256 and
    pwrite all release the GIL, so receiving the next chunk overlaps hashing and writing this one
    (bench/pull.py). A few fixed buffers circulate, so memory stays flat whatever the image's size.
    All-zero chunks become holes: sparse images stay sparse in the cache."""

    def __init__(self, fd: int, hasher: Any, offset: int, buffers: int = 4):
        import queue
        import threading

        self.fd, self.hasher, self.offset = fd, hasher, offset
        self._closed = False
        self._chunks = 0
        self._dirty = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush, name="qemuspec-image-flush", daemon=True
        )
        self._flusher.start()
        self.error: BaseException | None = None
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        for _ in range(buffers):
            self._free.put(bytearray(CHUNK))
        self._thread = threading.Thread(target=self._run, name="qemuspec-image-sink", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        self._raise()
        return self._free.get()

    def put(self, buffer: bytearray, count: int) -> None:
        self._full.put((buffer, count))

    def close(self) -> None:
        """Wait until every chunk put is hashed and written (then ``offset`` is the file's length)."""
        if not self._closed:
            self._closed = True
            self._full.put(None)
            self._thread.join()
            self._dirty.set()
            self._flusher.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, OSError):
                raise FetchError(
                    f"cannot write the image cache: {error.strerror or error} (free some space, or "
                    "`qemuspec img prune`)"
                ) from None
            raise error

    def _flush(self) -> None:
        """Write back what is written so far while the download goes on (fdatasync here blocks only
        this thread), so the fsync before the rename finds little left: the disk works in parallel
        with the network instead of after it."""
        while not self._closed:
            self._dirty.wait()
            self._dirty.clear()
            if self._closed:
                return
            with contextlib.suppress(OSError):  # the final fsync reports what matters
                os.fdatasync(self.fd)

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, count = item
            if self.error is None:
                try:
                    data = memoryview(buffer)[:count]
                    self.hasher.update(data)
                    if count != CHUNK or buffer != _ZERO:
                        written = 0
                        while written < count:
                            written += os.pwrite(self.fd, data[written:], self.offset + written)
                    self.offset += count
                    self._chunks += 1
                    if self._chunks % _FLUSH_EVERY == 0:
                        self._dirty.set()
                    if self._chunks % _ROOM_EVERY == 0:
                        _room(self.fd)
                except (
                    BaseException
                ) as exc:  # ENOSPC, EIO: raised in the network thread at its next chunk
                    self.error = exc
            self._free.put(buffer)


def _lookup_name(image: ImageSource) -> str:
    """The cache's record of a digest_url lookup for this image's file name."""
    key = f"{image.digest_url}\n{basename(image.url)}".encode()
    return "lookup-" + hashlib.sha256(key).hexdigest()[:32] + ".json"


def _room(fd: int) -> None:
    """Refuse to go on when the cache's file system is nearly full: a compressed image can unpack to
    far more than it says, and a server can send without end before the digest is known."""
    info = os.fstatvfs(fd)
    if info.f_bavail * info.f_frsize < RESERVE:
        raise FetchError(
            f"the image cache's file system has less than {RESERVE >> 30} GiB left: the image was not "
            "kept (a compressed image may unpack to far more than its size); free some space, or "
            "`qemuspec img prune`"
        )


def _fill(response: Any, view: memoryview) -> int:
    """Read until ``view`` is full or the stream ends (fewer, larger hash and write calls)."""
    count = 0
    while count < len(view):
        got = response.readinto(view[count:])
        if not got:
            break
        count += got
    return count


def _hash_existing(fd: int, hasher: Any) -> int:
    """Feed the bytes already in a partial file to ``hasher``; their count."""
    size = os.fstat(fd).st_size
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(CHUNK, size - offset), offset)
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    return offset


def _unpack(dfd: int, source: str, target: str, kind: str, url: str) -> None:
    """Decompress ``source`` into a new ``target`` (O_EXCL, 0600), zero chunks as holes."""
    import gzip
    import lzma

    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    out = os.open(
        target,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dfd,
    )
    try:
        with os.fdopen(src, "rb") as raw:
            stream: IO[bytes] = lzma.open(raw) if kind == "xz" else gzip.open(raw)  # type: ignore[assignment]
            offset = 0
            try:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    if len(chunk) != CHUNK or chunk != _ZERO:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.pwrite(out, view, offset + len(chunk) - len(view)) :]
                    offset += len(chunk)
                    if offset % (_ROOM_EVERY * CHUNK) == 0:
                        _room(out)
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise FetchError(
                    f"{url}: the file matches its digest but does not unpack as {kind} ({exc}): "
                    "check that the URL names the compressed image"
                ) from None
        os.ftruncate(out, offset)
        os.fsync(out)
    finally:
        os.close(out)
