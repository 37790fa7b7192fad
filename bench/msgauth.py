"""Inbound cost of message authentication and of rspamd, as ratios to the plain MX in one run.

    .venv/bin/python bench/msgauth.py --messages 3000 --concurrency 50 --rounds 3

Three variants of ours, alternating A B C A B C, each a fresh daemon:
- plain: the MX as it is without [msgauth] and [filter];
- verify: [msgauth] verify = true (SPF, DKIM, DMARC; ARC when sealed), DNS from a loopback
  zone server (tests/dns_zone.py) through [queue] resolver;
- rspamd: [filter] rspamd = a private rspamd (tests/rspamd.py), verification off.
Every message is the same 10 KB message from bench@bench.example, DKIM-signed (RSA-2048,
relaxed/relaxed), sent from 127.0.0.1, which the domain's SPF record allows; its DMARC record
says p=reject, so each message passes SPF, DKIM and DMARC. The DNS answers stay cached for
their TTL (300 s): after the first message a check sends no query. A short warm-up fills the
cache before each measured load. Prints one JSON line per load and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import Server, load, remove_finished_roots  # noqa: E402
from tests.dns_zone import ZoneServer  # noqa: E402
from tests.msgauth_world import SenderKey  # noqa: E402
from tests.rspamd import Rspamd  # noqa: E402


class Variant(Server):
    """Ours with extra TOML sections appended to bench/run.py's config."""

    def __init__(self, name: str, sections: str) -> None:
        super().__init__("ours")
        self.name, self.sections = name, sections

    def _write_config(self, cache_ttl: float) -> Path:
        config = super()._write_config(cache_ttl)
        config.write_text(config.read_text() + self.sections)
        return config


def signed_message(key: SenderKey, size: int) -> bytes:
    header = (b"From: Bench <bench@bench.example>\r\nTo: alice@example.org\r\nSubject: bench\r\n"
              b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <bench@bench.example>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return key.sign(header + line * max(1, (size - len(header)) // len(line)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["plain", "verify", "rspamd"])
    args = parser.parse_args()
    zone = ZoneServer()
    zone.txt("bench.example", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.bench.example", "v=DMARC1; p=reject")
    key = SenderKey("bench.example", "b1", "rsa").publish(zone)
    work = Path(tempfile.mkdtemp(prefix="bench-msgauth-"))
    message = work / "message.eml"
    message.write_bytes(signed_message(key, args.size))
    rspamd = None
    if "rspamd" in args.variants:
        rspamd = Rspamd(work / "rspamd", zone.address)
        rspamd.start()
    sections = {
        "plain": "",
        "verify": f'[queue]\nresolver = "{zone.address}"\n[msgauth]\nverify = true\n',
        "rspamd": f'[filter]\nrspamd = "{rspamd.url if rspamd else ""}"\ntimeout = 30\n',
    }
    results = []
    try:
        for _ in range(args.rounds):
            for name in args.variants:
                server = Variant(name, sections[name]).start()
                try:
                    warm = load_with(server, message, 20, 5)
                    assert warm["errors"] == 0, warm
                    result = load_with(server, message, args.messages, args.concurrency)
                    result.update(variant=name, queries=len(zone.queries))
                    print(json.dumps(result), flush=True)
                    results.append(result)
                finally:
                    server.stop()
    finally:
        if rspamd is not None:
            rspamd.stop()
        zone.stop()
        remove_finished_roots()
    table(results)


def load_with(server: Server, message: Path, messages: int, concurrency: int) -> dict:
    import subprocess

    original = subprocess.run

    def with_message(command, *a, **kw):  # bench/run.py's load(), with our signed message and sender
        if isinstance(command, list) and command[1:2] == [str(HERE / "smtp_load.py")]:
            command = command + ["--message-file", str(message), "--sender", "bench@bench.example"]
        return original(command, *a, **kw)

    subprocess.run = with_message
    try:
        return load(server, messages, concurrency, message.stat().st_size)
    finally:
        subprocess.run = original


def table(results: list[dict]) -> None:
    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["variant"] == variant)

    names = list(dict.fromkeys(r["variant"] for r in results))
    base_rate, base_cpu = median("plain", "messages_per_second"), median("plain", "server_cpu_ms_per_message")
    print("\n| variant | messages/s | / plain | server CPU ms/message | added CPU ms/message | errors |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rate, cpu = median(name, "messages_per_second"), median(name, "server_cpu_ms_per_message")
        errors = sum(r["errors"] for r in results if r["variant"] == name)
        print(f"| {name} | {rate:,.1f} | {rate / base_rate:.2f}x | {cpu:.3f} | {cpu - base_cpu:+.3f} | {errors} |")


if __name__ == "__main__":
    main()
