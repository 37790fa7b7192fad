"""Server TLS for every listener: one reloadable context factory.

- TLS 1.2 minimum, AEAD ciphers with forward secrecy, server preference,
  no compression, no renegotiation.  In TLS 1.3 too AES-128-GCM comes first
  (OpenSSL's default puts AES-256-GCM-SHA384 first): the handshake's hashing
  and key schedule with SHA-256 cost ~8 % less server CPU per handshake
  (docs/performance.md "Submission sessions"), at the strength our TLS 1.2 list
  already prefers.
- Client certificates are *asked for* (when a client CA is configured) but
  never required, and a bad one never fails the handshake: the verify
  callback accepts everything and records the verdict per connection, so an
  unknown, expired or foreign certificate simply grants nothing and the
  client may still log in with a password.
- ``reload()`` (SIGHUP) builds a new context; Twisted asks ``getContext()``
  for every new connection, so new sessions get the new certificate while
  open ones keep theirs.
- Session resumption stays on (it saves a full handshake per reconnect).
  OpenSSL keeps the client certificate in the session, but the verify
  callback runs only in a full handshake, so a resumed session comes without
  a verdict: ``client_certificate`` then verifies the certificate again
  against the connection's own client-CA store (see ``_reverify``).
"""

from __future__ import annotations

import datetime
import os
import weakref
from pathlib import Path
from typing import TypeGuard, cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory, ISSLTransport, ISystemHandle, ITransport
from zope.interface import implementer

CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


class TLSConfigError(Exception):
    """A certificate or key file is missing or unusable; the message names it."""


@attrs.frozen
class ClientCertificate:
    """What a client presented, and whether it counts (chains to our CA, in validity)."""

    der: bytes = attrs.field(repr=False)
    subject: str
    issuer: str
    serial: int
    verified: bool
    reason: str = ""


@attrs.define
class _Verdict:
    ok: bool = True
    reason: str = ""


# OpenSSL X509_V_ERR_* codes worth naming in logs (pyOpenSSL no longer exposes the strings)
VERIFY_ERRORS = {
    2: "unable to get issuer certificate", 7: "certificate signature failure",
    9: "certificate is not yet valid", 10: "certificate has expired",
    18: "self-signed certificate", 19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate (not signed by our client CA)",
    21: "unable to verify the first certificate", 22: "certificate chain too long",
    26: "unsupported certificate purpose",
}
# errors found while building the chain, which OpenSSL reports before a wrong purpose
_CHAIN_ERRORS = {2, 18, 19, 20, 21}
_UNSUPPORTED_PURPOSE, _CHAIN_TOO_LONG = 26, 22

_verdicts: weakref.WeakKeyDictionary[SSL.Connection, _Verdict] = weakref.WeakKeyDictionary()


def _failed(errno: int, depth: int) -> _Verdict:
    return _Verdict(ok=False, reason=f"{VERIFY_ERRORS.get(errno, f'verify error {errno}')} (depth {depth})")


def _record_verification(connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int,
                         ok: int) -> bool:
    """Accept every handshake; remember whether the chain really verified."""
    verdict = _verdicts.setdefault(connection, _Verdict())
    if not ok and verdict.ok:
        failed = _failed(errno, depth)
        verdict.ok, verdict.reason = failed.ok, failed.reason
    return True


def _fit_for_client_auth(certificate: x509.Certificate) -> bool:
    """The leaf checks of OpenSSL's "ssl_client" purpose: extended and plain key usage."""
    extensions = certificate.extensions
    try:
        extended = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if not {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(extended):
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
        return usage.digital_signature or usage.key_agreement
    except x509.ExtensionNotFound:
        return True


def _reverify(connection: SSL.Connection, peer: crypto.X509) -> _Verdict:
    """The verdict for a resumed session, whose handshake never ran the verify callback.

    The session still holds the client's certificate (and, resumed from the
    server's cache, its chain); it is verified again against the client-CA
    store of the context the connection came from, with the handshake's
    depth limit and the leaf's purpose, so a certificate refused in the full
    handshake is refused again for the same reason.  (pyOpenSSL cannot attach
    the verdict to the session itself: SSL_SESSION ex-data is not exposed.)
    """
    context = connection.get_context()
    store = context.get_cert_store()
    if store is None:
        return _Verdict(ok=False, reason="not verified (no client CA store)")
    intermediates = connection.get_peer_cert_chain() or []
    verifier = crypto.X509StoreContext(store, peer, intermediates)
    fit = _fit_for_client_auth(peer.to_cryptography())
    try:
        chain = verifier.get_verified_chain()
    except crypto.X509StoreContextError as e:
        errno, depth = int(e.errors[0]), int(e.errors[1])
        if errno not in _CHAIN_ERRORS and not fit:
            return _failed(_UNSUPPORTED_PURPOSE, 0)
        return _failed(errno, depth)
    if not fit:
        return _failed(_UNSUPPORTED_PURPOSE, 0)
    if len(chain) > context.get_verify_depth() + 2:  # depth counts the CAs between leaf and anchor, plus one
        return _failed(_CHAIN_TOO_LONG, len(chain) - 1)
    return _Verdict()


def fingerprint(certificate_path: Path) -> str:
    """SHA-256 fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    certificate = x509.load_pem_x509_certificate(Path(certificate_path).read_bytes())
    return ":".join(f"{b:02X}" for b in certificate.fingerprint(hashes.SHA256()))


def _private_directory(path: Path, owner: tuple[int, int] | None) -> None:
    """Create ``path`` 0700 (owned by ``owner`` when given) if it is missing.

    Missing parents get the default mode: they may also hold the spool and
    the Maildirs, which the daemon's user must be able to reach.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:  # made meanwhile by someone else: theirs
        return
    os.chmod(path, 0o700)  # whatever the umask
    if owner is not None:
        os.chown(path, *owner)


def ensure_self_signed(certificate_path: Path, key_path: Path, hostname: str,
                       owner: tuple[int, int] | None = None) -> bool:
    """Create a self-signed certificate when neither file exists; True if created.

    Directories it creates are 0700 and the key 0600 (the certificate is
    public: 0644); with ``owner`` (uid, gid), root hands all of them to the
    user the daemon will run as, so SIGHUP can re-read them after --uid.
    """
    certificate_path, key_path = Path(certificate_path), Path(key_path)
    have_cert, have_key = certificate_path.exists(), key_path.exists()
    if have_cert and have_key:
        return False
    if have_cert != have_key:
        present, missing = (certificate_path, key_path) if have_cert else (key_path, certificate_path)
        raise TLSConfigError(f"{present} exists but {missing} does not: provide both or neither")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(hostname)] + ([x509.DNSName("localhost")] if hostname != "localhost" else [])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _private_directory(key_path.parent, owner)
    _private_directory(certificate_path.parent, owner)
    for path, mode, data in (
        (key_path, 0o600, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())),
        (certificate_path, 0o644, certificate.public_bytes(serialization.Encoding.PEM)),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
    return True


