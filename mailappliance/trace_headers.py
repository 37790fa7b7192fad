"""The trace headers we prepend: Return-Path and Received (RFC 5321 4.4)."""

from __future__ import annotations

import email.utils
import re
import time

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
_UNSAFE_IN_COMMENT = re.compile(r"[^\x20-\x7e]|[()\\]")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]|\\")


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
    client_name: str | None = None,
    tls: str | None = None,
) -> bytes:
    """A folded ``Received:`` header ending with CRLF, as admins read them when tracing::

        Received: from helo.example (mail.example.net [192.0.2.7])
        \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
        \tby mx.example.org (mailappliance) with ESMTPS id 1795...

    ``client_name`` is the client's forward-confirmed reverse name ("unknown"
    when it has none or the lookup did not answer in time); ``tls`` the
    ``tls_description`` of the connection.  ``for <rcpt>`` is added only for a
    single recipient, so one message does not disclose its whole recipient list.
    """
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip  # RFC 5321 4.1.3 address literal
    lines = [f"Received: from {_clean(helo)} ({_clean(client_name or 'unknown')} [{_clean(literal)}])"]
    if tls:
        lines.append(f"\t({_clean(tls, _UNPRINTABLE)})")  # our own words: balanced parentheses
    by = f"\tby {hostname} (mailappliance) with {protocol} id {message_id}"
    if authenticated_as:
        by += f"\r\n\t(authenticated as {_clean(authenticated_as, _UNSAFE_IN_COMMENT)})"
    lines.append(by)
    date = _date(timestamp)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")  # UTF-8 only in a recipient of an SMTPUTF8 message


_last_date: tuple[int, str] = (-1, "")


def _date(timestamp: float | None) -> str:
    """The RFC 5322 date of ``timestamp`` (now when None), formatted once per second."""
    global _last_date
    second = int(time.time() if timestamp is None else timestamp)
    last = _last_date
    if last[0] != second:
        last = _last_date = (second, email.utils.formatdate(second, localtime=False, usegmt=False))
    return last[1]


def return_path_header(sender: str) -> bytes:
    """``sender`` is a parsed path: printable, UTF-8 only with SMTPUTF8 (RFC 6532)."""
    return f"Return-Path: <{sender}>\r\n".encode()


def tls_description(transport: object) -> str | None:
    """"using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" for a TLS
    transport (Postfix's wording), None without TLS."""
    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    try:
        version = connection.get_protocol_version_name()  # type: ignore[union-attr]
        cipher = connection.get_cipher_name()  # type: ignore[union-attr]
        bits = connection.get_cipher_bits()  # type: ignore[union-attr]
    except Exception:  # not an OpenSSL connection (plain TCP, a test transport)
        return None
    if not cipher:
        return None
    return f"using {version} with cipher {cipher}" + (f" ({bits}/{bits} bits)" if bits else "")
