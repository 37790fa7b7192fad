"""Getting a delivery report to the original sender: their Maildir if they are
ours, otherwise the outbound queue (with the null sender, so reports never
produce reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger

from mailappliance.delivery import Committer, Delivery, SpoolEntry
from mailappliance.directory.threaded import Directory
from mailappliance.maildir import maildir_for
from mailappliance.queue.spool import Envelope, OutboundSpool
from mailappliance.smtp.received import return_path_header

log = Logger(namespace="mailappliance.queue")


class ReportDelivery:
    """``await deliver(sender, report)``: durable when it returns; raises on trouble."""

    def __init__(self, local_domains: frozenset[str], directory: Directory, maildir_root: Path,
                 incoming_dir: Path, spool: OutboundSpool, commit: Committer,
                 queued: Callable[[], Any]) -> None:
        self.local_domains = local_domains
        self.directory = directory
        self.maildir_root = maildir_root
        self.incoming_dir = incoming_dir
        self.spool = spool
        self.commit = commit  # the same group commit as received mail
        self.queued = queued

    async def __call__(self, sender: str, report: bytes) -> None:
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
