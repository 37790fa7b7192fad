"""Issue 11, finding 9: a resumed TLS session keeps its client-certificate identity.

The verify callback runs only in a full handshake; a resumed session (session
ID or ticket, TLS 1.2 and 1.3) used to come without a verdict and was refused
(530) with the untrue log line "no client CA configured".
"""

from __future__ import annotations

import datetime
import re
import smtplib
import socket
import ssl
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.daemon import Appliance

MESSAGE_FROM = "alice@example.org"


class ResumingSMTP(smtplib.SMTP_SSL):
    """SMTP over implicit TLS that offers a saved TLS session for resumption."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        self.tls_session = session
        super().__init__(host, port, timeout=10, context=context)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        raw = socket.create_connection((host, port), timeout)
        return self.context.wrap_socket(raw, server_hostname=host, session=self.tls_session)


def mail_from(instance: Appliance, context: ssl.SSLContext,
              session: ssl.SSLSession | None = None) -> tuple[int, bool, ssl.SSLSession | None]:
    """One connection to 465: the reply to MAIL FROM, whether TLS resumed, the session to resume."""
    with ResumingSMTP("127.0.0.1", instance.ports["submissions"], context, session) as smtp:
        smtp.ehlo("client.example.net")  # the server's TLS 1.3 tickets have arrived by now
        code, _ = smtp.mail(MESSAGE_FROM)
        smtp.rset()
        assert isinstance(smtp.sock, ssl.SSLSocket)
        return code, smtp.sock.session_reused, smtp.sock.session


@pytest.fixture
def with_certificates(appliance: Callable[..., Appliance], pki: Any) -> Appliance:
    """The test CA as client CA; alice's certificate mapped to her in the directory."""
    instance = appliance(pki=pki, start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    added = instance.admin("cert", "add", "alice", str(pki.cert_path("alice")))
    assert added.returncode == 0, added.stderr
    instance.start()
    return instance


def client_context(pki: Any, certificate: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = pki.client_context(certificate)
    context.minimum_version = context.maximum_version = version
    return context


def server_only_certificate(pki: Any) -> str:
    """A certificate from the client CA whose extended key usage is serverAuth only."""
    name = "server_only"
    if not pki.cert_path(name).exists():
        authority = x509.load_pem_x509_certificate(pki.client_ca.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
            .issuer_name(authority.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(pki.client_ca_key_obj, hashes.SHA256())
        )
        pki.key_path(name).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        pki.cert_path(name).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return name


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_resumed_session_keeps_certificate_login(with_certificates: Appliance, pki: Any,
                                                 version: ssl.TLSVersion) -> None:
    """A resumed TLS session logs in by its client certificate as the first one did (250 both times)."""
    context = client_context(pki, "alice", version)
    first, reused, session = mail_from(with_certificates, context)
    assert (first, reused) == (250, False) and session is not None
    second, reused, _ = mail_from(with_certificates, context, session)
    assert (second, reused) == (250, True)
    log = with_certificates.log()
    assert len(re.findall(r"auth ok: uid=alice login=.* mechanism=certificate", log)) == 2
    assert "no client CA configured" not in log


@pytest.mark.parametrize("certificate", ["other_ca", "expired", "server_only"])
def test_resumed_session_keeps_the_true_refusal_reason(with_certificates: Appliance, pki: Any,
                                                       certificate: str) -> None:
    """A resumed session with an untrusted certificate is refused for the same, true reason."""
    if certificate == "server_only":
        certificate = server_only_certificate(pki)
    context = client_context(pki, certificate, ssl.TLSVersion.TLSv1_3)
    first, _, session = mail_from(with_certificates, context)
    second, reused, _ = mail_from(with_certificates, context, session)
    assert (first, second, reused) == (530, 530, True)
    reasons = re.findall(r"auth failed: mechanism=certificate .* reason=(.*)", with_certificates.log())
    assert len(reasons) == 2 and reasons[0] == reasons[1], reasons
    assert "no client CA configured" not in reasons[0]
