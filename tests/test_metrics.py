"""Metrics on prometheus_client: the old names and call sites, and the latency histograms
(issue 12, point 14)."""

from __future__ import annotations

import re
import smtplib
import urllib.request
from typing import Any, Callable

from mailappliance.metrics import Metrics
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port

pytest_plugins = ["tests.remote"]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in the Prometheus text, whatever the order of its labels."""
    for line in text.splitlines():
        found = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not found or found.group(1) != name:
            continue
        given = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
        if given == labels:
            return float(found.group(3))
    return None


def test_the_registry_keeps_the_old_interface() -> None:
    """count, gauge, labelled_gauge, value and render work as before; histograms observe; a
    call with the wrong labels is dropped, never raised into protocol code."""
    metrics = Metrics()
    metrics.count("mailappliance_messages_refused_total", reason="relay_denied")
    metrics.count("mailappliance_messages_refused_total", 2, reason="relay_denied")
    metrics.count("mailappliance_messages_refused_total", reason="x", extra="y")  # wrong labels: dropped
    metrics.count("mailappliance_brand_new_total")
    metrics.gauge("mailappliance_queue_messages", "Messages in the outbound queue.", lambda: 7)
    metrics.gauge("mailappliance_broken", "A gauge whose reader fails.", lambda: 1 / 0)
    metrics.labelled_gauge("mailappliance_directory_server_up", "Up.", lambda: [({"server": "ldap://a"}, 1)])
    metrics.observe("mailappliance_login_seconds", 0.02, result="ok")
    metrics.observe("mailappliance_login_seconds", 0.5, result="ok")
    text = metrics.render()
    assert metrics.value("mailappliance_messages_refused_total", reason="relay_denied") == 3
    assert sample(text, "mailappliance_messages_refused_total", reason="relay_denied") == 3
    assert sample(text, "mailappliance_brand_new_total") == 1
    assert sample(text, "mailappliance_queue_messages") == 7
    assert sample(text, "mailappliance_directory_server_up", server="ldap://a") == 1
    assert "mailappliance_broken" not in text
    assert sample(text, "mailappliance_login_seconds_count", result="ok") == 2
    assert sample(text, "mailappliance_login_seconds_bucket", result="ok", le="0.025") == 1
    assert "# TYPE mailappliance_login_seconds histogram" in text
    assert sample(text, "process_resident_memory_bytes") is not None
    assert "_created" not in text


def test_histograms_after_a_day_in_the_life(appliance: Callable[..., Appliance], dns_server: Any,
                                            smtp_receiver: Any, pki: Any) -> None:
    """After a login, a local message and a remote delivery, /metrics has the SMTP transaction,
    commit, login, directory, delivery-attempt and queue-age histograms, and the old counters."""
    port = free_port()
    dns_server.serve({"remote.example": ["MX('remote.example', 10, 'mx1.remote.example')",
                                         "A('mx1.remote.example', '127.0.0.2')"]})
    remote = smtp_receiver(host="127.0.0.2", port=port, tls=(pki.server_cert, pki.server_key))
    instance = appliance(pki=pki, start=False, extra={"queue": {
        "resolver": dns_server.address, "smtp_port": port, "scan_interval": 0.2, "ca_file": str(pki.server_ca)}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.login("alice", "alice-password")
        assert smtp.sendmail("alice@example.org", ["friend@remote.example", "alice@example.org"],
                             b"Subject: m\r\n\r\nx\r\n") == {}
    remote.wait_for(1)
    # the queue runner's line, logged after every sample of the delivery; not the local copy's
    # "status=sent (delivered to maildir ...)", which can come first
    wait_until(lambda: any("to=<friend@remote.example>" in line and "status=sent" in line
                           for line in instance.log().splitlines()), what="the remote delivery's line")
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.ports['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert sample(text, "mailappliance_smtp_transaction_seconds_count", role="submissions") == 1
    assert sample(text, "mailappliance_commit_seconds_count") == 1
    assert sample(text, "mailappliance_login_seconds_count", result="ok") == 1
    assert (sample(text, "mailappliance_directory_seconds_count", operation="find_by_address") or 0) >= 1
    assert sample(text, "mailappliance_delivery_attempt_seconds_count", outcome="delivered") == 1
    assert sample(text, "mailappliance_queue_age_seconds_count", status="sent") == 1
    assert sample(text, "mailappliance_messages_accepted_total", role="submissions") == 1
    assert sample(text, "mailappliance_delivery_attempts_total", outcome="delivered") == 1
    line = next(l for l in instance.log().splitlines() if "to=<friend@remote.example>" in l)
    assert re.search(r"orig_to=<friend@remote\.example> relay=mx1\.remote\.example\[127\.0\.0\.2\]:\d+ "
                     r"delay=\d+\.\d\d delays=\d+\.\d\d/\d+\.\d\d/\d+\.\d\d tls=True dsn=2\.\d\.\d status=sent \(250 ",
                     line), line
