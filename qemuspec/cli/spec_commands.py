"""Commands that read definitions and never start a VM: validate, render, schema, init."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from qemuspec.cli.common import emit_json, load_file, parse_vars, preflight, select
from qemuspec.errors import SpecError, UsageError

STARTER = """\
# A qemuspec definition. Validate with `qemuspec validate {name}`, start with `qemuspec up {name}`.
# Every key is in the JSON Schema: `qemuspec schema -o qemuspec.schema.json`, then put the line
# `#:schema qemuspec.schema.json` at the top of this file and your editor completes and checks keys.

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


def validate(args: Any) -> int:
    from qemuspec.cli.common import check_against_qemu
    from qemuspec.spec.loader import load_located

    variables = parse_vars(args.var)
    results = []
    for path in args.file:
        try:
            spec, lines = load_located(path, variables=variables)
            preflight(spec, lines, path, list(spec.machines), args)
            if args.probe:
                check_against_qemu(spec, lines, path, list(spec.machines))
            results.append({"file": path, "valid": True, "machines": list(spec.machines), "errors": []})
        except SpecError as exc:
            results.append({"file": path, "valid": False, "machines": [], "errors": exc.problems})
    if args.json:
        emit_json(results)
    else:
        for result in results:
            if result["valid"]:
                count = len(result["machines"])
                print(f"{result['file']}: valid ({count} machine{'s' if count != 1 else ''}: {', '.join(result['machines'])})")
            else:
                for problem in result["errors"]:
                    print(f"error: {problem}\n", file=sys.stderr)
    return 0 if all(r["valid"] for r in results) else 2


def render(args: Any) -> int:
    from qemuspec.render import render as render_argv
    from qemuspec.runtime import accel, paths

    spec = load_file(args)
    names = select(spec, args.machine, args.file) if args.machine else list(spec.machines)
    root = paths.state_root(args.file, args.state_dir)
    if args.format == "libvirt":
        from qemuspec.libvirt import domain_xml

        if len(names) != 1:
            raise UsageError(f"{args.file} declares {len(names)} machines: choose one with --machine for libvirt XML")
        sys.stdout.write(domain_xml(spec.machines[names[0]], names[0], os.path.join(root, names[0])))
        return 0
    argvs = {}
    for name in names:
        machine = spec.machines[name]
        port = machine.qmp.port if machine.qmp.transport == "tcp" else None
        lay = paths.layout(os.path.join(root, name), accel=accel.resolve(machine.accel), qmp_port=port)
        argvs[name] = render_argv(machine, name, lay)
    if args.json and args.shell:
        raise UsageError("--json and --shell are alternatives: choose one")
    if args.json:
        emit_json(argvs[names[0]] if len(names) == 1 else argvs)
        return 0
    for name, argv in argvs.items():
        if len(argvs) > 1:
            print(f"# {name}")
        print(shlex.join(argv))
    return 0


def schema(args: Any) -> int:
    from qemuspec.spec.schema import schema_text

    text = schema_text()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return 0


def init(args: Any) -> int:
    path = args.file
    if os.path.exists(path) and not args.force:
        raise UsageError(f"{path} exists already: choose another name, or pass --force to overwrite it")
    if not path.endswith(".toml"):
        raise UsageError(f"{path}: init writes TOML; name the file with .toml")
    with open(path, "w", encoding="utf-8") as out:
        out.write(STARTER.format(name=path))
    print(f"wrote {path}: edit kernel/initrd (or add a disk), then `qemuspec up {path}`")
    return 0


def import_(args: Any) -> int:
    import tomli_w

    from qemuspec.spec.importer import import_argv, split_command

    if args.from_libvirt:
        from qemuspec.spec.libvirt_import import import_domain

        with open(args.from_libvirt, encoding="utf-8") as f:
            name, table, notes = import_domain(f.read(), args.name, source=args.from_libvirt)
        argv = None
    else:
        if args.source:
            with open(args.source, encoding="utf-8") as f:
                argv = split_command(f.read())
        else:
            argv = list(args.argv)
        if not argv:
            raise UsageError("import needs a command line: qemuspec import -- qemu-system-x86_64 ARGS... (or --from FILE, --from-libvirt FILE)")
        name, table, notes = import_argv(argv, args.name, base_dir=os.getcwd())
    header = ["# Imported by `qemuspec import`."]
    header.append(f"# from: {shlex.join(argv)}"[:4000] if argv else f"# from libvirt domain XML: {args.from_libvirt}")
    header += [f"# left to qemuspec: {note}" for note in notes]
    text = "\n".join(header) + "\n\n" + tomli_w.dumps({"machines": {name: table}})
    target = args.output
    from qemuspec.spec import loads

    spec = loads(text, "toml", source=target or "<import>", base_dir=os.path.dirname(os.path.abspath(target)) if target else os.getcwd())
    if target:
        if os.path.exists(target) and not args.force:
            raise UsageError(f"{target} exists already: choose another name, or pass --force")
        with open(target, "w", encoding="utf-8") as out:
            out.write(text)
        print(f"wrote {target} (machine {name})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.check:
        from qemuspec.runtime import judge

        if argv is None:  # no qemu line to compare with: the round trip through libvirt's XML is checked
            from qemuspec.libvirt import domain_xml
            from qemuspec.spec.libvirt_import import import_domain

            again_name, again, _ = import_domain(domain_xml(spec.machines[name], name), name)
            back = loads(tomli_w.dumps({"machines": {again_name: again}}), "toml", source="<libvirt round trip>").machines[again_name]
            verdict = judge.check_models(spec.machines[name], back, name)
        else:
            verdict = judge.check_definition(argv, spec.machines[name], name)
        print(f"check: {verdict.report()}", file=sys.stderr)
        return 0 if verdict.same else 1
    return 0
