"""LDIF parsing and writing (RFC 2849 subset)."""

from __future__ import annotations

import pytest

from mailappliance.directory.ldif_format import Entry, LdifSyntaxError, format_ldif, parse_ldif

SAMPLE = """# comment
version: 1

dn: uid=alice,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
cn:: QWxpY2Ugw4lsYW4=
description: a very long value that is folded
  onto a second line
userCertificate;binary:: AAEC/w==
"""


def test_parse_handles_base64_folding_and_binary() -> None:
    [entry] = parse_ldif(SAMPLE)
    assert entry.dn == "uid=alice,ou=people,dc=example,dc=org"
    assert entry.first("cn") == "Alice Élan"
    assert entry.first("description") == "a very long value that is folded onto a second line"
    assert entry.values("userCertificate;binary") == [b"\x00\x01\x02\xff"]


def test_round_trip() -> None:
    entries = parse_ldif(SAMPLE)
    entries[0].add("mailLocalAddress", " leading space")
    entries[0].add("note", "x" * 200)
    again = parse_ldif(format_ldif(entries, "# header"))
    assert again == entries


@pytest.mark.parametrize(
    "text, where",
    [
        ("cn: x\n", "line 1"),
        ("dn: a=b\nchangetype: add\n", "line 2"),
        ("dn: a=b\ncn x\n", "line 2"),
        ("dn: a=b\ncn:: ***\n", "line 2"),
        ("dn: a=b\ndn: c=d\n", "line 2"),
    ],
)
def test_syntax_errors_name_the_line(text: str, where: str) -> None:
    with pytest.raises(LdifSyntaxError, match=where):
        parse_ldif(text)


def test_entry_remove_is_case_insensitive() -> None:
    entry = Entry("uid=a,dc=x", [("mailLocalAddress", "A@x.org"), ("mail", "a@x.org")])
    assert entry.remove("maillocaladdress", "a@X.org") == 1
    assert entry.attributes == [("mail", "a@x.org")]


UNSAFE_CHARACTERS = [chr(c) for c in range(0x00, 0x20)] + ["\x7f", "\x85", "\u2028", "\u2029", "é"]


@pytest.mark.parametrize("character", UNSAFE_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_values_with_any_control_or_non_ascii_character_are_base64_and_round_trip(character: str) -> None:
    """Every value that is not a strict SAFE-STRING is written base64 and reads back whole."""
    value = f"Mallory{character}mailLocalAddress: alice@example.org"
    entry = Entry("uid=mallory,dc=x", [("cn", value), ("uid", "mallory")])
    text = format_ldif([entry])
    assert "cn:: " in text and character not in text.replace("\n", "")
    assert parse_ldif(text) == [entry]


@pytest.mark.parametrize("value, plain", [
    ("Alice Liddell", True), ("a", True), ("x:y<z", True),
    (" lead", False), (":colon", False), ("<url", False), ("trail ", False),
    ("tab\there", False), ("\x1cfs", False), ("del\x7f", False), ("Élan", False),
])
def test_plain_lines_only_for_printable_ascii_values(value: str, plain: bool) -> None:
    """Only printable ASCII values that cannot be misread are written as 'attr: value'."""
    from mailappliance.directory.ldif_format import is_plain_value

    assert is_plain_value(value) is plain
    assert (f"cn: {value}" in format_ldif([Entry("cn=x", [("cn", value)])])) is plain


def test_reader_splits_only_at_lf_and_crlf() -> None:
    """A raw value holding \\v, \\f, \\x1c-\\x1e, \\x85 or U+2028 stays one value (str.splitlines() would split)."""
    text = "dn: uid=m,dc=x\r\ncn: M\x0b\x0c\x1c\x1d\x1e\x85\u2028mail: a@x.org\r\nuid: m\n"
    [entry] = parse_ldif(text)
    assert entry.attributes == [("cn", "M\x0b\x0c\x1c\x1d\x1e\x85\u2028mail: a@x.org"), ("uid", "m")]
    assert entry.texts("mail") == []


def test_lone_carriage_return_is_a_syntax_error_naming_the_line() -> None:
    """A CR that does not end a line is refused, not guessed at."""
    with pytest.raises(LdifSyntaxError, match="line 2"):
        parse_ldif("dn: uid=m,dc=x\ncn: a\rmail: b@x.org\n")
