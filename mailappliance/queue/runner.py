"""The queue runner: delivers spooled messages, retries, and reports failures.

Each due message is handled by one task: its pending recipients are grouped
by domain (one transaction per destination), each group goes to the next
hops in preference order until every recipient has a final answer or the
hops run out.  2xx: delivered; 5xx: failed now; anything else: retried on
the schedule until ``max_age``, then failed.  Failed recipients produce one
DSN to the envelope sender (never for the null sender), stored durably
*before* the envelope records the failure, so a crash can repeat a report
but never lose one.  The envelope is rewritten after every attempt; a crash
between a remote 250 and that rewrite re-sends to that one destination on
restart (at most the messages in flight are duplicated, none is lost).

The schedule lives in memory: a heap of (next attempt, id) over deferred/,
rebuilt at start by one scan of names and mtimes (``OutboundSpool.recover``).
A timer wakes at the earliest due time; a kick (something was queued) and a
cheap watch of incoming/ (one stat, then a listing of that small directory)
take only new entries.  No round reads an envelope that is not due, so the
cost of new mail does not grow with the deferred backlog.  Fresh mail and due
deferred mail each have their own bound of rounds in flight, so a backlog
that falls due at once can neither hold all messages in memory nor delay
new mail; the connection bounds (global and per destination) stay as they are.

Every round logs one line per recipient, Postfix-style, so "did mail for X
leave, and where to" is one grep: ``to=<> orig_to=<> relay=host[ip]:port
delay=<message age> delays=<in queue>/<connecting>/<transaction> tls= dsn=
status=sent|deferred|bounced (reply)``.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable

import attrs
from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.blocking import RunBlocking
from mailappliance.config import QueueSettings
from mailappliance.dsn_params import Orcpt, notify_wants
from mailappliance.metrics import METRICS
from mailappliance.queue.client import OutboundFactory, OutboundJob, TLSContext, TransactionResult
from mailappliance.queue.dsn import build_dsn, enhanced_status, recipient_status
from mailappliance.queue.mta_sts import MtaSts, StsVerdict, count_session
from mailappliance.queue.routing import NextHop, Router, RoutingError, ascii_domain
from mailappliance.queue.schedule import Outcome, next_attempt_at, outcome_of
from mailappliance.queue.spool import (
    DELIVERED,
    FAILED,
    Envelope,
    OutboundSpool,
    QueueEntryCorrupt,
    QueueEntryGone,
    RecipientState,
    Recovery,
)

log = Logger(namespace="mailappliance.queue")


@attrs.frozen
class Answer:
    """A recipient's answer in this round, and how it was got."""

    code: int
    text: str
    host: str = ""
    relay: str = "none"  # host[address]:port of the attempt that answered; "none": no next hop
    tls: bool = False
    delays: tuple[float, float, float] = (0.0, 0.0, 0.0)  # in the queue, connecting, the transaction
    remote_dsn: bool = False  # the next hop offered DSN: success notices are its job from here


@attrs.frozen
class Attempt:
    """One connection to one next hop: its answers and its timing."""

    result: TransactionResult
    relay: str
    delays: tuple[float, float, float]


def apply_answers(
    envelope: Envelope, answers: dict[str, Answer], now: float, settings: QueueSettings
) -> list[RecipientState]:
    """Record this round in ``envelope``; returns the recipients that failed for good now."""
    failed_now: list[RecipientState] = []
    for recipient in envelope.pending():
        answer = answers.get(recipient.address)
        if answer is None:
            continue
        recipient.attempts += 1
        recipient.last_code, recipient.last_text, recipient.remote_host = answer.code, answer.text, answer.host
        outcome = outcome_of(answer.code)
        if outcome is Outcome.DELIVERED:
            recipient.state = DELIVERED
        elif outcome is Outcome.FAILED:
            recipient.state = FAILED
            failed_now.append(recipient)
    envelope.attempts += 1
    if envelope.pending():
        retry = next_attempt_at(envelope.attempts, envelope.received_at, now, settings.retry_schedule,
                                settings.max_age)
        if retry is None:
            for recipient in envelope.pending():
                recipient.state = FAILED
                recipient.last_text = f"gave up after {envelope.attempts} attempts; last answer: " \
                                      f"{recipient.last_code or ''} {recipient.last_text}".rstrip()
                recipient.last_code = 0
                failed_now.append(recipient)
        else:
            envelope.next_attempt = retry
    return failed_now


