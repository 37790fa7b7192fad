"""The one entry point the SMTP session calls at the end of DATA.

``MessageInspector.inbound`` (the MX, unauthenticated senders): SPF, DKIM,
ARC, then DMARC, with the content filter in parallel; the verdict
(:mod:`.verdict`) and the header edit: our Authentication-Results and
X-Spam-* fields after our Received header, forged ones removed.
``MessageInspector.outbound`` (authenticated subscribers): the optional
outbound content filter (strikes that may suspend the subscriber) and the
DKIM signatures.  Both return an :class:`Inspection`; neither ever loses a
message: whatever breaks becomes "accept" or "tempfail" by configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.blocking import RunBlocking
from mailappliance.filter.rspamd import FilterUnavailable, RspamdClient, SpamVerdict
from mailappliance.filter.suspension import Suspensions
from mailappliance.metrics import METRICS
from mailappliance.msgauth import dkim_check, headers
from mailappliance.msgauth.dkim_check import ArcVerifier, DkimVerifier
from mailappliance.msgauth.dmarc import DmarcCheck
from mailappliance.msgauth.dns import DnsCache, DnsView, StepFailed, run_with_lookups
from mailappliance.msgauth.keys import KeyStore, SigningKey
from mailappliance.msgauth.results import authentication_results, claims
from mailappliance.msgauth.settings import DkimSettings, FilterSettings, MsgAuthSettings
from mailappliance.msgauth.spf_check import check_spf
from mailappliance.msgauth.verdict import TOO_LARGE, UNAVAILABLE, AuthFacts, Outcome, SpamResult, decide

log = Logger(namespace="mailappliance.msgauth")

MAX_ARC_SETS = 12  # RFC 8617 allows 50; real chains have a handful
SPAM_HEADERS = ("x-spam-status", "x-spam-score", "x-spam-flag", "x-spam-action")
HEAD_FIRST_READ = 64 * 1024  # MessageSource.head: most header sections end well within this
_T = TypeVar("_T")
_A = TypeVar("_A")
_B = TypeVar("_B")


@attrs.frozen
class Envelope:
    """The SMTP facts of one message."""

    client_ip: str
    helo: str
    sender: str
    recipients: tuple[str, ...]
    queue_id: str
    client_name: str = ""  # forward-confirmed reverse name, when screening looked it up
    user: str = ""  # the authenticated subscriber's uid


@attrs.frozen
class Inspection:
    outcome: Outcome
    head_end: int = 0  # bytes of the original message (from its start) that ``replacement`` replaces
    replacement: bytes = b""  # our fields, then the original header section minus removed fields
    facts: AuthFacts | None = None
    spam: SpamResult = None
    message: str = ""  # text for the SMTP reply (rspamd's, cleaned)
    suspended: bool = False  # this message's strike suspended the subscriber

    @property
    def changes(self) -> bool:
        return bool(self.replacement) or self.head_end > 0


class StagedMessage(Protocol):
    """What the inspector reads: the SMTP session's staged message (delivery.Delivery)."""

    @property
    def size(self) -> int: ...

    @property
    def spilled(self) -> bool: ...  # on disk (read it in a worker thread), not in memory

    def read(self, start: int = 0, limit: int | None = None) -> bytes: ...


class MessageSource:
    """How the inspector reads the staged message (after our trace fields)."""

    def __init__(self, delivery: StagedMessage, offset: int, run_blocking: RunBlocking) -> None:
        self.delivery = delivery
        self.offset = offset
        self.run_blocking = run_blocking
        self.size = delivery.size - offset
        self._head: bytes | None = None

    def head(self) -> bytes:
        """The message from its start, at least through its header section (up to
        ``MAX_HEAD``): a first 64 KiB that holds the section's end, else all of it
        (a 1 MB message is not read whole for a header of a few hundred octets)."""
        if self._head is None:
            head = self.delivery.read(self.offset, HEAD_FIRST_READ)
            if len(head) == HEAD_FIRST_READ and headers.head_length(head) >= len(head):
                head = self.delivery.read(self.offset, headers.MAX_HEAD + 4)
            self._head = head
        return self._head

    async def whole(self) -> bytes:
        if not self.delivery.spilled:
            return self.delivery.read(self.offset)
        return await self.run_blocking(self.delivery.read, self.offset)


