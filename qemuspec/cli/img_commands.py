"""`qemuspec img ...`: the qemu-img wrapper on the command line."""

from __future__ import annotations

import os
import sys
from typing import Callable

from qemuspec import img as qemu_img
from qemuspec.cli.common import Context, emit_json
from qemuspec.errors import UsageError


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


def create(ctx: Context, *, file: str, size: str | None, format: str, backing: str | None, backing_format: str | None) -> int:
    if size is None and not backing:
        raise UsageError("img create needs a SIZE, or --backing for an overlay")
    qemu_img.create(file, size, format, backing=backing, backing_format=backing_format)
    return _done(ctx, f"created {file}", created=file, format=format, size=size, backing=backing)


def info(ctx: Context, *, file: str) -> int:
    found = qemu_img.info(file)
    if ctx.out.json:
        emit_json(found.as_dict())
        return 0
    print(f"file:         {found.filename}\nformat:       {found.format}\nvirtual size: {found.virtual_size}")
    if found.actual_size is not None:
        print(f"disk size:    {found.actual_size}")
    if found.backing:
        print(f"backing:      {found.backing} ({found.backing_format or '?'})")
    for snap in found.snapshots:
        print(f"snapshot:     {snap.name} (id {snap.id})")
    return 0


def convert(ctx: Context, *, source: str, target: str, format: str, compress: bool) -> int:
    qemu_img.convert(source, target, format, progress=_bar(ctx), compress=compress)
    return _done(ctx, f"converted {source} -> {target} ({format})", source=source, target=target, format=format)


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


def rebase(ctx: Context, *, file: str, backing: str, backing_format: str | None, unsafe: bool) -> int:
    qemu_img.rebase(file, backing, backing_format, unsafe=unsafe)
    return _done(ctx, f"{file} now backed by {os.path.abspath(backing)}", file=file, backing=os.path.abspath(backing))


ACTIONS: dict[str, Callable[..., int]] = {"create": create, "info": info, "convert": convert, "resize": resize,
                                          "snapshot": snapshot, "check": check, "rebase": rebase}
