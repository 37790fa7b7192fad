"""The SMTP session's side of message authentication and content filtering:
build the envelope facts, call the inspector once at the end of DATA, map its
verdict to a reply, and apply its header edit to the staged message."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.python.failure import Failure

from mailappliance.filter.rspamd import SpamVerdict
from mailappliance.metrics import METRICS
from mailappliance.msgauth.inspect import Envelope, Inspection, MessageSource
from mailappliance.smtp import replies

if TYPE_CHECKING:
    from mailappliance.delivery import Delivery
    from mailappliance.smtp.session_base import SMTPSessionBase
    from mailappliance.smtp.transaction import Transaction


@attrs.frozen
class Checked:
    """``reply``: refuse the message with it (None: go on); ``junk``: recipient
    addresses whose copy goes into their .Junk folder."""

    reply: replies.Reply | None = None
    junk: frozenset[str] = frozenset()


NOTHING_TO_DO = Checked()


def suspension_refusal(session: SMTPSessionBase) -> replies.Reply | None:
    """MAIL from a subscriber whose submission is suspended (outgoing spam)."""
    inspector = session.factory.inspector
    if inspector is None or session.subscriber is None or not inspector.suspended(session.subscriber.uid):
        return None
    METRICS.count("mailappliance_messages_refused_total", reason="submission_suspended")
    session.log_event(session.log.warn, "submission suspended: uid={uid} (outgoing spam; "
                      "mailappliance-admin user enable lifts it)", uid=session.subscriber.uid)
    return replies.SUBMISSION_SUSPENDED


async def inspect_message(session: SMTPSessionBase, delivery: Delivery, transaction: Transaction) -> Checked:
    inspector = session.factory.inspector
    if inspector is None or (session.subscriber is None and session.config.role != "mx"):
        return NOTHING_TO_DO
    if session.subscriber is not None and inspector.outbound_is_quiet(bool(transaction.remote_recipients)):
        return NOTHING_TO_DO  # nothing to scan or sign: no envelope, no coroutine
    recipients = tuple([r.address for r in transaction.local_recipients] + list(transaction.remote_recipients))
    source = MessageSource(delivery, transaction.trace_length, inspector.run_blocking)
    try:
        if session.subscriber is None and inspector.inbound_is_quiet(recipients, source.head()):
            return NOTHING_TO_DO  # the common MX case without checks: no envelope, no coroutine
        envelope = Envelope(
            client_ip=session.client_ip, helo=session.helo or "", sender=transaction.sender.address,
            recipients=recipients, queue_id=delivery.name,
            client_name=(session.client_facts.name or "") if session.client_facts else "",
            user=session.subscriber.uid if session.subscriber is not None else "",
        )
        if session.subscriber is None:
            inspection = await inspector.inbound(envelope, source)
        else:
            inspection = await inspector.outbound(envelope, source, bool(transaction.remote_recipients))
    except Exception:
        session.log_event(session.log.failure, "message inspection failed", failure=Failure())
        return Checked(replies.INTERNAL_ERROR)
    _log(session, inspection, delivery.name)
    reply = _reply(inspection)
    if reply is not None:
        return Checked(reply)
    if inspection.changes:
        start = transaction.trace_length
        delivery.edit(start, start + inspection.head_end, inspection.replacement)
    return Checked(None, inspection.outcome.junk)


# The reply to an inspection outcome, by action and kind; the spam filter's own text wins where it has one.
_REPLIES: dict[tuple[str, str], replies.Reply] = {
    ("reject", "dmarc"): replies.DMARC_REJECTED,
    ("reject", "spf"): replies.SPF_REJECTED,
    ("tempfail", "dns"): replies.AUTH_DNS_TEMPFAIL,
    ("tempfail", "filter"): replies.FILTER_UNAVAILABLE,
}
_FILTER_REPLIES = {"reject": replies.SPAM_REJECTED, "tempfail": replies.SPAM_DEFERRED}
_COUNTERS = {"reject": "mailappliance_messages_refused_total", "tempfail": "mailappliance_messages_deferred_total"}


def _reply(inspection: Inspection) -> replies.Reply | None:
    outcome = inspection.outcome
    if outcome.action not in _COUNTERS:
        return None
    METRICS.count(_COUNTERS[outcome.action], reason=f"policy_{outcome.kind}")
    fixed = _REPLIES.get((outcome.action, outcome.kind))
    if fixed is not None:
        return fixed
    reply = _FILTER_REPLIES[outcome.action]
    return reply.with_text(inspection.message) if inspection.message else reply


def _log(session: SMTPSessionBase, inspection: Inspection, queue_id: str) -> None:
    outcome, facts = inspection.outcome, inspection.facts
    summary = []
    if facts is not None:
        if facts.spf is not None:
            summary.append(f"spf={facts.spf.result}")
        summary += [f"dkim={d.result}:{d.domain}" for d in facts.dkim] or (["dkim=none"] if facts.dkim_none else [])
        if facts.dmarc is not None:
            summary.append(f"dmarc={facts.dmarc.result}:{facts.dmarc.from_domain or '-'}")
        if facts.arc is not None and facts.arc.result != "none":
            summary.append(f"arc={facts.arc.result}:{facts.arc.sealer or '-'}")
    spam = inspection.spam
    if isinstance(spam, SpamVerdict):
        summary.append(f"spam={spam.action}:{spam.score:.2f}")
    elif spam is not None:  # unavailable, too large
        summary.append(f"spam={spam}")
    if not summary and outcome.action == "accept" and not outcome.junk:
        return
    session.log_event(session.log.info, "inspected id={id} {summary} -> {action}{junk} {reason}", id=queue_id,
                      summary=" ".join(summary), action=outcome.action,
                      junk=f" junk={len(outcome.junk)}" if outcome.junk else "", reason=outcome.reason)
