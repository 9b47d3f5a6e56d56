"""Every name of a file or directory qemuspec keeps under a state directory, a runtime directory,
the runtime base or the keep base, and nothing else (like lima's filenames.go). A leaf: it imports
nothing, so the modules that build paths (runtime/paths.py) and the one that reads and writes the
files (runtime/statedir.py, which re-exports these names) can both use it without a cycle.
``tests/test_layout.py`` fails when another module spells one of these names."""

# -- file names (state directory) ----------------------------------------------------------------
STATE = "state.json"  # QemuRecord: a copy for people; the runtime directory's is authoritative
SUPERVISOR = "supervisor.json"  # SupervisorRecord (copy)
EXIT = "exit.json"  # ExitRecord: how the last run ended
STOP = "stop.json"  # StopRequest: what `down` asked for
CREATED = "created.json"  # CreatedRecord: files qemuspec made (what `down --purge` may delete)
EVENTS = "events.jsonl"
SERIAL_LOG = "serial.log"
# when serial.log's bytes arrived: (offset, unix time) records, rotated with it (`logs --timestamps`)
SERIAL_TIMES = "serial.times"
QEMU_LOG = "qemu.log"
SUPERVISOR_LOG = "supervisor.log"
PIDFILE = "qemu.pid"
DEFINITION = (
    "definition.json"  # the resolved definition `up` last started (what `plan` diffs by field)
)
PROVISIONED = "provisioned.json"  # ProvisionRecord: the machine life the provision steps ran for
PORTS = "ports.json"  # PortsRecord: the host ports qemu picked for `host = 0` forwards, tried again next start
SAVING = "saving.json"  # SaveRecord, in warm/: a warm save under way (its overlays may hold the newest writes)
OWNER = ".owner"  # a random token: with the keep base's record, the proof the directory is ours
EFIVARS = "efivars.fd"  # a UEFI machine's variable store (copied from the firmware's template)
CIDATA = "cidata.iso"  # the cloud-init NoCloud seed (runtime/cloudinit.py)
CIDATA_STAMP = CIDATA + ".sha256"  # the hash of the seed's inputs: rebuilt only when they change
KNOWN_HOSTS = "known_hosts"  # the machine's pinned ssh host key (runtime/sshkeys.py)
WARM_DIR = "warm"  # saved machine state (runtime/warm.py), with the names below in it
WARM_MEMORY = "memory"  # qemu's migration stream
WARM_KEY = "key.json"  # what the saved state is valid for; written last
CHECKPOINT = (
    "checkpoint.json"  # in a run/test checkpoint (runtime/fresh.py): what it holds; written last
)
CHECKPOINT_VERIFIED = (
    "verified.json"  # in a checkpoint: the memory file's identity when its digest matched
)
CHECKPOINT_LOCK = ".lock"  # beside a checkpoint's directory: one making it at a time
TMP_SUFFIX = ".tmp"  # a file being written under its final name plus this


def checkpoint_disk(index: int) -> str:
    """In a run/test checkpoint: disk ``index`` as it was at the save (restores put overlays on it)."""
    return f"disk{index}.qcow2"


def restore_disk(index: int) -> str:
    """In a fresh restore's throwaway state directory: its own overlay of checkpoint disk ``index``."""
    return f"restore-disk{index}.qcow2"


def rotated(name: str) -> str:
    """A capped log's previous generation (statedir.CappedLog moves NAME there)."""
    return name + ".1"


def live_disk(index: int) -> str:
    """In ``warm/``: the running machine's disk ``index``, an overlay on the frozen disk."""
    return f"live-disk{index}.qcow2"


# What qemuspec would take for its own in a state directory: moved aside, never used, when the
# directory is not proven ours (a committed `.qemuspec/`, or one from before the proof existed).
TLS_DIR = "tls"  # the TCP monitor's credentials (runtime/tls.py), in the runtime directory
UNTRUSTED = (
    STATE,
    SUPERVISOR,
    EXIT,
    STOP,
    CREATED,
    DEFINITION,
    PIDFILE,
    PROVISIONED,
    PORTS,
    TLS_DIR,
    WARM_DIR,
    CIDATA,
    CIDATA_STAMP,
    KNOWN_HOSTS,
)
# -- file names (runtime directory) --------------------------------------------------------------
MACHINE = "machine.json"  # QemuRecord, authoritative
LOCK = (
    "supervisor.lock"  # flock held by the live supervisor; its mtime is the supervisor's heartbeat
)
QMP_SOCK = "qmp.sock"  # the controller's monitor
QMP_CLIENT_SOCK = "qmp-client.sock"  # the tools' monitor (`qemuspec qmp`, status, pause)
CONSOLE_SOCK = "console.sock"  # the serial console; its one reader is the supervisor's
CONSOLE_CLIENT = "console-client.sock"  # the supervisor's console proxy (`qemuspec console`)
DISPLAY_SOCK = "display.sock"  # a vnc/spice display (the directory is 0700: the owner's alone)
QGA_SOCK = "qga.sock"  # the guest agent's channel
RUN_SOCKETS = (
    QMP_SOCK,
    QMP_CLIENT_SOCK,
    CONSOLE_SOCK,
    CONSOLE_CLIENT,
    QGA_SOCK,
)  # removed when qemu is gone
# in tls/: the credentials qemu and the client read; the CA key and the requests live only while made
TLS_CA_CERT = "ca-cert.pem"
TLS_CA_KEY = "ca-key.pem"


def virtiofs_sock(index: int) -> str:
    """The vhost-user socket of a machine's virtiofs share ``index``."""
    return f"virtiofs{index}.sock"


def is_virtiofs_sock(name: str) -> bool:
    return name.startswith("virtiofs") and name.endswith(".sock")


def tls_cert(kind: str) -> str:
    """``kind``: "server" (qemu's) or "client" (ours)."""
    return f"{kind}-cert.pem"


def tls_key(kind: str) -> str:
    return f"{kind}-key.pem"


def tls_scratch(kind: str) -> tuple[str, str]:
    """The request and the extensions file openssl makes ``kind``'s certificate from (then removed)."""
    return f"{kind}.csr", f"{kind}.ext"


TLS_FILES = (
    TLS_CA_CERT,
    tls_cert("server"),
    tls_key("server"),
    tls_cert("client"),
    tls_key("client"),
)
# -- names in the runtime base and the keep base -------------------------------------------------
NETWORK_PREFIX = (
    "net-"  # a private network's vde_switch directory, NAME.pid and NAME.lock beside it
)
SWITCH_PID = ".pid"  # suffixes of the switch directory's pidfile and its start/stop lock
SWITCH_LOCK = ".lock"
KEEP_PREFIX = "keep-"  # the keep base's kinds in the runtime base when HOME is not private
KEEP_OWNERS = "owners"  # in the keep base: proofs that state directories are ours
KEEP_SSH = "ssh"  # in the keep base: one ssh identity per state root
SSH_KEY = "id_ed25519"  # that identity, with SSH_KEY + PUB_SUFFIX beside it
PUB_SUFFIX = ".pub"
