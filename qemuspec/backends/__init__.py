"""Where a machine runs, decided once: here, under qemuspec's own supervisor (the default), or through
libvirt at a URI (``host`` in the definition, else ``--connect`` / ``$QEMUSPEC_CONNECT``). The
chosen backend (backends/base.py) is all the rest of the code asks. The libvirt modules import the
libvirt binding, and are imported only when a machine is placed on a libvirt host."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from qemuspec.backends.base import Backend
    from qemuspec.spec.models import File

CONNECT_ENV = "QEMUSPEC_CONNECT"  # read by qemuspec.settings; the CLI passes it in as ``connect``


def placement(spec: File, names: list[str], connect: str | None = None) -> dict[str, str | None]:
    """Machine -> libvirt URI, or None for the local supervisor. A machine's own ``host`` wins over
    the run's choice, so one file can place machines on several hosts."""
    default = connect or None
    if default:
        from qemuspec.spec.uris import check_libvirt_uri

        try:
            check_libvirt_uri(default)
        except ValueError as exc:
            from qemuspec.errors import UsageError

            raise UsageError(f"--connect / ${CONNECT_ENV}: {exc}") from None
    return {name: spec.machines[name].host or default for name in names}


def _local(uri: str | None, root: str, source: str, owner: str | None) -> Backend:
    from qemuspec.backends.local import LocalBackend

    return LocalBackend(root, source, owner)


def _libvirt(uri: str | None, root: str, source: str, owner: str | None) -> Backend:
    from qemuspec.backends.libvirt_domain import LibvirtBackend

    assert uri is not None
    return LibvirtBackend(uri, root, source)


# The backends by kind, as lima's driver registry: a new backend is one entry and one module.
REGISTRY: dict[str, Callable[[str | None, str, str, str | None], Backend]] = {
    "local": _local,
    "libvirt": _libvirt,
}


def chosen(
    spec: File, root: str, source: str, connect: str | None = None, owner: str | None = None
) -> dict[str, Backend]:
    """Every machine of the file -> its backend, one backend object per place (so reconcile can tell
    which machines share one)."""
    made: dict[str | None, Backend] = {}
    out: dict[str, Backend] = {}
    for name, uri in placement(spec, list(spec.machines), connect).items():
        if uri not in made:
            made[uri] = REGISTRY["libvirt" if uri else "local"](uri, root, source, owner)
        out[name] = made[uri]
    return out
