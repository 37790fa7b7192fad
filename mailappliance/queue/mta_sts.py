"""MTA-STS (RFC 8461) for outbound delivery, and TLS-RPT (RFC 8460) counts.

A recipient domain that publishes ``_mta-sts.<domain> TXT "v=STSv1; id=..."``
and serves a policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
tells senders which MX hosts are genuine and that they must be reached over
TLS with a certificate valid for the MX name.  We:

- look the TXT record up with the queue's resolver (cached for
  :data:`TXT_CACHE_SECONDS`), fetch the policy over HTTPS when its id is new
  (certificate checked against the configured CA or the system's trust
  store; no redirects; a time limit and a size bound), and cache it for its
  ``max_age``, also on disk (``<spool_dir>/mta-sts.json``), so a restart
  cannot be used to strip a policy;
- in ``mode: enforce``: deliver only to MX hosts the policy names, only over
  TLS with a verified certificate for that name; anything else defers
  (4.7.5) and retries: never a send in clear, never to another host;
- in ``mode: testing``: deliver as without a policy, counting what enforce
  would have refused; ``mode: none`` is no policy;
- a policy that cannot be fetched is treated as none unless a cached one
  is still valid (RFC 8461 5).

What happened is counted in ``mailappliance_tlsrpt_sessions_total``
(policy ``sts`` or ``no-policy-found``, result ``successful`` or
``failure``, RFC 8460's result type), the aggregate a TLS-RPT report
is made of.  Mail through a smarthost or a transport is not subject to it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProducer,
    IReactorTCP,
    IReactorTime,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mailappliance.blocking import RunBlocking
from mailappliance.metrics import METRICS
from mailappliance.queue.routing import DnsResult

if TYPE_CHECKING:  # Twisted's trust root interface, not re-exported by twisted.internet.ssl
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = Logger(namespace="mailappliance.queue")

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: policies are small; a bigger body is refused
MAX_AGE_LIMIT = 31557600  # one year (RFC 8461 3.2)
FETCH_TIMEOUT = 20.0  # seconds for the whole HTTPS fetch
TXT_CACHE_SECONDS = 300.0  # how long one TXT answer (or its absence) is used
TXT_TIMEOUT = (2, 4)
MAX_CACHED_DOMAINS = 10000
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_POLICY_LINE = re.compile(r"([A-Za-z0-9_]{1,32}):[ \t]*([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)[ \t]*")
METRIC = "mailappliance_tlsrpt_sessions_total"


class PolicyError(Exception):
    """No usable policy; ``result_type`` is the TLS-RPT name of the trouble."""

    def __init__(self, result_type: str, why: str) -> None:
        super().__init__(why)
        self.result_type = result_type


@attrs.frozen
class StsPolicy:
    """One domain's policy."""

    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""  # the TXT record's id it was fetched for
    fetched_at: float = 0.0

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: an MX name matches a pattern exactly, or ``*.`` stands for one leftmost label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                head, dot, tail = host.partition(".")
                if dot and head and tail == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.max_age


def parse_txt(strings: list[bytes]) -> str | None:
    """The policy id of a ``v=STSv1; id=...`` TXT record (its strings joined), None if it is not one."""
    text = b"".join(strings).decode("ascii", "replace")
    fields = [f.strip() for f in text.split(";")]
    if not fields or fields[0] != "v=STSv1":
        return None
    for field in fields[1:]:
        key, _, value = field.partition("=")
        if key.strip() == "id" and _TXT_ID.fullmatch(value.strip()):
            return value.strip()
    return None


def parse_policy(body: bytes, policy_id: str = "", now: float = 0.0) -> StsPolicy:
    """RFC 8461 3.2: ``key: value`` lines; version STSv1, mode, max_age and (unless mode
    is none) at least one mx are required; unknown keys are ignored."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("sts-policy-invalid", "policy is not ASCII") from None
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        match = _POLICY_LINE.fullmatch(line)
        if match is None:
            raise PolicyError("sts-policy-invalid", f"bad policy line {line[:60]!r}")
        fields.setdefault(match[1], []).append(match[2])
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("sts-policy-invalid", "version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if len(fields.get("mode", [])) != 1 or mode not in ("enforce", "testing", "none"):
        raise PolicyError("sts-policy-invalid", "mode must be enforce, testing or none")
    age = (fields.get("max_age") or [""])[0]
    if len(fields.get("max_age", [])) != 1 or not age.isdigit() or len(age) > 10:
        raise PolicyError("sts-policy-invalid", "max_age must be a number of seconds")
    mx = tuple(fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("sts-policy-invalid", "no mx")
    return StsPolicy(mode, mx, min(int(age), MAX_AGE_LIMIT), policy_id, now)


@attrs.frozen
class StsVerdict:
    """What applies to one delivery round: a policy (or none) and a lookup failure, if any."""

    policy: StsPolicy | None = None
    failure: str = ""  # TLS-RPT result type of a failed lookup or fetch

    @property
    def enforced(self) -> bool:
        return self.policy is not None and self.policy.mode == "enforce"

    @property
    def policy_type(self) -> str:
        return "sts" if self.policy is not None and self.policy.mode != "none" else "no-policy-found"


def count_session(policy_type: str, result_type: str) -> None:
    """One TLS-RPT session: result_type "" is a success."""
    METRICS.count(METRIC, policy_type=policy_type, result="failure" if result_type else "successful",
                  result_type=result_type or "none")


class _BoundedBody(protocol.Protocol):
    """Collects a response body up to ``limit`` octets; more aborts the transfer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(PolicyError("sts-policy-invalid", f"policy larger than {self.limit} octets"))
            # A response body's transport is its producer (twisted.web's TransportProxyProducer).
            cast(IProducer, self.transport).stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(PolicyError("sts-policy-fetch-error", f"body: {reason.getErrorMessage()}"))


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """The Agent's connection goes to the address our resolver found, on the policy port,
    with TLS checked for the policy host's name."""

    def __init__(self, reactor: IReactorTCP, address: str, port: int, host: str, trust_root: IOpenSSLTrustRoot,
                 timeout: float) -> None:
        self.reactor, self.address, self.port = reactor, address, port
        self.host, self.trust_root, self.timeout = host, trust_root, timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        kind = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        tcp = kind(self.reactor, self.address, self.port, timeout=self.timeout)
        return wrapClientTLS(optionsForClientTLS(self.host, trustRoot=self.trust_root), tcp)


