"""The real daemon (twistd subprocess) with real clients, on both directory backends.

A subscriber's view: mail sent with smtplib arrives byte for byte over poplib;
an admin's view: mailappliance-admin changes take effect in the running daemon.
"""

from __future__ import annotations

import poplib
import smtplib
import time
from typing import Any, Callable

import pytest

from tests.daemon import Appliance

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
def running(request: pytest.FixtureRequest, appliance: Callable[..., Appliance]) -> Appliance:
    """A daemon on either backend, with alice (alias alice.l@example.org) and bob."""
    slapd = request.getfixturevalue("slapd") if request.param == "ldap" else None
    instance = appliance(backend=request.param, slapd=slapd, cache_ttl=1, start=False)
    for login, password in (("alice@example.org", "alice-password"), ("bob@example.org", "bob-password")):
        result = instance.admin("user", "add", login, password=password)
        assert result.returncode == 0, result.stderr
    assert instance.admin("alias", "add", "alice", "alice.l@example.org").returncode == 0
    instance.start()
    instance.slapd = slapd  # type: ignore[attr-defined]
    return instance


def smtp_to(instance: Appliance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10)


def pop3_for(instance: Appliance, login: str, password: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", instance.ports["pop3"], timeout=10)
    client.user(login)
    client.pass_(password)
    return client


def retrieve_all(instance: Appliance, login: str, password: str) -> list[bytes]:
    client = pop3_for(instance, login, password)
    count, _ = client.stat()
    messages = [b"\r\n".join(client.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
    client.quit()
    return messages


def test_delivery_to_user_and_alias_retrieved_byte_for_byte(running: Appliance) -> None:
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
        assert stored.startswith(b"Return-Path: <friend@example.net>\r\nReceived: from client.example.net")


def test_unknown_user_and_relay_refused(running: Appliance) -> None:
    with smtp_to(running) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("friend@example.net")
        code, text = smtp.rcpt("nobody@example.org")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = smtp.rcpt("victim@elsewhere.example")
        assert (code, text[:5]) == (554, b"5.7.1")
        code, text = smtp.rcpt("victim%elsewhere.example@example.org")
        assert (code, text[:5]) == (554, b"5.7.1")
    assert not list(running.maildir_root.glob("*/new/*"))


def test_pop3_dele_applies_only_at_quit(running: Appliance) -> None:
    with smtp_to(running) as smtp:
        smtp.sendmail("friend@example.net", ["bob@example.org"], MESSAGE)
    client = pop3_for(running, "bob", "bob-password")
    uidl = client.uidl()[1]
    client.dele(1)
    client.close()  # dropped without QUIT: nothing deleted
    client = pop3_for(running, "bob", "bob-password")
    assert client.uidl()[1] == uidl  # UIDL stable across sessions
    client.dele(1)
    client.quit()
    assert retrieve_all(running, "bob", "bob-password") == []


def test_admin_changes_take_effect_in_the_running_daemon(running: Appliance) -> None:
    with pytest.raises(poplib.error_proto):
        pop3_for(running, "carol", "carol-password")
    result = running.admin("user", "add", "carol@example.net", password="carol-password")
    assert result.returncode == 0, result.stderr
    pop3_for(running, "carol", "carol-password").quit()  # at once: failures are never cached
    assert running.admin("user", "delete", "carol").returncode == 0
    time.sleep(1.2)  # the auth cache TTL of this instance
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop3_for(running, "carol", "carol-password")


def test_admin_refusals_are_clear(running: Appliance) -> None:
    duplicate = running.admin("user", "add", "alice@example.org", "--uid", "alice2", password="whatever-1")
    assert duplicate.returncode == 1 and "already" in duplicate.stderr
    unknown = running.admin("user", "delete", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    bad = running.admin("alias", "add", "alice", "not an address")
    assert bad.returncode == 1 and "not an address" in bad.stderr
    foreign = running.admin("alias", "add", "alice", "alice@elsewhere.example")
    assert foreign.returncode == 1 and "local_domains" in foreign.stderr


def test_disabled_subscriber_cannot_log_in_or_receive(running: Appliance) -> None:
    assert running.admin("user", "disable", "bob").returncode == 0
    time.sleep(1.2)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop3_for(running, "bob", "bob-password")
    with smtp_to(running) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("friend@example.net")
        assert smtp.rcpt("bob@example.org")[:2] == (550, b"5.2.1 <bob@example.org>: Recipient address rejected: Mailbox disabled")


def test_ldap_outage_is_temporary_and_recovers(appliance: Callable[..., Appliance], slapd: Any) -> None:
    instance = appliance(backend="ldap", slapd=slapd, cache_ttl=0, start=False)
    assert instance.admin("user", "add", "dave@example.org", password="dave-password").returncode == 0
    instance.start()
    pop3_for(instance, "dave", "dave-password").quit()
    slapd.stop()
    try:
        with smtp_to(instance) as smtp:
            smtp.ehlo("client.example.net")
            smtp.mail("friend@example.net")
            code, text = smtp.rcpt("dave@example.org")
            assert code == 451 and text.startswith(b"4.3.0")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            pop3_for(instance, "dave", "dave-password")
        assert instance.admin("user", "list").returncode == 75
    finally:
        slapd.start()
    pop3_for(instance, "dave", "dave-password").quit()
    with smtp_to(instance) as smtp:
        assert smtp.sendmail("friend@example.net", ["dave@example.org"], MESSAGE) == {}
