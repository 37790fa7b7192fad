"""run_eagerly: a coroutine that never waits costs no Deferred; one that waits is
driven on by Twisted from where it stopped, with results and failures intact."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed

from mailappliance.linesession import run_eagerly


async def _plus_one(d: Deferred[int]) -> int:
    return await d + 1


def test_a_coroutine_that_never_waits_finishes_at_once() -> None:
    """An already-fired Deferred inside: the result comes back directly, no Deferred."""
    assert run_eagerly(_plus_one(succeed(5))) == (True, 6)


def test_an_exception_before_any_wait_is_raised_to_the_caller() -> None:
    """A coroutine that fails without waiting raises here, as a plain call would."""
    async def refuses() -> None:
        raise KeyError("nobody")

    with pytest.raises(KeyError):
        run_eagerly(refuses())


def test_a_waiting_coroutine_gets_each_result_and_failure_it_waits_for() -> None:
    """Two waits in a row: the first result and the second failure reach the
    coroutine where it awaited them, and its own result fires the Deferred."""
    first, second = Deferred[int](), Deferred[int]()

    async def waits() -> tuple[int, str]:
        value = await first
        try:
            await second
        except ValueError as e:
            return value, str(e)
        return value, "no failure"

    finished, outcome = run_eagerly(waits())
    assert not finished and isinstance(outcome, Deferred)
    results: list[object] = []
    outcome.addCallback(results.append)
    first.callback(1)
    assert results == [], "finished before the second wait was over"
    second.errback(ValueError("boom"))
    assert results == [(1, "boom")]


def test_a_failure_after_a_wait_fails_the_deferred() -> None:
    """An exception raised after the coroutine waited arrives as the Deferred's failure."""
    gate = Deferred[None]()

    async def fails_later() -> None:
        await gate
        raise KeyError("later")

    _, outcome = run_eagerly(fails_later())
    assert isinstance(outcome, Deferred)
    failures: list[object] = []
    outcome.addErrback(failures.append)
    gate.callback(None)
    assert len(failures) == 1 and failures[0].check(KeyError)  # type: ignore[attr-defined]


def test_cancelling_the_deferred_reaches_the_coroutine() -> None:
    """Cancelling the outer Deferred cancels what the coroutine waits on; the
    coroutine sees CancelledError where it awaited."""
    gate = Deferred[None]()
    seen: list[str] = []

    async def waits() -> None:
        try:
            await gate
        except CancelledError:
            seen.append("cancelled")
            raise

    _, outcome = run_eagerly(waits())
    assert isinstance(outcome, Deferred)
    outcome.addErrback(lambda failure: failure.trap(CancelledError))
    outcome.cancel()
    assert seen == ["cancelled"]