class MessageInspector:
    def __init__(self, *, hostname: str, msgauth: MsgAuthSettings, dkim: DkimSettings, filter: FilterSettings,
                 dns: DnsCache, keys: KeyStore, rspamd: RspamdClient | None, suspensions: Suspensions | None,
                 clock: IReactorTime, run_blocking: RunBlocking) -> None:
        self.hostname = hostname
        self.msgauth = msgauth
        self.dkim = dkim
        self.filter = filter
        self.dns = dns
        self.keys = keys
        self.rspamd = rspamd
        self.suspensions = suspensions
        self.clock = clock
        self.run_blocking = run_blocking

    # -- settings swapped on SIGHUP (reload.Reloader) -------------------------------

    @property
    def settings(self) -> MsgAuthSettings:
        return self.msgauth

    @settings.setter
    def settings(self, value: MsgAuthSettings) -> None:
        self.msgauth = value
        self.dns.timeout = value.dns_timeout

    def suspended(self, uid: str) -> bool:
        return self.suspensions is not None and self.suspensions.is_suspended(uid)

    # -- inbound ------------------------------------------------------------------

    def inbound_is_quiet(self, recipients: Sequence[str], head: bytes) -> bool:
        """True when inbound inspection has nothing to check (no recipient's policy
        verifies, no content filter), add or remove (no Authentication-Results field):
        the message goes on unchanged, and the session need not even ask."""
        if self.rspamd is not None and self.filter.inbound:
            return False
        if self.msgauth.any_verify and any(self.msgauth.policy_for(r.rpartition("@")[2]).verify
                                           for r in recipients):
            return False
        return b"authentication-results" not in head[:headers.head_length(head)].lower()

    async def inbound(self, envelope: Envelope, source: MessageSource) -> Inspection:
        """A stranger's message to the MX.  The session asks only when ``inbound_is_quiet``
        said no (for a quiet message this comes to the same: accept, nothing changed)."""
        head_bytes = source.head()
        head_len = headers.head_length(head_bytes)
        policies = [(r, self.msgauth.policy_for(r.rpartition("@")[2])) for r in envelope.recipients]
        verify = any(policy.verify for _, policy in policies)
        scan = self.rspamd is not None and self.filter.inbound
        fields = headers.parse_fields(head_bytes[:head_len])
        message = await source.whole() if (verify or scan) else b""
        checks: defer.Deferred[AuthFacts | None] = \
            defer.Deferred.fromCoroutine(self._authenticate(envelope, message, fields)) if verify \
            else defer.succeed(None)
        scanning: defer.Deferred[SpamResult] = \
            defer.Deferred.fromCoroutine(self._scan(envelope, message)) if scan else defer.succeed(None)
        facts, spam = await _gather_two(checks, scanning)
        outcome = decide(policies, facts, spam, self.filter, self.msgauth.trusted_arc_sealers)
        if facts is not None:
            facts.disposition = outcome.disposition
            _count_results(facts)
        added = []
        if facts is not None:
            added.append(headers.header_line("Authentication-Results", authentication_results(self.hostname, facts)))
        if scan:
            added += _spam_fields(spam)
        if outcome.flag:
            added.append(b"X-Spam-Flag: YES\r\n")

        def removed(field: headers.Field) -> bool:
            if field.name == "authentication-results":
                return claims(field.text(), self.hostname)
            return field.name in SPAM_HEADERS and (scan or verify)

        kept = [f for f in fields if not removed(f)]
        subject = spam.subject if isinstance(spam, SpamVerdict) and spam.action == "rewrite subject" else ""
        if subject and outcome.action == "accept":
            kept = _rewrite_subject(kept, subject)
        section = head_bytes[:head_len]
        complete = head_len < len(head_bytes) or source.size == len(head_bytes)  # the whole section was read
        if complete and (len(kept) != len(fields) or subject):
            blank = b"\r\n" if section.endswith(b"\r\n\r\n") or section == b"\r\n" else b""
            edit = (head_len, b"".join(added) + b"".join(f.raw for f in kept) + blank)
        else:
            edit = (0, b"".join(added))  # nothing removed: insert only
        text = spam.message if isinstance(spam, SpamVerdict) else ""
        return Inspection(outcome, edit[0], edit[1], facts, spam, _clean_reply(text))

    async def _authenticate(self, envelope: Envelope, message: bytes, fields: list[headers.Field]) -> AuthFacts:
        deadline = self.clock.seconds() + self.msgauth.dns_timeout
        facts = AuthFacts(client_ip=envelope.client_ip)

        async def step(function: Callable[[DnsView], _T], runner: RunBlocking | None = None) -> _T:
            return await run_with_lookups(function, DnsView(self.dns), deadline, self.clock, run=runner)

        signatures = [len(f.raw) for f in fields if f.name == "dkim-signature"]
        big = len(message) > 256 * 1024  # hashing a big body belongs in a worker thread
        runner = self.run_blocking if big else None
        spf_task = defer.Deferred.fromCoroutine(step(
            lambda view: check_spf(view, envelope.client_ip, envelope.sender, envelope.helo, self.hostname)))
        dkim_task: defer.Deferred[list[dkim_check.DkimResult]] = \
            defer.Deferred.fromCoroutine(step(DkimVerifier(message, signatures), runner)) if signatures \
            else defer.succeed([])
        seals = sum(1 for f in fields if f.name == "arc-seal")
        arc_task: defer.Deferred[dkim_check.ArcResult | None]
        if seals > MAX_ARC_SETS:  # each set costs two signature checks and a body hash: refused unread
            arc_task = defer.succeed(dkim_check.ArcResult("fail", reason=f"{seals} ARC sets (at most {MAX_ARC_SETS})"))
        else:
            arc_task = defer.Deferred.fromCoroutine(step(ArcVerifier(message), runner)) if seals \
                else defer.succeed(None)
        spf, dkim, arc_result = await _settled(spf_task), await _settled(dkim_task), await _settled(arc_task)
        if isinstance(spf, Failure):
            _log_failure("SPF", spf)
        else:
            facts.spf, facts.helo_spf = spf
        facts.dkim = [] if isinstance(dkim, Failure) else dkim
        facts.dkim_none = not isinstance(dkim, Failure) and not dkim
        facts.arc = dkim_check.ArcResult("fail", reason="check failed") if isinstance(arc_result, Failure) \
            else arc_result
        spf_pass = facts.spf.domain if facts.spf and facts.spf.result == "pass" and \
            facts.spf.identity == "mailfrom" else None
        if spf_pass is None and facts.spf and facts.spf.identity == "helo" and facts.spf.result == "pass":
            spf_pass = facts.spf.domain  # null sender: the HELO identity stands in (RFC 7489 4.1)
        passed = [d.domain for d in facts.dkim if d.result == "pass"]
        try:
            facts.dmarc = await step(DmarcCheck(headers.values(fields, "from"), spf_pass, passed))
        except StepFailed as e:
            log.warn("DMARC check gave up: {why}", why=str(e))
        return facts

    async def _scan(self, envelope: Envelope, message: bytes) -> SpamResult:
        if len(message) > self.filter.max_size:
            return TOO_LARGE
        assert self.rspamd is not None
        try:
            return await self.rspamd.check(message, sender=envelope.sender, recipients=list(envelope.recipients),
                                           client_ip=envelope.client_ip, helo=envelope.helo,
                                           hostname=envelope.client_name, user=envelope.user,
                                           queue_id=envelope.queue_id)
        except FilterUnavailable as e:
            METRICS.count("mailappliance_filter_unavailable_total")
            log.warn("content filter unavailable for {id}: {why}", id=envelope.queue_id, why=str(e))
            return UNAVAILABLE

    # -- outbound -----------------------------------------------------------------

    def outbound_is_quiet(self, remote: bool) -> bool:
        """True when a subscriber's message has nothing to be scanned for (no outbound
        filter) or signed with (no recipient elsewhere, or no signing keys): it goes on
        unchanged, and the session need not build an envelope or ask."""
        return not (self.rspamd is not None and self.filter.outbound) and not (remote and self.keys.signing)

    async def outbound(self, envelope: Envelope, source: MessageSource, remote: bool) -> Inspection:
        """An authenticated subscriber's message: outbound scan (if on), then DKIM
        signatures for mail that leaves (``remote``)."""
        scan = self.rspamd is not None and self.filter.outbound
        keys_for = self._signing_keys(source, remote)
        if not scan and not keys_for:
            return Inspection(Outcome("accept"))
        message = await source.whole()
        spam = await self._scan(envelope, message) if scan else None
        suspended = False
        if isinstance(spam, SpamVerdict) and spam.is_spam and envelope.user and self.suspensions is not None:
            METRICS.count("mailappliance_outbound_spam_total")
            suspended = self.suspensions.strike(envelope.user, f"rspamd {spam.action} score={spam.score:.2f} "
                                                               f"queue id {envelope.queue_id}")
            if suspended:
                log.warn("submission SUSPENDED for {uid}: outgoing spam (see mailappliance-admin user show)",
                         uid=envelope.user)
        outcome = decide([(r, self.msgauth.default) for r in envelope.recipients], None, spam, self.filter)
        if outcome.action != "accept":
            return Inspection(outcome, spam=spam, message=_clean_reply(spam.message if isinstance(
                spam, SpamVerdict) else ""), suspended=suspended)
        signatures = b""
        if keys_for:
            fields = headers.parse_fields(message[:headers.head_length(message)])
            include = dkim_check.signing_headers(fields)
            try:
                if len(message) > 256 * 1024:
                    lines = await self.run_blocking(dkim_check.sign, message, keys_for, include)
                else:
                    lines = dkim_check.sign(message, keys_for, include)
                signatures = b"".join(lines)
                METRICS.count("mailappliance_dkim_signed_total")
            except Exception:
                log.failure("DKIM signing failed for {id}; sending unsigned", id=envelope.queue_id)
        return Inspection(Outcome("accept"), 0, signatures, spam=spam, suspended=suspended)

    def _signing_keys(self, source: MessageSource, remote: bool) -> list[SigningKey]:
        """The keys of the From domain (aligned for DMARC), else of the envelope sender's domain."""
        if not remote or not self.keys.signing:
            return []
        head = source.head()
        fields = headers.parse_fields(head[:headers.head_length(head)])
        from_values = headers.values(fields, "from")
        from email.utils import getaddresses

        for _, address in getaddresses(from_values[:1]):
            keys = self.keys.keys_for(address.rpartition("@")[2])
            if keys:
                return keys
        return []


