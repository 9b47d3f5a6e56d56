"""Commands that read definitions and never start a VM: validate, render, config, schema, init, import."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from qemuspec.cli.common import Context, emit_json, preflight, problem_object
from qemuspec.errors import QemuspecError, SpecError, UsageError

STARTER = """\
# A qemuspec definition. Validate with `qemuspec validate {name}`, start with `qemuspec up {name}`.
# Every key is in the JSON Schema: `qemuspec schema -o qemuspec.schema.json`, then put the line
# `#:schema qemuspec.schema.json` at the top of this file and your editor completes and checks keys.
# Fill in what the machine boots before `up` (a kernel, an installer cdrom, or a disk image with an OS):
# the disk below is created blank, and validate says so until something can boot.

[vars]                       # template variables, used below in double braces;
memory = "512M"              # override with QEMUSPEC_VAR_memory=1G or --var memory=1G

[machines.vm]
memory = "{{{{ memory }}}}"      # K/M/G/T, or a number of MiB
cpus = 2
accel = "auto"               # kvm when /dev/kvm works, else tcg; QEMUSPEC_ACCEL=tcg forces tcg
# kernel = "vmlinuz"         # direct kernel boot; paths are relative to this file
# initrd = "initrd.gz"
# cmdline = "console=ttyS0"
serial = "log"               # the console is kept in .qemuspec/vm/serial.log and read live
restart = "no"               # "no", "on-failure" or "always"
append = []                  # raw qemu switches for anything not modelled, e.g. ["-rtc", "base=utc"]

[machines.vm.ready]
serial = "login:"            # ready when the console shows this (a regular expression)
timeout = "120s"

[[machines.vm.disks]]
file = "vm.qcow2"
format = "qcow2"
size = "10G"                 # created on `up` when missing; install an OS into it from a cdrom:
# cdrom = "debian.iso"       # (under [machines.vm]) with boot_order = "dc"

