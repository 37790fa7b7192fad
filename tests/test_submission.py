"""Submission from outside: TLS everywhere, AUTH only inside TLS, client certificates,
no open relay in any address form - the real daemon, the real slapd, real clients."""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import subprocess
from typing import Any, Callable

import pytest

from mailappliance.queue.spool import OutboundSpool
from mailappliance.smtp.replies import (
    AUTH_INVALID,
    AUTH_REQUIRED,
    NEED_MAIL,
    NO_VALID_RECIPIENTS,
    READY_FOR_TLS,
    RECIPIENT_REJECTED,
    RELAY_DENIED,
    SENDER_NOT_OWNED,
    TLS_FIRST,
    Reply,
)
from tests.daemon import Appliance, free_port
from tests.replies import answered

ALICE_PASSWORD = "alice-password"
MESSAGE = b"From: alice@example.org\r\nTo: someone@remote.example\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def secured(appliance: Callable[..., Appliance], slapd: Any, pki: Any) -> Appliance:
    """LDAP backend, the test CA's certificates, no plaintext logins anywhere.  Relayed
    mail goes to a smarthost port where nothing listens, so it stays in the spool
    (deferred) for the tests to read: remote.example has no MX, and a bounce would
    empty the spool while a test still looks (a race the queue runner sometimes won)."""
    instance = appliance(backend="ldap", slapd=slapd, pki=pki, start=False,
                         extra={"queue": {"smarthost": f"[127.0.0.1]:{free_port()}"}})
    assert instance.admin("user", "add", "alice@example.org", password=ALICE_PASSWORD).returncode == 0
    assert instance.admin("user", "add", "bob@example.org", password="bob-password").returncode == 0
    assert instance.admin("alias", "add", "alice", "alice.l@example.org").returncode == 0
    added = instance.admin("cert", "add", "alice", str(pki.cert_path("alice")))
    assert added.returncode == 0, added.stderr
    instance.start()
    return instance


def spooled(instance: Appliance) -> list[str]:
    return OutboundSpool(instance.root / "spool").queued_ids()


def tls_context(instance: Appliance, client: str | None = None) -> ssl.SSLContext:
    return instance.client_context(client)


def submission(instance: Appliance, client: str | None = None) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", instance.ports["submission"], timeout=10)
    smtp.ehlo("client.example.net")
    smtp.starttls(context=tls_context(instance, client))
    smtp.ehlo("client.example.net")
    return smtp


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_auth_and_relay_on_587(secured: Appliance, mechanism: str) -> None:
    """On 587 after STARTTLS, PLAIN and LOGIN log in; remote mail is queued naming alice, local mail delivered."""
    with submission(secured) as smtp:
        assert "auth" in smtp.esmtp_features and "starttls" not in smtp.esmtp_features
        smtp.user, smtp.password = "alice", ALICE_PASSWORD
        code, _ = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
        assert code == 235
        assert smtp.sendmail("alice.l@example.org", ["someone@remote.example", "bob@example.org"], MESSAGE) == {}
    [queue_id] = spooled(secured)
    data = OutboundSpool(secured.root / "spool").read_message(queue_id)
    assert f"(authenticated as alice via {mechanism})".encode() in data
    assert data.endswith(MESSAGE)
    assert len(list((secured.maildir_root / "bob" / "new").iterdir())) == 1


def test_implicit_tls_on_465(secured: Appliance) -> None:
    """On 465 (implicit TLS) alice logs in with her address and her remote mail is queued."""
    with smtplib.SMTP_SSL("127.0.0.1", secured.ports["submissions"], timeout=10,
                          context=tls_context(secured)) as smtp:
        smtp.login("alice@example.org", ALICE_PASSWORD)
        assert smtp.sendmail("alice@example.org", ["someone@remote.example"], MESSAGE) == {}
    assert len(spooled(secured)) == 1


def test_client_certificate_without_password(secured: Appliance) -> None:
    """alice's stored client certificate logs her in on 465 without a password; the Received header says so."""
    with smtplib.SMTP_SSL("127.0.0.1", secured.ports["submissions"], timeout=10,
                          context=tls_context(secured, "alice")) as smtp:
        smtp.ehlo("client.example.net")
        assert "auth" not in smtp.esmtp_features  # already authenticated by the certificate
        assert smtp.sendmail("alice@example.org", ["someone@remote.example"], MESSAGE) == {}
    [queue_id] = spooled(secured)
    data = OutboundSpool(secured.root / "spool").read_message(queue_id)
    assert b"(authenticated as alice via certificate)" in data


@pytest.mark.parametrize("certificate", ["stranger", "other_ca", "expired"])
def test_other_certificates_grant_nothing_but_password_still_works(secured: Appliance, certificate: str) -> None:
    """A stranger's, another CA's or an expired certificate grants nothing (530); the password still works."""
    with submission(secured, certificate) as smtp:
        assert answered(smtp.mail("alice@example.org"), AUTH_REQUIRED)
        smtp.rset()
        smtp.login("alice", ALICE_PASSWORD)
        assert smtp.sendmail("alice@example.org", ["someone@remote.example"], MESSAGE) == {}


