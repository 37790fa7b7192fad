"""SMTPUTF8 (RFC 6531/6532) into the directory and the mailbox, with the LDIF file and a
real slapd: UTF-8 addresses are stored as UTF-8 (LDIF: base64 values; LDAP:
mailUTF8Address, because mail and mailLocalAddress are ASCII-only IA5String), found in
any Unicode normal form and case, and refused without SMTPUTF8."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from mailappliance.smtp import replies
from tests.daemon import Appliance
from tests.esmtp_client import RawSMTP

MESSAGE = "From: Pelé <pelé@remote.example>\r\nSubject: grüße\r\n\r\nhallo Jörg\r\n".encode()


@pytest.fixture(params=["ldif", "ldap"])
def utf8_directory(request: pytest.FixtureRequest, appliance: Callable[..., Appliance]) -> Appliance:
    slapd = request.getfixturevalue("slapd") if request.param == "ldap" else None
    instance = appliance(backend=request.param, slapd=slapd, start=False, extra={"server": {
        "local_domains": ["example.org", "example.net", "bücher.example"]}})  # an IDN domain: its A-label
    added = instance.admin("user", "add", "Jo\u0308rg@example.org", "--uid", "joerg", password="joerg-password")
    assert added.returncode == 0, added.stderr
    assert instance.admin("alias", "add", "joerg", "jürgen@bücher.example").returncode == 0
    instance.start()
    return instance


def test_utf8_addresses_are_stored_as_utf8_and_receive_mail(utf8_directory: Appliance) -> None:
    """The admin adds jörg@ (typed decomposed) and an alias with an IDN; both are stored in NFC UTF-8
    (A-label domain); mail for them in another normal form and case arrives once, with SMTPUTF8 only."""
    instance = utf8_directory
    shown = instance.admin("user", "show", "joerg")
    assert shown.returncode == 0 and "jörg@example.org" in shown.stdout, shown.stdout
    if instance.slapd is None:
        ldif = (instance.root / "users.ldif").read_text()
        assert "mail:: " + base64.b64encode("jörg@example.org".encode()).decode() in ldif
    else:
        conn = instance.slapd.admin_connection()
        conn.search(instance.slapd.base_dn, "(uid=joerg)", attributes=["mailUTF8Address", "mail"])
        [entry] = conn.entries
        assert sorted(entry.mailUTF8Address.values) == ["jörg@example.org", "jürgen@xn--bcher-kva.example"]
        assert not entry.mail.values  # IA5String: no UTF-8 there
    with RawSMTP("127.0.0.1", instance.ports["mx"]) as smtp:
        smtp.ehlo()
        assert smtp.command("MAIL FROM:<pelé@remote.example>")[0] == replies.NON_ASCII_ADDRESS.code
        assert smtp.command("MAIL FROM:<pelé@remote.example> SMTPUTF8")[0] == 250
        assert smtp.command("RCPT TO:<JÖRG@example.org>")[0] == 250
        assert smtp.command("RCPT TO:<ju\u0308rgen@Bücher.example>")[0] == 250
        assert smtp.command("RCPT TO:<jürgen@xn--bcher-kva.example>")[0] == 250
        code, lines = smtp.command("RCPT TO:<nobody-ö@example.org>")
        assert (code, lines[-1][:5]) == (550, "5.1.1")
        assert smtp.data(MESSAGE)[0] == 250
    [stored] = list((instance.maildir_root / "joerg" / "new").iterdir())
    data = stored.read_bytes()
    assert data.endswith(MESSAGE) and b" with UTF8SMTP id " in data
    assert "Return-Path: <pelé@remote.example>".encode() in data
    assert "Delivered-To: jörg@example.org".encode() in data


def test_no_utf8_without_smtputf8(utf8_directory: Appliance) -> None:
    """A client that did not say SMTPUTF8 gets 553 5.6.7 for a UTF-8 recipient, and nothing is stored."""
    with RawSMTP("127.0.0.1", utf8_directory.ports["mx"]) as smtp:
        smtp.ehlo()
        assert smtp.command("MAIL FROM:<someone@remote.example>")[0] == 250
        code, lines = smtp.command("RCPT TO:<jörg@example.org>")
        assert (code, lines[-1][:5]) == (553, "5.6.7")
    assert not list(utf8_directory.maildir_root.glob("joerg/new/*"))
