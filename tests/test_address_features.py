"""Alias domains, sub-addresses, catch-alls, postmaster@ and abuse@ against the real daemon
on both directory backends; screened clients that may still write to postmaster@ and abuse@."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path
from typing import Any, Callable

import pytest

from mailappliance.smtp.replies import (
    ACCESS_DENIED,
    CLIENT_REFUSED,
    MAILBOX_MISCONFIGURED,
    RELAY_DENIED,
    SENDER_NOT_OWNED,
    UNKNOWN_USER,
)
from tests.conditions import wait_until
from tests.daemon import Appliance
from tests.replies import answered

MESSAGE = b"From: friend@remote.example\r\nSubject: addresses\r\n\r\nhello\r\n"
ADDRESS_SETTINGS = {
    "alias_domains": {"example.com": "example.org"},
    "catch_all": {"example.net": "info@example.net"},
    "postmaster": "hostmaster@example.org",
}


def mailbox(instance: Appliance, uid: str, folder: str = "") -> list[bytes]:
    new = instance.maildir_root / uid / folder / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def add_users(instance: Appliance, *logins: str) -> None:
    for login in logins:
        result = instance.admin("user", "add", login, password="a-password")
        assert result.returncode == 0, result.stderr


@pytest.fixture(params=["ldif", "ldap"])
def addressed(request: pytest.FixtureRequest, appliance: Callable[..., Appliance], pki: Any) -> Appliance:
    """example.com is an alias of example.org; example.net has a catch-all (info@); postmaster@
    and abuse@ go to hostmaster@example.org, except where the directory names postmaster@example.net."""
    slapd = request.getfixturevalue("slapd") if request.param == "ldap" else None
    instance = appliance(backend=request.param, slapd=slapd, pki=pki, start=False,
                         extra={"server": ADDRESS_SETTINGS})
    add_users(instance, "alice@example.org", "bob@example.org", "hostmaster@example.org", "info@example.net")
    assert instance.admin("alias", "add", "alice", "alice.l@example.org").returncode == 0
    assert instance.admin("alias", "add", "bob", "postmaster@example.net").returncode == 0
    instance.start()
    return instance


def mx(instance: Appliance, source: str = "127.0.0.1") -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10, source_address=(source, 0))
    smtp.ehlo("client.remote.example")
    return smtp


def test_alias_domains_and_sub_addresses(addressed: Appliance) -> None:
    """alice@example.com and Alice.L@EXAMPLE.COM reach alice@example.org's mailbox (one copy); alice+lists@ is
    filed into her existing .lists folder, alice+other@ into her inbox, the tag visible; unknown users stay 550;
    alice may send as alice@example.com, alice.l@example.com and alice+x@example.com, never as bob."""
    folder = addressed.maildir_root / "alice" / ".lists"
    for sub in ("new", "cur", "tmp"):
        (folder / sub).mkdir(parents=True, mode=0o700)
    with mx(addressed) as smtp:
        assert smtp.sendmail("friend@remote.example", ["alice@example.com", "Alice.L@EXAMPLE.COM"], MESSAGE) == {}
        assert smtp.sendmail("friend@remote.example", ["alice+lists@example.com"], MESSAGE) == {}
        assert smtp.sendmail("friend@remote.example", ["alice+other@example.org"], MESSAGE) == {}
        assert smtp.mail("friend@remote.example")[0] == 250
        assert answered(smtp.rcpt("nobody@example.com"), UNKNOWN_USER)
        assert answered(smtp.rcpt("nobody+lists@example.org"), UNKNOWN_USER)
    [filed] = mailbox(addressed, "alice", ".lists")
    first, other = mailbox(addressed, "alice")
    assert first.endswith(MESSAGE) and b"for <alice+lists@example.com>" in filed
    assert b"\r\nDelivered-To: alice+lists@example.com\r\n" in filed  # the address as received, tag kept
    assert b"for <alice+other@example.org>" in other
    assert not (addressed.maildir_root / "alice" / ".other").exists()
    pop = addressed.pop3("alice", "a-password")
    assert pop.stat()[0] == 2  # POP3 shows the inbox only
    pop.quit()
    with smtplib.SMTP_SSL("127.0.0.1", addressed.ports["submissions"], timeout=10,
                          context=addressed.client_context()) as smtp:
        smtp.login("alice", "a-password")
        for sender in ("alice@example.com", "ALICE.L@example.com", "alice+news@example.com"):
            assert smtp.mail(sender)[0] == 250, sender
            smtp.rset()
        assert answered(smtp.mail("bob@example.com"), SENDER_NOT_OWNED)


def test_catch_all_and_role_accounts(addressed: Appliance) -> None:
    """Unknown addresses at example.net reach the catch-all info@ (not at example.org: 550); postmaster@ and
    abuse@ of every local and alias domain, and bare <postmaster>, reach the configured mailbox unless a
    directory entry has the address (bob has postmaster@example.net); check-config warns about the catch-all."""
    with mx(addressed) as smtp:
        assert smtp.sendmail("friend@remote.example", ["whoever@example.net"], MESSAGE) == {}
        assert smtp.mail("friend@remote.example")[0] == 250
        assert answered(smtp.rcpt("whoever@example.org"), UNKNOWN_USER)
        assert answered(smtp.rcpt("whoever@example.net.remote.example"), RELAY_DENIED)
        smtp.rset()
        for address in ("postmaster@example.org", "abuse@example.com", "Abuse@example.net", "postmaster"):
            assert smtp.sendmail("friend@remote.example", [address], MESSAGE) == {}, address
        assert smtp.sendmail("friend@remote.example", ["postmaster@example.net"], MESSAGE) == {}
    [caught] = mailbox(addressed, "info")  # the catch-all never swallows abuse@
    assert b"for <whoever@example.net>" in caught
    assert "rcpt=<whoever@example.net> via catch-all: uid=info" in addressed.log()
    assert len(mailbox(addressed, "hostmaster")) == 4
    assert len(mailbox(addressed, "bob")) == 1
    checked = addressed.admin("check-config")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"^warn catch-all +example.net: mail for every unknown address is accepted for "
                     r"info@example.net", checked.stdout, re.M)
    assert "srs.key holds an SRS key" in checked.stdout and "warn postmaster" not in checked.stdout


SCREENING = """
[block]
networks = ["127.0.0.26/32"]
helo = [".bad-helo.example"]
senders = ["spam.example"]
"""


@pytest.fixture
def screened(appliance: Callable[..., Appliance], tmp_path: Path) -> Appliance:
    """The default refuse_at = "rcpt": screened clients reach postmaster@ and abuse@ only."""
    lists = tmp_path / "screening.toml"
    lists.write_text(SCREENING)
    instance = appliance(start=False, extra={"server": ADDRESS_SETTINGS, "screening": {"file": str(lists)}})
    add_users(instance, "alice@example.org", "hostmaster@example.org")
    instance.start()
    return instance


def test_screened_client_may_write_to_postmaster_and_abuse(screened: Appliance) -> None:
    """A blocked network is greeted, refused 554 5.7.1 for alice, and its mail to postmaster@/abuse@ is delivered."""
    with mx(screened, source="127.0.0.26") as smtp:
        assert smtp.mail("complaint@remote.example")[0] == 250
        assert answered(smtp.rcpt("alice@example.org"), CLIENT_REFUSED)
        assert answered(smtp.rcpt("victim@remote.example"), CLIENT_REFUSED)
        assert smtp.rcpt("postmaster@example.com")[0] == 250
        assert smtp.rcpt("abuse@example.org")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
    assert len(mailbox(screened, "hostmaster")) == 1 and mailbox(screened, "alice") == []
    assert "client=[127.0.0.26] screened rcpt=<alice@example.org> refused: client rule=block.networks" in screened.log()


def test_screened_sender_and_helo_may_write_to_abuse(screened: Appliance) -> None:
    """A blocked sender domain or HELO name reaches abuse@ but nobody else."""
    with mx(screened) as smtp:
        assert smtp.mail("spammer@spam.example")[0] == 250
        assert answered(smtp.rcpt("alice@example.org"), ACCESS_DENIED)
        assert smtp.rcpt("abuse@example.org")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
        assert smtp.ehlo("mx.bad-helo.example")[0] == 250
        assert smtp.mail("someone@remote.example")[0] == 250
        code, text = smtp.rcpt("alice@example.org")
        assert (code, text) == (554, b"5.7.1 <mx.bad-helo.example>: Helo command rejected: Access denied")
        assert smtp.rcpt("postmaster@example.org")[0] == 250
    wait_until(lambda: len(mailbox(screened, "hostmaster")) == 1, what="the complaint")


def test_postmaster_without_a_mailbox_is_a_temporary_error(appliance: Callable[..., Appliance]) -> None:
    """With no entry for postmaster@ and no mailbox behind [server] postmaster, RCPT is 451 (never 550, never lost)."""
    instance = appliance()
    with mx(instance) as smtp:
        assert smtp.mail("friend@remote.example")[0] == 250
        assert answered(smtp.rcpt("postmaster@example.org"), MAILBOX_MISCONFIGURED)
    assert "no mailbox for <postmaster@example.org>" in instance.log()


def test_check_config_without_catch_alls_or_a_postmaster_mailbox(appliance: Callable[..., Appliance]) -> None:
    """Without catch-alls check-config has no catch-all warning, but warns that postmaster@ has no mailbox."""
    plain = appliance(start=False)
    checked = plain.admin("check-config")
    assert "catch-all" not in checked.stdout
    assert re.search(r"^warn postmaster +postmaster@ of every domain goes to postmaster@example.org", checked.stdout,
                     re.M)
    assert "will be created at the first start" in checked.stdout
