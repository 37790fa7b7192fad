"""Success notices (RFC 3461 NOTIFY=SUCCESS) for mail we delivered into a local mailbox.

The SMTP session hands over what the report needs once its 250 is sent; the
notice is built here, off the reactor (the original is read back from the
Maildir file: its header, or with RET=FULL the whole message), and delivered
like every report (:class:`~mailappliance.queue.reports.ReportDelivery`: the
sender's mailbox if ours, else the queue with the null sender).

Who may ask (``[smtp] dsn_success_notices``): ``"authenticated"`` (default)
honours the request for subscribers only; ``"all"`` also for mail from the
Internet; ``"none"`` never.  A success notice to an unauthenticated sender is
a message to an address nobody verified, with content the client chose: the
backscatter and reflection this appliance exists to prevent.  Failure and
delay reports follow NOTIFY for everyone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailappliance.blocking import RunBlocking
from mailappliance.queue.dsn import MAX_RETURNED_MESSAGE_BYTES, RecipientStatus, build_dsn

log = Logger(namespace="mailappliance.queue")

POLICIES = ("authenticated", "all", "none")
_OUR_TRACE = (b"return-path:", b"delivered-to:")


def read_original(path: Path, full: bool) -> bytes:
    """Blocking: the stored message without our Return-Path and Delivered-To; with ``full``
    the whole of it (when not too big), else enough for its header."""
    with open(path, "rb") as f:
        data = f.read(MAX_RETURNED_MESSAGE_BYTES + 1 if full else 256 * 1024)
    while data[:16].lower().startswith(_OUR_TRACE):  # ours, one line each
        end = data.find(b"\r\n")
        if end < 0:
            break
        data = data[end + 2 :]
    return data


class SuccessNotices:
    """``notify(...)``: build and deliver one success report; never raises (logs instead)."""

    def __init__(self, send_report: Callable[[str, bytes], Awaitable[None]],
                 run_blocking: RunBlocking, hostname: str, policy: str = "authenticated") -> None:
        self.send_report = send_report
        self.run_blocking = run_blocking
        self.hostname = hostname
        self.policy = policy

    def allowed(self, authenticated: bool) -> bool:
        return self.policy == "all" or (self.policy == "authenticated" and authenticated)

    def notify(self, *, sender: str, queue_id: str, arrival: float, statuses: list[RecipientStatus],
               message_path: Path, full: bool, envid: str) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._notify(sender, queue_id, arrival, statuses, message_path, full, envid))
        return d.addErrback(lambda f: log.failure("queue: {id} success notice to <{sender}> failed", f,
                                                  id=queue_id, sender=sender))

    async def _notify(self, sender: str, queue_id: str, arrival: float, statuses: list[RecipientStatus],
                      message_path: Path, full: bool, envid: str) -> None:
        original = await self.run_blocking(read_original, message_path, full)
        report = build_dsn(reporting_host=self.hostname, original_sender=sender, queue_id=queue_id,
                           arrival_date=arrival, statuses=statuses, original_message=original,
                           envid=envid, return_full=full)
        await self.send_report(sender, report)
        log.info("queue: {id} report to <{sender}>: {n} delivered (NOTIFY=SUCCESS)", id=queue_id,
                 sender=sender, n=len(statuses))
