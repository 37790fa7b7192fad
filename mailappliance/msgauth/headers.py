"""The header section of a received message: split, read, and rewritten.

Bounded and byte-exact: fields are kept as the raw bytes the client sent
(with their folding), so a rewrite touches only the fields it removes or
replaces, and DKIM signatures over the others stay valid.
"""

from __future__ import annotations

import re

import attrs

MAX_HEAD = 1024 * 1024  # a header section beyond this is not parsed (the message is treated as having none)
MAX_FIELDS = 2000

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_COMMENT = re.compile(r"\([^()]*\)")


@attrs.frozen
class Field:
    name: str  # lower case; "" for a line that is not a field (kept, never interpreted)
    raw: bytes  # the whole field with its folded lines and final CRLF

    @property
    def value(self) -> bytes:
        """The unfolded value, without the name, the colon and the final CRLF."""
        _, _, value = self.raw.partition(b":")
        return value.replace(b"\r\n", b"").strip()

    def text(self) -> str:
        return self.value.decode("utf-8", "replace")


def head_length(message: bytes) -> int:
    """Length of the header section including the empty line that ends it; the
    whole message when there is no body (or the section is over ``MAX_HEAD``)."""
    if message.startswith(b"\r\n"):
        return 2
    end = message.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    return len(message) if end < 0 else end + 4


def parse_fields(head: bytes) -> list[Field]:
    """The fields of a header section (the empty line at its end is not a field)."""
    if head.endswith(b"\r\n\r\n"):
        head = head[:-2]
    elif head == b"\r\n":
        return []
    fields: list[Field] = []
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.raw + line + b"\r\n")
            continue
        match = _FIELD_NAME.match(line)
        name = match.group(1).decode("ascii").lower() if match else ""
        fields.append(Field(name, line + b"\r\n"))
        if len(fields) > MAX_FIELDS:
            break
    return fields


def values(fields: list[Field], name: str) -> list[str]:
    return [field.text() for field in fields if field.name == name]


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 2.2), lower
    case, without comments, quotes or a trailing dot."""
    text = value
    for _ in range(8):  # nested comments: innermost first
        text, count = _COMMENT.subn(" ", text)
        if not count:
            break
    token = text.split(";", 1)[0].strip().split()
    first = token[0] if token else ""
    return first.strip('"').rstrip(".").lower()


def render(fields: list[Field]) -> bytes:
    return b"".join(field.raw for field in fields) + b"\r\n"


def header_line(name: str, value: str) -> bytes:
    """A header field of ours, folded at the "; " and ", " we put in it (lines
    stay under 998 octets), ending with CRLF."""
    text = f"{name}: {value}"
    pieces = re.split(r"(?<=;) ", text)
    lines, current = [], ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > 76:
            lines.append(current)
            current = "\t" + piece
        else:
            current = f"{current} {piece}" if current else piece
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
