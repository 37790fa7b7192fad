"""Comparing what a client got with the SMTP reply constants the server uses."""

from __future__ import annotations

from mailappliance.smtp.replies import Reply


def answered(answer: tuple[int, bytes] | str, reply: Reply) -> bool:
    """True if ``answer`` is ``reply``: the same code and enhanced status, and a text
    that ends with the reply's (the server may put an address or its name first).
    ``answer`` is smtplib's (code, text) or one reply line as a server wrote it."""
    if isinstance(answer, str):
        code, _, text = answer.rstrip("\r\n").partition(" ")
        answer = (int(code), text.encode())
    code, text = answer
    status, _, rest = text.decode(errors="replace").partition(" ")
    if not reply.status:
        status, rest = "", text.decode(errors="replace")
    return (code, status) == (reply.code, reply.status) and rest.endswith(reply.text)
