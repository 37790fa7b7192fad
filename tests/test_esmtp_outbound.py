"""DSN, SMTPUTF8 and MTA-STS end to end: the real daemon, the loopback DNS, scripted
remote receivers, and an HTTPS MTA-STS policy server with certificates of the test PKI."""

from __future__ import annotations

import email
import http.server
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator
from email import policy
from typing import Any

import pytest

from mailappliance.queue.spool import OutboundSpool
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port
from tests.esmtp_client import RawSMTP

pytest_plugins = ["tests.remote"]

MESSAGE = b"From: Alice <alice@example.org>\r\nSubject: esmtp\r\n\r\nHello.\r\n"
POLICIES = {
    "sts.example": "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.example\r\nmax_age: 86400\r\n",
    "stsbad.example": "version: STSv1\nmode: enforce\nmx: *.stsbad.example\nmax_age: 86400\n",
    "stsnotls.example": "version: STSv1\nmode: enforce\nmx: mx.stsnotls.example\nmax_age: 86400\n",
    "stscert.example": "version: STSv1\nmode: enforce\nmx: mx.stscert.example\nmax_age: 86400\n",
}


class PolicyServer:
    """HTTPS on one loopback address for every mta-sts.<domain> host, serving POLICIES by Host."""

    def __init__(self, host: str, port: int, certificate: Any) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                domain = (self.headers.get("Host") or "").removeprefix("mta-sts.")
                server.requests.append(f"{domain}{self.path}")
                body = POLICIES.get(domain, "").encode()
                if self.path != "/.well-known/mta-sts.txt" or not body:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*map(str, certificate))
        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def world(dns_server: Any, smtp_receiver: Any, pki: Any) -> Iterator[dict[str, Any]]:
    port, policy_port = free_port(), free_port()
    dns_server.serve({
        "dsn.example": ["MX('dsn.example', 10, 'mx.dsn.example')", "A('mx.dsn.example', '127.0.0.2')"],
        "plain.example": ["MX('plain.example', 10, 'mx.plain.example')", "A('mx.plain.example', '127.0.0.3')"],
        "sts.example": ["MX('sts.example', 10, 'mx.sts.example')", "A('mx.sts.example', '127.0.0.4')",
                        "TXT('_mta-sts.sts.example', b'v=STSv1; id=20260101')",
                        "A('mta-sts.sts.example', '127.0.0.9')"],
        "stsbad.example": ["MX('stsbad.example', 10, 'mx.elsewhere.example')",
                           "A('mx.elsewhere.example', '127.0.0.5')",
                           "TXT('_mta-sts.stsbad.example', b'v=STSv1; id=1')",
                           "A('mta-sts.stsbad.example', '127.0.0.9')"],
        "stsnotls.example": ["MX('stsnotls.example', 10, 'mx.stsnotls.example')",
                             "A('mx.stsnotls.example', '127.0.0.6')",
                             "TXT('_mta-sts.stsnotls.example', b'v=STSv1; id=1')",
                             "A('mta-sts.stsnotls.example', '127.0.0.9')"],
        "stscert.example": ["MX('stscert.example', 10, 'mx.stscert.example')",
                            "A('mx.stscert.example', '127.0.0.7')",
                            "TXT('_mta-sts.stscert.example', b'v=STSv1; id=1')",
                            "A('mta-sts.stscert.example', '127.0.0.9')"],
    })
    tls = (pki.server_cert, pki.server_key)
    receivers = {
        "dsn": smtp_receiver(host="127.0.0.2", port=port, tls=tls),
        "plain": smtp_receiver(host="127.0.0.3", port=port),
        "sts": smtp_receiver(host="127.0.0.4", port=port, tls=pki.server_certificate_for("mx-sts", "mx.sts.example")),
        "stsbad": smtp_receiver(host="127.0.0.5", port=port,
                                tls=pki.server_certificate_for("mx-elsewhere", "mx.elsewhere.example")),
        "stsnotls": smtp_receiver(host="127.0.0.6", port=port),
        "stscert": smtp_receiver(host="127.0.0.7", port=port, tls=tls),  # a certificate for localhost only
    }
    receivers["dsn"].extensions += ["DSN", "SMTPUTF8"]
    policy_server = PolicyServer("127.0.0.9", policy_port, pki.server_certificate_for(
        "mta-sts", *(f"mta-sts.{d}" for d in POLICIES)))
    yield {"port": port, "policy_port": policy_port, "dns": dns_server, "policies": policy_server, **receivers}
    policy_server.stop()


