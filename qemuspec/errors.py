"""One exception hierarchy for the whole project.

Every failure a user can cause or meet derives from :class:`QemuspecError`, so the CLI can turn any of
them into a readable paragraph and an exit code, and library users can catch one type.
"""

from __future__ import annotations


class QemuspecError(Exception):
    """Base of every error qemuspec raises on purpose."""

    exit_code = 1


class SpecError(QemuspecError):
    """A definition (file or builder) is invalid. Carries one paragraph per problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n\n".join(self.problems))


class UsageError(QemuspecError):
    """The command line itself is wrong (unknown machine name, bad --var)."""

    exit_code = 2


class QMPError(QemuspecError):
    """QEMU answered a command with an error: ``error_class`` and ``desc`` as QMP sent them."""

    def __init__(self, command: str, error_class: str, desc: str, source: str = "QMP"):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{source} {command} failed: {error_class}: {desc}")


class QMPConnectionError(QemuspecError):
    """The QMP peer could not be reached, went away (EOF), or spoke something that is not QMP."""


class QMPProtocolError(QMPConnectionError):
    """The peer (qemu, or a guest agent the guest controls) sent a message that breaks the protocol: not
    JSON, not an object, nested or sized past the limits, or a reply of the wrong shape. The connection
    cannot be trusted after it, so it is a connection error."""


class QMPTimeout(QemuspecError, TimeoutError):
    """A QMP wait (reply, event, greeting) ran past its deadline."""


class LaunchError(QemuspecError):
    """qemu could not be started, or exited before it was under control."""


class ReadyTimeout(QemuspecError, TimeoutError):
    """A readiness probe did not pass in time; the message holds the console and qemu's stderr."""

    probe: str | None = (
        None  # which probe, for status: "never became ready (probe ..., after ... s)"
    )
    why: str | None = (
        None  # the guest died first (a panic, a shutdown, qemu exited): status says so
    )


class GuestGone(QemuspecError):
    """The guest went away (powered off, rebooted, its qemu exited) before a command in it finished:
    exit 255, as ssh does when the connection is lost, so it is never taken for the command's own code."""

    exit_code = 255


class GuestCrashed(QemuspecError):
    """The guest kernel crashed while `run`, `test` or the pytest plugin watched it (runtime/crash.py):
    a panic, an oops, a BUG, KASAN (or a warning, with --fail-on warn). ``report`` is the crash report
    as JSON-ready data; the message is its text. Its exit code is the CLI's (cli/common.py)."""

    def __init__(self, message: str, report: dict):
        self.report = report
        super().__init__(message)


class StopRequested(QemuspecError):
    """A stop (``down``, SIGTERM) arrived while a machine was still starting: the wait ends at once."""


class ImageError(QemuspecError):
    """qemu-img failed; the message is qemu-img's own."""


class QemuspecWarning(UserWarning):
    """Something worth saying that does not stop the command (an unused QEMUSPEC_VAR_*, an override)."""
