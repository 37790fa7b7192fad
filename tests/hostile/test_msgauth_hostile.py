"""Hostile input to message authentication and the content filter: forged
Authentication-Results, oversize and malformed DKIM-Signature fields, a flood of
signatures, a big (spilled) message, DNS answers that never come, an rspamd
that never answers."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest

from mailappliance.smtp import replies
from tests.conditions import silent_server
from tests.daemon import Appliance
from tests.dns_zone import ZoneServer, zone  # noqa: F401 (fixture)
from tests.msgauth_world import SenderKey, delivered, message, results, send

FORGED = b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.example; dmarc=pass\r\n"


def _mx(appliance: Callable[..., Appliance], zone: ZoneServer, **msgauth: Any) -> Appliance:  # noqa: F811
    extra: dict[str, Any] = {"queue": {"resolver": zone.address}}
    if msgauth:
        extra["msgauth"] = msgauth
    instance = appliance(start=False, extra=extra)
    for address in ("alice@example.org", "bob@example.net"):
        assert instance.admin("user", "add", address, password="a-long-password").returncode == 0
    instance.start()
    return instance


def test_forged_results_removed_even_without_verification(appliance: Callable[..., Appliance],
                                                         zone: ZoneServer) -> None:  # noqa: F811
    """With verification off, nothing of ours is added, yet a field claiming our authserv-id is removed."""
    instance = _mx(appliance, zone)
    assert send(instance, "x@far.example", message("bank@far.example", extra=FORGED))[0] == 250
    assert delivered(instance)[0].get_all("Authentication-Results") is None


def test_oversize_malformed_and_too_many_signatures(appliance: Callable[..., Appliance],
                                                    zone: ZoneServer) -> None:  # noqa: F811
    """A 20 KB DKIM-Signature and a malformed one are permerrors, 30 signatures cost five checks;
    every message is delivered and the daemon stays up."""
    zone.txt("far.example", "v=spf1 ip4:127.0.0.1 -all")
    instance = _mx(appliance, zone, verify=True, dns_timeout=2)
    huge = b"DKIM-Signature: v=1; a=rsa-sha256; d=far.example; s=x; h=from; bh=AAAA; b=" + b"\r\n ".join([b"A" * 900] * 22) + b"\r\n"
    garbage = b"DKIM-Signature: v=1; a=; d=\x01; s==; h; ;;; b=\r\n"
    many = b"".join(b"DKIM-Signature: v=1; a=rsa-sha256; d=far.example; s=s%d; h=from; bh=AA; b=AA\r\n" % i
                    for i in range(30))
    for extra in (huge, garbage, many):
        assert send(instance, "x@far.example", extra + message("x@far.example"))[0] == 250
    first, second, third = (results(m) for m in delivered(instance, count=3))
    assert "dkim=permerror" in first and "dkim=permerror" in second
    assert third.count("dkim=") == 6 and "dkim=policy (25 more signatures not checked)" in third


def test_big_spilled_message_is_verified_and_its_header_rewritten(appliance: Callable[..., Appliance],
                                                                  zone: ZoneServer) -> None:  # noqa: F811
    """A 3 MiB message (spilled to disk while received) is verified in a worker thread, the forged
    field removed in the commit thread's rewrite, and the body arrives byte for byte."""
    zone.txt("far.example", "v=spf1 ip4:127.0.0.1 -all")
    key = SenderKey("far.example", "big", "rsa").publish(zone)
    instance = _mx(appliance, zone, verify=True)
    body = b"".join(b"line %07d of a long message .................................................\r\n" % i
                    for i in range(40000))
    signed = key.sign(message("x@far.example", "big", body=body, extra=FORGED))
    assert send(instance, "x@far.example", signed)[0] == 250
    msg = delivered(instance)[0]
    assert msg.get_all("Authentication-Results") == [msg["Authentication-Results"]]
    assert "dkim=pass header.d=far.example" in results(msg) and "dmarc=none" in results(msg)
    assert msg.get_payload().encode() == body


def test_dns_that_never_answers_costs_at_most_the_timeout(appliance: Callable[..., Appliance],
                                                          zone: ZoneServer) -> None:  # noqa: F811
    """Names whose DNS server never answers: after dns_timeout the MX answers 451 4.4.3 where the
    domain's policy says tempfail (example.org) and delivers with temperror where it says accept."""
    zone.silent.update({"slow.example", "_dmarc.slow.example"})
    instance = appliance(start=False, extra={
        "queue": {"resolver": zone.address},
        "msgauth": {"verify": True, "dns_timeout": 1, "dns_failure": "accept"},
        'msgauth.domains."example.org"': {"dns_failure": "tempfail"}})
    for address in ("alice@example.org", "bob@example.net"):
        assert instance.admin("user", "add", address, password="a-long-password").returncode == 0
    instance.start()
    started = time.monotonic()
    code, text = send(instance, "x@slow.example", message("x@slow.example"))
    assert (code, text) == (451, f"{replies.AUTH_DNS_TEMPFAIL.status} {replies.AUTH_DNS_TEMPFAIL.text}")
    assert time.monotonic() - started < 4  # dns_timeout is 1 s: no lookup may wait longer than that
    assert send(instance, "x@slow.example", message("x@slow.example"), rcpts=("bob@example.net",))[0] == 250
    ar = results(delivered(instance, uid="bob")[0])
    assert "spf=temperror" in ar and "dmarc=temperror" in ar


@pytest.fixture
def silent_http() -> Iterator[str]:
    """A TCP listener that accepts and never answers (a hung rspamd)."""
    with silent_server() as port:
        yield f"http://127.0.0.1:{port}"


def test_hung_rspamd_costs_at_most_its_timeout(appliance: Callable[..., Appliance], silent_http: str) -> None:
    """An rspamd that accepts and never answers: after [filter] timeout the message is delivered
    (fail open) with "X-Spam-Status: Unchecked"."""
    instance = appliance(start=False, extra={"filter": {"rspamd": silent_http, "timeout": 1}})
    assert instance.admin("user", "add", "alice@example.org", password="a-long-password").returncode == 0
    instance.start()
    started = time.monotonic()
    assert send(instance, "x@far.example", message("x@far.example"))[0] == 250
    assert time.monotonic() - started < 4
    assert delivered(instance)[0]["X-Spam-Status"] == "Unchecked (content filter unavailable)"
