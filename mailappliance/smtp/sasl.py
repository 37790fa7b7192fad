"""SASL PLAIN (RFC 4616) and LOGIN exchanges for SMTP AUTH (RFC 4954), as pure steps.

An exchange is fed client lines and answers with the next challenge, the
credentials it collected, or an error; the protocol only shuttles lines.
"""

from __future__ import annotations

import base64
import binascii

import attrs

MECHANISMS = ("PLAIN", "LOGIN")


@attrs.frozen
class Challenge:
    """Send ``334 <text>`` and wait for the next line."""

    text: str


@attrs.frozen
class Collected:
    """The client said who it is; check these with the credential checker."""

    login: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class SaslFailure:
    """The exchange ended without credentials."""

    code: int
    status: str
    text: str


Step = Challenge | Collected | SaslFailure

CANCELLED = SaslFailure(501, "5.0.0", "Authentication cancelled")
BAD_BASE64 = SaslFailure(501, "5.5.2", "Cannot decode response")
MALFORMED = SaslFailure(535, "5.7.8", "Authentication credentials invalid")


def _decode(text: str) -> str | SaslFailure:
    if text == "*":
        return CANCELLED
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return BAD_BASE64


def _plain(decoded: str) -> Step:
    parts = decoded.split("\0")
    if len(parts) != 3:
        return MALFORMED
    authzid, login, password = parts
    if authzid and authzid != login:
        return MALFORMED  # acting for someone else is not offered
    return Collected(login, password)


class SaslExchange:
    """One AUTH command's exchange."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        self._login: str | None = None

    def start(self, initial_response: str | None) -> Step:
        if self.mechanism not in MECHANISMS:
            return SaslFailure(504, "5.5.4", "Unrecognized authentication type")
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
