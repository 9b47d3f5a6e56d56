"""The machine model: what a definition file (or the builder) may say about a VM.

Everything qemu has a typed form for is a typed field here; everything else goes through an
``options`` map on the device it belongs to, or through ``append``. Values are normalised while
validating (sizes to numbers, strings to tables) so that the same machine written two ways is one
equal model, and the renderer never has to guess.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from qemuspec.spec import units
from functools import cache

from qemuspec.spec.devices import QemuDevice
from qemuspec.spec.limits import QEMU_NAME
from qemuspec.spec.order import order_machines
from qemuspec.spec.uris import check_libvirt_uri

_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def _text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("text must not contain a NUL character")
    return value


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _line(value: str) -> str:
    """A value that ends up as (part of) one qemu argument: qemu cannot take a line break in it."""
    _text(value)
    if "\n" in value or "\r" in value:
        raise ValueError("a line break cannot be passed to qemu in this value: put it on one line")
    return value


def _ident(value: str) -> str:
    if not _IDENT.match(value):
        raise ValueError(
            f'"{value}" is not a valid qemu identifier: use letters, digits, "_", ".", "+" and "-", '
            "starting with a letter or digit"
        )
    return value


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Relative paths are relative to the definition file, so a checkout works from any cwd."""
    _line(value)
    if not value:
        raise ValueError("a path must not be empty")
    base = (info.context or {}).get("base_dir")
    if base and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return os.path.expanduser(value) if value.startswith("~") else value


Text = Annotated[str, AfterValidator(_text)]
Line = Annotated[str, AfterValidator(_line)]
Ident = Annotated[str, AfterValidator(_ident)]
FilePath = Annotated[str, AfterValidator(_resolve_path)]
OptionValue = Union[bool, int, float, Line]
Options = dict[Ident, OptionValue]

_SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*[KMGTkmgt]?(i?[Bb])?\s*$"


def _size(parse, serialize, bare: str) -> Any:
    """A size field: validated and normalised to a number, written back with a unit."""
    return Annotated[
        int,
        BeforeValidator(parse),
        PlainSerializer(serialize, return_type=str),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": 1},
                    {"type": "string", "pattern": _SIZE_PATTERN},
                ],
                "description": f'A size: a number of {bare}, or a number with a unit K, M, G or T ("256M", "2G").',
            }
        ),
    ]


if TYPE_CHECKING:  # for the type checker: sizes are ints once validated
    MiB = int
    Bytes = int
else:
    MiB = _size(units.parse_mib, lambda v: f"{v}M", "MiB")
    Bytes = _size(units.parse_bytes, units.format_bytes, "bytes")
Seconds = Annotated[
    float,
    BeforeValidator(units.parse_seconds),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
            ],
            "description": 'A duration: seconds, or a number with ms, s, m or h ("30s", "2m").',
        }
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]
HostPort = Annotated[
    int, Field(ge=0, le=65535, description="Host port; 0 picks a free one at start")
]

Accel = Literal["auto", "kvm", "tcg", "xen", "hvf", "whpx", "nvmm"]


class Model(BaseModel):
    """Shared settings: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class QMP(Model):
    """How qemuspec talks to qemu. A unix socket lives in a 0700 directory; TCP binds 127.0.0.1 only."""

    transport: Literal["unix", "tcp"] = "unix"
    port: Port = Field(4444, description="First TCP port tried; the next free one upward is used")


def _guest_command(value: str) -> str:
    """One shell command line for the guest (run with /bin/sh -c)."""
    _text(value)
    if not value.strip():
        raise ValueError(
            'a guest command must not be empty: write the command line, e.g. "cloud-init status --wait"'
        )
    return value


GuestCommand = Annotated[str, AfterValidator(_guest_command)]


class ProvisionScript(Model):
    """A provisioning script on the host, sent to the guest's /bin/sh on its standard input."""

    script: FilePath = Field(description="Script file (relative to the definition), at most 1 MiB")


def _provision_kind(value: Any) -> str:
    return (
        "script"
        if isinstance(value, (dict, ProvisionScript)) or hasattr(value, "script")
        else "steps"
    )


