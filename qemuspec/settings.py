"""Everything qemuspec reads from the environment, read in one place.

The CLI builds one :class:`Settings` from ``os.environ`` at start and passes it down as an argument
(like black's ``Mode``); the library takes one as ``Qemu(settings=...)`` (like httpx's
``trust_env``), so a test or an embedding program can run with settings of its own without touching
the process environment. No other module reads the environment (tests/test_layout.py checks it).

Where the chain of calls to a point of use belongs to code that has no settings parameter (the
supervisor forked by reconcile, the user's directories under statedir's proofs), :func:`current` is
the Settings the CLI installed with :func:`install` (or, for a library caller who made none, one
read from the environment once and kept): read once, never again at the point of use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

VAR_PREFIX = "QEMUSPEC_VAR_"

# name -> what it does (also printed by `qemuspec --help`)
VARIABLES = {
    "QEMUSPEC_FILE": "definition file used when a command is given none",
    "QEMUSPEC_STATE_DIR": "state directory (default: .qemuspec beside the definition file)",
    "QEMUSPEC_ACCEL": "accelerator list forced for every machine of a run, e.g. tcg",
    "QEMUSPEC_VAR_<name>": "value of template variable <name>",
    "QEMUSPEC_QEMU_IMG": "qemu-img binary",
    "QEMUSPEC_ALLOW_LOCAL_QEMU": "allow a qemu binary inside the definition's own tree (as --allow-local-qemu)",
    "QEMUSPEC_ALLOW_HOST_PATHS": "allow shares and writable disks outside the definition's tree, and device nodes "
    "(as --allow-host-paths)",
    "QEMUSPEC_DEBUG": "print tracebacks instead of one-paragraph errors",
    "QEMUSPEC_CACHE": "0: always validate definitions afresh (default: validated definitions are cached by content)",
    "QEMUSPEC_GREETING_TIMEOUT": "seconds a starting qemu has to answer on QMP before it counts as hung (up, run: 15; "
    "validate --probe: 10)",
    "QEMUSPEC_TEST_HOLD_SAVE": "fault tests: a supervisor stops (SIGSTOP) at this warm-save point (snapshot, migrating)",
    "QEMUSPEC_OFFLINE": "1: never download a base image; one missing from the cache is an error (as --offline)",
    "QEMUSPEC_WARM_DIR": "checkpoints of `run`, `test` and the pytest plugin, named by their content key "
    "(default: warm/ in qemuspec's directory of the user's cache; `qemuspec warm key FILE` prints the key)",
    "QEMUSPEC_CONNECT": "libvirt URI for machines without a host of their own (as --connect)",
    "HOME": "the user's home: ~/.cache, ~/.local/state (the keep base: ssh keys, ownership records)",
    "XDG_STATE_HOME": "the keep base is qemuspec/ in it when set (default ~/.local/state)",
    "XDG_RUNTIME_DIR": "the runtime registry (running machines, sockets) is qemuspec/ in it when "
    "private (else /tmp/qemuspec-UID)",
    "TERM": "dumb: plain progress lines, never redrawn in place",
    "XDG_CACHE_HOME": "the user's cache: base images, validated definitions and qemu capabilities under qemuspec/",
    "http_proxy, https_proxy, no_proxy": "proxies for image downloads (upper-case names too)",
    "NO_COLOR": "no colour, even on a terminal",
    "CI": "true, 1 or yes: line-based progress, never redrawn in place",
}


@dataclass(frozen=True)
class Settings:
    file: str | None = None
    state_dir: str | None = None
    accel: str | None = None
    qemu_img: str = "qemu-img"
    debug: bool = False
    allow_local_qemu: bool = False
    allow_host_paths: bool = False
    no_color: bool = False
    ci: bool = False
    connect: str | None = None  # QEMUSPEC_CONNECT: libvirt URI for machines without their own host
    cache: str | None = (
        None  # directory of validated definitions (spec/cache.py); None: QEMUSPEC_CACHE=0
    )
    variables: dict[str, str] = field(default_factory=dict)
    test_hold_save: str | None = None  # QEMUSPEC_TEST_HOLD_SAVE (runtime/warm.py; fault tests only)
    # where the user's own directories are (runtime/paths.py: the runtime base, the keep base)
    home: str = ""  # HOME, else the password database's home
    state_home: str | None = None  # XDG_STATE_HOME
    runtime_dir: str | None = None  # XDG_RUNTIME_DIR
    term: str | None = None  # TERM ("dumb": no redrawn progress lines)
    cache_dir: str = ""  # qemuspec's directory in the user's cache (capabilities, definitions)
    offline: bool = (
        False  # QEMUSPEC_OFFLINE: a base image missing from the cache is an error, never a download
    )
    proxies: dict[str, str] = field(
        default_factory=dict
    )  # http/https/no -> value of the *_proxy variables
    greeting_timeout: float | None = None  # QEMUSPEC_GREETING_TIMEOUT; None: each caller's default
    warm_dir: str = (
        ""  # QEMUSPEC_WARM_DIR: checkpoints by content key (runtime/fresh.py); "": the cache's
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        return cls(
            file=env.get("QEMUSPEC_FILE") or None,
            state_dir=env.get("QEMUSPEC_STATE_DIR") or None,
            accel=env.get("QEMUSPEC_ACCEL") or None,
            qemu_img=env.get("QEMUSPEC_QEMU_IMG") or "qemu-img",
            debug=bool(env.get("QEMUSPEC_DEBUG")),
            allow_local_qemu=env.get("QEMUSPEC_ALLOW_LOCAL_QEMU", "") not in ("", "0"),
            allow_host_paths=env.get("QEMUSPEC_ALLOW_HOST_PATHS", "") not in ("", "0"),
            no_color="NO_COLOR" in env,
            ci=env.get("CI", "").lower() in ("1", "true", "yes"),
            connect=env.get("QEMUSPEC_CONNECT") or None,
            cache=None
            if env.get("QEMUSPEC_CACHE", "") == "0"
            else os.path.join(cache_base(env), "definitions"),
            cache_dir=cache_base(env),
            test_hold_save=env.get("QEMUSPEC_TEST_HOLD_SAVE") or None,
            offline=env.get("QEMUSPEC_OFFLINE", "") not in ("", "0"),
            proxies=_proxies(env),
            greeting_timeout=_seconds(env.get("QEMUSPEC_GREETING_TIMEOUT")),
            warm_dir=os.path.abspath(env["QEMUSPEC_WARM_DIR"])
            if env.get("QEMUSPEC_WARM_DIR")
            else os.path.join(cache_base(env), "warm"),
            variables={k[len(VAR_PREFIX) :]: v for k, v in env.items() if k.startswith(VAR_PREFIX)},
            home=env.get("HOME") or os.path.expanduser("~"),
            state_home=env.get("XDG_STATE_HOME") or None,
            runtime_dir=env.get("XDG_RUNTIME_DIR") or None,
            term=env.get("TERM"),
        )

    @property
    def images(self) -> str:
        """The base-image cache (imagecache.py), beside the other caches in the user's cache."""
        return os.path.join(self.cache_dir, "images")

    @property
    def checkpoints(self) -> str:
        """Where run/test checkpoints live (runtime/fresh.py): QEMUSPEC_WARM_DIR, else the cache's."""
        return self.warm_dir or os.path.join(self.cache_dir or cache_base({}), "warm")

    def var_environ(self) -> dict[str, str]:
        """These settings in the environment form that the loader and preflight take (``environ=``)."""
        out = {VAR_PREFIX + name: value for name, value in self.variables.items()}
        if self.accel:
            out["QEMUSPEC_ACCEL"] = self.accel
        if self.allow_local_qemu:
            out["QEMUSPEC_ALLOW_LOCAL_QEMU"] = "1"
        if self.allow_host_paths:
            out["QEMUSPEC_ALLOW_HOST_PATHS"] = "1"
        return out


_current: Settings | None = None


def install(settings: Settings) -> Settings:
    """Make ``settings`` the process's own (the CLI does this once, at start); returns it."""
    global _current
    _current = settings
    return settings


def current() -> Settings:
    """The Settings installed by the CLI, else the environment's, read on first use and kept."""
    return _current if _current is not None else install(Settings.from_env())


def _proxies(env: Mapping[str, str]) -> dict[str, str]:
    """The proxy variables curl and urllib honour (lower case first), for image downloads."""
    out = {}
    for scheme in ("http", "https", "no"):
        value = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY")
        if value:
            out[scheme] = value
    return out


def _seconds(text: str | None) -> float | None:
    """A positive number of seconds, or None (unset or not a positive number: the default applies)."""
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


def cache_base(env: Mapping[str, str]) -> str:
    """qemuspec's directory in the user's cache (qemu capabilities, validated definitions, base images)."""
    return os.path.join(
        env.get("XDG_CACHE_HOME")
        or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache"),
        "qemuspec",
    )