[[machines.vm.nics]]
type = "user"                # user-mode networking, no root needed
forwards = [{{ host = 0, guest = 22 }}]   # host 0 picks a free port; `qemuspec status` shows it
"""


def validate(
    ctx: Context,
    *,
    files: list[str],
    probe: bool,
    allow_local_qemu: bool,
    allow_host_paths: bool = False,
) -> int:
    from qemuspec.cli.common import check_against_qemu
    from qemuspec.spec.loader import load_located

    variables = ctx.target.variables
    results: list[dict[str, Any]] = []
    given = [ctx.target.given] if ctx.target.given else []
    # like every command: the files named, else --file, else $QEMUSPEC_FILE or a default file
    for path in list(files) + given or [ctx.target.path]:
        try:
            spec, lines = load_located(
                path, variables=variables, environ=ctx.settings.var_environ()
            )
            preflight(
                spec,
                lines,
                path,
                list(spec.machines),
                allow_local_qemu=allow_local_qemu,
                settings=ctx.settings,
                allow_host_paths=allow_host_paths,
                out=ctx.out,
            )
            if probe:
                check_against_qemu(spec, lines, path, list(spec.machines))
            from qemuspec.runtime.warm import disk_writes

            notes = [
                f"machine {name} (warm = true): {note}"
                for name, m in spec.machines.items()
                if (note := disk_writes(m))
            ]
            results.append(
                {
                    "file": path,
                    "valid": True,
                    "machines": list(spec.machines),
                    "errors": [],
                    "notes": notes,
                }
            )
        except SpecError as exc:
            results.append(
                {"file": path, "valid": False, "machines": [], "errors": exc.problems, "notes": []}
            )
    if ctx.out.json:
        emit_json(
            [{**r, "errors": [problem_object(p, r["file"]) for p in r["errors"]]} for r in results]
        )
    else:
        for result in results:
            if result["valid"]:
                count = len(result["machines"])
                ctx.out.say(
                    f"{result['file']}: valid ({count} machine{'s' if count != 1 else ''}: {', '.join(result['machines'])})"
                )
                for note in result.get("notes", ()):
                    ctx.out.note(f"note: {result['file']}: {note}")
            else:
                for problem in result["errors"]:
                    print(f"error: {problem}\n", file=sys.stderr)
    return 0 if all(r["valid"] for r in results) else 2


def render(ctx: Context, *, shell: bool, format: str) -> int:
    from qemuspec.render import render as render_argv
    from qemuspec.runtime import paths

    from qemuspec.cli.common import list_host_paths

    target = ctx.target
    spec = target.spec
    names = target.machines()
    list_host_paths(ctx.out, spec, target.path, names)
    if format == "libvirt":
        from qemuspec.libvirt import domain_xml

        if len(names) != 1:
            raise UsageError(
                f"{target.path} declares {len(names)} machines: name one after the file for libvirt XML"
            )
        # "auto" as the argv would have it on this host (the libvirt backend asks the target host instead)
        lay = paths.machine_layout(
            spec.machines[names[0]], target.state_dir(names[0]), ctx.settings
        )
        xml = domain_xml(
            spec.machines[names[0]], names[0], target.state_dir(names[0]), kvm=lay.accel[0] == "kvm"
        )
        if ctx.out.json:
            emit_json({names[0]: xml})
        else:
            sys.stdout.write(xml)
        return 0
    argvs = {}
    for name in names:
        machine = spec.machines[name]
        lay = paths.machine_layout(machine, target.state_dir(name), ctx.settings)
        argvs[name] = render_argv(machine, name, lay)
        if lay.fallback:
            ctx.out.note(
                f"{name}: accel = {machine.accel!r} renders {','.join(lay.accel)}; if qemu cannot start "
                f"on kvm, up starts it again on {','.join(lay.fallback)} (and says so)"
            )
    if ctx.out.json and shell:
        raise UsageError("--json and --shell are alternatives: choose one")
    if ctx.out.json:
        emit_json(argvs[names[0]] if len(names) == 1 else argvs)
        return 0
    for name, argv in argvs.items():
        if len(argvs) > 1:
            print(f"# {name}")
        print(shlex.join(argv))
    return 0


def config(ctx: Context, *, format: str | None) -> int:
    """The resolved definition: templates rendered, defaults filled, paths made absolute."""
    from qemuspec.api import resolved

    target = ctx.target
    names = target.machines() if (target.rest or target.machine_option) else None
    data = resolved(target.spec, names)
    fmt = format or ("json" if ctx.out.json else "toml")
    if fmt == "json":
        emit_json(data)
    elif fmt == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    else:
        import tomli_w

        sys.stdout.write(tomli_w.dumps(_drop_none(data)))
    return 0


def _drop_none(value):
    """TOML has no null: an unset field is a missing key."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def schema(ctx: Context, *, output: str | None) -> int:
    from qemuspec.spec.schema import schema_text

    text = schema_text()
    if output:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
        if ctx.out.json:
            emit_json({"wrote": output})
    else:
        sys.stdout.write(text)
    return 0


def init(
    ctx: Context,
    *,
    target_file: str,
    force: bool,
    template: str | None = None,
    list_templates: bool = False,
) -> int:
    from qemuspec.cli import distros

    if list_templates:
        if ctx.out.json:
            emit_json(
                [
                    {"name": n, "title": d[0], "url": d[2], "digest_url": d[3]}
                    for n, d in distros.DISTROS.items()
                ]
            )
        else:
            for name, found in distros.DISTROS.items():
                print(f"{name:<14} {found[0]}")
        return 0
    if template is not None and template not in distros.DISTROS:
        raise UsageError(
            f"--template {template}: no such template; these exist: {', '.join(distros.DISTROS)} "
            "(`qemuspec init --list`)"
        )
    path = target_file
    if os.path.exists(path) and not force:
        raise UsageError(
            f"{path} exists already: choose another name, or pass --force to overwrite it"
        )
    if not path.endswith(".toml"):
        raise UsageError(f"{path}: init writes TOML; name the file with .toml")
    with open(path, "w", encoding="utf-8") as out:
        out.write(distros.render(template, path) if template else STARTER.format(name=path))
    if ctx.out.json:
        emit_json({"wrote": path, "template": template})
    elif template:
        ctx.out.say(
            f"wrote {path} ({distros.DISTROS[template][0]}): `qemuspec up {path}` downloads the image once, "
            "boots it and waits for cloud-init"
        )
    else:
        ctx.out.say(
            f"wrote {path}: fill in what it boots (kernel/initrd, a cdrom, or a disk image with an OS), "
            f"then `qemuspec validate {path}` and `qemuspec up {path}`"
        )
    return 0


