"""RCPT for our own domains: the directory lookups an address plan asks for, and what they give.

A mixin of the SMTP session (through :class:`~mailappliance.smtp.transaction.MailTransaction`).
The decisions are pure (:mod:`mailappliance.addressing`); here they meet the
directory: each lookup is one call into the directory's thread pool, and a
directory that cannot answer propagates as ``DirectoryUnavailable`` (451).
What an accepted recipient gives is an :class:`RcptOutcome`: copies into
local mailboxes, copies through the outbound queue with the sender as it is
(a bounce to our SRS address going back) or SRS-rewritten (forwarding).
Screened clients (``[screening] refuse_at = "rcpt"``) are refused here,
except for postmaster@ and abuse@, so that they can still complain.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import attrs

from mailappliance.addressing import (
    Addressing,
    SrsRefusal,
    SrsReturn,
    forwarding_sender,
    plan_recipient,
    resolve,
)
from mailappliance.delivery import SpoolEntry
from mailappliance.mailpath import MailPath, PathSyntaxError, parse_path
from mailappliance.metrics import METRICS
from mailappliance.policy import Route, decide_recipient
from mailappliance.queue.spool import Envelope
from mailappliance.smtp import replies
from mailappliance.smtp.session_base import SMTPSessionBase
from mailappliance.verdicts import Verdict

if TYPE_CHECKING:
    from mailappliance.delivery import Delivery
    from mailappliance.smtp.transaction import LocalRecipient, Transaction

FORWARD_QUEUE_SUFFIX = ".fwd"  # the queue id of a message's forwarded copies: <id>.fwd
HELD_STAGES = ("client", "helo", "sender")


@attrs.define
class ForwardedRecipient:
    """An accepted recipient whose mail is forwarded to other domains (with an SRS sender)."""

    address: str  # as received
    targets: tuple[str, ...]


@attrs.define
class RcptOutcome:
    """Where the copies of an accepted recipient go."""

    address: str  # as received
    local: list[LocalRecipient] = attrs.Factory(list)
    relay: list[str] = attrs.Factory(list)  # remote, sender unchanged: an SRS bounce going back
    forward: list[str] = attrs.Factory(list)  # remote, SRS sender


@functools.lru_cache(maxsize=16)
def _plain_addressing(local_domains: frozenset[str]) -> Addressing:
    return Addressing(local_domains=local_domains)


class LocalRecipients(SMTPSessionBase):
    """Resolving recipients in our domains; screening refusals held until RCPT."""

    @property
    def addressing(self) -> Addressing:
        return self.config.addressing or _plain_addressing(self.config.local_domains)

    # -- screening held until RCPT ---------------------------------------------------

    def hold_screening(self, stage: str, verdict: Verdict, reply: replies.Reply) -> bool:
        """A screening refusal at connect, HELO or MAIL: True if it waits for RCPT (where
        postmaster@ and abuse@ stay open), False if the caller refuses now."""
        if getattr(self.config, "screen_refuse_at", "rcpt") != "rcpt":
            return False
        if self.held_refusals is None:
            self.held_refusals = {}
        self.held_refusals[stage] = (verdict, reply)
        return True

    def held_refusal(self, recipient: MailPath) -> replies.Reply | None:
        """The screening refusal that applies to ``recipient``, if any (never to postmaster@/abuse@)."""
        held = self.held_refusals
        if not held or self.addressing.is_role_account(recipient):
            return None
        stage = next(s for s in HELD_STAGES if s in held)
        verdict, reply = held[stage]
        self.log_event(self.log.info, "screened rcpt=<{rcpt}> refused: {stage} rule={rule} value='{value}'",
                       rcpt=recipient.address, stage=stage, rule=verdict.rule, value=verdict.value)
        return reply

    # -- local recipients ---------------------------------------------------------------

    async def resolve_local(self, recipient: MailPath) -> replies.Reply | RcptOutcome:
        """An address in one of our domains -> a reply (refused) or where its copies go."""
        addressing = self.addressing
        received_as = recipient.address.lower()
        plan = plan_recipient(addressing, recipient, self.clock.seconds())
        if isinstance(plan, SrsRefusal):
            METRICS.count("mailappliance_messages_refused_total", reason="srs_invalid")
            self.log_event(self.log.info, "SRS address refused rcpt=<{rcpt}> reason={why}",
                           rcpt=received_as, why=plan.reason)
            return replies.SRS_INVALID
        if isinstance(plan, SrsReturn):
            return await self._srs_return(received_as, plan.address)
        for lookup in plan:
            subscriber = await self.factory.find_recipient(lookup.address)
            if subscriber is not None:
                break
        else:
            if addressing.is_role_account(recipient):
                self.log_event(self.log.error, "no mailbox for <{rcpt}>: no directory entry has it, nor "
                               "{mailbox} ([server] postmaster/abuse): answering 451",
                               rcpt=received_as, mailbox=addressing.role_mailbox(addressing.split_tag(
                                   recipient.local_part)[0].lower()))
                return replies.MAILBOX_MISCONFIGURED
            refusal = await self._local_recipient(None, received_as)
            assert isinstance(refusal, replies.Reply)  # no subscriber: always refused
            return refusal
        if subscriber.disabled:
            return replies.MAILBOX_DISABLED
        resolution = resolve(addressing, lookup, subscriber, received_as)
        if resolution.ignored_forwards:
            self.log_event(self.log.warn, "directory entry {dn}: unusable forwarding address(es) ignored: "
                           "{values}", dn=subscriber.dn, values=", ".join(resolution.ignored_forwards[:5]))
        outcome = RcptOutcome(received_as, forward=list(resolution.forward_remote))
        if outcome.forward and self.factory.spool is None:
            return replies.MAILBOX_MISCONFIGURED
        for address in resolution.forward_local:
            target = await self.factory.find_recipient(address)
            if target is None or target.disabled:
                self.log_event(self.log.warn, "forwarding of <{rcpt}> to <{target}>: no such mailbox, skipped",
                               rcpt=received_as, target=address)
                continue
            local = await self._local_recipient(target, address)
            if isinstance(local, replies.Reply):
                if not local.permanent:
                    return local
                continue
            outcome.local.append(local)
        if resolution.deliver_locally or not (outcome.local or outcome.forward):
            local = await self._local_recipient(subscriber, received_as)
            if isinstance(local, replies.Reply):
                return local
            local.folder = resolution.folder
            outcome.local.insert(0, local)
        if lookup.kind != "address" or outcome.forward or len(outcome.local) != 1:
            self.log_event(self.log.info, "rcpt=<{rcpt}> via {kind}: uid={uid} folder={folder} "
                           "kept={kept} forward={forward}", rcpt=received_as, kind=lookup.kind,
                           uid=subscriber.uid, folder=resolution.folder or "-",
                           kept=any(r.subscriber.uid == subscriber.uid for r in outcome.local),
                           forward=",".join(outcome.forward + [r.address for r in outcome.local
                                                               if r.subscriber.uid != subscriber.uid]) or "-")
        return outcome

    async def _srs_return(self, received_as: str, original: str) -> replies.Reply | RcptOutcome:
        """A bounce to an SRS address we made: back to the original sender."""
        try:
            path = parse_path(f"<{original}>", allow_null=False)
        except PathSyntaxError:
            path = None
        verdict = decide_recipient(path, self.addressing.accepted_domains, True) if path else None
        if verdict is None or verdict.refused:
            self.log_event(self.log.info, "SRS address refused rcpt=<{rcpt}> reason=unusable original "
                           "<{original}>", rcpt=received_as, original=original)
            return replies.SRS_INVALID
        self.log_event(self.log.info, "SRS bounce rcpt=<{rcpt}> returns to <{original}>",
                       rcpt=received_as, original=original)
        if verdict.route is Route.LOCAL:
            address = self.addressing.canonical_address(original).lower()
            local = await self._local_recipient(await self.factory.find_recipient(address), address)
            return local if isinstance(local, replies.Reply) else RcptOutcome(received_as, local=[local])
        if self.factory.spool is None:
            return replies.RELAY_DENIED
        return RcptOutcome(received_as, relay=[original])

    def add_outcome(self, transaction: Transaction, outcome: RcptOutcome) -> None:
        """Record an accepted recipient's copies in the transaction."""
        transaction.local_recipients.extend(outcome.local)
        transaction.remote_recipients.extend(outcome.relay)
        if outcome.forward:
            transaction.forwarded.append(ForwardedRecipient(outcome.address, tuple(outcome.forward)))
        elif not outcome.local and not outcome.relay:  # cannot happen; never accept a recipient for nothing
            raise AssertionError(f"recipient {outcome.address} resolved to nothing")

    def forward_entries(self, delivery: Delivery, transaction: Transaction) -> list[SpoolEntry]:
        """The outbound spool entry of the forwarded copies: one envelope, SRS sender."""
        targets = list(dict.fromkeys(t for f in transaction.forwarded for t in f.targets))
        if not targets:
            return []
        assert self.factory.spool is not None
        sender = forwarding_sender(self.addressing, transaction.sender.address, self.clock.seconds())
        self.log_event(self.log.info, "forwarding id={id} from=<{sender}> as <{srs}> to {count} address(es)",
                       id=delivery.name, sender=transaction.sender.address, srs=sender, count=len(targets))
        return [SpoolEntry(self.factory.spool, Envelope.new(
            queue_id=delivery.name + FORWARD_QUEUE_SUFFIX,
            sender=sender,
            recipients=targets,
            authenticated_as=self.subscriber.uid if self.subscriber else "",
            client_ip=self.client_ip,
            session_id=self.session_id,
            body_offset=self.return_path_length,
        ))]

