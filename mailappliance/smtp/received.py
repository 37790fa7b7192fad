"""The trace headers we prepend: Return-Path and Received (RFC 5321 4.4)."""

from __future__ import annotations

import email.utils
import re

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
_UNSAFE_IN_COMMENT = re.compile(r"[^\x20-\x7e]|[()\\]")


def _clean(text: str, pattern: re.Pattern[str] = _UNSAFE) -> str:
    """Make client-supplied text safe inside a header (no spaces, parentheses or controls)."""
    return pattern.sub("?", text)[:255] or "unknown"


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    message_id: str,
    recipients: list[str],
    authenticated_as: str | None = None,
    timestamp: float | None = None,
) -> bytes:
    """A folded ``Received:`` header ending with CRLF.

    ``for <rcpt>`` is added only for a single recipient, so one message does
    not disclose its whole recipient list.
    """
    lines = [f"Received: from {_clean(helo)} ([{client_ip}])"]
    by = f"\tby {hostname} (mailappliance) with {protocol} id {message_id}"
    if authenticated_as:
        by += f"\r\n\t(authenticated as {_clean(authenticated_as, _UNSAFE_IN_COMMENT)})"
    lines.append(by)
    date = email.utils.formatdate(timestamp, localtime=False, usegmt=False)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def return_path_header(sender: str) -> bytes:
    return f"Return-Path: <{sender}>\r\n".encode("ascii", "replace")