def _comment(line: str) -> str:
    """One comment line of the imported file's header. An argv value or a libvirt element (``&#10;``)
    may hold a line break, which would end the comment and turn the rest into TOML (a hidden share
    of ``/``): every control, format or separator character is written as an escape instead."""
    return "".join(
        ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
        for ch in line
    )


def import_(
    ctx: Context,
    *,
    source: str | None,
    name: str | None,
    output: str | None,
    force: bool,
    check: bool,
    from_libvirt: str | None = None,
) -> int:
    import tomli_w

    from qemuspec.spec.importer import import_argv
    from qemuspec.spec.qemuopts import split_command

    argv: list[str] | None
    if from_libvirt:
        from qemuspec.spec.libvirt_import import import_domain

        with open(from_libvirt, encoding="utf-8") as f:
            machine_name, table, notes = import_domain(f.read(), name, source=from_libvirt)
        argv = None
    else:
        if source:
            with open(source, encoding="utf-8") as f:
                argv = split_command(f.read())
        else:
            argv = list(ctx.tail or [])
        if not argv:
            raise UsageError(
                "import needs a command line: qemuspec import -- qemu-system-x86_64 ARGS... (or --from FILE, --from-libvirt FILE)"
            )
        machine_name, table, notes = import_argv(argv, name, base_dir=os.getcwd())
    header = ["# Imported by `qemuspec import`."]
    source_line = (
        f"# from: {shlex.join(argv)}"[:4000]
        if argv
        else f"# from libvirt domain XML: {from_libvirt}"
    )
    header.append(_comment(source_line))
    header += [_comment(f"# left to qemuspec: {note}") for note in notes]
    text = "\n".join(header) + "\n\n" + tomli_w.dumps({"machines": {machine_name: table}})
    target = output
    from qemuspec.spec import loads

    spec = loads(
        text,
        "toml",
        source=target or "<import>",
        base_dir=os.path.dirname(os.path.abspath(target)) if target else os.getcwd(),
    )
    if list(spec.machines) != [machine_name]:  # the header can hide nothing; say so if it ever did
        raise QemuspecError(
            f"import: the written definition declares machines {', '.join(spec.machines)} where only "
            f"{machine_name} was imported: nothing was written; report this as a bug"
        )
    ctx.out.note(f"the definition declares 1 machine: {machine_name}")
    if target:
        if os.path.exists(target) and not force:
            raise UsageError(f"{target} exists already: choose another name, or pass --force")
        with open(target, "w", encoding="utf-8") as out:
            out.write(text)
        ctx.out.note(f"wrote {target} (machine {machine_name})")
    elif not ctx.out.json:
        sys.stdout.write(text)
    same = None
    report = None
    if check:
        from qemuspec.runtime import judge

        if (
            argv is None
        ):  # no qemu line to compare with: the round trip through libvirt's XML is checked
            from qemuspec.libvirt import domain_xml
            from qemuspec.spec.libvirt_import import import_domain

            again_name, again, _ = import_domain(
                domain_xml(spec.machines[machine_name], machine_name), machine_name
            )
            back = loads(
                tomli_w.dumps({"machines": {again_name: again}}),
                "toml",
                source="<libvirt round trip>",
            ).machines[again_name]
            verdict = judge.check_models(spec.machines[machine_name], back, machine_name)
        else:
            verdict = judge.check_definition(argv, spec.machines[machine_name], machine_name)
        same, report = verdict.same, verdict.report()
        ctx.out.note(f"check: {report}")
    if ctx.out.json:
        emit_json(
            {
                "machine": machine_name,
                "definition": {"machines": {machine_name: table}},
                "toml": text,
                "notes": notes,
                "output": target,
                "same": same,
                "check": report,
            }
        )
    return 1 if same is False else 0
