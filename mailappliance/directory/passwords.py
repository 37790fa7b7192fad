"""userPassword hashes as OpenLDAP writes them: {SSHA}, {SSHA512}, {ARGON2}.

The LDIF backend verifies these locally; new hashes are Argon2id, in the same
``{ARGON2}$argon2id$...`` form that OpenLDAP's argon2 module reads, so an LDIF
directory can be loaded into slapd unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_argon2 = PasswordHasher()  # argon2-cffi defaults: Argon2id, RFC 9106 low-memory profile

SUPPORTED_SCHEMES = ("SSHA", "SSHA512", "ARGON2")


def hash_password(password: str) -> str:
    """A new ``{ARGON2}`` (Argon2id) hash of ``password``."""
    return "{ARGON2}" + _argon2.hash(password)


def _salted_sha(stored: str, password: bytes, algorithm: str, digest_size: int) -> bool:
    try:
        raw = base64.b64decode(stored, validate=True)
    except ValueError:
        return False
    if len(raw) <= digest_size:
        return False
    digest, salt = raw[:digest_size], raw[digest_size:]
    return hmac.compare_digest(hashlib.new(algorithm, password + salt).digest(), digest)


def make_ssha(password: str, algorithm: str = "sha1") -> str:
    """An {SSHA}/{SSHA512} hash; only for tests and for interoperability checks."""
    salt = os.urandom(8)
    digest = hashlib.new(algorithm, password.encode() + salt).digest()
    scheme = "SSHA" if algorithm == "sha1" else "SSHA512"
    return "{%s}%s" % (scheme, base64.b64encode(digest + salt).decode())


def scheme_of(stored: str) -> str | None:
    """The ``{SCHEME}`` name of a stored hash, upper-cased, or None."""
    if stored.startswith("{") and "}" in stored:
        return stored[1 : stored.index("}")].upper()
    return None


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches the stored userPassword value.

    Unknown schemes and cleartext values never match: a directory that holds
    cleartext passwords is a misconfiguration, not something to honour.
    """
    if not password:
        return False
    scheme = scheme_of(stored)
    body = stored[len(scheme) + 2 :] if scheme else ""
    secret = password.encode("utf-8")
    if scheme == "SSHA":
        return _salted_sha(body, secret, "sha1", 20)
    if scheme == "SSHA512":
        return _salted_sha(body, secret, "sha512", 64)
    if scheme == "ARGON2":
        try:
            return _argon2.verify(body, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
    return False
