"""Logs for machines: JSON lines, one event per line, alongside twistd's text log.

- ``[logging] json_file = "/var/log/mailappliance/events.jsonl"`` adds a JSON
  lines file (the text log stays as twistd writes it);
- ``twistd --logger mailappliance.logs.json_stdout mailappliance ...`` makes
  the main log itself JSON lines on standard output (for journald).

One compact object per line (docs/admin.md, "Logs"): ``time`` (UTC, ISO
8601), ``level``, ``event`` (the message as the text log has it, without
the session prefix), ``namespace``, ``session`` and ``client`` when the
event belongs to a connection, then the event's own fields (``id``,
``rcpt``, ``uid``, ``reason`` ...) as separate keys. Errors add ``error``
and ``traceback``. Twisted's own bookkeeping (``log_format``, ``log_logger``
objects, ...) never appears.

Twisted's chatter about its own machinery ("Starting factory <...>", a UDP
port opened and closed for every DNS query) is dropped unless the level is
``debug``.
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import IO, cast

from constantly import NamedConstant
from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

LEVELS = ("debug", "info", "warn", "error", "critical")
SESSION_PREFIX = "session={session} client=[{client}] "
REOPEN_CHECK_INTERVAL = 1.0  # seconds between checks whether logrotate moved the file
MAX_FIELD_LENGTH = 4096

_NOISE = re.compile(
    r"^(?:(?:Starting|Stopping) (?:factory|protocol) "
    r"|\S+ starting on \d+$"
    r"|\((?:UDP |TCP |UNIX )?Port \d+ Closed\)$)"
)


def _text(event: LogEvent) -> str:
    """The event's message as the text log has it (legacy ``log.msg`` events included)."""
    if "log_format" not in event and "log_text" not in event and event.get("message"):
        return " ".join(str(m) for m in event["message"])
    return formatEvent(event)


_NOISE_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def is_twisted_noise(event: LogEvent) -> bool:
    """Twisted announcing its own factories, protocols and ports (ours too: their
    namespace is the factory's class), which says nothing an admin needs."""
    if event.get("log_level", LogLevel.info) > LogLevel.info or event.get("isError"):
        return False
    fmt = event.get("log_format")
    if fmt is not None and fmt in _NOISE_FORMATS:
        return True
    if event.get("log_namespace") == "log_legacy":  # legacy log.msg text
        return bool(_NOISE.match(_text(event)))
    return False


def _noise_predicate(event: LogEvent) -> NamedConstant:
    return PredicateResult.no if is_twisted_noise(event) else PredicateResult.maybe


JsonValue = str | int | float | bool | list[str | int | float | bool] | None


def _json_value(value: object) -> JsonValue:
    """A JSON-safe form of a field value, or None to leave the field out."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, str):
        return value[:MAX_FIELD_LENGTH]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")[:MAX_FIELD_LENGTH]
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if isinstance(value, (Path, BaseException)):
        return str(value)[:MAX_FIELD_LENGTH]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return list(value)
    return None


def event_record(event: LogEvent) -> dict[str, JsonValue]:
    """The documented JSON object of one log event (see the module docstring)."""
    level = event.get("log_level")
    record: dict[str, JsonValue] = {
        "time": datetime.datetime.fromtimestamp(event.get("log_time", time.time()), datetime.UTC)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if isinstance(level, NamedConstant) else ("error" if event.get("isError") else "info"),
    }
    fmt = event.get("log_format")
    if isinstance(fmt, str) and fmt.startswith(SESSION_PREFIX) and "session" in event:
        record["event"] = formatEvent({**event, "log_format": fmt[len(SESSION_PREFIX):]})
    else:
        record["event"] = _text(event)
    namespace = record["namespace"] = str(event.get("log_namespace", ""))
    ours = namespace.startswith("mailappliance")
    for key, value in event.items():
        if key.startswith("log_") or key in record:
            continue
        if not ours and key in ("message", "isError", "system", "format", "why", "failure", "time", "printed"):
            continue  # legacy log.msg bookkeeping
        converted = _json_value(value)
        if converted is not None or value is None:
            record[key] = converted
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        error_type = failure.type.__name__ if failure.type is not None else "Exception"  # a Failure has its type
        record["error"] = f"{error_type}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return record


def event_line(event: LogEvent) -> str:
    """One event as one JSON line (no newline inside: JSON escapes them)."""
    return json.dumps(event_record(event), ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


@implementer(ILogObserver)
class JsonLineObserver:
    """Writes each event as one JSON line to a stream."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: LogEvent) -> None:
        self.stream.write(event_line(event))
        self.stream.flush()


def json_stdout() -> ILogObserver:
    """A log observer factory for ``twistd --logger``."""
    return JsonLineObserver(sys.stdout)


