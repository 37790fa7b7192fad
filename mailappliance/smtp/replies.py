"""SMTP replies with their enhanced status codes (RFC 3463), named once.

The client-facing text lives here; why a reply was given goes to the log,
never into the reply.  Tests use the same constants.
"""

from __future__ import annotations

import attrs

from mailappliance.dsn_params import ParameterError
from mailappliance.verdicts import Verdict


@attrs.frozen
class Reply:
    code: int
    status: str
    text: str

    def with_text(self, text: str) -> Reply:
        return attrs.evolve(self, text=text)

    @property
    def permanent(self) -> bool:
        return self.code >= 500


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
BYE = Reply(221, "2.0.0", "Bye")

TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
SERVICE_BUSY = Reply(421, "4.7.0", "Try again later")
TEMP_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary lookup failure, try again later")
MAILBOX_MISCONFIGURED = Reply(451, "4.3.5", "Mailbox unavailable (configuration problem), try again later")
STORAGE_UNAVAILABLE = Reply(451, "4.3.0", "Error: local storage unavailable, try again later")
DELIVERY_FAILED = Reply(451, "4.3.0", "Error: local delivery failed, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
NETWORK_BUDGET = Reply(452, "4.7.1", "Too much mail from your network, try again later")
CLIENT_DEFERRED = Reply(450, "4.7.1", "Client host rejected: cannot confirm your hostname, try again later")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed logins, try again later")

NOT_RECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
MAIL_IN_PROGRESS = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
AUTH_DNS_TEMPFAIL = Reply(451, "4.4.3", "Temporary DNS failure checking the sender's authentication, try again later")
FILTER_UNAVAILABLE = Reply(451, "4.7.1", "Content filter unavailable, try again later")
SPAM_DEFERRED = Reply(451, "4.7.1", "Message deferred by the content filter, try again later")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
TLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
SRS_INVALID = Reply(550, "5.1.1", "Recipient address rejected: invalid or expired SRS address")
MAILBOX_DISABLED = Reply(550, "5.2.1", "Recipient address rejected: Mailbox disabled")
DMARC_REJECTED = Reply(550, "5.7.1", "Message rejected: it fails the DMARC policy of its From domain")
SPF_REJECTED = Reply(550, "5.7.23", "Message rejected: SPF validation failed")
SPAM_REJECTED = Reply(550, "5.7.1", "Message rejected as spam")
SUBMISSION_SUSPENDED = Reply(550, "5.7.1", "Sending suspended: mail from this account was classified as spam; "
                                           "contact your provider")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Error: bare CR or LF in message; lines must end with CRLF")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
MAILBOX_FULL_DATA = Reply(552, "5.2.2", "Mailbox full")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (a mail loop?)")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8 (RFC 6531)")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
RECIPIENT_REJECTED = Reply(554, "5.7.1", "Recipient address rejected")
ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")
CLIENT_REFUSED = Reply(554, "5.7.1", "Client host rejected: Access denied")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")

# -- verdicts of the pure decision modules, by rule ------------------------------

LIMIT_REPLIES = {
    "limit.max_connections": Reply(421, "4.7.0", "Server busy, try again later"),
    "limit.concurrent_per_address": Reply(421, "4.7.0", "Too many connections from your address"),
    "limit.concurrent_per_network": Reply(421, "4.7.0", "Too many connections from your network"),
    "limit.connections_per_minute": Reply(421, "4.7.0", "Too many connections, slow down"),
    "limit.messages_per_hour": Reply(450, "4.7.1", "Sending limit reached (messages per hour), try again later"),
    "limit.recipients_per_hour": Reply(452, "4.7.1", "Sending limit reached (recipients per hour), try again later"),
    "limit.recipients_per_message": Reply(452, "4.5.3", "Too many recipients for one message"),
}
RELAY_REPLIES = {
    "relay.denied": RELAY_DENIED,
    "relay.null_recipient": Reply(501, "5.1.3", "Bad recipient address syntax"),
}


def for_limit(verdict: Verdict) -> Reply:
    """The reply to a reached limit (a temporary one for a rule we do not know)."""
    return LIMIT_REPLIES.get(verdict.rule, Reply(451, "4.7.0", "Try again later"))


def for_relay(verdict: Verdict) -> Reply:
    """The reply to a refused recipient; the logged reason never goes to the client."""
    return RELAY_REPLIES.get(verdict.rule, RECIPIENT_REJECTED)


def for_parameter_error(error: ParameterError) -> Reply:
    """The reply to a MAIL or RCPT parameter that cannot be used."""
    if error.kind == ParameterError.TOO_BIG:
        return MESSAGE_TOO_BIG
    if error.kind == ParameterError.UNSUPPORTED:
        return Reply(555, "5.5.4", error.text)
    return Reply(501, "5.5.4", error.text)


def encode(reply: Reply) -> bytes:
    """The reply as it goes on the wire: each line with its code, "-" before every line
    but the last, and the enhanced status code (RFC 2034)."""
    known = _ENCODED.get(id(reply))
    if known is not None and known[0] is reply:
        return known[1]
    lines = reply.text.split("\n")
    prefix = f"{reply.status} " if reply.status else ""
    last = len(lines) - 1
    return "".join([f"{reply.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
                    for i, line in enumerate(lines)]).encode("utf-8")


# The replies above, encoded once (the busy ones: 250 after MAIL and RCPT, 354), by identity.
_ENCODED: dict[int, tuple[Reply, bytes]] = {}
_ENCODED.update((id(r), (r, encode(r))) for r in [*globals().values(), *LIMIT_REPLIES.values(),
                                                   *RELAY_REPLIES.values()] if isinstance(r, Reply))
