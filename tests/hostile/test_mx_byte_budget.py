"""Finding 7 (second half): one client network cannot pour unlimited bytes into the MX.

``[limits] mx_bytes_per_hour_per_network`` bounds what unauthenticated MX
clients of one /24 (IPv4) or /64 (IPv6) send per hour; past it, MAIL gets
``452 4.7.1``.  Authenticated subscribers are not counted.
"""

from __future__ import annotations

import smtplib
from typing import Any, Callable

import pytest

from tests.daemon import Appliance

SENDER = "sender@remote.example"


def message(size: int) -> bytes:
    return b"Subject: filler\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)


@pytest.fixture
def budgeted(appliance: Callable[..., Appliance], pki: Any) -> Appliance:
    instance = appliance(pki=pki, start=False, extra={"limits": {"mx_bytes_per_hour_per_network": "100K"}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    instance.pki = pki  # type: ignore[attr-defined]
    return instance


def mx(instance: Appliance, source: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=30, source_address=(source, 0))
    smtp.ehlo("sender.example.net")
    return smtp


def send_without_size(smtp: smtplib.SMTP, size: int) -> tuple[int, bytes]:
    """One transaction without the SIZE parameter: MAIL's reply if refused, else DATA's."""
    code, text = smtp.mail(SENDER)
    if code != 250:
        return code, text
    assert smtp.rcpt("alice@example.org")[0] == 250
    return smtp.data(message(size))


def test_a_network_that_used_its_budget_gets_452_4_7_1_at_mail(budgeted: Appliance) -> None:
    """After about 100 KiB from 127.0.0.0/24 within the hour, MAIL from any address of that /24 gets 452 4.7.1."""
    with mx(budgeted, "127.0.0.1") as smtp:
        for accepted in range(100):
            code, text = send_without_size(smtp, 30_000)
            if code != 250:
                break
        else:
            pytest.fail("100 messages of 30 KB from one network with a budget of 100 KiB per hour")
        assert (code, text[:6]) == (452, b"4.7.1 ")
        assert accepted == 4  # 0, 30, 60, 90 KB used: each could start; then the budget is spent
    with mx(budgeted, "127.0.0.77") as smtp:  # another address of the same /24
        code, text = smtp.mail(SENDER)
        assert (code, text[:6]) == (452, b"4.7.1 ")
    with mx(budgeted, "127.0.1.1") as smtp:  # another /24 has its own budget
        assert send_without_size(smtp, 30_000)[0] == 250
    assert "network byte budget" in budgeted.log()


def test_a_declared_size_beyond_the_budget_is_refused_at_mail(budgeted: Appliance) -> None:
    """MAIL ... SIZE=N larger than what is left of the network's budget gets 452 4.7.1 before any byte is sent."""
    with mx(budgeted, "127.0.2.1") as smtp:
        code, text = smtp.mail(SENDER, ["SIZE=200000"])
        assert (code, text[:6]) == (452, b"4.7.1 ")
        assert smtp.mail(SENDER, ["SIZE=50000"])[0] == 250


def test_authenticated_subscribers_are_not_counted(budgeted: Appliance) -> None:
    """Subscribers sending through submission from a network that used its MX budget are not refused."""
    with mx(budgeted, "127.0.0.1") as smtp:
        replies = [send_without_size(smtp, 60_000)[0] for _ in range(3)]
        assert replies == [250, 250, 452]
    with smtplib.SMTP_SSL("127.0.0.1", budgeted.ports["submissions"], timeout=30,
                          context=budgeted.pki.client_context(),  # type: ignore[attr-defined]
                          source_address=("127.0.0.1", 0)) as smtp:
        smtp.login("alice", "alice-password")
        assert smtp.sendmail("alice@example.org", ["alice@example.org"], message(60_000)) == {}
