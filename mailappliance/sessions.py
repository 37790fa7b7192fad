"""Session identifiers that tie every log line of one connection together."""

from __future__ import annotations

import itertools
import os

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    """A short id, unique within this process and unlikely to repeat across restarts."""
    return f"{_prefix}{next(_counter):06x}"
