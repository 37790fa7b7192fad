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
