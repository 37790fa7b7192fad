"""Counters, gauges and latency histograms, exposed in the Prometheus text format.

One registry per process (``METRICS``), kept by ``prometheus_client``: the
protocols count and time what happens (``count``, ``observe``), gauges are
read at scrape time from callables (``gauge``, ``labelled_gauge``), and the
metrics listener renders it all (``render``).  The process collector adds
``process_*`` (memory, open files, CPU).  Counters not declared below are
created on first use with the label names of that use, so a new counter needs
no change here (a HELP line is nicer, though).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.logger import Logger

# No *_created series: they double every counter for little use.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

log = Logger(namespace="mailappliance.metrics")

MAX_REMEMBERED_SERIES = 4096  # label sets whose series a sample finds without prometheus_client's labels()

HELP = {
    "mailappliance_sessions_total": "Connections accepted, by listener role.",
    "mailappliance_auth_total": "Login attempts, by protocol, mechanism and result.",
    "mailappliance_messages_accepted_total": "Messages acknowledged with 250 after DATA, by role.",
    "mailappliance_messages_refused_total": "Recipients, senders, clients or messages refused, by reason.",
    "mailappliance_delivery_attempts_total": "Outbound delivery results per recipient, by outcome.",
    "mailappliance_quota_refusals_total": "Recipients (stage rcpt) and messages (stage data) refused: mailbox full.",
    "mailappliance_directory_requests_total": "Directory calls, by operation and result.",
    "mailappliance_directory_failovers_total": "Times a directory server was marked down, by server.",
    "mailappliance_http_refused_total": "HTTP connections or requests refused by a listener's bounds, by reason.",
    "mailappliance_spill_waits_total": "Times a session receiving a large message stopped reading because the "
                                       "spill writer's backlog was full (the disk did not keep up).",
    "mailappliance_tlsrpt_sessions_total": "Outbound sessions to MX hosts as TLS-RPT (RFC 8460) counts them: "
                                           "policy_type (sts, no-policy-found), result, result_type.",
}

# Latency buckets in seconds: a local fsync is milliseconds, an LDAP call or an Argon2 check
# tens of them, a remote SMTP transaction seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_AGE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400)

HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "mailappliance_smtp_transaction_seconds": (
        "SMTP transactions from MAIL to the 250 after DATA, by role.", ("role",), LATENCY_BUCKETS),
    "mailappliance_commit_seconds": (
        "Received messages from the final dot's hand-over to durable (waiting for and in the commit thread).",
        (), LATENCY_BUCKETS),
    "mailappliance_journal_checkpoint_seconds": (
        "Journal checkpoints ([storage] sync = \"journal\"): making the placed Maildir files durable.", (),
        LATENCY_BUCKETS),
    "mailappliance_login_seconds": (
        "Logins through the shared checker (cache, throttle delay, directory), by result.", ("result",),
        LATENCY_BUCKETS),
    "mailappliance_directory_seconds": (
        "Directory calls in the directory thread pool, by operation.", ("operation",), LATENCY_BUCKETS),
    "mailappliance_delivery_attempt_seconds": (
        "Outbound delivery attempts (one connection and transaction to one host), by outcome.", ("outcome",),
        LATENCY_BUCKETS),
    "mailappliance_queue_age_seconds": (
        "Age of outbound messages when a recipient got a final answer, by status (sent, bounced).",
        ("status",), QUEUE_AGE_BUCKETS),
}

GaugeReader = Callable[[], float]
LabelledReader = Callable[[], Iterable[tuple[dict[str, str], float]]]


class _ScrapeTimeGauges:
    """A collector for gauges computed by callables when /metrics is scraped."""

    def __init__(self) -> None:
        self.plain: dict[str, tuple[str, GaugeReader]] = {}
        self.labelled: dict[str, tuple[str, LabelledReader]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, (help_text, read) in sorted(self.plain.items()):
            try:
                value = float(read())
            except Exception:
                continue
            yield GaugeMetricFamily(name, help_text, value=value)
        for name, (help_text, read_series) in sorted(self.labelled.items()):
            try:
                series = [(sorted(labels.items()), float(value)) for labels, value in read_series()]
            except Exception:
                continue
            names = sorted({key for labels, _ in series for key, _ in labels})
            family = GaugeMetricFamily(name, help_text, labels=names)
            for labels, value in series:
                given = dict(labels)
                family.add_metric([given.get(key, "") for key in names], value)
            yield family


class Metrics:
    """The process's metrics; thread-safe (directory timings come from worker threads)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._counters: dict[str, tuple[Counter, tuple[str, ...]]] = {}
        self._histograms = {name: (Histogram(name, help_text, labels, registry=self.registry, buckets=buckets),
                                   labels)
                            for name, (help_text, labels, buckets) in HISTOGRAMS.items()}
        self._gauges = _ScrapeTimeGauges()
        self.registry.register(self._gauges)
        self._complained: set[str] = set()
        # (name, labels as given) -> the series' child: a sample on the hot path is one dict
        # lookup and the child's own update, not a lock, a sort and prometheus_client's labels()
        self._series: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}

    def _counter(self, name: str, labels: tuple[str, ...]) -> tuple[Counter, tuple[str, ...]]:
        with self._lock:
            known = self._counters.get(name)
            if known is None:
                known = (Counter(name, HELP.get(name, name), labels, registry=self.registry), labels)
                self._counters[name] = known
            return known

    def _complain(self, name: str, problem: str) -> None:
        if name not in self._complained:
            self._complained.add(name)
            log.error("metric {name}: {problem} (later samples of it are dropped)", name=name, problem=problem)

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` (ending in ``_total``) with these labels."""
        key = (name, tuple(labels.items()))
        series = self._series.get(key)
        if series is None:
            counter, names = self._counter(name, tuple(sorted(labels)))
            if set(names) != set(labels):
                self._complain(name, f"labels {sorted(labels)} instead of {list(names)}")
                return
            series = self._remember(key, counter.labels(**labels) if names else counter)
        series.inc(amount)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Record one duration (or age) in histogram ``name`` (declared in HISTOGRAMS)."""
        key = (name, tuple(labels.items()))
        series = self._series.get(key)
        if series is None:
            known = self._histograms.get(name)
            if known is None or set(known[1]) != set(labels):
                self._complain(name, "not a declared histogram with these labels")
                return
            histogram, names = known
            series = self._remember(key, histogram.labels(**labels) if names else histogram)
        series.observe(max(0.0, seconds))

    def _remember(self, key: tuple[str, tuple[tuple[str, str], ...]], series: Any) -> Any:
        if len(self._series) < MAX_REMEMBERED_SERIES:  # label values are bounded sets; this bounds a surprise
            self._series[key] = series
        return series

    def gauge(self, name: str, help_text: str, read: GaugeReader) -> None:
        """A gauge read at scrape time (a failing ``read`` leaves it out of that scrape)."""
        self._gauges.plain[name] = (help_text, read)

    def labelled_gauge(self, name: str, help_text: str, read: LabelledReader) -> None:
        """A gauge with one series per label set, all read at scrape time: ``read()``
        gives (labels, value) pairs, e.g. ``({"server": url}, 1)`` per directory server."""
        self._gauges.labelled[name] = (help_text, read)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one series (0 when it does not exist yet): for tests and the CLI."""
        found = self.registry.get_sample_value(name, labels)
        return found if found is not None else 0.0

    def render(self) -> str:
        """Everything, in the Prometheus text format (0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")


METRICS = Metrics()
