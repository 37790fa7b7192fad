"""Strict parsing of SMTP reverse-paths and forward-paths (RFC 5321 4.1.2).

The parser keeps everything a relay decision needs to see (source route,
quoted local part, address literal) instead of normalising it away, so that
:mod:`mailappliance.policy` can refuse relay tricks explicitly.
"""

from __future__ import annotations

import re

import attrs

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
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?")

MAX_LOCAL_PART = 64
# SRS addresses (mailappliance.srs) carry a whole address in their local part, so
# they may be longer (within MAX_PATH), as Postfix and others accept them.
_SRS_LOCAL = re.compile(r"srs[01][=+-]", re.IGNORECASE)
MAX_DOMAIN = 255
MAX_PATH = 256


class PathSyntaxError(ValueError):
    """The path is not valid RFC 5321 syntax."""


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

    @property
    def address(self) -> str:
        """``local@domain`` as given (domain lower-cased), '' for the null path."""
        if self.is_null:
            return ""
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part


def parse_path(text: str, allow_null: bool) -> MailPath:
    """Parse ``<...>``; raises PathSyntaxError with a short human reason."""
    if not (text.startswith("<") and text.endswith(">")):
        raise PathSyntaxError("address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return MailPath()
        raise PathSyntaxError("empty address")
    if len(text) > MAX_PATH:
        raise PathSyntaxError("address too long")
    match = _MAILBOX.fullmatch(inner)
    if match is None:
        raise PathSyntaxError("malformed address")
    local, domain = match["local"], (match["domain"] or "").lower()
    if (len(local) > MAX_LOCAL_PART and not _SRS_LOCAL.match(local)) or len(domain) > MAX_DOMAIN:
        raise PathSyntaxError("address too long")
    route = tuple(r.lstrip("@").lower() for r in (match["route"] or "").rstrip(":").split(",") if r)
    return MailPath(local_part=local, domain=domain, source_route=route, quoted=local.startswith('"'))


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
