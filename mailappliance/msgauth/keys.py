"""DKIM keys: ``<key_dir>/<domain>/<selector>.key`` (PEM, PKCS#8, mode 0600).

Each local domain signs with one Ed25519 and one RSA key at a time (RFC 8463
dual signing): the selectors named in ``[dkim] selectors``, or else the
newest key of each type.  Keys are read at start and on SIGHUP, so a new
selector takes over without a restart: generate it, publish its record,
check it (``mailappliance-admin dkim check``), then send SIGHUP.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailappliance.msgauth.settings import DkimSettings

DkimKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey  # the private keys DKIM signs with

KEY_TYPES = ("ed25519", "rsa")
ALGORITHMS = {"ed25519": "ed25519-sha256", "rsa": "rsa-sha256"}
RSA_BITS = 2048
MAX_KEY_FILE = 16 * 1024


@attrs.frozen
class SigningKey:
    """What dkim_check.sign needs of one key (kept here, not in dkim_check, so that
    mailappliance-admin reads keys without importing dkimpy and its resolver)."""
    domain: str
    selector: str
    algorithm: str  # "ed25519-sha256" or "rsa-sha256"
    private: bytes  # PEM (RSA) or base64 seed (Ed25519), as dkimpy takes them


@attrs.frozen
class KeyInfo:
    domain: str
    selector: str
    key_type: str  # "ed25519" or "rsa"
    path: Path
    modified: float
    public_record: str  # the TXT record's text: v=DKIM1; k=...; p=...
    signing: SigningKey


def dns_record(key: DkimKey) -> tuple[str, str]:
    """(type, TXT text) for a private key object."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519", f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return "rsa", f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def load_key(path: Path, domain: str, selector: str) -> KeyInfo:
    """One key file; ValueError (with the reason) when it cannot be used."""
    with open(path, "rb") as f:
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise ValueError("file too large for a key")
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    key_type, record = dns_record(key)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:  # RFC 8301: never sign with less
        raise ValueError(f"RSA key of {key.key_size} bits (at least 1024, better 2048)")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        private = base64.b64encode(seed)
    else:
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    return KeyInfo(domain, selector, key_type, path, path.stat().st_mtime, record,
                   SigningKey(domain, selector, ALGORITHMS[key_type], private))


def scan(key_dir: Path, domains: tuple[str, ...]) -> tuple[list[KeyInfo], list[str]]:
    """Every usable key of our domains, and a problem line for each unusable file."""
    keys, problems = [], []
    for domain in domains:
        folder = key_dir / domain
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.key")):
            try:
                keys.append(load_key(path, domain, path.name[:-4]))
            except (OSError, ValueError, TypeError) as e:
                problems.append(f"{path}: {e}")
    return keys, problems


def active(keys: list[KeyInfo], selectors: dict[str, tuple[str, ...]]) -> dict[str, list[KeyInfo]]:
    """The keys each domain signs with: its configured selectors, or the newest key of each type."""
    chosen: dict[str, list[KeyInfo]] = {}
    for domain in dict.fromkeys(k.domain for k in keys):
        mine = [k for k in keys if k.domain == domain]
        if domain in selectors:
            chosen[domain] = [k for name in selectors[domain] for k in mine if k.selector == name]
            continue
        picked = []
        for key_type in KEY_TYPES:
            of_type = [k for k in mine if k.key_type == key_type]
            if of_type:
                picked.append(max(of_type, key=lambda k: (k.modified, k.selector)))
        chosen[domain] = picked
    return {domain: keys for domain, keys in chosen.items() if keys}


class KeyStore:
    """The signing keys in use; ``reload()`` at start and on SIGHUP."""

    def __init__(self, settings: DkimSettings, domains: tuple[str, ...]) -> None:
        self._settings = settings
        self.domains = domains
        self.signing: dict[str, list[KeyInfo]] = {}
        self.problems: list[str] = []

    @property
    def settings(self) -> DkimSettings:
        return self._settings

    @settings.setter
    def settings(self, value: DkimSettings) -> None:  # the Reloader swaps [dkim] on SIGHUP
        self._settings = value
        self.reload()

    def reload(self) -> dict[str, list[KeyInfo]]:
        keys, self.problems = scan(self._settings.key_dir, self.domains)
        self.signing = active(keys, dict(self._settings.selectors)) if self._settings.sign else {}
        return self.signing

    def keys_for(self, domain: str) -> list[SigningKey]:
        return [k.signing for k in self.signing.get(domain.lower(), [])]


def is_selector(name: str) -> bool:
    """A DNS label sequence usable as a selector and as a file name."""
    labels = name.split(".")
    return len(name) <= 200 and all(
        label and len(label) <= 63 and label[0].isalnum() and all(c.isascii() and (c.isalnum() or c == "-")
                                                                   for c in label) for label in labels)


def generate(key_type: str) -> DkimKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def write_key(key_dir: Path, domain: str, selector: str, key: DkimKey, owner: tuple[int, int] | None) -> Path:
    """Write a new key file (never over an existing one), 0600, in a 0700 folder."""
    folder = key_dir / domain
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{selector}.key"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    if owner is not None and os.geteuid() == 0:
        for target in (key_dir, folder, path):
            os.chown(target, *owner)
    return path