# One error for one mistake: a list (or one string) is steps, a table is a script, never "either".
Provision = Annotated[
    Union[
        Annotated[Annotated[list[GuestCommand], BeforeValidator(_as_list)], Tag("steps")],
        Annotated[ProvisionScript, Tag("script")],
    ],
    Discriminator(_provision_kind),
]


class Ready(Model):
    """What "ready" means for this machine. With no probe set, ready means QMP answered."""

    serial: Text | None = Field(
        None, description="Regular expression matched against the serial console, read live"
    )
    tcp: Port | None = Field(
        None, description="Guest port, reached through a user-mode forward; must send data"
    )
    agent: bool = Field(False, description="The guest agent answers guest-ping")
    ssh: bool = Field(False, description="An ssh server answers on the forwarded guest port 22")
    command: Annotated[list[GuestCommand], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description='Guest commands that must exit 0, e.g. "cloud-init status --wait" '
        "(or a list, run in order): run through the guest agent (or ssh without one), retried until they succeed",
    )
    timeout: Seconds = 60.0

    @field_validator("serial")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            from qemuspec.spec.patterns import compile_serial

            compile_serial(value)  # the engine the console is matched with: RE2, linear time
        return value


def _image_url(value: str) -> str:
    """Where a base image (or its checksum file) comes from: http, https or file, nothing else."""
    _line(value)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https", "file") or not rest:
        raise ValueError(
            f'"{value}" is not an http://, https:// or file:/// URL: write the full address, for example '
            '"https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"'
        )
    if scheme.lower() == "file" and not rest.startswith("/"):
        raise ValueError(
            f'"{value}": a file URL names an absolute path, file:///path/to/image.qcow2'
        )
    return value


def _digest(value: str) -> str:
    text = value.strip().lower()
    if not re.match(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$", text):
        raise ValueError(
            f'"{value}" is not a digest: write "sha256:" and 64 hex digits, or "sha512:" and 128 '
            '(sha256sum IMAGE prints them), or give digest_url = ".../SHA256SUMS" instead'
        )
    return text


ImageURL = Annotated[str, AfterValidator(_image_url)]


class Image(Model):
    """Where a disk's base comes from: downloaded once into the user's content-addressed cache, checked
    against its digest, never written (the disk's file is this machine's own qcow2 overlay on it)."""

    url: ImageURL = Field(
        description="http(s):// or file:/// URL of a raw or qcow2 image (.xz/.gz: unpacked into the cache)"
    )
    digest: Annotated[str, AfterValidator(_digest)] | None = Field(
        None,
        description='"sha256:HEX" or "sha512:HEX" of the file as published (the compressed file for .xz/.gz)',
    )
    digest_url: ImageURL | None = Field(
        None,
        description="A checksum file (SHA256SUMS, SHA512SUMS, CHECKSUM) listing the url's file name: looked up "
        "once and recorded in the cache",
    )

    @model_validator(mode="after")
    def _one_digest(self) -> "Image":
        if (self.digest is None) == (self.digest_url is None):
            raise ValueError(
                'an image needs exactly one of digest = "sha256:HEX" and digest_url = ".../SHA256SUMS", '
                "so the download can be checked"
            )
        return self


class Disk(Model):
    file: FilePath
    image: Image | None = Field(
        None,
        description="Base image by URL and digest: file is then this machine's qcow2 "
        "overlay on the cached base, made on `up`",
    )
    id: Ident | None = Field(
        None,
        description="The drive's qemu id, for a device in devices or append that refers to it (default: qemuspec-diskN)",
    )
    format: Ident | None = Field(
        None, description="Image format: qcow2, raw, ... (required with backing or size)"
    )
    size: Bytes | None = Field(
        None, description="Created with this size on `up` when the file is missing"
    )
    backing: FilePath | None = Field(
        None, description="Base image of an overlay; the base is never written"
    )
    backing_format: Ident | None = None
    interface: Literal["virtio", "ide", "scsi", "nvme", "none"] = "virtio"
    readonly: bool = False
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,20}$")] | None = None
    options: Options = Field(
        default_factory=dict, description="Extra -drive properties, passed through"
    )
    device_options: Options = Field(
        default_factory=dict, description="Extra -device properties, passed through"
    )

    @model_validator(mode="before")
    @classmethod
    def _image_overlay(cls, value: Any) -> Any:
        if (
            isinstance(value, dict)
            and value.get("image") is not None
            and value.get("format") is None
        ):
            return {**value, "format": "qcow2"}  # the overlay on a base image is a qcow2
        return value

    @model_validator(mode="after")
    def _format_needed(self) -> "Disk":
        if self.image is not None:
            if self.backing:
                raise ValueError(
                    'give "image" or "backing", not both: with image, qemuspec makes file an overlay on '
                    "the cached base itself"
                )
            if self.format != "qcow2":
                raise ValueError(
                    f'a disk with "image" is a qcow2 overlay on the cached base: remove format = '
                    f'"{self.format}" (or write format = "qcow2")'
                )
        if self.backing and not self.format:
            raise ValueError(
                'a disk with "backing" needs "format" (an overlay is a "qcow2" image): add format = "qcow2"'
            )
        if self.backing and self.format not in ("qcow2", "qed"):
            raise ValueError(
                f'format "{self.format}" cannot have a backing file: use format = "qcow2"'
            )
        return self