def test_revoked_certificate_stops_working(secured: Appliance) -> None:
    """After cert revoke, alice's certificate no longer authenticates (530 at MAIL)."""
    assert secured.admin("cert", "revoke", "alice", str(secured.pki.cert_path("alice"))).returncode == 0
    with smtplib.SMTP_SSL("127.0.0.1", secured.ports["submissions"], timeout=10,
                          context=tls_context(secured, "alice")) as smtp:
        smtp.ehlo("x")
        assert answered(smtp.mail("alice@example.org"), AUTH_REQUIRED)


def test_no_auth_before_tls(secured: Appliance) -> None:
    """Before STARTTLS on 587: no AUTH offered, AUTH gets 530 5.7.0 (STARTTLS first), MAIL 530 5.7.0."""
    with smtplib.SMTP("127.0.0.1", secured.ports["submission"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        assert "starttls" in smtp.esmtp_features and "auth" not in smtp.esmtp_features
        assert answered(smtp.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXBhc3N3b3Jk"), TLS_FIRST)
        assert answered(smtp.mail("alice@example.org"), AUTH_REQUIRED)


def test_wrong_password_and_spoofed_sender(secured: Appliance) -> None:
    """A wrong password gets 535 5.7.8 and is logged; after login another's address as sender gets 553 5.7.1."""
    with submission(secured) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            smtp.login("alice", "wrong-password")
        assert answered((failed.value.smtp_code, failed.value.smtp_error), AUTH_INVALID)
        smtp.login("alice", ALICE_PASSWORD)
        assert answered(smtp.mail("bob@example.org"), SENDER_NOT_OWNED)
    assert spooled(secured) == []
    assert "auth failed: login='alice' mechanism=PLAIN" in secured.log()


def test_swaks_full_submission(secured: Appliance) -> None:
    """swaks with STARTTLS and AUTH LOGIN submits a message that is queued."""
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{secured.ports['submission']}", "--tls",
         "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", ALICE_PASSWORD,
         "--from", "alice@example.org", "--to", "friend@remote.example", "--helo", "swaks.example.net"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert len(spooled(secured)) == 1


MALFORMED = Reply(501, "5.1.3", "Bad recipient address syntax: malformed address")
UNBRACKETED = Reply(501, "5.1.3", "Bad recipient address syntax: address must be enclosed in <>")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Error: unsupported RCPT parameter")

RELAY_PROBES = [  # (RCPT argument, the MX's answer to a stranger)
    ("<victim@remote.example>", RELAY_DENIED),
    ("<victim%remote.example@example.org>", RECIPIENT_REJECTED),
    ("<victim%remote.example>", RECIPIENT_REJECTED),
    ("<victim%remote.example%example.org@example.org>", RECIPIENT_REJECTED),
    ("<remote.example!victim@example.org>", RECIPIENT_REJECTED),
    ("<remote.example!victim>", RECIPIENT_REJECTED),
    ("<example.org!remote.example!victim@example.org>", RECIPIENT_REJECTED),
    ("<@example.org:victim@remote.example>", RECIPIENT_REJECTED),
    ("<@example.org,@example.net:victim@remote.example>", RECIPIENT_REJECTED),
    ('<"victim@remote.example"@example.org>', RECIPIENT_REJECTED),
    ('<"victim%remote.example"@example.org>', RECIPIENT_REJECTED),
    ('<"victim"@remote.example>', RECIPIENT_REJECTED),
    ("<victim@remote.example@example.org>", MALFORMED),
    ("<victim@[192.0.2.1]>", RECIPIENT_REJECTED),
    ("<victim@[127.0.0.1]>", RECIPIENT_REJECTED),
    ("<victim@[IPv6:::1]>", RECIPIENT_REJECTED),
    ("<victim@example.org.>", MALFORMED),
    ("<victim@remote.example.>", MALFORMED),
    ("<victim@EXAMPLE.ORG.remote.example>", RELAY_DENIED),
    ("<victim@example.org.remote.example>", RELAY_DENIED),
    ("<victim@sub.example.org>", RELAY_DENIED),
    ("<victim@localhost>", RELAY_DENIED),
    ("<victim@remote.example%example.org>", MALFORMED),
    ("victim@remote.example", UNBRACKETED),
    ("<victim@remote_example.org>", MALFORMED),
    ("<victim@remote.example> NOTIFY=NEVER", RELAY_DENIED),  # DSN parameters change nothing (RFC 3461)
    ("<victim@remote.example> NOTIFY=SUCCESS ORCPT=rfc822;postmaster@example.org", RELAY_DENIED),
    ("<victim@remote.example> XFORWARD=1", UNSUPPORTED_PARAMETER),
]


@pytest.mark.parametrize("sender", ["<stranger@remote.example>", "<>", "<postmaster@example.org>"])
def test_relay_battery_on_mx(secured: Appliance, sender: str) -> None:
    """Every relay trick gets its exact refusal at RCPT on the MX, DATA finds no recipient, nothing is queued."""
    for probe, refusal in RELAY_PROBES:  # one session each: the server ends sessions with too many errors
        with smtplib.SMTP("127.0.0.1", secured.ports["mx"], timeout=10) as smtp:
            smtp.ehlo("probe.example.net")
            assert smtp.docmd("MAIL", f"FROM:{sender}")[0] == 250
            answer = smtp.docmd("RCPT", f"TO:{probe}")
            assert answered(answer, refusal), (probe, answer)
            assert answered(smtp.docmd("DATA"), NO_VALID_RECIPIENTS), probe
    assert spooled(secured) == []
    assert not list(secured.maildir_root.glob("*/new/*"))


def test_submission_without_auth_refuses_the_transaction_before_any_recipient(secured: Appliance) -> None:
    """Without AUTH, submission refuses MAIL (530 5.7.0), so no RCPT reaches the relay decision (503 5.5.1)."""
    with submission(secured) as smtp:
        assert answered(smtp.mail("alice@example.org"), AUTH_REQUIRED)
        for probe, _ in RELAY_PROBES[:5]:
            assert answered(smtp.docmd("RCPT", f"TO:{probe}"), NEED_MAIL), probe
    assert spooled(secured) == []


def test_relay_tricks_refused_for_an_authenticated_subscriber(secured: Appliance) -> None:
    """Percent hack, bang path, source route, quoted part and literal are rejected for alice too, after login
    (one daemon, a logged-in session per probe: the server ends sessions with too many errors)."""
    for probe in [probe for probe, refusal in RELAY_PROBES if refusal is RECIPIENT_REJECTED]:
        with submission(secured) as smtp:
            smtp.login("alice", ALICE_PASSWORD)
            assert smtp.mail("alice@example.org")[0] == 250, probe
            answer = smtp.docmd("RCPT", f"TO:{probe}")
            assert answered(answer, RECIPIENT_REJECTED), (probe, answer)
    assert spooled(secured) == []


def read_reply(sock: Any) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.splitlines()[-1][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_starttls_injection_is_discarded(secured: Appliance) -> None:
    """Commands pipelined after STARTTLS on the MX are discarded: inside TLS, RCPT finds no MAIL."""
    raw = socket.create_connection(("127.0.0.1", secured.ports["mx"]), timeout=10)
    read_reply(raw)
    raw.sendall(b"EHLO probe.example.net\r\n")
    read_reply(raw)
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
    assert answered(read_reply(raw).decode(), READY_FOR_TLS)
    tls = tls_context(secured).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"NOOP\r\n")
    assert read_reply(tls) == b"250 2.0.0 Ok\r\n"  # nothing else came first
    tls.sendall(b"RCPT TO:<alice@example.org>\r\n")
    assert answered(read_reply(tls).decode(), NEED_MAIL)  # the injected MAIL never happened
    tls.close()


def test_stls_injection_is_discarded(secured: Appliance) -> None:
    """A NOOP pipelined after STLS is discarded: the first answer inside TLS is QUIT's."""
    raw = socket.create_connection(("127.0.0.1", secured.ports["pop3"]), timeout=10)
    assert raw.recv(4096).startswith(b"+OK")
    raw.sendall(b"STLS\r\nNOOP\r\n")
    assert raw.recv(4096).startswith(b"+OK")
    tls = tls_context(secured).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"QUIT\r\n")
    assert tls.recv(4096).startswith(b"+OK")  # not the -ERR an executed NOOP would give
    tls.close()


def test_pop3_over_stls_and_995(secured: Appliance) -> None:
    """POP3 on 110 offers only STLS and refuses USER before it; after STLS, and on 995, alice reads her mail."""
    with smtplib.SMTP("127.0.0.1", secured.ports["mx"], timeout=10) as smtp:
        smtp.sendmail("friend@remote.example", ["alice@example.org"], MESSAGE)
    plain = poplib.POP3("127.0.0.1", secured.ports["pop3"], timeout=10)
    capabilities = plain.capa()
    assert "STLS" in capabilities and "USER" not in capabilities
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] TLS required, use STLS first'$"):
        plain.user("alice")
    plain.stls(context=tls_context(secured))
    assert "USER" in plain.capa() and "STLS" not in plain.capa()
    plain.user("alice")
    plain.pass_(ALICE_PASSWORD)
    assert plain.stat()[0] == 1
    plain.quit()
    implicit = poplib.POP3_SSL("127.0.0.1", secured.ports["pop3s"], timeout=10, context=tls_context(secured))
    implicit.user("alice@example.org")
    implicit.pass_(ALICE_PASSWORD)
    assert implicit.retr(1)[1][-1] == b"hello"
    implicit.quit()