class JsonLogService(service.Service):
    """Adds a JSON lines observer for the daemon's lifetime.

    Run as root with twistd's --uid/--gid, the file (and a directory it had
    to create) is created and handed to that user before privileges are
    dropped, so a file under ``/var/log/mailappliance`` works. The file is
    reopened when logrotate has moved it away (checked at most once a
    second), so no signal is needed after a rotation.
    """

    def __init__(self, path: Path, owner: tuple[int, int] | None = None, source: Path | str = "",
                 log_filter: LogLevelService | None = None) -> None:
        self.path = path
        self.owner = owner
        self.source = source
        self.log_filter = log_filter  # the level (and noise) filter every other observer has
        self._file: IO[str] | None = None
        self._observer: ILogObserver | None = None
        self._checked = 0.0
        self._reopen_failed = False

    def _error(self, e: OSError) -> Exception:
        from mailappliance.config import StartupError

        return StartupError(self.source or "(config)", "logging.json_file",
                           f"cannot open {self.path}: {e.strerror or e}")

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self.owner is None or os.geteuid() != 0:
            return
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o750, parents=True)
                os.chown(self.path.parent, *self.owner)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.close(fd)
            os.chown(self.path, *self.owner)
            self._file = self._open()  # kept across the privilege drop
        except OSError as e:
            raise self._error(e) from None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self._file is None:
            try:
                self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
                self._file = self._open()
            except OSError as e:
                raise self._error(e) from None
        # Any callable taking an event is an observer; zope.interface cannot declare that of a method.
        write = cast(ILogObserver, self._write)
        observer = write if self.log_filter is None else self.log_filter.wrap(write)
        globalLogPublisher.addObserver(observer)
        self._observer = observer

    def _write(self, event: LogEvent) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if now - self._checked >= REOPEN_CHECK_INTERVAL:
            self._checked = now
            self._reopen_if_moved()
        self._file.write(event_line(event))

    def _reopen_if_moved(self) -> None:
        assert self._file is not None
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            moved = True
        except OSError:
            return
        if not moved:
            return
        try:
            fresh = self._open()
        except OSError as e:
            if not self._reopen_failed:  # say it once, in the file we still have
                self._reopen_failed = True
                self._file.write(event_line({"log_level": LogLevel.error, "log_namespace": "mailappliance",
                                             "log_format": "cannot reopen {file} after rotation: {why}",
                                             "file": str(self.path), "why": e.strerror, "log_time": time.time()}))
            return
        self._reopen_failed = False
        self._file.close()
        self._file = fresh

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None


class LogLevelService(service.Service):
    """Filters every log observer by a level that SIGHUP can change (``settings`` = the level name),
    and drops Twisted's own chatter unless the level is debug.

    twistd installs its observers before the application starts; this wraps
    them (Twisted has no public call for that, hence the one private access).
    """

    def __init__(self, level: str) -> None:
        self._predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
        self._level = level
        self._wrapped = False

    @property
    def settings(self) -> str:
        return self._level

    @settings.setter
    def settings(self, level: str) -> None:
        self._level = level
        self._predicate.defaultLogLevel = LogLevel.levelWithName(level)
        self._predicate.clearLogLevels()  # the root namespace keeps a copy of the default
        self._publish_level()

    def _publish_level(self) -> None:
        global _info_dropped
        _info_dropped = self._wrapped and LogLevel.levelWithName(self._level) > LogLevel.info

    def _quiet(self, event: LogEvent) -> NamedConstant:
        return PredicateResult.maybe if self._level == "debug" else _noise_predicate(event)

    def wrap(self, observer: ILogObserver) -> ILogObserver:
        """``observer`` behind this level and the noise filter."""
        # Any callable returning a PredicateResult is a predicate; zope.interface cannot declare that of a method.
        return FilteringLogObserver(observer, [cast(ILogFilterPredicate, self._quiet), self._predicate])

    def privilegedStartService(self) -> None:
        """Before the listeners bind (their "starting on" lines are noise too)."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self._wrap_all()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self._wrap_all()

    def _wrap_all(self) -> None:
        if self._wrapped:
            return
        self._wrapped = True
        for observer in list(globalLogPublisher._observers):  # noqa: SLF001
            globalLogPublisher.removeObserver(observer)
            globalLogPublisher.addObserver(self.wrap(observer))
        self._publish_level()


_info_dropped = False  # every observer is behind a LogLevelService whose level is above info


def info_dropped() -> bool:
    """True when an info (or debug) event would be dropped by every observer: a busy
    path may then skip building it (formatting and escaping its fields cost more
    than the rest of a log call)."""
    return _info_dropped
