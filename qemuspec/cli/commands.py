"""The command table: every command's name, module, function and help, its operands and examples.

A leaf module (it imports nothing), like pip's ``commands_dict``: the parser, the dispatcher, the
completion scripts and the grammar in cli/common.py all read it, and none of them has to import
another to learn what the commands are.
"""

from __future__ import annotations

EXIT_CODES = """exit codes:
  0  success (plan: nothing to change)
  1  runtime failure (qemu failed, a machine did not become ready, QMP error)
  2  invalid input or usage (bad definition file, unknown machine, bad arguments)
  3  plan only: changes are pending (`up` would start, change, restart, recreate or stop something)
  4  up --no-restart only: a machine would be restarted or recreated; nothing was changed
  run, exec: the guest command's own exit code; exec: 255 when the guest went away before the command
     finished (powered off, rebooted, qemu exited), as ssh does
  exec: 127 when the guest has no such command, 124 when --timeout passed (the command was killed)
  250  run, test: the guest kernel crashed (panic, oops, BUG, KASAN; with --fail-on warn also a kernel
     warning); the crash report is on stderr (and on stdout with --json)"""

PENDING = 3  # `plan` exit code when `up` would change something

# What operands a command takes after the optional FILE: "machines" (any number), "machine" (at most
# one), "files" (only files), or a name of its own grammar.
FILE_COMMANDS = {
    "render": "machines",
    "config": "machines",
    "up": "machines",
    "down": "machines",
    "status": "machines",
    "ps": "machines",
    "plan": "machines",
    "restart": "machines",
    "pause": "machines",
    "resume": "machines",
    "reset": "machines",
    "logs": "machines",
    "events": "machine",
    "console": "machine",
    "inspect": "machine",
    "exec": "machine",
    "ssh": "machine",
    "ssh-config": "machines",
    "run": "machine",
    "qmp": "qmp",
    "cp": "cp",
    "snapshot": "snapshot",
    "provision": "machines",
    "test": "files",
    "warm": "machines",
}

# command -> (module in qemuspec.cli, function, help)
COMMANDS = {
    "validate": (
        "spec_commands",
        "validate",
        "check definition files; exit 2 with the errors when one is invalid",
    ),
    "render": ("spec_commands", "render", "print the qemu command line of machines"),
    "config": (
        "spec_commands",
        "config",
        "print the resolved definition (templates and defaults applied)",
    ),
    "schema": ("spec_commands", "schema", "print the JSON Schema of definition files"),
    "init": ("spec_commands", "init", "write a commented starter definition"),
    "up": (
        "vm_commands",
        "up",
        "start what is missing, change running machines live (else restart), wait until ready",
    ),
    "down": ("vm_commands", "down", "stop machines in reverse dependency order"),
    "status": (
        "vm_commands",
        "status",
        "show each machine's state, pid, uptime, restarts and ports",
    ),
    "ps": ("vm_commands", "status", "same as status"),
    "ls": (
        "vm_commands",
        "ls",
        "list every machine qemuspec runs on this host, whatever its definition file",
    ),
    "plan": (
        "vm_commands",
        "plan",
        "show what `up` would change, by field and argv; exit 3 when something would",
    ),
    "inspect": (
        "vm_commands",
        "inspect",
        "everything known about one machine: argv, state, ports, disks, events",
    ),
    "logs": ("vm_commands", "logs", "print serial console logs (or events with --events)"),
    "events": ("vm_commands", "events", "print a machine's QMP and lifecycle events (JSON lines)"),
    "console": ("vm_commands", "console", "attach to a machine's serial console (detach: Ctrl-])"),
    "qmp": ("vm_commands", "qmp", "send one QMP command to a running machine"),
    "pause": ("vm_commands", "pause", "pause machines' CPUs"),
    "resume": ("vm_commands", "resume", "resume paused machines"),
    "restart": ("vm_commands", "restart", "stop and start machines again"),
    "run": (
        "run_command",
        "run",
        "boot on throwaway disks, run one command in the guest, tear down; exit with its code",
    ),
    "test": (
        "test_command",
        "test",
        "run the file's [tests.NAME] cases, each on its own fresh restore; JUnit XML; exit 1 on a failure",
    ),
    "warm": (
        "test_command",
        "warm",
        "warm state of run and test: `warm key` prints each machine's checkpoint key (for a CI cache)",
    ),
    "exec": (
        "guest_commands",
        "exec_",
        "run a command in a guest through its guest agent (stdin passed through)",
    ),
    "cp": (
        "guest_commands",
        "cp",
        "copy files to or from a guest (NAME:/path, or :/path) through its guest agent, or ssh (--via ssh)",
    ),
    "ssh": ("guest_commands", "ssh", "ssh into a guest with the state directory's key"),
    "ssh-config": (
        "guest_commands",
        "ssh_config",
        "print an OpenSSH config block (Host NAME) per running machine, for ssh -F, scp and rsync",
    ),
    "provision": (
        "guest_commands",
        "provision",
        "run machines' provision steps again in their running guests",
    ),
    "reset": (
        "guest_commands",
        "reset",
        "recreate a stopped machine's overlay disks from their base",
    ),
    "snapshot": (
        "guest_commands",
        "snapshot",
        "save, load, list or delete snapshots of a running machine",
    ),
    "import": (
        "spec_commands",
        "import_",
        "turn a qemu command line into a definition (nothing dropped)",
    ),
    "img": (
        "img_commands",
        "img",
        "disk images: create, info, convert, resize, snapshot, check, rebase; "
        "pull, ls, prune (the base-image cache)",
    ),
    "completion": (
        "completion",
        "completion",
        "print a shell completion script: bash, zsh or fish",
    ),
    "help": ("manual", "help_", "show a command's help: qemuspec help COMMAND [ACTION]"),
    "man": ("manual", "man", "print qemuspec's manual page (roff), generated from this parser"),
}

