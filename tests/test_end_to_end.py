"""The real daemon (twistd subprocess) with real clients, on both directory backends.

A subscriber's view: mail sent with smtplib arrives byte for byte over poplib
(over TLS, as in production); an admin's view: mailappliance-admin changes take
effect in the running daemon.
"""

from __future__ import annotations

import poplib
import smtplib
from typing import Any, Callable

import pytest

from mailappliance.smtp.replies import RECIPIENT_REJECTED, RELAY_DENIED, TEMP_LOOKUP_FAILURE, UNKNOWN_USER
from tests.conditions import paced, wait_until
from tests.daemon import Appliance
from tests.replies import answered

MESSAGE = (
    b"From: Friend <friend@example.net>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: end to end\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".this line starts with a dot\r\n"
    b"..and this one with two\r\n"
    b"\r\n"
    b"8bit: \xc3\xa9t\xc3\xa9\r\n"
)


@pytest.fixture(params=["ldif", "ldap"])
def running(request: pytest.FixtureRequest, appliance: Callable[..., Appliance], pki: Any) -> Appliance:
    """A daemon on either backend, with alice (alias alice.l@example.org) and bob."""
    slapd = request.getfixturevalue("slapd") if request.param == "ldap" else None
    instance = appliance(backend=request.param, slapd=slapd, pki=pki, cache_ttl=1, start=False)
    for login, password in (("alice@example.org", "alice-password"), ("bob@example.org", "bob-password")):
        result = instance.admin("user", "add", login, password=password)
        assert result.returncode == 0, result.stderr
    assert instance.admin("alias", "add", "alice", "alice.l@example.org").returncode == 0
    instance.start()
    return instance


def smtp_to(instance: Appliance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10)


