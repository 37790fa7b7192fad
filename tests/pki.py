"""A test PKI generated per test session: server CA and certificate for localhost,
a client CA, and client certificates for every case the daemon must tell apart."""

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


class TestPKI:
    """Paths of every PEM file, plus helpers for clients."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server_ca, server_ca_key = self._authority("server-ca", "Test Server CA")
        self.client_ca, self.client_ca_key_obj = self._authority("client-ca", "Test Client CA")
        self.client_ca_key = root / "client-ca.key"
        other_ca, other_ca_key = self._authority("other-ca", "Test Client CA")  # same name, other key
        self.server_cert, self.server_key = self._leaf(
            "server", "localhost", self.server_ca, server_ca_key, server=True)
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

    def _authority(self, name: str, common_name: str) -> tuple[Path, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        path = self.root / f"{name}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        self._write_key(name, key)
        return path, key

    def _leaf(self, name: str, common_name: str, ca_path: Path, ca_key: Any, *, server: bool = False,
              email: str | None = None, not_before: datetime.datetime = NOW - DAY,
              not_after: datetime.datetime = NOW + 90 * DAY) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        authority = x509.load_pem_x509_certificate(ca_path.read_bytes())
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name, email)).issuer_name(authority.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        path = self.root / f"{name}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return path, self._write_key(name, key)

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


@pytest.fixture(scope="session")
def pki() -> Iterator[TestPKI]:
    with tempfile.TemporaryDirectory(prefix="mailappliance-pki-") as root:
        yield TestPKI(Path(root))
