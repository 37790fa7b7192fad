"""Delivery status notifications (RFC 3464 multipart/report) for the envelope sender.

Failure, delay and success reports (RFC 3461: ``delivered`` on local
delivery, ``relayed`` to a next hop without DSN) carry what the client asked
for: ENVID as Original-Envelope-Id, each ORCPT as Original-Recipient, and
RET=FULL the whole message (up to :data:`MAX_RETURNED_MESSAGE_BYTES`, else
the header).  A report about a UTF-8 address is a
``message/global-delivery-status`` in UTF-8 (RFC 6533).
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Iterable

import attrs

MAX_RETURNED_HEADER_BYTES = 64 * 1024
MAX_RETURNED_MESSAGE_BYTES = 10 * 1024 * 1024  # RET=FULL: larger messages come back as their header
SUCCESS_ACTIONS = ("delivered", "relayed", "expanded")


@attrs.frozen
class RecipientStatus:
    """One recipient's line in a report."""

    address: str
    action: str  # "failed", "delayed", or a success: "delivered", "relayed", "expanded"
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_host: str = ""
    original_recipient: str = ""  # DSN ORCPT as "rfc822; addr" (Original-Recipient)


_ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w.])")
EXPIRED = "4.4.7"  # RFC 3463: delivery time expired


def enhanced_status(code: int, text: str, action: str) -> str:
    """The RFC 3463 status of one recipient's outcome: the enhanced code the remote server
    (or our own reason, "5.1.10 ... null MX", "4.4.1 connection failed") gave, the last
    attempt's when we gave up, "4.4.7" for a give-up without one, else the reply code's
    class with .0.0 (a server that sends no enhanced codes)."""
    found = _ENHANCED.search(text)
    if found:
        return found.group(0)
    if not code and text.startswith("gave up"):
        return EXPIRED
    if 200 <= code < 600:
        return f"{code // 100}.0.0"
    return "5.0.0" if action == "failed" else "4.0.0"


def recipient_status(address: str, action: str, code: int, text: str, remote_host: str = "",
                     original_recipient: str = "") -> RecipientStatus:
    diagnostic = (f"{code} {text}".strip() if code else text).replace("\r", " ").replace("\n", " ")
    return RecipientStatus(address, action, enhanced_status(code, text, action), diagnostic, remote_host,
                           _one_line(original_recipient))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:500]


def _headers_of(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    headers = message if end < 0 else message[: end + 2]
    return headers[:MAX_RETURNED_HEADER_BYTES]


def build_dsn(
    *,
    reporting_host: str,
    original_sender: str,
    queue_id: str,
    arrival_date: float,
    statuses: Iterable[RecipientStatus],
    original_message: bytes,
    envid: str = "",
    return_full: bool = False,
) -> bytes:
    """The report as CRLF bytes: a human part, message/delivery-status, the original
    headers (``return_full``: the whole original message, when it is not too big)."""
    statuses = list(statuses)
    delayed = all(s.action == "delayed" for s in statuses)
    success = all(s.action in SUCCESS_ACTIONS for s in statuses)
    utf8 = not all((s.address + s.original_recipient + original_sender).isascii() for s in statuses)
    boundary = f"{queue_id}/{os.urandom(6).hex()}/{reporting_host}"
    subject = "Delivery delayed" if delayed else \
        "Successful Mail Delivery Report" if success else "Undelivered Mail Returned to Sender"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_host}>",
        f"To: <{original_sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <{queue_id}.dsn.{os.urandom(4).hex()}@{reporting_host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        f"Content-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}",
        "",
        f"This is the mail system at {reporting_host}.",
        "",
    ]
    if delayed:
        lines += ["Your message has not been delivered yet to the recipients below.",
                  "The mail system will keep trying; you do not need to send it again.", ""]
    elif success:
        lines += ["Your message was delivered to the recipients below, as you asked to be told",
                  "(a recipient marked relayed was handed to a mail system that does not report further).", ""]
    else:
        lines += ["Your message could not be delivered to the recipients below.",
                  "The mail system gave up; the reasons are listed.", ""]
    for s in statuses:
        lines.append(f"<{s.address}>: {s.diagnostic}")
    lines += [
        "",
        f"--{boundary}",
        f"Content-Type: message/{'global-' if utf8 else ''}delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_host}",
    ]
    if envid:
        lines.append(f"Original-Envelope-Id: {_one_line(envid)[:100]}")
    lines += [
        f"X-Mailappliance-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival_date, localtime=False)}",
    ]
    for s in statuses:
        lines.append("")
        if s.original_recipient:
            lines.append(f"Original-Recipient: {s.original_recipient}")
        kind = "rfc822" if s.address.isascii() else "utf-8"
        lines += [f"Final-Recipient: {kind}; {s.address}", f"Action: {s.action}", f"Status: {s.status}"]
        if s.remote_host:
            lines.append(f"Remote-MTA: dns; {s.remote_host}")
        if s.diagnostic:
            lines.append(f"Diagnostic-Code: smtp; {s.diagnostic}")
    full = return_full and len(original_message) <= MAX_RETURNED_MESSAGE_BYTES
    returned = "message/rfc822" if full else "text/rfc822-headers"
    if utf8:
        returned = "message/global" if full else "message/global-headers"
    lines += ["", f"--{boundary}", f"Content-Type: {returned}", ""]
    text = "\r\n".join(lines).encode("utf-8" if utf8 else "ascii", "replace") + b"\r\n"
    original = original_message if full else _headers_of(original_message)
    if full and not original.endswith(b"\r\n"):
        original += b"\r\n"
    return text + original + f"\r\n--{boundary}--\r\n".encode()