def _load_chain(path: Path) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise TLSConfigError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TLSConfigError(f"{path}: not a PEM certificate ({e})") from None
    return chain


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """The IOpenSSLContextFactory shared by every listener (STARTTLS, STLS, 465, 995)."""

    def __init__(self, certificate_path: Path, private_key_path: Path, client_ca_path: Path | None = None) -> None:
        self.certificate_path = Path(certificate_path)
        self.private_key_path = Path(private_key_path)
        self.client_ca_path = Path(client_ca_path) if client_ca_path else None
        self._context = self._build()

    @property
    def asks_for_client_certificates(self) -> bool:
        return self.client_ca_path is not None

    def _build(self) -> SSL.Context:
        chain = _load_chain(self.certificate_path)
        if not chain:
            raise TLSConfigError(f"{self.certificate_path}: no certificate found")
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        context.set_cipher_list(CIPHERS.encode())
        context.set_tls13_ciphersuites(TLS13_CIPHERSUITES.encode())
        context.set_session_id(b"mailappliance")
        try:
            context.use_certificate(crypto.X509.from_cryptography(chain[0]))
            for extra in chain[1:]:
                context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
            context.use_privatekey_file(str(self.private_key_path))
            context.check_privatekey()
        except SSL.Error as e:
            raise TLSConfigError(
                f"{self.private_key_path}: unusable private key or it does not match {self.certificate_path} ({e})"
            ) from None
        if self.client_ca_path is not None:
            authorities = _load_chain(self.client_ca_path)
            store = context.get_cert_store()
            assert store is not None
            for authority in authorities:
                store.add_cert(crypto.X509.from_cryptography(authority))
                context.add_client_ca(crypto.X509.from_cryptography(authority))
            context.set_verify(SSL.VERIFY_PEER, _record_verification)
            context.set_verify_depth(4)
        return context

    def getContext(self) -> SSL.Context:
        return self._context

    def reload(self) -> str:
        """Re-read the files; keep the old context if the new files are unusable."""
        self._context = self._build()
        return fingerprint(self.certificate_path)


def is_tls(transport: object) -> TypeGuard[ISSLTransport]:
    return ISSLTransport.providedBy(transport)


def client_certificate(transport: ITransport | None) -> ClientCertificate | None:
    """The verified-or-not certificate the client presented; None if it sent none."""
    if not is_tls(transport):
        return None
    # ISSLTransport types these as objects: Twisted's TLS transport gives pyOpenSSL's
    peer = cast(crypto.X509 | None, transport.getPeerCertificate())
    if peer is None:
        return None
    certificate = peer.to_cryptography()
    connection = cast(SSL.Connection, cast(ISystemHandle, transport).getHandle())
    verdict = _verdicts.get(connection)
    if verdict is None:
        if connection.get_context().get_verify_mode() == SSL.VERIFY_NONE:
            verdict = _Verdict(ok=False, reason="not verified (no client CA configured)")
        else:  # a client CA asked for it, yet no verdict: a resumed session
            verdict = _verdicts[connection] = _reverify(connection, peer)
    ok, reason = verdict.ok, verdict.reason
    now = datetime.datetime.now(datetime.UTC)
    if ok and not (certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc):
        ok, reason = False, "certificate is not within its validity period"
    return ClientCertificate(
        der=certificate.public_bytes(serialization.Encoding.DER),
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        serial=certificate.serial_number,
        verified=ok,
        reason=reason,
    )
