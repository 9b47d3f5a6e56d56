"""`qemuspec img ...`: the qemu-img wrapper on the command line."""

from __future__ import annotations

import os
import sys
from typing import Any

from qemuspec import img as qemu_img
from qemuspec.cli.common import emit_json
from qemuspec.errors import UsageError


def _bar(stream=sys.stderr):
    """A progress bar on a terminal; None (nothing printed) otherwise, so CI logs stay quiet."""
    if not stream.isatty():
        return None
    width = 40

    def show(percent: float) -> None:
        done = int(width * percent / 100)
        stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {percent:5.1f}%")
        stream.flush()
        if percent >= 100:
            stream.write("\n")

    return show


def img(args: Any) -> int:
    action = args.img_command
    if action == "create":
        if args.size is None and not args.backing:
            raise UsageError("img create needs a SIZE, or --backing for an overlay")
        qemu_img.create(args.file, args.size, args.format, backing=args.backing, backing_format=args.backing_format)
        print(f"created {args.file}")
    elif action == "info":
        info = qemu_img.info(args.file)
        if args.json:
            emit_json(info.as_dict())
        else:
            print(f"file:         {info.filename}\nformat:       {info.format}\nvirtual size: {info.virtual_size}")
            if info.actual_size is not None:
                print(f"disk size:    {info.actual_size}")
            if info.backing:
                print(f"backing:      {info.backing} ({info.backing_format or '?'})")
            for snap in info.snapshots:
                print(f"snapshot:     {snap.name} (id {snap.id})")
    elif action == "convert":
        qemu_img.convert(args.source, args.target, args.format, progress=_bar(), compress=args.compress)
        print(f"converted {args.source} -> {args.target} ({args.format})")
    elif action == "resize":
        qemu_img.resize(args.file, args.size, shrink=args.shrink)
        print(f"resized {args.file} to {args.size}")
    elif action == "snapshot":
        result = qemu_img.snapshot(args.file, args.action, args.tag)
        if result is not None:
            if args.json:
                emit_json([s.__dict__ for s in result])
            else:
                for snap in result:
                    print(snap.name)
    elif action == "check":
        report = qemu_img.check(args.file)
        if args.json:
            emit_json(report)
        else:
            print(f"{args.file}: no errors found")
    elif action == "rebase":
        qemu_img.rebase(args.file, args.backing, args.backing_format, unsafe=args.unsafe)
        print(f"{args.file} now backed by {os.path.abspath(args.backing)}")
    return 0

