"""SASL PLAIN (RFC 4616) and LOGIN exchanges, as pure steps, for every protocol.

An exchange is fed client lines and answers with the next challenge, the
credentials it collected, or a failure of a named kind; the protocol only
shuttles lines and maps the outcome to its own replies (SMTP AUTH, RFC 4954;
POP3 AUTH, RFC 5034).  Credentials are decoded from UTF-8 here, once, at the
wire edge; the shared checker normalises passwords (SASLprep).
"""

from __future__ import annotations

import base64
import binascii
import enum

import attrs

MECHANISMS = ("PLAIN", "LOGIN")


@attrs.frozen
class Challenge:
    """Send the (base64) challenge and wait for the next line."""

    text: str


@attrs.frozen
class Collected:
    """The client said who it is; check these with the credential checker."""

    login: str
    password: str = attrs.field(repr=False)


class FailureKind(enum.Enum):
    CANCELLED = "cancelled"  # the client sent "*"
    BAD_ENCODING = "bad encoding"  # not base64, or not UTF-8
    MALFORMED = "malformed"  # not authzid NUL authcid NUL password, or acting for someone else
    UNSUPPORTED = "unsupported mechanism"


@attrs.frozen
class SaslFailure:
    """The exchange ended without credentials; ``reason`` is for the log only."""

    kind: FailureKind
    reason: str = ""
    login: str = ""


Step = Challenge | Collected | SaslFailure


def _decode(text: str) -> str | SaslFailure:
    if text == "*":
        return SaslFailure(FailureKind.CANCELLED, "client cancelled")
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return SaslFailure(FailureKind.BAD_ENCODING, "response is not base64-encoded UTF-8")


def _plain(decoded: str) -> Step:
    """RFC 4616: authzid NUL authcid NUL password; an authzid other than the
    login (acting for someone else) is not offered."""
    parts = decoded.split("\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return SaslFailure(FailureKind.MALFORMED, "malformed PLAIN message")
    authzid, login, password = parts
    if authzid and authzid != login:
        return SaslFailure(FailureKind.MALFORMED, f"authorization identity {authzid!r} not supported", login)
    return Collected(login, password)


class SaslExchange:
    """One AUTH command's exchange."""

    def __init__(self, mechanism: str, offered: tuple[str, ...] = MECHANISMS) -> None:
        self.mechanism = mechanism.upper()
        self._offered = offered
        self._login: str | None = None

    def start(self, initial_response: str | None) -> Step:
        if self.mechanism not in self._offered:
            return SaslFailure(FailureKind.UNSUPPORTED, f"mechanism {self.mechanism!r} not offered")
        if initial_response is None:
            return Challenge("" if self.mechanism == "PLAIN" else _b64("Username:"))
        return self.respond(initial_response)

    def respond(self, line: str) -> Step:
        decoded = _decode(line.strip())
        if isinstance(decoded, SaslFailure):
            return decoded
        if self.mechanism == "PLAIN":
            return _plain(decoded)
        if self._login is None:
            self._login = decoded
            return Challenge(_b64("Password:"))
        return Collected(self._login, decoded)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