ReportSender = Callable[[str, bytes], Awaitable[None]]


FRESH, DUE = "fresh", "due"  # the two lanes: new mail (incoming/) and the schedule (deferred/)
WATCH_INTERVAL = 1.0  # seconds between looks at incoming/ (one stat) for what a kick did not announce
SKIPPED_LOGGED = 20  # foreign names logged one by one at start; the rest counted


class QueueRunner(service.Service):
    """Delivers what is new at once and what is deferred when it falls due."""

    def __init__(
        self,
        spool: OutboundSpool,
        router: Router,
        settings: QueueSettings,
        hostname: str,
        run_blocking: RunBlocking,
        send_report: ReportSender,
        tls_context_for: Callable[[NextHop], TLSContext],
        reactor: IReactorTime,
        smarthost_login: tuple[str, str] | None = None,
        mta_sts: MtaSts | None = None,
    ) -> None:
        """``reactor``: the clock, and it connects to the next hops (IReactorTCP)."""
        self.smarthost_login = smarthost_login
        self.mta_sts = mta_sts  # None: MTA-STS off
        self.spool = spool
        self.router = router
        self.settings = settings
        self.hostname = hostname
        self.run_blocking = run_blocking
        self.send_report = send_report
        self.tls_context_for = tls_context_for
        self.reactor = reactor
        self._active: set[str] = set()  # ids taken by a round (or waiting for a fresh slot)
        self._running = {FRESH: 0, DUE: 0}  # rounds in flight per lane
        # rounds in flight per lane (each holds its message and queues work for the storage threads):
        # fresh mail generously; due mail enough to keep the connections busy, so that a backlog
        # falling due cannot fill the storage threads' queue ahead of fresh mail
        self.lane_limits = {FRESH: max(100, 10 * settings.concurrency), DUE: max(8, 2 * settings.concurrency)}
        self._global = DeferredSemaphore(settings.concurrency)
        self._per_destination: dict[str, DeferredSemaphore] = defaultdict(
            lambda: DeferredSemaphore(settings.per_destination))
        self._due: dict[str, float] = {}  # deferred id -> next attempt: the schedule
        self._heap: list[tuple[float, str]] = []  # (next attempt, id); entries not in _due are stale
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._watch: task.LoopingCall | None = None
        self._looking = False  # a listing of incoming/ is under way
        self._look_again = False  # ... and something asked for another one meanwhile
        self._stamp = -1  # incoming/'s mtime at the last listing
        self._waiting: deque[str] = deque()  # listed in incoming/, not started: the fresh lane was full

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self._rebuild(self.spool.recover())  # before the listeners start: nothing writes the queue yet
        self._watch = task.LoopingCall(self._watch_incoming)
        self._watch.clock = self.reactor
        self._watch.start(min(self.settings.scan_interval, WATCH_INTERVAL), now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _rebuild(self, found: Recovery) -> None:
        """The in-memory schedule from the start-up scan, and a log line for what it set aside."""
        if found.orphans:
            log.info("queue: removed {n} uncommitted message file(s) left by a crash", n=found.orphans)
        if found.migrated:
            log.info("queue: moved {n} message(s) of the flat spool into deferred/", n=found.migrated)
        for queue_id in found.corrupt:
            log.error("queue: {id} has an unreadable envelope: moved to queue/corrupt/", id=queue_id)
        for name in found.skipped[:SKIPPED_LOGGED]:
            log.warn("queue: {name} is not a queue entry of ours: skipped (move it away)", name=name)
        if len(found.skipped) > SKIPPED_LOGGED:
            log.warn("queue: {n} more foreign name(s) skipped", n=len(found.skipped) - SKIPPED_LOGGED)
        for queue_id in found.due_now:
            self._schedule(queue_id, 0.0)
        for when, queue_id in found.deferred:
            self._due[queue_id] = when
        self._heap.extend(found.deferred)
        heapq.heapify(self._heap)
        log.info("queue: {due} message(s) due now, {deferred} deferred", due=len(found.due_now),
                 deferred=len(found.deferred))
        self._fire()

    # -- new mail

    def kick(self) -> None:
        """Something was queued: look at incoming/ now instead of at the next watch."""
        self.reactor.callLater(0, self._look)

    def scan(self) -> None:
        """Look at incoming/ and start whatever is due (the old name of both)."""
        self._look()
        self._fire()

    def _watch_incoming(self) -> None:
        d = Deferred.fromCoroutine(self._watch_once())
        d.addErrback(lambda f: log.failure("queue: watching incoming/ failed", f))

    async def _watch_once(self) -> None:
        if self._looking:
            return
        if await self.run_blocking(self.spool.incoming_stamp) != self._stamp:
            self._look()

    def _look(self) -> None:
        if self._looking:
            self._look_again = True
            return
        self._looking = True
        d = Deferred.fromCoroutine(self._take_incoming())
        d.addErrback(lambda f: log.failure("queue: reading incoming/ failed", f))
        d.addBoth(self._looked)

    def _looked(self, _: object) -> None:
        self._looking = False
        if self._look_again:
            self._look_again = False
            self._look()

    async def _take_incoming(self) -> None:
        """Start a round for each new entry of incoming/, while the fresh lane has room; the
        rest wait in memory (a retry of the whole queue is listed once, not once per round)."""
        stamp = await self.run_blocking(self.spool.incoming_stamp)
        ids = await self.run_blocking(self.spool.incoming_ids)
        self._stamp = stamp
        waiting = set(self._waiting)
        self._waiting.extend(i for i in ids if i not in self._active and i not in waiting)
        self._drain()

    def _drain(self) -> None:
        while self._waiting and self._running[FRESH] < self.lane_limits[FRESH]:
            queue_id = self._waiting.popleft()
            if queue_id in self._active:
                continue
            self._due.pop(queue_id, None)  # an admin's retry: its old heap entry is stale now
            self._start(queue_id, FRESH)

    # -- the schedule

    def _schedule(self, queue_id: str, when: float) -> None:
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))
        self._arm()

    def _arm(self) -> None:
        """One timer, at the earliest due time (none while the due lane is full: a finished
        round fires again)."""
        if not self._heap or not self.running or self._running[DUE] >= self.lane_limits[DUE]:
            return
        when = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.reactor.callLater(max(0.0, when - self.reactor.seconds()), self._fire)

    def _fire(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self.reactor.seconds()
        while self._heap and self._heap[0][0] <= now and self._running[DUE] < self.lane_limits[DUE]:
            when, queue_id = heapq.heappop(self._heap)
            if self._due.get(queue_id) != when:
                continue  # stale: rescheduled, retried or removed since
            del self._due[queue_id]
            if queue_id not in self._active:
                self._start(queue_id, DUE)
        self._arm()

    def queued(self) -> int:
        """Messages the runner knows of: scheduled, in delivery, listed in incoming/ (no disk read)."""
        return len(self._due) + len(self._active) + len(self._waiting)

    def oldest_age(self, now: float) -> float:
        """Age of the oldest message the runner knows of, from the ids (they start with the
        Unix time of arrival): no disk read."""
        oldest = min((_arrival(i) for ids in (self._due, self._active, self._waiting) for i in ids), default=now)
        return max(0.0, now - oldest)

    # -- rounds

    def _start(self, queue_id: str, lane: str) -> None:
        self._active.add(queue_id)
        self._running[lane] += 1
        d = Deferred.fromCoroutine(self._round(queue_id))
        d.addErrback(self._round_failed, queue_id)
        d.addCallback(self._round_done, queue_id, lane)

    async def _round(self, queue_id: str) -> float | None:
        """One delivery round; returns the next attempt (None: finished, gone or set aside)."""
        try:
            envelope = await self.run_blocking(self.spool.activate, queue_id)
            data = (await self.run_blocking(self.spool.read_message, queue_id))[envelope.body_offset:]
        except QueueEntryGone:
            return None  # delivered or deleted meanwhile
        except QueueEntryCorrupt as e:
            log.error("queue: {id} set aside in queue/corrupt/: {why}", id=queue_id, why=str(e))
            return None
        return await self._process(envelope, data)

    def _round_failed(self, failure: Failure, queue_id: str) -> float:
        """An unexpected error: logged, and the message tried again later (it stays in active/)."""
        log.failure("queue: {id} delivery round failed", failure, id=queue_id)
        wait = self.settings.retry_schedule[0] if self.settings.retry_schedule else 300.0
        return self.reactor.seconds() + max(wait, 1.0)

    def _round_done(self, next_attempt: float | None, queue_id: str, lane: str) -> None:
        self._active.discard(queue_id)
        self._running[lane] -= 1
        if next_attempt is not None:
            self._schedule(queue_id, next_attempt)
        if lane == FRESH:
            self._drain()
        elif lane == DUE:
            self._fire()

    async def _process(self, envelope: Envelope, data: bytes) -> float | None:
        queue_id = envelope.queue_id
        groups: dict[str, list[str]] = defaultdict(list)
        for recipient in envelope.pending():
            groups[recipient.address.rpartition("@")[2].lower()].append(recipient.address)
        relayed_before = {r.address for r in envelope.recipients if r.state == DELIVERED}
        rounds = [Deferred.fromCoroutine(self._deliver_domain(domain, addresses, envelope, data))
                  for domain, addresses in groups.items()]
        answers: dict[str, Answer] = {}
        for _, result in await DeferredList(rounds, consumeErrors=True):
            if isinstance(result, Failure):
                log.failure("queue: {id} unexpected delivery error", result, id=queue_id)
            else:
                answers.update(result)
        now = self.reactor.seconds()
        failed_now = apply_answers(envelope, answers, now, self.settings)
        self._log_round(envelope, answers, now)
        await self._report(envelope, failed_now, data, now)
        await self._report_relayed(envelope, answers, relayed_before, data)
        try:
            await self.run_blocking(self.spool.store_round, queue_id, lambda stored: _copy_state(envelope, stored))
        except QueueEntryGone:
            log.info("queue: {id} was removed by an admin during delivery", id=queue_id)
            return None
        if envelope.finished:
            log.info("queue: {id} done: delivered={ok} failed={failed}", id=queue_id,
                     ok=sum(r.state == DELIVERED for r in envelope.recipients),
                     failed=sum(r.state == FAILED for r in envelope.recipients))
            return None
        log.info("queue: {id} deferred: {n} recipient(s) pending, next attempt in {wait:.0f} s",
                 id=queue_id, n=len(envelope.pending()), wait=envelope.next_attempt - now)
        return envelope.next_attempt

    def _log_round(self, envelope: Envelope, answers: dict[str, Answer], now: float) -> None:
        """One line per recipient answered this round, with where it went and its final word."""
        age = max(0.0, time.time() - envelope.received_at)
        for recipient in envelope.recipients:
            answer = answers.get(recipient.address)
            if answer is None:
                continue
            status = {DELIVERED: "sent", FAILED: "bounced"}.get(recipient.state, "deferred")
            reply = f"{answer.code} {answer.text}" if recipient.state != FAILED or recipient.last_code else \
                recipient.last_text  # gave up: says so, with the last answer
            if status != "deferred":
                METRICS.observe("mailappliance_queue_age_seconds", age, status=status)
            a, b, c = answer.delays
            log.info(
                "queue: {id} to=<{rcpt}> orig_to=<{rcpt}> relay={relay} delay={delay:.2f} "
                "delays={a:.2f}/{b:.2f}/{c:.2f} tls={tls} dsn={dsn} status={status} ({reply})",
                id=envelope.queue_id, rcpt=recipient.address, relay=answer.relay, delay=age, a=a, b=b, c=c,
                tls=answer.tls, dsn=enhanced_status(answer.code, reply, "failed" if status == "bounced" else ""),
                status=status, reply=reply,
            )

    async def _report(self, envelope: Envelope, failed_now: list[RecipientState], data: bytes,
                      now: float) -> None:
        """DSNs go out (durably) before the envelope says the recipients failed; NOTIFY
        (RFC 3461) decides who is reported: FAILURE and DELAY unless the client said otherwise."""
        reported = [r for r in failed_now if notify_wants(r.notify, "FAILURE")]
        statuses = [recipient_status(r.address, "failed", r.last_code, r.last_text, r.remote_host,
                                     _original_recipient(r.orcpt)) for r in reported]
        warn = (self.settings.delay_warning_after > 0 and not envelope.warned and envelope.pending()
                and now - envelope.received_at >= self.settings.delay_warning_after)
        if warn:
            statuses += [recipient_status(r.address, "delayed", r.last_code, r.last_text, r.remote_host,
                                          _original_recipient(r.orcpt))
                         for r in envelope.pending() if notify_wants(r.notify, "DELAY")]
            envelope.warned = True
        if len(reported) < len(failed_now):
            log.info("queue: {id} no report for {n} failed recipient(s): NOTIFY says so", id=envelope.queue_id,
                     n=len(failed_now) - len(reported))
        if not statuses:
            return
        if not envelope.sender:
            log.info("queue: {id} no report for the null sender ({n} failed)", id=envelope.queue_id,
                     n=len(failed_now))
            return
        report = build_dsn(reporting_host=self.hostname, original_sender=envelope.sender,
                           queue_id=envelope.queue_id, arrival_date=envelope.received_at,
                           statuses=statuses, original_message=data, envid=envelope.envid,
                           return_full=envelope.ret == "FULL")
        await self.send_report(envelope.sender, report)
        log.info("queue: {id} report to <{sender}>: {failed} failed, {delayed} delayed", id=envelope.queue_id,
                 sender=envelope.sender, failed=len(reported), delayed=len(statuses) - len(reported))

    async def _report_relayed(self, envelope: Envelope, answers: dict[str, Answer], before: set[str],
                              data: bytes) -> None:
        """NOTIFY=SUCCESS for a recipient handed to a next hop without DSN: we say "relayed"
        (RFC 3461 5.2.2); a hop with DSN was given NOTIFY and reports delivery itself."""
        if not envelope.sender:
            return
        statuses = [recipient_status(r.address, "relayed", answers[r.address].code, answers[r.address].text,
                                     r.remote_host, _original_recipient(r.orcpt))
                    for r in envelope.recipients
                    if r.state == DELIVERED and r.address not in before and r.address in answers
                    and not answers[r.address].remote_dsn and notify_wants(r.notify, "SUCCESS")]
        if not statuses:
            return
        report = build_dsn(reporting_host=self.hostname, original_sender=envelope.sender,
                           queue_id=envelope.queue_id, arrival_date=envelope.received_at, statuses=statuses,
                           original_message=data, envid=envelope.envid, return_full=envelope.ret == "FULL")
        try:
            await self.send_report(envelope.sender, report)
        except Exception:  # a success notice is not worth a repeated delivery
            log.failure("queue: {id} relayed notice to <{sender}> failed", id=envelope.queue_id,
                        sender=envelope.sender)
            return
        log.info("queue: {id} report to <{sender}>: {n} relayed (NOTIFY=SUCCESS, next hop without DSN)",
                 id=envelope.queue_id, sender=envelope.sender, n=len(statuses))

    async def _deliver_domain(self, domain: str, addresses: list[str], envelope: Envelope,
                              data: bytes) -> dict[str, Answer]:
        try:
            hops = await self.router.next_hops(domain)
        except RoutingError as e:
            log.info("queue: {id} {domain}: {why}", id=envelope.queue_id, domain=domain, why=str(e))
            waited = max(0.0, time.time() - envelope.received_at)
            return {a: Answer(e.code, e.text, delays=(waited, 0.0, 0.0)) for a in addresses}
        answers: dict[str, Answer] = {}
        sts = await self._sts_verdict(domain, hops)
        if sts is not None and sts.policy is not None and sts.enforced:
            hops = sts_hops(sts, hops)
            if not hops:
                count_session("sts", "validation-failure")
                log.info("queue: {id} {domain}: no MX matches its MTA-STS policy (mx {mx}): deferred",
                         id=envelope.queue_id, domain=domain, mx=",".join(sts.policy.mx))
                waited = max(0.0, time.time() - envelope.received_at)
                return {a: Answer(451, f"4.7.5 MTA-STS: no MX host of {domain} matches its policy",
                                  delays=(waited, 0.0, 0.0)) for a in addresses}
        remaining = list(addresses)
        for hop in hops:
            if not remaining:
                break
            attempt = await self._attempt(hop, remaining, envelope, data, sts)
            for address in list(remaining):
                code, text = attempt.result.replies.get(address, (451, "4.4.2 no answer"))
                answers[address] = Answer(code, text, hop.hostname, attempt.relay, attempt.result.tls, attempt.delays,
                                          attempt.result.dsn)
                if outcome_of(code) is not Outcome.RETRY:
                    remaining.remove(address)
        return answers

    async def _sts_verdict(self, domain: str, hops: list[NextHop]) -> StsVerdict | None:
        """The MTA-STS policy for delivery to ``domain``'s MX hosts (None: not asked: MTA-STS
        off, or the mail goes to a smarthost or transport)."""
        if self.mta_sts is None or not hops or self.router.uses_relay(domain):
            return None
        return await self.mta_sts.verdict(ascii_domain(domain))  # next_hops has checked it

    async def _attempt(self, hop: NextHop, recipients: list[str], envelope: Envelope,
                       data: bytes, sts: StsVerdict | None = None) -> Attempt:
        by_address = {r.address: r for r in envelope.recipients}
        job = OutboundJob(
            helo=self.hostname, sender=envelope.sender, recipients=tuple(recipients), data=data,
            tls_context=self.tls_context_for(hop), require_tls=hop.verify_tls,
            timeout=self.settings.command_timeout,
            auth=self.smarthost_login if hop.is_smarthost else None,
            ret=envelope.ret, envid=envelope.envid, smtputf8=envelope.smtputf8,
            dsn={a: (by_address[a].notify, by_address[a].orcpt) for a in recipients
                 if a in by_address and (by_address[a].notify or by_address[a].orcpt)},
            tls_policy=hop.tls_policy,
        )
        destination = self._per_destination[hop.hostname]
        await destination.acquire()  # first: a round waiting for a busy (or dead) host holds no global slot
        await self._global.acquire()
        waited = max(0.0, time.time() - envelope.received_at)
        try:
            factory = OutboundFactory(job)
            started = time.monotonic()
            IReactorTCP(self.reactor).connectTCP(hop.address, hop.port, factory,  # (I(x) is x: the reactor)
                                                 timeout=self.settings.connect_timeout)
            result = await factory.finished
            ended = time.monotonic()
        finally:
            destination.release()
            self._global.release()
        connected = factory.connected_at if factory.connected_at is not None else ended
        if sts is not None and factory.connected_at is not None:  # TLS-RPT counts sessions with MX hosts
            failure = result.tls_failure or ("" if result.tls else "starttls-not-supported")
            if sts.policy is not None and sts.policy.mode == "testing" and not sts.policy.matches(hop.hostname):
                failure = failure or "validation-failure"
            count_session(sts.policy_type, failure)
        outcome = outcome_of(min((result.replies.get(a, (451, ""))[0] for a in recipients), default=451))
        METRICS.observe("mailappliance_delivery_attempt_seconds", ended - started, outcome=outcome.value)
        for address in recipients:
            code, _ = result.replies.get(address, (451, "no answer"))
            METRICS.count("mailappliance_delivery_attempts_total", outcome=outcome_of(code).value)
        return Attempt(result, f"{hop.hostname}[{hop.address}]:{hop.port}",
                       (waited, connected - started, ended - connected))


def sts_hops(sts: StsVerdict, hops: list[NextHop]) -> list[NextHop]:
    """Under an enforced MTA-STS policy: only the MX hosts it names, each with TLS
    required and its certificate verified for its name."""
    assert sts.policy is not None
    return [attrs.evolve(hop, verify_tls=True, tls_policy="MTA-STS enforce")
            for hop in hops if sts.policy.matches(hop.hostname)]


def _arrival(queue_id: str) -> float:
    head = queue_id.split(".", 1)[0]
    return float(head) if head.isdigit() else float("inf")


def _original_recipient(stored: str) -> str:
    orcpt = Orcpt.from_stored(stored) if stored else None
    return orcpt.field() if orcpt else ""


def _copy_state(source: Envelope, target: Envelope) -> None:
    target.recipients = source.recipients
    target.attempts = source.attempts
    target.next_attempt = source.next_attempt
    target.warned = source.warned