@pytest.fixture
def outbound(appliance: Callable[..., Appliance], world: dict[str, Any], pki: Any) -> Appliance:
    instance = appliance(pki=pki, start=False, extra={"queue": {
        "resolver": world["dns"].address, "smtp_port": world["port"], "retry_schedule": [60],
        "scan_interval": 0.2, "ca_file": str(pki.server_ca), "connect_timeout": 2, "command_timeout": 10,
        "mta_sts_port": world["policy_port"],
    }})
    for address in ("alice@example.org", "bob@example.org"):
        assert instance.admin("user", "add", address, password="secret-password").returncode == 0
    instance.start()
    return instance


def submit(instance: Appliance, mail: str, rcpts: list[str], message: bytes = MESSAGE) -> None:
    with RawSMTP("127.0.0.1", instance.ports["submissions"], tls=instance.client_context()) as smtp:
        smtp.ehlo()
        smtp.login("alice", "secret-password")
        code, lines = smtp.command(mail)
        assert code == 250, lines
        for rcpt in rcpts:
            code, lines = smtp.command(rcpt)
            assert code == 250, (rcpt, lines)
        code, lines = smtp.data(message)
        assert code == 250, lines


def mailbox(instance: Appliance, uid: str) -> list[email.message.EmailMessage]:
    new = instance.maildir_root / uid / "new"
    files = sorted(new.iterdir()) if new.exists() else []
    return [email.message_from_bytes(p.read_bytes(), policy=policy.default) for p in files]  # type: ignore[misc]


def reports(instance: Appliance) -> dict[str, str]:
    """alice's reports by action: the message/delivery-status part's text."""
    found = {}
    for message in mailbox(instance, "alice"):
        if message.get_content_type() == "multipart/report":
            status = next(p for p in message.iter_parts() if "delivery-status" in p.get_content_type())
            text = status.as_bytes().decode("utf-8", "replace")
            for action in ("delivered", "relayed", "failed"):
                if f"Action: {action}" in text:
                    found[action] = text
    return found


def queue_size(instance: Appliance) -> int:
    return len(OutboundSpool(instance.root / "spool").queued_ids())


def test_dsn_reaches_the_next_hop_and_our_reports_follow_notify(outbound: Appliance, world: dict[str, Any]) -> None:
    """RET/ENVID/NOTIFY/ORCPT go to a next hop that offers DSN and not to one without; alice gets
    'delivered' for local bob, 'relayed' for the hop without DSN, 'failed' (with Original-Recipient)
    for the refused recipient who asked for FAILURE, and nothing for the NOTIFY=NEVER one."""
    world["plain"].rcpt_replies.update({"never@plain.example": "550 5.1.1 no", "fail@plain.example": "550 5.1.1 no"})
    submit(outbound, "MAIL FROM:<alice@example.org> RET=HDRS ENVID=QQ+2B1", [
        "RCPT TO:<friend@dsn.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Friend@dsn.example",
        "RCPT TO:<x@plain.example> NOTIFY=SUCCESS",
        "RCPT TO:<never@plain.example> NOTIFY=NEVER",
        "RCPT TO:<fail@plain.example> NOTIFY=FAILURE ORCPT=rfc822;orig+2Bfail@example.org",
        "RCPT TO:<bob@example.org> NOTIFY=SUCCESS"])
    [carried] = world["dsn"].wait_for(1)
    assert carried.mail_line.endswith(" RET=HDRS ENVID=QQ+2B1")
    assert carried.rcpt_lines == ["RCPT TO:<friend@dsn.example> NOTIFY=SUCCESS,FAILURE "
                                  "ORCPT=rfc822;Friend@dsn.example"]
    [plain] = world["plain"].wait_for(1)
    assert "NOTIFY" not in " ".join(plain.rcpt_lines) and "RET=" not in plain.mail_line
    wait_until(lambda: queue_size(outbound) == 0 and len(reports(outbound)) == 3, what="three reports to alice")
    found = reports(outbound)
    assert "Final-Recipient: rfc822; bob@example.org" in found["delivered"]
    assert "Final-Recipient: rfc822; x@plain.example" in found["relayed"]
    assert "friend@dsn.example" not in found["relayed"]  # its next hop reports itself
    assert "Original-Recipient: rfc822; orig+fail@example.org" in found["failed"]
    assert "never@plain.example" not in found["failed"] and "Original-Envelope-Id: QQ+1" in found["failed"]
    assert len(mailbox(outbound, "bob")) == 1


def test_success_notices_are_not_sent_to_unauthenticated_senders(outbound: Appliance) -> None:
    """[smtp] dsn_success_notices = "authenticated" (default): NOTIFY=SUCCESS from the Internet delivers,
    but sends no notice to the unverified sender (backscatter), and says so in the log."""
    with RawSMTP("127.0.0.1", outbound.ports["mx"]) as smtp:
        smtp.ehlo()
        assert smtp.command("MAIL FROM:<alice@example.org> RET=FULL")[0] == 250
        assert smtp.command("RCPT TO:<bob@example.org> NOTIFY=SUCCESS")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
    wait_until(lambda: "not sent: NOTIFY=SUCCESS from an unauthenticated sender" in outbound.log(),
               what="the log line")
    assert len(mailbox(outbound, "bob")) == 1 and not mailbox(outbound, "alice")


