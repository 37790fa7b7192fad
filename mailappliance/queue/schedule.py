"""When to try again, and when to give up: pure functions of the facts."""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


def outcome_of(code: int) -> Outcome:
    """2xx delivered, 5xx failed now, anything else (4xx, no answer) try again."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.FAILED
    return Outcome.RETRY


def next_attempt_at(
    attempts: int, received_at: float, now: float, schedule: tuple[float, ...], max_age: float
) -> float | None:
    """When to try again after ``attempts`` attempts; None once the message is too old.

    ``schedule`` lists the waits after the 1st, 2nd, ... attempt; its last value
    repeats.  A retry that would fall after ``received_at + max_age`` is
    replaced by one last attempt at that moment, so mail is never given up
    on earlier than the admin promised.
    """
    deadline = received_at + max_age
    if now >= deadline:
        return None
    wait = schedule[min(max(attempts, 1), len(schedule)) - 1] if schedule else 300.0
    return min(now + wait, deadline)
