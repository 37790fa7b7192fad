"""Strict parsing of SMTP reverse-paths and forward-paths (RFC 5321 4.1.2).

The parser keeps everything a relay decision needs to see (source route,
quoted local part, address literal) instead of normalising it away, so that
:mod:`mailappliance.policy` can refuse relay tricks explicitly.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import attrs
import idna

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"

_MAILBOX = re.compile(
    rf"(?P<route>{_ROUTE})?(?P<local>{_DOT_STRING}|{_QUOTED})(?:@(?P<domain>{_DOMAIN}|{_LITERAL}))?"
)
# RFC 6531 3.3: with SMTPUTF8, atext also takes any UTF-8 character beyond ASCII
_UTF8_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]"
_UTF8_DOT_STRING = rf"{_UTF8_ATEXT}+(?:\.{_UTF8_ATEXT}+)*"
_UTF8_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_UTF8_MAILBOX = re.compile(
    rf"(?P<route>{_ROUTE})?(?P<local>{_UTF8_DOT_STRING}|{_UTF8_QUOTED})(?:@(?P<domain>{_DOMAIN}|{_LITERAL}))?"
)
# characters no address may carry even with SMTPUTF8: controls, separators, unassigned,
# private use, the replacement character (undecodable input) and bidi overrides (spoofing)
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_FORBIDDEN = frozenset("\ufffd\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?")

MAX_LOCAL_PART = 64
# SRS addresses (mailappliance.srs) carry a whole address in their local part, so
# they may be longer (within MAX_PATH), as Postfix and others accept them.
_SRS_LOCAL = re.compile(r"srs[01][=+-]", re.IGNORECASE)
MAX_DOMAIN = 255
MAX_PATH = 256


class PathSyntaxError(ValueError):
    """The path is not valid RFC 5321 syntax."""


class NonAsciiAddress(PathSyntaxError):
    """A UTF-8 address in a transaction without SMTPUTF8 (553 5.6.7, RFC 6531 3.5)."""


@attrs.frozen
class MailPath:
    """A parsed path; ``is_null`` for ``<>``; ``domain`` is '' for bare ``<postmaster>``."""

    local_part: str = ""
    domain: str = ""
    source_route: tuple[str, ...] = ()
    quoted: bool = False

    @property
    def is_null(self) -> bool:
        return not self.local_part and not self.domain

    @property
    def is_address_literal(self) -> bool:
        return self.domain.startswith("[")

    @functools.cached_property
    def address(self) -> str:
        """``local@domain`` as given (domain lower-cased), '' for the null path (made once:
        a transaction asks for it several times)."""
        if self.is_null:
            return ""
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part


def parse_path(text: str, allow_null: bool, utf8: bool = False) -> MailPath:
    """Parse ``<...>``; raises PathSyntaxError with a short human reason.

    ``utf8`` (the transaction has SMTPUTF8): the local part may hold UTF-8
    (normalised to NFC) and the domain U-labels, which become A-labels, so
    that every domain inside the appliance (config, routing, DNS) is ASCII.
    Without it a non-ASCII address raises NonAsciiAddress.
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise PathSyntaxError("address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return MailPath()
        raise PathSyntaxError("empty address")
    if len(text.encode("utf-8")) > MAX_PATH:
        raise PathSyntaxError("address too long")
    pattern = _MAILBOX
    if not inner.isascii():
        if not utf8:
            raise NonAsciiAddress("non-ASCII address without SMTPUTF8")
        inner, pattern = _internationalised(inner), _UTF8_MAILBOX
    match = pattern.fullmatch(inner)
    if match is None:
        raise PathSyntaxError("malformed address")
    local, domain = match["local"], (match["domain"] or "").lower()
    if (len(local.encode("utf-8")) > MAX_LOCAL_PART and not _SRS_LOCAL.match(local)) or len(domain) > MAX_DOMAIN:
        raise PathSyntaxError("address too long")
    route = tuple(r.lstrip("@").lower() for r in (match["route"] or "").rstrip(":").split(",") if r)
    return MailPath(local_part=local, domain=domain, source_route=route, quoted=local.startswith('"'))


def _internationalised(inner: str) -> str:
    """A UTF-8 mailbox in NFC with its domain's U-labels turned into A-labels (IDNA 2008)."""
    inner = unicodedata.normalize("NFC", inner)
    if any(c in _FORBIDDEN or unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in inner if not c.isascii()):
        raise PathSyntaxError("forbidden character in address")
    local, at, domain = inner.rpartition("@")
    if not at or domain.isascii():
        return inner
    if domain.startswith("["):
        raise PathSyntaxError("malformed address literal")
    try:
        ascii_domain = idna.encode(domain.lower()).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise PathSyntaxError("malformed internationalised domain") from None
    return f"{local}@{ascii_domain}"


def domain_for_display(domain: str) -> str:
    """The U-label form of an A-label domain (for people), or the domain as it is."""
    if "xn--" not in domain:
        return domain
    try:
        return idna.decode(domain)
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


def split_command_argument(argument: str, keyword: str) -> tuple[str, list[str]]:
    """Split ``FROM:<path> PARAMS`` into the path text and parameter list.

    Tolerates a space after the colon (common in the wild) but nothing else.
    """
    if not argument[: len(keyword) + 1].upper() == keyword + ":":
        raise PathSyntaxError(f"expected {keyword}:<address>")
    rest = argument[len(keyword) + 1 :].lstrip(" ")
    if rest.startswith("<"):
        end = _end_of_path(rest)
        path, params = rest[: end + 1], rest[end + 1 :]
        if params and not params.startswith(" "):
            raise PathSyntaxError("missing space after address")
    else:
        raise PathSyntaxError("address must be enclosed in <>")
    parameters = params.split()
    for parameter in parameters:
        if not _PARAM.fullmatch(parameter):
            raise PathSyntaxError(f"malformed parameter {parameter[:32]!r}")
    return path, parameters


def _end_of_path(text: str) -> int:
    """Index of the '>' that closes the path, skipping quoted strings."""
    if '"' not in text:  # nearly every path: no quoted local part to skip
        end = text.find(">")
        if end < 0:
            raise PathSyntaxError("missing '>'")
        return end
    in_quotes = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return i
    raise PathSyntaxError("missing '>'")