def test_smtputf8_goes_where_offered_and_is_refused_cleanly_elsewhere(outbound: Appliance,
                                                                      world: dict[str, Any]) -> None:
    """A UTF-8 recipient goes out with SMTPUTF8 to a hop that offers it; to a hop that does not,
    it fails with 5.6.7 and alice gets a message/global-delivery-status report naming it."""
    submit(outbound, "MAIL FROM:<alice@example.org> SMTPUTF8",
           ["RCPT TO:<jörg@dsn.example>", "RCPT TO:<jörg@plain.example>"],
           "Subject: grüße\r\n\r\nhallo\r\n".encode())
    [received] = world["dsn"].wait_for(1)
    assert received.mail_line.endswith(" SMTPUTF8") and received.rcpt_tos == ["jörg@dsn.example"]
    assert "Subject: grüße".encode() in received.data
    wait_until(lambda: "failed" in reports(outbound), what="a failure report")
    report = reports(outbound)["failed"]
    assert "Final-Recipient: utf-8; jörg@plain.example" in report and "Status: 5.6.7" in report
    assert not world["plain"].messages


def metric_lines(instance: Appliance, name: str) -> list[str]:
    url = f"http://127.0.0.1:{instance.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return [line for line in response.read().decode().splitlines() if line.startswith(name)]


def tlsrpt(instance: Appliance, policy_type: str, result_type: str) -> float:
    for line in metric_lines(instance, "mailappliance_tlsrpt_sessions_total{"):
        if f'policy_type="{policy_type}"' in line and f'result_type="{result_type}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_mta_sts_enforce(outbound: Appliance, world: dict[str, Any]) -> None:
    """mode enforce: the MX the policy names gets the mail over verified TLS; an MX the policy does not
    name, an MX without STARTTLS and an MX whose certificate is for another name get nothing (deferred,
    message kept); TLS-RPT counts each kind; the policy is cached on disk."""
    submit(outbound, "MAIL FROM:<alice@example.org>", ["RCPT TO:<a@sts.example>", "RCPT TO:<b@stsbad.example>",
                                                       "RCPT TO:<c@stsnotls.example>", "RCPT TO:<d@stscert.example>"])
    [received] = world["sts"].wait_for(1)
    assert received.tls and received.rcpt_tos == ["a@sts.example"]
    wait_until(lambda: "deferred: 3 recipient(s) pending" in outbound.log(), what="the deferral")
    log = outbound.log()
    assert "to=<b@stsbad.example>" in log and "no MX host of stsbad.example matches its policy" in log
    assert "TLS is required for this destination (MTA-STS enforce) but was not offered" in log
    assert not world["stsbad"].sessions and not world["stsnotls"].messages and not world["stscert"].messages
    assert queue_size(outbound) == 1
    assert tlsrpt(outbound, "sts", "none") >= 1  # the successful session with mx.sts.example
    assert tlsrpt(outbound, "sts", "validation-failure") >= 1
    assert tlsrpt(outbound, "sts", "starttls-not-supported") >= 1
    assert tlsrpt(outbound, "sts", "certificate-host-mismatch") >= 1
    assert "sts.example" in (outbound.root / "spool" / "mta-sts.json").read_text()
    assert sorted(world["policies"].requests) == [f"{d}/.well-known/mta-sts.txt" for d in sorted(POLICIES)]


def test_a_chunked_submission_is_relayed_byte_for_byte(outbound: Appliance, world: dict[str, Any]) -> None:
    """BDAT in, DATA out: chunk text with lines that are a lone dot or start with dots arrives at the
    next hop unchanged (dot-stuffed on the wire by us, unstuffed by it)."""
    body = b"Subject: chunks\r\n\r\n.\r\n..two dots\r\n.\r\nlast line\r\n"
    with RawSMTP("127.0.0.1", outbound.ports["submissions"], tls=outbound.client_context()) as smtp:
        assert "CHUNKING" in smtp.ehlo()
        smtp.login("alice", "secret-password")
        assert smtp.command("MAIL FROM:<alice@example.org>")[0] == 250
        assert smtp.command("RCPT TO:<friend@plain.example>")[0] == 250
        assert smtp.bdat(body[:20])[0] == 250
        code, lines = smtp.bdat(body[20:], last=True)
        assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as "), lines
    [received] = world["plain"].wait_for(1)
    assert received.data.endswith(body) and received.data.startswith(b"Received: ")
