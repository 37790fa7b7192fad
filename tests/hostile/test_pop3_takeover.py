"""Finding 13: a vanished POP3 client does not lock its owner out: a new login
ends the old session, and the old session's deletions are discarded."""

from __future__ import annotations

import poplib
import smtplib
from typing import Any, Callable

from tests.conditions import wait_until
from tests.daemon import Appliance


def test_a_new_login_takes_the_mailbox_over_without_the_old_deletions(
        appliance: Callable[..., Appliance], pki: Any) -> None:
    """The phone that lost its network (no FIN) holds the lock; its owner logs in
    again at once, over TLS: +OK, the message it had marked deleted is still there."""
    instance = appliance(pki=pki, start=False, plaintext_pop3=False)
    assert instance.admin("user", "add", "alice@example.org", password="pw-alice-1").returncode == 0
    instance.start()
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.sendmail("s@example.net", ["alice@example.org"], b"Subject: keep me\r\n\r\nhello\r\n")
    context = pki.client_context()
    vanished = poplib.POP3_SSL("127.0.0.1", instance.ports["pop3s"], timeout=10, context=context)
    vanished.user("alice")
    vanished.pass_("pw-alice-1")
    assert vanished.dele(1).startswith(b"+OK")
    # ... and the phone goes away without a FIN: its socket stays open on our side.
    again = poplib.POP3_SSL("127.0.0.1", instance.ports["pop3s"], timeout=10, context=context)
    again.user("alice")
    assert again.pass_("pw-alice-1").startswith(b"+OK")
    assert again.stat()[0] == 1  # the old session's DELE was never committed
    again.quit()
    wait_until(lambda: "ended by a newer login for the same mailbox" in instance.log(), what="takeover logged")
    vanished.close()
