"""A hostile MTA-STS policy host cannot make the queue read without bound, wait
forever, or follow it elsewhere: the body is read up to 64 KiB and dropped beyond,
a redirect or a wrong content type is no policy, and the whole fetch has a time
limit (a host that accepts the connection and says nothing costs that, once)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from mailappliance.queue.mta_sts import FETCH_TIMEOUT, MAX_POLICY_BYTES, HttpsPolicyFetcher, PolicyError, policy_body


class FakeTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """A response whose body arrives in the chunks given (and never ends if ``endless``)."""

    def __init__(self, code: int = 200, content_type: bytes = b"text/plain", length: Any = None,
                 chunks: tuple[bytes, ...] = (), endless: bool = False) -> None:
        self.code = code
        self.headers = Headers({b"content-type": [content_type]})
        self.length = length
        self.chunks = chunks
        self.endless = endless
        self.transport = FakeTransport()
        self.delivered = 0

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            if self.transport.stopped:
                return
            self.delivered += len(chunk)
            protocol.dataReceived(chunk)
        if not self.endless and not self.transport.stopped:
            protocol.connectionLost(Failure(ResponseDone()))


def outcome(response: FakeResponse) -> Any:
    results: list[Any] = []
    Deferred.fromCoroutine(policy_body(response)).addBoth(results.append)
    assert results, "the body should have been decided at once"
    return results[0]


def test_an_endless_body_is_cut_at_64_kib() -> None:
    """A body without Content-Length that goes on forever is dropped just past 64 KiB: sts-policy-invalid."""
    response = FakeResponse(chunks=(b"x" * 16384,) * 1000, endless=True)
    result = outcome(response)
    assert isinstance(result, Failure) and result.value.result_type == "sts-policy-invalid"
    assert response.transport.stopped and response.delivered <= MAX_POLICY_BYTES + 16384


def test_a_declared_huge_body_is_not_read() -> None:
    """Content-Length beyond the bound: refused before the first octet is kept."""
    response = FakeResponse(length=10**9, chunks=(b"x" * 100,))
    result = outcome(response)
    assert isinstance(result, Failure) and result.value.result_type == "sts-policy-invalid"


@pytest.mark.parametrize("code, content_type, kind", [
    (301, b"text/plain", "sts-policy-fetch-error"),  # a redirect is not followed (RFC 8461 3.3)
    (404, b"text/plain", "sts-policy-fetch-error"),
    (200, b"text/html", "sts-policy-invalid"),
])
def test_redirects_errors_and_other_content_are_no_policy(code: int, content_type: bytes, kind: str) -> None:
    """Only a 200 with text/plain is a policy; anything else is named for TLS-RPT."""
    result = outcome(FakeResponse(code, content_type, chunks=(b"version: STSv1\n",)))
    assert isinstance(result, Failure) and result.value.result_type == kind


def test_a_small_body_is_read_whole() -> None:
    """The ordinary case: the body in pieces, returned whole."""
    assert outcome(FakeResponse(chunks=(b"version: STSv1\n", b"mode: none\n"))) == \
        b"version: STSv1\nmode: none\n"


def test_a_policy_host_that_never_answers_costs_the_time_limit_once() -> None:
    """The fetch connects to the address our resolver gave, on the policy port, and gives up at its
    time limit with sts-policy-fetch-error."""
    reactor = MemoryReactorClock()
    fetcher = HttpsPolicyFetcher(reactor, lambda host: succeed(["192.0.2.9"]), trust_root=None, port=8443)
    results: list[Any] = []
    Deferred.fromCoroutine(fetcher("example.net")).addBoth(results.append)
    assert not results
    [(host, port, *_)] = reactor.tcpClients
    assert (host, port) == ("192.0.2.9", 8443)
    reactor.advance(FETCH_TIMEOUT + 1)
    [result] = results
    assert isinstance(result, Failure) and result.check(PolicyError)
    assert result.value.result_type == "sts-policy-fetch-error"


def test_no_address_for_the_policy_host() -> None:
    """mta-sts.<domain> without an address: no policy, named sts-policy-fetch-error."""
    fetcher = HttpsPolicyFetcher(MemoryReactorClock(), lambda host: succeed([]), trust_root=None)
    results: list[Any] = []
    Deferred.fromCoroutine(fetcher("example.net")).addBoth(results.append)
    assert results[0].value.result_type == "sts-policy-fetch-error"
