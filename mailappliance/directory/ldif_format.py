"""Reading and writing LDIF content records (RFC 2849), enough for a directory file.

An entry is a DN plus an ordered list of (attribute, value) pairs; values are
``str`` when they are text and ``bytes`` when they are binary (``;binary``
attributes, or base64 values that are not UTF-8).  Change records are refused:
the file is a snapshot of the directory, not a change log.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

import attrs

Value = str | bytes

# What we write as a plain ``attr: value`` line: RFC 2849's SAFE-STRING minus
# every control character (the RFC lets \x0b \x0c \x1c-\x1e through, and many
# line splitters, Python's str.splitlines() among them, break lines there).
# Anything else is written base64 (``attr:: ...``), which RFC 2849 allows for any value.
_PLAIN_VALUE = re.compile(r"[\x21-\x39\x3b\x3d-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


class LdifSyntaxError(ValueError):
    """The file is not LDIF we understand; the message names the line."""


@attrs.define
class Entry:
    """One LDIF content record."""

    dn: str
    attributes: list[tuple[str, Value]] = attrs.Factory(list)

    def values(self, name: str) -> list[Value]:
        """Every value of attribute ``name`` (case-insensitive, options kept distinct)."""
        wanted = name.lower()
        return [v for a, v in self.attributes if a.lower() == wanted]

    def texts(self, name: str) -> list[str]:
        """The text values of ``name`` (binary values skipped)."""
        return [v for v in self.values(name) if isinstance(v, str)]

    def first(self, name: str) -> str:
        texts = self.texts(name)
        return texts[0] if texts else ""

    def add(self, name: str, value: Value) -> None:
        self.attributes.append((name, value))

    def remove(self, name: str, value: Value | None = None) -> int:
        """Drop values of ``name`` (all, or those equal to ``value``, text compared
        case-insensitively); returns how many were dropped."""
        wanted = name.lower()

        def matches(a: str, v: Value) -> bool:
            if a.lower() != wanted:
                return False
            if value is None:
                return True
            if isinstance(v, str) and isinstance(value, str):
                return v.lower() == value.lower()
            return v == value

        before = len(self.attributes)
        self.attributes = [(a, v) for a, v in self.attributes if not matches(a, v)]
        return before - len(self.attributes)


def physical_lines(text: str) -> list[str]:
    """The lines of an LDIF text: split at LF or CRLF only (RFC 2849 SEP).

    Never ``str.splitlines()``: it also splits at \\v, \\f, \\x1c-\\x1e, \\x85 and
    U+2028/2029, which would let a value smuggle in a line of its own.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Unfold continuation lines; yields (first physical line number, line); '' separates records."""
    current: list[str] = []
    start = 0
    for number, raw in enumerate(physical_lines(text), start=1):
        if "\r" in raw:
            raise LdifSyntaxError(f"line {number}: a carriage return inside a line (values with one must be base64)")
        if raw.startswith(" ") and current:
            current.append(raw[1:])
            continue
        if current:
            yield start, "".join(current)
            current = []
        if raw.startswith("#"):
            continue
        if not raw.strip():
            yield number, ""
            continue
        current, start = [raw], number
    if current:
        yield start, "".join(current)


def _parse_value(number: int, line: str) -> tuple[str, Value]:
    if ":" not in line:
        raise LdifSyntaxError(f"line {number}: expected 'attribute: value', got {line[:40]!r}")
    name, rest = line.split(":", 1)
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*(;[A-Za-z0-9-]+)*", name):
        raise LdifSyntaxError(f"line {number}: bad attribute name {name!r}")
    if rest.startswith(":"):
        try:
            raw = base64.b64decode(rest[1:].strip(), validate=True)
        except ValueError:
            raise LdifSyntaxError(f"line {number}: bad base64 value for {name}") from None
        if ";binary" in name.lower():
            return name, raw
        try:
            return name, raw.decode("utf-8")
        except UnicodeDecodeError:
            return name, raw
    if rest.startswith("<"):
        raise LdifSyntaxError(f"line {number}: URL values ('{name}:<') are not supported")
    return name, rest.lstrip(" ")


def parse_ldif(text: str) -> list[Entry]:
    """Parse LDIF content records; raises LdifSyntaxError naming the line."""
    entries: list[Entry] = []
    current: Entry | None = None
    for number, line in _logical_lines(text):
        if not line:
            current = None
            continue
        name, value = _parse_value(number, line)
        lower = name.lower()
        if current is None:
            if lower == "version" and not entries:
                continue
            if lower != "dn":
                raise LdifSyntaxError(f"line {number}: a record must start with 'dn:', got {name!r}")
            if not isinstance(value, str) or not value:
                raise LdifSyntaxError(f"line {number}: empty or binary DN")
            current = Entry(dn=value)
            entries.append(current)
            continue
        if lower == "changetype":
            raise LdifSyntaxError(f"line {number}: change records are not supported in a directory file")
        if lower == "dn":
            raise LdifSyntaxError(f"line {number}: second 'dn:' in one record (missing blank line?)")
        current.add(name, value)
    return entries


def is_plain_value(value: str) -> bool:
    """True if ``value`` may be written as ``attr: value``: printable ASCII, not
    starting with a space, ':' or '<', not ending with a space (a strict SAFE-STRING)."""
    return _PLAIN_VALUE.fullmatch(value) is not None


def _format_line(name: str, value: Value) -> str:
    if isinstance(value, str) and not value:
        line = f"{name}:"
    elif isinstance(value, str) and is_plain_value(value):
        line = f"{name}: {value}"
    else:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        line = f"{name}:: {base64.b64encode(raw).decode()}"
    return _fold(line)


def _fold(line: str, width: int = 76) -> str:
    if len(line) <= width:
        return line
    parts = [line[:width]]
    rest = line[width:]
    while rest:
        parts.append(" " + rest[: width - 1])
        rest = rest[width - 1 :]
    return "\n".join(parts)


def format_ldif(entries: Iterable[Entry], header: str = "") -> str:
    """Serialise entries as LDIF (version 1), long lines folded at 76 columns."""
    blocks = [header.rstrip("\n") + "\n" if header else "", "version: 1\n"]
    for entry in entries:
        lines = [_format_line("dn", entry.dn)]
        lines += [_format_line(a, v) for a, v in entry.attributes]
        blocks.append("\n" + "\n".join(lines) + "\n")
    return "".join(blocks)
