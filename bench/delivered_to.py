"""What Delivered-To per recipient costs the commit: ``commit_batch`` on real files, one
10 KB message to K local mailboxes, hard links (one shared file, no Delivered-To: how
mail was stored before) against a copy per mailbox with its own Delivered-To (now),
alternating A B A B in one run.  Not run by CI.

    .venv/bin/python bench/delivered_to.py --recipients 1 2 5 10 --messages 2000 --batch 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mailappliance.delivered_to import delivered_to_header
from mailappliance.delivery import CommitJob, commit_batch
from mailappliance.maildir import IncomingMessage


def run(root: Path, recipients: int, messages: int, batch: int, size: int, copies: bool) -> float:
    """Messages per second through commit_batch."""
    incoming = root / "incoming"
    incoming.mkdir(parents=True)
    boxes = tuple(root / "mail" / f"u{n}" for n in range(recipients))
    headers = tuple(delivered_to_header(f"u{n}@example.org") for n in range(recipients))
    body = b"Subject: bench\r\n\r\n" + b"x" * size + b"\r\n"
    started = time.perf_counter()
    for first in range(0, messages, batch):
        jobs = []
        for _ in range(min(batch, messages - first)):
            message = IncomingMessage(incoming)
            message.write(b"Return-Path: <s@example.net>\r\n")
            start = message.size
            if copies:
                message.write(headers[0])
            span = (start, message.size) if copies else (0, 0)
            message.write(body)
            jobs.append(CommitJob(message, boxes, (), headers if copies else (), span))
        outcomes = commit_batch(jobs)
        assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
    return messages / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipients", nargs="+", type=int, default=[1, 2, 5, 10])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16, help="messages per commit batch (concurrent senders)")
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir; use the mail filesystem)")
    args = parser.parse_args()
    table = []
    for recipients in args.recipients:
        results: dict[str, list[float]] = {"links": [], "copies": []}
        for _ in range(args.rounds):
            for kind in ("links", "copies"):
                root = Path(tempfile.mkdtemp(prefix="bench-dt-", dir=args.dir))
                try:
                    rate = run(root, recipients, args.messages, args.batch, args.size, kind == "copies")
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                results[kind].append(rate)
                print(json.dumps({"recipients": recipients, "kind": kind, "messages_per_second": round(rate, 1)}),
                      flush=True)
        links, copies = statistics.median(results["links"]), statistics.median(results["copies"])
        table.append((recipients, links, copies))
    print("\n| local recipients | hard links (msg/s) | Delivered-To copies (msg/s) | copies / links |")
    print("|---|---|---|---|")
    for recipients, links, copies in table:
        print(f"| {recipients} | {links:,.0f} | {copies:,.0f} | {copies / links:.2f} |")


if __name__ == "__main__":
    main()
