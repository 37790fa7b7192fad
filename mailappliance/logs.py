"""Logs for machines: JSON lines, one event per line, alongside twistd's text log.

- ``[logging] json_file = "/var/log/mailappliance/events.jsonl"`` adds a JSON
  lines file (the text log stays as twistd writes it);
- ``twistd --logger mailappliance.logs.json_stdout mailappliance ...`` makes
  the main log itself JSON lines on standard output (for journald).

Each line is Twisted's JSON event form: ``log_format``, ``log_level``,
``log_namespace``, ``log_time`` and every field, so ``session``, ``client``,
``uid`` ... are separate keys a log system can index.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

LEVELS = ("debug", "info", "warn", "error", "critical")


def json_stdout() -> Any:
    """A log observer factory for ``twistd --logger``."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


class JsonLogService(service.Service):
    """Adds a JSON lines observer for the daemon's lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._observer: Any = None

    def startService(self) -> None:
        super().startService()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._observer = jsonFileLogObserver(self._file, recordSeparator="")
        globalLogPublisher.addObserver(self._observer)

    def stopService(self) -> None:
        super().stopService()
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
        if self._file is not None:
            self._file.close()


class LogLevelService(service.Service):
    """Filters every log observer by a level that SIGHUP can change (``settings`` = the level name).

    twistd installs its observers before the application starts; this wraps
    them (Twisted has no public call for that, hence the one private access).
    """

    def __init__(self, level: str) -> None:
        self._predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
        self._level = level

    @property
    def settings(self) -> str:
        return self._level

    @settings.setter
    def settings(self, level: str) -> None:
        self._level = level
        self._predicate.defaultLogLevel = LogLevel.levelWithName(level)
        self._predicate.clearLogLevels()  # the root namespace keeps a copy of the default

    def startService(self) -> None:
        super().startService()
        for observer in list(globalLogPublisher._observers):  # noqa: SLF001
            globalLogPublisher.removeObserver(observer)
            globalLogPublisher.addObserver(FilteringLogObserver(observer, [self._predicate]))
