"""Command-line options and service construction for ``twistd mailappliance``.

Whatever stops the start - a config mistake, a path that cannot be written, a
port that cannot be bound, a certificate that does not load - ends the
process with ONE line on standard error and in the log (exit status 1), never
a traceback: the admin reads what failed and where, and systemd's
``Restart=on-failure`` loop shows the same line each time.
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from mailappliance.config import ConfigError, StartupError, default_config_path, load_config
from mailappliance.tls import TLSConfigError

log = Logger(namespace="mailappliance")

# What a start can fail with that is the admin's to fix (anything else is a bug: traceback).
STARTUP_ERRORS = (ConfigError, OSError, CannotListenError, TLSConfigError)


class Options(usage.Options):
    """Options of ``twistd mailappliance``; everything else lives in the TOML file."""

    synopsis = "--config PATH"
    longdesc = (
        "Runs the MX, submission and POP3 listeners described in the TOML config "
        "file (default /etc/mailappliance/mailappliance.toml, or $MAILAPPLIANCE_CONFIG). "
        "See etc/mailappliance.toml for an annotated example and docs/admin.md for the admin guide."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            self["config"] = default_config_path()


def startup_error_line(error: BaseException) -> str:
    """The one line that says why the daemon did not start."""
    if isinstance(error, StartupError):
        return f"mailappliance: cannot start: {error}"
    if isinstance(error, ConfigError):
        return f"mailappliance: configuration error: {error}"
    if isinstance(error, CannotListenError):
        reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
        return f"mailappliance: cannot start: cannot listen on {error.interface or '*'}:{error.port}: {reason}"
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return f"mailappliance: cannot start: {error.strerror or error}{where}"
    return f"mailappliance: cannot start: {error}"


def _stop(error: BaseException, echo: bool) -> None:
    line = startup_error_line(error)
    log.critical("{line}", line=line)
    if echo and sys.__stderr__ is not None:  # the log is a file: the terminal (or journal) hears it too
        print(line, file=sys.__stderr__, flush=True)
    raise SystemExit(1)


class GuardedStart(service.MultiService):
    """The appliance's top service: a start-up failure the admin can fix is one line, then exit 1.

    Children started before the failure are stopped again (their threads
    would otherwise keep the process alive).  ``echo``: also write the line
    to standard error (unless the log itself goes there: ``--logfile=-``).
    """

    def __init__(self, echo: bool = True) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # MultiService is unannotated
        self.echo = echo

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]  # MultiService is unannotated
        except STARTUP_ERRORS as e:
            _stop(e, self.echo)

    def startService(self) -> None:
        service.Service.startService(self)
        started: list[IService] = []
        try:
            for child in self:
                child.startService()
                started.append(child)
        except STARTUP_ERRORS as e:
            for child in reversed(started):
                try:
                    child.stopService()
                except Exception:
                    log.failure("stopping {child} after a failed start", child=child)
            _stop(e, self.echo)


def makeService(options: Options) -> IService:
    """Build the whole appliance; a bad config ends the process with one clear line."""
    from mailappliance.service import build_service

    parent = getattr(options, "parent", None) or {}
    uid, gid = parent.get("uid"), parent.get("gid")
    owner = (uid, gid if gid is not None else -1) if uid is not None else None
    try:
        settings = load_config(options["config"])
        built = build_service(settings, owner=owner)
    except STARTUP_ERRORS as e:
        print(startup_error_line(e), file=sys.stderr)
        raise SystemExit(1) from None
    top = GuardedStart(echo=parent.get("logfile") != "-")
    for child in list(built):
        child.disownServiceParent()
        child.setServiceParent(top)
    return top
