"""userPassword hashes as OpenLDAP writes them: {SSHA}, {SSHA512}, {ARGON2};
the one normal form of a password; the cost of a refused check.

The LDIF backend verifies these locally; new hashes are Argon2id, in the same
``{ARGON2}$argon2id$...`` form that OpenLDAP's argon2 module reads, so an LDIF
directory can be loaded into slapd unchanged.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import stringprep
import unicodedata
from collections.abc import Iterable

import nacl.exceptions
import nacl.pwhash
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_argon2 = PasswordHasher()  # argon2-cffi defaults: Argon2id, RFC 9106 low-memory profile

SUPPORTED_SCHEMES = ("SSHA", "SSHA512", "ARGON2")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def normalize_password(password: str) -> str:
    """The form of a password that is stored and checked: SASLprep (RFC 4013).

    Non-ASCII spaces become U+0020, the "mapped to nothing" characters (soft
    hyphen, zero-width joiners ...) are dropped, then Unicode NFKC (Unicode
    3.2, as the RFC says).  So "é" typed as one code point (most keyboards)
    or as "e" + combining accent (macOS input methods, some phones), and a
    fullwidth letter from an IME, are the same password.

    Why SASLprep's NFKC and not NFC (PRECIS OpaqueString, RFC 8265): ldap3
    applies exactly this SASLprep to every simple bind and Password Modify,
    so the LDAP backend has always worked this way, and the LDIF backend must
    agree with it or a directory moved to slapd (docs/admin.md) loses the
    passwords that differ.  NFKC's extra folding (fullwidth forms, ligatures,
    superscripts) costs a password almost nothing.  Used when a password is
    set (both backends) and when one is checked (:func:`password_candidates`,
    via the shared checker).
    """
    if password.isascii():
        return password  # no ASCII character is mapped, and NFKC keeps ASCII
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch
                     for ch in password if not stringprep.in_table_b1(ch))
    return unicodedata.ucd_3_2_0.normalize("NFKC", mapped)


def password_candidates(password: str) -> tuple[str, ...]:
    """What to try, in order, for an offered password: its normal form, then
    (only if that differs) the password as typed, so hashes stored before
    passwords were normalised (or set with tools that do not) keep working."""
    normal = normalize_password(password)
    return (normal,) if normal == password else (normal, password)


def prepare_password(password: str) -> str:
    """The normal form of a password being set; InvalidAddress if SASLprep
    prohibits it (control, private-use, non-character, surrogate or tagging
    code points, mixed bidi, nothing left).  Both backends refuse the same."""
    from ldap3.core.exceptions import LDAPSASLPrepError
    from ldap3.protocol.sasl.sasl import sasl_prep

    from mailappliance.directory import InvalidAddress

    normal = normalize_password(password)
    try:
        sasl_prep(normal)
    except LDAPSASLPrepError as e:
        message = str(e).replace("SASLprep error: ", "")
        raise InvalidAddress(f"the password cannot be used (RFC 4013): {message}") from None
    return normal


def validate_new_password(password: str) -> str:
    """A password an admin may set, normalised; InvalidAddress says why not:
    8 to 1024 characters, and nothing SASLprep prohibits (control characters ...)."""
    from mailappliance.directory import InvalidAddress

    normal = prepare_password(password)
    if len(normal) < MIN_PASSWORD_LENGTH:
        raise InvalidAddress(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(normal) > MAX_PASSWORD_LENGTH:
        raise InvalidAddress(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    return normal


def hash_password(password: str) -> str:
    """A new ``{ARGON2}`` (Argon2id) hash of ``password`` in its normal form."""
    return "{ARGON2}" + _argon2.hash(prepare_password(password))


def _argon2_verify(stored: str, secret: bytes) -> bool:
    """argon2-cffi's ``verify`` (raises the same errors), computed by libsodium where it can.

    The same hash, the same cost, half the CPU: libsodium's Argon2 (what Dovecot
    uses) checks argon2-cffi's default hash (64 MiB, t=3, 4 lanes) in ~75 ms of
    one core, where argon2-cffi's spends ~140-150 ms over four threads.  The
    hash is parsed first (a malformed one raises InvalidHashError, as before);
    what libsodium cannot check (another version, a hash under 16 or a salt
    under 8 bytes, Argon2i/d) goes to argon2-cffi."""
    parameters = extract_parameters(stored)  # InvalidHashError when malformed
    if (parameters.type is Type.ID and parameters.version == 19 and parameters.hash_len >= 16
            and parameters.salt_len >= 8 and len(stored) <= 127):
        try:
            return nacl.pwhash.verify(stored.encode("ascii"), secret)
        except nacl.exceptions.InvalidkeyError:
            raise VerifyMismatchError("libsodium: the password does not match") from None
    return _argon2.verify(stored, secret)


@functools.cache
def _dummy_hash() -> str:
    """An Argon2id hash of a random secret nobody knows, made once, with the
    parameters of :func:`hash_password`."""
    return _argon2.hash(os.urandom(24).hex())


def spend_a_check(password: str) -> bool:
    """Cost what checking ``password`` against a stored Argon2 hash costs, then say no.

    For a login that has no subscriber or no usable hash: answering such a
    login at once (1 ms instead of ~150 ms) tells an attacker which logins exist.
    """
    try:
        _argon2_verify(_dummy_hash(), password.encode("utf-8", "surrogatepass"))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        pass
    return False


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


def _check(stored: str, password: str) -> tuple[bool, bool]:
    """(matches, an Argon2 hash was computed) for one stored value."""
    if not password:
        return False, False
    scheme = scheme_of(stored)
    body = stored[len(scheme) + 2 :] if scheme else ""
    secret = password.encode("utf-8", "surrogatepass")
    if scheme == "SSHA":
        return _salted_sha(body, secret, "sha1", 20), False
    if scheme == "SSHA512":
        return _salted_sha(body, secret, "sha512", 64), False
    if scheme == "ARGON2":
        try:
            return _argon2_verify(body, secret), True
        except (VerifyMismatchError, VerificationError):
            return False, True
        except InvalidHashError:
            return False, False
    return False, False


def verify_password(stored: str, password: str) -> bool:
    """True if ``password`` matches the stored userPassword value.

    Unknown schemes and cleartext values never match: a directory that holds
    cleartext passwords is a misconfiguration, not something to honour.
    """
    return _check(stored, password)[0]


def verify_stored(stored: Iterable[str], password: str) -> bool:
    """True if ``password`` matches one of a subscriber's stored values.

    A refusal always costs at least one Argon2 check, whatever was stored
    (nothing, a broken value, a fast {SSHA}), so it takes as long as one for
    a login that does not exist (:func:`spend_a_check`).
    """
    costly = False
    for value in stored:
        matched, hashed = _check(value, password)
        if matched:
            return True
        costly = costly or hashed
    if not costly:
        spend_a_check(password)
    return False
