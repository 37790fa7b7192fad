"""Getting a delivery report to the original sender: their Maildir if they are
ours, otherwise the outbound queue (with the null sender, so reports never
produce reports).  A report on a forwarded copy is addressed to our SRS
address: it goes to the original sender that address stands for."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger

from mailappliance.addressing import Addressing
from mailappliance.delivery import Committer, Delivery, SpoolEntry
from mailappliance.directory.threaded import Directory
from mailappliance.maildir import maildir_for
from mailappliance.queue.spool import Envelope, OutboundSpool
from mailappliance.srs import SrsError, looks_like_srs
from mailappliance.trace_headers import return_path_header

log = Logger(namespace="mailappliance.queue")


class ReportDelivery:
    """``await deliver(sender, report)``: durable when it returns; raises on trouble."""

    def __init__(self, local_domains: frozenset[str], directory: Directory, maildir_root: Path,
                 incoming_dir: Path, spool: OutboundSpool, commit: Committer,
                 queued: Callable[[], None], addressing: Addressing | None = None) -> None:
        self.addressing = addressing  # alias domains, SRS (None: local_domains only)
        self.local_domains = local_domains
        self.directory = directory
        self.maildir_root = maildir_root
        self.incoming_dir = incoming_dir
        self.spool = spool
        self.commit = commit  # the same group commit as received mail
        self.queued = queued

    def _return_address(self, sender: str) -> str | None:
        """Where a report for ``sender`` goes: itself, or the original sender behind our SRS address."""
        local, _, domain = sender.rpartition("@")
        a = self.addressing
        if a is None or not a.is_ours(domain):
            return sender
        if looks_like_srs(local):
            if a.srs is None:
                log.warn("queue: report for <{sender}> dropped: SRS is off on this server", sender=sender)
                return None
            try:
                return a.srs.reverse(local, time.time(), check_age=False)
            except SrsError as e:
                log.warn("queue: report for <{sender}> dropped: {why}", sender=sender, why=str(e))
                return None
        return a.canonical_address(sender)

    async def __call__(self, sender: str, report: bytes) -> None:
        original = self._return_address(sender)
        if original is None:
            return
        sender = original
        domain = sender.rpartition("@")[2].lower()
        if domain in self.local_domains:
            subscriber = await self.directory.find_by_address(sender.lower())
            if subscriber is None:
                log.warn("queue: report for <{sender}> dropped: no such local subscriber", sender=sender)
                return
            delivery = Delivery(self.incoming_dir)
            delivery.write(return_path_header("") + report)
            await delivery.commit(self.commit, [maildir_for(self.maildir_root, subscriber.uid)])
            return
        delivery = Delivery(self.incoming_dir)
        delivery.write(report)
        envelope = Envelope.new(delivery.name, "", [sender])
        await delivery.commit(self.commit, spool_entries=[SpoolEntry(self.spool, envelope)])
        self.queued()
