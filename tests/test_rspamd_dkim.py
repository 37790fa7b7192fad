"""The content filter (a real private rspamd) and DKIM signing of submitted mail, verified by
dkimpy and by rspamd's own DKIM check, against keys served by a DNS zone on loopback."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path
from typing import Any, Callable, Iterator

import dkim
import pytest

from mailappliance.smtp import replies
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port
from tests.dns_zone import ZoneServer
from tests.msgauth_world import delivered, message, send
from tests.rspamd import Rspamd

pytest_plugins = ["tests.remote"]

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"


@pytest.fixture(scope="module")
def module_zone() -> Iterator[ZoneServer]:
    server = ZoneServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rspamd(module_zone: ZoneServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    instance = Rspamd(tmp_path_factory.mktemp("rspamd"), module_zone.address)
    instance.start()
    yield instance
    instance.stop()


def reply(r: replies.Reply) -> tuple[int, str]:
    return r.code, f"{r.status} {r.text}"


def submit(instance: Appliance, recipients: list[str], data: bytes) -> tuple[int, str]:
    """(code, text) of the reply to the final dot (or to MAIL when that refuses)."""
    with smtplib.SMTP("127.0.0.1", instance.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=instance.client_context())
        smtp.login("alice", "alice-password")
        code, text = smtp.mail("alice@example.org")
        if code != 250:
            return code, text.decode()
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(data)
        return code, text.decode()


def sighup(instance: Appliance, count: int) -> None:
    assert instance.process is not None
    instance.process.send_signal(signal.SIGHUP)
    wait_until(lambda: instance.log().count("SIGHUP: configuration re") >= count, 15, what="SIGHUP handled")


def test_gtube_refused_and_clean_mail_delivered_with_headers(appliance: Callable[..., Appliance],
                                                             rspamd: Rspamd) -> None:
    """GTUBE: 550 5.7.1 with rspamd's text, nothing delivered; a clean message is delivered with
    X-Spam-Status/Score/Action, and a forged X-Spam-Status the sender wrote is removed."""
    instance = appliance(start=False, extra={"filter": {"rspamd": rspamd.url, "timeout": 20}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    assert send(instance, "spammer@far.example", message("spammer@far.example", body=GTUBE)) == \
        (550, f"{replies.SPAM_REJECTED.status} Gtube pattern")
    forged = b"X-Spam-Status: No, score=-100\r\n"
    assert send(instance, "friend@far.example", message("friend@far.example", extra=forged))[0] == 250
    msg = delivered(instance)[0]
    assert msg.get_all("X-Spam-Status") == [msg["X-Spam-Status"]] and msg["X-Spam-Status"].startswith("No, score=")
    assert msg["X-Spam-Action"] == "no action" and float(msg["X-Spam-Score"]) < 6


def test_rspamd_stopped_fail_open_or_tempfail_nothing_lost(appliance: Callable[..., Appliance],
                                                          module_zone: ZoneServer, tmp_path: Path) -> None:
    """With rspamd stopped, on_failure = "accept" delivers with "X-Spam-Status: Unchecked" and
    "tempfail" answers 451 4.7.1 (the client keeps the message); every 250 is in the Maildir."""
    own = Rspamd(tmp_path / "rspamd", module_zone.address)
    own.start()
    try:
        instance = appliance(start=False, extra={"filter": {"rspamd": own.url, "timeout": 5}})
        assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
        instance.start()
        assert send(instance, "a@far.example", message("a@far.example", "before"))[0] == 250
        assert delivered(instance)[0]["X-Spam-Status"].startswith("No")
    finally:
        own.stop()
    assert send(instance, "a@far.example", message("a@far.example", "while down"))[0] == 250
    assert delivered(instance, count=2)[1]["X-Spam-Status"] == "Unchecked (content filter unavailable)"
    text = instance.config_path.read_text().replace("[filter]\n", '[filter]\non_failure = "tempfail"\n')
    instance.config_path.write_text(text)
    sighup(instance, 1)
    assert send(instance, "a@far.example", message("a@far.example", "deferred")) == reply(replies.FILTER_UNAVAILABLE)
    assert len(delivered(instance, count=2)) == 2


def test_outbound_spam_suspends_submission_until_enabled(appliance: Callable[..., Appliance], rspamd: Rspamd,
                                                         module_zone: ZoneServer) -> None:
    """Outbound scanning refuses GTUBE from a subscriber; the second strike suspends their
    submission (550 5.7.1 at MAIL), user show says why, user enable lifts it."""
    instance = appliance(start=False, extra={
        "queue": {"resolver": module_zone.address},
        "filter": {"rspamd": rspamd.url, "outbound": True, "suspend_after": 2, "timeout": 20}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    spam = message("alice@example.org", "buy now", body=GTUBE)
    assert submit(instance, ["victim@far.example"], spam) == (550, f"{replies.SPAM_REJECTED.status} Gtube pattern")
    assert submit(instance, ["victim@far.example"], spam)[0] == 550
    assert submit(instance, ["victim@far.example"], message("alice@example.org")) == \
        reply(replies.SUBMISSION_SUSPENDED)
    shown = instance.admin("user", "show", "alice")
    assert "SUSPENDED" in shown.stdout and "classified as spam" in shown.stdout
    assert "suspension lifted" in instance.admin("user", "enable", "alice").stdout
    assert submit(instance, ["friend@far.example"], message("alice@example.org"))[0] == 250


@pytest.fixture
def signing(appliance: Callable[..., Appliance], module_zone: ZoneServer, smtp_receiver: Any) -> dict[str, Any]:
    port = free_port()
    module_zone.add("remote.example", "MX", "10 mx1.remote.example.")
    module_zone.add("mx1.remote.example", "A", "127.0.0.2")
    receiver = smtp_receiver(host="127.0.0.2", port=port)
    instance = appliance(start=False, extra={"queue": {"resolver": module_zone.address, "smtp_port": port,
                                                       "scan_interval": 0.2, "retry_schedule": [0.5]}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    for key_type, selector in (("ed25519", "e1"), ("rsa", "r1")):
        made = instance.admin("--json", "dkim", "keygen", "example.org", "--type", key_type, "--selector", selector)
        assert made.returncode == 0, made.stderr
        key = __import__("json").loads(made.stdout)["keys"][0]
        assert (Path(key["file"]).stat().st_mode & 0o777) == 0o600
        module_zone.txt(key["name"], key["record"])
    instance.start()
    return {"instance": instance, "receiver": receiver, "zone": module_zone}


def _signatures(data: bytes) -> list[dict[bytes, bytes]]:
    parsed = dkim.DKIM(data)
    return [dkim.util.parse_tag_value(value) for name, value in parsed.headers if name.lower() == b"dkim-signature"]


def _without_other_signatures(data: bytes, kept: int) -> bytes:
    from mailappliance.msgauth import headers

    end = headers.head_length(data)
    fields = headers.parse_fields(data[:end])
    signatures = [f for f in fields if f.name == "dkim-signature"]
    others = {id(f) for i, f in enumerate(signatures) if i != kept}
    return b"".join(f.raw for f in fields if id(f) not in others) + data[end - 2:]


def test_submitted_mail_is_dual_signed_and_verifies(signing: dict[str, Any], rspamd: Rspamd) -> None:
    """Ed25519 and RSA signatures (relaxed/relaxed, From/To/Subject/Date oversigned) that dkimpy and
    rspamd both verify against the published keys; dkim check and dns agree with the zone."""
    instance, receiver, zone = signing["instance"], signing["receiver"], signing["zone"]
    assert submit(instance, ["friend@remote.example"], message("alice@example.org", "signed"))[0] == 250
    data = receiver.wait_for(1)[0].data
    signatures = _signatures(data)
    assert sorted(s[b"a"] for s in signatures) == [b"ed25519-sha256", b"rsa-sha256"]
    for s in signatures:
        assert s[b"c"] == b"relaxed/relaxed" and s[b"d"] == b"example.org"
        signed = [h.strip() for h in s[b"h"].split(b":")]
        for name in (b"from", b"to", b"subject", b"date"):
            assert signed.count(name) == 2, (name, signed)
    verifier = dkim.DKIM(data)
    assert all(verifier.verify(idx=i, dnsfunc=zone.dkim_dnsfunc()) for i in range(2))
    for kept in range(2):  # rspamd, each signature alone: Ed25519 and RSA verify independently
        one = _without_other_signatures(data, kept)
        verdict = rspamd.check(one, Ip="192.0.2.10", From="alice@example.org", Rcpt="friend@remote.example")
        assert "R_DKIM_ALLOW" in verdict["symbols"], verdict["symbols"].keys()
        assert verdict["symbols"]["DKIM_TRACE"]["options"] == ["example.org:+"]
        assert "R_DKIM_REJECT" not in verdict["symbols"]
    check = instance.admin("dkim", "check", "example.org")
    assert check.returncode == 0 and check.stdout.count("published, matches") == 2, check.stdout
    records = instance.admin("dns", "example.org").stdout
    assert "e1._domainkey.example.org. IN TXT" in records and "_dmarc.example.org. IN TXT" in records
    assert "_submission._tcp.example.org. IN SRV 0 1" in records


def test_new_selector_takes_over_on_sighup(signing: dict[str, Any]) -> None:
    """A newer RSA key signs from the next SIGHUP on (no restart), and its signature verifies."""
    instance, receiver, zone = signing["instance"], signing["receiver"], signing["zone"]
    made = instance.admin("--json", "dkim", "keygen", "example.org", "--type", "rsa", "--selector", "r2")
    key = __import__("json").loads(made.stdout)["keys"][0]
    zone.txt(key["name"], key["record"])
    sighup(instance, 1)
    wait_until(lambda: "r2 (rsa)" in instance.log(), 10, what="the new key in use")
    assert submit(instance, ["friend@remote.example"], message("alice@example.org", "rotated"))[0] == 250
    data = receiver.wait_for(1)[0].data
    assert sorted(s[b"s"] for s in _signatures(data)) == [b"e1", b"r2"]
    assert all(dkim.DKIM(data).verify(idx=i, dnsfunc=zone.dkim_dnsfunc()) for i in range(2))