def retrieve_all(instance: Appliance, login: str, password: str) -> list[bytes]:
    client = instance.pop3(login, password)
    count, _ = client.stat()
    messages = [b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
    client.quit()
    return messages


def login_refusal(instance: Appliance, login: str, password: str) -> bytes | None:
    """The server's -ERR if this POP3 login is refused now; None if it succeeds."""
    try:
        instance.pop3(login, password).quit()
    except poplib.error_proto as refused:
        return refused.args[0]
    return None


def test_delivery_to_user_and_alias_retrieved_byte_for_byte(running: Appliance) -> None:
    """Mail to a user, to an alias in other case and to two users at once is fetched over POP3 byte for byte."""
    with smtp_to(running) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.sendmail("friend@example.net", ["alice@example.org"], MESSAGE) == {}
        assert smtp.sendmail("friend@example.net", ["Alice.L@Example.org"], MESSAGE) == {}
        assert smtp.sendmail("friend@example.net", ["alice@example.org", "bob@example.org"], MESSAGE) == {}
    alice = retrieve_all(running, "alice", "alice-password")
    bob = retrieve_all(running, "bob@example.org", "bob-password")
    assert len(alice) == 3 and len(bob) == 1
    for stored in alice + bob:
        assert stored.endswith(MESSAGE)
        assert stored.startswith(b"Return-Path: <friend@example.net>\r\nDelivered-To: ")
        assert b"\r\nReceived: from client.example.net (localhost [127.0.0.1])\r\n" in stored
    delivered_to = [stored.split(b"\r\n")[1] for stored in alice + bob]  # each the address it came in for
    assert sorted(delivered_to) == sorted([b"Delivered-To: alice@example.org", b"Delivered-To: alice.l@example.org",
                                           b"Delivered-To: alice@example.org", b"Delivered-To: bob@example.org"])


def test_unknown_user_and_relay_refused(running: Appliance) -> None:
    """An unknown local user gets 550 5.1.1, a remote recipient relay denied, a percent hack recipient rejected."""
    with smtp_to(running) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("friend@example.net")
        assert answered(smtp.rcpt("nobody@example.org"), UNKNOWN_USER)
        assert answered(smtp.rcpt("victim@elsewhere.example"), RELAY_DENIED)
        assert answered(smtp.rcpt("victim%elsewhere.example@example.org"), RECIPIENT_REJECTED)
    assert not list(running.maildir_root.glob("*/new/*"))


def test_pop3_dele_applies_only_at_quit(running: Appliance) -> None:
    """DELE in a session dropped without QUIT deletes nothing; UIDL is stable; DELE then QUIT deletes."""
    with smtp_to(running) as smtp:
        smtp.sendmail("friend@example.net", ["bob@example.org"], MESSAGE)
    client = running.pop3("bob", "bob-password")
    uidl = client.uidl()[1]
    client.dele(1)
    client.close()  # dropped without QUIT: nothing deleted
    client = running.pop3("bob", "bob-password")
    assert client.uidl()[1] == uidl  # UIDL stable across sessions
    client.dele(1)
    client.quit()
    assert retrieve_all(running, "bob", "bob-password") == []


def test_admin_changes_take_effect_in_the_running_daemon(running: Appliance) -> None:
    """A subscriber added by the admin logs in at once; once deleted, the login is refused after the cache TTL."""
    assert login_refusal(running, "carol", "carol-password") == b"-ERR [AUTH] Authentication failed"
    result = running.admin("user", "add", "carol@example.net", password="carol-password")
    assert result.returncode == 0, result.stderr
    running.pop3("carol", "carol-password").quit()  # at once: failures are never cached
    assert running.admin("user", "delete", "carol").returncode == 0
    refusal = wait_until(paced(lambda: login_refusal(running, "carol", "carol-password"), 0.1), timeout=10,
                         what="carol's login refused once the cache entry expired")
    assert refusal == b"-ERR [AUTH] Authentication failed"


def test_admin_refusals_are_clear(running: Appliance) -> None:
    """mailappliance-admin refuses a duplicate, an unknown user and bad or foreign aliases, naming the problem."""
    duplicate = running.admin("user", "add", "alice@example.org", "--uid", "alice2", password="whatever-1")
    assert duplicate.returncode == 1 and "already" in duplicate.stderr
    unknown = running.admin("user", "delete", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    bad = running.admin("alias", "add", "alice", "not an address")
    assert bad.returncode == 1 and "not an address" in bad.stderr
    foreign = running.admin("alias", "add", "alice", "alice@elsewhere.example")
    assert foreign.returncode == 1 and "local_domains" in foreign.stderr


def test_disabled_subscriber_cannot_log_in_or_receive(running: Appliance) -> None:
    """A disabled subscriber's login is refused after the cache TTL and mail to them gets 550 5.2.1."""
    assert running.admin("user", "disable", "bob").returncode == 0
    refusal = wait_until(paced(lambda: login_refusal(running, "bob", "bob-password"), 0.1), timeout=10,
                         what="bob's login refused once the cache entry expired")
    assert refusal == b"-ERR [AUTH] Authentication failed"
    with smtp_to(running) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("friend@example.net")
        assert smtp.rcpt("bob@example.org") == (550, b"5.2.1 <bob@example.org>: Recipient address rejected: Mailbox disabled")


def test_ldap_outage_is_temporary_and_recovers(appliance: Callable[..., Appliance], slapd: Any, pki: Any) -> None:
    """With slapd down RCPT gets 451 4.3.0, POP3 [SYS/TEMP], admin exit 75; all work again once it is back."""
    instance = appliance(backend="ldap", slapd=slapd, pki=pki, cache_ttl=0, start=False)
    assert instance.admin("user", "add", "dave@example.org", password="dave-password").returncode == 0
    instance.start()
    instance.pop3("dave", "dave-password").quit()
    slapd.stop()
    try:
        with smtp_to(instance) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("friend@example.net")
            assert answered(smtp.rcpt("dave@example.org"), TEMP_LOOKUP_FAILURE)
        assert login_refusal(instance, "dave", "dave-password") == \
            b"-ERR [SYS/TEMP] Directory unavailable, try again later"
        assert instance.admin("user", "list").returncode == 75
    finally:
        slapd.start()
    instance.pop3("dave", "dave-password").quit()
    with smtp_to(instance) as smtp:
        assert smtp.sendmail("friend@example.net", ["dave@example.org"], MESSAGE) == {}