def _ipv4(value: str) -> str:
    import ipaddress

    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(
            f'"{value}" is not an IPv4 address: use for example "127.0.0.1" (the default)'
        ) from None
    return value


def _listen_address(value: str) -> str:
    if not re.match(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)$", value):
        raise ValueError(f'"{value}" is not a host name or IP address: use for example "127.0.0.1"')
    return value.strip("[]")


def _endpoint(value: str) -> str:
    if value.startswith("/") or re.match(r"^[A-Za-z0-9.-]*:\d{1,5}$", value):
        return _text(value)
    raise ValueError(
        f'"{value}" is not an address: write host:port (for example "127.0.0.1:5555") or a socket path starting with "/"'
    )


class Forward(Model):
    host: HostPort
    guest: Port
    protocol: Literal["tcp", "udp"] = "tcp"
    address: Annotated[str, AfterValidator(_ipv4)] = Field(
        "127.0.0.1", description="Host address to bind; loopback by default"
    )


Endpoint = Annotated[str, AfterValidator(_endpoint)]


def _interface_address(value: str) -> str:
    import ipaddress

    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(
            f'"{value}" is not an address with a prefix: write for example "10.10.0.2/24"'
        ) from None
    if "/" not in value:
        raise ValueError(f'"{value}" needs a prefix length: write for example "{value}/24"')
    return str(iface)


