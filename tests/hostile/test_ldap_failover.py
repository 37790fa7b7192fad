"""Issue 11, finding 14: a hung directory server must not take the service down
when a healthy one is listed next.

A is a plain TCP listener that accepts and never answers a byte (a frozen or
overloaded slapd); B is the real slapd.  ldap3's ServerPool only skips servers
that refuse the connection, so every call used to wait out A's timeout (twice)
and fail: 451 at RCPT, -ERR at login.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import attrs
import pytest

from mailappliance.directory.ldap import LdapStore, ServerSet
from tests.conditions import silent_server, wait_until
from tests.daemon import Appliance
from tests.slapd import Slapd

TIMEOUT = 2  # directory.ldap.timeout of the appliance fixture
USERS = ("alice", "bob", "carol")


@pytest.fixture
def hung_server() -> Iterator[str]:
    """ldap://... of a TCP listener that accepts connections and never answers."""
    with silent_server() as port:
        yield f"ldap://127.0.0.1:{port}"


@pytest.fixture
def failover(appliance: Callable[..., Appliance], slapd: Slapd, hung_server: str) -> Appliance:
    """The daemon with urls = [hung, slapd]; three subscribers in slapd."""
    store = LdapStore(slapd.settings())
    for uid in USERS:
        store.add_subscriber(uid, f"{uid}@example.org", f"{uid}-password")
    store.close()
    return appliance(backend="ldap", slapd=slapd, plaintext_pop3=True,  # USER/PASS in clear: a short client
                     extra={"directory.ldap": {"urls": [hung_server, slapd.url]}})


def test_hung_first_server_costs_one_timeout_then_the_next_serves(failover: Appliance, slapd: Slapd,
                                                                  hung_server: str) -> None:
    """Logins and RCPT lookups succeed; only the first call waits for the hung server, which the log names."""
    started = time.monotonic()
    for uid in USERS:
        pop3 = poplib.POP3("127.0.0.1", failover.ports["pop3"], timeout=30)
        pop3.user(uid)
        assert pop3.pass_(f"{uid}-password").startswith(b"+OK")
        pop3.quit()
    with smtplib.SMTP("127.0.0.1", failover.ports["mx"], timeout=30) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.mail("friend@example.net")[0] == 250
        for uid in USERS:
            assert smtp.rcpt(f"{uid}@example.org")[0] == 250
    # six directory round trips; before the fix each waited out the hung server twice
    assert time.monotonic() - started < 3 * TIMEOUT
    assert re.search(rf"directory server {re.escape(hung_server)} marked down: .*timed out; "
                     rf"now using {re.escape(slapd.url)}", failover.log())


def test_metrics_name_the_server_in_use(failover: Appliance, slapd: Slapd, hung_server: str) -> None:
    """After the failover /metrics shows the hung server down and the healthy one in use."""
    with smtplib.SMTP("127.0.0.1", failover.ports["mx"], timeout=30) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("friend@example.net")
        assert smtp.rcpt("alice@example.org")[0] == 250
    url = f"http://127.0.0.1:{failover.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        metrics = response.read().decode()
    assert f'mailappliance_directory_server_up{{server="{hung_server}"}} 0.0' in metrics
    assert f'mailappliance_directory_server_up{{server="{slapd.url}"}} 1.0' in metrics
    assert f'mailappliance_directory_server_in_use{{server="{slapd.url}"}} 1.0' in metrics
    assert f'mailappliance_directory_failovers_total{{server="{hung_server}"}} 1.0' in metrics


def test_frozen_slapd_is_skipped_then_probed_back(slapd: Slapd, tmp_path: Path) -> None:
    """A frozen (SIGSTOP) first slapd is marked down, the second serves, and the probe brings the first back."""
    first = Slapd(tmp_path)
    first.start()
    store = LdapStore(attrs.evolve(slapd.settings(timeout=1), urls=(first.url, slapd.url)), probe_interval=0.2)
    try:
        LdapStore(slapd.settings()).add_subscriber("alice", "alice@example.org", "alice-password")
        assert store.find_by_login("alice") is None  # the first server (empty) serves while it answers
        first.pause()
        subscriber = store.find_by_login("alice")
        assert subscriber is not None and store.current_server() == slapd.url
        assert store.verify_password(subscriber, "alice-password")
        assert store.server_states() == [(first.url, False), (slapd.url, True)]
        first.resume()
        wait_until(lambda: store.current_server() == first.url, what="the probe bringing the first server back")
        assert store.find_by_login("alice") is None  # lookups went back to the first server
    finally:
        store.close()
        first.resume()
        first.stop()


def test_server_set_prefers_servers_up_and_keeps_the_down_ones_as_last_resort() -> None:
    """Order: up servers as configured, then those marked down; mark_up restores the preference."""
    servers = ServerSet(["ldap://a", "ldap://b", "ldap://c"])
    assert servers.mark_down("ldap://a", "timed out") and not servers.mark_down("ldap://a", "again")
    assert servers.order() == ["ldap://b", "ldap://c", "ldap://a"] and servers.current() == "ldap://b"
    servers.mark_down("ldap://b", "refused")
    servers.mark_down("ldap://c", "busy")
    assert servers.current() == "" and servers.order() == ["ldap://a", "ldap://b", "ldap://c"]
    assert servers.mark_up("ldap://a") and not servers.mark_up("ldap://a")
    assert servers.current() == "ldap://a" and servers.down() == {"ldap://b": "refused", "ldap://c": "busy"}
