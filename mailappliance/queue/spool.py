"""The outbound spool: one message file and one envelope file per queued message.

``<spool>/queue/<id>.eml`` holds the bytes (a hard link of the received file)
and ``<id>.json`` the envelope with a state per recipient.  The envelope is
written last, via a temp file, fsync and rename, and is the commit point: a
``.eml`` without its ``.json`` is a transaction that never got its 250.
Every change of an envelope is a read-modify-write under one lock file, so
the daemon's queue runner and ``mailappliance-admin queue`` never undo each
other's changes.  All methods block: the daemon calls them from a thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from mailappliance.maildir import fsync_directory

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@attrs.define
class RecipientState:
    """Where one recipient of a queued message stands."""

    address: str
    state: str = PENDING
    attempts: int = 0
    last_code: int = 0
    last_text: str = ""
    remote_host: str = ""
    notify: str = ""  # DSN NOTIFY as the client gave it ("SUCCESS,FAILURE", "NEVER"; "": not given)
    orcpt: str = ""  # DSN ORCPT decoded, "rfc822;addr" or "utf-8;addr" ("": not given)


@attrs.define
class Envelope:
    """Who sent a queued message, to whom, how it reached us, and its delivery state."""

    queue_id: str
    sender: str
    recipients: list[RecipientState]
    authenticated_as: str = ""
    client_ip: str = ""
    session_id: str = ""
    received_at: float = attrs.field(factory=time.time)
    next_attempt: float = 0.0
    attempts: int = 0
    warned: bool = False
    body_offset: int = 0  # bytes at the start of the file that are not sent (our Return-Path)
    ret: str = ""  # DSN RET: "FULL", "HDRS" or "" (not given)
    envid: str = ""  # DSN ENVID, decoded
    smtputf8: bool = False  # the client sent SMTPUTF8: UTF-8 addresses or header fields

    @classmethod
    def new(cls, queue_id: str, sender: str, recipients: list[str] | tuple[str, ...],
            notify: dict[str, str] | None = None, orcpt: dict[str, str] | None = None, *,
            authenticated_as: str = "", client_ip: str = "", session_id: str = "", received_at: float | None = None,
            body_offset: int = 0, ret: str = "", envid: str = "", smtputf8: bool = False) -> Envelope:
        """``notify`` and ``orcpt``: the DSN parameters per recipient address, where given;
        ``received_at`` defaults to now."""
        notify, orcpt = notify or {}, orcpt or {}
        return cls(queue_id, sender, [RecipientState(r, notify=notify.get(r, ""), orcpt=orcpt.get(r, ""))
                                      for r in recipients],
                   authenticated_as=authenticated_as, client_ip=client_ip, session_id=session_id,
                   received_at=time.time() if received_at is None else received_at, body_offset=body_offset,
                   ret=ret, envid=envid, smtputf8=smtputf8)

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == PENDING]

    def failed(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == FAILED]

    @property
    def finished(self) -> bool:
        return not self.pending()

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        """From the JSON object as json.load gives it (unknown keys of a newer version are left out)."""
        fields = {f.name for f in attrs.fields(RecipientState)}
        recipients = [RecipientState(**{k: v for k, v in r.items() if k in fields}) for r in data.pop("recipients")]
        known = {f.name for f in attrs.fields(cls)}
        return cls(recipients=recipients, **{k: v for k, v in data.items() if k in known})


class QueueEntryGone(LookupError):
    """The message was delivered or deleted meanwhile."""


class OutboundSpool:
    """Durable storage of outbound messages."""

    def __init__(self, spool_dir: Path) -> None:
        self.queue_dir = spool_dir / "queue"

    def prepare(self) -> None:
        """Create the spool directory and its queue/, both 0700 (messages are private);
        missing parents of the spool directory get the default mode."""
        if self.queue_dir.is_dir():
            return
        for directory in (self.queue_dir.parent, self.queue_dir):
            try:
                directory.mkdir(mode=0o700, parents=True)
            except FileExistsError:
                continue
            os.chmod(directory, 0o700)  # whatever the umask

    def message_path(self, queue_id: str) -> Path:
        return self.queue_dir / f"{queue_id}.eml"

    def _envelope_path(self, queue_id: str) -> Path:
        return self.queue_dir / f"{queue_id}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.prepare()
        with open(self.queue_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_envelope(self, envelope: Envelope) -> None:
        staged = self.queue_dir / f".{envelope.queue_id}.json.tmp"
        with open(staged, "w", encoding="utf-8") as f:
            json.dump(envelope.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(staged, self._envelope_path(envelope.queue_id))
        fsync_directory(self.queue_dir)

    def enqueue(self, message_path: Path, envelope: Envelope) -> None:
        """Store the (already fsynced) message and its envelope durably."""
        self.prepare()
        data_path = self.message_path(envelope.queue_id)
        try:
            os.link(message_path, data_path)
        except OSError:
            staged = self.queue_dir / f".{envelope.queue_id}.eml.tmp"
            shutil.copyfile(message_path, staged)
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(staged, data_path)
        with self._locked():
            self._write_envelope(envelope)

    def queued_ids(self) -> list[str]:
        """Ids of committed messages (those with an envelope), oldest name first."""
        if not self.queue_dir.exists():
            return []
        return sorted(p.stem for p in self.queue_dir.glob("*.json"))

    def envelope(self, queue_id: str) -> Envelope:
        try:
            data = json.loads(self._envelope_path(queue_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QueueEntryGone(queue_id) from None
        return Envelope.from_json(data)

    def update(self, queue_id: str, change: Callable[[Envelope], None]) -> Envelope:
        """Apply ``change`` to the current envelope and store it durably."""
        with self._locked():
            envelope = self.envelope(queue_id)
            change(envelope)
            self._write_envelope(envelope)
            return envelope

    def remove(self, queue_id: str) -> None:
        """Forget a message: envelope first (the commit point), then the data."""
        with self._locked():
            try:
                os.unlink(self._envelope_path(queue_id))
            except FileNotFoundError:
                raise QueueEntryGone(queue_id) from None
            try:
                os.unlink(self.message_path(queue_id))
            except FileNotFoundError:
                pass
            fsync_directory(self.queue_dir)

    def clean_orphans(self) -> int:
        """Remove message files whose envelope was never committed (crash before 250)."""
        if not self.queue_dir.exists():
            return 0
        removed = 0
        with self._locked():
            for data in self.queue_dir.glob("*.eml"):
                if not self._envelope_path(data.stem).exists():
                    data.unlink()
                    removed += 1
            for staged in self.queue_dir.glob(".*.tmp"):
                staged.unlink()
        return removed
