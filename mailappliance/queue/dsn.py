"""Delivery status notifications (RFC 3464 multipart/report) for the envelope sender."""

from __future__ import annotations

import email.utils
import os
import re
from typing import Iterable

import attrs

MAX_RETURNED_HEADER_BYTES = 64 * 1024


@attrs.frozen
class RecipientStatus:
    """One recipient's line in a report."""

    address: str
    action: str  # "failed" or "delayed"
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_host: str = ""


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


def recipient_status(address: str, action: str, code: int, text: str, remote_host: str = "") -> RecipientStatus:
    diagnostic = (f"{code} {text}".strip() if code else text).replace("\r", " ").replace("\n", " ")
    return RecipientStatus(address, action, enhanced_status(code, text, action), diagnostic, remote_host)


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
) -> bytes:
    """The report as CRLF bytes: a human part, message/delivery-status, the original headers."""
    statuses = list(statuses)
    delayed = all(s.action == "delayed" for s in statuses)
    boundary = f"{queue_id}/{os.urandom(6).hex()}/{reporting_host}"
    subject = "Delivery delayed" if delayed else "Undelivered Mail Returned to Sender"
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
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at {reporting_host}.",
        "",
    ]
    if delayed:
        lines += ["Your message has not been delivered yet to the recipients below.",
                  "The mail system will keep trying; you do not need to send it again.", ""]
    else:
        lines += ["Your message could not be delivered to the recipients below.",
                  "The mail system gave up; the reasons are listed.", ""]
    for s in statuses:
        lines.append(f"<{s.address}>: {s.diagnostic}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_host}",
        f"X-Mailappliance-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival_date, localtime=False)}",
    ]
    for s in statuses:
        lines += ["", f"Final-Recipient: rfc822; {s.address}", f"Action: {s.action}", f"Status: {s.status}"]
        if s.remote_host:
            lines.append(f"Remote-MTA: dns; {s.remote_host}")
        lines.append(f"Diagnostic-Code: smtp; {s.diagnostic}")
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    text = "\r\n".join(lines).encode("ascii", "replace") + b"\r\n"
    return text + _headers_of(original_message) + f"\r\n--{boundary}--\r\n".encode()
