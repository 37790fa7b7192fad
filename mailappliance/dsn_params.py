"""MAIL and RCPT parameters: SIZE, BODY, SMTPUTF8 and DSN's RET, ENVID, NOTIFY, ORCPT.

Pure parsing (facts in, verdict out): the session passes the parameter words
and gets either the parsed values or a :class:`ParameterError` of a named kind,
which the protocol maps to its answer (see smtp/replies.py); the outbound
queue uses the same values and xtext codec for the next hop.

- DSN (RFC 3461): ``RET=FULL|HDRS`` and ``ENVID=<xtext>`` on MAIL,
  ``NOTIFY=NEVER|SUCCESS,FAILURE,DELAY`` and ``ORCPT=<addr-type>;<xtext>``
  on RCPT.  Values are kept decoded; :func:`xtext_encode` and
  :func:`orcpt_parameter` make them wire text again for the next hop.
- ``BODY=7BIT|8BITMIME``; BINARYMIME (RFC 3030) is not offered, so
  ``BODY=BINARYMIME`` is refused like any unknown body type: a binary body
  would need bare CR and LF, which we refuse everywhere (SMTP smuggling).
- ``SMTPUTF8`` (RFC 6531): no value; it allows UTF-8 in the addresses and
  the header of this one transaction.

A parameter given twice is a syntax error (RFC 3461 4; RFC 5321 4.1.2 says
nothing, and the second value would otherwise silently win).
"""

from __future__ import annotations

import re

import attrs

NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # octets of the xtext (RFC 3461 4.4)
MAX_ORCPT = 500  # octets of the whole value (RFC 3461 4.2)
ORCPT_TYPES = ("rfc822", "utf-8")  # utf-8: RFC 6533, for SMTPUTF8 addresses
_XTEXT_CHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]")
_HEX = re.compile(r"\+([0-9A-F]{2})")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


class ParameterError(ValueError):
    """A parameter that cannot be used: ``kind`` is SYNTAX, TOO_BIG or UNSUPPORTED,
    ``text`` what to tell the client."""

    SYNTAX, TOO_BIG, UNSUPPORTED = "syntax", "too big", "unsupported"

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


def _syntax(text: str) -> ParameterError:
    return ParameterError(ParameterError.SYNTAX, f"Error: {text}")


def xtext_decode(text: str) -> str:
    """RFC 3461 4: ``+HH`` (upper-case hex) stands for one octet; the rest is
    printable ASCII other than ``+`` and ``=``.  The result must be printable ASCII."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "+":
            match = _HEX.match(text, i)
            if match is None:
                raise _syntax("bad xtext escape")
            out.append(chr(int(match[1], 16)))
            i += 3
            continue
        if not _XTEXT_CHAR.match(text[i]):
            raise _syntax("bad xtext character")
        out.append(text[i])
        i += 1
    decoded = "".join(out)
    if not all(0x20 <= ord(c) < 0x7F for c in decoded):
        raise _syntax("xtext must decode to printable ASCII")
    return decoded


def xtext_encode(text: str) -> str:
    """The xtext of printable ASCII ``text`` (anything else is escaped octet by octet)."""
    return "".join(c if _XTEXT_CHAR.match(c) else "".join(f"+{b:02X}" for b in c.encode("utf-8"))
                   for c in text)


def utf8_addr_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: ASCII, with ``\\x{HEX}`` for non-ASCII and for ``+ = \\``."""
    return "".join(c if (0x21 <= ord(c) < 0x7F and c not in "+=\\") else f"\\x{{{ord(c):X}}}" for c in address)


@attrs.frozen
class Orcpt:
    """The original recipient a client named (RFC 3461 4.2), decoded."""

    addr_type: str  # "rfc822" or "utf-8"
    address: str

    def parameter(self) -> str:
        """The ``ORCPT=`` value for the next hop."""
        if self.addr_type == "utf-8" or not self.address.isascii():
            return f"utf-8;{utf8_addr_xtext(self.address)}"
        return f"rfc822;{xtext_encode(self.address)}"

    def field(self) -> str:
        """The value of an ``Original-Recipient:`` field in a report."""
        return f"{self.addr_type}; {self.address}"

    def stored(self) -> str:
        return f"{self.addr_type};{self.address}"

    @classmethod
    def from_stored(cls, text: str) -> Orcpt | None:
        addr_type, semicolon, address = text.partition(";")
        return cls(addr_type, address) if semicolon and address else None


