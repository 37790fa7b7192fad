"""Subscribers whose submission is suspended because the content filter found
their outgoing mail to be spam (a stolen password, a hijacked account).

Strikes are counted in memory per subscriber over a sliding window; at
``suspend_after`` strikes the subscriber is suspended: a small JSON file
``<spool>/suspended/<uid>`` says when and why, so it survives a restart and
``mailappliance-admin user show`` can tell the admin; ``user enable``
removes it, and the daemon sees that at the subscriber's next MAIL.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from mailappliance.addresses import is_safe_mailbox_name
from mailappliance.msgauth.settings import FilterSettings

if TYPE_CHECKING:  # mailappliance-admin reads suspensions without importing the reactor's interfaces
    from twisted.internet.interfaces import IReactorTime

MAX_TRACKED = 100_000


def suspension_dir(spool_dir: Path) -> Path:
    return spool_dir / "suspended"


def read_suspension(spool_dir: Path, uid: str) -> dict[str, object] | None:
    """The suspension record of ``uid`` (for the CLI), or None.  Written by :meth:`Suspensions.strike`
    ("since", "strikes", "window_seconds", "reason"); a record read back is only known to be a JSON object."""
    if not is_safe_mailbox_name(uid):
        return None
    try:
        with open(suspension_dir(spool_dir) / uid, encoding="utf-8") as f:
            record = json.loads(f.read(65536))
        return record if isinstance(record, dict) else {"reason": "unreadable record"}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"reason": "unreadable record"}


def clear_suspension(spool_dir: Path, uid: str) -> bool:
    """Lift a suspension (``user enable``); True when there was one."""
    if not is_safe_mailbox_name(uid):
        return False
    try:
        os.unlink(suspension_dir(spool_dir) / uid)
        return True
    except FileNotFoundError:
        return False


class Suspensions:
    def __init__(self, spool_dir: Path, settings: FilterSettings, clock: IReactorTime) -> None:
        self.folder = suspension_dir(spool_dir)
        self.settings = settings  # FilterSettings (suspend_after, suspend_window), swapped on SIGHUP
        self.clock = clock
        self._strikes: dict[str, deque[float]] = {}
        self._suspended: set[str] = set()
        self._loaded = False

    def load(self) -> None:
        """Who is suspended already (at the first use, as the service user, and on SIGHUP)."""
        self._loaded = True
        try:
            self._suspended = {p.name for p in self.folder.iterdir() if is_safe_mailbox_name(p.name)}
        except FileNotFoundError:
            self._suspended = set()

    def is_suspended(self, uid: str) -> bool:
        if not self._loaded:
            self.load()
        if uid not in self._suspended:
            return False
        if (self.folder / uid).exists():  # only suspended subscribers pay for this stat
            return True
        self._suspended.discard(uid)  # an admin ran "user enable"
        self._strikes.pop(uid, None)
        return False

    def strike(self, uid: str, reason: str) -> bool:
        """Count one spam verdict against ``uid``; True when this suspends them."""
        if not self._loaded:
            self.load()
        limit = self.settings.suspend_after
        if limit <= 0 or not is_safe_mailbox_name(uid):
            return False
        now = self.clock.seconds()
        strikes = self._strikes.get(uid)
        if strikes is None:
            if len(self._strikes) >= MAX_TRACKED:
                self._strikes.clear()
            strikes = self._strikes[uid] = deque(maxlen=max(limit, 1))
        strikes.append(now)
        while strikes and strikes[0] < now - self.settings.suspend_window:
            strikes.popleft()
        if len(strikes) < limit or uid in self._suspended:
            return False
        record = {"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "strikes": len(strikes),
                  "window_seconds": self.settings.suspend_window,
                  "reason": f"{len(strikes)} outgoing messages classified as spam within "
                            f"{int(self.settings.suspend_window)} s; last: {reason}"}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / uid
        staged = path.with_name(f".{uid}.tmp")
        with open(staged, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
        os.chmod(staged, 0o600)
        os.rename(staged, path)
        self._suspended.add(uid)
        return True
