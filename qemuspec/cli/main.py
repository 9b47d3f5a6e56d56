"""The `qemuspec` command: dispatch only (the command table is cli/commands.py, the parser cli/parser.py).

One grammar for every command::

    qemuspec COMMAND [ACTION] [FILE] [MACHINE...] [OPTIONS] [-- COMMAND...]

FILE is the definition file. It may be given as the first operand (recognised by its .toml, .yaml or
.yml suffix, a "/" in it, or because it exists) or as ``--file``/``-F`` anywhere; without either,
$QEMUSPEC_FILE, then qemuspec.toml, qemuspec.yaml, qemuspec.yml or machines/dev.toml. Machines follow
as operands (or ``--machine``); commands about one machine take the only machine of a one-machine
file when none is named. Every command takes ``--json`` and ``--quiet``.

Start-up must stay fast (``--help`` within twice a bare interpreter), so this module imports nothing
but the table and argparse; each command's module, and pydantic, Jinja2 and friends behind it, load on dispatch.
"""

from __future__ import annotations

import sys

from qemuspec.cli.commands import COMMANDS
from qemuspec.cli.parser import parse


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["__complete-machines"]:  # for the completion scripts: machine names, one a line
        from qemuspec.cli.completion import machines

        print("\n".join(machines(argv[1:])))
        return 0
    try:
        args, tail = parse(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    module_name, func_name, _ = COMMANDS[args.command]
    import warnings

    from qemuspec.settings import Settings, install

    warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
    settings = install(
        Settings.from_env()
    )  # the one read of the environment; passed down from here
    try:
        import importlib

        from qemuspec.cli.common import Context

        ctx = Context.from_args(args, tail, settings)
        func = getattr(importlib.import_module(f"qemuspec.cli.{module_name}"), func_name)
        code = func.__code__
        params = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        return int(
            func(ctx, **{name: getattr(args, name) for name in params if name != "ctx"}) or 0
        )
    except KeyboardInterrupt:
        print("qemuspec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # every error ends as a paragraph and an exit code, never a traceback
        from qemuspec.cli.common import report_error

        if settings.debug:
            raise
        return report_error(
            exc, json_output=getattr(args, "json", False), raw=getattr(args, "raw", False)
        )


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