def parse_orcpt(value: str) -> Orcpt:
    """``rfc822;<xtext>`` or (RFC 6533) ``utf-8;<utf-8-addr-xtext>``."""
    if len(value.encode("utf-8")) > MAX_ORCPT:
        raise _syntax("ORCPT too long")
    addr_type, semicolon, encoded = value.partition(";")
    addr_type = addr_type.lower()
    if not semicolon or not encoded or addr_type not in ORCPT_TYPES:
        raise _syntax("ORCPT must be rfc822;address or utf-8;address")
    if addr_type == "utf-8":
        try:
            address = _UNICODE_ESCAPE.sub(lambda m: chr(int(m[1], 16)), encoded)
        except (ValueError, OverflowError):
            raise _syntax("bad ORCPT escape") from None
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\ufffd" for c in address):
            raise _syntax("bad ORCPT character")
    else:
        address = xtext_decode(encoded)
    return Orcpt(addr_type, address)


def parse_notify(value: str) -> tuple[str, ...]:
    """``NEVER`` alone, or a list of SUCCESS, FAILURE, DELAY (each at most once)."""
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or any(w not in NOTIFY_EVENTS for w in words) or len(set(words)) != len(words):
        raise _syntax("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return tuple(w for w in NOTIFY_EVENTS if w in words)


@attrs.frozen
class MailParameters:
    """What MAIL's parameters asked for."""

    size: int = 0  # declared SIZE (0: none)
    body: str = ""  # "7BIT", "8BITMIME" or "" (not given)
    smtputf8: bool = False
    ret: str = ""  # "FULL", "HDRS" or "" (not given: our default, headers only)
    envid: str = ""  # decoded


@attrs.frozen
class RecipientParameters:
    """What one RCPT's parameters asked for."""

    notify: tuple[str, ...] = ()  # () not given: FAILURE,DELAY by default (RFC 3461 4.1)
    orcpt: Orcpt | None = None

    def wants(self, event: str) -> bool:
        """Should we report ``event`` ("SUCCESS", "FAILURE", "DELAY") for this recipient?"""
        if not self.notify:
            return event != "SUCCESS"
        return event in self.notify

    @property
    def notify_text(self) -> str:
        return ",".join(self.notify)


def notify_wants(notify_text: str, event: str) -> bool:
    """:meth:`RecipientParameters.wants` for the stored comma-separated form."""
    return RecipientParameters(tuple(w for w in notify_text.split(",") if w)).wants(event)


def _split(parameters: list[str]) -> list[tuple[str, str, bool]]:
    seen: set[str] = set()
    out = []
    for parameter in parameters:
        name, equals, value = parameter.partition("=")
        name = name.upper()
        if name in seen:
            raise _syntax(f"duplicate {name} parameter")
        seen.add(name)
        out.append((name, value, bool(equals)))
    return out


def parse_mail_parameters(parameters: list[str], max_size: int, dsn: bool = True,
                          smtputf8: bool = True) -> MailParameters:
    """MAIL's parameters -> MailParameters; ParameterError otherwise."""
    found: dict[str, object] = {}
    for name, value, has_value in _split(parameters):
        if name == "SIZE":
            if not value.isdigit() or not value.isascii() or len(value) > 20:
                raise _syntax("bad SIZE parameter")
            if int(value) > max_size:
                raise ParameterError(ParameterError.TOO_BIG, "Error: message size exceeds fixed limit")
            found["size"] = int(value)
        elif name == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise _syntax("BODY must be 7BIT or 8BITMIME (BINARYMIME is not offered)")
            found["body"] = value.upper()
        elif name == "SMTPUTF8" and smtputf8:
            if has_value:
                raise _syntax("SMTPUTF8 takes no value")
            found["smtputf8"] = True
        elif name == "RET" and dsn:
            if value.upper() not in ("FULL", "HDRS"):
                raise _syntax("RET must be FULL or HDRS")
            found["ret"] = value.upper()
        elif name == "ENVID" and dsn:
            if not value or len(value) > MAX_ENVID:
                raise _syntax(f"ENVID must be 1 to {MAX_ENVID} characters of xtext")
            found["envid"] = xtext_decode(value)
        else:
            raise ParameterError(ParameterError.UNSUPPORTED, "Error: unsupported MAIL parameter")
    return MailParameters(**found)  # type: ignore[arg-type]


def parse_rcpt_parameters(parameters: list[str], dsn: bool = True) -> RecipientParameters:
    """RCPT's parameters -> RecipientParameters; ParameterError otherwise."""
    found: dict[str, object] = {}
    for name, value, _ in _split(parameters):
        if name == "NOTIFY" and dsn:
            found["notify"] = parse_notify(value)
        elif name == "ORCPT" and dsn:
            found["orcpt"] = parse_orcpt(value)
        else:
            raise ParameterError(ParameterError.UNSUPPORTED, "Error: unsupported RCPT parameter")
    return RecipientParameters(**found)  # type: ignore[arg-type]