EXAMPLES = {
    "": [
        "qemuspec up machines/dev.toml",
        "qemuspec status machines/dev.toml --json",
        "qemuspec qmp machines/dev.toml query-status",
        "qemuspec down machines/dev.toml",
    ],
    "validate": ["qemuspec validate machines/dev.toml machines/example.yaml"],
    "render": ["qemuspec render machines/dev.toml --shell"],
    "config": ["qemuspec config machines/dev.toml --format yaml"],
    "schema": ["qemuspec schema -o qemuspec.schema.json"],
    "init": ["qemuspec init qemuspec.toml"],
    "up": [
        "qemuspec up machines/dev.toml --timeout 300",
        "qemuspec up machines/dev.toml --no-restart   # only live changes, else exit 4",
    ],
    "down": ["qemuspec down machines/dev.toml --purge"],
    "status": ["qemuspec status machines/dev.toml"],
    "plan": ["qemuspec plan machines/dev.toml --var memory=384M"],
    "inspect": ["qemuspec inspect machines/dev.toml dev"],
    "logs": ["qemuspec logs machines/dev.toml dev -n 20"],
    "events": ["qemuspec events machines/dev.toml dev"],
    "qmp": [
        "qemuspec qmp machines/dev.toml query-status",
        "qemuspec qmp machines/dev.toml dev query-block",
    ],
    "run": ["qemuspec run machines/dev.toml -- uname -a"],
    "test": [
        "qemuspec test machines/dev.toml -k kernel -j 4 --junit report.xml --keep-failed failed/"
    ],
    "warm": ["qemuspec warm key machines/dev.toml"],
    "exec": ["qemuspec exec machines/dev.toml dev -- cat /proc/version"],
    "cp": ["qemuspec cp machines/dev.toml ./README.md dev:/tmp/README.md"],
    "ssh-config": ["qemuspec ssh-config machines/dev.toml > dev.ssh_config"],
    "snapshot": ["qemuspec snapshot list machines/dev.toml dev"],
    "provision": ["qemuspec provision machines/dev.toml"],
    "completion": ["qemuspec completion bash > qemuspec.bash"],
    "ps": ["qemuspec ps machines/dev.toml --json"],
    "ls": ["qemuspec ls"],
    "console": ["qemuspec console machines/dev.toml dev   # detach with Ctrl-]"],
    "pause": ["qemuspec pause machines/dev.toml dev"],
    "resume": ["qemuspec resume machines/dev.toml dev"],
    "restart": ["qemuspec restart machines/dev.toml dev"],
    "ssh": ["qemuspec ssh machines/dev.toml dev -- uname -r"],
    "reset": ["qemuspec reset machines/dev.toml dev   # a stopped machine's overlays"],
    "import": ["qemuspec import -o imported.toml -- qemu-system-x86_64 -m 512 -smp 2 -nographic"],
    "img": [
        "qemuspec img create scratch.qcow2 1G",
        "qemuspec img info scratch.qcow2",
        "qemuspec img pull machines/dev.toml",
    ],
    "help": ["qemuspec help up", "qemuspec help img pull"],
    "man": ["qemuspec man -o qemuspec.1"],
}

# img ACTION -> examples (shown by `qemuspec img ACTION --help`)
IMG_EXAMPLES = {
    "create": [
        "qemuspec img create scratch.qcow2 1G",
        "qemuspec img create overlay.qcow2 -b scratch.qcow2 -F qcow2",
    ],
    "info": ["qemuspec img info scratch.qcow2 --json"],
    "convert": ["qemuspec img convert scratch.qcow2 scratch.raw -O raw"],
    "resize": ["qemuspec img resize scratch.qcow2 2G"],
    "snapshot": [
        "qemuspec img snapshot create scratch.qcow2 clean",
        "qemuspec img snapshot list scratch.qcow2",
    ],
    "check": ["qemuspec img check scratch.qcow2"],
    "rebase": ["qemuspec img rebase overlay.qcow2 -b scratch.qcow2 -F qcow2"],
    "pull": ["qemuspec img pull machines/dev.toml --offline"],
    "ls": ["qemuspec img ls --json"],
    "prune": ["qemuspec img prune --older-than 30d"],
}
