"""Finding 10: a directory entry whose uid cannot name a Maildir is refused at
RCPT with a temporary error that names the entry; the session never just drops."""

from __future__ import annotations

import smtplib
from typing import Callable

import pytest

from mailappliance.smtp import replies
from tests.daemon import Appliance

ENTRY = """
dn: uid={uid},ou=people,dc=example,dc=org
objectClass: top
objectClass: person
objectClass: organizationalPerson
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: {uid}
cn: Escape
sn: Escape
mail: {mail}
"""


@pytest.mark.parametrize("uid, mail", [("../escape", "escape@example.org"), (".dot", "dot@example.org")])
def test_an_unsafe_uid_is_refused_at_rcpt_and_logged(appliance: Callable[..., Appliance], uid: str,
                                                      mail: str) -> None:
    """RCPT for the entry gets 451 4.3.5 (fixable by the admin, so the sender retries),
    the log names the entry, and the session carries on."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="pw-alice-1").returncode == 0
    ldif = instance.root / "users.ldif"
    ldif.write_text(ldif.read_text() + ENTRY.format(uid=uid, mail=mail))
    instance.start()
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("s@example.net")
        code, text = smtp.rcpt(mail)
        assert (code, text[:5]) == (replies.MAILBOX_MISCONFIGURED.code, replies.MAILBOX_MISCONFIGURED.status.encode())
        assert smtp.rcpt("alice@example.org")[0] == 250  # the session survives
        assert smtp.data(b"Subject: x\r\n\r\nhello\r\n")[0] == 250
    assert f"has an unsafe uid '{uid}'" in instance.log()
    assert not (instance.root / "escape").exists()
