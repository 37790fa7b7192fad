"""Client certificates for subscribers: loading, describing and issuing them."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def load_certificate_der(path: Path) -> bytes:
    """The DER bytes of the certificate in ``path`` (PEM or DER); ValueError if neither."""
    data = Path(path).read_bytes()
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            certificate = x509.load_der_x509_certificate(data)
        except ValueError:
            raise ValueError("not a PEM or DER X.509 certificate") from None
    return certificate.public_bytes(serialization.Encoding.DER)


class CertificateInfo(TypedDict):
    subject: str
    issuer: str
    serial: int
    not_before: str  # ISO 8601, UTC
    not_after: str
    sha256: str  # fingerprint, colon-separated hex


def describe_certificate(der: bytes) -> CertificateInfo:
    """What an admin wants to see of a stored certificate."""
    certificate = x509.load_der_x509_certificate(der)
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": certificate.serial_number,
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "sha256": ":".join(f"{b:02X}" for b in certificate.fingerprint(hashes.SHA256())),
    }


def issue_client_certificate(
    ca_cert_path: Path, ca_key_path: Path, common_name: str, email: str, days: int = 825
) -> tuple[bytes, bytes]:
    """A new key and a clientAuth certificate signed by the ISP's client CA: (key PEM, cert PEM)."""
    authority = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
    authority_key = serialization.load_pem_private_key(Path(ca_key_path).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                                 x509.NameAttribute(NameOID.EMAIL_ADDRESS, email)]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        .sign(authority_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)
