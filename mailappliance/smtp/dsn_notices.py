"""DSN on the session side (RFC 3461): what the spool envelope carries to the next
hop, and the success notices asked for by recipients we delivered locally.

The parameters themselves are parsed in :mod:`mailappliance.dsn_params` and kept on the
transaction (``mail_parameters``; ``recipient_parameters`` by the address as
the transaction stores it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from mailappliance.dsn_params import MailParameters
from mailappliance.queue.dsn import RecipientStatus

if TYPE_CHECKING:
    from mailappliance.smtp.session_base import SMTPSessionBase
    from mailappliance.smtp.transaction import Transaction

NO_PARAMETERS = MailParameters()


class EnvelopeFields(TypedDict):
    """Keyword arguments of ``Envelope.new``: DSN (RFC 3461) and SMTPUTF8."""

    notify: dict[str, str]
    orcpt: dict[str, str]
    ret: str
    envid: str
    smtputf8: bool


def envelope_fields(transaction: Transaction, addresses: Iterable[str]) -> EnvelopeFields:
    """The DSN and SMTPUTF8 keywords of ``Envelope.new`` for these recipients."""
    mail = transaction.mail_parameters or NO_PARAMETERS
    notify: dict[str, str] = {}
    orcpt: dict[str, str] = {}
    for address in addresses:
        rcpt = transaction.recipient_parameters.get(address)
        if rcpt is not None:
            notify[address] = rcpt.notify_text
            orcpt[address] = rcpt.orcpt.stored() if rcpt.orcpt else ""
    return {"notify": notify, "orcpt": orcpt, "ret": mail.ret, "envid": mail.envid, "smtputf8": mail.smtputf8}


def notify_local_success(session: SMTPSessionBase, queue_id: str, transaction: Transaction,
                         paths: list[Path]) -> None:
    """After the 250: a success notice for the local recipients that asked (NOTIFY=SUCCESS),
    if ``[smtp] dsn_success_notices`` lets this sender have one."""
    notices = session.factory.success_notices
    if notices is None or transaction.sender.is_null or not paths or not transaction.recipient_parameters:
        return
    statuses: dict[str, RecipientStatus] = {}
    for recipient in transaction.local_recipients:
        rcpt = transaction.recipient_parameters.get(recipient.address)
        if rcpt is not None and rcpt.wants("SUCCESS") and recipient.address not in statuses:
            statuses[recipient.address] = RecipientStatus(
                recipient.address, "delivered", "2.0.0", "250 2.0.0 delivered to mailbox",
                original_recipient=rcpt.orcpt.field() if rcpt.orcpt else "")
    if not statuses:
        return
    if not notices.allowed(session.subscriber is not None):
        session.log_event(session.log.info, "success notice for id={id} not sent: NOTIFY=SUCCESS from an "
                          "unauthenticated sender <{sender}> ([smtp] dsn_success_notices)",
                          id=queue_id, sender=transaction.sender.address)
        return
    mail = transaction.mail_parameters or NO_PARAMETERS
    notices.notify(sender=transaction.sender.address, queue_id=queue_id, arrival=transaction.started,
                   statuses=list(statuses.values()), message_path=paths[0], full=mail.ret == "FULL",
                   envid=mail.envid)
