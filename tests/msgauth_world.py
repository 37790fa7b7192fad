"""The sending world for message-authentication tests: sender domains with
SPF, DKIM keys and DMARC records in a :class:`tests.dns_zone.ZoneServer`,
messages signed by those senders (dkimpy), and an MX appliance that verifies."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import smtplib
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.conditions import wait_until


class SenderKey:
    def __init__(self, domain: str, selector: str, kind: str = "rsa") -> None:
        self.domain, self.selector, self.kind = domain, selector, kind
        if kind == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
            public = key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
            self.algorithm = b"rsa-sha256"
        else:
            key = ed25519.Ed25519PrivateKey.generate()
            seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
            self.private = base64.b64encode(seed)
            public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self.record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
            self.algorithm = b"ed25519-sha256"

    def publish(self, zone: Any) -> "SenderKey":
        zone.txt(f"{self.selector}._domainkey.{self.domain}", self.record)
        return self

    def sign(self, message: bytes) -> bytes:
        signature = dkim.sign(message, self.selector.encode(), self.domain.encode(), self.private,
                              signature_algorithm=self.algorithm, canonicalize=(b"relaxed", b"relaxed"))
        return signature + message


def message(from_address: str, subject: str = "hello", body: bytes = b"Hello there.\r\n",
            extra: bytes = b"") -> bytes:
    return (f"From: Sender <{from_address}>\r\nTo: Alice <alice@example.org>\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{time.time_ns()}@test>\r\n").encode() + \
        extra + b"\r\n" + body


def send(instance: Any, mail_from: str, data: bytes, rcpts: tuple[str, ...] = ("alice@example.org",),
         helo: str = "client.pass.example") -> tuple[int, str]:
    """(code, text) of the reply to the message's final dot."""
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], local_hostname=helo, timeout=30) as smtp:
        smtp.ehlo(helo)
        code, text = smtp.mail(mail_from)
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            assert code == 250, (code, text)
        code, text = smtp.data(data)
        return code, text.decode()


def delivered(instance: Any, uid: str = "alice", folder: str = "", count: int = 1) -> list[email.message.Message]:
    """The messages in ``uid``'s Maildir (or its ``folder``), once there are ``count``."""
    new = instance.maildir_root / uid / folder / "new" if folder else instance.maildir_root / uid / "new"

    def files() -> list[Path]:
        found = sorted(new.iterdir(), key=_received_order) if new.exists() else []
        return found if len(found) >= count else []

    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32)
            for p in wait_until(files, 15, what=f"{count} message(s) in {new}")]


def _received_order(path: Path) -> tuple[int, int, int]:
    """Where a file's name puts it among one daemon's deliveries: seconds, microseconds and the
    process's counter of its unique name (mtimes tie: the kernel stamps files by the timer tick)."""
    match = re.match(r"(\d+)\.M(\d+)P\d+R[0-9a-f]+Q(\d+)\.", path.name)
    assert match is not None, f"not one of our Maildir names: {path.name}"
    return int(match[1]), int(match[2]), int(match[3])


def results(msg: email.message.Message) -> str:
    """Our Authentication-Results value, unfolded."""
    values = [v for v in msg.get_all("Authentication-Results", []) if v.strip().startswith("mx.test.example")]
    assert len(values) == 1, msg.get_all("Authentication-Results")
    return " ".join(values[0].split())
