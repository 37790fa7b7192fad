"""What every session does first: an id for its log lines, and no Nagle delay."""

from __future__ import annotations

import itertools
import os
from typing import Any

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    """A short id, unique within this process and unlikely to repeat across restarts."""
    return f"{_prefix}{next(_counter):06x}"


def no_delay(transport: Any) -> None:
    """Small replies must not wait for the client's delayed ACK (Nagle): ~40 ms per round trip."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not a TCP transport (unit tests)
