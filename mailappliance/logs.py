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
from twisted.logger import globalLogPublisher, jsonFileLogObserver


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
