"""`qemuspec img ...`: the qemu-img wrapper on the command line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable

from qemuspec import img as qemu_img
from qemuspec.cli.common import Context, emit_json
from qemuspec.errors import UsageError

if TYPE_CHECKING:
    from qemuspec.imagecache import Entry, ImageCache
    from qemuspec.spec.models import File


def _bar(ctx: Context, stream=sys.stderr) -> Callable[[float], None] | None:
    """A progress bar on a terminal; None (nothing printed) otherwise, so CI logs stay quiet."""
    if not stream.isatty() or ctx.out.json or ctx.out.quiet:
        return None
    width = 40

    def show(percent: float) -> None:
        done = int(width * percent / 100)
        stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {percent:5.1f}%")
        stream.flush()
        if percent >= 100:
            stream.write("\n")

    return show


def img(ctx: Context, *, img_command: str) -> int:
    action = ACTIONS[img_command]
    code = action.__code__
    params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    namespace = ctx.extra["namespace"]
    return action(ctx, **{name: getattr(namespace, name) for name in params if name != "ctx"})


def _done(ctx: Context, text: str, **data: object) -> int:
    if ctx.out.json:
        emit_json(data)
    else:
        ctx.out.say(text)
    return 0


def create(
    ctx: Context,
    *,
    file: str,
    size: str | None,
    format: str,
    backing: str | None,
    backing_format: str | None,
) -> int:
    if size is None and not backing:
        raise UsageError("img create needs a SIZE, or --backing for an overlay")
    qemu_img.create(file, size, format, backing=backing, backing_format=backing_format)
    return _done(ctx, f"created {file}", created=file, format=format, size=size, backing=backing)


def info(ctx: Context, *, file: str) -> int:
    found = qemu_img.info(file)
    if ctx.out.json:
        emit_json(found.as_dict())
        return 0
    print(
        f"file:         {found.filename}\nformat:       {found.format}\nvirtual size: {found.virtual_size}"
    )
    if found.actual_size is not None:
        print(f"disk size:    {found.actual_size}")
    if found.backing:
        print(f"backing:      {found.backing} ({found.backing_format or '?'})")
    for snap in found.snapshots:
        print(f"snapshot:     {snap.name} (id {snap.id})")
    return 0


def convert(ctx: Context, *, source: str, target: str, format: str, compress: bool) -> int:
    qemu_img.convert(source, target, format, progress=_bar(ctx), compress=compress)
    return _done(
        ctx,
        f"converted {source} -> {target} ({format})",
        source=source,
        target=target,
        format=format,
    )


def resize(ctx: Context, *, file: str, size: str, shrink: bool) -> int:
    qemu_img.resize(file, size, shrink=shrink)
    return _done(ctx, f"resized {file} to {size}", file=file, size=size)


def snapshot(ctx: Context, *, action: str, file: str, tag: str | None) -> int:
    if action != "list" and not tag:
        raise UsageError(f"img snapshot {action} needs a TAG")
    result = qemu_img.snapshot(file, action, tag)
    if result is not None:
        if ctx.out.json:
            emit_json([s.__dict__ for s in result])
        else:
            for snap in result:
                print(snap.name)
        return 0
    return _done(ctx, f"{file}: snapshot {tag}: {action} done", file=file, action=action, tag=tag)


def check(ctx: Context, *, file: str) -> int:
    report = qemu_img.check(file)
    if ctx.out.json:
        emit_json(report)
    else:
        ctx.out.say(f"{file}: no errors found")
    return 0


def rebase(
    ctx: Context, *, file: str, backing: str, backing_format: str | None, unsafe: bool
) -> int:
    qemu_img.rebase(file, backing, backing_format, unsafe=unsafe)
    return _done(
        ctx,
        f"{file} now backed by {os.path.abspath(backing)}",
        file=file,
        backing=os.path.abspath(backing),
    )


def image_cache(ctx: Context) -> "ImageCache":
    """The user's image cache with this command's progress and --offline (or QEMUSPEC_OFFLINE)."""
    from qemuspec.imagecache import from_settings

    offline = bool(getattr(ctx.extra.get("namespace"), "offline", False))
    return from_settings(ctx.settings, offline=offline, report=ctx.out.downloads())


def ensure_images(ctx: Context, spec: "File", names: list[str]) -> list[tuple[str, int, "Entry"]]:
    """Every base image the named machines' disks need, in the cache (pulled first when missing, each
    digest once): `up`, `run` and `img pull` call this before anything starts, so a wrong digest or a
    missing image under --offline stops them before any qemu runs. (machine, disk index, entry) each."""
    cache = None
    done: dict[tuple, "Entry"] = {}
    out = []
    for name in names:
        for index, disk in enumerate(spec.machines[name].disks):
            if disk.image is None:
                continue
            cache = cache or image_cache(ctx)
            key = (disk.image.url, disk.image.digest, disk.image.digest_url)
            if key not in done:
                done[key] = cache.ensure(disk.image)
            out.append((name, index, done[key]))
    return out


def pull(ctx: Context, *, allow_host_paths: bool = False) -> int:
    from qemuspec.spec.preflight import host_path_problems

    target = ctx.target
    spec, lines = target.load()
    names = target.machines()
    problems = host_path_problems(
        spec, target.path, names, allow_host_paths, ctx.settings.var_environ()
    )
    if problems:  # a file:// image outside the tree: the user's opt-in, as for `up`
        from qemuspec.errors import SpecError
        from qemuspec.spec.messages import located

        raise SpecError(located(target.path, lines, problems))
    pulled = ensure_images(ctx, spec, names)
    if ctx.out.json:
        emit_json(
            [
                {
                    "machine": name,
                    "disk": index,
                    "digest": e.digest,
                    "path": e.path,
                    "format": e.format,
                    "size": e.size,
                    "url": e.url,
                }
                for name, index, e in pulled
            ]
        )
    elif not pulled:
        ctx.out.say(f"{target.path}: no disk of these machines names an image")
    else:
        for name, index, e in pulled:
            ctx.out.say(f"{name}: disks.{index}: {e.digest[:19]}... {_human(e.size)} {e.path}")
    return 0


def _human(n: float) -> str:
    from qemuspec.cli.progress import _size

    return _size(n)


def ls(ctx: Context) -> int:
    cache = image_cache(ctx)
    entries = cache.entries()
    if ctx.out.json:
        emit_json(
            {
                "directory": cache.directory,
                "images": [
                    {
                        "digest": e.digest,
                        "path": e.path,
                        "format": e.format,
                        "size": e.size,
                        "url": e.url,
                        "compressed": e.compressed,
                        "pulled": e.pulled,
                        "used": e.used,
                    }
                    for e in entries
                ],
                "partial": [{"name": n, "bytes": b} for n, b in cache.partial()],
            }
        )
        return 0
    if not entries:
        ctx.out.say(f"no images in {cache.directory}")
    import time

    for e in entries:
        days = (time.time() - e.used) / 86400
        print(
            f"{e.digest[:19]}...  {e.format:<5}  {_human(e.size):>10}  used {days:.0f} d ago  {e.url}"
        )
    for name, count in cache.partial():
        print(f"{name}: interrupted download, {_human(count)} so far (resumed by the next pull)")
    return 0


def prune(ctx: Context, *, older_than: str | None, everything: bool) -> int:
    from qemuspec.spec.units import parse_seconds

    if older_than is None and not everything:
        older_than = "30d"
    seconds = None
    if older_than is not None:
        text = older_than.strip()
        try:
            seconds = float(text[:-1]) * 86400 if text.endswith("d") else parse_seconds(text)
        except (ValueError, TypeError):
            raise UsageError(
                f"--older-than {older_than}: give a duration such as 30d, 12h or 90m"
            ) from None
    removed = image_cache(ctx).prune(seconds, everything=everything)
    if ctx.out.json:
        emit_json({"removed": removed})
    else:
        for name in removed:
            ctx.out.say(f"removed {name}")
        if not removed:
            ctx.out.say("nothing to prune")
    return 0


ACTIONS: dict[str, Callable[..., int]] = {
    "create": create,
    "info": info,
    "convert": convert,
    "resize": resize,
    "snapshot": snapshot,
    "check": check,
    "rebase": rebase,
    "pull": pull,
    "ls": ls,
    "prune": prune,
}