class HttpsPolicyFetcher:
    """``await fetch(domain)`` -> the policy body; PolicyError otherwise."""

    def __init__(self, reactor: IReactorTime, addresses: Callable[[str], Awaitable[list[str]]],
                 trust_root: IOpenSSLTrustRoot, port: int = 443, timeout: float = FETCH_TIMEOUT) -> None:
        """``reactor``: the clock, and it connects (IReactorTCP)."""
        self.reactor = reactor
        self.addresses = addresses
        self.trust_root = trust_root
        self.port = port
        self.timeout = timeout

    async def __call__(self, domain: str) -> bytes:
        d = Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except PolicyError:
            raise
        except Exception as e:  # timeouts, refused connections, TLS failures
            text = f"{type(e).__name__}: {e}"
            kind = "sts-webpki-invalid" if ("SSL" in text or "certificate" in text.lower()
                                            or "VerificationError" in text) else "sts-policy-fetch-error"
            raise PolicyError(kind, text[:300]) from None

    async def _fetch(self, domain: str) -> bytes:
        host = f"mta-sts.{domain}"
        addresses = await self.addresses(host)
        if not addresses:
            raise PolicyError("sts-policy-fetch-error", f"no address for {host}")
        endpoints = _PinnedEndpoints(IReactorTCP(self.reactor), addresses[0], self.port, host,  # (I(x) is x)
                                     self.trust_root, self.timeout)
        agent = Agent.usingEndpointFactory(self.reactor, endpoints)
        response = await agent.request(b"GET", f"https://{host}/.well-known/mta-sts.txt".encode("ascii"),
                                       Headers({b"user-agent": [b"mailappliance MTA-STS"]}))
        return await policy_body(response)


