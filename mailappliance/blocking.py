"""The type of ``run_blocking``: how code on the reactor thread hands blocking
work (disk, hashing a big message) to a thread pool.

``service.py`` builds one (``deferToThreadPool`` on the storage pool) and
passes it to whatever needs it; tests pass a function that runs the call at
once.  As a Protocol, the Deferred carries the called function's result
type, so ``await run_blocking(read, path)`` is typed like ``read(path)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred

_R = TypeVar("_R")


class RunBlocking(Protocol):
    """``function(*args)`` off the reactor thread; its result (or failure) as a Deferred."""

    def __call__(self, function: Callable[..., _R], /, *args: object) -> Deferred[_R]: ...
