"""``[server] workers``: how many processes serve the listeners.

Any ``[state]`` goes with several processes: they share Redis when ``[state] redis``
is set (several appliances), else the supervisor's store (one appliance,
:mod:`mailappliance.state.serve`); any ``sync`` too (with "journal" each process
keeps its own, journal.journal_for).

Pure validation (no Twisted), so config.py can call it; the processes
themselves are in :mod:`mailappliance.workers`.
"""

from __future__ import annotations

import os
from typing import Protocol

MAX_WORKERS = 64


class _Reader(Protocol):  # config.ConfigReader, without importing config (it imports us)
    table: dict[str, object]
    used: set[str]

    def error(self, name: str, problem: str) -> Exception: ...


def parse_workers(reader: _Reader, cores: int | None = None) -> int:
    """``workers = N`` (1 to 64) or ``"auto"`` (the machine's cores); default 1."""
    reader.used.add("workers")
    value = reader.table.get("workers", 1)
    if value == "auto":
        return max(1, min(MAX_WORKERS, cores if cores is not None else (os.cpu_count() or 1)))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise reader.error("workers", f'must be a whole number from 1 to {MAX_WORKERS} or "auto", got {value!r}')
    return value