async def policy_body(response: IResponse) -> bytes:
    """The body of a policy response: status 200 only (a redirect is not followed, RFC 8461
    3.3), text/plain, at most MAX_POLICY_BYTES (read as it arrives, never more)."""
    refusal = None
    if response.code != 200:
        refusal = PolicyError("sts-policy-fetch-error", f"HTTP status {response.code}")
    elif not (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower().startswith(b"text/plain"):
        refusal = PolicyError("sts-policy-invalid", "content type is not text/plain")
    elif isinstance(response.length, int) and response.length > MAX_POLICY_BYTES:
        refusal = PolicyError("sts-policy-invalid", f"policy larger than {MAX_POLICY_BYTES} octets")
    body = _BoundedBody(0 if refusal else MAX_POLICY_BYTES)
    response.deliverBody(body)  # a refused body is dropped at its first octet
    if refusal is not None:
        body.done.addErrback(lambda _: None)
        raise refusal
    return await body.done


class MtaSts:
    """The policies of recipient domains: looked up, fetched, cached (memory and disk)."""

    def __init__(self, resolver: IResolver, fetch: Callable[[str], Awaitable[bytes]],
                 cache_file: Path | None = None, run_blocking: RunBlocking | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.fetch = fetch
        self.cache_file = cache_file
        self.run_blocking = run_blocking
        self.clock = clock
        self.policies: dict[str, StsPolicy] = {}
        self._txt: dict[str, tuple[str | None, float]] = {}  # domain -> (policy id or None, when asked)
        self._in_flight: dict[str, list[Deferred[StsVerdict]]] = {}
        METRICS.count(METRIC, 0, policy_type="sts", result="successful", result_type="none")  # the series exists
        if cache_file is not None:
            self.policies = load_cache(cache_file, clock())

    async def verdict(self, domain: str) -> StsVerdict:
        """The policy that applies to ``domain`` now (lookups of one domain in flight are shared)."""
        domain = domain.lower().rstrip(".")
        answer: Deferred[StsVerdict] = Deferred()
        waiting = self._in_flight.get(domain)
        if waiting is not None:
            waiting.append(answer)
        else:
            self._in_flight[domain] = [answer]
            Deferred.fromCoroutine(self._verdict_once(domain)).addCallback(self._answer, domain)
        return await answer

    def _answer(self, verdict: StsVerdict, domain: str) -> None:
        for waiter in self._in_flight.pop(domain, []):
            waiter.callback(verdict)

    async def _verdict_once(self, domain: str) -> StsVerdict:
        try:
            return await self._verdict(domain)
        except Exception:
            log.failure("queue: MTA-STS lookup of {domain} failed", domain=domain)
            cached = self.policies.get(domain)
            return StsVerdict(cached, "sts-policy-fetch-error")

    async def _verdict(self, domain: str) -> StsVerdict:
        now = self.clock()
        cached = self.policies.get(domain)
        if cached is not None and cached.expired(now):
            del self.policies[domain]
            cached = None
        try:
            policy_id = await self._policy_id(domain, now)
        except PolicyError:
            return StsVerdict(cached)  # DNS trouble: a cached policy still holds (RFC 8461 5)
        if policy_id is None:
            return StsVerdict(cached)
        if cached is not None and cached.policy_id == policy_id:
            return StsVerdict(cached)
        try:
            policy = parse_policy(await self.fetch(domain), policy_id, now)
        except PolicyError as e:
            log.warn("queue: MTA-STS policy of {domain} unusable ({type}): {why}; {fallback}", domain=domain,
                     type=e.result_type, why=str(e),
                     fallback="the cached one applies" if cached else "delivering as without a policy")
            count_session("sts", e.result_type)
            return StsVerdict(cached, e.result_type)
        log.info("queue: MTA-STS policy of {domain}: mode {mode}, mx {mx}, max_age {age} (id {id})",
                 domain=domain, mode=policy.mode, mx=",".join(policy.mx), age=policy.max_age, id=policy_id)
        self._remember(domain, policy)
        return StsVerdict(policy)

    async def _policy_id(self, domain: str, now: float) -> str | None:
        known = self._txt.get(domain)
        if known is not None and now - known[1] < TXT_CACHE_SECONDS:
            return known[0]
        answers: list[dns.RRHeader]
        try:
            answers, _, _ = cast(DnsResult, await self.resolver.lookupText(f"_mta-sts.{domain}", timeout=TXT_TIMEOUT))
        except (error.DNSNameError, error.DomainError):
            answers = []
        except Exception as e:
            raise PolicyError("sts-policy-fetch-error", f"TXT lookup: {type(e).__name__}") from None
        found: list[str | None] = []
        for rr in answers:  # (isinstance: the TXT type's payload class, for the type checker)
            if rr.type == dns.TXT and isinstance(rr.payload, dns.Record_TXT):
                found.append(parse_txt(list(rr.payload.data)))
        ids = [i for i in found if i is not None]
        policy_id = ids[0] if len(ids) == 1 else None  # RFC 8461 3.1: more than one is none
        if len(self._txt) >= MAX_CACHED_DOMAINS:
            self._txt.clear()
        self._txt[domain] = (policy_id, now)
        return policy_id

    def _remember(self, domain: str, policy: StsPolicy) -> None:
        if policy.mode == "none" or policy.max_age == 0:
            self.policies.pop(domain, None)
        else:
            if len(self.policies) >= MAX_CACHED_DOMAINS:
                oldest = min(self.policies, key=lambda d: self.policies[d].fetched_at)
                del self.policies[oldest]
            self.policies[domain] = policy
        if self.cache_file is not None and self.run_blocking is not None:
            snapshot = dict(self.policies)
            d = self.run_blocking(save_cache, self.cache_file, snapshot)
            d.addErrback(lambda f: log.warn("queue: cannot save the MTA-STS cache {path}: {why}",
                                            path=str(self.cache_file), why=f.getErrorMessage()))


def load_cache(path: Path, now: float) -> dict[str, StsPolicy]:
    """The unexpired policies saved in ``path`` (a damaged file is ignored: policies are refetched)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        policies = {str(domain): StsPolicy(p["mode"], tuple(p["mx"]), int(p["max_age"]), str(p["policy_id"]),
                                           float(p["fetched_at"]))
                    for domain, p in list(data.items())[:MAX_CACHED_DOMAINS]}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warn("queue: MTA-STS cache {path} ignored: {why}", path=str(path), why=str(e))
        return {}
    return {domain: p for domain, p in policies.items() if not p.expired(now) and p.mode in ("enforce", "testing")}


def save_cache(path: Path, policies: dict[str, StsPolicy]) -> None:
    """Blocking: the policies, written atomically (temp file, fsync, rename)."""
    staged = path.with_name(f".{path.name}.tmp")
    with open(staged, "w", encoding="utf-8") as f:
        json.dump({domain: {**attrs.asdict(p), "mx": list(p.mx)} for domain, p in policies.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(staged, path)
