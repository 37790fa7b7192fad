"""The rspamd client: ``POST /checkv2`` on rspamd's normal worker.

The message goes as the request body, the envelope and client facts as
HTTP headers (rspamd's protocol: ``From``, one ``Rcpt`` per recipient,
``Ip``, ``Helo``, ``Hostname``, ``User`` for an authenticated sender,
``Queue-Id``).  The answer is read with a size bound and turned into a
:class:`SpamVerdict`; anything else (refused connection, timeout, an
answer we cannot read) is :class:`FilterUnavailable`, which the caller maps
to the configured fail mode, never to a lost message.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import cast

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

MAX_ANSWER = 1024 * 1024
ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist", "no action")


class FilterUnavailable(Exception):
    """rspamd could not give a verdict (down, slow, or an unreadable answer)."""


@attrs.frozen
class SpamVerdict:
    action: str  # one of ACTIONS
    score: float
    required: float
    symbols: tuple[str, ...] = ()
    message: str = ""  # rspamd's text for the SMTP reply (messages.smtp_message)
    subject: str = ""  # the rewritten subject (action "rewrite subject")

    @property
    def is_spam(self) -> bool:
        return self.action in ("reject", "rewrite subject", "add header")


def parse_answer(data: bytes) -> SpamVerdict:
    """A /checkv2 JSON answer; FilterUnavailable when it is not one."""
    try:
        answer = json.loads(data)
        action = str(answer["action"]).lower()
        score = float(answer.get("score", 0.0))
        required = float(answer.get("required_score", 0.0))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FilterUnavailable(f"unreadable rspamd answer: {type(e).__name__}") from None
    if action not in ACTIONS:
        raise FilterUnavailable(f"unknown rspamd action {action!r}")
    symbols = answer.get("symbols") or {}
    names = tuple(sorted(str(name) for name in symbols)[:50]) if isinstance(symbols, dict) else ()
    messages = answer.get("messages") or {}
    message = str(messages.get("smtp_message", "")) if isinstance(messages, dict) else ""
    return SpamVerdict(action, score, required, names, message[:200], str(answer.get("subject", ""))[:500])


class _BoundedBody(protocol.Protocol):
    def __init__(self, finished: defer.Deferred[bytes], limit: int) -> None:
        self.finished, self.limit, self.size = finished, limit, 0
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            # deliverBody's transport is the response's producer; Protocol declares it an ITransport
            cast(IPushProducer, self.transport).stopProducing()
            if not self.finished.called:
                self.finished.errback(FilterUnavailable("rspamd answer too long"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.finished.called:
            self.finished.callback(b"".join(self.parts))


def _clean_header(value: str) -> bytes:
    """An HTTP header value from envelope data (no CR, LF or other controls)."""
    return "".join(c if " " <= c <= "~" else "?" for c in value)[:512].encode("ascii")


class RspamdClient:
    def __init__(self, url: str, reactor: IReactorTime, timeout: float = 10.0) -> None:
        """``reactor`` also connects (IReactorTCP) for the Agent."""
        self.url = url.rstrip("/").encode("ascii") + b"/checkv2"
        self.reactor = reactor
        self.timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 32
        pool.retryAutomatically = False
        self.agent = Agent(reactor, connectTimeout=timeout, pool=pool)

    async def check(self, message: bytes, *, sender: str, recipients: list[str], client_ip: str, helo: str,
                    hostname: str = "", user: str = "", queue_id: str = "") -> SpamVerdict:
        headers = Headers({b"From": [_clean_header(sender)], b"Rcpt": [_clean_header(r) for r in recipients],
                           b"Ip": [_clean_header(client_ip)], b"Helo": [_clean_header(helo or "unknown")],
                           b"Queue-Id": [_clean_header(queue_id)]})
        if hostname:
            headers.setRawHeaders(b"Hostname", [_clean_header(hostname)])
        if user:
            headers.setRawHeaders(b"User", [_clean_header(user)])
        request = self.agent.request(b"POST", self.url, headers, FileBodyProducer(BytesIO(message)))
        request.addTimeout(self.timeout, self.reactor)
        try:
            response: IResponse = await request
            if response.code != 200:
                raise FilterUnavailable(f"rspamd answered HTTP {response.code}")
            finished: defer.Deferred[bytes] = defer.Deferred()
            response.deliverBody(_BoundedBody(finished, MAX_ANSWER))
            finished.addTimeout(self.timeout, self.reactor)
            body = await finished
        except FilterUnavailable:
            raise
        except Exception as e:
            raise FilterUnavailable(f"rspamd unreachable: {type(e).__name__}: {str(e)[:120]}") from None
        return parse_answer(body)