def _gather_two(first: defer.Deferred[_A], second: defer.Deferred[_B]) -> defer.Deferred[tuple[_A, _B]]:
    """``gatherResults(consumeErrors=True)`` of two Deferreds with different result
    types (Twisted types gatherResults for a single result type)."""
    both = defer.gatherResults([cast(defer.Deferred[object], first), cast(defer.Deferred[object], second)],
                               consumeErrors=True)
    return both.addCallback(lambda results: cast(tuple[_A, _B], tuple(results)))


async def _settled(d: defer.Deferred[_T]) -> _T | Failure:
    """``d``'s result, or its failure as a value (handled here, never raised)."""
    try:
        return await d
    except Exception:
        return Failure()


def _rewrite_subject(fields: list[headers.Field], subject: str) -> list[headers.Field]:
    line = headers.header_line("Subject", "".join(c if c >= " " else " " for c in subject)[:900])
    out, done = [], False
    for field in fields:
        if field.name == "subject" and not done:
            out.append(headers.Field("subject", line))
            done = True
        elif field.name != "subject":
            out.append(field)
    return out if done else out + [headers.Field("subject", line)]


def _spam_fields(spam: SpamResult) -> list[bytes]:
    if spam == UNAVAILABLE:
        return [b"X-Spam-Status: Unchecked (content filter unavailable)\r\n"]
    if spam == TOO_LARGE:
        return [b"X-Spam-Status: Unchecked (message too large to scan)\r\n"]
    if not isinstance(spam, SpamVerdict):
        return []
    verdict = "Yes" if spam.is_spam else "No"
    return [headers.header_line("X-Spam-Status", f"{verdict}, score={spam.score:.2f} required={spam.required:.2f}"),
            headers.header_line("X-Spam-Score", f"{spam.score:.2f}"),
            headers.header_line("X-Spam-Action", spam.action)]


def _clean_reply(text: str) -> str:
    return "".join(c if " " <= c <= "~" else " " for c in text)[:200].strip()


def _count_results(facts: AuthFacts) -> None:
    if facts.spf is not None:
        METRICS.count("mailappliance_msgauth_results_total", method="spf", result=facts.spf.result)
    for d in facts.dkim:
        METRICS.count("mailappliance_msgauth_results_total", method="dkim", result=d.result)
    if facts.dmarc is not None:
        METRICS.count("mailappliance_msgauth_results_total", method="dmarc", result=facts.dmarc.result)
    if facts.arc is not None and facts.arc.result != "none":
        METRICS.count("mailappliance_msgauth_results_total", method="arc", result=facts.arc.result)


def _log_failure(what: str, failure: Failure) -> None:
    log.failure("{what} check failed", failure=failure, what=what)
