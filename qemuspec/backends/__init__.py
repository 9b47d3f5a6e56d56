"""Where a machine runs: here, under qemuspec's own supervisor (the default), or through libvirt at a
URI (``host`` in the definition, else ``--connect`` / ``$QEMUSPEC_CONNECT``). The libvirt modules
import the libvirt binding; nothing on the local path imports them."""

from __future__ import annotations

CONNECT_ENV = "QEMUSPEC_CONNECT"  # read by qemuspec.settings; the CLI passes it in as ``connect``


def placement(spec, names: list[str], connect: str | None = None) -> dict[str, str | None]:
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


def any_libvirt(spec, names: list[str], connect: str | None = None) -> bool:
    return any(placement(spec, names, connect).values())
