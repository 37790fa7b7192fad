"""POP3 answers to verdicts and login outcomes (RFC 2449 response codes), named once.

Client-facing text lives here; why something was refused goes to the log only.
"""

from __future__ import annotations

from mailappliance.authenticator import LoginResult
from mailappliance.sasl import FailureKind
from mailappliance.verdicts import Verdict

LIMIT_TEXTS = {
    "limit.max_connections": "[SYS/TEMP] Server busy, try again later",
    "limit.concurrent_per_address": "[SYS/TEMP] Too many connections from your address",
    "limit.concurrent_per_network": "[SYS/TEMP] Too many connections from your network",
    "limit.connections_per_minute": "[SYS/TEMP] Too many connections, slow down",
}
SASL_FAILURES = {
    FailureKind.CANCELLED: "Authentication cancelled",
    FailureKind.BAD_ENCODING: "Invalid base64 data",
    FailureKind.MALFORMED: "[AUTH] Authentication failed",
    FailureKind.UNSUPPORTED: "Unsupported authentication mechanism",
}
LOGIN_FAILURES = {
    LoginResult.REFUSED: "[AUTH] Authentication failed",
    LoginResult.THROTTLED: "[LOGIN-DELAY] Too many failed logins, try again later",
    LoginResult.IN_USE: "[IN-USE] Mailbox is locked by another session",
    LoginResult.TEMPORARY: "[SYS/TEMP] Directory unavailable, try again later",
}
INTERNAL_ERROR = "[SYS/TEMP] Internal error, try again later"
TAKEN_OVER = "[IN-USE] Mailbox opened by a newer session, closing"


def for_limit(verdict: Verdict) -> str:
    """The -ERR text for a reached connection limit."""
    return LIMIT_TEXTS.get(verdict.rule, "[SYS/TEMP] Try again later")
