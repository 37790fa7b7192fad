"""DNS for message authentication: the configured resolver (twisted.names),
answers cached for their TTL, and a synchronous *view* for the libraries.

dkimpy and pyspf look names up synchronously.  Instead of letting them block
(or use dnspython against the system resolver) we run them against a
:class:`DnsView`: a name that is cached is answered at once; one that is not
raises :class:`NotCached`, the caller fetches it asynchronously
(:meth:`DnsCache.fetch`, bounded by the message's deadline) and runs the
check again.  Checks are cheap to repeat and a repeat finds more in the
cache each time, so the reactor never waits on the network and a busy MX
pays for each name once per TTL.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns, error
from twisted.python.failure import Failure

from mailappliance.blocking import RunBlocking

LOOKUPS = {"A": "lookupAddress", "AAAA": "lookupIPV6Address", "MX": "lookupMailExchange",
           "TXT": "lookupText", "PTR": "lookupPointer"}
MAX_ENTRIES = 50_000
MAX_RECORDS = 32  # answer records kept per name and type (SPF allows 10 MX, 10 PTR names)
MAX_TXT = 8192  # octets of one TXT record (an RSA-4096 DKIM key needs ~800)
MIN_TTL, MAX_TTL = 1, 86_400
NEGATIVE_TTL = 300  # "no such name / no such record" (RFC 2308 allows the SOA minimum; we cap it)
FAILURE_TTL = 10  # SERVFAIL, timeout: remembered briefly so a dead server costs one timeout, not one per message

# A record's value: bytes for TXT, text for A/AAAA/PTR/CNAME, (preference, name) for MX.
RecordValue = bytes | str | tuple[int, str]
Record = tuple[str, str, RecordValue]  # (owner name, type, value)
_T = TypeVar("_T")


class NotCached(BaseException):
    """Raised by a :class:`DnsView` for a name not cached yet.

    A BaseException on purpose: dkimpy and pyspf catch ``Exception`` in places
    (pyspf's ``exp=`` lookup), and this must reach our loop, not be read as an
    error in the record.  The view also remembers every miss, so a miss that a
    library swallowed anyway is fetched before the check is trusted.
    """

    def __init__(self, name: str, qtype: str) -> None:
        super().__init__(name, qtype)
        self.name = name
        self.qtype = qtype


class DnsTempError(Exception):
    """The lookup failed for now (timeout, SERVFAIL, the message's DNS time is used up)."""


@attrs.frozen
class Answer:
    """``records``: (owner name, type, value) in answer order; ``value`` is bytes for
    TXT, text for A/AAAA/PTR/CNAME, (preference, name) for MX.  ``failed``: a
    temporary failure, not an answer."""

    records: tuple[Record, ...] = ()
    failed: bool = False

    def values(self, qtype: str) -> list[RecordValue]:
        return [value for _, kind, value in self.records if kind == qtype]


def _key(name: str, qtype: str) -> tuple[str, str]:
    return name.lower().rstrip("."), qtype


def _convert(rr: dns.RRHeader) -> Record | None:
    owner = str(rr.name).lower().rstrip(".")
    payload = rr.payload  # the class twisted.names decodes each type into (isinstance: for the type checker)
    if rr.type == dns.TXT and isinstance(payload, dns.Record_TXT):
        data = b"".join(payload.data)
        return (owner, "TXT", data) if len(data) <= MAX_TXT else None
    if rr.type == dns.A and isinstance(payload, dns.Record_A):
        return owner, "A", payload.dottedQuad()
    if rr.type == dns.AAAA and isinstance(payload, dns.Record_AAAA):
        return owner, "AAAA", socket.inet_ntop(socket.AF_INET6, payload.address)
    if rr.type == dns.MX and isinstance(payload, dns.Record_MX):
        return owner, "MX", (payload.preference, str(payload.name).rstrip("."))
    if rr.type == dns.PTR and isinstance(payload, dns.Record_PTR):
        return owner, "PTR", str(payload.name).rstrip(".")
    if rr.type == dns.CNAME and isinstance(payload, dns.Record_CNAME):
        return owner, "CNAME", str(payload.name).rstrip(".")
    return None


class DnsCache:
    """Answers from ``resolver`` (a twisted.names resolver), cached for their TTL.

    Lookups of one name in flight together share one query.  Only the reactor
    thread fetches and stores; ``get`` is a plain dict read.
    """

    def __init__(self, resolver: IResolver, clock: IReactorTime, timeout: float = 5.0) -> None:
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self._entries: dict[tuple[str, str], tuple[float, Answer]] = {}
        self._pending: dict[tuple[str, str], defer.Deferred[Answer]] = {}
        self.queries = 0  # sent to the resolver (for tests and the benchmark)

    def get(self, name: str, qtype: str) -> Answer | None:
        entry = self._entries.get(_key(name, qtype))
        if entry is None or entry[0] <= self.clock.seconds():
            return None
        return entry[1]

    def put(self, name: str, qtype: str, answer: Answer, ttl: float) -> None:
        if len(self._entries) >= MAX_ENTRIES:
            now = self.clock.seconds()
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
        self._entries[_key(name, qtype)] = (self.clock.seconds() + ttl, answer)

    async def fetch(self, name: str, qtype: str, within: float) -> Answer:
        """The answer for ``name``/``qtype``, from the cache or the resolver, waiting
        at most ``within`` seconds (then a failed Answer; the query goes on and
        its answer is cached when it comes)."""
        cached = self.get(name, qtype)
        if cached is not None:
            return cached
        key = _key(name, qtype)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = defer.Deferred.fromCoroutine(self._query(*key))
            pending.addBoth(self._done, key)
        waiter: defer.Deferred[Answer] = defer.Deferred()

        def hand_over(result: Answer | Failure) -> Answer | Failure:
            if not waiter.called:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        def give_up() -> None:
            if not waiter.called:
                waiter.callback(Answer(failed=True))

        pending.addBoth(hand_over)
        if within <= 0:
            return Answer(failed=True)
        timer = self.clock.callLater(within, give_up)
        try:
            return await waiter
        finally:
            if timer.active():
                timer.cancel()

    def _done(self, result: Answer | Failure, key: tuple[str, str]) -> Answer | Failure:
        self._pending.pop(key, None)
        return result

    async def _query(self, name: str, qtype: str) -> Answer:
        self.queries += 1
        try:
            answers, _, _ = await getattr(self.resolver, LOOKUPS[qtype])(name, timeout=(self.timeout,))
        except error.DNSNameError:  # NXDOMAIN; SERVFAIL, REFUSED and the like are failures
            answer = Answer()
            self.put(name, qtype, answer, NEGATIVE_TTL)
            return answer
        except Exception:
            answer = Answer(failed=True)
            self.put(name, qtype, answer, FAILURE_TTL)
            return answer
        records = [converted for converted in map(_convert, list(answers)[:MAX_RECORDS]) if converted is not None]
        ttls = [rr.ttl for rr in answers] or [NEGATIVE_TTL]
        ttl = max(MIN_TTL, min(MAX_TTL, min(ttls) if records else NEGATIVE_TTL))
        answer = Answer(tuple(records))
        self.put(name, qtype, answer, ttl)
        return answer


class DnsView:
    """What one message's checks see: the cache, synchronously.

    ``lookup`` answers from the cache or raises :class:`NotCached`; a name whose
    fetch failed (or ran out of the message's time) is recorded in ``failed``
    and raises :class:`DnsTempError` from then on.
    """

    def __init__(self, cache: DnsCache) -> None:
        self.cache = cache
        self.misses: list[tuple[str, str]] = []
        self.failed: set[tuple[str, str]] = set()
        self.lookups = 0

    def lookup(self, name: str, qtype: str) -> Answer:
        key = _key(name, qtype)
        if key in self.failed:
            raise DnsTempError(f"DNS lookup of {qtype} {key[0]} failed")
        answer = self.cache.get(*key)
        if answer is None:
            self.misses.append(key)
            raise NotCached(*key)
        self.lookups += 1
        if answer.failed:
            self.failed.add(key)
            raise DnsTempError(f"DNS lookup of {qtype} {key[0]} failed")
        return answer

    def txt(self, name: str) -> list[bytes]:
        """TXT records at ``name`` (exactly there; a CNAME's target's records too)."""
        return [value for value in self.lookup(name, "TXT").values("TXT") if isinstance(value, bytes)]

    def take_misses(self) -> list[tuple[str, str]]:
        misses, self.misses = list(dict.fromkeys(self.misses)), []
        return misses


class StepFailed(Exception):
    """A check still missed names after every allowed round of lookups."""


async def run_with_lookups(step: Callable[[DnsView], _T], view: DnsView, deadline: float, clock: IReactorTime,
                           run: RunBlocking | None = None, max_rounds: int = 40) -> _T:
    """Run ``step(view)`` until it finishes without a cache miss, fetching each
    missed name (all misses of a round in parallel) within ``deadline``.

    ``run`` executes the step (default: here, in the reactor thread; a thread
    pool's runner for big messages) and returns a Deferred or a value.  A name
    that cannot be fetched in time is marked failed, so the next round sees a
    temporary DNS error instead of a miss: the step always ends.
    """
    for _ in range(max_rounds):
        result: _T | _Missed
        try:
            if run is None:
                result = step(view)
            else:
                result = await run(_catching_miss, step, view)
        except NotCached:
            result = _MISSED
        misses = view.take_misses()
        if not misses and not isinstance(result, _Missed):
            return result
        remaining = deadline - clock.seconds()
        answers = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(view.cache.fetch(name, qtype, remaining)) for name, qtype in misses])
        for key, answer in zip(misses, answers, strict=True):
            if answer.failed:
                view.failed.add(key)
    raise StepFailed(f"more than {max_rounds} rounds of DNS lookups")


class _Missed:
    """A step that a cache miss stopped (the view recorded the miss)."""


_MISSED: Final = _Missed()


def _catching_miss(step: Callable[[DnsView], _T], view: DnsView) -> _T | _Missed:
    """In a worker thread: a miss comes back as a value (the view recorded it)."""
    try:
        return step(view)
    except NotCached:
        return _MISSED