class NIC(Model):
    type: Literal["user", "socket", "stream", "tap", "bridge", "network"] = "user"
    network: Ident | None = Field(
        None, description="Name of a [networks.NAME] private network between machines (no root)"
    )
    address: Annotated[str, AfterValidator(_interface_address)] | None = Field(
        None,
        description='Static guest address on this NIC, e.g. "10.10.0.2/24" (given to the guest through cloud-init)',
    )
    model: Ident = "virtio-net-pci"
    mac: Annotated[str, Field(pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")] | None = None
    forwards: list[Forward] = Field(
        default_factory=list, description="Host-to-guest port forwards (type user)"
    )
    outbound: bool = Field(
        False,
        description="type user: let the guest open connections out through user-mode NAT, to other hosts and to "
        "this host's own services (10.0.2.2 is the host's 127.0.0.1: loopback services, other VMs' monitors). Off by "
        "default (restrict=on): the guest reaches nothing, and forwards still work",
    )
    listen: Endpoint | None = Field(
        None, description="socket/stream: address to listen on, host:port"
    )
    connect: Endpoint | None = Field(
        None, description="socket/stream: address to connect to, host:port"
    )
    mcast: Endpoint | None = Field(None, description="socket: multicast group, addr:port")
    ifname: Ident | None = Field(None, description="tap: interface name")
    bridge: Ident | None = Field(
        None, description="bridge: host bridge name (uses qemu-bridge-helper)"
    )
    options: Options = Field(
        default_factory=dict, description="Extra -netdev properties, passed through"
    )
    device_options: Options = Field(
        default_factory=dict, description="Extra -device properties, passed through"
    )

    @model_validator(mode="before")
    @classmethod
    def _network_type(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("network") and "type" not in value:
            return {**value, "type": "network"}
        return value

    @model_validator(mode="after")
    def _fits_type(self) -> "NIC":
        if self.network and self.type != "network":
            raise ValueError(
                f'"network" makes a private-network NIC: remove type = "{self.type}" (or use type = "network")'
            )
        if self.type == "network" and not self.network:
            raise ValueError(
                'a "network" NIC needs network = "NAME" naming a [networks.NAME] table'
            )
        if self.forwards and self.type != "user":
            raise ValueError(f'"forwards" only works with type = "user", not "{self.type}"')
        if self.type in ("socket", "stream") and not (
            self.listen or self.connect or (self.mcast and self.type == "socket")
        ):
            raise ValueError(f'a "{self.type}" NIC needs "listen" or "connect" (host:port)')
        if self.type == "bridge" and not self.bridge:
            raise ValueError(
                'a "bridge" NIC needs "bridge" (the host bridge name, for example "br0")'
            )
        if self.outbound and self.type != "user":
            raise ValueError(f'"outbound" only works with type = "user", not "{self.type}"')
        if "restrict" in self.options:  # the one switch for host access is the named field
            raise ValueError(
                "options.restrict is not passed through: user-mode NICs are restricted unless outbound = true "
                "(which lets the guest reach other hosts and this host's loopback services)"
            )
        for key in ("listen", "connect", "mcast"):
            if getattr(self, key) and self.type not in ("socket", "stream"):
                raise ValueError(f'"{key}" only works with type = "socket" or "stream"')
        for key in (
            "hostfwd",
            "guestfwd",
        ):  # a passthrough would replace the loopback-only forwards
            if key in self.options:
                raise ValueError(
                    f"options.{key} is not passed through (it would replace the forwards, which bind 127.0.0.1): "
                    f'use forwards = [{{ host = 8080, guest = 80 }}], with address = "0.0.0.0" only if other hosts must reach it'
                )
        return self


class Share(Model):
    type: Literal["9p", "virtiofs"] = "9p"
    source: FilePath
    tag: Ident
    readonly: bool = False
    security_model: Literal["mapped-xattr", "mapped-file", "passthrough", "none"] = "mapped-xattr"
    options: Options = Field(default_factory=dict)


class Display(Model):
    """A visible display. VNC and SPICE have no authentication of their own that qemuspec could rely on,
    and any local user reaches a loopback port: by default they listen on a unix socket in the
    machine's private runtime directory (0700, socket 0600), which only its owner can open."""

    type: Literal["none", "vnc", "spice", "gtk", "sdl", "curses", "egl-headless"] = "none"
    listen: Annotated[str, AfterValidator(_listen_address)] | None = Field(
        None,
        description="vnc/spice: serve on TCP at this address instead of the private unix socket (the default); "
        "a TCP display refuses every client until a password is set over QMP, unless unauthenticated = true",
    )
    port: Port | None = Field(
        None,
        description="vnc/spice: TCP port (vnc: 5900 + display number); implies TCP on 127.0.0.1",
    )
    unauthenticated: bool = Field(
        False,
        description="vnc/spice on TCP: no password at all. Every local user (and every host that reaches the "
        "address) can then watch and type into the VM: an explicit opt-in, for a trusted single-user host only",
    )
    vga: Ident = Field(
        "std", description='Graphics card for a visible display (-vga); "default" leaves it to qemu'
    )
    options: Options = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: object) -> object:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _vnc_port(self) -> "Display":
        if self.type == "vnc" and self.port is not None and not 5900 <= self.port <= 5900 + 99:
            raise ValueError("a vnc port must be between 5900 and 5999 (display 0 to 99)")
        tcp = self.listen is not None or self.port is not None
        if (tcp or self.unauthenticated) and self.type not in ("vnc", "spice"):
            key = (
                "unauthenticated"
                if self.unauthenticated
                else ("listen" if self.listen is not None else "port")
            )
            raise ValueError(f'"{key}" only works with type = "vnc" or "spice"')
        taken = sorted(
            set(self.options) & {"password", "disable-ticketing", "unix", "addr", "port"}
        )
        if taken and self.type in (
            "vnc",
            "spice",
        ):  # where it listens and who may connect are the typed fields
            raise ValueError(
                f"options.{taken[0]} is not passed through: the display's address and authentication are "
                "listen, port and unauthenticated (default: a unix socket only its owner can open)"
            )
        if self.unauthenticated and not tcp:
            raise ValueError(
                '"unauthenticated" is for a TCP display: add listen = "127.0.0.1" (or a port), or remove it '
                "(the default unix socket is reachable by its owner only)"
            )
        return self


class Firmware(Model):
    type: Literal["bios", "uefi"] = "bios"
    code: FilePath | None = Field(
        None, description="bios: -bios image; uefi: the read-only code flash"
    )
    vars: FilePath | None = Field(
        None, description="uefi: template of the variable store, copied per machine"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: object) -> object:
        return {"type": value} if isinstance(value, str) else value


class Device(Model):
    driver: Ident
    id: Ident | None = None
    options: Options = Field(default_factory=dict)


class DeviceOption(Model):
    """A device qemuspec adds for an option (spec/devices.py declares which): `true`, or a table."""

    options: Options = Field(
        default_factory=dict, description="Extra -device properties, passed through"
    )


def _device_option(value: Any) -> Any:
    """`true` is the device with no extra properties, `false` no device."""
    if isinstance(value, bool):
        return {} if value else None
    return value


class QomObject(Model):
    type: Ident
    id: Ident
    options: Options = Field(default_factory=dict)


class CloudInit(Model):
    """A NoCloud seed (an ISO labelled cidata, attached as a cdrom). Text is a Jinja2 template that
    also gets ``machine_name`` and ``ssh_public_key`` (the state directory's key) at start."""

    user_data: Text | None = Field(None, description='Inline user-data, e.g. "#cloud-config\\n..."')
    user_data_file: FilePath | None = Field(
        None, description="user-data from a file (relative to the definition)"
    )
    meta_data: dict[Text, Any] = Field(
        default_factory=dict, description="Extra meta-data (instance-id and local-hostname are set)"
    )
    network_config: Text | None = Field(
        None, description="network-config v2; generated from NIC addresses when absent"
    )
    network_config_file: FilePath | None = Field(
        None, description="network-config from a file (relative to the definition)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> "CloudInit":
        for key in ("user_data", "network_config"):
            if getattr(self, key) is not None and getattr(self, f"{key}_file") is not None:
                raise ValueError(f"give {key} or {key}_file, not both")
        return self


class SSH(Model):
    user: Ident = Field(
        "root", description="Login name for `qemuspec ssh` and the ssh readiness probe"
    )
    port: Port = Field(
        22, description="Guest port of the ssh server (reached through a user-mode forward)"
    )


class Network(Model):
    """A private L2 network between machines of this file: a vde_switch that qemuspec runs, no root."""

    type: Literal["vde"] = "vde"


def _libvirt_uri(value: str) -> str:
    """A libvirt connection URI for the QEMU driver: where the libvirt backend places the machine
    (spec/uris.py says why it is strict and how libvirt reads it)."""
    return check_libvirt_uri(value)


def _qemu_binary(value: str, info: ValidationInfo) -> str:
    """A definition names a qemu, not any program: a shared file must not be able to run `sh`. A name
    is looked up on PATH; a path, like every path in a definition, is relative to the file (and is
    kept un-normalised, so a `../` the file wrote stays visible to the local-qemu rule)."""
    if not re.match(QEMU_NAME, os.path.basename(value)):
        raise ValueError(
            f'"{value}" is not a qemu system emulator: use a qemu-system-ARCH binary (or a wrapper with such a name)'
        )
    if os.sep not in value:
        return value
    base = (info.context or {}).get("base_dir")
    if base and not os.path.isabs(value) and not value.startswith("~"):
        # Joined as written, `..` kept: preflight sees that the file chose it (see _qemu_problems there).
        _resolve_path(value, info)
        return os.path.join(base, value)
    return _resolve_path(value, info)


class Machine(Model):
    """One virtual machine."""

    qemu: Annotated[str, AfterValidator(_text), AfterValidator(_qemu_binary)] = Field(
        "qemu-system-x86_64", description="The qemu binary: a qemu-system-* name on PATH or a path"
    )
    host: Annotated[str, AfterValidator(_libvirt_uri)] | None = Field(
        None,
        description='Run this machine through libvirt at this URI, e.g. "qemu+ssh://user@host/system" (default: locally, or --connect)',
    )
    machine: Ident = Field("q35", description="-machine type")
    machine_options: Options = Field(default_factory=dict, description="Extra -machine properties")
    accel: Accel | list[Accel] = Field(
        "auto",
        description='"auto" is kvm when /dev/kvm is usable, else tcg; a list is tried in order',
    )
    accel_options: Options = Field(
        default_factory=dict,
        description='Properties of the first accelerator, e.g. { thread = "single" }',
    )
    cpu: Ident = "max"
    cpu_options: Options = Field(
        default_factory=dict, description="CPU properties, for example { pmu = false }"
    )
    cpus: Annotated[int, Field(ge=1, le=1024)] = 1
    memory: MiB = Field(512, description='Guest RAM: "256M", "2G", or a number of MiB')
    kernel: FilePath | None = None
    initrd: FilePath | None = None
    cmdline: Line | None = Field(None, description="Kernel command line (needs kernel)")
    firmware: Firmware = Field(default_factory=Firmware)
    boot_order: Annotated[str, Field(pattern=r"^[a-dn-p]{1,8}$")] | None = Field(
        None,
        description='Boot order letters as qemu takes them: c disk, d cdrom, n network, e.g. "cd"',
    )
    serial: Literal["log", "pty", "socket", "none"] = Field(
        "log", description="log: captured to serial.log and readable live; pty; socket; none"
    )
    display: Display = Field(default_factory=Display)
    paused: bool = Field(False, description="Start with the CPUs stopped (-S)")
    defaults: bool = Field(
        False,
        description="Keep qemu's default devices (no -nodefaults): for imported command lines",
    )
    restart: Literal["no", "on-failure", "always"] = "no"
    stop_timeout: Seconds = Field(
        30.0, description="How long ACPI powerdown may take before quit, then signals"
    )
    warm: bool = Field(
        False,
        description="Warm start: save the machine's state once it is ready, and restore it on later `up`s "
        "instead of booting (disk writes after the save last until `down`)",
    )
    depends_on: list[Text] = Field(default_factory=list)
    qmp: QMP = Field(default_factory=QMP)
    ready: Ready = Field(default_factory=Ready)
    disks: list[Disk] = Field(default_factory=list)
    cdrom: Annotated[list[FilePath], BeforeValidator(_as_list)] = Field(default_factory=list)
    nics: list[NIC] = Field(default_factory=list)
    shares: list[Share] = Field(default_factory=list)
    rng: bool = Field(False, description="A virtio-rng device fed from /dev/urandom")
    agent: bool = Field(False, description="A virtio-serial channel for qemu-guest-agent")
    balloon: Annotated[
        DeviceOption | None,
        BeforeValidator(_device_option),
        QemuDevice(
            "virtio-balloon-pci",
            "balloon0",
            libvirt="memballoon",
            model="virtio",
            off="none",
            attributes=(
                ("deflate-on-oom", "autodeflate"),
                ("free-page-reporting", "freePageReporting"),
            ),
        ),
    ] = Field(
        None,
        description="A virtio memory balloon: true, or { options = { deflate-on-oom = true } }. The host can then "
        "take memory back from the running guest (QMP balloon) and read its use (query-balloon)",
    )
    cloud_init: CloudInit | None = None
    provision: Provision = Field(
        default_factory=list,
        description="Run in the guest once it is ready, once per machine life: shell commands "
        '(["apt-get install -y nginx", ...]) or { script = "path" }; `qemuspec provision` runs them again',
    )
    setup: Annotated[list[GuestCommand], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description="Guest commands run once, in order, before the checkpoint of `run`, `test` and the pytest "
        'plugin is saved (so every restore starts provisioned), e.g. "apk add curl": through the guest agent '
        "(/bin/sh -c) or ssh; a change makes a new checkpoint",
    )
    ssh: SSH = Field(default_factory=SSH)
    devices: list[Device] = Field(default_factory=list)
    objects: list[QomObject] = Field(default_factory=list)
    append: list[Line] = Field(
        default_factory=list, description="Raw qemu switches, verbatim, last on the command line"
    )
    overrides: list[Annotated[str, Field(pattern=r"^-[a-z][a-z0-9-]*$")]] = Field(
        default_factory=list,
        description='Switches that append may give although a typed field renders them, e.g. ["-cpu"]: qemuspec then '
        "leaves its own out and the append wins. Without this, such a switch in append is an error",
    )

    @model_validator(mode="after")
    def _coherent(self, info: ValidationInfo) -> "Machine":
        if (info.context or {}).get("partial"):
            return self  # the builder checks fields as they are set, and the whole at start()
        if (self.initrd or self.cmdline) and not self.kernel:
            field = "initrd" if self.initrd else "cmdline"
            raise ValueError(
                f'"{field}" needs "kernel": set kernel = "path/to/vmlinuz" or remove {field}'
            )
        if self.ready.serial is not None and self.serial not in ("log", "socket"):
            raise ValueError(
                f'ready.serial: this probe reads the serial console, which serial = "{self.serial}" '
                'does not give qemuspec: set serial = "log" (the default), or use another probe '
                "(ready.tcp, ready.agent, ready.ssh)"
            )
        if self.ready.agent and not self.agent:
            raise ValueError("ready.agent needs the guest-agent channel: add agent = true")
        for field, used in (
            ("ready.command", bool(self.ready.command)),
            ("provision", bool(self.provision)),
            ("setup", bool(self.setup)),
        ):
            ssh = any(
                n.type == "user" and any(f.guest == self.ssh.port for f in n.forwards)
                for n in self.nics
            )
            if used and not self.agent and not ssh:
                raise ValueError(
                    f"{field} runs in the guest through the guest agent or ssh, and this machine has "
                    "neither: add agent = true (with qemu-guest-agent in the guest), or a user NIC "
                    f"forwarding guest port {self.ssh.port} "
                    f"(forwards = [{{ host = 0, guest = {self.ssh.port} }}])"
                )
        if (self.ready.tcp or self.ready.ssh) and not any(n.type == "user" for n in self.nics):
            raise ValueError(
                "ready.tcp and ready.ssh reach the guest through a user-mode NIC: add one to nics"
            )
        if (
            any(s.type == "virtiofs" for s in self.shares)
            and "memory-backend" in self.machine_options
        ):
            raise ValueError(
                "virtiofs shares set machine_options.memory-backend themselves: remove it"
            )
        from qemuspec.spec import passthrough

        for name in self.overrides:
            if passthrough.switch(name) not in passthrough.OVERRIDABLE:
                raise ValueError(
                    f'overrides: "{name}" is not a switch qemuspec renders from a typed field; '
                    f"these can be overridden: {', '.join(sorted(passthrough.OVERRIDABLE))}"
                )
            if not any(
                sw == passthrough.switch(name) for _, sw, _ in passthrough.switches(self.append)
            ):
                raise ValueError(
                    f'overrides: "{name}" is not in append: remove it from overrides, or add the switch to append'
                )
        problems = passthrough.conflicts(self) + passthrough.id_problems(self)
        if problems:
            where, what = problems[0]
            raise ValueError(f"{where}: {what}")
        return self


class Case(Model):
    """A declared test case (`qemuspec test`): a command run on its own fresh restore of a machine."""

    machine: Annotated[str, Field(pattern=_NAME.pattern)] | None = Field(
        None, description="The machine it runs on (default: the file's only machine)"
    )
    command: GuestCommand = Field(
        description="Run by the guest's /bin/sh (agent) or login shell (ssh); exit 0 passes"
    )
    timeout: Seconds = Field(
        60.0, description='How long the command may run, e.g. "60s" (the restore not counted)'
    )


class File(Model):
    """A definition file: variables and one or more machines."""

    vars: dict[Text, Any] = Field(
        default_factory=dict, description="Template variables, used as {{ name }}"
    )
    networks: dict[Ident, Network] = Field(
        default_factory=dict, description="Private networks between machines"
    )
    machines: dict[Annotated[str, Field(pattern=_NAME.pattern)], Machine] = Field(min_length=1)
    tests: dict[Annotated[str, Field(pattern=_NAME.pattern)], Case] = Field(
        default_factory=dict,
        description="Test cases for `qemuspec test`: [tests.NAME] with machine, command, timeout",
    )

    @model_validator(mode="after")
    def _dependencies(self) -> "File":
        import difflib

        for case_name, case in self.tests.items():
            if case.machine is None and len(self.machines) > 1:
                raise ValueError(
                    f"tests.{case_name}.machine: this file has {len(self.machines)} machines: say which "
                    f'one the case runs on, e.g. machine = "{next(iter(self.machines))}"'
                )
            if case.machine is not None and case.machine not in self.machines:
                close = difflib.get_close_matches(case.machine, list(self.machines), n=1)
                hint = (
                    f'did you mean "{close[0]}"?'
                    if close
                    else f"known machines: {', '.join(self.machines)}"
                )
                raise ValueError(
                    f'tests.{case_name}.machine: no machine named "{case.machine}": {hint}'
                )

        for name, machine in self.machines.items():
            for index, nic in enumerate(machine.nics):
                if nic.network and nic.network not in self.networks:
                    close = difflib.get_close_matches(nic.network, list(self.networks), n=1)
                    hint = (
                        f'did you mean "{close[0]}"?'
                        if close
                        else f"declare it: [networks.{nic.network}]"
                    )
                    raise ValueError(
                        f'machines.{name}.nics.{index}.network: no network named "{nic.network}": {hint}'
                    )
            for dep in machine.depends_on:
                if dep not in self.machines:
                    close = difflib.get_close_matches(dep, list(self.machines), n=1)
                    hint = (
                        f'did you mean "{close[0]}"?'
                        if close
                        else f"known machines: {', '.join(self.machines)}"
                    )
                    raise ValueError(
                        f'machines.{name}.depends_on: no machine named "{dep}": {hint}'
                    )
                if dep == name:
                    raise ValueError(
                        f"machines.{name}.depends_on: a machine cannot depend on itself"
                    )
        taken: dict[tuple, str] = {}
        for name, machine in self.machines.items():
            for where, key in _host_ports(machine):
                path = f"machines.{name}.{where}"
                if key in taken:
                    raise ValueError(
                        f"{path}: host port {key[1]}/{key[0]} is already declared at {taken[key]}: "
                        "each host port can be forwarded once; choose another (host = 0 picks a free one)"
                    )
                taken[key] = path
        order_machines(self.machines)
        return self


def _host_ports(machine: Machine) -> list[tuple[str, tuple]]:
    """(key path, (protocol, port)) of each fixed host port a machine listens on."""
    out = []
    for index, nic in enumerate(machine.nics):
        for number, fwd in enumerate(nic.forwards):
            if fwd.host:
                out.append((f"nics.{index}.forwards.{number}.host", (fwd.protocol, fwd.host)))
    display = machine.display
    if display.type in ("vnc", "spice") and (
        display.port or display.listen is not None
    ):  # TCP (default: a unix socket)
        out.append(
            ("display.port", ("tcp", display.port or (5900 if display.type == "vnc" else 5930)))
        )
    return out


@cache
def declared() -> tuple[tuple[str, QemuDevice], ...]:
    """(field, declaration) of each option of a machine that is one qemu device (spec/devices.py), in
    the model's field order (the order the renderer writes them in, after the generic devices)."""
    return tuple(
        (name, meta)
        for name, info in Machine.model_fields.items()
        for meta in info.metadata
        if isinstance(meta, QemuDevice)
    )
