"""A test PKI generated per test session: server CA and certificate for localhost,
a client CA, and client certificates for every case the daemon must tell apart.

Every test certificate is made by :func:`build_certificate`, here and nowhere else.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(common_name: str, email: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example ISP test"),
                  x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if email:
        attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attributes)


def build_certificate(subject: x509.Name, public_key: Any, issuer: x509.Name, issuer_key: Any, *,
                      kind: str, not_before: datetime.datetime = NOW - DAY,
                      not_after: datetime.datetime = NOW + 90 * DAY,
                      dns_names: tuple[str, ...] = ("localhost",)) -> x509.Certificate:
    """One certificate, signed by ``issuer_key``; ``kind`` is "ca", "server"
    (names ``dns_names``, by default localhost, and 127.0.0.1 and ::1) or "client"."""
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=kind == "ca", path_length=None), critical=True)
    )
    if kind == "ca":
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if kind == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [*(x509.DNSName(n) for n in dns_names), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]),
            critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(issuer_key, hashes.SHA256())


class TestPKI:
    """Paths of every PEM file, plus helpers for clients."""

    __test__ = False  # a helper, not a test class

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server_ca, self.server_ca_key_obj = self._authority("server-ca", "Test Server CA")
        self.client_ca, self.client_ca_key_obj = self._authority("client-ca", "Test Client CA")
        self.client_ca_key = root / "client-ca.key"
        other_ca, other_ca_key = self._authority("other-ca", "Test Client CA")  # same name, other key
        self.server_cert, self.server_key = self._leaf(
            "server", "localhost", self.server_ca, self.server_ca_key_obj, kind="server")
        self._leaf("alice", "alice", self.client_ca, self.client_ca_key_obj, email="alice@example.org")
        self._leaf("stranger", "stranger", self.client_ca, self.client_ca_key_obj, email="stranger@example.net")
        self._leaf("other_ca", "alice", other_ca, other_ca_key, email="alice@example.org")
        self._leaf("expired", "alice", self.client_ca, self.client_ca_key_obj, email="alice@example.org",
                   not_before=NOW - 30 * DAY, not_after=NOW - DAY)

    def _write_key(self, name: str, key: Any) -> Path:
        path = self.root / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def _write_certificate(self, path: Path, certificate: x509.Certificate) -> Path:
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def _authority(self, name: str, common_name: str) -> tuple[Path, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = build_certificate(_name(common_name), key.public_key(), _name(common_name), key, kind="ca",
                                        not_after=NOW + 365 * DAY)
        self._write_key(name, key)
        return self._write_certificate(self.root / f"{name}.pem", certificate), key

    def _leaf(self, name: str, common_name: str, ca_path: Path, ca_key: Any, *, kind: str = "client",
              email: str | None = None, not_before: datetime.datetime = NOW - DAY,
              not_after: datetime.datetime = NOW + 90 * DAY) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        authority = x509.load_pem_x509_certificate(ca_path.read_bytes())
        certificate = build_certificate(_name(common_name, email), key.public_key(), authority.subject, ca_key,
                                        kind=kind, not_before=not_before, not_after=not_after)
        return self._write_certificate(self.root / f"{name}.pem", certificate), self._write_key(name, key)

    def reissue_server_certificate(self, path: Path) -> bytes:
        """A new certificate (new serial) for the server's key, written to ``path``; its DER."""
        old = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        authority = x509.load_pem_x509_certificate(self.server_ca.read_bytes())
        new = build_certificate(old.subject, old.public_key(), authority.subject, self.server_ca_key_obj,
                                kind="server", not_before=datetime.datetime.now(datetime.timezone.utc) - DAY)
        self._write_certificate(path, new)
        return new.public_bytes(serialization.Encoding.DER)

    def server_certificate_for(self, name: str, *hosts: str) -> tuple[Path, Path]:
        """A server certificate (and key) from the test server CA for ``hosts``, e.g. a remote
        MX or an MTA-STS policy host; written as ``name``.pem and ``name``.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        authority = x509.load_pem_x509_certificate(self.server_ca.read_bytes())
        certificate = build_certificate(_name(hosts[0]), key.public_key(), authority.subject,
                                        self.server_ca_key_obj, kind="server", dns_names=hosts)
        return self._write_certificate(self.root / f"{name}.pem", certificate), self._write_key(name, key)

    def cert_path(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key_path(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def der(self, name: str) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_path(name).read_bytes()).public_bytes(
            serialization.Encoding.DER)

    def client_context(self, name: str | None = None) -> ssl.SSLContext:
        """For smtplib/poplib: trusts the server CA, presents ``name``'s certificate if given."""
        context = ssl.create_default_context(cafile=str(self.server_ca))
        if name is not None:
            context.load_cert_chain(str(self.cert_path(name)), str(self.key_path(name)))
        return context

    def twisted_contexts(self) -> tuple[Any, Any]:
        """(server, client) Twisted TLS options for in-memory protocol tests: the
        server presents the localhost certificate, the client trusts the server CA."""
        from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

        server = PrivateCertificate.loadPEM(self.server_cert.read_text() + self.server_key.read_text()).options()
        client = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(self.server_ca.read_bytes()))
        return server, client


@pytest.fixture(scope="session")
def pki() -> Iterator[TestPKI]:
    with tempfile.TemporaryDirectory(prefix="mailappliance-pki-") as root:
        yield TestPKI(Path(root))
