"""Counters and gauges, exposed in the Prometheus text format.

One registry per process (``METRICS``): the protocols count what happens,
the HTTP listener renders it.  Deliberately tiny: labelled counters, and
gauges computed at scrape time by callables.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterable

HELP = {
    "mailappliance_sessions_total": "Connections accepted, by listener role.",
    "mailappliance_auth_total": "Login attempts, by protocol, mechanism and result.",
    "mailappliance_messages_accepted_total": "Messages acknowledged with 250 after DATA, by role.",
    "mailappliance_messages_refused_total": "Recipients, senders, clients or messages refused, by reason.",
    "mailappliance_delivery_attempts_total": "Outbound delivery results per recipient, by outcome.",
    "mailappliance_quota_refusals_total": "Recipients (stage rcpt) and messages (stage data) refused: mailbox full.",
    "mailappliance_directory_requests_total": "Directory calls, by operation and result.",
    "mailappliance_directory_seconds_sum": "Total time spent in directory calls, by operation.",
    "mailappliance_directory_failovers_total": "Times a directory server was marked down, by server.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # directory timings are recorded from worker threads
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._labelled_gauges: dict[str, tuple[str, Callable[[], Iterable[tuple[dict[str, str], float]]]]] = {}

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def labelled_gauge(self, name: str, help_text: str,
                       read: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        """A gauge with one series per label set, all read at scrape time: ``read()``
        gives (labels, value) pairs, e.g. ``({"server": url}, 1)`` per directory server."""
        self._labelled_gauges[name] = (help_text, read)

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        for name in sorted(set(HELP) | set(snapshot)):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(snapshot.get(name, {}).items()):
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
        for name, (help_text, read) in sorted(self._gauges.items()):
            try:
                value = read()
            except Exception:
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        for name, (help_text, read_series) in sorted(self._labelled_gauges.items()):
            try:
                series = [(sorted(labels.items()), value) for labels, value in read_series()]
            except Exception:
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for labels, value in series:
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {value:g}")
        return "\n".join(lines) + "\n"


METRICS = Metrics()
