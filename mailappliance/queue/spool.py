"""The outbound spool: one message file and one envelope file per queued message.

``<spool>/queue/<id>.eml`` holds the bytes (a hard link of the received file)
and ``<id>.json`` the envelope with a state per recipient.  The envelope is
written last, via a temp file, fsync and rename, and is the commit point: a
``.eml`` without its ``.json`` is a transaction that never got its 250.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import attrs

from mailappliance.maildir import fsync_directory


@attrs.frozen
class Envelope:
    """Who sent a queued message, to whom, and how it reached us."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    authenticated_as: str = ""
    client_ip: str = ""
    session_id: str = ""
    received_at: float = attrs.field(factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": [{"address": r, "state": "pending", "attempts": 0} for r in self.recipients],
            "authenticated_as": self.authenticated_as,
            "client_ip": self.client_ip,
            "session_id": self.session_id,
            "received_at": self.received_at,
        }


class OutboundSpool:
    """Durable storage of outbound messages (blocking methods: call from a thread)."""

    def __init__(self, spool_dir: Path) -> None:
        self.queue_dir = spool_dir / "queue"

    def prepare(self) -> None:
        self.queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def enqueue(self, message_path: Path, envelope: Envelope) -> None:
        """Store the (already fsynced) message and its envelope durably."""
        self.prepare()
        data_path = self.queue_dir / f"{envelope.queue_id}.eml"
        try:
            os.link(message_path, data_path)
        except OSError:
            staged = self.queue_dir / f".{envelope.queue_id}.eml.tmp"
            shutil.copyfile(message_path, staged)
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(staged, data_path)
        staged_envelope = self.queue_dir / f".{envelope.queue_id}.json.tmp"
        with open(staged_envelope, "w", encoding="utf-8") as f:
            json.dump(envelope.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(staged_envelope, self.queue_dir / f"{envelope.queue_id}.json")
        fsync_directory(self.queue_dir)

    def queued_ids(self) -> list[str]:
        """Ids of committed messages (those with an envelope)."""
        if not self.queue_dir.exists():
            return []
        return sorted(p.stem for p in self.queue_dir.glob("*.json"))

    def envelope(self, queue_id: str) -> dict[str, Any]:
        return json.loads((self.queue_dir / f"{queue_id}.json").read_text(encoding="utf-8"))
