"""Waiting on conditions instead of sleeping: the one helper every test uses."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something true, and return that;
    fail with ``what`` in the message after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def process_rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def paced(condition: Callable[[], T], interval: float) -> Callable[[], T | None]:
    """``condition``, asked at most once every ``interval`` seconds (None in between):
    for conditions that cost the server a connection, which its rate limits count."""
    last = [float("-inf")]

    def ask() -> T | None:
        if time.monotonic() - last[0] < interval:
            return None
        last[0] = time.monotonic()
        return condition()

    return ask
