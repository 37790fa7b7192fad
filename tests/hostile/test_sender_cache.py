"""An authenticated session's sender verdict is remembered for its last sender
(``MailTransaction._sender_refusal``): an attacker with one stolen login must not
get a forged sender accepted by first sending as the account's own address.

Forms of the own address that name someone else (a source route, a quoted local
part) and other subscribers' addresses are refused whatever was accepted before
them in the same session, and the own address is accepted again after a refusal.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from typing import Any

from mailappliance.smtp.replies import SENDER_NOT_OWNED
from tests.daemon import Appliance
from tests.replies import answered


def test_a_remembered_sender_verdict_never_accepts_a_forgery(appliance: Callable[..., Appliance], pki: Any) -> None:
    """Own address, then a source-routed or quoted form of it, another user's address, the own address
    again (any case): each MAIL gets the verdict it would get first in a fresh session."""
    instance = appliance(pki=pki, start=False)
    for login in ("alice@example.org", "bob@example.org"):
        assert instance.admin("user", "add", login, password="a-password").returncode == 0
    instance.start()
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.login("alice@example.org", "a-password")
        sequence = [
            ("<alice@example.org>", True),
            ("<@relay.example:alice@example.org>", False),  # equal address, a source route
            ('<"alice"@example.org>', False),  # a quoted local part is never owned
            ("<alice@example.org>", True),
            ("<bob@example.org>", False),
            ("<bob@example.org>", False),
            ("<ALICE@example.org>", True),
            ("<>", True),
            ("<bob@example.org>", False),
        ]
        for sender, owned in sequence:
            code, text = smtp.docmd("MAIL", f"FROM:{sender}")
            if owned:
                assert code == 250, (sender, code, text)
                smtp.rset()
            else:
                assert answered((code, text), SENDER_NOT_OWNED), (sender, code, text)
